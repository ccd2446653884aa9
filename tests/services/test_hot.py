"""Hot blocks: a shard says which blocks it serves too often (services/hot.py), clients spread
their reads over replicas and fill the replicas that miss. On four real shards (gRPC servers
without Ray) that know each other."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import pytest

from kvpool.proto import kvpool_pb2 as pb
from kvpool.services.hot import HotKeys
from kvpool.services.security import store_key
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import BlockPut, ClientConfig, TierClient

from .test_batch import prefix
from .test_server import NS

SHARDS = 4


def test_a_key_read_most_of_the_time_is_hot_and_others_are_not() -> None:
    hot = HotKeys(hot_share=0.1, max_replicas=16, capacity=64, window=64, min_reads=32)
    hints = {}
    for i in range(2000):
        key = b"root" if i % 2 == 0 else i.to_bytes(4, "little")  # half the reads: one key
        hints[key] = hot.read(key, 100)
    # half the bytes served: each replica carries 0.1 of the other half, ceil(0.5 / 0.05)
    assert hints[b"root"] in (9, 10, 11)
    assert all(h == 1 for k, h in hints.items() if k != b"root")
    assert len(hot) <= 64  # bounded, however many keys pass


def test_nothing_is_hot_before_min_reads_and_a_cooled_key_is_dropped() -> None:
    hot = HotKeys(hot_share=0.1, capacity=16, window=16, min_reads=10)
    assert [hot.read(b"a", 10) for _ in range(9)] == [1] * 9  # too few reads to judge
    assert hot.read(b"a", 10) == hot.max_replicas == 32  # all the bytes: capped
    for i in range(200):  # the traffic moves to 20 other keys, evenly
        hot.read(bytes([i % 20]), 10)
    assert hot.read(b"a", 10) == 1


@pytest.mark.parametrize("bad", [dict(hot_share=0.0), dict(max_replicas=0), dict(window=8)])
def test_hot_keys_refuse_bad_settings(bad) -> None:
    with pytest.raises(ValueError):
        HotKeys(**{"capacity": 16, "window": 16, **bad})


@pytest.fixture(scope="module")
def shards() -> Iterator[list[ShardServer]]:
    servers: list[ShardServer] = []

    async def topology() -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=1, shards=[
            pb.Shard(shard_id=s.shard_id, address=s.address) for s in servers])  # fmt: skip

    for i in range(SHARDS):
        limits = Limits(max_block_bytes=16 << 20, max_keys=64)
        servers.append(ShardServer(BlockStore(32 << 20), f"hot{i}", topology, limits=limits))
        servers[-1].start()
    yield servers
    for s in servers:
        s.stop()


@pytest.mark.parametrize("same_host", [False, True])
def test_a_block_read_many_times_is_served_by_several_shards(shards, same_host) -> None:
    """Every read of block 0 (with the block after it) returns the right bytes; replicas that
    miss fall back to the owner and are filled; in the end block 0 lives on every shard and
    several shards served it; a lookup still finds it after its owner lost it."""
    keys, blobs = prefix(40_000 + 1000 * same_host, 2)
    sk = store_key(None, NS.id, keys[0])
    failures: list[str] = []

    async def go() -> tuple[list[pb.StatsResponse], list[pb.StatsResponse], list[str], int]:
        config = ClientConfig(timeout_s=10.0, same_host=same_host)
        tier = TierClient(
            shards[0].address, config, on_failure=lambda o, e: failures.append(e.code)
        )
        try:
            await tier.put_many(NS, [BlockPut(keys[0], keys[0], 0, blobs[0]),
                                     BlockPut(keys[1], keys[0], 1, blobs[1], keys[0])])  # fmt: skip
            before = await tier.stats()
            for _ in range(200):
                assert await tier.get_many(NS, keys) == blobs
            after = await tier.stats()
            owner = tier.owners(keys[0])
            by_id = {s.shard_id: s for s in shards}
            by_id[owner[0]].store.delete([sk])  # its reads went elsewhere: the owner lets it go
            present = await tier.lookup(NS, keys[:1])
            return before, after, owner, present
        finally:
            await tier.close()

    before, after, _, present = asyncio.run(go())
    served = {a.shard_id: a.bytes_served - b.bytes_served
              for a, b in zip(sorted(after, key=lambda s: s.shard_id),
                              sorted(before, key=lambda s: s.shard_id), strict=True)}  # fmt: skip
    assert sum(1 for v in served.values() if v > 0) >= 3
    assert max(served.values()) < 0.75 * sum(served.values())  # the owner serves no longer all
    assert sum(sk in s.store for s in shards) >= 3  # filled by read repair
    assert present == 1
    assert failures == []


def test_hints_from_a_shard_are_bounded(shards) -> None:
    keys, _ = prefix(42_000, 1)

    async def go() -> tuple[list[str], Sequence[str], tuple[str, ...], bool, bool]:
        tier = TierClient(shards[0].address, ClientConfig(timeout_s=10.0, max_hot_replicas=3))
        try:
            await tier.refresh(force=True)
            tier._note_hot(keys[0], 2**32 - 1, primary=False)  # an absurd hint
            orders = [tier._read_order(keys[0]) for _ in range(12)]
            firsts = sorted({o[0] for o in orders})
            holders = tier._holders(keys[0])
            fallback = tier._place.fallback(keys[0])  # its run's owner, where it was stored
            tier._note_hot(keys[0], 1, primary=False)  # a replica sees only its share: kept
            kept = keys[0] in tier._hot
            tier._note_hot(keys[0], 1, primary=True)  # its owner says it cooled: dropped
            return firsts, holders, fallback, kept, keys[0] in tier._hot
        finally:
            await tier.close()

    firsts, holders, fallback, kept, still = asyncio.run(go())
    assert len(firsts) == 3 and len(fallback) <= 1  # max_hot_replicas, not 2**32 - 1
    assert len(holders) == 3 + len(fallback) and set(fallback) <= set(holders)
    assert kept and not still


def test_the_hot_memory_of_a_client_is_bounded(shards) -> None:
    async def go() -> int:
        tier = TierClient(shards[0].address, ClientConfig(hot_keys=10))
        try:
            await tier.refresh(force=True)
            for i in range(100):
                tier._note_hot(i.to_bytes(32, "little"), 4, primary=True)
            return len(tier._hot)
        finally:
            await tier.close()

    assert asyncio.run(go()) == 10


@pytest.mark.parametrize("same_host", [False, True])
def test_a_run_that_turns_hot_is_still_read_where_it_was_stored_and_moves_as_read(
    shards, same_host
) -> None:
    """Blocks 4..7 (one run) stored on the run's owner; once the client knows the run hot,
    its keys are placed by their own bytes: lookup, get_prefix and get_many still find them
    (on the run's owner), each read fills the block's own owner, and a block stored after
    goes to its own owner only. A client that does not know the run hot finds them too."""
    keys, blobs = prefix(44_000 + 1000 * same_host, 12)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        config = ClientConfig(timeout_s=10.0, same_host=same_host)
        tier, other = TierClient(shards[0].address, config), TierClient(shards[0].address, config)
        try:
            await tier.put_many(NS, puts[:10], prefix=keys)
            run_owner = tier.owners(keys[4])
            tier._place.mark_hot(keys[4])  # what a shard's hint for a block of the run does
            own = [tier.owners(k) for k in keys]
            found = (await tier.lookup(NS, keys), await tier.get_prefix(NS, keys),
                     await tier.get_many(NS, keys[:10]))  # fmt: skip
            await tier.put_many(NS, puts[10:], prefix=keys)
            return run_owner, own, found, await other.get_prefix(NS, keys[:10])
        finally:
            await tier.close()
            await other.close()

    run_owner, own, (n, got, many), elsewhere = asyncio.run(go())
    assert n == 10 and got == blobs[:10] and many == blobs[:10] and elsewhere == blobs[:10]
    held = [{s.shard_id for s in shards if store_key(None, NS.id, k) in s.store} for k in keys]
    assert len({o[0] for o in own[4:8]}) > 1  # the run's blocks spread once it is hot
    for b in range(4, 8):  # read where they were, filled on their own owner
        assert set(run_owner) | set(own[b]) <= held[b]
    assert held[10] == set(own[10]) and held[11] == set(own[11])  # stored after: own owner
