"""The key basis in the tier: `kvpool calibrate --basis --predict --publish` stores it, a worker
with only the endpoint and the model's name finds it, fetches it once, checks it and caches it,
and shares blocks with every other worker of the model. Shards that lie are skipped, a record
nobody can honour stops the worker (it never writes another namespace by accident), and with a
tenant secret a forged record is ignored. Real shards, the real SmolLM2 and a real basis."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvpool import artifacts
from kvpool.basis import BasisUnavailable, published_codec, resolve_basis
from kvpool.hf import CachedModel
from kvpool.kernels.codec import KeyBasis, block_header
from kvpool.models import SMOLLM2
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.artifacts import KEY_BASIS, record_name
from kvpool.proto.blockformat import Layout
from kvpool.services.artifacts import ARTIFACTS
from kvpool.services.security import store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import TierClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards() -> Iterator[list[ShardServer]]:
    """Two shards that know each other."""
    servers: list[ShardServer] = []

    async def topology() -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=1, shards=[
            pb.Shard(shard_id=s.shard_id, address=s.address) for s in servers])  # fmt: skip

    for i in range(2):
        servers.append(ShardServer(BlockStore(64 << 20), f"s{i}", topology))
        servers[-1].start()
    yield servers
    for s in servers:
        s.stop()


def endpoint(shards: list[ShardServer]) -> str:
    return ",".join(s.address for s in shards)


@pytest.fixture(scope="module")
def published(shards, tmp_path_factory) -> KeyBasis:
    """What a new user runs: `kvpool calibrate --basis --predict --publish ENDPOINT` (one
    sample window, to be quick), publishing SmolLM2's basis to the module's tier."""
    out = tmp_path_factory.mktemp("basis") / "basis.pt"
    run = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "calibrate", "--basis", "--predict", "--samples", "1",
         "--out", str(out), "--publish", endpoint(shards)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "published as the key basis of 'HuggingFaceTB/SmolLM2-135M-Instruct'" in run.stdout
    return KeyBasis.load(out)


def chunks_of_basis(server: ShardServer, artifact: bytes) -> list[bytes | None]:
    a = server.artifacts.complete(store_key(None, ARTIFACTS, artifact))
    assert a is not None
    return a.chunks


def test_a_fresh_process_with_only_endpoint_and_name_hits_blocks_another_stored(
    smollm2, shards, published, tmp_path
) -> None:
    model, tok = smollm2
    cached = CachedModel.connect(model, endpoint(shards))  # this process: the writer
    assert cached.pool.codec.key_basis == published and cached.pool.codec.key_basis.predicted
    assert cached.pool.codec.deflate  # the default stores payloads deflated (lossless)
    ids = tok((ROOT / "README.md").read_text(), return_tensors="pt").input_ids[:, :600]
    cached.prefill(ids)  # stores 2 blocks of codec v2
    cached.pool.close()
    reader = f"""
import json, torch
from kvpool.hf import CachedModel
from kvpool.models import load
model, tok = load()
cached = CachedModel.connect(model, {endpoint(shards)!r})
ids = torch.tensor([{ids[0].tolist()!r}])
cache = cached.fetch(ids)
print(json.dumps({{"basis": cached.pool.codec.key_basis.id.hex(), "cached": cached.last_cached_tokens,
                  "fetched": cached.last_fetched_bytes,
                  "namespace": cached.pool.namespace.id.hex()}}))
