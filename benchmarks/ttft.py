"""Time to first token on this CPU: full prefill of a prompt against a prefix from the tier.

    python benchmarks/ttft.py                    # a 2048-token prompt, 5 rounds
    python benchmarks/ttft.py --repeat 7 --threads 1

Model: SmolLM2-135M-Instruct, fp32 on the CPU (kvpool.models.load). Prompt: the first
`--tokens` tokens of the Python docs' "compound statements" topic (pydoc_data), English prose.
Codec: kvpool.hf.codec_for(model): 2-bit keys and values, G = 128, pre-RoPE keys, Hadamard
values, 4 sink tokens; 256-token blocks; the tier is `kvpool serve --shards 2` on 127.0.0.1.

One untimed CachedModel.prefill stores the prompt's full blocks. Then `--repeat` rounds, each
running every path once, in an order rotated from round to round:

  full    model(input_ids) with no cache: what a worker without the tier runs
  cached  a fresh worker-side cache, step by step through KVPool, as CachedModel.fetch does it:
          lookup of the prompt (lookup_s), fetch + verify + decode of its cached blocks
          (fetch_decode_s), a DynamicCache of at most T-1 of those tokens (cache_s: the last
          token always runs, to give logits), the model on the uncached tail (tail_prefill_s)
  hf      CachedModel.prefill: the same through kvpool.hf, its store of new blocks included

Figures are medians over rounds; speedup = prefill_s / cached_s; fp16_bytes is what the fetched
prefix would be as fp16. Each cached path's final-token logits are checked against the full
prefill's (argmax, max abs difference, KL(full || cached) in nats); exact_kv_* is the cached
path's tail run on the full prefill's own fp32 KV instead: the part of the difference that is
not the codec's.

Cost check: the CostModel the rounds trained (prefill s/token, fetch bytes/s) decides, through
CachedModel.fetch, for the prompt, a 300-token prompt with one cached 256-token block and a
40-token prompt with one cached 32-token block (a namespace with 32-token blocks, G = 32). Each
case is also timed, full against cached, so `right` says whether the decision matched the
measurement; cost_break_even_tokens is the shortest prefix the trained CostModel would fetch.
The machine's 1-minute load average at start and end says how shared the CPU was. Prints a
table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from pydoc_data.topics import topics
from typing import Any

import torch
import torch.nn.functional as F
from store import KVPoolTier  # benchmarks/, on sys.path as the script's folder
from torch import Tensor

from kvpool.client import KVPool
from kvpool.hf import (
    CachedModel,
    CostModel,
    cache_from_kv,
    codec_for,
    kv_from_cache,
    model_layout,
    namespace_for_model,
)
from kvpool.models import SMOLLM2, load

TOPIC = "compound"
PIECES = ("lookup_s", "fetch_decode_s", "cache_s", "tail_prefill_s")


@dataclasses.dataclass
class Run:
    """One path's result in one round: wall time, last-position logits, what it fetched."""

    seconds: float
    logits: Tensor
    cached_tokens: int = 0
    fetched_bytes: int = 0
    pieces: dict[str, float] = dataclasses.field(default_factory=dict)


