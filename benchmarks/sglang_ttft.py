"""Time to first token of an SGLang server (GPU) whose HiCache L3 is kvpool, against HiCache's
file backend and against no L3, in one run.

    python benchmarks/sglang_ttft.py [--model MODEL_DIR] [--tokens 2048] [--prompts 4]

For a GPU machine where SGLang (its CUDA build) and kvpool are installed in this Python; it
installs nothing. One `kvpool serve` tier, then three SGLang servers in turn (`--page-size 64
--enable-hierarchical-cache`, nothing else changed): no storage backend, `file` (a temporary
folder), and `dynamic` with `kvpool.sglang.KVPoolStorage`. Each server gets every prompt once
(the prefill, whose KV HiCache backs up to host and L3), then `/flush_cache` (GPU and host
caches emptied; L3 keeps what it has), a wait for the backups to settle, and every prompt
again: the time of that second request (one output token, greedy) is its time to first token,
the median over the prompts. Without L3 the second request prefills again: the baseline.

Last line: one JSON object with `none_ttft_s`, `file_ttft_s`, `kvpool_ttft_s`, the speedups over
no L3, `file_bytes` (what the file backend holds afterwards), the GPU's name, and the SGLang
version.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from store import KVPoolTier  # noqa: E402  (benchmarks/)

PAGE = 64
SETTLE_S = 20.0  # backups to host and L3 run behind the requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out: dict[str, Any] = json.loads(r.read() or b"{}")
        return out


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SGLang server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise RuntimeError("the SGLang server did not become ready")


def run_server(model: str, storage: list[str], prompts: list[list[int]], log: Any) -> list[float]:
    """Start one server, send each prompt, flush, send each again; the second round's times."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", model,
        "--port", str(port), "--host", "127.0.0.1", "--page-size", str(PAGE),
        "--enable-hierarchical-cache", *storage,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        params = {"max_new_tokens": 1, "temperature": 0.0}
        post(f"{url}/generate", {"input_ids": [1, 2, 3], "sampling_params": params})  # warm
        for ids in prompts:
            post(f"{url}/generate", {"input_ids": ids, "sampling_params": params})
        time.sleep(SETTLE_S)
        post(f"{url}/flush_cache", {})
        time.sleep(SETTLE_S)
        times = []
        for ids in prompts:
            t0 = time.perf_counter()
            post(f"{url}/generate", {"input_ids": ids, "sampling_params": params})
            times.append(time.perf_counter() - t0)
        return times
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="", help="model folder; default: SmolLM2-135M-Instruct")
    p.add_argument("--model-name", default="", help="kvpool's model name; default: --model")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--prompts", type=int, default=4)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sglang
    import torch
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():
        sys.exit("sglang_ttft.py needs a CUDA GPU (SGLang's server does not run on this CPU)")
    sys.path.insert(0, str(ROOT))
    from kvpool.models import SMOLLM2, smollm2_path

    model = args.model or str(smollm2_path().resolve())
    name = args.model_name or (SMOLLM2 if not args.model else args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    names = sorted(topics, key=lambda t: -len(topics[t]))[: args.prompts]
    prompts = [list(tokenizer(topics[t]).input_ids[: args.tokens]) for t in names]
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "servers.log", "w+") as log:
        files = Path(tmp) / "hicache"
        files.mkdir()
        with KVPoolTier(shards=2, budget="4GiB") as tier:
            extra = {
                "backend_name": "kvpool", "module_path": "kvpool.sglang",
                "class_name": "KVPoolStorage", "interface_v1": 1, "endpoint": tier.endpoint,
                "model_path": model, "model_name": name,
            }  # fmt: skip
            os.environ["SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR"] = str(files)
            dynamic = ["--hicache-storage-backend", "dynamic",
                       "--hicache-storage-backend-extra-config", json.dumps(extra)]  # fmt: skip
            runs = {
                "none": run_server(model, [], prompts, log),
                "file": run_server(model, ["--hicache-storage-backend", "file"], prompts, log),
                "kvpool": run_server(model, dynamic, prompts, log),
            }
        file_bytes = sum(f.stat().st_size for f in files.rglob("*") if f.is_file())
    ttft = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({
        "tokens": args.tokens, "prompts": len(prompts), "page_tokens": PAGE,
        "none_ttft_s": round(ttft["none"], 4), "file_ttft_s": round(ttft["file"], 4),
        "kvpool_ttft_s": round(ttft["kvpool"], 4),
        "file_speedup": round(ttft["none"] / ttft["file"], 2),
        "kvpool_speedup": round(ttft["none"] / ttft["kvpool"], 2),
        "file_bytes": file_bytes, "gpu": torch.cuda.get_device_name(0),
        "sglang": sglang.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
