"""Which blocks a shard serves so often that their reads should be spread over more shards.

Where it stands: beside the servicer of one shard (services/server.py), which tells it of every
block it serves and puts its answer, a replica count, in the reply (Get, BatchGet and their
same-host twins). Clients then spread their reads of that block over the first `replicas`
owners on the ring and fill the ones that miss (read repair), as Mooncake Store replicates hot
objects: a prefix's first block, read by every request, no longer loads one shard.

A block is hot when its share of the bytes this shard served recently is at least `hot_share`
(5%, under a 16-shard tier's fair share of 6.25%: several warm blocks whose reads meet on one
shard each stay under 10% of it while together they load it twice the mean; on synthetic
traces with shared multi-block system prompts, 16 shards, 10% left bytes served at 1.98x and
2.63x the mean, 5% at 1.51x and 1.65x);
its hint is then enough replicas for each to carry about `hot_share` of what the shard serves
besides the key, ceil(share / (hot_share * (1 - share))), at most `max_replicas` (32: a block
every request reads should be on every shard of a large tier; clients cap it at the shards
there are). "Recently" is a decayed count: every
`window` reads all counts halve, and keys far from hot (under a quarter of `hot_share`) are
dropped, so at most `capacity` keys are tracked and each read costs O(1) (the halving, O(capacity),
runs once per `window` >= `capacity` reads). Nothing is judged before `min_reads` reads.
"""

from __future__ import annotations

import math


class HotKeys:
    """A decayed count of bytes served per key, over at most `capacity` keys."""

    def __init__(
        self, hot_share: float = 0.05, max_replicas: int = 32, capacity: int = 1024,
        window: int = 1024, min_reads: int = 64,
    ) -> None:  # fmt: skip
        if not 0.0 < hot_share <= 1.0 or max_replicas < 1 or window < capacity or capacity < 1:
            raise ValueError(
                "need 0 < hot_share <= 1, max_replicas >= 1 and window >= capacity >= 1"
            )
        self.hot_share, self.max_replicas = hot_share, max_replicas
        self.capacity, self.window, self.min_reads = capacity, window, min_reads
        self._bytes: dict[bytes, float] = {}
        self._total = 0.0  # decayed bytes served, all keys
        self._reads = 0.0  # decayed reads, all keys
        self._since = 0  # reads since the last halving

    def read(self, key: bytes, size: int) -> int:
        """Count one read of `size` bytes of `key`; the replicas it should have (1: not hot)."""
        self._since += 1
        if self._since >= self.window:
            self._decay()
        self._total += size
        self._reads += 1
        count = self._bytes.get(key)
        if count is None:
            if len(self._bytes) >= self.capacity:
                return 1  # not tracked until a halving makes room
            count = 0.0
        count += size
        self._bytes[key] = count
        if self._reads < self.min_reads:
            return 1
        return self._replicas(count / self._total)

    def peek(self, key: bytes, size: int) -> int:
        """The replicas `read(key, size)` would answer, counting nothing."""
        count = self._bytes.get(key)
        if count is None or self._reads + 1 < self.min_reads:
            return 1
        return self._replicas((count + size) / (self._total + size))

    def _replicas(self, share: float) -> int:
        """Replicas for a key with `share` of this shard's bytes: 1 under `hot_share`, else
        enough that each carries `hot_share` of what the shard serves besides the key (the
        key itself inflates the shard's total: a key with half of it needs 10 replicas at 0.1,
        not 5)."""
        if share < self.hot_share:
            return 1
        rest = max(1.0 - share, 1e-9)
        return min(self.max_replicas, math.ceil(share / (self.hot_share * rest)))

    def _decay(self) -> None:
        self._since = 0
        self._total /= 2
        self._reads /= 2
        floor = self._total * self.hot_share / 4
        for key, count in list(self._bytes.items()):
            if count / 2 < floor:
                del self._bytes[key]
            else:
                self._bytes[key] = count / 2

    def __len__(self) -> int:
        return len(self._bytes)
