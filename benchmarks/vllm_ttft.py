"""Time to first token inside vLLM (CPU build): full prefill against a kvpool hit, vLLM's own
ExampleConnector hit and vLLM's in-process automatic prefix cache, in one run.

    python benchmarks/vllm_ttft.py                   # a 2,048-token prompt, the connector's defaults
    python benchmarks/vllm_ttft.py --no-basis        # nothing published: the K3V2 fallback
    python benchmarks/vllm_ttft.py --tokens 1024 --key-bits 8 --value-bits 8 --group-size 32

The connector's defaults: once the tier is up, the run does what a new user does once,
`kvpool calibrate --basis --predict --publish ENDPOINT` (a separate process, all its defaults),
and the engines get only the endpoint: each resolves the basis published for the served model
name from the tier (codec v2 with inter-layer prediction). With --no-basis nothing is published
and the connector falls back to K3V2; with bit options the connector is told basis='none'.

Model: SmolLM2-135M-Instruct, fp32, enforce_eager, on this CPU (kvpool.models' converted
folder). Prompt: the first `--tokens` tokens of the Python docs' "compound statements" topic.
Every engine runs in a fresh process (tests/vllm_engine.py) and is warmed up on an unrelated
64-token prompt before anything is timed; TTFT is the wall time of a 1-token generation.

  plain        no connector: prefill_s; then the same prompt again in the same engine: apc_s
               (vLLM's in-process prefix cache, the upper bound for any external cache)
  kvpool       one engine stores the prompt through `kvpool serve` (2 shards on 127.0.0.1),
               a fresh one loads it: kvpool_s, tokens_loaded
  example      vLLM's ExampleConnector (fp32 safetensors on local disk) the same way:
               example_connector_s

kvpool_stored_bytes is what the tier took (encoded blocks, headers included);
example_connector_stored_bytes the size of the ExampleConnector's files. greedy_match: with
the kvpool prefix loaded, the share of `--greedy` positions where the engine picks the plain
engine's greedy token given the plain engine's previous tokens (teacher-forced, one batch);
greedy_prefix: how many free-running greedy tokens are identical. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

from store import KVPoolTier  # benchmarks/, on sys.path as the script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kvpool.models import SMOLLM2, smollm2_path  # noqa: E402
from tests.vllm_engine import Engine  # noqa: E402  (the repository root, added above)

TOPIC = "compound"
WARMUP = list(range(1000, 1064))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_engine(spec: dict[str, Any], log: Any, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A fresh engine process: warm up, then each step ({"prompts", "max_tokens"} or flush)."""
    engine = Engine(spec, log)
    try:
        t0 = time.perf_counter()
        engine.ready()
        started = time.perf_counter() - t0
        engine.generate(WARMUP, max_tokens=1)
        out = []
        for step in steps:
            if step.get("flush"):
                out.append(engine.flush())
            else:
                out.append(engine.generate(*step["prompts"], max_tokens=step["max_tokens"]))
        out[0]["start_s"] = started
        return out
    finally:
        engine.stop()


