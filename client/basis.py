"""A model's key basis (codec v2), published in the tier and read back by every worker.

Where it stands: between `kvpool calibrate --basis --predict --publish ENDPOINT`, which stores a
basis and its maps in the tier as an artifact with a record naming it for the model, and every
writer and reader of blocks (the vLLM connector, `CachedModel.connect`, `kvpool ingest`, the
benchmarks), which need nothing but the endpoint and the model's name:

    resolve_basis(endpoint, model) --every shard: record--> artifact id (+ codec options)
        --local cache hit (checked) | fetch by id from a shard, every chunk checked-->
        KeyBasis (its id must be the one the record names) --> published_codec: codec v2

No record anywhere: `published_codec` falls back to K3V2 and says once how to publish one. A
record that cannot be honoured (its artifact unreachable, forged or corrupt, or shards that did
not answer so nobody can tell) raises `BasisUnavailable`: a worker that went on with K3V2 would
write blocks of a namespace nobody else reads, so it must not go on silently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from kvpool import artifacts
from kvpool.kernels.codec import CodecConfig, KeyBasis
from kvpool.model_facts import codec_for
from kvpool.proto.artifacts import KEY_BASIS, artifact_id, manifest_for, record_name
from kvpool.proto.errors import CodecError, KVPoolError, TierError
from kvpool.transport import ClientConfig, TierClient

log = logging.getLogger(__name__)
T = TypeVar("T")
# The codec options a basis is published with (`kvpool calibrate`'s defaults): every reader
# builds the same CodecConfig from them, so the namespace is the same everywhere.
OPTIONS = ("value_bits", "group_size", "sink_tokens", "hadamard_values", "pre_rope")
# Options a record names only when they are set (so records without them read as before, and a
# reader that does not know one refuses the record rather than building another namespace).
OPTIONAL = {"symmetric_values": False}
_told: set[str] = set()  # models whose missing basis was already logged
DEFAULT_CONFIG = ClientConfig()


class BasisUnavailable(KVPoolError):
    """A key basis is published for the model, but this worker cannot use it (or cannot tell
    which one is current): it must neither write nor read the model's blocks."""


@dataclass(frozen=True)
class PublishedBasis:
    basis: KeyBasis
    options: dict[str, Any]  # OPTIONS and OPTIONAL -> value
    artifact: bytes  # the artifact's id
    version: int
    path: Path | None = field(default=None, compare=False)  # the verified local copy

    def codec(self, model: Any) -> CodecConfig:
        """The codec v2 of `model` (or its config) with this basis and its options, payloads
        deflated (lossless, about an eighth fewer bytes; outside the namespace)."""
        o = self.options
        codec = codec_for(
            model, 2, o["value_bits"], o["group_size"], pre_rope=o["pre_rope"],
            hadamard_values=o["hadamard_values"], sink_tokens=o["sink_tokens"],
            key_basis=self.basis,
        )  # fmt: skip
        return replace(codec, symmetric_values=o["symmetric_values"], deflate=True)


def cache_dir() -> Path:
    """Where verified artifacts are kept: .cache/artifacts (under KVPOOL_CACHE_DIR when set)."""
    return Path(os.environ.get("KVPOOL_CACHE_DIR", ".cache")) / "artifacts"


