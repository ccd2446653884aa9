"""Faults under load: clients put and get while shard actors are killed at random.

    python benchmarks/faults.py                     # 4 client processes, 60 s, 3 shards
    python benchmarks/faults.py --seconds 20 --kill-every 4

A local tier of `--shards` shard actors serves `--clients` client processes. Each client owns
`--prompts` prompts of `--blocks` 64-token blocks with deterministic KV and loops: put a random
prompt, get a random prompt, and compare every fetched block with what the codec makes of that
block locally (`wrong_blocks` counts any difference). Meanwhile the main process kills a random
shard every `--kill-every` seconds; Ray restarts it, empty, possibly on another port (clients
find it through the topology). Client calls must never raise (`client_errors`): tier failures
become misses and dropped saves (`failures_absorbed`); a fetched block the client refuses before
decoding (corrupt, misplaced, misshapen) is a miss too (`rejected_blocks`). After the kill
phase, once every shard serves again, each client puts and gets each of its prompts once more:
`hit_ratio_after_recovery` is the fraction of those blocks that come back, and
`hit_ratio_after_heal` the same for a second pass (a block a client refused is deleted by it,
so its next put stores the real one).

    python benchmarks/faults.py --hostile           # the same with a hostile process beside it

With `--hostile`, shards write every block through to a real Redis server, clients use a
namespace with a tenant MAC key, and the process of `benchmarks/hostile.py` attacks the tier
for the kill phase (stalled and oversized uploads, floods of refused 60 MiB uploads, junk
namespaces, misplaced blocks, garbage bytes, and every Redis value rewritten as a forgery
bound to its place). A client that ever
decodes a forged block counts it in `forged_blocks_accepted`. Each shard process's RSS is
sampled twice a second: `shard_rss_over_budget_mib` is the largest peak over its baseline
(before any traffic) minus the byte budget and the upload cap (`Limits.upload_bytes`);
`shard_rss_growth_mib` is the peak over the baseline alone.
Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import hostile as hostile_attack  # benchmarks/hostile.py
from hostile import FORGED_VALUE

B = 64
SHAPE = (4, 2, 64)  # layers, kv heads, head dim


@dataclass
class Counts:
    ops: int = 0
    puts: int = 0
    gets: int = 0
    get_hits: int = 0
    blocks_checked: int = 0
    wrong_blocks: int = 0
    client_errors: int = 0
    failures_absorbed: int = 0
    rejected_blocks: int = 0
    recovery_blocks: int = 0
    recovery_hits: int = 0
    healed_hits: int = 0
    forged_blocks_accepted: int = 0


def client(index: int, endpoint: str, seconds: float, prompts: int, blocks: int,
           recovered: Any, results: Any, mac_key: bytes = b"") -> None:  # fmt: skip
    import logging

    import torch

    from kvpool.client import KVPool, namespace_for
    from kvpool.kernels.codec import CodecConfig, decode, encode
    from kvpool.transport import ClientConfig

    logging.getLogger("kvpool").setLevel(logging.ERROR)  # absorbed failures are counted instead
    codec = CodecConfig(2, 2, 64)
    ns = namespace_for(
        "bench/faults", *SHAPE, torch.float16, codec, block_tokens=B, mac_key=mac_key
    )
    rng, c = random.Random(index), Counts()
    data = []
    for p in range(prompts):
        g = torch.Generator().manual_seed(1000 * index + p)
        toks = torch.randint(0, 50000, (blocks * B,), generator=g).tolist()
        k, v = (
            torch.randn(SHAPE[0], SHAPE[1], blocks * B, SHAPE[2], generator=g).half()
            for _ in range(2)
        )
        parts = [slice(i * B, (i + 1) * B) for i in range(blocks)]
        expect = []
        for part in parts:
            kv = decode(encode(k[:, :, part], v[:, :, part], codec, part.start))
            assert kv.keys is not None and kv.values is not None  # a KV block holds both
            expect.append((kv.keys, kv.values))
        data.append((toks, (k, v), expect))
    pool = KVPool(endpoint, ns, codec, config=ClientConfig(timeout_s=2.0, topology_ttl_s=1.0))

    def get_and_check(p: int) -> int:
        toks, _, expect = data[p]
        got = pool.get(toks)
        c.gets += 1
        if got is None or got.keys is None or got.values is None:
            return 0
        c.get_hits += 1
        for i in range(got.tokens // B):
            s = slice(i * B, (i + 1) * B)
            c.blocks_checked += 1
            same = torch.equal(got.keys[:, :, s], expect[i][0]) and torch.equal(
                got.values[:, :, s], expect[i][1]
            )
            c.wrong_blocks += not same
            forged = (got.keys[:, :, s].float() - FORGED_VALUE).abs().max() < 0.05
            c.forged_blocks_accepted += bool(forged)
        return got.tokens // B

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            p = rng.randrange(prompts)
            pool.put(data[p][0], data[p][1])
            get_and_check(rng.randrange(prompts))
            c.puts += 1
            c.ops += 2
        except Exception:  # the contract: never; counted if it happens
            c.client_errors += 1
    recovered.wait(timeout=300)
    for p in range(prompts):
        try:
            pool.put(data[p][0], data[p][1])
            c.recovery_blocks += blocks
            c.recovery_hits += get_and_check(p)
        except Exception:
            c.client_errors += 1
    for p in range(prompts):  # once more: blocks refused in the first pass were deleted
        try:
            pool.put(data[p][0], data[p][1])
            c.healed_hits += get_and_check(p)
        except Exception:
            c.client_errors += 1
    s = pool.stats
    c.failures_absorbed = s.lookup_failures + s.put_failures + s.get_failures
    c.rejected_blocks = s.rejected_blocks
    pool.close()
    results.put(asdict(c))


class RssSampler(threading.Thread):
    """Samples every shard process's RSS (MiB) twice a second; restarted shards included."""

    def __init__(self, tier: Any) -> None:
        super().__init__(daemon=True)
        self.tier, self.peak, self.done = tier, 0.0, threading.Event()
        self.baseline = max(self.sample())

    def sample(self) -> list[float]:
        import ray

        out = []
        for handle in list(self.tier.shards.values()):
            try:
                pid = ray.get(handle.pid.remote(), timeout=2)
                with open(f"/proc/{pid}/status") as f:
                    out += [int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS:")]
            except Exception:  # restarting: next time
                continue
        return out or [0.0]

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, *self.sample())


