"""One vLLM engine (CPU build) in its own process, driven over stdin/stdout with JSON lines.

Child:  python tests/vllm_engine.py '{"model": DIR, "name": SERVED_NAME,
                                      "kvpool": {extra config} | "example_connector": DIR | none,
                                      "prefix_caching": bool}'
    -> {"ready": true}
    <- {"op": "generate", "prompts": [[ids], ...], "max_tokens": 16}
    -> {"outputs": [[ids], ...], "seconds": s, "connector": {counter: delta}}
    <- {"op": "flush"}  (wait for the kvpool connector's saves in flight)
    -> {"flushed": true, "bytes_put": n}
Parent: `Engine(spec, log)` starts and drives one.

The tests start each engine once (fixtures) and share it; `benchmarks/vllm_ttft.py` starts a
fresh one per measurement. The connector is the real `kvpool.vllm.KVPoolConnector`, loaded by
vLLM from its module path; with VLLM_ENABLE_V1_MULTIPROCESSING=0 it lives in the child process
itself, which is how the child reads its counters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any


def engine_env() -> dict[str, str]:
    """The environment of an engine process: the settings that make vLLM's CPU build fast here."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # vLLM's CPU build runs no Triton
    cores = max(1, len(os.sched_getaffinity(0)))
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}", HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    return env


class Engine:
    """The parent side: one engine process."""

    def __init__(self, spec: dict[str, Any], log: IO[str], max_tokens: int = 16) -> None:
        self.log, self.max_tokens = log, max_tokens
        self.proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True, env=engine_env(),
        )  # fmt: skip

    def _send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cmd:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.flush()
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"vLLM engine exited:\n{tail}")
            if line.startswith("{"):
                return dict(json.loads(line))

    def ready(self) -> None:
        assert self._send({}).get("ready")

    def generate(self, *prompts: list[int], max_tokens: int | None = None) -> dict[str, Any]:
        """{"tokens": the first prompt's generation, "outputs": all, "seconds": the call's
        time, "connector": what the kvpool connector counted meanwhile}"""
        n = max_tokens or self.max_tokens
        reply = self._send({"op": "generate", "prompts": list(prompts), "max_tokens": n})
        reply["tokens"] = reply["outputs"][0]
        return reply

    def flush(self) -> dict[str, Any]:
        return self._send({"op": "flush"})

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- the child ----------------------------------------------------------------------------


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
        model=spec["model"], served_model_name=spec.get("name"), dtype="float32",
        enforce_eager=True, max_model_len=4096, max_num_batched_tokens=4096,
        enable_prefix_caching=bool(spec.get("prefix_caching", True)),
        kv_transfer_config=transfer,
    )  # fmt: skip


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy generations of a batch of prompts, and the seconds the call took."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in out], time.perf_counter() - t0


def main() -> None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    llm = make_llm(json.loads(sys.argv[1]))
    conn: Any = get_kv_transfer_group() if has_kv_transfer_group() else None
    totals = getattr(conn, "totals", None)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        before = dict(totals.data) if totals is not None else {}
        reply: dict[str, Any] = {}
        if cmd["op"] == "generate":
            reply["outputs"], reply["seconds"] = generate(llm, cmd["prompts"], cmd["max_tokens"])
        elif cmd["op"] == "flush" and totals is not None:
            reply["flushed"] = conn.wait_for_pending_saves()
            reply["bytes_put"] = conn.pool.stats.bytes_put
        if totals is not None:
            reply["connector"] = {k: v - before.get(k, 0) for k, v in totals.data.items()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
