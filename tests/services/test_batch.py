"""Batches: BatchGet and BatchPut on real shards (gRPC servers without Ray), and the client's
get_many / put_many over three of them. One bad block of a batch is refused alone, with the
status code a Put of it would end with; a stream that breaks the framing ends as a whole; the
upload budget is back to zero however a batch ends."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import block_keys, run_head
from kvpool.proto.messages import REPLY_HEAD, REQUEST_HEAD, namespace_to_proto, pack
from kvpool.ring import Ring
from kvpool.services.security import store_key
from kvpool.services.server import _CALLER, KVPoolServicer, Limits, ShardServer, _Incoming
from kvpool.services.store import BlockStore
from kvpool.transport import BlockPut, ClientConfig, TierClient

from .test_server import NS, block, code_of, still_serving

Code = grpc.StatusCode
LIMITS = Limits(max_block_bytes=16 << 20, max_keys=64)
TCP = ClientConfig(timeout_s=10.0, same_host=False, chunk_bytes=50_000)  # blocks span messages


@pytest.fixture(scope="module")
def server() -> Iterator[ShardServer]:
    srv = ShardServer(BlockStore(64 << 20), "batch", limits=LIMITS)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ShardServer) -> Iterator[pb_grpc.KVPoolStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVPoolStub(channel)


def prefix(start: int, n: int) -> tuple[list[bytes], list[bytes]]:
    """The keys of an n-block prefix of NS and its blocks, each bound to its key and position."""
    keys = block_keys(NS, range(start, start + n * NS.block_tokens))
    return keys, [block(seed=start + i, key=k, position=i) for i, k in enumerate(keys)]


def info(key: bytes, data: bytes, position: int = 0, parent: bytes = b"") -> pb.BlockInfo:
    return pb.BlockInfo(
        namespace_id=NS.id, key=key, chain=key, position=position, size=len(data),
        namespace=namespace_to_proto(NS), parent=parent,
    )  # fmt: skip


def stream(
    blocks: list[tuple[pb.BlockInfo, bytes]], step: int = 30_000
) -> list[pb.BatchPutRequest]:
    return [pb.BatchPutRequest(blocks=h, data=d) for h, d in pack(blocks, step)]


def batch_get(stub: pb_grpc.KVPoolStub, keys: list[bytes]) -> list[bytes | None]:
    replies = list(stub.BatchGet(pb.BatchGetRequest(namespace_id=NS.id, keys=keys), timeout=10))
    heads = [h for r in replies for h in r.blocks]
    data = b"".join(r.data for r in replies)
    assert len(heads) == len(keys) and sum(h.size for h in heads) == len(data)
    out: list[bytes | None] = []
    for h in heads:
        out.append(data[: h.size] if h.found else None)
        data = data[h.size :]
    return out


def test_pack_cuts_blocks_over_messages_in_order() -> None:
    blocks = [("a", b"x" * 5), ("b", None), ("c", b"y" * 12), ("d", b"z")]
    messages = list(pack(blocks, 8))
    assert [heads for heads, _ in messages] == [["a", "b", "c"], [], ["d"]]
    assert [data for _, data in messages] == [b"xxxxxyyy", b"yyyyyyyy", b"yz"]
    assert all(len(d) == 8 for _, d in messages[:-1])


def test_a_batch_stores_good_blocks_and_refuses_each_bad_one_alone(stub, server) -> None:
    keys, blobs = prefix(10_000, 4)
    put = [pb.PutRequest(info=info(keys[0], blobs[0])), pb.PutRequest(chunk=blobs[0])]
    assert stub.Put(iter(put), timeout=10).stored
    corrupt = bytearray(blobs[2])
    corrupt[-7] ^= 0xFF
    batch = [
        (info(keys[0], blobs[0]), blobs[0]),  # already present
        (info(keys[1], blobs[1], 1, keys[0]), blobs[1]),  # stored
        (info(keys[2], bytes(corrupt), 2, keys[1]), bytes(corrupt)),  # DATA_LOSS
        (info(keys[3], blobs[3], 3, b"short"), blobs[3]),  # bad parent: INVALID_ARGUMENT
        (info(b"k" * 31, blobs[3]), blobs[3]),  # bad key: INVALID_ARGUMENT
        (info(keys[3], blobs[2], 3, keys[2]), blobs[2]),  # bound to position 2: FAILED_PRECONDITION
        (info(keys[3], blobs[3], 3, keys[2]), blobs[3]),  # stored
    ]
    before = server.store.snapshot().rejected
    reply = stub.BatchPut(iter(stream(batch)), timeout=10)
    got = [(r.stored, Code.OK if r.code == 0 else next(c for c in Code if c.value[0] == r.code))
           for r in reply.blocks]  # fmt: skip
    assert got == [
        (False, Code.OK), (True, Code.OK), (False, Code.DATA_LOSS),
        (False, Code.INVALID_ARGUMENT), (False, Code.INVALID_ARGUMENT),
        (False, Code.FAILED_PRECONDITION), (True, Code.OK),
    ]  # fmt: skip
    assert all(r.detail for r in reply.blocks if r.code)
    assert server.store.snapshot().rejected == before + 4
    assert batch_get(stub, keys) == [blobs[0], blobs[1], None, blobs[3]]
    node = server.store._blocks[store_key(None, NS.id, keys[3])]
    assert node.parent is None  # its parent, block 2, was refused: the edge is not kept
    assert server.store._blocks[store_key(None, NS.id, keys[1])].parent is not None


def test_a_block_over_the_limit_is_refused_and_its_bytes_skipped(stub, server) -> None:
    keys, blobs = prefix(11_000, 2)
    huge = info(keys[0], blobs[0])
    huge.size = LIMITS.max_block_bytes + 1
    # the refused block's bytes are sent (and skipped): 16 MiB + 1 of zeros
    msgs = [pb.BatchPutRequest(blocks=[huge])]
    left = huge.size
    while left:
        msgs.append(pb.BatchPutRequest(data=bytes(min(left, 1 << 20))))
        left -= min(left, 1 << 20)
    msgs += stream([(info(keys[0], blobs[0]), blobs[0])])
    reply = stub.BatchPut(iter(msgs), timeout=30)
    assert [(r.stored, r.code) for r in reply.blocks] == [
        (False, Code.RESOURCE_EXHAUSTED.value[0]), (True, 0),
    ]  # fmt: skip
    assert batch_get(stub, keys[:1]) == [blobs[0]]


BAD_STREAMS = {
    "bytes before any block": (
        lambda keys, blobs: [pb.BatchPutRequest(data=b"x")],
        Code.INVALID_ARGUMENT,
    ),
    "bytes beyond the announced blocks": (
        lambda keys, blobs: stream([(info(keys[0], blobs[0]), blobs[0] + b"!")]),
        Code.INVALID_ARGUMENT,
    ),
    "truncated": (
        lambda keys, blobs: stream([(info(keys[0], blobs[0]), blobs[0][:-1])]),
        Code.INVALID_ARGUMENT,
    ),
    "more blocks than max_keys": (
        lambda keys, blobs: [pb.BatchPutRequest(blocks=[info(keys[0], blobs[0])] * 65)],
        Code.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_a_stream_that_breaks_the_framing_ends_as_a_whole(stub, server, case) -> None:
    make, code = BAD_STREAMS[case]
    keys, blobs = prefix(12_000 + 100 * list(BAD_STREAMS).index(case), 1)
    assert code_of(lambda: stub.BatchPut(iter(make(keys, blobs)), timeout=10)) == code
    if case != "bytes beyond the announced blocks":  # there, the block came whole before
        assert batch_get(stub, keys) == [None]
    still_serving(stub, server)


def test_malformed_batch_requests_get_invalid_argument(server, stub) -> None:
    with grpc.insecure_channel(server.address) as ch:
        for method in ("BatchGet", "BatchPut"):
            call = (ch.unary_stream if method == "BatchGet" else ch.stream_unary)(
                f"/kvpool.v1.KVPool/{method}"
            )
            request = b"\xff\xff\xff" if method == "BatchGet" else iter([b"\xff\xff\xff"])
            with pytest.raises(grpc.RpcError) as e:
                reply = call(request, timeout=10)
                if method == "BatchGet":
                    list(reply)
            assert e.value.code() == Code.INVALID_ARGUMENT
    still_serving(stub, server)


@pytest.mark.parametrize(
    "keys, code",
    [([b"k"], Code.INVALID_ARGUMENT), ([bytes(32)] * 65, Code.RESOURCE_EXHAUSTED)],
)
def test_batch_get_bounds_its_keys(stub, server, keys, code) -> None:
    request = pb.BatchGetRequest(namespace_id=NS.id, keys=keys)
    assert code_of(lambda: list(stub.BatchGet(request, timeout=10))) == code
    still_serving(stub, server)


def test_the_upload_budget_is_released_however_a_batch_ends() -> None:
    """A shard whose upload budget holds one block: after batches that end in every way, a
    batch of blocks that each need the whole budget is still stored."""
    keys, blobs = prefix(13_000, 4)
    room = max(len(b) for b in blobs)
    limits = Limits(max_block_bytes=room, peer_upload_bytes=room, upload_bytes=room,
                    admission_wait_s=10.0, max_keys=64)  # fmt: skip
    srv = ShardServer(BlockStore(8 << 20), "budget", limits=limits)
    srv.start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.KVPoolStub(ch)
            corrupt = blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])
            refused = stub.BatchPut(iter(stream([(info(keys[0], corrupt), corrupt)])), timeout=10)
            assert refused.blocks[0].code == Code.DATA_LOSS.value[0]
            truncated = stream([(info(keys[0], blobs[0]), blobs[0][:-3])])
            assert (
                code_of(lambda: stub.BatchPut(iter(truncated), timeout=10)) == Code.INVALID_ARGUMENT
            )
            beyond = stream([(info(keys[0], blobs[0]), blobs[0] + b"!")], step=1 << 20)
            assert code_of(lambda: stub.BatchPut(iter(beyond), timeout=10)) == Code.INVALID_ARGUMENT
            started = stub.BatchPut.future(iter(stream([(info(keys[0], blobs[0]), blobs[0])])[:1]))
            started.cancel()
            whole = [
                (info(keys[i], b, i, keys[i - 1] if i else b""), b) for i, b in enumerate(blobs)
            ]
            reply = stub.BatchPut(iter(stream(whole, step=1 << 20)), timeout=30)
            assert [r.code for r in reply.blocks] == [0] * 4
    finally:
        srv.stop()


# -- the client over three shards -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shards() -> Iterator[list[ShardServer]]:
    """Three shards that know each other, replication 2."""
    servers: list[ShardServer] = []

    async def topology() -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=2, shards=[
            pb.Shard(shard_id=s.shard_id, address=s.address) for s in servers])  # fmt: skip

    for i in range(3):
        servers.append(ShardServer(BlockStore(32 << 20), f"s{i}", topology, limits=LIMITS))
        servers[-1].start()
    yield servers
    for s in servers:
        s.stop()


def run(coro):
    return asyncio.run(coro)


def test_put_many_and_get_many_round_trip_over_three_shards(shards) -> None:
    keys, blobs = prefix(20_000, 12)
    puts = [BlockPut(k, keys[0], i, b, keys[i - 1] if i else b"")
            for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]  # fmt: skip

    async def go():
        tier = TierClient(shards[0].address, TCP)
        try:
            first = await tier.put_many(NS, puts)
            again = await tier.put_many(NS, puts)
            got = await tier.get_many(NS, [*keys, bytes(32)])
            owners = [tier.owners(k) for k in keys]
            return first, again, got, owners
        finally:
            await tier.close()

    first, again, got, owners = run(go())
    assert first == [True] * 12 and again == [False] * 12
    assert got == [*blobs, None]
    by_id = {s.shard_id: s for s in shards}
    for k, own in zip(keys, owners, strict=True):  # each block on both of its owners
        assert len(own) == 2
        assert all(store_key(None, NS.id, k) in by_id[sid].store for sid in own)
    assert len({sid for own in owners for sid in own}) == 3


def test_get_many_asks_the_next_owner_and_absorbs_a_failed_shard(shards) -> None:
    keys, blobs = prefix(21_000, 9)
    absorbed: list[str] = []

    async def go():
        tier = TierClient(shards[0].address, TCP, on_failure=lambda op, e: absorbed.append(e.code))
        try:
            await tier.put_many(NS, [BlockPut(k, keys[0], i, b, keys[i - 1] if i else b"")
                                     for i, (k, b) in enumerate(zip(keys, blobs, strict=True))])  # fmt: skip
            owners = [tier.owners(k) for k in keys]
            primary = {s.shard_id: s for s in shards}
            for k, own in zip(keys, owners, strict=True):  # gone from every primary
                primary[own[0]].store.delete([store_key(None, NS.id, k)])
            second = await tier.get_many(NS, keys)
            return second
        finally:
            await tier.close()

    assert run(go()) == blobs
    assert absorbed == []


def test_each_shard_links_a_block_to_the_nearest_earlier_block_it_holds(shards) -> None:
    """put_many(prefix=...) names, to each owner, the nearest earlier block of the prefix that
    owner holds too: the shard's part of the prefix tree is a chain, whatever the ring does."""
    keys, blobs = prefix(22_000, 16)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        tier = TierClient(shards[0].address, TCP)
        try:
            await tier.put_many(NS, puts, prefix=keys)
            with pytest.raises(ValueError, match="not that key"):
                await tier.put_many(NS, puts[1:2], prefix=keys[:1])
            return [tier.owners(k) for k in keys]
        finally:
            await tier.close()

    owners = run(go())
    links = 0
    for s in shards:
        mine = [i for i, own in enumerate(owners) if s.shard_id in own]
        for before, i in zip([None, *mine], mine, strict=False):
            node = s.store._blocks[store_key(None, NS.id, keys[i])]
            parent = None if before is None else store_key(None, NS.id, keys[before])
            assert (node.parent.key if node.parent else None) == parent
            links += node.parent is not None
    assert links >= 16  # replication 2: 32 placements, 3 of them first on their shard


