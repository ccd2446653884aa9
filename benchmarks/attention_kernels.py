"""One decode step of one attention layer over a packed prefix: the fused Triton kernel against
dequantize-then-attend and against fp16 attention over a full-precision cache.

    python benchmarks/attention_kernels.py                     # on a CUDA machine
    python benchmarks/attention_kernels.py --device cpu --tiny # a small smoke run anywhere

Layer: Llama-3-8B-shaped (8 kv heads, 32 query heads, head_dim 128), one query token per
sequence, batch 1 and 16, contexts of 4K, 16K and 64K packed tokens. Codec: 2-bit keys and
values, G = Gv = 128, pre-RoPE keys (theta 500000, RoPE redone at each row's position) and
Hadamard-rotated values; codes are random bytes, scales and minimums random (timing does not
depend on the values).

  fp16 sdpa      torch scaled_dot_product_attention over fp16 K/V [B, 8, T, 128] (the 4 query
                 heads of a kv head folded into its query rows: no K/V repeat), what attending
                 an uncompressed cache costs
  dequant+sdpa   kernels.attention.dequantize (torch: unpack, scale, RoPE, Hadamard; fp32)
                 then fp16 SDPA: expanding the packed cache each step
  fused_<dot>    kernels.triton_attention.packed_attention with each way of computing the
                 products (--dots: fma, ieee, tf32): the codes read in place, flash-decoding
                 splits (the default number; --splits adds fused_<dot>_s<n> columns)

Times are the median of triton.testing.do_bench (CUDA) or of --repeat calls (CPU), in ms;
GB/s counts the bytes each path must read (packed rows, or fp16 K/V). max_diff: the fused
output's largest difference from dequant+sdpa (fp16 SDPA rounding included). On the CPU the
fused column is the C loop (kernels.cpu_attention.packed_attention);
with TRITON_INTERPRET=1 the Triton variants run too (interpreted: a smoke test, not a timing).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpool.kernels import attention, env
from kvpool.kernels.packed_kv import PackedKV
from kvpool.kernels.transforms import RopeParams

LLAMA3_8B = dict(heads=8, q_heads=32, dim=128, group=128)
TINY = dict(heads=2, q_heads=8, dim=64, group=64)
THETA = 500000.0
BITS = 2


def packed_layer(batch: int, tokens: int, shape: dict[str, int], device: torch.device) -> PackedKV:
    """Random codes and group parameters in the packed layout (kernels/attention.py)."""
    h, d, g = shape["heads"], shape["dim"], shape["group"]
    gen = torch.Generator(device=device).manual_seed(0)

    def codes() -> Tensor:
        return torch.randint(0, 256, (batch, h, tokens, d * BITS // 8), dtype=torch.uint8,
                             device=device, generator=gen)  # fmt: skip

    def params(rows: int, cols: int, lo: float, hi: float) -> Tensor:
        x = torch.rand(batch, h, rows, cols, device=device, generator=gen)
        return (x * (hi - lo) + lo).half()

    return PackedKV(
        codes(), params(tokens // g, d, 0.2, 0.6), params(tokens // g, d, -1.0, -0.5),
        codes(), params(tokens, d // g, 0.02, 0.06), params(tokens, d // g, -0.1, 0.0),
        BITS, BITS, g, g, tokens, d, RopeParams(THETA, d), True,
    )  # fmt: skip


def timer(device: torch.device, repeat: int) -> Callable[[Callable[[], Any]], float]:
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_time(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_time


def sdpa(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """q [B, Hq, 1, D] over K/V [B, H, T, D]: each kv head's R query heads as its query rows."""
    b, hq, nq, d = q.shape
    h = keys.shape[1]
    out = F.scaled_dot_product_attention(
        q.reshape(b, h, hq // h * nq, d), keys, values, scale=1.0
    )  # q is pre-scaled
    return out.view(b, hq, nq, d)


def fp16_attention(bench: Callable[[Callable[[], Any]], float], q: Tensor, kv: PackedKV,
                   dtype: torch.dtype) -> float:  # fmt: skip
    """ms of SDPA over a full-precision cache shaped like kv's rows (freed on return)."""
    keys = torch.randn(kv.batch, kv.heads, kv.tokens, kv.head_dim, device=q.device, dtype=dtype)
    values = torch.randn_like(keys)
    return bench(lambda: sdpa(q, keys, values))


def cell(
    batch: int, tokens: int, shape: dict[str, int], device: torch.device, repeat: int,
    dots: list[str], splits: list[int | None],
) -> dict[str, Any]:  # fmt: skip
    bench = timer(device, repeat)
    half = torch.float16 if device.type == "cuda" else torch.float32
    kv = packed_layer(batch, tokens, shape, device)
    q = torch.randn(batch, shape["q_heads"], 1, shape["dim"], device=device) / shape["dim"] ** 0.5
    row: dict[str, Any] = {"batch": batch, "tokens": tokens, "packed_bytes": kv.nbytes}
    full_bytes = 2 * batch * shape["heads"] * tokens * shape["dim"] * 2

    qh = q.to(half)
    row["fp16_sdpa_ms"] = fp16_attention(bench, qh, kv, half)
    row["fp16_sdpa_GBs"] = full_bytes / row["fp16_sdpa_ms"] / 1e6

    def dequant_then_attend() -> Tensor:
        k, v = attention.dequantize(kv)
        return sdpa(qh, k.to(half), v.to(half))

    try:
        row["dequant_sdpa_ms"] = bench(dequant_then_attend)
        expected: Tensor | None = dequant_then_attend().float()
    except torch.OutOfMemoryError:
        row["dequant_sdpa_ms"], expected = None, None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    fused: dict[str, Callable[[], tuple[Tensor, Tensor]]] = {}
    if device.type == "cuda" or env.TRITON_INTERPRET:
        from kvpool.kernels import triton_attention

        for dot in dots:
            for n in splits:
                name = dot if n is None else f"{dot}_s{n}"
                fused[name] = functools.partial(
                    triton_attention.packed_attention, q, kv, 0, splits=n, dot=dot
                )
    if device.type == "cpu":
        fused["cpu"] = lambda: attention.packed_attention(q, kv, 0, backend="cpu")
    for name, fn in fused.items():
        ms = bench(fn)
        row[f"fused_{name}_ms"] = ms
        row[f"fused_{name}_GBs"] = kv.nbytes / ms / 1e6
        if expected is not None:
            row[f"fused_{name}_max_diff"] = float((fn()[0] - expected).abs().max())
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shape = TINY if args.tiny else LLAMA3_8B
    contexts = args.contexts or ([256, 512] if args.tiny else [4096, 16384, 65536])
    batches = args.batches or ([1, 2] if args.tiny else [1, 16])
    splits: list[int | None] = [None, *args.splits]
    rows = []
    for batch in batches:
        for tokens in contexts:
            rows.append(cell(batch, tokens, shape, device, args.repeat, args.dots, splits))
            print_row(rows[-1], header=len(rows) == 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "shape": shape, "bits": BITS, "rope": True, "hadamard": True,
            "rows": rows}  # fmt: skip


def print_row(row: dict[str, Any], header: bool) -> None:
    times = [k for k in row if k.endswith("_ms")]
    if header:
        print(f"{'batch':>5} {'tokens':>7} " + " ".join(f"{k[:-3]:>16}" for k in times))
    cells = " ".join(f"{row[k]:16.3f}" if row[k] is not None else f"{'oom':>16}" for k in times)
    print(f"{row['batch']:5d} {row['tokens']:7d} {cells}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a small layer and short contexts")
    p.add_argument("--contexts", type=int, nargs="*", help="packed tokens per sequence")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--repeat", type=int, default=5, help="CPU timing: calls per median")
    p.add_argument("--dots", nargs="*", default=["fma", "ieee", "tf32"], help="fused variants")
    p.add_argument("--splits", type=int, nargs="*", default=[],
                   help="token splits per kv head to time besides the default")  # fmt: skip
    print(json.dumps(main(p.parse_args())))
