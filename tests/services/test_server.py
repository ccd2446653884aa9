"""A shard's gRPC server, without Ray: every malformed request gets its status code, and the
server goes on answering the next request. Shards keep no namespace state: a Put carries its
namespace, and its block must be of that shape and bound to its namespace id, key and position."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import Binding, CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import Namespace, block_keys
from kvpool.proto.messages import namespace_to_proto
from kvpool.services.security import store_key
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore

CODEC = CodecConfig(2, 2, 128)
NS = namespace_for("test/server", 2, 2, 64, torch.float16, CODEC, block_tokens=128)
TOKENS = list(range(256))
Code = grpc.StatusCode


def block(
    ns: Namespace = NS, seed: int = 0, codec: CodecConfig = CODEC, key: bytes | None = None,
    position: int = 0,
) -> bytes:  # fmt: skip
    """A block of `ns`'s shape bound to (ns, key, position); key None: the KEY of the tests."""
    g = torch.Generator().manual_seed(seed)
    shape = (ns.layers, ns.kv_heads, ns.block_tokens, ns.head_dim)
    k, v = torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()
    binding = Binding(ns.id, KEY if key is None else key)
    return encode(k, v, codec, start_position=position * ns.block_tokens, binding=binding)


@pytest.fixture(scope="module")
def server() -> Iterator[ShardServer]:
    srv = ShardServer(
        BlockStore(64 << 20), "shard-test", limits=Limits(max_block_bytes=16 << 20, max_keys=64)
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: ShardServer) -> Iterator[pb_grpc.KVPoolStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVPoolStub(channel)


def put_msgs(
    ns: Namespace, key: bytes, data: bytes, size: int | None = None, chunk: int = 1 << 20,
    position: int = 0, namespace: pb.Namespace | None = None, parent: bytes | None = None,
) -> list[pb.PutRequest]:  # fmt: skip
    """parent None: none at position 0, else a 32-byte key."""
    info = pb.BlockInfo(
        namespace_id=ns.id, key=key, chain=key, position=position,
        size=len(data) if size is None else size,
        namespace=namespace_to_proto(ns) if namespace is None else namespace,
        parent=(b"" if position == 0 else bytes(32)) if parent is None else parent,
    )  # fmt: skip
    return [pb.PutRequest(info=info)] + [
        pb.PutRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)
    ]


def get(stub: pb_grpc.KVPoolStub, key: bytes, ns: Namespace = NS) -> bytes | None:
    replies = list(stub.Get(pb.GetRequest(namespace_id=ns.id, key=key), timeout=10))
    if not replies[0].found:
        return None
    data = b"".join(r.chunk for r in replies)
    assert len(data) == replies[0].size
    return data


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def still_serving(stub: pb_grpc.KVPoolStub, server: ShardServer) -> None:
    keys = block_keys(NS, TOKENS)
    assert stub.Lookup(pb.LookupRequest(namespace_id=NS.id, keys=keys), timeout=10).present >= 0
    with grpc.insecure_channel(server.address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="kvpool.v1.KVPool")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_round_trip_of_a_multi_chunk_block(stub, server) -> None:
    ns = namespace_for(
        "test/server-big", 8, 8, 128, torch.float16, CodecConfig(8, 8, 128), block_tokens=128
    )
    key = block_keys(ns, range(128))[0]
    data = block(ns, codec=CodecConfig(8, 8, 128), key=key)
    assert len(data) > 2 << 20  # three chunks or more each way
    assert stub.Put(iter(put_msgs(ns, key, data)), timeout=10).stored
    assert not stub.Put(iter(put_msgs(ns, key, data)), timeout=10).stored  # immutable: a no-op
    assert get(stub, key, ns) == data
    assert stub.Lookup(pb.LookupRequest(namespace_id=ns.id, keys=[key]), timeout=10).present == 1
    assert stub.Delete(pb.DeleteRequest(namespace_id=ns.id, keys=[key]), timeout=10).deleted == 1
    assert get(stub, key, ns) is None  # a miss is not an error


def test_lookup_counts_leading_present_keys(stub) -> None:
    keys = block_keys(NS, range(1000, 1000 + 3 * 128))
    assert stub.Put(iter(put_msgs(NS, keys[0], block(seed=1, key=keys[0]))), timeout=10).stored
    msgs = put_msgs(NS, keys[2], block(seed=2, key=keys[2], position=2), position=2, parent=keys[1])
    assert stub.Put(iter(msgs), timeout=10).stored
    assert stub.Lookup(pb.LookupRequest(namespace_id=NS.id, keys=keys), timeout=10).present == 1