def test_a_new_topology_replaces_the_owners_a_client_remembers() -> None:
    """Owners are remembered per key for one ring: a topology with other shards (or another
    replication) places keys anew, exactly as a fresh ring does."""

    def topology(epoch: int, ids: list[str], replication: int = 1) -> pb.TopologyResponse:
        shards = [pb.Shard(shard_id=s, address=f"127.0.0.1:{1000 + i}") for i, s in enumerate(ids)]
        return pb.TopologyResponse(epoch=epoch, replication=replication, shards=shards)

    async def run() -> None:
        tier = TierClient("127.0.0.1:1", TCP)
        keys = block_keys(NS, range(64 * NS.block_tokens))
        try:
            for epoch, ids, r in ((1, ["a", "b"], 1), (2, ["a", "b", "c", "d"], 1),
                                  (3, ["c", "d"], 2), (4, ["a", "b", "c", "d"], 3)):  # fmt: skip
                tier._apply(topology(epoch, ids, r))
                ring = Ring(ids)
                assert [tier.owners(k) for k in keys] == [ring.owners(k, r) for k in keys]
                assert [tier.owners(k) for k in keys] == [ring.owners(k, r) for k in keys]
        finally:
            await tier.close()

    asyncio.run(run())


# -- probes: a lookup and a read of the leading blocks in one request per shard --------------------


