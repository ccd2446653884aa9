"""Eviction policies against exact LRU at the same bytes, on synthetic traces, over a sweep of
capacities.

    python benchmarks/policy_sweep.py                       # every mix, seeds 1-3
    python benchmarks/policy_sweep.py --mixes chat scan --seeds 1 --requests 2000
    python benchmarks/policy_sweep.py --trace T.jsonl       # a Mooncake-format file instead

Traces come from `benchmarks/synth_trace.py` (never the production trace: policies are tuned
here, and judged on traces they have not seen). Each trace is replayed, in order, through:
- `lru`: exact LRU over blocks (`trace_replay.LRUBlocks`);
- `store`: kvpool's `BlockStore` in one store with the whole budget (the policy alone);
- `store_sharded`: the same, one store per shard with the budget split, placed by the client's
  ring and driven as the client drives the tier (`trace_replay.Stores`, with the client's
  hints across shards unless `--no-hints`);
- `store_shared`: the same shards sharing the budget through a budget table, as the shards
  `kvpool serve` starts on one node do (services/budget.py; BlockStore only);
- `infinite`: the bound.
Capacities are fractions (`--fractions`) of the blocks the trace ever stores, so each trace is
swept from tight to roomy. The figure is the token hit rate (`trace_replay.replay`); the
verdict is the smallest difference to LRU over every trace and capacity (`worst_vs_lru`,
negative where a policy loses). Extra policies to compare, as `module:Class` of a store class
with BlockStore's interface (`--policy`), get the same two rows. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from synth_trace import MIXES, generate  # benchmarks/, on sys.path as the script's folder
from trace_replay import Cache, Infinite, LRUBlocks, Stores, replay

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.services.store import BlockStore
from kvpool.trace import TRACE_BLOCK_TOKENS, TraceKeys, TraceRequest, read_trace
from kvpool.trace import _request as parse_request

BLOCK_BYTES = 1000
Keys = list[bytes]


def trace_keys(requests: Sequence[TraceRequest]) -> list[Keys]:
    """kvpool's block keys of each request's full blocks, as a worker computes them
    (`kvpool.trace.TraceKeys`), so the simulated stores place them as the client does."""
    ns = namespace_for("bench/policy", 1, 1, 64, torch.float16, CodecConfig(2, 2, 32),
                       block_tokens=TRACE_BLOCK_TOKENS)  # fmt: skip
    tk = TraceKeys(ns)
    return [list(tk(r)) for r in requests]


def stores(store_class: type, capacity: int, shards: int, shared: bool = False,
           hints: bool = True) -> Cache:  # fmt: skip
    """`trace_replay.Stores` of `shards` stores of `store_class` splitting `capacity` blocks
    (with `shared`, BlockStores sharing them through a budget table; `hints`: the client's
    hints across shards, to BlockStores only)."""
    return Stores(capacity * BLOCK_BYTES, shards, BLOCK_BYTES, shared, hints, store_class)


def load(spec: str) -> type:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type)
    return cls


def sweep(requests: Sequence[TraceRequest], fractions: Sequence[float], shards: int,
          policies: dict[str, type], label: str, hints: bool = True) -> dict[str, object]:  # fmt: skip
    keys = trace_keys(requests)
    unique = len({k for ks in keys for k in ks})
    row: dict[str, object] = {
        "blocks": unique,
        "infinite": round(replay(requests, keys, Infinite(), label), 4),
    }
    for f in fractions:
        n = max(1, int(f * unique))
        caches: dict[str, Callable[[], Cache]] = {"lru": partial(LRUBlocks, n)}
        for name, cls in policies.items():
            caches[name] = partial(stores, cls, n, 1)
            caches[f"{name}_sharded"] = partial(stores, cls, n, shards, False, hints)
            if cls is BlockStore:
                caches[f"{name}_shared"] = partial(stores, cls, n, shards, True, hints)
        row[f"{f:g}"] = {name: round(replay(requests, keys, make(), f"{label} {f:g} {name}"), 4)
                         for name, make in caches.items()}  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixes", nargs="+", choices=sorted(MIXES), default=sorted(MIXES))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--idle-scale", type=float, default=1.0,
                   help="session gaps times this (synth_trace): with --requests k x 4000 and "
                        "--idle-scale k, the same reuse at per-shard budgets k times larger")  # fmt: skip
    p.add_argument("--trace", default=None, help="a Mooncake-format JSONL file instead")
    p.add_argument("--fractions", nargs="+", type=float,
                   default=[0.02, 0.05, 0.1, 0.2, 0.4])  # fmt: skip
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--no-hints", action="store_true",
                   help="shards without the client's hints across shards")  # fmt: skip
    p.add_argument("--policy", action="append", default=[],
                   help="module:Class of another store to compare (repeatable)")  # fmt: skip
    args = p.parse_args()
    policies: dict[str, type] = {"store": BlockStore}
    for spec in args.policy:
        policies[spec.rsplit(":", 1)[-1]] = load(spec)

    traces: dict[str, list[TraceRequest]] = {}
    if args.trace:
        traces[Path(args.trace).stem] = read_trace(args.trace)
    else:
        for mix in args.mixes:
            for seed in args.seeds:
                traces[f"{mix}-{seed}"] = [
                    parse_request(r, f"{mix}-{seed}")
                    for r in generate(mix, seed, args.requests, idle_scale=args.idle_scale)
                ]

    hints = not args.no_hints
    results = {name: sweep(reqs, args.fractions, args.shards, policies, name, hints)
               for name, reqs in traces.items()}  # fmt: skip
    worst: dict[str, dict[str, object]] = {}  # policy -> its smallest difference to LRU
    names = [n for name in policies for n in (name, f"{name}_sharded")] + ["store_shared"]
    print(f"{'trace':12} {'cap':>5} {'lru':>7} " + " ".join(f"{n:>14}" for n in names))
    for trace, row in results.items():
        for f in args.fractions:
            cell = row[f"{f:g}"]
            assert isinstance(cell, dict)
            print(f"{trace:12} {f:5g} {cell['lru']:7.4f} "
                  + " ".join(f"{cell[n]:14.4f}" for n in names))  # fmt: skip
            for n in names:
                d = round(cell[n] - cell["lru"], 4)
                if n not in worst or d < float(worst[n]["diff"]):  # type: ignore[arg-type]
                    worst[n] = {"diff": d, "trace": trace, "fraction": f}
    for n, w in worst.items():
        print(f"worst vs LRU {n:>16}: {w['diff']:+.4f} ({w['trace']}, {w['fraction']:g})",
              file=sys.stderr)  # fmt: skip
    print(json.dumps({"worst_vs_lru": worst, "shards": args.shards, "requests": args.requests,
                      "idle_scale": args.idle_scale, "hints": not args.no_hints,
                      "hit_rate": results}))  # fmt: skip


if __name__ == "__main__":
    main()
