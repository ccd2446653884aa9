"""Consistent hashing: which shards own a block key.

Where it stands: the client routes every block straight to its owner (one hop, as Redis
Cluster and memcached clients do). Each shard has `VNODES` points on a 64-bit ring, placed by
sha256 of its id, so adding a shard moves about 1/N of the keys and nothing else. Block keys
are sha256 digests already; their first 8 bytes are their position.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

VNODES = 128


def _point(data: bytes) -> int:
    return int.from_bytes(data[:8], "big")


class Ring:
    """The ring of `shard_ids`; `owners(key, r)` gives r distinct shards, primary first."""

    def __init__(self, shard_ids: Sequence[str], vnodes: int = VNODES) -> None:
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError("shard ids must be distinct")
        points = [
            (_point(hashlib.sha256(f"{sid}#{v}".encode()).digest()), sid)
            for sid in shard_ids
            for v in range(vnodes)
        ]
        points.sort()
        self.shard_ids = tuple(sorted(shard_ids))
        self._points = [p for p, _ in points]
        self._owners = [s for _, s in points]
        self._walks: dict[tuple[int, int], list[str]] = {}  # (point, replicas) -> owners

    def owners(self, key: bytes, replicas: int = 1) -> list[str]:
        """The first `replicas` distinct shards clockwise from the key (fewer if the ring is small)."""
        i = bisect.bisect_left(self._points, _point(key))
        walk = self._walks.get((i, replicas))
        if walk is None:  # at most one walk per point and replica count: the ring is fixed
            walk = self._walks[i, replicas] = self._walk(i, replicas)
        return list(walk)

    def _walk(self, i: int, replicas: int) -> list[str]:
        if not self._points:
            return []
        want = min(replicas, len(self.shard_ids))
        found: list[str] = []
        for j in range(len(self._points)):
            sid = self._owners[(i + j) % len(self._points)]
            if sid not in found:
                found.append(sid)
                if len(found) == want:
                    break
        return found