def served(shards: list[ShardServer]) -> tuple[int, int]:
    """(hits, bytes served) over the shards."""
    stats = [s.store.snapshot() for s in shards]
    return sum(s.hits for s in stats), sum(s.bytes_served for s in stats)


def test_get_prefix_reads_the_leading_blocks_and_touches_only_those_used(shards) -> None:
    """One probe per shard over the same-host socket: the blocks before the first one missing
    everywhere come back, equal to what lookup + get_many give over gRPC; only they are
    touched (hits, bytes served), once, although probes copied blocks past the gap too."""
    keys, blobs = prefix(23_000, 12)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        tier = TierClient(shards[0].address, ClientConfig(timeout_s=10.0, touch_delay_s=30.0))
        tcp = TierClient(shards[0].address, TCP)
        try:
            await tier.put_many(NS, puts, prefix=keys)
            for s in shards:  # block 7 gone everywhere
                s.store.delete([store_key(None, NS.id, keys[7])])
            before = served(shards)
            got = await tier.get_prefix(NS, keys)
            probed = served(shards)  # the touches wait for a request to ride in
            arenas = len(tier._shared)
            await tier.close()  # sends them
            touched = served(shards)
            n = await tcp.lookup(NS, keys)
            over_grpc = await tcp.get_many(NS, keys[:n])
            assert await tcp.get_prefix(NS, keys) == over_grpc  # no socket: lookup, get_many
            return got, before, probed, touched, arenas, over_grpc
        finally:
            await tcp.close()

    got, before, probed, touched, arenas, over_grpc = run(go())
    assert got == blobs[:7] == over_grpc
    assert arenas == 3
    assert probed == before
    assert touched == (before[0] + 7, before[1] + sum(map(len, blobs[:7])))


