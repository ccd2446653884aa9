"""The shard's block store: byte bound, immutability, tail-first and scan-resistant eviction."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.services.security import store_key
from kvpool.services.store import BlockStore, BlockTooLargeError

NS = b"n" * 32
OTHER = b"o" * 32


def raw_key(chain: int, pos: int, branch: int = 0) -> bytes:
    """A client's block key."""
    return hashlib.sha256(f"{chain}/{pos}/{branch}".encode()).digest()


def key(chain: int, pos: int, branch: int = 0, ns: bytes = NS) -> bytes:
    """The store key the shard keeps that block under in namespace `ns` (no authentication)."""
    return store_key(None, ns, raw_key(chain, pos, branch))


def put_chain(
    store: BlockStore, chain: int, blocks: int, size: int = 100, branch: int = 0
) -> list[bytes]:
    keys = [key(chain, p, 0 if p < 2 else branch) for p in range(blocks)]
    for p, k in enumerate(keys):
        store.put(k, keys[0], p, bytes([p % 256]) * size)
    return keys


def test_put_get_and_immutability() -> None:
    store = BlockStore(10_000)
    k = key(0, 0)
    assert store.put(k, k, 0, b"abc")
    assert not store.put(k, k, 0, b"xyz")  # a re-put is a no-op that succeeds
    assert store.get(k) == b"abc"
    assert store.get(key(0, 0, ns=OTHER)) is None  # another namespace never sees it
    assert store.get(store_key("tenant-b", NS, raw_key(0, 0))) is None  # nor another tenant
    assert store.stats.put_existing == 1 and store.stats.hits == 1 and store.stats.misses == 2


def test_leading_counts_until_the_first_gap() -> None:
    store = BlockStore(10_000)
    keys = put_chain(store, 0, 5)
    assert store.leading(keys) == 5
    store.delete([keys[2]])
    assert store.leading(keys) == 2
    assert store.leading([store_key(None, OTHER, raw_key(0, p)) for p in range(5)]) == 0
    assert store.leading([]) == 0


def test_a_chain_is_evicted_from_its_tail() -> None:
    store = BlockStore(1000)  # ten 100-byte blocks
    keys = put_chain(store, 0, 10)
    put_chain(store, 1, 4)  # needs four blocks of room: chain 0 loses its last four
    assert [k in store for k in keys] == [True] * 6 + [False] * 4
    assert store.leading(keys) == 6  # what is left is still a usable prefix
    assert store.stats.evictions == 4


def test_branches_go_before_their_shared_head() -> None:
    store = BlockStore(800)
    a = put_chain(store, 0, 5, branch=1)  # blocks 0,1 shared; 2..4 branch 1
    b = put_chain(store, 0, 5, branch=2)  # re-uses 0,1 (no-op); 2..4 branch 2
    assert store.stats.put_existing == 2 and len(store) == 8
    put_chain(store, 1, 6)  # six more blocks: evicts six of chain 0, deepest positions first
    assert a[0] in store and a[1] in store  # the shared head survives
    assert sum(k in store for k in a[2:] + b[2:]) == 0


def test_one_large_scan_does_not_flush_a_reused_prefix() -> None:
    store = BlockStore(2000)
    hot = put_chain(store, 0, 8)
    for k in hot:
        assert store.get(k) is not None  # read: it earns its place
    for chain in range(1, 200):  # a scan of 20x the budget, each block read never
        put_chain(store, chain, 3)
    assert all(k in store for k in hot)
    assert store.stats.bytes <= 2000


def test_a_chain_evicted_from_probation_and_put_again_is_kept() -> None:
    store = BlockStore(1000, probation_fraction=0.3)
    put_chain(store, 0, 2)
    store.get(key(0, 0))
    for chain in range(1, 10):  # chain 0 is promoted; chain 1 leaves probation unread
        put_chain(store, chain, 2)
    assert key(1, 0) not in store
    again = put_chain(store, 1, 2)  # seen again while remembered: straight to main
    for chain in range(10, 40):
        put_chain(store, chain, 2)
    assert all(k in store for k in again)
    assert key(5, 0) not in store  # its peers that were not seen twice are gone


def test_a_block_larger_than_the_budget_is_refused() -> None:
    store = BlockStore(100)
    with pytest.raises(BlockTooLargeError):
        store.put(key(0, 0), key(0, 0), 0, b"x" * 101)
    assert len(store) == 0 and store.stats.bytes == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "delete"]),
            st.integers(0, 7),
            st.integers(0, 9),
            st.integers(1, 400),
        ),
        max_size=120,
    )
)
def test_byte_bound_and_accounting_hold_under_any_sequence(ops) -> None:
    store = BlockStore(1500)
    sizes: dict[bytes, int] = {}
    for op, chain, pos, size in ops:
        k = key(chain, pos)
        if op == "put":
            if store.put(k, key(chain, 0), pos, b"x" * size):
                sizes[k] = size
        elif op == "get":
            data = store.get(k)
            assert data is None or len(data) == sizes[k]
        else:
            store.delete([k])
        present = [k for k in sizes if k in store]
        assert store.stats.bytes == sum(sizes[k] for k in present) <= 1500
        assert store.stats.blocks == len(store) == len(present)


def test_evictions_are_reported_with_their_store_key_chain_and_position() -> None:
    evicted: list[tuple[bytes, bytes, int, bytes]] = []
    store = BlockStore(300, on_evict=lambda *block: evicted.append(block))
    keys = put_chain(store, 0, 3)
    put_chain(store, 1, 1)  # one block of room: chain 0 loses its tail
    assert evicted == [(keys[2], keys[0], 2, bytes([2]) * 100)]


def test_snapshot_is_a_copy_and_count_adds_to_the_counters() -> None:
    store = BlockStore(1000)
    put_chain(store, 0, 2)
    before = store.snapshot()
    store.count(rejected=2, redis_hits=1)
    put_chain(store, 1, 1)
    assert (before.puts, before.rejected, before.redis_hits) == (2, 0, 0)
    after = store.snapshot()
    assert (after.puts, after.rejected, after.redis_hits, after.blocks) == (3, 2, 1, 3)
