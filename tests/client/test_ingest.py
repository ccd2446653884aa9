"""Ingest worker actors fill the tier; this process (another worker) then hits their blocks."""

from __future__ import annotations

import json
import pydoc_data.topics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from kvpool.client import KVPool
from kvpool.hf import CachedModel, codec_for, kv_from_cache, namespace_for_model
from kvpool.ingest import IngestConfig, batches, read_documents, run_ingest
from kvpool.kernels.codec import decode, encode
from kvpool.models import SMOLLM2
from kvpool.services.tier import Tier, TierConfig, start_tier

DOCS = {name: pydoc_data.topics.topics[name][:2600] for name in ("debugger", "attribute-access")}


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=128 << 20, shard_cpus=0.1, name="ingest"))
    yield t
    t.shutdown()


def test_batches_bound_the_padded_size() -> None:
    lengths = [512, 256, 1024, 256, 768, 256]
    groups = batches(lengths, 1024)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1024 or len(g) == 1
    assert groups[0] == [2]  # the longest goes first, alone


def test_read_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.bin").write_bytes(b"\x00")
    assert read_documents([tmp_path]) == ["alpha", "beta"]
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing"])


def test_worker_actors_fill_the_tier_and_another_process_hits(
    smollm2, tier, tmp_path: Path
) -> None:
    model, tok = smollm2
    config = IngestConfig(model=SMOLLM2, endpoint=tier.endpoint, key_bits=3, batch_tokens=1024)
    texts = list(DOCS.values())
    full = [len(tok(t).input_ids) // 256 for t in texts]
    assert all(n >= 2 for n in full)
    done: list[int] = []
    stats = run_ingest(texts, config, workers=1, chunk=1, progress=done.append)
    assert done == [1, 1] and stats.documents == 2
    assert stats.blocks_stored == sum(full) and stats.blocks_cached == 0

    codec = codec_for(model, 3, 2)  # what the workers used, read from the same model config
    cm = CachedModel(model, KVPool(tier.endpoint, namespace_for_model(model, codec), codec))
    for text, n in zip(texts, full, strict=True):
        ids = torch.tensor([tok(text).input_ids])
        cache = cm.fetch(ids)
        cached = cm.last_cached_tokens
        assert cached == min(256 * n, ids.shape[1] - 1) > 0
        with torch.inference_mode():  # what this process would have stored itself
            exact = model(ids[:, :cached], use_cache=True).past_key_values
        keys, values = kv_from_cache(exact, cached)
        for i in range(cached // 256):
            part = slice(256 * i, 256 * (i + 1))
            local = decode(encode(keys[:, :, part], values[:, :, part], codec, 256 * i))
            assert torch.equal(cache.layers[0].keys[0, :, part], local.keys[0])
            assert torch.equal(cache.layers[-1].values[0, :, part], local.values[-1])
    cm.pool.close()

    # the kvpool ingest command on the same documents: everything is there, nothing recomputed
    for name, text in DOCS.items():
        (tmp_path / f"{name}.txt").write_text(text)
    gcs = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "ingest", str(tmp_path), "--endpoint", tier.endpoint,
         "--address", gcs, "--key-bits", "3"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["documents"] == 2 and summary["blocks_stored"] == 0
    assert summary["blocks_cached"] == sum(full)


def test_workers_write_in_the_published_basis_namespace(smollm2, ray_session) -> None:
    """With a key basis published for the model, ingest workers write codec v2 blocks in its
    namespace: a worker that resolves the same basis from the tier hits them."""
    from kvpool.basis import publish_basis
    from kvpool.kernels.codec import KeyBasis
    from kvpool.services.server import ShardServer
    from kvpool.services.store import BlockStore

    model, tok = smollm2
    rotation = torch.eye(64).expand(30, 3, 64, 64).contiguous()
    basis = KeyBasis(torch.zeros(30, 3, 64), rotation, (4,) * (30 * 8))
    options = {"value_bits": 2, "group_size": 128, "sink_tokens": 1, "hadamard_values": True,
               "pre_rope": True}  # fmt: skip
    srv = ShardServer(BlockStore(64 << 20), "ingest-basis", host="127.0.0.1")
    srv.start()
    try:
        publish_basis(srv.address, SMOLLM2, basis, options)
        text = DOCS["debugger"]
        stats = run_ingest([text], IngestConfig(model=SMOLLM2, endpoint=srv.address))
        full = len(tok(text).input_ids) // 256 * 256
        assert stats.blocks_stored == full // 256 > 0
        reader = CachedModel.connect(model, srv.address)
        assert reader.pool.codec.key_basis == basis
        assert reader.pool.lookup(tok(text).input_ids) == full
        k3v2 = codec_for(model, 3, 2)
        other = KVPool(srv.address, namespace_for_model(model, k3v2), k3v2)
        assert other.lookup(tok(text).input_ids) == 0  # nothing written in the fallback's namespace
        other.close()
        reader.pool.close()
    finally:
        srv.stop()