def prompt(tokenizer: Any, tokens: int) -> Tensor:
    ids = tokenizer(topics[TOPIC], return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        raise ValueError(f"topic {TOPIC!r} has only {ids.shape[1]} tokens")
    return ids[:, :tokens]


@torch.inference_mode()
def full(model: Any, ids: Tensor) -> Run:
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    return Run(time.perf_counter() - t0, out.logits[:, -1].float())


@torch.inference_mode()
def cached(model: Any, pool: KVPool, ids: Tensor) -> Run:
    """Lookup, fetch + decode, DynamicCache of at most T-1 tokens, tail prefill; timed piece by
    piece."""
    t = [time.perf_counter()]
    tokens = ids[0].tolist()
    n = pool.lookup(tokens)
    t.append(time.perf_counter())
    hit = pool.get(tokens[:n], dtype=model.dtype, present=n) if n else None
    t.append(time.perf_counter())
    if hit is None or hit.keys is None or hit.values is None:
        raise RuntimeError(f"the tier holds no prefix of this {len(tokens)}-token prompt")
    keep = min(hit.tokens, len(tokens) - 1)
    cache = cache_from_kv(model, hit.keys[:, :, :keep], hit.values[:, :, :keep])
    t.append(time.perf_counter())
    out = model(ids[:, keep:], past_key_values=cache, use_cache=True)
    t.append(time.perf_counter())
    pieces = {name: t[i + 1] - t[i] for i, name in enumerate(PIECES)}
    return Run(t[-1] - t[0], out.logits[:, -1].float(), keep, hit.fetched_bytes, pieces)


def through_hf(cm: CachedModel, ids: Tensor) -> Run:
    t0 = time.perf_counter()
    logits, _ = cm.prefill(ids)
    return Run(
        time.perf_counter() - t0, logits.float(), cm.last_cached_tokens, cm.last_fetched_bytes
    )


@torch.inference_mode()
def exact_kv_logits(model: Any, ids: Tensor, tokens: int) -> Tensor:
    """The tail after `tokens` run on the full prefill's own KV (no codec)."""
    kv = kv_from_cache(model(ids, use_cache=True).past_key_values, tokens)
    out = model(ids[:, tokens:], past_key_values=cache_from_kv(model, *kv), use_cache=True)
    return out.logits[:, -1].float()


def rounds(paths: dict[str, Callable[[], Run]], repeat: int) -> dict[str, list[Run]]:
    """Every path once per round, the order rotated by one each round."""
    names = list(paths)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(paths[name]())
    return runs


def median(runs: list[Run], piece: str | None = None) -> float:
    return statistics.median(run.pieces[piece] if piece else run.seconds for run in runs)


def compare(ref: Tensor, logits: Tensor) -> dict[str, Any]:
    """Last-position logits against the full prefill's: argmax, max |difference|, KL(ref || x)."""
    kl = F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")
    return {
        "argmax_equal": bool(ref.argmax() == logits.argmax()),
        "max_abs_diff": round(float((ref - logits).abs().max()), 4),
        "kl": round(float(kl), 5),
    }


def break_even_tokens(cost: CostModel, bytes_per_token: float, limit: int) -> int | None:
    """The shortest prefix `cost` would fetch, at `bytes_per_token`; None if none up to limit."""
    cost = dataclasses.replace(cost, min_tokens=1)
    return next(
        (t for t in range(1, limit + 1) if cost.worth_fetching(t, int(t * bytes_per_token))), None
    )


def cost_case(
    model: Any, pool: KVPool, ids: Tensor, cost: CostModel, runs: dict[str, list[Run]]
) -> dict[str, Any]:
    """CachedModel.fetch's decision for `ids` with `cost` (on a copy: deciding teaches it
    nothing) against the measured medians of the full and the cached path."""
    decider = CachedModel(model, pool, cost=dataclasses.replace(cost))
    decider.fetch(ids)
    fetch = decider.last_cached_tokens > 0
    full_s, cached_s = median(runs["full"]), median(runs["cached"])
    return {
        "prompt": ids.shape[1],
        "block": pool.namespace.block_tokens,
        "prefix": runs["cached"][0].cached_tokens,
        "fetch": fetch,
        "full_s": round(full_s, 4),
        "cached_s": round(cached_s, 4),
        "right": fetch == (cached_s < full_s),
    }


def full_and_cached(model: Any, pool: KVPool, ids: Tensor, repeat: int) -> dict[str, list[Run]]:
    return rounds(
        {"full": lambda: full(model, ids), "cached": lambda: cached(model, pool, ids)}, repeat
    )


def main(tokens: int, repeat: int, small_repeat: int, threads: int) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load()
    ids = prompt(tokenizer, tokens)
    layers, kv_heads, head_dim = model_layout(model)
    codec = codec_for(model)
    small_codec = codec_for(model, group_size=32)
    cost = CostModel()
    result: dict[str, Any] = {
        "model": SMOLLM2,
        "dtype": str(model.dtype).removeprefix("torch."),
        "prompt_tokens": tokens,
        "codec": codec.describe(),
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
    }
    with KVPoolTier(2, "1GiB") as tier:
        pool = KVPool(tier.endpoint, namespace_for_model(model, codec), codec)
        small = KVPool(
            tier.endpoint, namespace_for_model(model, small_codec, block_tokens=32), small_codec
        )
        try:
            cm = CachedModel(model, pool, cost=cost)
            cm.prefill(ids)  # untimed: stores the prompt's full blocks, teaches `cost` a prefill
            result["block_tokens"] = pool.namespace.block_tokens
            result["stored_blocks"] = pool.stats.blocks_put
            result["stored_bytes"] = pool.stats.bytes_put
            paths: dict[str, Callable[[], Run]] = {
                "full": lambda: full(model, ids),
                "cached": lambda: cached(model, pool, ids),
                "hf": lambda: through_hf(cm, ids),
            }
            runs = rounds(paths, repeat)
            for run in runs["full"]:  # what a worker's uncached prefills would teach it
                cost.saw_prefill(tokens, run.seconds)
            prefix = runs["cached"][0].cached_tokens
            exact = exact_kv_logits(model, ids, prefix)
            CachedModel(model, small, cost=CostModel()).prefill(ids[:, :40])  # stores 1 block
            cases = [(pool, ids, runs)]
            for target, x in ((pool, ids[:, :300]), (small, ids[:, :40])):
                cases.append((target, x, full_and_cached(model, target, x, small_repeat)))
            cost_check = [cost_case(model, t, x, cost, r) for t, x, r in cases]
        finally:
            pool.close()
            small.close()

    ref = runs["full"][0].logits
    prefill_s, cached_s = median(runs["full"]), median(runs["cached"])
    c = runs["cached"][0]
    fp16_bytes = 2 * layers * kv_heads * head_dim * c.cached_tokens * 2
    result |= {
        "prefill_s": round(prefill_s, 4),
        "cached_s": round(cached_s, 4),
        "speedup": round(prefill_s / cached_s, 2),
        **{piece: round(median(runs["cached"], piece), 4) for piece in PIECES},
        "cached_tokens": c.cached_tokens,
        "tail_tokens": tokens - c.cached_tokens,
        "fetched_bytes": c.fetched_bytes,
        "fp16_bytes": fp16_bytes,
        "compression_ratio": round(fp16_bytes / c.fetched_bytes, 2),
        **compare(ref, c.logits),
        "exact_kv_max_abs_diff": compare(ref, exact)["max_abs_diff"],
        "exact_kv_kl": compare(ref, exact)["kl"],
        "hf_prefill_s": round(median(runs["hf"]), 4),
        "hf_speedup": round(prefill_s / median(runs["hf"]), 2),
        "paths": {
            name: {
                "median_s": round(median(rs), 4),
                "min_s": round(min(r.seconds for r in rs), 4),
                "max_s": round(max(r.seconds for r in rs), 4),
                "cached_tokens": rs[0].cached_tokens,
                "fetched_bytes": rs[0].fetched_bytes,
                **compare(ref, rs[-1].logits),
            }
            for name, rs in runs.items()
        },
        "learned_prefill_s_per_token": round(cost.prefill_s_per_token or 0.0, 6),
        "learned_fetch_mb_per_s": round(cost.fetch_bytes_per_s / 1e6, 1),
        "cost_check": {f"{case['prompt']}/{case['block']}": case for case in cost_check},
        "cost_break_even_tokens": break_even_tokens(
            cost, c.fetched_bytes / c.cached_tokens, tokens
        ),
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['model']} {result['dtype']}, {result['prompt_tokens']}-token prompt, "
        f"{result['threads']} threads, median of {result['repeat']} rounds; "
        f"{result['codec']}, {result['block_tokens']}-token blocks"
    )
    print(f"{'path':8s}{'median s':>10s}{'min s':>9s}{'max s':>9s}{'speedup':>9s}"
          f"{'cached':>8s}{'fetched B':>11s}{'argmax=':>9s}{'max|dlogit|':>13s}{'KL':>9s}")  # fmt: skip
    prefill_s = result["prefill_s"]
    for name, p in result["paths"].items():
        print(
            f"{name:8s}{p['median_s']:>10.3f}{p['min_s']:>9.3f}{p['max_s']:>9.3f}"
            f"{prefill_s / p['median_s']:>9.2f}{p['cached_tokens']:>8d}{p['fetched_bytes']:>11d}"
            f"{p['argmax_equal']!s:>9s}{p['max_abs_diff']:>13.4f}{p['kl']:>9.4f}"
        )
    print("cached, pieces (median s): " + ", ".join(f"{k} {result[k]:.4f}" for k in PIECES))
    print()
    print(
        f"{'cost check':12s}{'prefix':>8s}{'fetch':>7s}{'full s':>9s}{'cached s':>10s}{'right':>7s}"
    )
    for name, case in result["cost_check"].items():
        print(
            f"{name:12s}{case['prefix']:>8d}{case['fetch']!s:>7s}{case['full_s']:>9.3f}"
            f"{case['cached_s']:>10.3f}{case['right']!s:>7s}"
        )
    print()
    for key, value in result.items():
        if key not in ("paths", "cost_check"):
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="prompt length")
    p.add_argument("--repeat", type=int, default=5, help="rounds of the prompt's paths")
    p.add_argument("--small-repeat", type=int, default=9, help="rounds of the small cost cases")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    result = main(args.tokens, args.repeat, args.small_repeat, args.threads)
    print_table(result)
    print(json.dumps(result))
