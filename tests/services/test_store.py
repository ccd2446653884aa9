"""The shard's block store: byte bound, immutability, and eviction that knows prefix trees
(leaves first, roots last), adapts between recency and frequency, resists scans, and keeps
tenants within their quotas."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from collections import OrderedDict

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
    store: BlockStore, chain: int, blocks: int, size: int = 100, branch: int = 0,
    tenant: str | None = None,
) -> list[bytes]:  # fmt: skip
    """A prefix of `blocks` blocks, put one block per call, each naming its parent."""
    keys = [key(chain, p, 0 if p < 2 else branch) for p in range(blocks)]
    for p, k in enumerate(keys):
        parent = keys[p - 1] if p else None
        store.put(k, keys[0], p, bytes([p % 256]) * size, parent=parent, tenant=tenant)
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


def test_a_block_evicted_unread_and_put_again_is_kept_over_new_ones() -> None:
    store = BlockStore(1000)
    put_chain(store, 0, 2)
    for chain in range(1, 10):  # chain 0 leaves memory unread, remembered as a ghost
        put_chain(store, chain, 2)
    assert key(0, 0) not in store
    again = put_chain(store, 0, 2)  # seen again while remembered: proven, kept over new blocks
    for chain in range(10, 40):
        put_chain(store, chain, 2)
    assert all(k in store for k in again)
    assert key(5, 0) not in store  # its peers that were not seen twice are gone


def test_a_root_shared_by_every_prefix_outlives_them_all() -> None:
    store = BlockStore(2000)  # 20 blocks
    root = key(0, 0)
    store.put(root, root, 0, b"r" * 100)
    for c in range(1, 100):  # each request: the root, then 3 blocks of its own
        mine = [key(c, p) for p in (1, 2, 3)]
        assert store.get(root) is not None  # every request reads the shared root
        for p, k in enumerate(mine, 1):
            store.put(k, root, p, b"x" * 100, parent=root if p == 1 else mine[p - 2])
    assert root in store and store.stats.bytes <= 2000
    # what is left of the prefixes are usable prefixes: no block without its parent
    for c in range(1, 100):
        present = [key(c, p) in store for p in (1, 2, 3)]
        assert present == sorted(present, reverse=True)


def test_a_tenant_over_its_quota_evicts_its_own_blocks_first() -> None:
    store = BlockStore(2000, tenant_quota=0.5)
    a = [k for c in range(3) for k in put_chain(store, c, 3, tenant="a")]  # 900 bytes
    for k in a:
        assert store.get(k) is not None
    for c in range(10, 60):  # tenant b scans 15x its quota
        put_chain(store, c, 3, tenant="b")
    assert all(k in store for k in a)  # a's working set is untouched
    assert store.quota_bytes("b") == 1000 and store.stats.quota_evictions > 0
    held_b = store.stats.bytes - 900
    assert 0 < held_b <= 1000
    assert store.quota_bytes(None) is None  # unauthenticated blocks have no quota


def test_quotas_per_tenant_override_the_default_and_bound_block_size() -> None:
    store = BlockStore(1000, tenant_quota=0.5, quotas={"small": 0.1})
    assert store.quota_bytes("small") == 100 and store.quota_bytes("other") == 500
    with pytest.raises(BlockTooLargeError):
        store.put(key(0, 0), key(0, 0), 0, b"x" * 101, tenant="small")
    with pytest.raises(ValueError):
        BlockStore(1000, tenant_quota=1.5)
    with pytest.raises(ValueError):
        BlockStore(1000, quotas={"t": 0.0})


def test_resize_evicts_down_to_a_smaller_budget_and_grows_back() -> None:
    store = BlockStore(1000)
    keys = put_chain(store, 0, 10)
    assert store.resize(400) == 600 and store.stats.bytes == 400
    assert store.leading(keys) == 4  # the prefix lost its tail, not its head
    assert store.resize(1000) == 0
    put_chain(store, 1, 6)
    assert store.stats.bytes == 1000 and store.budget_bytes == 1000
    with pytest.raises(ValueError):
        store.resize(0)


def test_get_many_and_put_many_are_gets_and_puts_in_one_batch() -> None:
    store = BlockStore(10_000)
    keys = [key(0, p) for p in range(4)]
    items = [(k, keys[0], p, bytes([p]) * 10, keys[p - 1] if p else None, None)
             for p, k in enumerate(keys)]  # fmt: skip
    assert store.put_many(items) == [True] * 4
    assert store.put_many(items[:1]) == [False]
    assert store.get_many([*keys, key(9, 9)]) == [bytes([p]) * 10 for p in range(4)] + [None]
    s = store.snapshot()
    assert (s.hits, s.misses, s.bytes_served, s.put_existing) == (4, 1, 40, 1)
    with pytest.raises(BlockTooLargeError):  # checked before anything of the batch is stored
        store.put_many([(key(1, 0), key(1, 0), 0, b"x", None, None),
                        (key(1, 1), key(1, 0), 1, b"x" * 20_000, None, None)])  # fmt: skip
    assert key(1, 0) not in store


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
    store = BlockStore(1500, tenant_quota=0.6)
    sizes: dict[bytes, int] = {}
    for op, chain, pos, size in ops:
        k = key(chain, pos)
        if op == "put":
            parent = key(chain, pos - 1) if pos else None
            tenant = "t" if chain % 2 else None
            if store.put(k, key(chain, 0), pos, b"x" * size, parent=parent, tenant=tenant):
                sizes[k] = size
        elif op == "get":
            data = store.get(k)
            assert data is None or len(data) == sizes[k]
        else:
            store.delete([k])
        present = [k for k in sizes if k in store]
        assert store.stats.bytes == sum(sizes[k] for k in present) <= 1500
        odd = [k for c in range(1, 8, 2) for p in range(10) if (k := key(c, p)) in store]
        assert sum(sizes[k] for k in odd) <= store.quota_bytes("t") == 900
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


def test_the_next_turn_of_a_read_conversation_is_kept_through_a_scan() -> None:
    """A block put as the only child of a frequent block continues a prefix that was reused:
    it starts frequent and a scan does not flush it; a second branch off that block, or a
    continuation of a prefix nobody read, starts recent and goes with the scan."""

    def conversation(read: bool) -> tuple[list[bytes], bytes, bytes]:
        store_keys = put_chain(store, 0, 3)
        if read:
            assert all(store.get(k) is not None for k in store_keys)
        nxt, branch = key(0, 3), key(0, 3, branch=1)
        store.put(nxt, store_keys[0], 3, b"t" * 100, parent=store_keys[2])
        store.put(branch, store_keys[0], 3, b"b" * 100, parent=store_keys[2])
        return store_keys, nxt, branch

    for read in (True, False):
        store = BlockStore(1000)
        turn1, nxt, branch = conversation(read)
        for chain in range(1, 60):  # a scan of one-time prompts, 17x the budget
            put_chain(store, chain, 3)
        assert (nxt in store) is read and all((k in store) is read for k in turn1)
        assert branch not in store


def test_an_old_block_nobody_read_goes_before_a_newer_proven_one() -> None:
    """Between the two sides the older block goes, as in LRU: a proven block is protected from
    newer unproven ones only while those exceed the recent side's target, never from older."""
    store = BlockStore(1000)  # ten blocks; the recent side's target starts at half
    old = put_chain(store, 0, 3)  # never read
    proven = put_chain(store, 1, 6)
    assert all(store.get(k) is not None for k in proven)
    put_chain(store, 2, 2)  # two blocks of room: 400 bytes unread, within the target
    assert all(k in store for k in proven)
    assert [k in store for k in old] == [True, True, False]  # the old prefix lost its tail


