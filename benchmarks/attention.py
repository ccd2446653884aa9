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

Cache bytes are the most each holds while it scores the continuation (packed: codes, group
parameters, sinks and the exact window of recent tokens; dynamic: keys and values in fp32;
fp16 would halve them, reported as memory_ratio_vs_fp16). peak_rss_mb is the process's
resident high-water mark from just after the model is loaded and run once (model_rss_mb) to
the end. Decode-step times come from one more process that
steps the dynamic, packed and selective caches in turn, in an order rotated from step to step
(`--steps` each, medians), so machine noise falls on all three alike. Prints a table; the last line is one JSON object.
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
from kvpool.packed import PackedCache, Selection, use_packed_attention

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


def build(args: argparse.Namespace, model: Any, tok: Any, kind: str) -> tuple[Any, torch.Tensor]:
    """The cache of `kind` holding the context, and the token ids."""
    ids = tokens(tok, args.context + args.continuation, args.text)
    codec = codec_for(model, key_bits=args.key_bits, value_bits=args.value_bits)
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
            blocks = [decode(b) for b in blobs]
            keys = torch.cat([b.keys for b in blocks], dim=2)
            values = torch.cat([b.values for b in blocks], dim=2)
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
        rows = [sum(p.tokens for p in (layer.packed, layer.recent) if p is not None)
                + layer.keys.shape[2] for layer in cache.layers]  # fmt: skip
        kept = sum(rows) / len(rows)
    return {"kind": args.child, "cache_bytes": held, "nll": nll(logits, ids, args.context),
            "peak_rss_mb": peak_rss_mb(), "model_rss_mb": loaded, "build_s": built_s,
            "rows_per_layer": kept}  # fmt: skip


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """Decode-step times of the dynamic, packed and selective caches, stepped in turn."""
    model, tok = load()
    use_packed_attention(model)
    caches = {kind: build(args, model, tok, kind) for kind in ("dynamic", "packed", "selective")}
    times: dict[str, list[float]] = {kind: [] for kind in caches}
    kinds = list(caches)
    with torch.inference_mode():
        for i in range(args.steps + 2):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:  # the order rotates from step to step
                cache, ids = caches[kind]
                t0 = time.perf_counter()
                model(ids[:, args.context + i : args.context + i + 1], past_key_values=cache)
                if i >= 2:  # two warm-up steps
                    times[kind].append(time.perf_counter() - t0)
    return {f"decode_step_ms_{k}": statistics.median(v) * 1e3 for k, v in times.items()}


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


def run_child(args: argparse.Namespace, kind: str, folder: str) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--child", kind, "--blocks", folder, "--context",
            str(args.context), "--continuation", str(args.continuation), "--steps",
            str(args.steps), "--key-bits", str(args.key_bits), "--value-bits",
            str(args.value_bits), "--keep", str(args.keep), "--window", str(args.window),
            "--text", args.text, "--fold-bits", args.fold_bits]  # fmt: skip
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
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
    with tempfile.TemporaryDirectory() as folder:
        write_blocks(args, folder)
        runs = {
            kind: run_child(args, kind, folder)
            for kind in ("dynamic", "store", "packed", "selective")
        }
        speed = run_child(args, "timing", folder)
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
        "load_avg_start_end": [load1, os.getloadavg()[0]], "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
