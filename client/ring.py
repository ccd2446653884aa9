"""Placement: which shards own a block key.

Where it stands: the client routes every block straight to its owner (one hop, as Redis
Cluster and memcached clients do). Placement is rendezvous hashing (highest random weight):
each shard scores a key by a 64-bit mix of the key and the shard's seed (sha256 of its id), and
the highest scores own it. Every shard's share of keys is 1/N up to sampling noise (a ring of
128 points per shard left one of 16 shards 16% over the mean: it evicted younger blocks, and a
prefix spread over many shards lives only as long as the shortest horizon among them); adding
a shard moves about 1/N of the keys, all to it, and removing one moves only its own. Block keys
are sha256 digests already: their first 8 bytes are the key's number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijective scramble of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Ring:
    """The placement over `shard_ids`; `owners(key, r)` gives r distinct shards, primary first."""

    def __init__(self, shard_ids: Sequence[str]) -> None:
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError("shard ids must be distinct")
        self.shard_ids = tuple(sorted(shard_ids))
        self._seeds = [
            (int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big"), sid)
            for sid in self.shard_ids
        ]

    def owners(self, key: bytes, replicas: int = 1) -> list[str]:
        """The `replicas` shards (fewer if there are fewer) that score `key` highest."""
        k = int.from_bytes(key[:8], "big")
        if replicas == 1 and self._seeds:
            return [max(self._seeds, key=lambda s: _mix(k ^ s[0]))[1]]
        scored = sorted(((_mix(k ^ seed), sid) for seed, sid in self._seeds), reverse=True)
        return [sid for _, sid in scored[:replicas]]
