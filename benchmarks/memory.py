"""Memory under write load and over a soak: does a shard stay within its byte budget?

    python benchmarks/memory.py                          # writes of 2x the budget
    python benchmarks/memory.py --soak-seconds 600       # plus a 10-minute put/get soak

One shard actor (`start_tier`, `--budget-mib`) takes 4.5 MiB blocks (a Llama-3-8B-shaped
256-token block, 2-bit) from a client in this process. The shard process's resident memory
(VmRSS from /proc) is sampled before any block (baseline), and after every put while twice the
budget is written under fresh keys (one encoded block, its header bound to each key: see
store.bind). overhead_mib = peak RSS - baseline - budget: what the shard holds beyond the
blocks' bytes (Python objects, gRPC buffers, allocator slack). The soak
then puts and gets random blocks (half of them re-reads) for `--soak-seconds`, sampling RSS
every 10 s; rss_slope_mib_per_min is a least-squares slope over the samples after the first
minute (flat memory: close to 0). Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import ray
import torch
from store import bind  # benchmarks/, on sys.path as the script's folder

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.services.tier import TierConfig, start_tier
from kvpool.transport import TierClient

CODEC = CodecConfig(2, 2, 128)
NS = namespace_for("bench/memory", 32, 8, 128, torch.float16, CODEC, block_tokens=256)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def key(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def main(budget_mib: int, soak_seconds: float) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(32, 8, 256, 128, generator=g).half() for _ in range(2))
    blob = encode(k, v, CODEC)
    tier = start_tier(
        TierConfig(shards=1, budget_bytes=budget_mib << 20, shard_cpus=0.1, name="memory")
    )
    handle = next(iter(tier.shards.values()))
    pid = ray.get(handle.pid.remote())
    result: dict[str, Any] = {"budget_mib": budget_mib, "block_bytes": len(blob)}

    async def run() -> None:
        tier_client = TierClient(tier.endpoint)
        result["rss_baseline_mib"] = round(rss_mib(pid), 1)
        n = 2 * (budget_mib << 20) // len(blob)
        peak = 0.0
        for i in range(n):
            await tier_client.put(NS, key(i), key(i), 0, bind(blob, NS, key(i), 0))
            peak = max(peak, rss_mib(pid))
        stats = ray.get(handle.stats.remote())
        result.update({
            "written_mib": round(n * len(blob) / 2**20, 1), "blocks_held": stats["blocks"],
            "held_mib": round(stats["bytes"] / 2**20, 1), "evictions": stats["evictions"],
            "rss_peak_mib": round(peak, 1),
            "overhead_mib": round(peak - result["rss_baseline_mib"] - budget_mib, 1),
        })  # fmt: skip
        if soak_seconds <= 0:
            await tier_client.close()
            return
        rng, samples, ops, hits = random.Random(0), [], 0, 0
        start = next_sample = time.monotonic()
        fresh = n
        while time.monotonic() - start < soak_seconds:
            if rng.random() < 0.5:
                await tier_client.put(NS, key(fresh), key(fresh), 0, bind(blob, NS, key(fresh), 0))
                fresh += 1
            else:
                hits += (
                    await tier_client.get(NS, key(rng.randrange(max(0, fresh - 200), fresh)))
                    is not None
                )
            ops += 1
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, rss_mib(pid)))
                next_sample += 10.0
        await tier_client.close()
        late = [(t, r) for t, r in samples if t >= 60.0] or samples
        mt = sum(t for t, _ in late) / len(late)
        mr = sum(r for _, r in late) / len(late)
        var = sum((t - mt) ** 2 for t, _ in late) or 1.0
        slope = sum((t - mt) * (r - mr) for t, r in late) / var * 60
        result.update({
            "soak_seconds": soak_seconds, "soak_ops": ops, "soak_get_hits": hits,
            "soak_rss_min_mib": round(min(r for _, r in late), 1),
            "soak_rss_max_mib": round(max(r for _, r in late), 1),
            "rss_slope_mib_per_min": round(slope, 2),
            "soak_samples_mib": [round(r, 1) for _, r in samples],
        })  # fmt: skip

    import asyncio

    try:
        asyncio.run(run())
    finally:
        tier.shutdown()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--soak-seconds", type=float, default=0.0)
    a = parser.parse_args()
    out = main(a.budget_mib, a.soak_seconds)
    for name, value in out.items():
        if name != "soak_samples_mib":
            print(f"{name:24} {value}")
    print(json.dumps(out))