"""
    env = {**os.environ, "KVPOOL_CACHE_DIR": str(tmp_path)}
    (tmp_path / "models").symlink_to((ROOT / ".cache" / "models").resolve())  # no reconversion
    run = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["basis"] == published.id.hex()
    assert got["namespace"] == cached.pool.namespace.id.hex()
    assert got["cached"] == 512  # both blocks the writer stored
    full = sum(block_header(Layout.KV, torch.float16, (30, 3, 256, 64), cached.pool.codec, 256 * i)
               .total_len for i in range(2))  # fmt: skip
    assert 0 < got["fetched"] < full  # what crossed the wire: deflated
    assert len(list((tmp_path / "artifacts").glob("*.pt"))) == 1  # fetched once, kept


def test_without_a_published_basis_workers_use_k3v2_and_say_so_once(smollm2, caplog) -> None:
    model, _ = smollm2
    srv = ShardServer(BlockStore(16 << 20), "empty")
    srv.start()
    try:
        with caplog.at_level(logging.WARNING, logger="kvpool.basis"):
            for _ in range(2):
                codec, found = published_codec(model, srv.address, name="nobody/published")
                assert found is None and codec.key_basis is None and codec.key_bits == 3
        told = [r for r in caplog.records if "no key basis is published" in r.getMessage()]
        assert len(told) == 1 and "kvpool calibrate --basis --predict" in told[0].getMessage()
    finally:
        srv.stop()


def test_lying_shards_are_skipped_and_nothing_unverified_is_used(
    shards, published, tmp_path
) -> None:
    ep = endpoint(shards)
    first = resolve_basis(ep, SMOLLM2, cache=tmp_path / "a")
    assert first is not None and first.basis == published
    good = [list(chunks_of_basis(s, first.artifact)) for s in shards]
    try:
        # s0 serves a flipped bit: the reader takes the basis from s1
        chunk = bytearray(good[0][0])  # type: ignore[arg-type]
        chunk[7] ^= 1
        chunks_of_basis(shards[0], first.artifact)[0] = bytes(chunk)
        again = resolve_basis(ep, SMOLLM2, cache=tmp_path / "b")
        assert again is not None and again.basis == published
        # and s1 a truncated chunk: nobody serves it whole, nothing is cached or decoded
        chunks_of_basis(shards[1], first.artifact)[1] = good[1][1][:-1]  # type: ignore[index]
        with pytest.raises(BasisUnavailable, match="whole and verified"):
            resolve_basis(ep, SMOLLM2, cache=tmp_path / "c")
        assert not (tmp_path / "c").exists()
        # a verified local copy needs no shard: fetched once
        cached = resolve_basis(ep, SMOLLM2, cache=tmp_path / "a")
        assert cached is not None and cached.basis == published
        # a damaged local copy is not trusted either
        path = next((tmp_path / "a").glob("*.pt"))
        path.write_bytes(path.read_bytes()[:-10])
        with pytest.raises(BasisUnavailable):
            resolve_basis(ep, SMOLLM2, cache=tmp_path / "a")
    finally:
        for s, chunks in zip(shards, good, strict=True):
            chunks_of_basis(s, first.artifact)[:] = chunks


def test_a_shard_restarted_empty_gets_the_basis_back_from_the_next_reader(
    shards, published, tmp_path
) -> None:
    ep = endpoint(shards)
    store = shards[1].artifacts
    held = store.used
    store.__init__(store.limits)  # type: ignore[misc]  # as if restarted empty, without Redis
    assert store.used == 0
    found = resolve_basis(ep, SMOLLM2, cache=tmp_path)
    assert found is not None and found.basis == published
    name = record_name(KEY_BASIS, SMOLLM2)

    async def ask() -> list[bool]:
        tier = TierClient(shards[1].address)
        try:
            got = await artifacts.find_record(tier, name)
            return [got.record is not None, not got.lacking]
        finally:
            await tier.close()

    assert asyncio.run(ask()) == [True, True]  # repaired: both shards hold record and artifact
    assert store.used == held


def test_with_a_tenant_secret_a_forged_record_is_refused(
    smollm2, shards, published, tmp_path
) -> None:
    from kvpool.basis import basis_bytes, publish_basis

    ep, secret = endpoint(shards), b"tenant secret"
    options = {"value_bits": 2, "group_size": 128, "sink_tokens": 1, "hadamard_values": True,
               "pre_rope": True}  # fmt: skip
    publish_basis(ep, "secret/model", published, options, mac_key=secret)
    name = record_name(KEY_BASIS, "secret/model")
    junk = random.Random(22).randbytes(len(basis_bytes(published)))

    async def forge() -> None:  # a newer record without the secret, naming other bytes
        tier = TierClient(ep)
        try:
            codec = json.dumps({"basis_id": "00" * 16, **options})
            await artifacts.publish(tier, KEY_BASIS, junk, name, codec)
        finally:
            await tier.close()

    asyncio.run(forge())  # it replaced the tenant's record on the shards (no tokens here)
    with pytest.raises(BasisUnavailable, match="does not check"):  # detected: the worker stops
        resolve_basis(ep, "secret/model", mac_key=secret, cache=tmp_path / "s")
    with pytest.raises(BasisUnavailable, match="no key basis"):  # verified, then refused
        resolve_basis(ep, "secret/model", cache=tmp_path / "n")
    with pytest.raises(BasisUnavailable):  # and a worker goes no further with it
        published_codec(smollm2[0], ep, name="secret/model")
    assert not (tmp_path / "s").exists()
    publish_basis(ep, "secret/model", published, options, mac_key=secret)  # the tenant again
    with_secret = resolve_basis(ep, "secret/model", mac_key=secret, cache=tmp_path / "s")
    assert with_secret is not None and with_secret.basis == published


def test_a_basis_published_for_symmetric_value_groups_gives_every_reader_that_codec(
    smollm2, shards, published, tmp_path
) -> None:
    """`kvpool calibrate --basis --predict --symmetric-values --publish`: the record names the
    option, and readers build the symmetric codec (another namespace), deflated; records
    without it read as before; unknown or ill-typed options are refused, by writer and reader."""
    from kvpool.basis import basis_bytes, publish_basis
    from kvpool.proto.errors import CodecError

    model, ep = smollm2[0], endpoint(shards)
    options = {"value_bits": 2, "group_size": 128, "sink_tokens": 1, "hadamard_values": True,
               "pre_rope": True}  # fmt: skip
    publish_basis(ep, "sym/model", published, {**options, "symmetric_values": True})
    got = resolve_basis(ep, "sym/model", cache=tmp_path / "a")
    assert got is not None and got.options["symmetric_values"] is True
    codec = got.codec(model)
    assert codec.symmetric_values and codec.deflate and "symv=1" in codec.describe()
    plain = resolve_basis(ep, SMOLLM2, cache=tmp_path / "b")  # published by the fixture
    assert plain is not None and plain.options["symmetric_values"] is False
    assert not plain.codec(model).symmetric_values and plain.codec(model).deflate
    assert plain.codec(model).describe() != codec.describe()
    with pytest.raises(CodecError, match="unknown codec options"):
        publish_basis(ep, "x/model", published, {**options, "colour": 1})

    async def forge(named: dict[str, object]) -> None:
        tier = TierClient(ep)
        try:
            codec = json.dumps({"basis_id": published.id.hex(), **options, **named})
            data = basis_bytes(published)
            await artifacts.publish(
                tier, KEY_BASIS, data, record_name(KEY_BASIS, "bad/model"), codec
            )
        finally:
            await tier.close()

    for named in ({"symmetric_values": "yes"}, {"colour": 1}):
        asyncio.run(forge(named))
        with pytest.raises(BasisUnavailable, match="unreadable"):
            resolve_basis(ep, "bad/model", cache=tmp_path / "c")