def test_a_runs_blocks_share_an_owner_and_reads_across_run_edges_equal_grpcs(shards) -> None:
    """A 40-block prefix is runs ({0}, {1}, {2, 3}, {4..7}, then RUN_BLOCKS at a time): each
    run's blocks are stored on its head's owners only. get_prefix over the same-host
    socket, lookup and get_many over gRPC give the same blocks, with the prefix ending at a
    run's edge, inside a run, and whole."""
    keys, blobs = prefix(25_000, 40)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        tier = TierClient(shards[0].address, ClientConfig(timeout_s=10.0))
        tcp = TierClient(shards[0].address, TCP)
        try:
            await tier.put_many(NS, puts, prefix=keys)
            owners = [tier.owners(k) for k in keys]
            held = [{s.shard_id for s in shards if store_key(None, NS.id, k) in s.store}
                    for k in keys]  # fmt: skip
            seen = []
            for gap in (None, 21, 16):  # whole; inside a run; at a run's first block
                if gap is not None:
                    for s in shards:
                        s.store.delete([store_key(None, NS.id, keys[gap])])
                got = await tier.get_prefix(NS, keys)
                n = await tcp.lookup(NS, keys)
                seen.append((got, n, await tcp.get_many(NS, keys[:n]),
                             await tcp.get_prefix(NS, keys)))  # fmt: skip
            return owners, held, seen
        finally:
            await tier.close()
            await tcp.close()

    owners, held, seen = run(go())
    assert all(owners[b] == owners[run_head(b)] for b in range(40))
    assert len({owners[run_head(b)][0] for b in range(40)}) > 1  # runs spread over shards
    assert all(held[b] == set(owners[b]) for b in range(40))  # the run's owners, nowhere else
    assert [n for _, n, _, _ in seen] == [40, 21, 16]
    for (got, _, over_grpc, tcp_prefix), expect in zip(seen, (40, 21, 16), strict=True):
        assert got == over_grpc == tcp_prefix == blobs[:expect]