def chat_trace(requests: int, seed: int) -> list[list[bytes]]:
    """Conversations under one shared system prompt: each turn is the previous prompt plus a
    new block or two; a conversation comes back after a heavy-tailed number of other requests
    and ends after a geometric number of turns. Every block is read again about as often,
    whatever side it is on: a policy that trusts frequency over recency loses hits here."""
    rng = random.Random(seed)
    root = raw_key(0, 0)
    waiting: list[tuple[int, list[bytes]]] = []  # (due request, blocks so far)
    out, fresh = [], itertools.count(1)
    for i in range(requests):
        if waiting and waiting[0][0] <= i and rng.random() < 0.85:
            _, blocks = heapq.heappop(waiting)
        else:
            blocks = [root]
        blocks = blocks + [raw_key(next(fresh), 1) for _ in range(rng.randint(1, 2))]
        out.append(blocks)
        if rng.random() < 0.8:
            heapq.heappush(waiting, (i + 1 + int(rng.paretovariate(1.2) * 20), blocks))
    return out


def lru_hits(trace: list[list[bytes]], capacity: int) -> int:
    """Leading blocks found by exact LRU over blocks, touched in prefix order."""
    blocks: OrderedDict[bytes, None] = OrderedDict()
    hits = 0
    for keys in trace:
        n = 0
        while n < len(keys) and keys[n] in blocks:
            n += 1
        hits += n
        for k in keys:
            blocks[k] = None
            blocks.move_to_end(k)
        while len(blocks) > capacity:
            blocks.popitem(last=False)
    return hits


def store_hits(trace: list[list[bytes]], capacity: int) -> int:
    """Leading blocks found by one BlockStore of `capacity` 100-byte blocks, driven as a
    client drives it: read the leading blocks, put the rest, each naming its parent."""
    store = BlockStore(100 * capacity)
    hits = 0
    for keys in trace:
        n = store.leading(keys)
        hits += n
        store.get_many(keys[:n])
        store.put_many([(k, keys[0], p, b"x" * 100, keys[p - 1] if p else None, None)
                        for p, k in enumerate(keys) if p >= n])  # fmt: skip
    return hits


@pytest.mark.parametrize("capacity", [100, 300, 400, 600])
def test_conversations_keep_at_least_what_lru_keeps(capacity: int) -> None:
    trace = chat_trace(2500, seed=7)
    assert store_hits(trace, capacity) >= lru_hits(trace, capacity)