def basis_bytes(basis: KeyBasis) -> bytes:
    """A basis as `KeyBasis.save` writes it: the artifact's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return basis.save(Path(tmp) / "basis.pt").read_bytes()


def _run(endpoint: str, config: ClientConfig, job: Callable[[TierClient], Awaitable[T]]) -> T:
    """Run `job` on a TierClient of its own, in a thread of its own (callers may be inside an
    event loop, as vLLM's engine is)."""

    async def main() -> T:
        tier = TierClient(endpoint, config)
        try:
            return await job(tier)
        finally:
            await tier.close()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvpool-basis") as pool:
        return pool.submit(asyncio.run, main()).result()


def publish_basis(
    endpoint: str, model: str, basis: KeyBasis, options: dict[str, Any], *, salt: bytes = b"",
    mac_key: bytes = b"", config: ClientConfig = DEFAULT_CONFIG,
) -> bytes:  # fmt: skip
    """Store `basis` on every shard of the tier as the current basis of `model` (for the tenant
    of `config`'s token and `salt`), with the codec `options`; returns the artifact's id.
    TierError unless every shard took it."""
    missing = set(OPTIONS) - set(options)
    if missing:
        raise CodecError(f"a published basis needs the codec options {sorted(missing)}")
    unknown = set(options) - set(OPTIONS) - set(OPTIONAL)
    if unknown:
        raise CodecError(f"unknown codec options {sorted(unknown)}")
    named = {k: options[k] for k in OPTIONS}
    named |= {k: options[k] for k, unset in OPTIONAL.items() if options.get(k, unset) != unset}
    codec = json.dumps({"basis_id": basis.id.hex(), **named})
    data = basis_bytes(basis)
    name = record_name(KEY_BASIS, model, salt)
    record = _run(
        endpoint, config, lambda t: artifacts.publish(t, KEY_BASIS, data, name, codec, mac_key)
    )
    return record.artifact_id


def resolve_basis(
    endpoint: str, model: str, *, salt: bytes = b"", mac_key: bytes = b"",
    config: ClientConfig = DEFAULT_CONFIG, cache: Path | None = None,
) -> PublishedBasis | None:  # fmt: skip
    """The current basis of `model` in the tier (for this tenant and salt): from the local cache
    when a checked copy of its artifact is there, else fetched once by id, checked and cached;
    shards that lacked it are written to again. None when every shard answered and none holds a
    record; BasisUnavailable when there is a record this worker cannot honour, or shards did
    not answer and none of the others holds one."""
    name = record_name(KEY_BASIS, model, salt)
    folder = cache or cache_dir()

    async def job(tier: TierClient) -> PublishedBasis | None:
        try:
            found = await artifacts.find_record(tier, name, mac_key)
        except TierError as e:
            raise BasisUnavailable(
                f"cannot tell whether {model!r} has a published key basis: {e}"
            ) from None
        if found.record is None:
            if found.certain:
                return None
            raise BasisUnavailable(
                f"cannot tell whether {model!r} has a published key basis: {found.answered} of "
                f"{found.shards} shards answered, {found.refused} held a record that does not "
                f"check ({'; '.join(found.errors)})"
            )
        record = found.record
        options = _options(record.codec)
        path = folder / f"{record.artifact_id.hex()}.pt"
        data = _cached(path, record.artifact_id)
        if data is None:
            try:
                _, data = await artifacts.fetch(tier, record.artifact_id)
            except artifacts.ArtifactUnavailable as e:
                raise BasisUnavailable(f"the key basis published for {model!r}: {e}") from None
            _keep(path, data)
        if found.lacking:  # shards that answered without it (restarted empty, joined later)
            manifest = manifest_for(KEY_BASIS, data)
            failed = await artifacts.put_everywhere(tier, manifest, data, name, record,
                                                    found.lacking)  # fmt: skip
            for why in failed:
                log.warning("could not restore the key basis of %r on %s", model, why)
        basis = _load(path, data)
        if basis.id.hex() != options["basis_id"]:
            raise BasisUnavailable(
                f"the artifact published for {model!r} holds key basis {basis.id.hex()}, its "
                f"record names {options['basis_id']}"
            )
        chosen = {k: options[k] for k in (*OPTIONS, *OPTIONAL)}
        return PublishedBasis(basis, chosen, record.artifact_id, record.version, path)

    return _run(endpoint, config, job)


def _options(codec: str) -> dict[str, Any]:
    try:
        options = json.loads(codec)
        needed = {"basis_id", *OPTIONS}
        if not isinstance(options, dict) or not needed <= set(options) <= needed | set(OPTIONAL):
            raise ValueError(f"expected the keys {['basis_id', *OPTIONS]} (and {list(OPTIONAL)})")
        for k, unset in OPTIONAL.items():
            if not isinstance(options.setdefault(k, unset), type(unset)):
                raise ValueError(f"{k} must be a {type(unset).__name__}")
    except ValueError as e:
        raise BasisUnavailable(f"the published basis's codec options are unreadable: {e}") from None
    return options


def _cached(path: Path, artifact: bytes) -> bytes | None:
    """The cached copy of `artifact`, if there is one and it is that artifact."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if artifact_id(KEY_BASIS, data) == artifact else None


def _keep(path: Path, data: bytes) -> None:
    """Write a checked artifact to the cache (atomically; a cache that cannot be written only
    costs a fetch next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the key basis in %s: %s", path.parent, e)


def _load(path: Path, data: bytes) -> KeyBasis:
    """The KeyBasis of checked artifact bytes (from a file of its own: the cache may be
    unwritable, and it is read only after the check)."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "basis.pt"
        file.write_bytes(data)
        try:
            return KeyBasis.load(file)
        except CodecError as e:
            raise BasisUnavailable(
                f"the published artifact {path.stem} is no key basis: {e}"
            ) from None


def published_codec(
    model: Any, endpoint: str, *, name: str | None = None, salt: bytes = b"", mac_key: bytes = b"",
    config: ClientConfig = DEFAULT_CONFIG, fallback: Callable[[], CodecConfig] | None = None,
) -> tuple[CodecConfig, PublishedBasis | None]:  # fmt: skip
    """The codec every worker of `model` (a transformers model or config; its name `name`, by
    default its config's `_name_or_path`) uses with this tier: codec v2 with the published
    basis, or, when none is published, `fallback()` (default K3V2, pre-RoPE, Hadamard, 4
    sinks), saying once how to publish one. BasisUnavailable as `resolve_basis`."""
    config_ = getattr(model, "config", model)
    name = name or str(getattr(config_, "_name_or_path", "") or config_.model_type)
    published = resolve_basis(endpoint, name, salt=salt, mac_key=mac_key, config=config)
    if published is not None:
        try:
            return published.codec(model), published
        except CodecError as e:  # options or a layout this model cannot take
            raise BasisUnavailable(f"the key basis published for {name!r}: {e}") from None
    if name not in _told:
        _told.add(name)
        log.warning(
            "no key basis is published for %r in the tier at %s: using K3V2 (about 5.5x, "
            "+2-3%% perplexity). Codec v2 (about 7.2x, under +1%%) needs one basis per model, "
            "once: kvpool calibrate --basis --predict --model MODEL_DIR --publish %s",
            name, endpoint, endpoint,
        )  # fmt: skip
    return (fallback() if fallback else codec_for(model, 3, 2)), None