def test_get_prefix_asks_the_next_owner_of_the_first_block_its_first_holder_lacks(shards) -> None:
    keys, blobs = prefix(24_000, 9)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        tier = TierClient(shards[0].address, ClientConfig(timeout_s=10.0))
        try:
            await tier.put_many(NS, puts, prefix=keys)
            by_id = {s.shard_id: s for s in shards}
            for k in keys[2:]:  # gone from every primary from block 2 on
                by_id[tier.owners(k)[0]].store.delete([store_key(None, NS.id, k)])
            return await tier.get_prefix(NS, keys)
        finally:
            await tier.close()

    assert run(go()) == blobs


def test_get_prefix_reads_blocks_another_client_stored_in_a_second_wave(shards) -> None:
    """A client probes first up to the first key it has not seen stored or read (a fresh
    one: the first key alone), then the rest: what another client stored all comes back;
    and past a gap the second wave is not sent (no probe of the shards of the keys behind)."""
    keys, blobs = prefix(26_000, 10)
    puts = [BlockPut(k, keys[0], i, b) for i, (k, b) in enumerate(zip(keys, blobs, strict=True))]

    async def go():
        writer = TierClient(shards[0].address, ClientConfig(timeout_s=10.0))
        fresh = TierClient(shards[0].address, ClientConfig(timeout_s=10.0))
        other = TierClient(shards[0].address, ClientConfig(timeout_s=10.0))
        try:
            await writer.put_many(NS, puts, prefix=keys)
            got = await fresh.get_prefix(NS, keys)
            for s in shards:
                s.store.delete([store_key(None, NS.id, keys[0])])
            asked: list[int] = []
            probe = other._probe

            async def counted(sid, ns, ks):
                asked.append(len(ks))
                return await probe(sid, ns, ks)

            other._probe = counted  # type: ignore[method-assign]
            return got, await other.get_prefix(NS, keys), asked
        finally:
            for c in (writer, fresh, other):
                await c.close()

    got, gapped, asked = run(go())
    assert got == blobs
    assert gapped == [] and asked == [1, 1]  # the first key, of each of its two owners


