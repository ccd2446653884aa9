"""Replay a production request trace through kvpool: hit rates, prefill saved, speed, shard load.

    python benchmarks/trace_replay.py                    # the shared Mooncake conversation trace
    python benchmarks/trace_replay.py --trace T.jsonl --dram-tokens 3e6 --shards 16
    python benchmarks/trace_replay.py --limit 2000 --no-redis   # a quick look

Every request of a Mooncake-format trace (`kvpool.trace`), in order and at full speed (not at
trace time), does what a serving engine with kvpool does: a lookup of its prompt's block keys,
a read of the leading blocks the tier holds, and a put of the full blocks it had to compute.
Token ids are synthesized per trace block id, so kvpool's chained keys share exactly what the
trace shares. Blocks are 512 tokens, the trace's own block.

Sizes. A model shape (`--bytes-per-token`, default Llama-3-70B: 80 layers x 8 KV heads x 128 x
K and V x fp16 = 320 KiB per token) and a codec (`--codec`) give the full-size block; DRAM is
given in fp16-equivalent tokens (`--dram-tokens`, default 3M, Mooncake's figure for one node's
local DRAM), so `--codec` decides how many blocks fit. Blocks and budgets are scaled down
together (`--scale`): the tier stores real kvpool blocks (a small namespace whose encoded block
is the scaled size, re-sealed under each key), so every hit rate is the full-size system's.

In one run:
- kvpool: a real tier of `--shards` Ray shard actors as `kvpool serve` starts them (gRPC and the
  same-host socket), the client's batch calls (get_prefix: the lookup and the read of the
  leading hits in one probe per shard; put_many), `--concurrency` requests in flight; its hit
  rate, requests/s, block operations/s (keys looked up + blocks read + blocks written, per
  second, counted as for Redis) and per-shard bytes served (max over mean);
- Redis: a real redis-server with maxmemory = the same bytes and allkeys-lru, holding the same
  blocks, driven as a Redis-backed cache (LMCache's Redis backend) does: per request one
  pipeline of EXISTS, one of GETs of the leading hits, one of SETs of the rest, the same
  concurrency;
- simulated, in process: exact LRU over blocks at the same bytes, fp16 blocks under LRU at the
  same DRAM, an infinite cache (the bound), and the capacity sweep (kvpool's store sharded as
  the tier, its shards sharing the budget through the same table as the tier's; the same with
  a fixed slice per shard; the same policy in one store; and LRU, all at the same bytes, at
  1M / 3M / 10M tokens of DRAM);
- the prefill seconds saved at an assumed prefill rate (`--prefill-tokens-per-s`, default
  10,000: an 8-GPU node prefilling a 70B model; only the fraction is rate-free);
- the store's memory per block beyond its bytes (tracemalloc).

The figure of each system is its token hit rate: prompt tokens served from the cache over all
prompt tokens. Absolute speeds on a shared 2-core machine are noise; compare within a run. The
real systems run `--rounds` times (default 3), each round a fresh tier and a fresh Redis, taking
turns to go first: speeds are each system's median round, `block_ops_vs_redis` the median of
the rounds' ratios (all of them in `block_ops_vs_redis_by_round`), hit rates and shard load the
first round's (the tier's every round in `hit_rate_by_round`).
Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import redis.asyncio as aioredis
import torch
from store import Binder  # benchmarks/, on sys.path as the script's folder
from tqdm import tqdm

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto.keys import Namespace
from kvpool.proto.messages import BRANCHED, EXTENDS
from kvpool.ring import Placement, Ring
from kvpool.services.budget import SharedBudget
from kvpool.services.budget import create as create_budget
from kvpool.services.hot import HotKeys
from kvpool.services.redis_server import RedisServer
from kvpool.services.store import BlockStore
from kvpool.services.tier import TierConfig, start_tier
from kvpool.trace import TRACE_BLOCK_TOKENS, TraceKeys, TraceRequest, read_trace
from kvpool.transport import BlockPut, ClientConfig, TierClient

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-conversation.jsonl"
LLAMA3_70B_BYTES_PER_TOKEN = 80 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x K,V x fp16
# fp16 bytes over stored bytes, as measured on held-out text (benchmarks/results/, README):
CODECS = {
    "v2-predicted": 7.16,  # codec v2 with a key basis and inter-layer prediction
    # what a worker gets while no key basis is published for its model (`published_codec`'s
    # fallback: 3-bit keys, 2-bit values); with one published, the default is v2-predicted
    "k3v2": 5.53,
    "fp16": 1.0,
}
SWEEP = {"1M": 1e6, "3M": 3e6, "10M": 10e6}
Keys = list[bytes]


# -- the caches a replay drives ---------------------------------------------------------------


class Cache:
    """One request at a time: how many leading blocks are cached, then read them and write the
    rest. Returns the leading count."""

    def run(self, keys: Keys) -> int:
        raise NotImplementedError


class LRUBlocks(Cache):
    """Exact LRU over blocks of one size, touched in prefix order (what LRU over blocks is)."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def run(self, keys: Keys) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        for key in keys:
            self.blocks[key] = None
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
        return n


