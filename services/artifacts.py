"""A shard's artifacts and records: the files a namespace needs besides its blocks (a key basis
and its prediction maps), and the small per-(tenant, name) records naming the current one.

Where it stands: beside the BlockStore in every shard; `services/server.py` registers
`handlers` next to the block RPCs, so `Edge` authenticates, scopes and counts these calls like
any other. Clients write each artifact and record to every shard (and repair a shard that lost
them when they read), so any one shard can answer for the tier. The contract (manifests, ids,
records) is `kvpool.proto.artifacts`.

- Boundary rules as for blocks: a manifest is checked (well formed, its id its digest, within
  `ArtifactLimits.max_artifact_bytes`) and its size reserved in the shard's and the caller's
  artifact budget before any chunk is taken; a chunk is one message (gRPC's message limit
  bounds it before it is buffered) and is kept only if it is of its size and hash. An artifact
  is readable once complete. Artifacts and records are stored under tenant-scoped keys
  (`store_key`): a tenant never reads or shadows another's.
- Durable as the blocks that need it: artifacts named by a record are never evicted; others go
  oldest first when room is needed, and an incomplete one left idle for `idle_s` is dropped.
  With a Redis tier, complete artifacts and records are also written to Redis (no expiry), and
  a shard that restarted empty reads them back on the first miss (checked again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.artifacts import (
    ID_BYTES,
    ArtifactError,
    ArtifactMismatch,
    check_chunk,
    check_manifest,
    check_record,
)
from kvpool.services.security import store_key

if TYPE_CHECKING:  # redis-py is needed only where a Redis tier is configured
    from kvpool.services.redis_tier import RedisTier

ARTIFACTS = hashlib.sha256(b"kvpool artifacts").digest()  # the store-key namespace of artifacts
RECORDS = hashlib.sha256(b"kvpool records").digest()
Owner = tuple[str | None, str]  # (tenant, peer key) of the caller, as `Edge` binds it
Refuse = Callable[[grpc.StatusCode, str], Exception]  # the server's refusal (mapped by Edge)


@dataclass(frozen=True)
class ArtifactLimits:
    max_artifact_bytes: int = 1 << 30
    budget_bytes: int = 2 << 30  # all artifacts of a shard, complete or arriving
    peer_bytes: int = 1 << 30  # ... of one tenant (or peer host without authentication)
    records: int = 1024  # records a shard keeps (a tenant's model and kind each)
    idle_s: float = 60.0  # an incomplete artifact that long without a chunk is dropped

    def __post_init__(self) -> None:
        if not self.max_artifact_bytes <= self.peer_bytes <= self.budget_bytes:
            raise ValueError(
                "artifact limits need max_artifact_bytes <= peer_bytes <= budget_bytes"
            )


class Full(Exception):
    """No room for an artifact or record within the limits."""


class _Artifact:
    def __init__(self, manifest: pb.ArtifactManifest, owner: str, now: float) -> None:
        self.manifest, self.owner, self.touched = manifest, owner, now
        self.chunks: list[bytes | None] = [None] * len(manifest.chunks)
        self.missing = len(self.chunks)

    @property
    def size(self) -> int:
        return int(self.manifest.size)


class ArtifactStore:
    """Artifacts (by store key, oldest first) and records of one shard, within `limits`. Runs
    on the shard's event loop only: no locks."""

    def __init__(self, limits: ArtifactLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self._clock = limits, clock
        self._artifacts: collections.OrderedDict[bytes, _Artifact] = collections.OrderedDict()
        self._records: dict[
            bytes, tuple[bytes, pb.ArtifactRecord]
        ] = {}  # key -> (artifact key, record)
        self.used = 0
        self.by_peer: Counter[str] = Counter()

    def _pinned(self) -> set[bytes]:
        return {artifact for artifact, _ in self._records.values()}

    def _drop(self, key: bytes) -> None:
        a = self._artifacts.pop(key)
        self.used -= a.size
        self.by_peer[a.owner] -= a.size
        if not self.by_peer[a.owner]:
            del self.by_peer[a.owner]

    def _make_room(self, owner: str, size: int) -> None:
        """Drop idle incomplete artifacts, then unpinned ones (oldest first, the caller's own
        first when it is over its share), until `size` more bytes fit; Full if they cannot."""
        lim, now = self.limits, self._clock()
        for key, a in list(self._artifacts.items()):
            if a.missing and now - a.touched > lim.idle_s:
                self._drop(key)

        def fits() -> bool:
            return (self.used + size <= lim.budget_bytes
                    and self.by_peer[owner] + size <= lim.peer_bytes)  # fmt: skip

        pinned = self._pinned()
        for own_only in (True, False):
            for key, a in list(self._artifacts.items()):
                if fits():
                    return
                if key in pinned or a.missing or (own_only and a.owner != owner):
                    continue
                self._drop(key)
        if not fits():
            raise Full(
                f"no room for an artifact of {size} bytes ({self.used} of {lim.budget_bytes} "
                f"held on the shard, {self.by_peer[owner]} of {lim.peer_bytes} by this caller; "
                "artifacts named by records are kept)"
            )

    def begin(self, key: bytes, manifest: pb.ArtifactManifest, owner: str) -> _Artifact:
        """The artifact of a checked manifest: the one already here, or a new one with its size
        reserved (Full if it cannot be)."""
        found = self._artifacts.get(key)
        if found is not None:
            found.touched = self._clock()
            self._artifacts.move_to_end(key)
            return found
        self._make_room(owner, int(manifest.size))
        a = self._artifacts[key] = _Artifact(manifest, owner, self._clock())
        self.used += a.size
        self.by_peer[owner] += a.size
        return a

    def touch(self, a: _Artifact) -> None:
        a.touched = self._clock()

    def arriving(self, key: bytes) -> _Artifact | None:
        return self._artifacts.get(key)

    def complete(self, key: bytes) -> _Artifact | None:
        a = self._artifacts.get(key)
        if a is None or a.missing:
            return None
        a.touched = self._clock()
        self._artifacts.move_to_end(key)
        return a

    def put_record(self, key: bytes, artifact: bytes, record: pb.ArtifactRecord) -> bool:
        """Keep `record` (naming the complete artifact under store key `artifact`) unless a
        version at least as high is here. Full when the shard holds `limits.records`."""
        held = self._records.get(key)
        if held is not None and held[1].version >= record.version:
            return False
        if held is None and len(self._records) >= self.limits.records:
            raise Full(f"{len(self._records)} records held; the limit is {self.limits.records}")
        self._records[key] = (artifact, record)
        return True

    def record(self, key: bytes) -> pb.ArtifactRecord | None:
        held = self._records.get(key)
        return None if held is None else held[1]


def _parse(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that gives None for bytes that do not parse (INVALID_ARGUMENT)."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return None

    return parse


class ArtifactServicer:
    """PutArtifact, GetArtifact, PutRecord, GetRecord over an ArtifactStore (and Redis).
    `caller` gives the (tenant, peer) `Edge` bound to the RPC; `refuse` makes the server's
    refusal exception for a status code and detail."""

    def __init__(
        self, store: ArtifactStore, caller: Callable[[], Owner], refuse: Refuse,
        redis: RedisTier | None = None,
    ) -> None:  # fmt: skip
        self.store, self._caller, self._refuse, self.redis = store, caller, refuse, redis

    def _key(self, space: bytes, name: bytes, what: str) -> bytes:
        if len(name) != ID_BYTES:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be {ID_BYTES} bytes")
        return store_key(self._caller()[0], space, name)

    def _parsed(self, request: Any) -> None:
        if request is None:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, "the request does not parse")

    def _checked(self, check: Callable[[], None]) -> None:
        """Run a contract check, its failure as a status: a mismatch is DATA_LOSS, a size over
        a limit RESOURCE_EXHAUSTED, anything else malformed INVALID_ARGUMENT."""
        try:
            check()
        except ArtifactMismatch as e:
            raise self._refuse(grpc.StatusCode.DATA_LOSS, str(e)) from None
        except OverflowError as e:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except ArtifactError as e:
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    # -- artifacts ---------------------------------------------------------------------------

    async def PutArtifact(
        self, request: pb.PutArtifactRequest, context: Any
    ) -> pb.PutArtifactResponse:
        self._parsed(request)
        part = request.WhichOneof("part")
        if part == "manifest":
            return self._put_manifest(request.manifest)
        if part == "chunk":
            return await self._put_chunk(request.chunk)
        raise self._refuse(
            grpc.StatusCode.INVALID_ARGUMENT, "a PutArtifact holds a manifest or a chunk"
        )

    def _put_manifest(self, manifest: pb.ArtifactManifest) -> pb.PutArtifactResponse:
        limit = self.store.limits.max_artifact_bytes
        self._checked(lambda: check_manifest(manifest, limit))
        key = self._key(ARTIFACTS, manifest.id, "an artifact id")
        try:
            a = self.store.begin(key, manifest, self._caller()[1])
        except Full as e:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        return pb.PutArtifactResponse(complete=not a.missing, missing=a.missing)

    async def _put_chunk(self, chunk: pb.ArtifactChunk) -> pb.PutArtifactResponse:
        key = self._key(ARTIFACTS, chunk.id, "an artifact id")
        a = self.store.arriving(key)
        if a is None:
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               "no manifest of this artifact here: put the manifest first")  # fmt: skip
        index, data = chunk.index, chunk.data
        if index < len(a.chunks) and a.chunks[index] is None:
            self._checked(lambda: check_chunk(a.manifest, index, data))  # ~2 ms a MiB, rare
            if self.store.arriving(key) is a and a.chunks[index] is None:
                a.chunks[index] = data
                a.missing -= 1
                self.store.touch(a)
                if not a.missing and self.redis is not None:
                    await asyncio.to_thread(self._save, key, a)
        elif index >= len(a.chunks):
            raise self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                               f"chunk {index} of an artifact of {len(a.chunks)} chunks")  # fmt: skip
        return pb.PutArtifactResponse(complete=not a.missing, missing=a.missing)

    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Any
    ) -> pb.GetArtifactResponse:
        self._parsed(request)
        key = self._key(ARTIFACTS, request.id, "an artifact id")
        a = self.store.complete(key) or await self._restore(key, request.id)
        if a is None:
            return pb.GetArtifactResponse(found=False)
        if request.manifest:
            return pb.GetArtifactResponse(found=True, manifest=a.manifest)
        if request.index >= len(a.chunks):
            raise self._refuse(grpc.StatusCode.OUT_OF_RANGE,
                               f"chunk {request.index} of an artifact of {len(a.chunks)} chunks")  # fmt: skip
        return pb.GetArtifactResponse(found=True, data=a.chunks[request.index])

    # -- records -----------------------------------------------------------------------------

    async def PutRecord(self, request: pb.PutRecordRequest, context: Any) -> pb.PutRecordResponse:
        self._parsed(request)
        record = request.record
        self._checked(lambda: check_record(request.name, record))
        key = self._key(RECORDS, request.name, "a record name")
        artifact = self._key(ARTIFACTS, record.artifact_id, "an artifact id")
        if (
            self.store.complete(artifact) is None
            and await self._restore(artifact, record.artifact_id) is None
        ):
            raise self._refuse(grpc.StatusCode.FAILED_PRECONDITION,
                               "the record's artifact is not complete on this shard: put it first")  # fmt: skip
        try:
            stored = self.store.put_record(key, artifact, record)
        except Full as e:
            raise self._refuse(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        if stored and self.redis is not None:
            await asyncio.to_thread(self._save_record, key, record)
        return pb.PutRecordResponse(stored=stored)

    async def GetRecord(self, request: pb.GetRecordRequest, context: Any) -> pb.GetRecordResponse:
        self._parsed(request)
        key = self._key(RECORDS, request.name, "a record name")
        record = self.store.record(key)
        if record is None and self.redis is not None:
            record = await self._restore_record(key, request.name)
        if record is None:
            return pb.GetRecordResponse(found=False)
        return pb.GetRecordResponse(found=True, record=record)

    # -- the Redis tier ----------------------------------------------------------------------

    def _save(self, key: bytes, a: _Artifact) -> None:
        """Write a complete artifact to Redis (a thread; errors are logged by the tier)."""
        assert self.redis is not None
        self.redis.put_plain(key, b"m", a.manifest.SerializeToString())
        for i, data in enumerate(a.chunks):
            assert data is not None
            self.redis.put_plain(key, b"c%d" % i, data)

    def _save_record(self, key: bytes, record: pb.ArtifactRecord) -> None:
        assert self.redis is not None
        held = self.redis.get_plain(key, b"r")
        if held is not None:
            with contextlib.suppress(DecodeError):
                if pb.ArtifactRecord.FromString(held).version >= record.version:
                    return
        self.redis.put_plain(key, b"r", record.SerializeToString())

    async def _restore(self, key: bytes, artifact_id: bytes) -> _Artifact | None:
        """A complete artifact read back from Redis (a shard that restarted empty), checked
        again as an upload; None when Redis lacks it, or holds what does not check."""
        if self.redis is None:
            return None
        raw = await asyncio.to_thread(self.redis.get_plain, key, b"m")
        if raw is None:
            return None
        try:
            manifest = pb.ArtifactManifest.FromString(raw)
            check_manifest(manifest, self.store.limits.max_artifact_bytes)
            if manifest.id != artifact_id:
                return None
            a = self.store.begin(key, manifest, self._caller()[1])
        except (DecodeError, ArtifactError, OverflowError, Full):
            return None
        for i in range(len(a.chunks)):
            if a.chunks[i] is not None:
                continue
            data = await asyncio.to_thread(self.redis.get_plain, key, b"c%d" % i)
            try:
                check_chunk(manifest, i, data or b"")
            except ArtifactError:
                return None  # left incomplete: dropped when idle
            if a.chunks[i] is None:
                a.chunks[i] = data
                a.missing -= 1
        return self.store.complete(key)

    async def _restore_record(self, key: bytes, name: bytes) -> pb.ArtifactRecord | None:
        assert self.redis is not None
        raw = await asyncio.to_thread(self.redis.get_plain, key, b"r")
        if raw is None:
            return None
        try:
            record = pb.ArtifactRecord.FromString(raw)
            check_record(name, record)
        except (DecodeError, ArtifactError):
            return None
        artifact = self._key(ARTIFACTS, record.artifact_id, "an artifact id")
        if (
            self.store.complete(artifact) is None
            and await self._restore(artifact, record.artifact_id) is None
        ):
            return None
        with contextlib.suppress(Full):  # served all the same, only not kept
            self.store.put_record(key, artifact, record)
        return record


def handlers(s: ArtifactServicer) -> grpc.GenericRpcHandler:
    """The artifact and record RPCs of kvpool.v1.KVPool (registered beside the block RPCs)."""
    u = grpc.unary_unary_rpc_method_handler
    return grpc.method_handlers_generic_handler("kvpool.v1.KVPool", {
        "PutArtifact": u(s.PutArtifact, _parse(pb.PutArtifactRequest), pb.PutArtifactResponse.SerializeToString),
        "GetArtifact": u(s.GetArtifact, _parse(pb.GetArtifactRequest), pb.GetArtifactResponse.SerializeToString),
        "PutRecord": u(s.PutRecord, _parse(pb.PutRecordRequest), pb.PutRecordResponse.SerializeToString),
        "GetRecord": u(s.GetRecord, _parse(pb.GetRecordRequest), pb.GetRecordResponse.SerializeToString),
    })  # fmt: skip