def test_touches_ride_in_the_next_request_to_their_shard() -> None:
    """A probed block's touch goes with the next probe or batch put to its shard, before it is
    served: a put that evicts sees the block as just read."""
    keys, blobs = prefix(25_000, 3)
    server = ShardServer(BlockStore(64 << 20), "ride", limits=LIMITS)
    server.start()

    async def go():
        tier = TierClient(server.address, ClientConfig(timeout_s=10.0, touch_delay_s=30.0))
        try:
            await tier.put_many(NS, [BlockPut(keys[0], keys[0], 0, blobs[0])])
            assert await tier.get_prefix(NS, keys[:2]) == blobs[:1]
            untouched = server.store.snapshot().hits
            await tier.put_many(NS, [BlockPut(keys[1], keys[0], 1, blobs[1], keys[0])])
            return untouched, server.store.snapshot().hits, len(tier._touches)
        finally:
            await tier.close()

    try:
        assert run(go()) == (0, 1, 0)
    finally:
        server.stop()


def test_probes_and_touches_on_the_socket_are_bounded_and_refused_precisely(server) -> None:
    """What the socket's probe and touch get from a hostile caller: more keys than a request
    may name (also in a touch riding in a probe or a batch put), a slot outside the arena, a
    short namespace id: each its gRPC status, and the connection goes on."""
    from tests.services.test_shared import claimed, recv_exactly

    def ask(sock, op: bytes, message) -> tuple[int, bytes]:
        body = message.SerializeToString()
        sock.sendall(REQUEST_HEAD.pack(op, len(body)) + body)
        status, length = REPLY_HEAD.unpack(recv_exactly(sock, REPLY_HEAD.size))
        return status, recv_exactly(sock, length)

    many = [bytes(32)] * (LIMITS.max_keys + 1)
    heavy = pb.TouchRequest(namespace_id=NS.id, keys=many)
    with (
        grpc.insecure_channel(server.address) as channel,
        claimed(pb_grpc.KVPoolStub(channel)) as sock,
    ):
        for op, message, code in (
            (b"r", pb.ProbeSharedRequest(namespace_id=NS.id, keys=many, capacity=1), Code.RESOURCE_EXHAUSTED),
            (b"r", pb.ProbeSharedRequest(namespace_id=NS.id, keys=[bytes(32)], offset=1 << 40,
                                         capacity=1), Code.OUT_OF_RANGE),
            (b"r", pb.ProbeSharedRequest(namespace_id=NS.id, keys=[bytes(32)], capacity=1,
                                         touch=heavy), Code.RESOURCE_EXHAUSTED),
            (b"p", pb.BatchPutSharedRequest(touch=heavy), Code.RESOURCE_EXHAUSTED),
            (b"t", heavy, Code.RESOURCE_EXHAUSTED),
            (b"t", pb.TouchRequest(namespace_id=b"short", keys=[bytes(32)]), Code.INVALID_ARGUMENT),
            (b"t", pb.TouchRequest(namespace_id=NS.id, keys=[b"short"]), Code.INVALID_ARGUMENT),
        ):  # fmt: skip
            status, detail = ask(sock, op, message)
            assert (status, bool(detail)) == (code.value[0], True), (op, status)
        status, body = ask(sock, b"t", pb.TouchRequest(namespace_id=NS.id, keys=[bytes(32)]))
        assert status == 0 and pb.TouchResponse.FromString(body).touched == 0
        status, body = ask(sock, b"r", pb.ProbeSharedRequest(namespace_id=NS.id, keys=[bytes(32)],
                                                             capacity=1))  # fmt: skip
        reply = pb.BatchGetSharedResponse.FromString(body)
        assert status == 0 and [b.found for b in reply.blocks] == [False] and reply.copied == 0


