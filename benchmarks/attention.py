"""Memory, decode speed and quality of attention straight from packed KV, on this CPU.

    python benchmarks/attention.py                     # 4096-token context, 512 scored tokens
    python benchmarks/attention.py --context 1024 --continuation 128 --steps 8   # a quick look

Model: SmolLM2-135M-Instruct, fp32 (kvpool.models.load). Text: the source of the standard
library's smtplib.py (code and English docstrings), tokens [0, context + continuation); no
calibration, tuning or test reads it. The packed cache's defaults (256 exact recent tokens,
generated tokens packed at K4V4) were chosen on difflib.py, the development text (`--text
difflib`); configparser.py was the first held-out text, scored before the K4V4 fold existed
(benchmarks/results/2026-11-23-attention-*.log). Codec: kvpool.hf.codec_for(model, key_bits,
value_bits): KIVI layout, G = 128, pre-RoPE keys, Hadamard values, 4 sink tokens; default
3-bit keys and 2-bit values. The context is stored as 256-token blocks (encode, as a worker's
put does).

Each configuration runs in its own process (peak_rss_mb is that process's high-water mark;
prefills keep only the last position's logits), then scores the continuation token by token,
as generation would (perplexity of the next token, on its true history):

  dynamic      the model's own fp32 DynamicCache after a prefill of the context
  store        store-and-decode: the blocks decoded into a DynamicCache, the continuation
               run in one forward (exact; the figure the packed cache is held to)
  packed       kvpool.packed.PackedCache of the same blocks as they came (nothing decoded);
               each step attends through the packed kernel; the continuation's own tokens are
               packed (at --fold-bits) 128 at a time once more than `window` + 128 are held
  selective    PackedCache(selection=Selection(keep)) after a prefill of the context: MiniKV's
               request-private selection (heavy hitters by the last 32 queries' attention,
               budgets shrinking with depth) of `keep` (0.5) of the tokens, then packed

  packed_v2    (--v2) PackedCache of the same context as codec v2 blocks: keys in a key basis
               (2.0 bits, no maps; `kvpool calibrate --basis`'s default, calibrated on its
               basis sample, cached under .cache/profiles), values 2-bit Hadamard: each key
               row rebuilt from its components in the C loop at every step

Cache bytes are the most each holds while it scores the continuation (packed: codes, group
parameters, sinks and the exact window of recent tokens; dynamic: keys and values in fp32;
fp16 would halve them, reported as memory_ratio_vs_fp16). peak_rss_mb is the process's
resident high-water mark from just after the model is loaded and run once (model_rss_mb) to
the end. Decode-step times come from one more process that
steps the dynamic, packed and selective caches in turn, in an order rotated from step to step
(`--steps` each, medians), so machine noise falls on all three alike. Prints a table; the last line is one JSON object.

--isas x86-64-v4,x86-64-v3 times the decode steps once per instruction set, each in its own
process: the C loop capped at that level (KVPOOL_CPU_ISA, kernels/env.py) and, below x86-64-v4,
torch's own kernels capped alike (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2,
MKL_ENABLE_INSTRUCTIONS=AVX2): what an AVX2/FMA/F16C CPU without AVX-512 runs, measured on an
AVX-512 one. Each level's packed/dynamic ratio compares caches timed in the same process.
--timing-only skips the quality runs. --threads 1 times every cache on one torch thread (on a
shared, loaded machine a descheduled OpenMP thread stalls each parallel op of a step).
"""

from __future__ import annotations

import argparse
import configparser
import difflib
import inspect
import json
import math
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvpool.hf import cache_from_kv, codec_for, kv_from_cache
from kvpool.kernels.codec import decode, encode, verified_payload
from kvpool.models import load
from kvpool.packed import PackedCache, PackedLayer, Selection, use_packed_attention

BLOCK = 256


def peak_rss_mb(reset: bool = False) -> float:
    """This process's resident high-water mark (VmHWM), in MiB; reset: start it again from the
    present resident size (Linux: clear_refs 5), so that loading the model does not hide what
    comes after."""
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak / 1024


TEXTS = {"smtplib": smtplib, "configparser": configparser, "difflib": difflib}


def tokens(tokenizer: Any, n: int, text: str) -> torch.Tensor:
    ids = tokenizer(inspect.getsource(TEXTS[text])).input_ids
    if len(ids) < n:
        raise SystemExit(f"{text}.py has {len(ids)} tokens, fewer than {n}")
    return torch.tensor([ids[:n]])


def fold_bits(args: argparse.Namespace) -> tuple[int, int] | None:
    """The widths decode steps' tokens are packed at: "4,4", or "codec" for the codec's."""
    if args.fold_bits == "codec":
        return None
    key_bits, value_bits = (int(x) for x in args.fold_bits.split(","))
    return key_bits, value_bits


