"""kvpool as SGLang's HiCache storage backend against SGLang's own HiCacheFile, on this CPU, and
blocks shared across engines (vLLM's connector <-> the SGLang backend), in one run.

    .venv/bin/python benchmarks/sglang_storage.py [--tokens 2048] [--page 64] [--repeats 3]

A 2,048-token prompt (the Python manual), its real SmolLM2-135M KV (fp32, transformers),
laid into SGLang's real host pool (MHATokenToKVPoolHost, page_first) as pages of `--page`
tokens with SGLang's own page keys (its C++ hash). The same pages are then
- backed up and loaded back through kvpool's backend (`kvpool.sglang.KVPoolStorage`, made by
  SGLang's factory, batch_set_v1 / batch_exists + batch_get_v1 as its cache controller calls
  them, in its 128-page batches) on a real `kvpool serve` tier, and
- through SGLang's `HiCacheFile` (its generic page path: get_data_page + batch_set, batch_get +
  set_from_flat_data_page), into a temporary folder.
Times are the median of `--repeats` (each repeat a fresh salt / folder); bytes are what each
stored (kvpool: block bytes put; file: bytes on disk). kvpool's loaded pages are checked to be
the codec's output (the backend verifies each block), the file's to be exact.

Cross-engine: a vLLM engine (CPU build, the kvpool connector with its defaults) prefills
prompt A and saves it; the SGLang backend, in the same namespace (same model name, codec and
page size), looks A's pages up by SGLang's keys and loads them. Then the SGLang backend stores
prompt B's pages, and a fresh vLLM engine given B loads them (the connector's tokens_loaded).
`cross_engine_pages` counts the pages asked both ways, `cross_engine_hits` those found.

SGLang runs in `.venv-sglang` (it must not share vLLM's venv): this script re-runs itself there
for the SGLang part. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = ROOT / ".venv-sglang" / "bin" / "python"
TOPICS = ("compound", "execmodel")  # prompt A, prompt B


# ---- the SGLang part (in .venv-sglang) --------------------------------------------------------


def sglang_part(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from sglang.srt.mem_cache.hicache_storage import (
        STORAGE_BATCH_SIZE,
        HiCacheFile,
        HiCacheStorageConfig,
        HiCacheStorageExtraInfo,
    )
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from sglang.srt.mem_cache.utils import get_hash_str

    from kvpool.sglang import page_kv

    data = torch.load(spec["data"])
    page: int = spec["page"]
    _, layers, heads, tokens, dim = (int(x) for x in data["kv_a"].shape)  # [2, L, H, T, D]
    device = MHATokenToKVPool(
        size=4 * tokens, page_size=page, dtype=torch.float32, head_num=heads, head_dim=dim,
        layer_num=layers, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    host = MHATokenToKVPoolHost(
        device._mha_buffer_info(), host_to_device_ratio=1.0, host_size=0, page_size=page,
        layout="page_first", pin_memory=False, device="cpu", device_capacity_tokens=4 * tokens,
        start_layer=0, end_layer=layers,
    )  # fmt: skip

    def config(extra: dict[str, Any]) -> HiCacheStorageConfig:
        return HiCacheStorageConfig(
            tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
            is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
            model_name=spec["model_name"], extra_config=extra,
        )  # fmt: skip

    def kvpool_backend(salt: str) -> Any:
        extra = {
            "backend_name": "kvpool", "module_path": "kvpool.sglang",
            "class_name": "KVPoolStorage", "interface_v1": 1, "endpoint": spec["endpoint"],
            "model_path": spec["model_path"], "salt": salt,
        }  # fmt: skip
        store = StorageBackendFactory.create_backend("dynamic", config(extra), host)
        store.register_mem_pool_host(host)
        return store

    def lay(kv: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, list[str]]:
        """Pages of kv [2, L, H, T, D] into fresh host slots; their slots and SGLang's keys."""
        slots = host.alloc(kv.shape[3])
        for i in range(0, kv.shape[3], page):
            page_kv(host, int(slots[i])).copy_(kv[..., i : i + page, :])
        return slots, list(get_hash_str(ids[: kv.shape[3]], None, page_size=page))

    def read(slots: torch.Tensor) -> torch.Tensor:
        return torch.cat([page_kv(host, int(slots[i])) for i in range(0, len(slots), page)], 3)

    def batches(keys: list[str], slots: torch.Tensor) -> list[tuple[list[str], Any, Any]]:
        """SGLang's storage batches: (keys, their slots, extra info with the prefix keys)."""
        out = []
        for i in range(0, len(keys), STORAGE_BATCH_SIZE):
            k = keys[i : i + STORAGE_BATCH_SIZE]
            s = slots[i * page : (i + len(k)) * page]
            out.append((k, s, HiCacheStorageExtraInfo(prefix_keys=keys[:i])))
        return out

    kv_a = data["kv_a"]
    slots, keys = lay(kv_a, data["tokens_a"])
    n_pages = len(keys)
    runs: dict[str, list[float]] = {k: [] for k in ("kv_set", "kv_get", "f_set", "f_get")}
    kvpool_bytes = file_bytes = 0
    kvpool_loaded = file_exact = True
    for r in range(spec["repeats"]):
        # kvpool
        store = kvpool_backend(f"bench-{os.getpid()}-{r}")
        t0 = time.perf_counter()
        ok = [x for k, s, i in batches(keys, slots) for x in store.batch_set_v1(k, s, i)]
        runs["kv_set"].append(time.perf_counter() - t0)
        assert all(ok)
        kvpool_bytes = store.pool.stats.bytes_put
        into = host.alloc(tokens)
        t0 = time.perf_counter()
        got = []
        for k, s, i in batches(keys, into):
            if store.batch_exists(k, i) < len(k):
                break
            got += store.batch_get_v1(k, s, i)
        runs["kv_get"].append(time.perf_counter() - t0)
        kvpool_loaded &= sum(got) == n_pages and bool(torch.isfinite(read(into)).all())
        host.free(into)
        store.close()
        # HiCacheFile, SGLang's generic page path
        with tempfile.TemporaryDirectory() as d:
            files = HiCacheFile(config({}), file_path=d)
            t0 = time.perf_counter()
            values = [host.get_data_page(int(s[0])) for _, ss, _ in batches(keys, slots)
                      for s in ss.split(page)]  # fmt: skip
            assert files.batch_set(keys, values)
            runs["f_set"].append(time.perf_counter() - t0)
            file_bytes = sum(f.stat().st_size for f in Path(d).rglob("*.bin"))
            into = host.alloc(tokens)
            t0 = time.perf_counter()
            dummies = [host.get_dummy_flat_data_page() for _ in keys]
            pages = files.batch_get(keys, dummies)
            for j, p in enumerate(pages):
                assert p is not None
                host.set_from_flat_data_page(int(into[j * page]), p)
            runs["f_get"].append(time.perf_counter() - t0)
            file_exact &= torch.equal(read(into), kv_a)
            host.free(into)
    # cross-engine: A was stored by vLLM's connector; B goes the other way
    shared = kvpool_backend("")
    hits_a = 0
    into = host.alloc(tokens)
    for k, s, i in batches(keys, into):
        found = shared.batch_exists(k, i)
        hits_a += sum(shared.batch_get_v1(k[:found], s[: found * page], i)) if found else 0
        if found < len(k):
            break
    slots_b, keys_b = lay(data["kv_b"], data["tokens_b"])
    stored_b = [x for k, s, i in batches(keys_b, slots_b) for x in shared.batch_set_v1(k, s, i)]
    shared.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "pages": n_pages, "kvpool_set_s": med["kv_set"], "kvpool_get_s": med["kv_get"],
        "file_set_s": med["f_set"], "file_get_s": med["f_get"], "kvpool_bytes": kvpool_bytes,
        "file_bytes": file_bytes, "kvpool_loaded_all": kvpool_loaded, "file_exact": file_exact,
        "vllm_to_sglang_pages": n_pages, "vllm_to_sglang_hits": hits_a,
        "sglang_stored_b": sum(stored_b),
    }  # fmt: skip