def test_a_probes_hot_hint_is_what_a_read_would_answer_and_counts_nothing() -> None:
    from kvpool.services.hot import HotKeys

    hot = HotKeys(hot_share=0.3, min_reads=4)
    for i in range(12):
        hot.read(b"root", 1000)
        hot.read(bytes([i]), 1000)
    state = (dict(hot._bytes), hot._total, hot._reads, hot._since)
    # root: 13 of 25 reads, ceil(0.52 / (0.3 * 0.48)) replicas
    assert [hot.peek(b"root", 1000), hot.peek(b"\x01", 1000), hot.peek(b"new", 1000)] == [4, 1, 1]
    assert (dict(hot._bytes), hot._total, hot._reads, hot._since) == state
    assert hot.read(b"root", 1000) == 4


def test_store_keys_are_the_hash_of_tenant_namespace_and_key() -> None:
    """store_key (its prefix hashed once per tenant and namespace) is sha256 over the spelled-out
    fields, distinct for each tenant, namespace and key."""
    import hashlib

    def spelled(tenant: str | None, namespace_id: bytes, key: bytes) -> bytes:
        who = b"" if tenant is None else b"\x01" + tenant.encode()
        return hashlib.sha256(b"kvpool store\x00" + len(who).to_bytes(4, "little") + who
                              + namespace_id + key).digest()  # fmt: skip

    cases = [(t, n, k) for t in (None, "a", "b") for n in (bytes(32), b"\x01" * 32)
             for k in (bytes(32), b"\x02" * 32)]  # fmt: skip
    for _ in range(2):  # computed, then from the remembered prefix
        assert [store_key(*c) for c in cases] == [spelled(*c) for c in cases]
    assert len({store_key(*c) for c in cases}) == len(cases)


def test_a_batch_stores_as_one_and_refuses_only_a_block_too_large_for_its_tenant() -> None:
    """A run's checked blocks go to the store as one batch (one tick: the prefix ages together,
    where puts one by one would take a tick each); a block over its tenant's quota (admitted:
    its announced size is within the shard's limit) is refused alone, with RESOURCE_EXHAUSTED,
    and the others of its batch are stored; a lone one's refusal is returned for its RPC."""
    store = BlockStore(30_000, tenant_quota=0.25)  # a quota of 7,500 bytes
    srv = KVPoolServicer(store, "batch-quota", topology=None, limits=LIMITS)  # type: ignore[arg-type]

    def incoming(keys: list[bytes], sizes: list[int]) -> list[_Incoming]:
        blocks = []
        for i, (k, size) in enumerate(zip(keys, sizes, strict=True)):
            b = _Incoming(info(k, bytes(size), i, keys[i - 1] if i else b""), pb.BlockStored())
            b.key, b.chain = store_key("alice", NS.id, k), store_key("alice", NS.id, keys[0])
            b.buf = bytes(size)
            blocks.append(b)
        return blocks

    good = incoming(prefix(13_000, 3)[0], [1_000] * 3)
    mixed = incoming(prefix(14_000, 3)[0], [1_000, 9_000, 1_000])
    token = _CALLER.set(("alice", "peer"))
    try:
        assert srv._store_many(good) == [None] * 3
        ticks = {store._blocks[b.key].tick for b in good}
        srv._refuse_each(mixed, srv._store_many(mixed))
        [refused] = srv._store_many(incoming(prefix(15_000, 1)[0], [9_000]))
    finally:
        _CALLER.reset(token)
    assert [b.result.stored for b in good] == [True] * 3 and ticks == {1}
    assert [(b.result.stored, b.result.code) for b in mixed] == [
        (True, 0), (False, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]), (True, 0),
    ]  # fmt: skip
    assert mixed[1].result.detail and mixed[1].key not in store
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert store.snapshot().rejected == 1  # the lone block's refusal is counted by its RPC