def main(
    clients: int, seconds: float, shards: int, kill_every: float, prompts: int, blocks: int,
    hostile: bool = False,
) -> dict[str, Any]:  # fmt: skip
    import contextlib

    from kvpool.services.redis_server import RedisServer
    from kvpool.services.server import Limits
    from kvpool.services.tier import TierConfig, start_tier

    budget = 256 << 20
    with contextlib.ExitStack() as stack:
        redis_url = None
        if hostile:
            server = stack.enter_context(RedisServer())
            redis_url = f"redis://{server.host}:{server.port}/0"
        tier = start_tier(
            TierConfig(shards=shards, budget_bytes=budget, shard_cpus=0.1, name="faults",
                       redis_url=redis_url, redis_mode="all")
        )  # fmt: skip
        stack.callback(tier.shutdown)
        sampler = RssSampler(tier)
        ctx = mp.get_context("spawn")
        recovered, results, stop = ctx.Event(), ctx.Queue(), ctx.Event()
        mac_key = b"faults tenant secret" if hostile else b""
        procs = [
            ctx.Process(
                target=client,
                args=(i, tier.endpoint, seconds, prompts, blocks, recovered, results, mac_key),
            )
            for i in range(clients)
        ]
        attacker = None
        if hostile:
            attacker = ctx.Process(
                target=hostile_attack.run, args=(tier.endpoint, redis_url, SHAPE, B, stop, results)
            )
        for p in procs:
            p.start()
        sampler.start()
        if attacker is not None:
            attacker.start()
        rng, kills = random.Random(0), 0
        end = time.monotonic() + seconds + 10  # the clients prepare their data for a few seconds
        while time.monotonic() + kill_every < end:
            time.sleep(kill_every)
            tier.kill_shard(rng.choice(sorted(tier.shards)))
            kills += 1
        time.sleep(max(0.0, end - time.monotonic()))
        stop.set()
        hostile_requests = results.get(timeout=120) if attacker is not None else 0
        tier.wait_serving()
        recovered.set()
        counts = [results.get(timeout=600) for _ in procs]
        for p in [*procs, *([attacker] if attacker else [])]:
            p.join(timeout=60)
        sampler.done.set()
    total = {f.name: sum(c[f.name] for c in counts) for f in fields(Counts)}
    growth = sampler.peak - sampler.baseline
    cap = (budget + Limits().upload_bytes) / 2**20
    return {
        "clients": clients, "seconds": seconds, "shards": shards, "shard_kills": kills, **total,
        "hit_ratio_after_recovery": round(total["recovery_hits"] / max(1, total["recovery_blocks"]), 4),
        "hit_ratio_after_heal": round(total["healed_hits"] / max(1, total["recovery_blocks"]), 4),
        "hostile": hostile, "hostile_requests": hostile_requests,
        "shard_rss_baseline_mib": round(sampler.baseline, 1),
        "shard_rss_growth_mib": round(growth, 1),
        "shard_rss_over_budget_mib": round(growth - cap, 1),
    }  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=6.0)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hostile", action="store_true", help="a hostile process beside it")
    a = parser.parse_args()
    result = main(a.clients, a.seconds, a.shards, a.kill_every, a.prompts, a.blocks, a.hostile)
    for key, value in result.items():
        print(f"{key:26} {value}")
    print(json.dumps(result))