# ---- the driver (in .venv, with vLLM and transformers) ----------------------------------------


def real_kv(model: Any, ids: list[int]) -> Any:
    """SmolLM2's KV of `ids` as its cache holds it: [2, layers, kv_heads, T, head_dim] fp32."""
    import torch

    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    k = torch.stack([layer.keys[0] for layer in cache.layers])
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return torch.stack((k, v)).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--page", type=int, default=64, help="SGLang's --page-size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sglang-part", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sglang_part:
        print(json.dumps(sglang_part(json.loads(args.sglang_part))), flush=True)
        return
    if not SGLANG_PYTHON.exists():
        sys.exit(f"{SGLANG_PYTHON} is missing: run .ci/setup.sh")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from store import KVPoolTier
    from transformers import AutoTokenizer

    from kvpool.models import SMOLLM2, load, smollm2_path
    from tests.vllm_engine import Engine

    model_dir = str(smollm2_path().resolve())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tokenizer(topics[t]).input_ids[: args.tokens + 1]) for t in TOPICS]
    assert all(len(x) == args.tokens + 1 for x in prompts)
    model, _ = load()
    kv = [real_kv(model, x[: args.tokens]) for x in prompts]
    del model
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "engine.log", "w+") as log:
        data = Path(tmp) / "prompts.pt"
        torch.save({"tokens_a": prompts[0], "tokens_b": prompts[1], "kv_a": kv[0],
                    "kv_b": kv[1]}, data)  # fmt: skip
        with KVPoolTier(shards=2, budget="512MiB") as tier:
            spec = {"model": model_dir, "name": SMOLLM2, "kvpool": {"endpoint": tier.endpoint}}
            engine = Engine(spec, log)  # vLLM with the kvpool connector, its defaults
            try:
                engine.ready()
                engine.generate(prompts[0], max_tokens=1)
                engine.flush()
            finally:
                engine.stop()
            part = {"data": str(data), "endpoint": tier.endpoint, "page": args.page,
                    "repeats": args.repeats, "model_name": SMOLLM2,
                    "model_path": model_dir}  # fmt: skip
            out = subprocess.run(
                [str(SGLANG_PYTHON), __file__, "--sglang-part", json.dumps(part)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if out.returncode:
                sys.exit(f"the SGLang part failed:\n{out.stderr[-4000:]}")
            sgl = json.loads(out.stdout.strip().splitlines()[-1])
            engine = Engine(spec, log)  # a fresh engine: nothing of B in vLLM's own cache
            try:
                engine.ready()
                loaded = engine.generate(prompts[1], max_tokens=1)["connector"]
            finally:
                engine.stop()
    hits_b = loaded.get("tokens_loaded", 0) // args.page
    result = {
        "kvpool_set_s": round(sgl["kvpool_set_s"], 4),
        "kvpool_get_s": round(sgl["kvpool_get_s"], 4),
        "file_set_s": round(sgl["file_set_s"], 4),
        "file_get_s": round(sgl["file_get_s"], 4),
        "kvpool_bytes": sgl["kvpool_bytes"],
        "file_bytes": sgl["file_bytes"],
        "bytes_ratio": round(sgl["file_bytes"] / max(1, sgl["kvpool_bytes"]), 2),
        "pages": sgl["pages"],
        "page_tokens": args.page,
        "cross_engine_pages": 2 * sgl["pages"],
        "cross_engine_hits": sgl["vllm_to_sglang_hits"] + hits_b,
        "vllm_to_sglang_hits": sgl["vllm_to_sglang_hits"],
        "sglang_to_vllm_hits": hits_b,
        "kvpool_loaded_all": sgl["kvpool_loaded_all"],
        "file_exact": sgl["file_exact"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
