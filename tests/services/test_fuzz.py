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
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.messages import namespace_to_proto
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore

CODEC = CodecConfig(2, 2, 64)
NS = namespace_for("test/fuzz", 1, 1, 64, torch.float16, CODEC, block_tokens=64)
BLOCK = encode(torch.randn(1, 1, 64, 64).half(), torch.randn(1, 1, 64, 64).half(), CODEC)
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
        request = pb.RegisterNamespaceRequest(namespace_id=NS.id, namespace=namespace_to_proto(NS))
        pb_grpc.KVPoolStub(ch).RegisterNamespace(request)
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


@FUZZ
@given(raw=st.binary(max_size=300))
def test_garbage_bytes_as_any_request(channel, stub, raw) -> None:
    for m in ("RegisterNamespace", "Lookup", "Delete", "Stats", "Topology"):
        call = channel.unary_unary(f"/kvpool.v1.KVPool/{m}")
        assert status(lambda c=call: c(raw, timeout=5)) in EXPECTED
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
    st.builds(lambda ns, key, chain, pos, size: pb.PutRequest(info=pb.BlockInfo(
        namespace_id=ns, key=key, chain=chain, position=pos, size=size)),
        namespaces, keys, keys, st.integers(0, 2**32 - 1), st.integers(0, 2**40)),
    st.builds(lambda data: pb.PutRequest(chunk=data), st.binary(max_size=2000)),
    st.builds(lambda a, b: pb.PutRequest(chunk=BLOCK[a:b]), st.integers(0, len(BLOCK)), st.integers(0, len(BLOCK))),
    st.just(pb.PutRequest()),
)  # fmt: skip


@FUZZ
@given(stream=st.lists(parts, max_size=6), valid_head=st.booleans())
def test_put_streams(stub, stream, valid_head) -> None:
    if valid_head:  # a well-formed header, then whatever comes
        key = bytes(range(32))
        stream = [
            pb.PutRequest(
                info=pb.BlockInfo(namespace_id=NS.id, key=key, chain=key, size=len(BLOCK))
            ),
            *stream,
        ]
    code = status(lambda: stub.Put(iter(stream), timeout=5))
    assert code in EXPECTED
    alive(stub)
