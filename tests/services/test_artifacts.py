"""Artifacts and records on a real shard: content-addressed and checked on the way in, scoped by
tenant, bounded before anything is buffered, kept while a record names them, and read back
from Redis by a shard that restarted empty. Every refusal has its status code."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import grpc
import pytest

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.artifacts import CHUNK_BYTES, chunks_of, manifest_for, record_name
from kvpool.services.artifacts import ArtifactLimits, ArtifactStore
from kvpool.services.redis_tier import RedisTier
from kvpool.services.security import ServerSecurity
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import channel_credentials
from tests.services.test_security import issue

KIND = "test.artifact"
NAME = record_name(KIND, "test/model")
DATA = os.urandom(2 * CHUNK_BYTES + 12345)  # three chunks, the last one short


def serve(limits: ArtifactLimits | None = None, **kwargs) -> ShardServer:
    srv = ShardServer(BlockStore(16 << 20), "artifacts", **kwargs)
    srv.artifacts = ArtifactStore(limits or ArtifactLimits())
    srv.start()
    return srv


@pytest.fixture(scope="module")
def server() -> Iterator[ShardServer]:
    srv = serve(
        ArtifactLimits(max_artifact_bytes=8 << 20, budget_bytes=8 << 20, peer_bytes=8 << 20)
    )
    yield srv
    srv.stop()


@pytest.fixture
def stub(server: ShardServer) -> Iterator[pb_grpc.KVPoolStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.KVPoolStub(channel)


def put(
    stub: pb_grpc.KVPoolStub, data: bytes, kind: str = KIND, **manifest_fields
) -> pb.ArtifactManifest:
    manifest = manifest_for(kind, data)
    for k, v in manifest_fields.items():
        setattr(manifest, k, v)
    stub.PutArtifact(pb.PutArtifactRequest(manifest=manifest))
    for i, c in enumerate(chunks_of(data)):
        reply = stub.PutArtifact(
            pb.PutArtifactRequest(chunk=pb.ArtifactChunk(id=manifest.id, index=i, data=bytes(c)))
        )
    assert reply.complete and reply.missing == 0
    return manifest


def read(stub: pb_grpc.KVPoolStub, artifact: bytes) -> bytes | None:
    head = stub.GetArtifact(pb.GetArtifactRequest(id=artifact, manifest=True))
    if not head.found:
        return None
    parts = [
        stub.GetArtifact(pb.GetArtifactRequest(id=artifact, index=i)).data
        for i in range(len(head.manifest.chunks))
    ]
    return b"".join(parts)


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return e.value.details()


def test_an_artifact_is_readable_once_every_chunk_checked(stub) -> None:
    manifest = manifest_for(KIND, DATA)
    reply = stub.PutArtifact(pb.PutArtifactRequest(manifest=manifest))
    assert not reply.complete and reply.missing == 3
    chunks = list(chunks_of(DATA))
    for i in (2, 0):  # in any order
        stub.PutArtifact(
            pb.PutArtifactRequest(
                chunk=pb.ArtifactChunk(id=manifest.id, index=i, data=bytes(chunks[i]))
            )
        )
    assert read(stub, manifest.id) is None  # incomplete: not readable
    reply = stub.PutArtifact(
        pb.PutArtifactRequest(
            chunk=pb.ArtifactChunk(id=manifest.id, index=1, data=bytes(chunks[1]))
        )
    )
    assert reply.complete
    assert read(stub, manifest.id) == DATA
    again = stub.PutArtifact(pb.PutArtifactRequest(manifest=manifest))  # immutable: a no-op
    assert again.complete
    refused(
        lambda: stub.GetArtifact(pb.GetArtifactRequest(id=manifest.id, index=3)),
        grpc.StatusCode.OUT_OF_RANGE,
    )


def test_a_forged_manifest_or_chunk_is_data_loss_and_nothing_is_kept(stub) -> None:
    data = os.urandom(CHUNK_BYTES + 7)
    forged = manifest_for(KIND, data)
    forged.chunks[1] = hashlib.sha256(b"something else").digest()  # the id no longer matches
    assert "not the one its id names" in refused(
        lambda: stub.PutArtifact(pb.PutArtifactRequest(manifest=forged)), grpc.StatusCode.DATA_LOSS
    )
    manifest = manifest_for(KIND, data)
    stub.PutArtifact(pb.PutArtifactRequest(manifest=manifest))
    bad = bytearray(data[:CHUNK_BYTES])
    bad[100] ^= 1
    refused(lambda: stub.PutArtifact(pb.PutArtifactRequest(chunk=pb.ArtifactChunk(id=manifest.id, index=0, data=bytes(bad)))),
            grpc.StatusCode.DATA_LOSS)  # fmt: skip
    stub.PutArtifact(
        pb.PutArtifactRequest(
            chunk=pb.ArtifactChunk(id=manifest.id, index=1, data=data[CHUNK_BYTES:])
        )
    )
    assert read(stub, manifest.id) is None  # chunk 0 never arrived whole


def test_truncated_misplaced_and_early_chunks_are_refused(stub) -> None:
    data = os.urandom(CHUNK_BYTES + 7)
    manifest = manifest_for(KIND, data)

    def chunk(index: int, part: bytes) -> pb.PutArtifactResponse:
        return stub.PutArtifact(
            pb.PutArtifactRequest(chunk=pb.ArtifactChunk(id=manifest.id, index=index, data=part))
        )

    refused(
        lambda: chunk(0, data[:CHUNK_BYTES]), grpc.StatusCode.FAILED_PRECONDITION
    )  # before its manifest
    stub.PutArtifact(pb.PutArtifactRequest(manifest=manifest))
    assert "bytes" in refused(
        lambda: chunk(1, data[CHUNK_BYTES:-1]), grpc.StatusCode.INVALID_ARGUMENT
    )
    refused(lambda: chunk(2, b"x"), grpc.StatusCode.INVALID_ARGUMENT)
    truncated = manifest_for(KIND, data)
    del truncated.chunks[1]
    refused(
        lambda: stub.PutArtifact(pb.PutArtifactRequest(manifest=truncated)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    refused(lambda: stub.PutArtifact(pb.PutArtifactRequest()), grpc.StatusCode.INVALID_ARGUMENT)
    refused(
        lambda: stub.GetArtifact(pb.GetArtifactRequest(id=b"short")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_bytes_that_do_not_parse_are_invalid_argument(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        for method in ("PutArtifact", "GetArtifact", "PutRecord", "GetRecord"):
            call = channel.unary_unary(f"/kvpool.v1.KVPool/{method}")
            refused(lambda call=call: call(b"\xff\xff\xff"), grpc.StatusCode.INVALID_ARGUMENT)


def test_oversized_artifacts_are_refused_before_any_chunk(stub, server) -> None:
    huge = manifest_for(KIND, b"x")
    huge.size = 9 << 20  # over max_artifact_bytes (8 MiB); the rest need not even match
    assert "over the limit" in refused(
        lambda: stub.PutArtifact(pb.PutArtifactRequest(manifest=huge)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    used = server.artifacts.used
    # a chunk over gRPC's 4 MiB message limit is refused before the shard buffers it
    big = pb.ArtifactChunk(id=huge.id, index=0, data=b"x" * (5 << 20))
    refused(
        lambda: stub.PutArtifact(pb.PutArtifactRequest(chunk=big)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert server.artifacts.used == used


def test_records_need_their_artifact_and_the_highest_version_stays(stub) -> None:
    data = os.urandom(1000)
    manifest = manifest_for(KIND, data)
    record = pb.ArtifactRecord(artifact_id=manifest.id, version=5, codec=json.dumps({"a": 1}))
    refused(
        lambda: stub.PutRecord(pb.PutRecordRequest(name=NAME, record=record)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    put(stub, data)
    assert stub.PutRecord(pb.PutRecordRequest(name=NAME, record=record)).stored
    older = pb.ArtifactRecord(artifact_id=manifest.id, version=4)
    assert not stub.PutRecord(pb.PutRecordRequest(name=NAME, record=older)).stored
    got = stub.GetRecord(pb.GetRecordRequest(name=NAME))
    assert got.found and got.record == record
    assert not stub.GetRecord(pb.GetRecordRequest(name=record_name(KIND, "other/model"))).found
    refused(
        lambda: stub.PutRecord(pb.PutRecordRequest(name=b"x", record=record)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    long = pb.ArtifactRecord(artifact_id=manifest.id, version=9, codec="x" * 5000)
    refused(
        lambda: stub.PutRecord(pb.PutRecordRequest(name=NAME, record=long)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_artifacts_named_by_a_record_are_kept_others_make_room() -> None:
    srv = serve(
        ArtifactLimits(max_artifact_bytes=3 << 20, budget_bytes=4 << 20, peer_bytes=4 << 20)
    )
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            a, b, c = (os.urandom(3 << 20) for _ in range(3))
            ma = put(stub, a)
            mb = put(stub, b)  # a is not named by any record: it makes room
            assert read(stub, ma.id) is None and read(stub, mb.id) == b
            stub.PutRecord(
                pb.PutRecordRequest(
                    name=NAME, record=pb.ArtifactRecord(artifact_id=mb.id, version=1)
                )
            )
            mc = manifest_for(KIND, c)
            refused(
                lambda: stub.PutArtifact(pb.PutArtifactRequest(manifest=mc)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert read(stub, mb.id) == b  # the record's artifact stays
    finally:
        srv.stop()


def test_tenants_never_see_each_others_artifacts_or_records(tmp_path) -> None:
    ca = issue(tmp_path / "ca", "kvpool test CA", None, ca=True)
    issue(tmp_path / "server", "shard", ca, server=True)
    (tmp_path / "tokens.json").write_text(
        json.dumps({"token-a": "tenant-a", "token-b": "tenant-b"})
    )
    security = ServerSecurity(str(tmp_path / "server.crt"), str(tmp_path / "server.key"),
                              tokens_file=str(tmp_path / "tokens.json"))  # fmt: skip
    srv = serve(security=security)

    def stub_for(token: str | None):
        creds = channel_credentials(str(tmp_path / "ca.crt"), token=token)
        return grpc.secure_channel(srv.address, creds)

    try:
        with stub_for("token-a") as ca_, stub_for("token-b") as cb, stub_for(None) as anon:
            a, b = pb_grpc.KVPoolStub(ca_), pb_grpc.KVPoolStub(cb)
            manifest = put(a, DATA)
            a.PutRecord(
                pb.PutRecordRequest(
                    name=NAME, record=pb.ArtifactRecord(artifact_id=manifest.id, version=1)
                )
            )
            assert read(a, manifest.id) == DATA
            assert read(b, manifest.id) is None  # same id, other tenant
            assert not b.GetRecord(pb.GetRecordRequest(name=NAME)).found
            rec = pb.ArtifactRecord(
                artifact_id=manifest.id, version=2
            )  # b cannot point at a's artifact
            refused(
                lambda: b.PutRecord(pb.PutRecordRequest(name=NAME, record=rec)),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            refused(lambda: pb_grpc.KVPoolStub(anon).GetRecord(pb.GetRecordRequest(name=NAME)),
                    grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
            assert a.GetRecord(pb.GetRecordRequest(name=NAME)).record.version == 1
    finally:
        srv.stop()


def test_a_shard_restarted_empty_reads_them_back_from_redis(redis_server) -> None:
    redis = RedisTier(f"redis://{redis_server.host}:{redis_server.port}/0")
    first = serve(redis=redis)
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            manifest = put(stub, DATA)
            record = pb.ArtifactRecord(artifact_id=manifest.id, version=7, codec="{}")
            assert stub.PutRecord(pb.PutRecordRequest(name=NAME, record=record)).stored
    finally:
        first.stop()
    # a chunk corrupted in Redis is refused on the way back: the artifact stays unreadable
    corrupt = RedisTier(f"redis://{redis_server.host}:{redis_server.port}/0")
    second = serve(redis=corrupt)
    try:
        with grpc.insecure_channel(second.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            assert second.artifacts.used == 0  # empty after the restart
            got = stub.GetRecord(pb.GetRecordRequest(name=NAME))
            assert got.found and got.record == record
            assert read(stub, manifest.id) == DATA
            keys = [k for k in corrupt.client.keys(b"kvpool:artifact:v1:*") if k.endswith(b":c1")]
            assert len(keys) == 1
            corrupt.client.set(keys[0], b"\x00" * CHUNK_BYTES)
    finally:
        second.stop()
    third = serve(redis=RedisTier(f"redis://{redis_server.host}:{redis_server.port}/0"))
    try:
        with grpc.insecure_channel(third.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            assert read(stub, manifest.id) is None
            assert not stub.GetRecord(pb.GetRecordRequest(name=NAME)).found  # its artifact is gone
    finally:
        third.stop()
