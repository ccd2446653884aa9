"""Redis as a shard's second tier: blocks kept with a TTL, shared and persistent across
shard restarts.

Where it stands: behind a shard's BlockStore. In mode "all" every stored block is also written
to Redis; in mode "evicted" only blocks evicted from memory are. A memory miss is read through
from Redis, verified, and put back into memory.

Keys are opaque 32-byte store keys: the shard passes one that already commits to the tenant,
the namespace and the block key, so tenants and namespaces stay apart as in memory. A block
lives under `kvpool:v2:<store key hex>`; its value is the chain key and position in front of
the block.

Writes go through a bounded queue drained by a background thread, so `offer` never waits for
Redis (a full queue drops the write and counts it: the block stays in memory, it is only less
durable). Every queued write is also recorded as the pending write of its Redis key. The drain
thread writes an item only while it is still the pending one, and holds `_write_lock` from that
check to the end of its SET (one command, bounded by the socket timeout). `delete` takes the same
lock, cancels the pending writes of its keys, and issues DEL before letting go: a write queued
before a delete can therefore never land after it and bring the deleted block back, and `delete`
never waits on the queue, only on at most one SET in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal

import redis

log = logging.getLogger(__name__)
Mode = Literal["all", "evicted"]
KEY_BYTES = 32
PREFIX = b"kvpool:v2:"
ARTIFACT_PREFIX = b"kvpool:artifact:v1:"  # then the store key (hex) and the part
_META = struct.Struct("<32sI")  # chain key, position

# A queued write: Redis key, sequence number, chain, position, block.
_Item = tuple[bytes, int, bytes, int, bytes | bytearray]


@dataclasses.dataclass(frozen=True)
class RedisTierCounters:
    """A consistent snapshot of a RedisTier's counters."""

    written: int = 0  # blocks SET in Redis
    dropped: int = 0  # offers refused because the write queue was full
    errors: int = 0  # Redis commands that failed: writes, reads, lookups, deletes
    write_errors: int = 0  # the failed writes among `errors`
    skipped: int = 0  # queued writes not made: a delete or a newer offer of the key came first
    queued: int = 0  # writes queued and not yet reached by the drain thread

    @property
    def offered(self) -> int:
        """Every offer so far: each one is dropped, still queued, or reached exactly once."""
        return self.dropped + self.queued + self.written + self.write_errors + self.skipped


