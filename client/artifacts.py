"""The client's side of artifacts and records (see kvpool.proto.artifacts): publish an artifact
and the record naming it to every shard, find a record, fetch an artifact by id and check it,
and repair shards that lost them. Bytes only, no tensors (kvpool.basis gives them meaning).

Where it stands: on a TierClient, beside block traffic. Every shard holds every artifact and
record, so a reader asks all shards for the record (the highest version any of them holds that
checks wins) and fetches the artifact from the first shard that has it whole and verified. A
shard that answered without them (restarted empty, joined later) is written to again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.artifacts import (
    MAX_ARTIFACT_BYTES,
    ArtifactError,
    ArtifactMismatch,
    check_chunk,
    check_manifest,
    check_record,
    chunks_of,
    manifest_for,
    record_mac,
)
from kvpool.proto.errors import KVPoolError, TierError
from kvpool.transport import TierClient

log = logging.getLogger(__name__)


class ArtifactUnavailable(KVPoolError):
    """No shard served the artifact whole and verified."""


async def _rpc(tier: TierClient, shard: str, method: str, request: Any) -> Any:
    timeout = tier.config.timeout_s

    def call(stub: Any) -> Any:
        return getattr(stub, method)(request, timeout=timeout)

    return await tier._call(shard, call)


async def shards(tier: TierClient) -> list[str]:
    """The shard ids of the tier's current topology."""
    await tier.refresh(force=True)
    return sorted(tier._addresses)


async def put_artifact(tier: TierClient, shard: str, manifest: pb.ArtifactManifest,
                       data: bytes) -> None:  # fmt: skip
    """Write an artifact to one shard (only its manifest when the shard already has it)."""
    reply = await _rpc(tier, shard, "PutArtifact", pb.PutArtifactRequest(manifest=manifest))
    for i, chunk in enumerate(chunks_of(data)):
        if reply.complete:
            return
        part = pb.ArtifactChunk(id=manifest.id, index=i, data=bytes(chunk))
        reply = await _rpc(tier, shard, "PutArtifact", pb.PutArtifactRequest(chunk=part))
    if not reply.complete:
        raise TierError(f"{shard}: the artifact is incomplete after all its chunks", "DATA_LOSS")


async def put_everywhere(
    tier: TierClient, manifest: pb.ArtifactManifest, data: bytes, name: bytes,
    record: pb.ArtifactRecord, where: list[str],
) -> list[str]:  # fmt: skip
    """Write the artifact, then the record naming it, to the shards `where`; returns the
    failures ("shard: why"), empty when every shard took both."""

    async def one(shard: str) -> None:
        await put_artifact(tier, shard, manifest, data)
        await _rpc(tier, shard, "PutRecord", pb.PutRecordRequest(name=name, record=record))

    results = await asyncio.gather(*(one(s) for s in where), return_exceptions=True)
    failed = []
    for shard, r in zip(where, results, strict=True):
        if isinstance(r, BaseException):
            if not isinstance(r, TierError):
                raise r
            failed.append(f"{shard}: {r}")
    return failed


async def publish(
    tier: TierClient, kind: str, data: bytes, name: bytes, codec: str, mac_key: bytes = b"",
) -> pb.ArtifactRecord:  # fmt: skip
    """Store `data` as an artifact of `kind` on every shard, then a record under `name` naming
    it as current (version: now, in ms). TierError unless every shard took both."""
    manifest = manifest_for(kind, data)
    record = pb.ArtifactRecord(artifact_id=manifest.id, version=time.time_ns() // 1_000_000,
                               codec=codec)  # fmt: skip
    if mac_key:
        record.mac = record_mac(mac_key, name, record)
    where = await shards(tier)
    failed = await put_everywhere(tier, manifest, data, name, record, where)
    if failed:
        raise TierError(
            f"published on {len(where) - len(failed)} of {len(where)} shards; " + "; ".join(failed),
            "UNAVAILABLE",
        )
    return record


@dataclass
class Found:
    """What the shards said about a record: the current one (None: none held one that
    checks), how many shards answered of how many, and which answered without it."""

    record: pb.ArtifactRecord | None
    answered: int
    shards: int
    lacking: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: int = 0  # records held that did not check (malformed, or forged under a MAC)

    @property
    def certain(self) -> bool:
        """Whether a missing record is known to be missing: every shard answered, and none
        held a record that did not check (a forged one may have replaced the tenant's)."""
        return self.record is not None or (self.answered == self.shards and not self.refused)