def test_a_put_names_its_parent_in_the_prefix_tree(stub, server) -> None:
    """The shard stores a block with its parent's store key (the block before it in its
    prefix), which the eviction policy follows."""
    keys = block_keys(NS, range(3000, 3000 + 2 * 128))
    assert stub.Put(iter(put_msgs(NS, keys[0], block(seed=3, key=keys[0]))), timeout=10).stored
    msgs = put_msgs(NS, keys[1], block(seed=4, key=keys[1], position=1), position=1,
                    parent=keys[0])  # fmt: skip
    assert stub.Put(iter(msgs), timeout=10).stored
    node = server.store._blocks[store_key(None, NS.id, keys[1])]
    assert node.parent is not None and node.parent.key == store_key(None, NS.id, keys[0])
    assert server.store._blocks[store_key(None, NS.id, keys[0])].parent is None


def proto_with(**fields: object) -> pb.Namespace:
    return pb.Namespace(**{**{f.name: v for f, v in namespace_to_proto(NS).ListFields()}, **fields})


BAD_NAMESPACES = {
    "wrong id": (namespace_to_proto(NS), b"x" * 32, Code.INVALID_ARGUMENT),
    "zero layers": (pb.Namespace(model="m", dtype=1, layout=1), NS.id, Code.INVALID_ARGUMENT),
    "future format": (proto_with(format_version=99), NS.id, Code.FAILED_PRECONDITION),
    "other shape": (proto_with(kv_heads=1), NS.id, Code.INVALID_ARGUMENT),  # not its id
}


@pytest.mark.parametrize("case", list(BAD_NAMESPACES))
def test_a_put_must_carry_its_namespace(stub, server, case) -> None:
    namespace, namespace_id, code = BAD_NAMESPACES[case]
    msgs = put_msgs(NS, KEY, block(), namespace=namespace)
    msgs[0].info.namespace_id = namespace_id
    assert code_of(lambda: stub.Put(iter(msgs), timeout=10)) == code
    missing = put_msgs(NS, KEY, block())
    missing[0].info.ClearField("namespace")
    assert code_of(lambda: stub.Put(iter(missing), timeout=10)) == Code.INVALID_ARGUMENT
    assert store_key(None, NS.id, KEY) not in server.store
    still_serving(stub, server)


def test_any_namespace_id_is_a_miss_not_an_error(stub, server) -> None:
    other = namespace_for("test/other", 2, 2, 64, torch.float16, CODEC, block_tokens=128)
    key = block_keys(other, TOKENS)[0]
    assert stub.Lookup(pb.LookupRequest(namespace_id=other.id, keys=[key]), timeout=10).present == 0
    assert get(stub, key, other) is None
    assert (
        code_of(
            lambda: stub.Lookup(pb.LookupRequest(namespace_id=b"short", keys=[key]), timeout=10)
        )
        == Code.INVALID_ARGUMENT
    )
    still_serving(stub, server)


KEY = block_keys(NS, TOKENS)[1]
STORED_KEY = store_key(None, NS.id, KEY)


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def future_version(data: bytes) -> bytes:
    return data[:4] + (99).to_bytes(2, "little") + data[6:]


