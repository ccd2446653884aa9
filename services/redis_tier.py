"""Redis as a shard's second tier: blocks kept with a TTL, shared and persistent across
shard restarts.

Where it stands: behind a shard's BlockStore. In mode "all" every stored block is also written
to Redis; in mode "evicted" only blocks evicted from memory are. Writes go through a bounded
queue drained by a background thread, so a put never waits for Redis (a full queue drops the
write and counts it: the block stays in memory, it is only less durable). A memory miss is read
through from Redis, verified, and put back into memory. Values are the block with its chain
and position in front, under `kvpool:<namespace id>:<key>`, so tenants stay apart as in memory.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from collections.abc import Sequence
from typing import Literal

import redis

log = logging.getLogger(__name__)
Mode = Literal["all", "evicted"]
_META = struct.Struct("<32sI")  # chain key, position


class RedisTier:
    def __init__(
        self, url: str, ttl_s: int = 3600, mode: Mode = "all", queue_blocks: int = 256
    ) -> None:
        if mode not in ("all", "evicted"):
            raise ValueError(f"redis mode must be 'all' or 'evicted', got {mode!r}")
        if ttl_s <= 0:
            raise ValueError("redis ttl must be positive")
        self.url, self.ttl_s, self.mode = url, ttl_s, mode
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.written = self.dropped = self.errors = 0
        self._queue: queue.Queue[tuple[bytes, bytes, bytes, int, bytes] | None] = queue.Queue(
            queue_blocks
        )
        self._thread = threading.Thread(target=self._drain, name="redis-tier", daemon=True)
        self._thread.start()

    @staticmethod
    def _key(namespace_id: bytes, key: bytes) -> bytes:
        return b"kvpool:" + namespace_id.hex().encode() + b":" + key.hex().encode()

    def offer(
        self, namespace_id: bytes, key: bytes, chain: bytes, position: int, data: bytes
    ) -> None:
        """Queue a block for writing; never blocks."""
        try:
            self._queue.put_nowait((namespace_id, key, chain, position, data))
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            namespace_id, key, chain, position, data = item
            try:
                value = _META.pack(chain, position) + data
                self.client.set(self._key(namespace_id, key), value, ex=self.ttl_s)
                self.written += 1
            except redis.RedisError as e:
                self.errors += 1
                log.warning("redis tier write failed: %s", e)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def get(self, namespace_id: bytes, key: bytes) -> tuple[bytes, int, bytes] | None:
        """(chain, position, block) or None; a Redis error is a miss (logged, counted)."""
        try:
            value = self.client.get(self._key(namespace_id, key))
        except redis.RedisError as e:
            self.errors += 1
            log.warning("redis tier read failed: %s", e)
            return None
        if not isinstance(value, bytes) or len(value) < _META.size:
            return None
        chain, position = _META.unpack_from(value)
        return chain, position, value[_META.size :]

    def leading(self, namespace_id: bytes, keys: Sequence[bytes]) -> int:
        """How many of `keys`, in order, Redis holds before the first it does not."""
        if not keys:
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._key(namespace_id, key))
            present = pipe.execute()
        except redis.RedisError as e:
            self.errors += 1
            log.warning("redis tier lookup failed: %s", e)
            return 0
        return next((i for i, p in enumerate(present) if not p), len(keys))

    def delete(self, namespace_id: bytes, keys: Sequence[bytes]) -> set[bytes]:
        """Remove blocks from Redis; returns the keys it held."""
        self.flush()  # a queued write must not bring a deleted block back
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.delete(self._key(namespace_id, key))
            return {k for k, n in zip(keys, pipe.execute(), strict=True) if n}
        except redis.RedisError as e:
            self.errors += 1
            log.warning("redis tier delete failed: %s", e)
            return set()

    def flush(self) -> None:
        """Wait until every queued write has been attempted."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.client.close()
