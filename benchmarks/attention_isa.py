"""One decode step of one SmolLM2-shaped attention layer on the CPU: the packed C loop built for
each x86-64 level against torch SDPA over an fp32 cache, in one process, calls interleaved.

    python benchmarks/attention_isa.py                          # x86-64-v4 and v3 loops
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/attention_isa.py --isas x86-64-v3   # AVX2 torch

Layer: 3 kv heads, 9 query heads, head_dim 64, one query token, 4,096 packed tokens (RoPE theta
100000 on all of head_dim), 4 exact sinks and an exact window of 256 rows beside them (what a
PackedCache's decode step attends to); SDPA attends to 4,356 fp32 rows. Random keys and values
(timing does not depend on them), encoded as blocks:
  v1      K3V2 KIVI layout, G = 128, pre-RoPE keys, Hadamard values
  v2_n64  keys in a random orthonormal basis at 2 bits, all 64 components stored
  v2_n40  the same basis at widths 4,3,3,2,2 and the last 24 components dropped (40 stored)
The C loop runs at each level of --isas (`cpu_attention.use_isa`); torch runs at whatever
ATEN_CPU_CAPABILITY gives (reported). One thread each (torch.set_num_threads(1)). Times are
medians of this thread's CPU time (time.thread_time: a loaded machine's waits are not counted),
calls of all configurations interleaved. The figure is each loop's time over SDPA's. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kvpool.kernels import cpu_attention
from kvpool.kernels.basis import KeyBasis
from kvpool.kernels.codec import CodecConfig, encode, verified_payload
from kvpool.kernels.packed_kv import block_layer
from kvpool.kernels.transforms import RopeParams

HEADS, Q_HEADS, DIM, TOKENS = 3, 9, 64, 4096


def codecs() -> dict[str, CodecConfig]:
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(1, HEADS, DIM, DIM, generator=g))
    mean = torch.randn(1, HEADS, DIM, generator=g)
    common: dict[str, Any] = dict(
        rope=RopeParams(100000.0, DIM), hadamard_values=True, sink_tokens=4, value_bits=2
    )
    return {
        "v1": CodecConfig(key_bits=3, **common),
        "v2_n64": CodecConfig(key_basis=KeyBasis(mean, rotation, (2,) * 8), **common),
        "v2_n40": CodecConfig(
            key_basis=KeyBasis(mean, rotation, (4, 3, 3, 2, 2, 0, 0, 0)), **common
        ),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, HEADS, TOKENS, DIM, generator=g) * 2
    v = torch.randn(1, HEADS, TOKENS, DIM, generator=g)
    q = torch.randn(1, Q_HEADS, 1, DIM, generator=g) * 0.1
    sinks, window = ([torch.randn(1, HEADS, n, DIM, generator=g) for _ in "kv"] for n in (4, 256))
    exact = [(sinks[0], sinks[1], 0), (window[0], window[1], 1)]
    full = [torch.randn(1, HEADS, TOKENS + 260, DIM, generator=g) for _ in "kv"]
    calls: dict[str, Callable[[], Any]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(
            q, full[0], full[1], scale=1.0, enable_gqa=True
        )
    }
    for name, codec in codecs().items():
        blob = encode(k, v, codec)
        kv = block_layer(*verified_payload(blob, key_basis=codec.key_basis), 0, codec.key_basis)
        for isa in args.isas:

            def call(kv: Any = kv, isa: str = isa) -> Any:
                cpu_attention.use_isa(isa)
                return cpu_attention.packed_attention(q, kv, 4, exact)

            calls[f"{name}_{isa}"] = call
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeat):
        for name, fn in calls.items():
            start = time.thread_time()
            fn()
            times[name].append((time.thread_time() - start) * 1e3)
    cpu_attention.use_isa(cpu_attention.ISA)
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, t in ms.items():
        print(f"{name:<20} {t:8.3f} ms  {t / ms['sdpa']:5.2f}x SDPA")
    return {
        "ms": ms, "vs_sdpa": {n: t / ms["sdpa"] for n, t in ms.items() if n != "sdpa"},
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "repeat": args.repeat, "load_avg": os.getloadavg()[0],
    }  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--isas", nargs="*", default=["x86-64-v4", "x86-64-v3"])
    p.add_argument("--repeat", type=int, default=40, help="calls per median")
    print(json.dumps(main(p.parse_args())))