async def find_record(tier: TierClient, name: bytes, mac_key: bytes = b"") -> Found:
    """Ask every shard for the record `name`; the highest version that checks is current (with
    `mac_key`, only records whose MAC verifies count)."""
    where = await shards(tier)
    request = pb.GetRecordRequest(name=name)
    replies = await asyncio.gather(*(_rpc(tier, s, "GetRecord", request) for s in where),
                                   return_exceptions=True)  # fmt: skip
    found = Found(None, 0, len(where))
    held: dict[str, int] = {}
    for shard, reply in zip(where, replies, strict=True):
        if isinstance(reply, BaseException):
            if not isinstance(reply, TierError):
                raise reply
            found.errors.append(f"{shard}: {reply}")
            continue
        found.answered += 1
        if not reply.found:
            continue
        why = _unusable(name, reply.record, mac_key)
        if why:
            found.errors.append(f"{shard}: {why}")
            found.refused += 1
            log.warning("shard %s holds a record that does not check: %s", shard, why)
            continue
        held[shard] = reply.record.version
        if found.record is None or reply.record.version > found.record.version:
            found.record = reply.record
    if found.record is not None:
        top = found.record.version
        answered = {
            s for s, r in zip(where, replies, strict=True) if not isinstance(r, BaseException)
        }
        found.lacking = [s for s in where if s in answered and held.get(s, -1) < top]
    return found


def _unusable(name: bytes, record: pb.ArtifactRecord, mac_key: bytes) -> str:
    try:
        check_record(name, record)
    except ArtifactError as e:
        return str(e)
    if mac_key and not hmac.compare_digest(record.mac, record_mac(mac_key, name, record)):
        return "its MAC does not verify under the tenant's secret (forged)"
    return ""


async def fetch(
    tier: TierClient, artifact: bytes, max_bytes: int = MAX_ARTIFACT_BYTES,
    order: list[str] | None = None, progress: Callable[[int, int], None] | None = None,
) -> tuple[pb.ArtifactManifest, bytes]:  # fmt: skip
    """The artifact `artifact` from the first shard (in `order`, default all) that serves it
    whole: its manifest is the one its id names, no larger than `max_bytes`, and every chunk
    its hash (the id is trusted as far as the record naming it: see `find_record`). A shard that fails any of
    that is skipped; ArtifactUnavailable when none is left."""
    errors = []
    for shard in order if order is not None else await shards(tier):
        try:
            return await _fetch_from(tier, shard, artifact, max_bytes, progress)
        except (TierError, ArtifactError, OverflowError) as e:
            errors.append(f"{shard}: {e}")
            if isinstance(e, ArtifactError | OverflowError):
                log.warning("shard %s served artifact %s that does not check: %s", shard,
                            artifact.hex()[:16], e)  # fmt: skip
    raise ArtifactUnavailable(
        f"no shard served artifact {artifact.hex()} whole and verified ({'; '.join(errors)})"
    )


async def _fetch_from(
    tier: TierClient, shard: str, artifact: bytes, max_bytes: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[pb.ArtifactManifest, bytes]:  # fmt: skip
    reply = await _rpc(
        tier, shard, "GetArtifact", pb.GetArtifactRequest(id=artifact, manifest=True)
    )
    if not reply.found:
        raise TierError("not found", "NOT_FOUND")
    manifest = reply.manifest
    check_manifest(manifest, max_bytes)
    if manifest.id != artifact:
        raise ArtifactMismatch("the shard answered another artifact's manifest")
    buf = bytearray()
    for i in range(len(manifest.chunks)):
        got = await _rpc(tier, shard, "GetArtifact", pb.GetArtifactRequest(id=artifact, index=i))
        if not got.found:
            raise TierError(f"chunk {i} gone", "NOT_FOUND")
        check_chunk(manifest, i, got.data)
        buf += got.data
        if progress is not None:
            progress(i + 1, len(manifest.chunks))
    return manifest, bytes(buf)