BAD_PUTS = {
    "chunk before info": (lambda d: [pb.PutRequest(chunk=d[:100])], Code.INVALID_ARGUMENT),
    "empty stream": (lambda d: [], Code.INVALID_ARGUMENT),
    "info twice": (lambda d: put_msgs(NS, KEY, d)[:1] * 2, Code.INVALID_ARGUMENT),
    "short key": (lambda d: put_msgs(NS, KEY[:8], d), Code.INVALID_ARGUMENT),
    "truncated": (
        lambda d: put_msgs(NS, KEY, d[: len(d) // 2], size=len(d)),
        Code.INVALID_ARGUMENT,
    ),
    "longer than announced": (
        lambda d: put_msgs(NS, KEY, d, size=len(d) - 1),
        Code.INVALID_ARGUMENT,
    ),
    "not a block": (lambda d: put_msgs(NS, KEY, b"\x00" * len(d)), Code.INVALID_ARGUMENT),
    "bound to another key": (
        lambda d: put_msgs(NS, KEY, block(key=block_keys(NS, TOKENS)[0])),
        Code.FAILED_PRECONDITION,
    ),
    "bound to another namespace": (
        lambda d: put_msgs(
            NS, KEY, block(namespace_for("y", 2, 2, 64, torch.float16, CODEC, block_tokens=128))
        ),
        Code.FAILED_PRECONDITION,
    ),
    "put at another position": (
        lambda d: put_msgs(NS, KEY, d, position=1),
        Code.FAILED_PRECONDITION,
    ),
    "parent at position 0": (
        lambda d: put_msgs(NS, KEY, d, parent=bytes(32)),
        Code.INVALID_ARGUMENT,
    ),
    "parent of 31 bytes": (
        lambda d: put_msgs(NS, KEY, d, position=1, parent=bytes(31)),
        Code.INVALID_ARGUMENT,
    ),
    "cut-off block": (lambda d: put_msgs(NS, KEY, d[:-16]), Code.INVALID_ARGUMENT),
    "flipped byte": (lambda d: put_msgs(NS, KEY, corrupt(d, len(d) - 7)), Code.DATA_LOSS),
    "future format": (lambda d: put_msgs(NS, KEY, future_version(d)), Code.FAILED_PRECONDITION),
    "other shape": (
        lambda d: put_msgs(NS, KEY, block_of_shape(NS, kv_heads=1)),
        Code.FAILED_PRECONDITION,
    ),
    "over the block limit": (
        lambda d: put_msgs(NS, KEY, b"", size=65 << 20),
        Code.RESOURCE_EXHAUSTED,
    ),
    "chunk over 4 MiB": (
        lambda d: put_msgs(NS, KEY, b"\x00" * (5 << 20), chunk=5 << 20),
        Code.RESOURCE_EXHAUSTED,
    ),
}


def block_of_shape(ns: Namespace, kv_heads: int) -> bytes:
    """A crc-valid block bound to (ns, KEY, 0) but with another number of KV heads."""
    g = torch.Generator().manual_seed(9)
    shape = (ns.layers, kv_heads, ns.block_tokens, ns.head_dim)
    k, v = torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()
    return encode(k, v, CODEC, binding=Binding(ns.id, KEY))


@pytest.mark.parametrize("case", list(BAD_PUTS))
def test_bad_puts_get_their_status_and_store_nothing(stub, server, case) -> None:
    make, code = BAD_PUTS[case]
    before = server.store.snapshot().rejected
    assert code_of(lambda: stub.Put(iter(make(block())), timeout=10)) == code
    assert STORED_KEY not in server.store
    if code != Code.RESOURCE_EXHAUSTED or "block" in case:
        assert server.store.snapshot().rejected == before + 1
    still_serving(stub, server)


def test_a_put_cancelled_midway_stores_nothing(stub, server) -> None:
    data = block(seed=3)
    msgs = put_msgs(NS, KEY, data, chunk=1000)

    def stream() -> Iterator[pb.PutRequest]:
        yield from msgs[:3]
        raise RuntimeError("client died")

    assert code_of(lambda: stub.Put(stream(), timeout=10)) in (Code.CANCELLED, Code.UNKNOWN)
    assert STORED_KEY not in server.store
    still_serving(stub, server)


@pytest.mark.parametrize(
    "request_, code",
    [
        (pb.LookupRequest(namespace_id=NS.id, keys=[b"k"]), Code.INVALID_ARGUMENT),
        (pb.LookupRequest(namespace_id=NS.id, keys=[KEY] * 65), Code.RESOURCE_EXHAUSTED),
        (pb.GetRequest(namespace_id=NS.id, key=b"k" * 31), Code.INVALID_ARGUMENT),
        (pb.DeleteRequest(namespace_id=NS.id, keys=[b""]), Code.INVALID_ARGUMENT),
    ],
)
def test_bad_keys_and_oversized_requests(stub, server, request_, code) -> None:
    call = {pb.LookupRequest: stub.Lookup, pb.DeleteRequest: stub.Delete}.get(type(request_))
    if call is None:
        assert code_of(lambda: list(stub.Get(request_, timeout=10))) == code
    else:
        assert code_of(lambda: call(request_, timeout=10)) == code
    still_serving(stub, server)


def test_a_block_corrupted_in_shard_memory_is_refused_by_the_reader(server) -> None:
    """Blocks are verified on upload and not again on every read (readers verify what they
    decode): a bit flip in the shard's memory reaches the client, which refuses the block,
    counts it and deletes it, so the prefix is a miss until it is stored again."""
    tokens = list(range(5000, 5000 + 2 * NS.block_tokens))
    g = torch.Generator().manual_seed(4)
    shape = (NS.layers, NS.kv_heads, len(tokens), NS.head_dim)
    kv = (torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half())
    with KVPool(server.address, NS, CODEC) as p:
        assert p.put(tokens, kv) == 2
        key = block_keys(NS, tokens)[1]
        entry = server.store._blocks[store_key(None, NS.id, key)]
        entry.data = corrupt(entry.data, 200)  # a bit flip in memory
        got = p.get(tokens)
        assert got is not None and got.tokens == NS.block_tokens  # block 1 refused
        assert p.stats.rejected_blocks == 1
        assert p.lookup(tokens) == NS.block_tokens  # ... and deleted
        assert p.put(tokens, kv) == 1  # the next put heals the prefix
        assert p.get(tokens).tokens == 2 * NS.block_tokens  # type: ignore[union-attr]


def test_stats_and_topology(stub, server) -> None:
    stats = stub.Stats(pb.StatsRequest(), timeout=10)
    assert (
        stats.shard_id == "shard-test" and stats.blocks == len(server.store) and stats.rejected > 0
    )
    topo = stub.Topology(pb.TopologyRequest(), timeout=10)
    assert [(s.shard_id, s.address) for s in topo.shards] == [("shard-test", server.address)]


def test_a_block_carries_a_mac_exactly_when_its_namespace_says(stub, server) -> None:
    """Nobody takes a MAC namespace's key first with a block that has no MAC (it would stand as
    a permanent miss there: blocks are immutable), nor the other way round."""
    mac_ns = namespace_for(
        "test/server", 2, 2, 64, torch.float16, CODEC, block_tokens=128, mac_key=b"secret"
    )
    key = block_keys(mac_ns, TOKENS)[0]
    g = torch.Generator().manual_seed(11)
    shape = (2, 2, 128, 64)
    k, v = torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()
    plain = encode(k, v, CODEC, binding=Binding(mac_ns.id, key))
    assert code_of(lambda: stub.Put(iter(put_msgs(mac_ns, key, plain)), timeout=10)) == (
        Code.FAILED_PRECONDITION
    )
    signed = encode(k, v, CODEC, binding=Binding(mac_ns.id, key, b"secret"))
    assert stub.Put(iter(put_msgs(mac_ns, key, signed)), timeout=10).stored
    other_key = block_keys(NS, range(7000, 7128))[0]
    signed_elsewhere = encode(k, v, CODEC, binding=Binding(NS.id, other_key, b"secret"))
    msgs = put_msgs(NS, other_key, signed_elsewhere)
    assert code_of(lambda: stub.Put(iter(msgs), timeout=10)) == Code.FAILED_PRECONDITION
    still_serving(stub, server)


def test_a_binding_of_the_wrong_length_is_a_codec_error() -> None:
    from kvpool.proto.errors import CodecError

    k = torch.zeros(2, 2, 128, 64).half()
    with pytest.raises(CodecError):
        encode(k, k, CODEC, binding=Binding(b"short", KEY))


def test_limits_keep_every_accepted_block_within_the_upload_budgets() -> None:
    with pytest.raises(ValueError, match="max_block_bytes"):
        Limits(max_block_bytes=64 << 20, peer_upload_bytes=32 << 20)
    with pytest.raises(ValueError, match="upload_bytes"):
        Limits(peer_upload_bytes=256 << 20, upload_bytes=128 << 20)
    with pytest.raises(ValueError, match="peer_shared_bytes"):
        Limits(peer_shared_bytes=1 << 30, shared_bytes=512 << 20)


def test_a_shard_restarted_on_its_port_is_reached_at_once() -> None:
    """Shards come back on the port they had (the endpoint kvpool serve printed stays valid).
    A client whose channel failed while the shard was down must not wait out the channel's
    reconnect backoff: its first call after the restart is answered."""
    import asyncio

    from kvpool.proto.errors import TierError
    from kvpool.services.redis_server import free_port
    from kvpool.transport import ClientConfig, TierClient

    port = free_port()
    key = block_keys(NS, range(NS.block_tokens))[0]
    first = ShardServer(BlockStore(1 << 20), "s0", port=port, shared_dir=None)
    first.start()

    async def go() -> int:
        tier = TierClient(first.address, ClientConfig(timeout_s=2.0, same_host=False))
        try:
            assert await tier.lookup(NS, [key]) == 0
            await asyncio.to_thread(first.stop)
            for _ in range(3):  # the shard is down: the channel fails and backs off
                with pytest.raises(TierError):
                    await tier.lookup(NS, [key])
            again = ShardServer(BlockStore(1 << 20), "s0", port=port, shared_dir=None)
            await asyncio.to_thread(again.start)
            try:
                return await tier.lookup(NS, [key])
            finally:
                await asyncio.to_thread(again.stop)
        finally:
            await tier.close()

    assert asyncio.run(go()) == 0
