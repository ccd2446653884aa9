"""One vLLM engine (CPU build) in its own process, driven over stdin/stdout with JSON lines.

    python tests/vllm_engine.py '{"model": DIR, "kvpool": {...extra config...} | null,
                                  "prefix_caching": false}'
    -> {"ready": true}
    <- {"op": "generate", "prompts": [[ids], ...], "max_tokens": 16}
    -> {"outputs": [[ids], ...], "seconds": s, "connector": {counter: delta}}
    <- {"op": "flush"}   (wait for the connector's saves in flight)

Tests start each engine once (fixtures) and share it; the benchmark starts a fresh one per
measurement. The connector is the real `kvpool.vllm.KVPoolConnector`, loaded by vLLM from its
module path; with VLLM_ENABLE_V1_MULTIPROCESSING=0 it lives in this process, which is how the
driver reads its counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SETTINGS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": f"0-{max(0, (os.cpu_count() or 1) - 1)}",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def make_llm(spec: dict[str, Any]) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if spec.get("kvpool") is not None:
        transfer = KVTransferConfig(
            kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute",
            kv_connector_extra_config=spec["kvpool"],
        )  # fmt: skip
    elif spec.get("example_connector") is not None:
        transfer = KVTransferConfig(
            kv_connector="ExampleConnector", kv_role="kv_both",
            kv_connector_extra_config={"shared_storage_path": spec["example_connector"]},
        )  # fmt: skip
    return LLM(
        model=spec["model"], dtype="float32", enforce_eager=True, max_model_len=4096,
        enable_prefix_caching=bool(spec.get("prefix_caching", False)),
        kv_transfer_config=transfer, served_model_name=spec.get("name"),
        max_num_batched_tokens=spec.get("max_num_batched_tokens", 4096),
    )  # fmt: skip


def connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy generations of a batch of prompts, and the seconds the call took."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], time.perf_counter() - t0


def main() -> None:
    spec = json.loads(sys.argv[1])
    for name, value in SETTINGS.items():
        os.environ.setdefault(name, value)
    llm = make_llm(spec)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        conn = connector()
        before = dict(conn.totals.data) if hasattr(conn, "totals") else {}
        reply: dict[str, Any] = {}
        if cmd["op"] == "generate":
            reply["outputs"], reply["seconds"] = generate(llm, cmd["prompts"], cmd["max_tokens"])
        elif cmd["op"] == "flush" and hasattr(conn, "wait_for_pending_saves"):
            reply["flushed"] = conn.wait_for_pending_saves()
        if hasattr(conn, "totals"):
            after = conn.totals.data
            reply["connector"] = {k: after[k] - before.get(k, 0) for k in after}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
