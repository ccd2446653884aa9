"""Consistent hashing: balanced, stable when shards are added, distinct replicas."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from kvpool.ring import Ring

KEYS = [hashlib.sha256(str(i).encode()).digest() for i in range(20000)]


def test_keys_spread_evenly() -> None:
    ring = Ring([f"shard-{i}" for i in range(4)])
    counts = Counter(ring.owners(k)[0] for k in KEYS)
    assert set(counts) == set(ring.shard_ids)
    assert max(counts.values()) / min(counts.values()) < 1.5


def test_adding_a_shard_moves_only_its_share() -> None:
    before = Ring([f"shard-{i}" for i in range(4)])
    after = Ring([f"shard-{i}" for i in range(5)])
    moved = [k for k in KEYS if before.owners(k)[0] != after.owners(k)[0]]
    assert all(after.owners(k)[0] == "shard-4" for k in moved)  # only to the new shard
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # about 1/5


def test_replicas_are_distinct_and_primary_first() -> None:
    ring = Ring(["a", "b", "c"])
    for k in KEYS[:500]:
        owners = ring.owners(k, 2)
        assert len(set(owners)) == 2 and owners[0] == ring.owners(k)[0]
    assert len(ring.owners(KEYS[0], 5)) == 3
    assert Ring([]).owners(KEYS[0]) == []


def test_same_ring_whatever_the_order_of_ids() -> None:
    a, b = Ring(["x", "y", "z"]), Ring(["z", "x", "y"])
    assert all(a.owners(k, 2) == b.owners(k, 2) for k in KEYS[:500])
    with pytest.raises(ValueError):
        Ring(["x", "x"])
