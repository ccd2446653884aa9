"""Placement (rendezvous hashing): balanced, stable when shards come and go, distinct replicas."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from kvpool.ring import Ring

KEYS = [hashlib.sha256(str(i).encode()).digest() for i in range(20000)]


@pytest.mark.parametrize("shards", [4, 16])
def test_keys_spread_evenly(shards: int) -> None:
    """Every shard's share is 1/N up to sampling noise (a ring of 128 points per shard gave one
    of 16 shards 1.16x the mean share)."""
    ring = Ring([f"shard-{i}" for i in range(shards)])
    counts = Counter(ring.owners(k)[0] for k in KEYS)
    assert set(counts) == set(ring.shard_ids)
    mean = len(KEYS) / shards
    assert max(counts.values()) / mean < 1.1 and min(counts.values()) / mean > 0.9


def test_removing_a_shard_moves_only_its_keys() -> None:
    before = Ring([f"shard-{i}" for i in range(5)])
    after = Ring([f"shard-{i}" for i in range(5) if i != 2])
    for k in KEYS[:5000]:
        was, now = before.owners(k, 2), after.owners(k, 2)
        if was[0] != "shard-2":
            assert now[0] == was[0]
        else:
            assert now[0] == was[1]  # its second choice takes it


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
