"""Placement (rendezvous hashing): balanced, stable when shards come and go, distinct replicas;
runs of a prefix on one shard, a hot run's keys placed by their own bytes."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from kvpool.proto.keys import block_keys, run_head
from kvpool.ring import Placement, Ring

from ..proto.test_keys import NS

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


def test_a_prefixs_runs_each_land_on_one_shard_and_spread_over_shards() -> None:
    place = Placement(Ring([f"shard-{i}" for i in range(16)]))
    keys = block_keys(NS, range(200 * NS.block_tokens))
    owners = [place.owners(k) for k in keys]
    assert all(owners[b] == owners[run_head(b)] for b in range(200))
    heads = sorted({run_head(b) for b in range(200)})
    assert len({owners[h][0] for h in heads}) >= 8  # 28 runs over 16 shards
    assert all(place.fallback(k) == () for k in keys)


def test_a_hot_run_is_placed_by_its_keys_own_bytes_with_its_run_owner_as_fallback() -> None:
    ids = [f"shard-{i}" for i in range(16)]
    place = Placement(Ring(ids), replicas=2, hot_runs=2)
    keys = block_keys(NS, range(16 * NS.block_tokens))
    run = keys[8:16]  # one run
    before = place.owners(run[3])
    assert place.mark_hot(run[0]) and not place.mark_hot(run[5])  # the run, once
    for k in run:
        assert place.owners(k) == tuple(Ring(ids).owners(k[8:16], 2))  # by its own bytes
        mine = set(place.owners(k))
        assert set(place.fallback(k)) == set(Ring(ids).owners(k, 2)) - mine
        assert place.ranked(k)[:2] == place.owners(k) and len(place.ranked(k)) == 16
    assert len({place.owners(k)[0] for k in run}) > 1 and place.owners(run[3]) != before
    assert place.owners(keys[4]) == tuple(Ring(ids).owners(keys[4], 2))  # other runs as before
    place.reset(Ring(ids[:8]), 1)  # a new ring: the hot run stays known
    assert place.is_hot(run[2])
    assert place.owners(run[2]) == tuple(Ring(ids[:8]).owners(run[2][8:]))
    place.mark_hot(keys[0])
    place.mark_hot(keys[1])  # at most hot_runs remembered: the oldest goes back to its run
    assert not place.is_hot(run[0]) and place.owners(run[2]) == place.owners(run[0])
    with pytest.raises(ValueError):
        Placement(Ring(ids), replicas=0)