def cache_bytes(cache: Any) -> int:
    if isinstance(cache, PackedCache):
        return cache.nbytes
    return sum(
        x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values)
    )


def resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@torch.inference_mode()
def steps(
    model: Any, ids: torch.Tensor, cache: Any, start: int, held: int
) -> tuple[torch.Tensor, int]:
    """Logits [n, vocab] of one decode step per token of ids[start:], and the most bytes the
    cache held meanwhile (from `held`, its bytes before the first step)."""
    out = []
    for i in range(start, ids.shape[1]):
        out.append(model(ids[:, i : i + 1], past_key_values=cache).logits[0, -1])
        held = max(held, cache_bytes(cache))
    return torch.stack(out), held


def nll(logits: torch.Tensor, ids: torch.Tensor, start: int) -> float:
    """Mean negative log-likelihood of ids[start + 1:] from logits of positions start..."""
    return float(F.cross_entropy(logits[:-1].float(), ids[0, start + 1 :]))


# the torch capability flags that go with each C loop level below AVX-512 (see the docstring)
TORCH_CAPS = {
    "x86-64-v4": {},
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "x86-64": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
               "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}  # fmt: skip


def v2_codec(model: Any, args: argparse.Namespace) -> Any:
    """Codec v2 without maps: the key basis from `kvpool calibrate --basis`'s defaults."""
    from dataclasses import replace

    from kvpool.kernels.basis import KeyBasis

    basis = KeyBasis.load(Path(args.blocks, "basis.pt"))
    return replace(codec_for(model, key_bits=args.key_bits, value_bits=args.value_bits),
                   key_basis=basis)  # fmt: skip


def build(args: argparse.Namespace, model: Any, tok: Any, kind: str) -> tuple[Any, torch.Tensor]:
    """The cache of `kind` holding the context, and the token ids."""
    ids = tokens(tok, args.context + args.continuation, args.text)
    codec = codec_for(model, key_bits=args.key_bits, value_bits=args.value_bits)
    if kind == "packed_v2":
        codec = v2_codec(model, args)
        folder = Path(args.blocks, "v2")
        v2_cache = PackedCache(model, codec, args.window, fold_bits=fold_bits(args))
        v2_cache.add_blocks(verified_payload(Path(folder, f"{i}.kv").read_bytes(),
                                             key_basis=codec.key_basis)
                            for i in range(args.context // BLOCK))  # fmt: skip
        return v2_cache, ids
    with torch.inference_mode():
        if kind in ("dynamic", "selective"):
            if kind == "dynamic":
                cache: Any = DynamicCache(config=model.config)
            else:
                selection = Selection(keep=args.keep)
                cache = PackedCache(model, codec, args.window, selection, fold_bits(args))
            model(ids[:, : args.context], past_key_values=cache, logits_to_keep=1)
            return cache, ids
        blobs = [Path(args.blocks, f"{i}.kv").read_bytes() for i in range(args.context // BLOCK)]
        if kind == "store":
            rows = [(b.keys, b.values) for b in map(decode, blobs)]
            keys = torch.cat([k for k, _ in rows if k is not None], dim=2)
            values = torch.cat([v for _, v in rows if v is not None], dim=2)
            return cache_from_kv(model, keys, values), ids
        cache = PackedCache(model, codec, args.window, fold_bits=fold_bits(args))
        cache.add_blocks(verified_payload(b) for b in blobs)
        return cache, ids


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this process: its cache, bytes, peak memory and perplexity."""
    model, tok = load()
    use_packed_attention(model)
    with torch.inference_mode():  # touch every weight (they are mapped lazily) before measuring
        model(torch.ones(1, 8, dtype=torch.long), past_key_values=DynamicCache(config=model.config))
    peak_rss_mb(reset=True)
    loaded = resident_mb()
    t0 = time.perf_counter()
    cache, ids = build(args, model, tok, args.child)
    built_s, held = time.perf_counter() - t0, cache_bytes(cache)
    if args.child == "store":  # the continuation is exact: one forward
        with torch.inference_mode():
            logits = model(ids[:, args.context :], past_key_values=cache).logits[0]
    else:
        logits, held = steps(model, ids, cache, args.context, held)
    kept = None
    if isinstance(cache, PackedCache):
        layers = [layer for layer in cache.layers if isinstance(layer, PackedLayer)]
        rows = [sum(p.tokens for p in (layer.packed, layer.recent) if p is not None)
                + (0 if layer.keys is None else layer.keys.shape[2]) for layer in layers]  # fmt: skip
        kept = sum(rows) / len(rows)
    return {"kind": args.child, "cache_bytes": held, "nll": nll(logits, ids, args.context),
            "peak_rss_mb": peak_rss_mb(), "model_rss_mb": loaded, "build_s": built_s,
            "rows_per_layer": kept}  # fmt: skip


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Decode-step times of the dynamic, packed and selective caches, stepped in turn."""
    from kvpool.kernels import cpu_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load()
    use_packed_attention(model)
    kinds = ["dynamic", "packed", "selective"] + (["packed_v2"] if args.v2 else [])
    caches = {kind: build(args, model, tok, kind) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in caches}
    with torch.inference_mode():
        for i in range(args.steps + 2):
            n = len(kinds)
            for kind in kinds[i % n :] + kinds[: i % n]:  # the order rotates from step to step
                cache, ids = caches[kind]
                t0 = time.perf_counter()
                model(ids[:, args.context + i : args.context + i + 1], past_key_values=cache)
                if i >= 2:  # two warm-up steps
                    times[kind].append(time.perf_counter() - t0)
    out: dict[str, Any] = {f"decode_step_ms_{k}": statistics.median(v) * 1e3
                           for k, v in times.items()}  # fmt: skip
    out["isa"] = cpu_attention.ISA
    out["torch_threads"] = torch.get_num_threads()
    out["torch_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def write_blocks(args: argparse.Namespace, folder: str) -> None:
    """The context's blocks, as a worker's put would encode them."""
    model, tok = load()
    ids = tokens(tok, args.context, args.text)
    codec = codec_for(model, key_bits=args.key_bits, value_bits=args.value_bits)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, past_key_values=cache, logits_to_keep=1)
    keys, values = kv_from_cache(cache, args.context)
    for i in range(args.context // BLOCK):
        part = slice(i * BLOCK, (i + 1) * BLOCK)
        blob = encode(keys[:, :, part], values[:, :, part], codec, start_position=i * BLOCK)
        Path(folder, f"{i}.kv").write_bytes(blob)
    if args.v2:  # the same context as v2 blocks, in the default basis
        from dataclasses import replace

        from kvpool import calibrate
        from kvpool.kernels.basis import KeyBasis

        options = argparse.Namespace(group_size=128, key_bits=2.0)
        path = calibrate.basis_path(model.config._name_or_path, options)
        if not path.exists():
            t0 = time.perf_counter()
            calibrate.calibrate_basis(model, calibrate.basis_sample(tok)).save(path)
            print(f"key basis: calibrated in {time.perf_counter() - t0:.0f} s, saved to {path}")
        basis = KeyBasis.load(path)
        basis.save(Path(folder, "basis.pt"))
        Path(folder, "v2").mkdir()
        v2 = replace(codec, key_basis=basis)
        for i in range(args.context // BLOCK):
            part = slice(i * BLOCK, (i + 1) * BLOCK)
            blob = encode(keys[:, :, part], values[:, :, part], v2, start_position=i * BLOCK)
            Path(folder, "v2", f"{i}.kv").write_bytes(blob)


def run_child(
    args: argparse.Namespace, kind: str, folder: str, isa: str | None = None
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", kind, "--blocks", folder, "--context",
            str(args.context), "--continuation", str(args.continuation), "--steps",
            str(args.steps), "--key-bits", str(args.key_bits), "--value-bits",
            str(args.value_bits), "--keep", str(args.keep), "--window", str(args.window),
            "--text", args.text, "--fold-bits", args.fold_bits, "--threads",
            str(args.threads)]  # fmt: skip
    if args.v2:
        argv.append("--v2")
    env = dict(os.environ)
    if isa is not None:  # the C loop and torch capped at this level
        env.update(KVPOOL_CPU_ISA=isa, **TORCH_CAPS[isa])
    done = subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--continuation", type=int, default=512)
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per cache")
    p.add_argument("--key-bits", type=int, default=3)
    p.add_argument("--value-bits", type=int, default=2)
    p.add_argument("--keep", type=float, default=0.5, help="selection: tokens kept")
    p.add_argument("--window", type=int, default=256, help="exact recent tokens")
    p.add_argument("--fold-bits", default="4,4", help='widths of generated tokens, or "codec"')
    p.add_argument(
        "--text",
        default="smtplib",
        choices=list(TEXTS),
        help="difflib: the development text the window and fold widths were chosen on",
    )
    p.add_argument("--v2", action="store_true", help="also a PackedCache of v2 (basis) blocks")
    p.add_argument("--isas", default="", help="time decode steps at each: x86-64-v4,x86-64-v3")
    p.add_argument("--timing-only", action="store_true", help="skip the quality runs")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads in the timing processes (0: torch's default)")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--blocks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.context % BLOCK:
        raise SystemExit(f"--context must be a multiple of {BLOCK}")
    if args.child:
        print(json.dumps(timing(args) if args.child == "timing" else child(args)))
        return
    t0 = time.perf_counter()
    load1 = os.getloadavg()[0]
    isas = [x for x in args.isas.split(",") if x]
    if any(x not in TORCH_CAPS for x in isas):
        raise SystemExit(f"--isas takes {', '.join(TORCH_CAPS)}")
    with tempfile.TemporaryDirectory() as folder:
        write_blocks(args, folder)
        speeds = {isa: run_child(args, "timing", folder, isa) for isa in isas}
        speed = run_child(args, "timing", folder) if not isas else speeds[isas[0]]
        if args.timing_only:
            print(json.dumps(timing_result(args, speeds or {speed["isa"]: speed}, load1, t0)))
            return
        runs = {
            kind: run_child(args, kind, folder)
            for kind in ("dynamic", "store", "packed", "selective")
            + (("packed_v2",) if args.v2 else ())
        }
    base = runs["dynamic"]["nll"]

    def pct(kind: str) -> float:
        return (math.exp(runs[kind]["nll"] - base) - 1) * 100

    print(f"SmolLM2-135M-Instruct, fp32; context {args.context} tokens of {args.text}.py, "
          f"{args.continuation} scored; codec K{args.key_bits}V{args.value_bits} G=128, pre-RoPE, "
          f"Hadamard, 4 sinks; window {args.window}; generated tokens at {args.fold_bits}; "
          f"selection keeps {args.keep}")  # fmt: skip
    print(f"{'cache':<10} {'bytes':>12} {'ratio':>7} {'ppl':>8} {'ppl +%':>7} {'rows/layer':>10} "
          f"{'peak RSS MB':>11} {'step ms':>8}")  # fmt: skip
    dyn = runs["dynamic"]["cache_bytes"]
    for kind, r in runs.items():
        step = speed.get(f"decode_step_ms_{kind}")
        rows = r["rows_per_layer"]
        print(f"{kind:<10} {r['cache_bytes']:>12,} {dyn / r['cache_bytes']:>7.2f} "
              f"{math.exp(r['nll']):>8.4f} {pct(kind):>7.2f} "
              f"{'' if rows is None else f'{rows:.0f}':>10} {r['peak_rss_mb']:>11.0f} "
              f"{'' if step is None else f'{step:.1f}':>8}")  # fmt: skip
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "text": f"{args.text}.py",
        "context_tokens": args.context,
        "continuation_tokens": args.continuation,
        "codec": f"K{args.key_bits}V{args.value_bits} G=128 pre-RoPE Hadamard 4 sinks",
        "window": args.window, "fold_bits": args.fold_bits, "keep": args.keep,
        "base_ppl": math.exp(base),
        "dynamic_cache_bytes": dyn, "packed_cache_bytes": runs["packed"]["cache_bytes"],
        "memory_ratio": dyn / runs["packed"]["cache_bytes"],
        "memory_ratio_vs_fp16": dyn / 2 / runs["packed"]["cache_bytes"],
        "selective_cache_bytes": runs["selective"]["cache_bytes"],
        "selective_memory_ratio": dyn / runs["selective"]["cache_bytes"],
        "ppl_increase_pct_store_decode": pct("store"),
        "ppl_increase_pct_packed": pct("packed"),
        "ppl_increase_pct_selective": pct("selective"),
        "peak_rss_mb": {k: r["peak_rss_mb"] for k, r in runs.items()},
        "model_rss_mb": runs["dynamic"]["model_rss_mb"],
        **speed,
        **({"ppl_increase_pct_packed_v2": pct("packed_v2"),
            "packed_v2_cache_bytes": runs["packed_v2"]["cache_bytes"]} if args.v2 else {}),
        **{k: v for k, v in timing_result(args, speeds, load1, t0).items() if k.startswith("by_")},
        "load_avg_start_end": [load1, os.getloadavg()[0]], "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    print(json.dumps(result))


def timing_result(
    args: argparse.Namespace, speeds: dict[str, dict[str, Any]], load1: float, t0: float
) -> dict[str, Any]:
    """Decode-step times per instruction set, and each packed cache's ratio to the
    DynamicCache's timed in the same process (the figure; absolute times are noise here)."""
    by_isa = {}
    for isa, sp in speeds.items():
        row = dict(sp)
        for kind in ("packed", "selective", "packed_v2"):
            if f"decode_step_ms_{kind}" in sp:
                row[f"{kind}_vs_dynamic"] = (
                    sp[f"decode_step_ms_{kind}"] / sp["decode_step_ms_dynamic"]
                )
        by_isa[isa] = row
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":")[1].split() for line in cpu.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return {
        "context_tokens": args.context, "steps": args.steps, "by_isa": by_isa,
        "by_cpu_flags": sorted(f for f in flags if f.startswith("avx") or f in ("fma", "f16c")),
        "load_avg_start_end": [load1, os.getloadavg()[0]], "seconds": time.perf_counter() - t0,
    }  # fmt: skip


if __name__ == "__main__":
    main()