class Infinite(Cache):
    def __init__(self) -> None:
        self.blocks: set[bytes] = set()

    def run(self, keys: Keys) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        self.blocks.update(keys)
        return n


class Stores(Cache):
    """kvpool's BlockStore, one per shard with the budget split evenly (with `shared`, sharing
    it through a budget table as the shards `kvpool serve` starts on one node do, on one batch
    counter for a clock), placed as the client
    places keys (by run; by their own bytes in a run a shard's hot counter called hot, found
    also where the run's owner kept them, and moved to their own owner when read there),
    driven as the client drives the tier: one get_many and one put_many per shard, each block
    naming the nearest earlier block of its prefix on the same shard. With `hints` the client
    carries what one store would know of a parent on another shard (services/store.py): the
    first block it puts gets EXTENDS when the block before it, read from another shard, has
    not branched there (and that shard is told it has now, `mark_branched`, once), the rest
    the same, and each block whose next one is on another shard BRANCHED (the tier's client
    sends the same hints: BlockInfo.hints, from what its probe's BlockFound.branched said of
    the block before, and TouchRequest.branched). Hot blocks' read replicas are not
    simulated."""

    def __init__(self, budget_bytes: int, shards: int, block_bytes: int,
                 shared: bool = False, hints: bool = True,
                 store_class: type[BlockStore] = BlockStore) -> None:  # fmt: skip
        """`store_class`: BlockStore or a class with its interface (hints only to BlockStore
        and its subclasses; with `shared`, it takes BlockStore's share and clock)."""
        self.hints = hints and issubclass(store_class, BlockStore)
        ids = [f"shard-{i}" for i in range(shards)]
        self.place = Placement(Ring(ids))
        each = max(block_bytes, budget_bytes // shards)
        if shared:
            with tempfile.NamedTemporaryFile(suffix=".budget", delete=False) as f:
                table = f.name
            create_budget(table, shards, each)
            clock = itertools.count(1).__next__  # one batch counter for every store
            self.stores = {s: store_class(each, share=SharedBudget(table, i), clock=clock)
                           for i, s in enumerate(ids)}  # fmt: skip
            os.unlink(table)  # the stores keep it mapped
        else:
            self.stores = {s: store_class(each) for s in ids}
        self.hot = {s: HotKeys() for s in ids}  # as each shard counts its reads
        self.blob = b"\0" * block_bytes

    def _holder(self, key: bytes) -> str | None:
        for sid in (*self.place.owners(key), *self.place.fallback(key)):
            if key in self.stores[sid]:
                return sid
        return None

    def run(self, keys: Keys) -> int:
        holders: list[str] = []
        for key in keys:
            sid = self._holder(key)
            if sid is None:
                break
            holders.append(sid)
        n = len(holders)
        owners = [self.place.owners(k)[0] for k in keys]
        # the lookup's word on the block before the first miss (where it was found)
        fork = self.stores[holders[n - 1]].branched([keys[n - 1]])[0] if 0 < n < len(keys) else None
        extends = EXTENDS if self.hints and fork is False else 0
        reads: dict[str, Keys] = {}
        writes: dict[str, tuple[list, list[int]]] = {}
        last: dict[str, bytes] = {}
        for i, (key, sid) in enumerate(zip(keys, owners, strict=True)):
            if i < n:
                reads.setdefault(holders[i], []).append(key)
            if i >= n or holders[i] != sid:  # missing, or read elsewhere: filled on its owner
                hint = extends if i >= n else 0
                if self.hints and i + 1 < len(keys) and owners[i + 1] != sid:
                    hint |= BRANCHED
                items, hints = writes.setdefault(sid, ([], []))
                items.append((key, keys[0], i, self.blob, last.get(sid), None))
                hints.append(hint)
            last[sid] = key
        for sid, ks in reads.items():
            self.stores[sid].get_many(ks)
            for key in ks:
                if self.hot[sid].read(key, len(self.blob)) > 1:
                    self.place.mark_hot(key)
        for sid, (items, hints) in writes.items():
            self.stores[sid].put_many(items, hints)
        if extends and owners[n] != holders[n - 1]:  # its parent's shard: it branched now
            self.stores[holders[n - 1]].mark_branched([keys[n - 1]])
        return n


def replay(requests: Sequence[TraceRequest], keys: Sequence[Keys], cache: Cache,
           label: str) -> float:  # fmt: skip
    """Token hit rate of `cache` over the requests, in order."""
    hit = total = 0
    for request, ks in tqdm(list(zip(requests, keys, strict=True)), desc=label, leave=False,
                            mininterval=2.0, file=sys.stderr):  # fmt: skip
        hit += request.hit_tokens(cache.run(ks))
        total += request.input_length
    return hit / total


# -- the real tier and the real Redis ----------------------------------------------------------


@dataclasses.dataclass
class Live:
    """What a replay against a real system measured."""

    hit_rate: float
    seconds: float
    block_ops: int
    requests: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def block_ops_per_s(self) -> float:
        return self.block_ops / self.seconds


async def in_order(requests: Sequence[TraceRequest], keys: Sequence[Keys], concurrency: int,
                   one: Callable[[int], object], label: str) -> Live:  # fmt: skip
    """Run `one(i)` (a coroutine returning (leading, block ops)) for every request, `concurrency`
    at once, started in trace order."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=label, mininterval=2.0, file=sys.stderr)
    hit = ops = 0

    async def run(i: int) -> None:
        nonlocal hit, ops
        try:
            leading, n_ops = await one(i)  # type: ignore[misc]
            hit += requests[i].hit_tokens(leading)
            ops += n_ops
            bar.update()
        finally:
            gate.release()

    t0 = time.perf_counter()
    tasks = []
    for i in range(len(requests)):
        await gate.acquire()
        tasks.append(asyncio.create_task(run(i)))
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - t0
    bar.close()
    total = sum(r.input_length for r in requests)
    return Live(hit / total, seconds, ops, len(requests))


def template(target_bytes: int) -> tuple[Namespace, bytes]:
    """A namespace of 512-token blocks and one encoded block whose size is as close to
    `target_bytes` as a head dim in steps of 32 gets (K2V2, groups of 32: 3 bits a value)."""
    codec = CodecConfig(2, 2, 32)
    head_dim = max(32, round(target_bytes / 384 / 32) * 32)
    ns = namespace_for("bench/trace", 1, 1, head_dim, torch.float16, codec,
                       block_tokens=TRACE_BLOCK_TOKENS)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, TRACE_BLOCK_TOKENS, head_dim)
    blob = encode(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half(),
                  codec)  # fmt: skip
    return ns, blob


async def kvpool_replay(endpoint: str, ns: Namespace, blob: bytes,
                        requests: Sequence[TraceRequest], keys: Sequence[Keys],
                        concurrency: int) -> tuple[Live, dict[str, int]]:  # fmt: skip
    tier = TierClient(endpoint, ClientConfig(timeout_s=60.0, call_timeout_s=120.0,
                                             max_inflight=4 * concurrency))  # fmt: skip
    try:
        await tier.lookup(ns, keys[0][:1])  # topology and arenas, untimed
        bind = Binder(blob, ns)
        before = {s.shard_id: s.bytes_served for s in await tier.stats()}

        async def one(i: int) -> tuple[int, int]:
            ks = keys[i]
            n = len(await tier.get_prefix(ns, ks))  # the lookup and the read of its hits
            puts = [BlockPut(ks[j], ks[0], j, bind(ks[j], j))
                    for j in range(n, len(ks))]  # fmt: skip
            if puts:
                await tier.put_many(ns, puts, prefix=ks)
            return n, len(ks) + n + len(puts)

        live = await in_order(requests, keys, concurrency, one, "kvpool tier")
        after = {s.shard_id: s.bytes_served for s in await tier.stats()}
    finally:
        await tier.close()
    return live, {s: after[s] - before.get(s, 0) for s in after}


async def redis_replay(port: int, budget_bytes: int, blob: bytes,
                       requests: Sequence[TraceRequest], keys: Sequence[Keys],
                       concurrency: int) -> Live:  # fmt: skip
    r = aioredis.Redis(host="127.0.0.1", port=port, max_connections=concurrency)
    try:
        await r.config_set("maxmemory", str(budget_bytes))
        await r.config_set("maxmemory-policy", "allkeys-lru")
        await r.config_set("maxmemory-samples", "10")  # closer to exact LRU than the default 5

        async def one(i: int) -> tuple[int, int]:
            ks = keys[i]
            if not ks:
                return 0, 0
            pipe = r.pipeline(transaction=False)
            for k in ks:
                pipe.exists(k)
            present = await pipe.execute()
            n = next((j for j, p in enumerate(present) if not p), len(ks))
            if n:
                pipe = r.pipeline(transaction=False)
                for k in ks[:n]:
                    pipe.get(k)
                got = await pipe.execute()
                n = next((j for j, b in enumerate(got) if b is None), n)
            if n < len(ks):
                pipe = r.pipeline(transaction=False)
                for k in ks[n:]:
                    pipe.set(k, blob)
                await pipe.execute()
            return n, len(ks) + n + len(ks) - n

        return await in_order(requests, keys, concurrency, one, "redis")
    finally:
        await r.aclose()


# -- memory per block -------------------------------------------------------------------------


def memory_per_block(blocks: int = 50_000) -> dict[str, float]:
    """Python heap bytes a BlockStore spends per block beyond the block's bytes (its index,
    queue entries, tree links), and per ghost (an evicted key remembered), by tracemalloc."""
    data = b"x"  # one shared object: only the store's own structures are counted
    keys = [i.to_bytes(32, "big") for i in range(2 * blocks)]  # made before tracing
    store = BlockStore(blocks)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(blocks):
        store.put(keys[i], keys[i - i % 16], i % 16, data, keys[i - 1] if i % 16 else None)
    full = tracemalloc.get_traced_memory()[0]
    for i in range(blocks, 2 * blocks):  # every old block evicted: as many ghosts
        store.put(keys[i], keys[i - i % 16], i % 16, data, keys[i - 1] if i % 16 else None)
    churned = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_block = (full - base) / blocks
    return {
        "per_block_bytes": round(per_block),
        "per_ghost_bytes": round((churned - full) / blocks),
    }


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--codec", choices=sorted(CODECS), default="v2-predicted")
    p.add_argument("--bytes-per-token", type=int, default=LLAMA3_70B_BYTES_PER_TOKEN,
                   help="fp16 KV bytes per token of the model shape (default Llama-3-70B)")  # fmt: skip
    p.add_argument("--dram-tokens", type=float, default=3e6, help="DRAM, fp16-equivalent tokens")
    p.add_argument("--scale", type=float, default=4096.0,
                   help="block sizes and budgets are divided by this (hit rates do not change)")  # fmt: skip
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (tier, Redis)")
    p.add_argument("--rounds", type=int, default=3,
                   help="replays of each real system, taking turns (the speeds: medians)")  # fmt: skip
    p.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0)
    p.add_argument("--no-tier", action="store_true", help="skip the real tier (simulations only)")
    p.add_argument("--no-redis", action="store_true")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds is at least 1")

    requests = read_trace(args.trace, args.limit)
    block_fp16 = TRACE_BLOCK_TOKENS * args.bytes_per_token

    def blocks_in(dram_tokens: float, ratio: float) -> int:
        """How many blocks of a codec at `ratio` fit in DRAM of `dram_tokens` fp16 tokens."""
        return max(1, int(dram_tokens * args.bytes_per_token / (block_fp16 / ratio)))

    ratio = CODECS[args.codec]
    ns, blob = template(int(block_fp16 / ratio / args.scale))
    scale = block_fp16 / ratio / len(blob)  # the factor actually applied
    capacity = blocks_in(args.dram_tokens, ratio)
    budget = capacity * len(blob)
    tk = TraceKeys(ns)
    keys: list[Keys] = [list(tk(r)) for r in requests]
    total_tokens = sum(r.input_length for r in requests)
    print(f"{len(requests)} requests, {total_tokens / len(requests):.0f} prompt tokens each, "
          f"{sum(map(len, keys))} full blocks; codec {args.codec} ({ratio}x): "
          f"{capacity} blocks of {block_fp16 / ratio / 2**20:.1f} MiB in "
          f"{args.dram_tokens / 1e6:g}M tokens of DRAM; scaled {scale:.0f}x down to "
          f"{len(blob)}-byte blocks, {budget / 2**20:.1f} MiB", file=sys.stderr)  # fmt: skip

    out: dict[str, object] = {}
    max_hit = replay(requests, keys, Infinite(), "infinite")
    fp16_lru = replay(requests, keys, LRUBlocks(blocks_in(args.dram_tokens, 1.0)), "fp16 lru")
    points: dict[int, dict[str, float]] = {}  # by capacity in blocks: each replayed once

    def point(n: int, label: str) -> dict[str, float]:
        """kvpool's store sharded as the tier (the shards sharing the budget), the same with a
        fixed slice each, the same policy in one store (the policy alone, without the split of
        the budget over shards), and exact LRU: each `n` blocks' bytes."""
        if n not in points:
            stores = Stores(n * len(blob), args.shards, len(blob), shared=True)
            fixed = Stores(n * len(blob), args.shards, len(blob))
            one = Stores(n * len(blob), 1, len(blob))
            points[n] = {
                "kvpool": round(replay(requests, keys, stores, f"kvpool {label}"), 4),
                "kvpool_fixed_split": round(replay(requests, keys, fixed, f"fixed {label}"), 4),
                "kvpool_one_store": round(replay(requests, keys, one, f"one store {label}"), 4),
                "lru": round(replay(requests, keys, LRUBlocks(n), f"lru {label}"), 4),
            }
        return points[n]

    sweep = {name: point(blocks_in(tokens, ratio), name) for name, tokens in SWEEP.items()}
    headline = point(capacity, f"{args.dram_tokens / 1e6:g}M")
    lru = headline["lru"]
    default_point = point(blocks_in(args.dram_tokens, CODECS["k3v2"]), "k3v2")
    out.update(max_hit_rate=round(max_hit, 4), lru_hit_rate=round(lru, 4),
               fp16_lru_hit_rate=round(fp16_lru, 4), hit_rate_by_capacity=sweep,
               default_codec_hit_rate=default_point)  # fmt: skip

    hit = headline["kvpool"]  # the simulated tier, unless the real one runs

    def tier_round() -> tuple[Live, dict[str, int]]:
        per_shard = max(len(blob), budget // args.shards)
        tier = start_tier(TierConfig(shards=args.shards, budget_bytes=per_shard, shard_cpus=0.05,
                                     metrics_port=None, name="trace-replay"))  # fmt: skip
        try:
            return asyncio.run(kvpool_replay(tier.endpoint, ns, blob, requests, keys,
                                             args.concurrency))  # fmt: skip
        finally:
            tier.shutdown()

    def redis_round() -> Live:
        with RedisServer() as server:
            return asyncio.run(redis_replay(server.port, budget, blob, requests, keys,
                                            args.concurrency))  # fmt: skip

    # the real systems, `--rounds` times, each round a fresh tier and a fresh Redis, taking
    # turns to go first (this machine's speed drifts by ~20% within minutes: one pair of runs
    # is not a ratio); the figures are each system's median round, the ratio the median of the
    # rounds' ratios, and the hit rates and shard load the first round's
    tiers: list[tuple[Live, dict[str, int]]] = []
    peers: list[Live] = []
    for r in range(args.rounds):
        for system in ("tier", "redis") if r % 2 == 0 else ("redis", "tier"):
            if system == "tier" and not args.no_tier:
                tiers.append(tier_round())
            elif system == "redis" and not args.no_redis:
                peers.append(redis_round())
    if tiers:
        live, served = tiers[0]
        loads = list(served.values())
        mean = sum(loads) / len(loads)
        hit = live.hit_rate
        out.update(requests_per_s=round(statistics.median(t.requests_per_s for t, _ in tiers), 1),
                   block_ops_per_s=round(statistics.median(t.block_ops_per_s for t, _ in tiers)),
                   shard_load_max_over_mean=round(max(loads) / mean, 3) if mean else None,
                   hit_rate_by_round=[round(t.hit_rate, 4) for t, _ in tiers])  # fmt: skip
    if peers:
        out.update(redis_hit_rate=round(peers[0].hit_rate, 4),
                   redis_requests_per_s=round(statistics.median(p.requests_per_s for p in peers), 1),
                   redis_block_ops_per_s=round(statistics.median(p.block_ops_per_s for p in peers)))  # fmt: skip
    if tiers and peers:
        ratios = [
            t.block_ops_per_s / p.block_ops_per_s for (t, _), p in zip(tiers, peers, strict=True)
        ]
        out.update(block_ops_vs_redis=round(statistics.median(ratios), 3),
                   block_ops_vs_redis_by_round=[round(x, 3) for x in ratios])  # fmt: skip
    saved_tokens = hit * total_tokens
    out = {"hit_rate": round(hit, 4), **out,
           "prefill_saved_fraction": round(hit, 4),
           "prefill_saved_s": round(saved_tokens / args.prefill_tokens_per_s),
           "prefill_tokens_per_s_assumed": args.prefill_tokens_per_s,
           "hit_over_max": round(hit / max_hit, 3), "hit_over_fp16_lru": round(hit / fp16_lru, 2),
           "codec": args.codec, "shards": args.shards, "requests": len(requests),
           "dram_tokens": args.dram_tokens, "block_bytes": len(blob), "scale": round(scale),
           **memory_per_block()}  # fmt: skip
    table(out)
    print(json.dumps(out))


def table(out: dict[str, object]) -> None:
    rows: Iterable[tuple[str, object]] = [(k, v) for k, v in out.items() if not isinstance(v, dict)]
    for k, v in rows:
        print(f"{k:32} {v}")
    sweep = out["hit_rate_by_capacity"]
    assert isinstance(sweep, dict)
    print(f"{'DRAM (fp16 tokens)':20} {'kvpool':>8} {'fixed split':>12} {'one store':>10} "
          f"{'LRU':>8}")  # fmt: skip
    for name, row in sweep.items():
        print(f"{name:20} {row['kvpool']:8.4f} {row['kvpool_fixed_split']:12.4f} "
              f"{row['kvpool_one_store']:10.4f} {row['lru']:8.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
