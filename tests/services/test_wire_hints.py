"""The eviction hints across shards travel on the wire (BlockInfo.hints, BlockFound.branched,
TouchRequest.branched), as the in-process replay (`trace_replay.Stores`) hands them to the
stores: real shards (gRPC servers with their same-host sockets, without Ray) and the client's
get_prefix / put_many. A block whose parent lives on another shard starts as one store would
start it: frequent when it continues a block nobody else continued, recent when it branches
off one that was continued already; and a block whose next one is elsewhere is marked so."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.messages import namespace_to_proto
from kvpool.services.security import store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.trace import TraceKeys, TraceRequest
from kvpool.transport import BlockPut, ClientConfig, TierClient
from tests.services.test_trace_tier import NS, bind, template, tier


def prompt(*block_ids: int) -> TraceRequest:
    return TraceRequest(0, 512 * len(block_ids), 1, block_ids)


def node(servers: list[ShardServer], key: bytes):  # type: ignore[no-untyped-def]
    """The store node of `key` on the one shard that holds it."""
    held = [s.store._blocks[k] for s in servers if (k := store_key(None, NS.id, key)) in s.store]
    assert len(held) == 1
    return held[0]


def spread(
    client: TierClient, servers: list[ShardServer], tk: TraceKeys
) -> tuple[list[bytes], ...]:
    """A two-block prefix on two shards, and two continuations of it whose third block lives on
    the third shard (where no block of the prefix is: the hints alone say what the block
    before it knew)."""
    owner = lambda key: client._owners_of(key)[0]  # noqa: E731
    first = next(
        p for p in itertools.count(1) if len({owner(k) for k in tk(prompt(p, p + 1))}) == 2
    )
    prefix = tk(prompt(first, first + 1))
    third = ({s.shard_id for s in servers} - {owner(k) for k in prefix}).pop()
    after = (tk(prompt(first, first + 1, c)) for c in itertools.count(10_000))
    x, y = itertools.islice((keys for keys in after if owner(keys[2]) == third), 2)
    return prefix, x, y


async def request(client: TierClient, keys: list[bytes], blob: bytes) -> int:
    """A replay's request: the prefix's hits, then the put of the rest."""
    n = len(await client.get_prefix(NS, keys))
    puts = [BlockPut(k, keys[0], i, bind(blob, k, i)) for i, k in enumerate(keys) if i >= n]
    await client.put_many(NS, puts, prefix=keys)
    return n


@pytest.mark.parametrize("same_host", [True, False], ids=["probes", "grpc"])
def test_a_continuation_on_another_shard_starts_as_one_store_would_start_it(
    same_host: bool,
) -> None:
    blob, tk = template(), TraceKeys(NS)
    for servers in tier(64 << 20):

        async def go(servers: list[ShardServer]) -> None:
            config = ClientConfig(timeout_s=30.0, same_host=same_host)
            client = TierClient(servers[0].address, config)
            try:
                await client.lookup(NS, tk(prompt(1)))  # topology
                prefix, x, y = spread(client, servers, tk)
                assert await request(client, prefix, blob) == 0
                assert node(servers, prefix[0]).branched  # its next block is on another shard
                assert not node(servers, prefix[1]).branched  # it has none yet
                # the prefix read and continued once: the only continuation of a proven block
                assert await request(client, x, blob) == 2
                assert node(servers, x[2]).frequent
                # continued again: a branch off a block continued already starts recent
                assert await request(client, y, blob) == 2
                assert not node(servers, y[2]).frequent
            finally:
                await client.close()  # flushes the touches (and the branch mark riding on one)
            assert node(servers, prefix[1]).branched

        asyncio.run(go(servers))


def test_a_branch_mark_its_shard_cannot_take_is_reported_and_the_put_stands() -> None:
    blob, tk = template(), TraceKeys(NS)
    for servers in tier(64 << 20):

        async def go(servers: list[ShardServer]) -> None:
            failures: list[tuple[str, str]] = []
            client = TierClient(servers[0].address, ClientConfig(timeout_s=3.0, same_host=False),
                                on_failure=lambda op, e: failures.append((op, e.code)))  # fmt: skip
            try:
                await client.lookup(NS, tk(prompt(1)))  # topology
                prefix, x, _ = spread(client, servers, tk)
                await request(client, prefix, blob)
                assert len(await client.get_prefix(NS, x)) == 2  # its last block unbranched
                parent = next(s for s in servers if s.shard_id == client._owners_of(x[1])[0])
                parent.stop()  # the mark for x[1] has nowhere to go
                put = [BlockPut(x[2], x[0], 2, bind(blob, x[2], 2))]
                assert await client.put_many(NS, put, prefix=x) == [True]
                assert node([s for s in servers if s is not parent], x[2]).frequent
                assert ("touch", "UNAVAILABLE") in failures
            finally:
                await client.close()

        asyncio.run(go(servers))


def test_hints_with_unknown_bits_are_refused() -> None:
    blob = template()
    key = TraceKeys(NS)(prompt(7))[0]
    data = bind(blob, key, 0)
    srv = ShardServer(BlockStore(16 << 20), "hints")
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            for hints, code in ((4, grpc.StatusCode.INVALID_ARGUMENT), (3, None)):
                info = pb.BlockInfo(namespace_id=NS.id, key=key, chain=key, size=len(data),
                                    namespace=namespace_to_proto(NS), hints=hints)  # fmt: skip
                stream = iter([pb.PutRequest(info=info), pb.PutRequest(chunk=data)])
                if code is None:
                    assert stub.Put(stream, timeout=10).stored
                    continue
                with pytest.raises(grpc.RpcError) as e:
                    stub.Put(stream, timeout=10)
                assert e.value.code() == code and "hints" in (e.value.details() or "")
                assert store_key(None, NS.id, key) not in srv.store
    finally:
        srv.stop()


def test_a_touch_over_grpc_is_bounded_and_marks_only_what_it_names() -> None:
    blob = template()
    keys = TraceKeys(NS)(prompt(7, 8))
    srv = ShardServer(BlockStore(16 << 20), "touch")
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            for i, key in enumerate(keys):
                info = pb.BlockInfo(namespace_id=NS.id, key=key, chain=keys[0], position=i,
                                    size=len(blob), namespace=namespace_to_proto(NS))  # fmt: skip
                data = bind(blob, key, i)
                stub.Put(iter([pb.PutRequest(info=info), pb.PutRequest(chunk=data)]), timeout=10)
            for request, code in (
                (pb.TouchRequest(namespace_id=NS.id, branched=[keys[0]] * 4097),
                 grpc.StatusCode.RESOURCE_EXHAUSTED),
                (pb.TouchRequest(namespace_id=NS.id, branched=[keys[0][:31]]),
                 grpc.StatusCode.INVALID_ARGUMENT),
                (pb.TouchRequest(namespace_id=NS.id[:5], keys=[keys[0]]),
                 grpc.StatusCode.INVALID_ARGUMENT),
            ):  # fmt: skip
                with pytest.raises(grpc.RpcError) as e:
                    stub.Touch(request, timeout=10)
                assert e.value.code() == code
            assert not any(srv.store.branched([store_key(None, NS.id, k) for k in keys]))
            reply = stub.Touch(pb.TouchRequest(namespace_id=NS.id, keys=keys, branched=[keys[1]]),
                               timeout=10)  # fmt: skip
            assert reply.touched == 2
            # the one named, not its neighbour (put without a parent here: no local child)
            assert srv.store.branched([store_key(None, NS.id, k) for k in keys]) == [False, True]
    finally:
        srv.stop()