class RedisTier:
    def __init__(
        self,
        url: str,
        ttl_s: int = 3600,
        mode: Mode = "all",
        queue_blocks: int = 256,
        socket_timeout_s: float = 5.0,
    ) -> None:
        if mode not in ("all", "evicted"):
            raise ValueError(f"redis mode must be 'all' or 'evicted', got {mode!r}")
        if ttl_s <= 0:
            raise ValueError("redis ttl must be positive")
        if queue_blocks <= 0:
            raise ValueError("redis queue_blocks must be positive")
        self.url, self.ttl_s, self.mode = url, ttl_s, mode
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        # _lock: short sections only, never across I/O. Guards the counters, _pending and
        # _queued. _write_lock: held by the drain thread across check-and-SET and by delete
        # across cancel-and-DEL. Order: _write_lock before _lock.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when _queued drops to 0
        self._write_lock = threading.Lock()
        self._written = self._dropped = self._errors = self._write_errors = 0
        self._skipped = self._queued = 0
        self._pending: dict[bytes, int] = {}  # Redis key -> sequence number of its queued write
        self._seq = itertools.count()
        self._stopped = threading.Event()
        self._queue: queue.Queue[_Item | None] = queue.Queue(queue_blocks)
        self._thread = threading.Thread(target=self._drain, name="redis-tier", daemon=True)
        self._thread.start()

    @staticmethod
    def redis_key(key: bytes) -> bytes:
        """The Redis key a block's store key lives under."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"a store key has {KEY_BYTES} bytes, got {len(key)}")
        return PREFIX + key.hex().encode()

    # -- counters --------------------------------------------------------------------------

    def counters(self) -> RedisTierCounters:
        with self._lock:
            return RedisTierCounters(
                written=self._written,
                dropped=self._dropped,
                errors=self._errors,
                skipped=self._skipped,
                queued=self._queued,
                write_errors=self._write_errors,
            )

    @property
    def written(self) -> int:
        with self._lock:
            return self._written

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    @property
    def errors(self) -> int:
        with self._lock:
            return self._errors

    def _error(self, what: str, e: redis.RedisError) -> None:
        with self._lock:
            self._errors += 1
        log.warning("redis tier %s failed: %s", what, e)

    # -- writes ----------------------------------------------------------------------------

    def offer(self, key: bytes, chain: bytes, position: int, data: bytes | bytearray) -> None:
        """Queue a block for writing; never waits for Redis. `data` is kept as is (not copied)
        until the drain thread builds the value: the caller must not change it afterwards."""
        rkey = self.redis_key(key)
        with self._lock:
            seq = next(self._seq)
            try:
                self._queue.put_nowait((rkey, seq, chain, position, data))
            except queue.Full:
                self._dropped += 1
                return
            # Recorded after the put but under the same lock the drain thread checks under,
            # so it cannot reach the item before it is the pending write of its key.
            self._pending[rkey] = seq
            self._queued += 1

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._stopped.is_set():
                return
            try:
                outcome = self._write(item)
            except Exception:  # the thread must outlive a bad item
                log.exception("redis tier write failed")
                outcome = "error"
            with self._lock:  # the outcome and the queue count move together
                self._queued -= 1
                if outcome == "written":
                    self._written += 1
                elif outcome == "skipped":
                    self._skipped += 1
                else:
                    self._errors += 1
                    self._write_errors += 1
                if self._queued == 0:
                    self._idle.notify_all()

    def _write(self, item: _Item) -> Literal["written", "skipped", "error"]:
        rkey, seq, chain, position, data = item
        with self._write_lock:
            with self._lock:
                if self._pending.get(rkey) != seq:
                    return "skipped"  # deleted, or a newer offer of the key is queued behind
                del self._pending[rkey]
            try:
                value = _META.pack(chain, position) + data
                self.client.set(rkey, value, ex=self.ttl_s)
            except redis.RedisError as e:
                log.warning("redis tier write failed: %s", e)
                return "error"
        return "written"

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait up to `timeout_s` until every write queued so far has been attempted (for tests
        and benchmarks; the shard never calls it). True if the queue went idle in time."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queued == 0, timeout=timeout_s)

    # -- reads -----------------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[bytes, int, bytes] | None:
        """(chain, position, block) or None; a Redis error is a miss (logged, counted)."""
        rkey = self.redis_key(key)
        try:
            value = self.client.get(rkey)
        except redis.RedisError as e:
            self._error("read", e)
            return None
        if not isinstance(value, bytes) or len(value) < _META.size:
            return None
        chain, position = _META.unpack_from(value)
        return chain, position, value[_META.size :]

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, in order, Redis holds before the first it does not."""
        if not keys:
            return 0
        try:
            present = self._each("exists", [self.redis_key(k) for k in keys])
        except redis.RedisError as e:
            self._error("lookup", e)
            return 0
        return next((i for i, p in enumerate(present) if not p), len(keys))

    def _each(self, command: str, rkeys: Sequence[bytes]) -> list[Any]:
        """One `command` per Redis key, in one round trip (no transaction)."""
        pipe = self.client.pipeline(transaction=False)
        for rkey in rkeys:
            getattr(pipe, command)(rkey)
        return pipe.execute()

    # -- artifacts and records (services/artifacts.py) --------------------------------------

    def put_plain(self, key: bytes, part: bytes, value: bytes) -> bool:
        """SET part `part` of an artifact or record under store key `key`, now and without
        expiry (they are few, and what a namespace's blocks need); False if Redis failed."""
        try:
            self.client.set(
                ARTIFACT_PREFIX + self.redis_key(key)[len(PREFIX) :] + b":" + part, value
            )
        except redis.RedisError as e:
            self._error("artifact write", e)
            return False
        return True

    def get_plain(self, key: bytes, part: bytes) -> bytes | None:
        """What `put_plain` wrote, or None (a Redis error is a miss, logged and counted)."""
        try:
            value = self.client.get(
                ARTIFACT_PREFIX + self.redis_key(key)[len(PREFIX) :] + b":" + part
            )
        except redis.RedisError as e:
            self._error("artifact read", e)
            return None
        return value if isinstance(value, bytes) else None

    # -- deletes ---------------------------------------------------------------------------

    def delete(self, keys: Sequence[bytes]) -> set[bytes]:
        """Remove blocks from Redis and cancel their queued writes; returns the keys the tier
        held (in Redis, or queued for it). Never waits on the write queue: at most on one SET
        in flight (bounded by the socket timeout) and its own DEL."""
        if not keys:
            return set()
        rkeys = [self.redis_key(k) for k in keys]
        with self._write_lock:
            with self._lock:
                cancelled = {
                    k
                    for k, rk in zip(keys, rkeys, strict=True)
                    if self._pending.pop(rk, None) is not None
                }
            try:
                removed = self._each("delete", rkeys)
            except redis.RedisError as e:
                self._error("delete", e)
                return cancelled
        return cancelled | {k for k, n in zip(keys, removed, strict=True) if n}

    # -- shutdown --------------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the drain thread after the writes already queued (waiting at most about
        `timeout_s`; what is still queued then is abandoned) and close the connections."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stopped.set()  # if it is still busy: stop at the next item
        self.client.close()
