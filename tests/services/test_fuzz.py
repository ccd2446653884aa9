"""Property-based fuzzing of every RPC: malformed, truncated and oversized messages and streams
get a status code (never a crash or a hang) and the shard keeps serving."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool.client import namespace_for
from kvpool.kernels.codec import Binding, CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.messages import namespace_from_proto, namespace_to_proto
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore

CODEC = CodecConfig(2, 2, 64)
NS = namespace_for("test/fuzz", 1, 1, 64, torch.float16, CODEC, block_tokens=64)
KEY = bytes(range(32))  # the key BLOCK is bound to, at position 0
BLOCK = encode(
    torch.randn(1, 1, 64, 64).half(), torch.randn(1, 1, 64, 64).half(), CODEC,
    binding=Binding(NS.id, KEY),
)  # fmt: skip
EXPECTED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS,
}  # fmt: skip
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    limits = Limits(max_block_bytes=1 << 20, max_keys=32)
    srv = ShardServer(BlockStore(8 << 20), "fuzz", limits=limits)
    srv.start()
    with grpc.insecure_channel(srv.address) as ch:
        yield ch
    srv.stop()


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.KVPoolStub:
    return pb_grpc.KVPoolStub(channel)


def status(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def alive(stub: pb_grpc.KVPoolStub) -> None:
    assert (
        stub.Lookup(pb.LookupRequest(namespace_id=NS.id, keys=[b"k" * 32]), timeout=5).present == 0
    )


keys = st.one_of(st.just(b"k" * 32), st.binary(max_size=40))
namespaces = st.one_of(st.just(NS.id), st.binary(max_size=40))
counts = st.integers(0, 2**32 - 1)
# The namespace a Put carries: NS itself, NS with fields changed, anything at all, or none.
namespace_protos = st.one_of(
    st.just(namespace_to_proto(NS)),
    st.builds(
        lambda fields: pb.Namespace(**{
            **{f.name: v for f, v in namespace_to_proto(NS).ListFields()}, **fields
        }),
        st.fixed_dictionaries({}, optional={
            "layers": counts, "kv_heads": counts, "head_dim": counts, "block_tokens": counts,
            "format_version": counts, "tp_rank": counts, "tp_size": counts,
            "layout": st.integers(-3, 5), "dtype": st.integers(-3, 5),
            "model": st.text(max_size=10), "integrity": st.text(max_size=12),
        }),
    ),
    st.builds(
        pb.Namespace, model=st.text(max_size=10), layers=counts, kv_heads=counts,
        head_dim=counts, block_tokens=counts, format_version=counts,
        layout=st.integers(-3, 5), dtype=st.integers(-3, 5),
    ),
    st.none(),
)  # fmt: skip


@FUZZ
@given(raw=st.binary(max_size=300))
def test_garbage_bytes_as_any_request(channel, stub, raw) -> None:
    for m in ("Lookup", "Delete", "Stats", "Topology"):
        call = channel.unary_unary(f"/kvpool.v1.KVPool/{m}")
        assert status(lambda c=call: c(raw, timeout=5)) in EXPECTED
    gone = channel.unary_unary("/kvpool.v1.KVPool/RegisterNamespace")  # removed from the protocol
    assert status(lambda: gone(raw, timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    get = channel.unary_stream("/kvpool.v1.KVPool/Get")
    assert status(lambda: list(get(raw, timeout=5))) in EXPECTED
    put = channel.stream_unary("/kvpool.v1.KVPool/Put")
    assert status(lambda: put(iter([raw, raw]), timeout=5)) in EXPECTED
    alive(stub)


@FUZZ
@given(ns=namespaces, ks=st.lists(keys, max_size=40))
def test_lookup_and_delete(stub, ns, ks) -> None:
    assert (
        status(lambda: stub.Lookup(pb.LookupRequest(namespace_id=ns, keys=ks), timeout=5))
        in EXPECTED
    )
    assert (
        status(lambda: stub.Delete(pb.DeleteRequest(namespace_id=ns, keys=ks), timeout=5))
        in EXPECTED
    )
    alive(stub)


@FUZZ
@given(ns=namespaces, key=keys)
def test_get(stub, ns, key) -> None:
    assert (
        status(lambda: list(stub.Get(pb.GetRequest(namespace_id=ns, key=key), timeout=5)))
        in EXPECTED
    )
    alive(stub)


parts = st.one_of(
    st.builds(lambda ns, key, chain, pos, size, proto: pb.PutRequest(info=pb.BlockInfo(
        namespace_id=ns, key=key, chain=chain, position=pos, size=size, namespace=proto)),
        namespaces, keys, keys, st.integers(0, 2**32 - 1), st.integers(0, 2**40),
        namespace_protos),
    st.builds(lambda data: pb.PutRequest(chunk=data), st.binary(max_size=2000)),
    st.builds(lambda a, b: pb.PutRequest(chunk=BLOCK[a:b]), st.integers(0, len(BLOCK)), st.integers(0, len(BLOCK))),
    st.just(pb.PutRequest()),
)  # fmt: skip


@FUZZ
@given(stream=st.lists(parts, max_size=6), valid_head=st.booleans(), proto=namespace_protos)
def test_put_streams(stub, stream, valid_head, proto) -> None:
    if valid_head:  # a well-formed header (with any namespace), then whatever comes
        info = pb.BlockInfo(
            namespace_id=NS.id, key=KEY, chain=KEY, size=len(BLOCK), namespace=proto
        )
        stream = [pb.PutRequest(info=info), *stream]
    code = status(lambda: stub.Put(iter(stream), timeout=5))
    assert code in EXPECTED
    if valid_head and namespace_id(proto) != NS.id:  # no namespace, or not the one of its id
        assert code != grpc.StatusCode.OK
    alive(stub)


def namespace_id(proto: pb.Namespace | None) -> bytes | None:
    """The id of the namespace a Put carries; None when it has none or it is not valid."""
    if proto is None:
        return None
    try:
        return namespace_from_proto(proto).id
    except ValueError:
        return None


def test_the_fuzzed_block_is_a_valid_put(stub) -> None:
    """The baseline the fuzzing departs from is accepted: BLOCK under NS, KEY, position 0."""
    info = pb.BlockInfo(
        namespace_id=NS.id, key=KEY, chain=KEY, size=len(BLOCK), namespace=namespace_to_proto(NS)
    )
    stub.Delete(pb.DeleteRequest(namespace_id=NS.id, keys=[KEY]), timeout=5)
    assert stub.Put(iter([pb.PutRequest(info=info), pb.PutRequest(chunk=BLOCK)]), timeout=5).stored
    reply = list(stub.Get(pb.GetRequest(namespace_id=NS.id, key=KEY), timeout=5))
    assert reply[0].found and b"".join(r.chunk for r in reply) == BLOCK
    assert stub.Delete(pb.DeleteRequest(namespace_id=NS.id, keys=[KEY]), timeout=5).deleted == 1
