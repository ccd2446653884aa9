"""Artifacts and records: what both sides agree on about the files a namespace needs besides its
blocks (a calibrated key basis and its prediction maps), stored in the tier.

An artifact is immutable and content-addressed. Its bytes are cut into chunks of CHUNK_BYTES;
its manifest lists its kind, size, chunk size and the sha256 of every chunk, and its id is the
sha256 of the manifest's canonical encoding (`artifact_id`), so the id commits to every byte:
a shard checks each manifest against its id and each chunk against its hash before taking it,
and a reader checks them again (a shard may lie). An artifact needs no MAC of its own: the
record naming its id carries the tenant's.

A record names a tenant's current artifact of one kind for one model (`record_name`: a digest
of the kind, the tenant's salt and the model name; the salt never leaves the client). It holds
the artifact's id, a version (the publisher's clock; the highest is current) and a short JSON
string saying how blocks use the artifact; with a tenant secret, an HMAC over all of it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator

from kvpool.proto import kvpool_pb2 as pb

ID_BYTES = 32
CHUNK_BYTES = 1 << 20  # one chunk per message, within the 4 MiB message limit
MAX_ARTIFACT_BYTES = 2 << 30  # the most any shard takes for one artifact
MAX_KIND_CHARS = 64
MAX_CODEC_CHARS = 4096  # a record's codec string
MAC_BYTES = 32
KEY_BASIS = "kvpool.key-basis.v1"  # a KeyBasis as `KeyBasis.save` writes it (torch, weights only)


class ArtifactError(ValueError):
    """A manifest, chunk or record that is malformed or does not match what names it."""


class ArtifactMismatch(ArtifactError):
    """Intact-looking data that is not what its id or hash says: forged or corrupted."""


def _manifest_digest(kind: str, size: int, chunk_bytes: int, chunks: list[bytes]) -> bytes:
    kind_b = kind.encode()
    h = hashlib.sha256(b"kvpool artifact 1\x00")
    h.update(struct.pack("<H", len(kind_b)) + kind_b)
    h.update(struct.pack("<QII", size, chunk_bytes, len(chunks)))
    for c in chunks:
        h.update(c)
    return h.digest()


def chunks_of(data: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    view = memoryview(data)
    for off in range(0, len(view), chunk_bytes):
        yield view[off : off + chunk_bytes]


def manifest_for(kind: str, data: bytes | memoryview) -> pb.ArtifactManifest:
    """The manifest of `data`, its id computed."""
    chunks = [hashlib.sha256(c).digest() for c in chunks_of(data)]
    manifest = pb.ArtifactManifest(
        kind=kind, size=len(data), chunk_bytes=CHUNK_BYTES, chunks=chunks
    )
    manifest.id = _manifest_digest(kind, len(data), CHUNK_BYTES, chunks)
    return manifest


def artifact_id(kind: str, data: bytes | memoryview) -> bytes:
    return manifest_for(kind, data).id


def check_manifest(manifest: pb.ArtifactManifest, max_bytes: int = MAX_ARTIFACT_BYTES) -> None:
    """A manifest is well formed, within `max_bytes`, and its id is its digest.
    ArtifactError / ArtifactMismatch (the id) otherwise; OverflowError for a size over
    `max_bytes` (checked before anything is allocated for it)."""
    if len(manifest.id) != ID_BYTES:
        raise ArtifactError(f"an artifact id is {ID_BYTES} bytes, got {len(manifest.id)}")
    if not manifest.kind or len(manifest.kind) > MAX_KIND_CHARS:
        raise ArtifactError(f"an artifact kind has 1 to {MAX_KIND_CHARS} characters")
    if manifest.size > max_bytes:
        raise OverflowError(f"artifact of {manifest.size} bytes over the limit of {max_bytes}")
    if manifest.size == 0 or manifest.chunk_bytes != CHUNK_BYTES:
        raise ArtifactError(f"an artifact is not empty and cut into chunks of {CHUNK_BYTES}")
    count = -(-manifest.size // manifest.chunk_bytes)
    if len(manifest.chunks) != count or any(len(c) != ID_BYTES for c in manifest.chunks):
        raise ArtifactError(f"{manifest.size} bytes need {count} chunk hashes of {ID_BYTES} bytes")
    digest = _manifest_digest(manifest.kind, manifest.size, manifest.chunk_bytes,
                              list(manifest.chunks))  # fmt: skip
    if not hmac.compare_digest(digest, manifest.id):
        raise ArtifactMismatch("the manifest is not the one its id names")


def chunk_size(manifest: pb.ArtifactManifest, index: int) -> int:
    """The size chunk `index` of a checked manifest must have."""
    if not 0 <= index < len(manifest.chunks):
        raise ArtifactError(f"chunk {index} of an artifact of {len(manifest.chunks)} chunks")
    return min(manifest.chunk_bytes, manifest.size - index * manifest.chunk_bytes)


def check_chunk(manifest: pb.ArtifactManifest, index: int, data: bytes) -> None:
    """Chunk `index` of a checked manifest is of its size and hash."""
    if len(data) != chunk_size(manifest, index):
        raise ArtifactError(
            f"chunk {index} has {len(data)} bytes, its manifest says {chunk_size(manifest, index)}"
        )
    if not hmac.compare_digest(hashlib.sha256(data).digest(), manifest.chunks[index]):
        raise ArtifactMismatch(f"chunk {index} is not the one its manifest names")


def record_name(kind: str, model: str, salt: bytes = b"") -> bytes:
    """The name of a tenant's record of `kind` for `model` (the salt stays on the client)."""
    h = hashlib.sha256(b"kvpool record 1\x00")
    for part in (kind.encode(), salt, model.encode()):
        h.update(struct.pack("<I", len(part)) + part)
    return h.digest()


def record_mac(mac_key: bytes, name: bytes, record: pb.ArtifactRecord) -> bytes:
    codec = record.codec.encode()
    h = hmac.new(mac_key, b"kvpool record mac 1\x00", hashlib.sha256)
    h.update(name + record.artifact_id + struct.pack("<QI", record.version, len(codec)) + codec)
    return h.digest()


def check_record(name: bytes, record: pb.ArtifactRecord) -> None:
    """A record is well formed (ArtifactError otherwise); its MAC only the tenant can check."""
    if len(name) != ID_BYTES or len(record.artifact_id) != ID_BYTES:
        raise ArtifactError(f"a record's name and artifact id are {ID_BYTES} bytes")
    if len(record.codec) > MAX_CODEC_CHARS:
        raise ArtifactError(f"a record's codec has at most {MAX_CODEC_CHARS} characters")
    if record.mac and len(record.mac) != MAC_BYTES:
        raise ArtifactError(f"a MAC is {MAC_BYTES} bytes")
