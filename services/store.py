"""A shard's in-memory block store: immutable blobs under a byte budget.

Where it stands: behind the gRPC servicer of one shard (services/server.py). It stores opaque
bytes under store keys that already commit to (tenant, namespace, block key) (see
`services.security.store_key`), so no tenant or namespace can claim, shadow or evict-by-
collision another's blocks. It never imports torch or the kernels.

Eviction knows prefixes and resists scans:
- Blocks are grouped by chain (the key of block 0 of their prefix). Evicting block i of a
  prefix makes every later block unreachable, so a chain is always eaten from its deepest
  block towards its head.
- Chains live in two queues, S3-FIFO style. A new chain enters `probation` (FIFO); a chain
  that was read while there moves to `main` (LRU) when it reaches the head of probation, one
  that was not is evicted and remembered in a small `ghost` list (a chain put again while in
  the ghost list goes straight to main). Probation is held to `probation_fraction` of the
  budget while main has blocks, so one large scan of blocks read once only cycles probation.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

Blob = bytes | bytearray  # a stored block; never mutated once stored


class BlockTooLargeError(ValueError):
    """A block larger than the whole byte budget of the shard."""


@dataclass
class _Entry:
    chain: bytes
    position: int
    data: Blob


@dataclass
class _Chain:
    blocks: list[tuple[int, bytes]] = field(default_factory=list)  # (position, key), sorted
    nbytes: int = 0
    read: bool = False
    in_main: bool = False


@dataclass
class StoreStats:
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_existing: int = 0
    evictions: int = 0
    checksum_failures: int = 0
    rejected: int = 0
    redis_hits: int = 0
    redis_misses: int = 0
    mismatched_blocks: int = 0


class BlockStore:
    """Blocks by store key, at most `budget_bytes` of payload. Thread-safe: every method and
    every counter change holds the lock."""

    def __init__(
        self,
        budget_bytes: int,
        probation_fraction: float = 0.1,
        ghost_chains: int = 4096,
        on_evict: Callable[[bytes, bytes, int, Blob], None] | None = None,
    ) -> None:
        """on_evict(key, chain, position, data): told of every evicted block (the Redis tier's
        "evicted" mode); called with the store's lock held: must not block."""
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if not 0.0 < probation_fraction < 1.0:
            raise ValueError("probation_fraction must lie in (0, 1)")
        self.budget_bytes = budget_bytes
        self.probation_fraction = probation_fraction
        self._ghost_limit = ghost_chains
        self._on_evict = on_evict
        self._blocks: dict[bytes, _Entry] = {}
        self._chains: dict[bytes, _Chain] = {}
        self._probation: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._probation_bytes = 0
        self._lock = threading.Lock()
        self.stats = StoreStats(budget_bytes=budget_bytes)

    # -- reads ------------------------------------------------------------------------------

    def leading(self, keys: list[bytes]) -> int:
        """How many of `keys`, in order, are present before the first missing one."""
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._blocks:
                    return i
            return len(keys)

    def get(self, key: bytes) -> Blob | None:
        """The block's bytes, or None on a miss. A hit marks its chain as read."""
        with self._lock:
            entry = self._blocks.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            chain = self._chains[entry.chain]
            chain.read = True
            if chain.in_main:
                self._main.move_to_end(entry.chain)
            return entry.data

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    def snapshot(self) -> StoreStats:
        """A consistent copy of the counters."""
        with self._lock:
            return replace(self.stats)

    def count(self, **deltas: int) -> None:
        """Add to counters kept by the layers above (rejected requests, Redis hits...)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- writes -----------------------------------------------------------------------------

    def put(self, key: bytes, chain: bytes, position: int, data: Blob) -> bool:
        """Store a block; False (and no work) when the key is already present."""
        if len(data) > self.budget_bytes:
            raise BlockTooLargeError(
                f"block of {len(data)} bytes exceeds the shard budget of {self.budget_bytes}"
            )
        with self._lock:
            if key in self._blocks:
                self.stats.put_existing += 1
                return False
            ch = self._chains.get(chain)
            if ch is None:
                ch = self._chains[chain] = _Chain()
                if chain in self._ghost:
                    del self._ghost[chain]
                    ch.in_main = True
                    self._main[chain] = None
                else:
                    self._probation[chain] = None
            elif ch.in_main:
                self._main.move_to_end(chain)
            bisect.insort(ch.blocks, (position, key))
            self._account(ch, len(data))
            self._blocks[key] = _Entry(chain, position, data)
            self.stats.puts += 1
            while self.stats.bytes > self.budget_bytes:
                self._evict_one()
            self.stats.blocks = len(self._blocks)
            return True

    def delete(self, keys: list[bytes]) -> set[bytes]:
        """Remove the given blocks; returns the keys that were present."""
        with self._lock:
            deleted = set()
            for key in keys:
                if key in self._blocks:
                    self._remove(key, remember=False)
                    deleted.add(key)
            self.stats.blocks = len(self._blocks)
            return deleted

    # -- eviction ---------------------------------------------------------------------------

    def _account(self, ch: _Chain, delta: int) -> None:
        ch.nbytes += delta
        self.stats.bytes += delta
        if not ch.in_main:
            self._probation_bytes += delta

    def _evict_one(self) -> None:
        limit = self.probation_fraction * self.budget_bytes
        from_probation = bool(self._probation) and (not self._main or self._probation_bytes > limit)
        queue = self._probation if from_probation else self._main
        chain_id = next(iter(queue))
        ch = self._chains[chain_id]
        if from_probation and ch.read:  # read while on probation: promote, evict elsewhere
            del self._probation[chain_id]
            self._probation_bytes -= ch.nbytes
            ch.in_main, ch.read = True, False
            self._main[chain_id] = None
            return
        _, key = ch.blocks[-1]  # the deepest block of the least valuable chain
        entry = self._blocks[key]
        self._remove(key, remember=from_probation)
        self.stats.evictions += 1
        if self._on_evict is not None:
            self._on_evict(key, entry.chain, entry.position, entry.data)

    def _remove(self, key: bytes, remember: bool) -> None:
        entry = self._blocks.pop(key)
        ch = self._chains[entry.chain]
        ch.blocks.remove((entry.position, key))
        self._account(ch, -len(entry.data))
        if ch.blocks:
            return
        del self._chains[entry.chain]
        (self._main if ch.in_main else self._probation).pop(entry.chain)
        if remember:
            self._ghost[entry.chain] = None
            if len(self._ghost) > self._ghost_limit:
                self._ghost.popitem(last=False)