def publish(endpoint: str) -> dict[str, Any]:
    """`kvpool calibrate --basis --predict --publish ENDPOINT`, and what it published."""
    from kvpool.basis import resolve_basis

    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "kvpool.cli",
        "calibrate",
        "--basis",
        "--predict",
        "--publish",
        endpoint,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    published = resolve_basis(endpoint, SMOLLM2)
    assert published is not None
    return {"command": "kvpool calibrate --basis --predict --publish ENDPOINT",
            "calibrate_and_publish_s": round(seconds, 1), "artifact": published.artifact.hex(),
            "basis_id": published.basis.id.hex(), "options": published.options}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--greedy", type=int, default=32, help="tokens for greedy_match")
    p.add_argument("--key-bits", type=int, default=None, help="default: the connector's")
    p.add_argument("--value-bits", type=int, default=None)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--no-basis", action="store_true", help="publish no key basis (K3V2)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    model = str(smollm2_path().resolve())
    prompt = list(AutoTokenizer.from_pretrained(model)(topics[TOPIC]).input_ids[: args.tokens])
    assert len(prompt) == args.tokens
    once = {"prompts": [prompt], "max_tokens": 1}
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "engines.log", "w+") as log:
        base = {"model": model, "name": SMOLLM2}
        # plain: prefill, then vLLM's own prefix cache; then the greedy reference
        plain = run_engine(
            base, log, [once, once, {"prompts": [prompt], "max_tokens": args.greedy}]
        )
        reference = plain[2]["tokens"]
        with KVPoolTier(shards=2, budget="512MiB") as tier:
            codec: dict[str, Any] = {"endpoint": tier.endpoint}
            for name, value in (("key_bits", args.key_bits), ("value_bits", args.value_bits),
                                ("group_size", args.group_size)):  # fmt: skip
                if value is not None:
                    codec[name], codec["basis"] = value, "none"
            basis = {} if args.no_basis or "basis" in codec else publish(tier.endpoint)
            spec = {**base, "kvpool": codec}
            stored = run_engine(spec, log, [once, {"flush": True}])
            forced = [prompt + reference[:k] for k in range(args.greedy)]
            hit = run_engine(spec, log, [
                once, {"prompts": [prompt], "max_tokens": args.greedy},
                {"prompts": forced, "max_tokens": 1},
            ])  # fmt: skip
        example_dir = Path(tmp) / "example"
        example_dir.mkdir()
        espec = {**base, "example_connector": str(example_dir)}
        run_engine(espec, log, [once])
        example_bytes = folder_bytes(example_dir)
        example = run_engine(espec, log, [once])

    picks = [out[0] for out in hit[2]["outputs"]]
    greedy_match = sum(a == b for a, b in zip(picks, reference, strict=True)) / args.greedy
    free = hit[1]["tokens"]
    prefix = next((i for i, (a, b) in enumerate(zip(free, reference, strict=True)) if a != b),
                  args.greedy)  # fmt: skip
    prefill_s, kvpool_s = plain[0]["seconds"], hit[0]["seconds"]
    example_s, apc_s = example[0]["seconds"], plain[1]["seconds"]
    kv_bytes = stored[1]["bytes_put"]
    result = {
        "model": SMOLLM2, "prompt_tokens": args.tokens, "text": f"pydoc_data.topics.topics[{TOPIC!r}]",
        "codec": {k: v for k, v in codec.items() if k != "endpoint"} or (
            "connector default: codec v2 (predicted), basis from the tier" if basis else
            "connector default, no basis published: K3 V2 G=128, pre-RoPE, Hadamard, 4 sinks"),
        "basis": basis or None,
        "prefill_s": round(prefill_s, 3), "kvpool_s": round(kvpool_s, 3),
        "kvpool_speedup": round(prefill_s / kvpool_s, 2),
        "example_connector_s": round(example_s, 3),
        "example_connector_speedup": round(prefill_s / example_s, 2),
        "apc_s": round(apc_s, 3), "apc_speedup": round(prefill_s / apc_s, 2),
        "tokens_loaded": hit[0]["connector"]["tokens_loaded"],
        "kvpool_load_s": round(hit[0]["connector"]["load_seconds"], 3),
        "kvpool_stored_bytes": kv_bytes, "example_connector_stored_bytes": example_bytes,
        "storage_ratio": round(example_bytes / max(1, kv_bytes), 2),
        "greedy_match": round(greedy_match, 4), "greedy_prefix": prefix,
        "greedy_tokens": args.greedy,
        "store_s": round(stored[0]["seconds"], 3),
        "engine_start_s": round(plain[0]["start_s"], 1),
        "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    print(
        f"prefill {prefill_s:.2f} s | kvpool hit {kvpool_s:.2f} s ({result['kvpool_speedup']}x, "
        f"{result['tokens_loaded']} tokens loaded) | ExampleConnector {example_s:.2f} s | "
        f"APC {apc_s:.2f} s\nstored: kvpool {kv_bytes / 1e6:.1f} MB, ExampleConnector "
        f"{example_bytes / 1e6:.1f} MB ({result['storage_ratio']}x) | greedy match "
        f"{greedy_match:.3f}, identical prefix {prefix}/{args.greedy}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
