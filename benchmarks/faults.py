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
`hit_ratio_after_recovery` is the fraction of those blocks that come back.
Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

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


def client(index: int, endpoint: str, seconds: float, prompts: int, blocks: int,
           recovered: Any, results: Any) -> None:  # fmt: skip
    import logging

    import torch

    from kvpool.client import KVPool, namespace_for
    from kvpool.kernels.codec import CodecConfig, decode, encode
    from kvpool.transport import ClientConfig

    logging.getLogger("kvpool").setLevel(logging.ERROR)  # absorbed failures are counted instead
    codec = CodecConfig(2, 2, 64)
    ns = namespace_for("bench/faults", *SHAPE, torch.float16, codec, block_tokens=B)
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
        expect = [decode(encode(k[:, :, s], v[:, :, s], codec, s.start)) for s in parts]
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
            same = torch.equal(got.keys[:, :, s], expect[i].keys) and torch.equal(
                got.values[:, :, s], expect[i].values
            )
            c.wrong_blocks += not same
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
    s = pool.stats
    c.failures_absorbed = s.lookup_failures + s.put_failures + s.get_failures
    c.rejected_blocks = s.rejected_blocks
    pool.close()
    results.put(asdict(c))


def main(
    clients: int, seconds: float, shards: int, kill_every: float, prompts: int, blocks: int
) -> dict[str, Any]:
    from kvpool.services.tier import TierConfig, start_tier

    tier = start_tier(
        TierConfig(shards=shards, budget_bytes=256 << 20, shard_cpus=0.1, name="faults")
    )
    ctx = mp.get_context("spawn")
    recovered, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=client, args=(i, tier.endpoint, seconds, prompts, blocks, recovered, results)
        )
        for i in range(clients)
    ]
    try:
        for p in procs:
            p.start()
        rng, kills = random.Random(0), 0
        end = time.monotonic() + seconds + 10  # the clients prepare their data for a few seconds
        while time.monotonic() + kill_every < end:
            time.sleep(kill_every)
            tier.kill_shard(rng.choice(sorted(tier.shards)))
            kills += 1
        time.sleep(max(0.0, end - time.monotonic()))
        tier.wait_serving()
        recovered.set()
        counts = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        tier.shutdown()
    total = {f.name: sum(c[f.name] for c in counts) for f in fields(Counts)}
    return {
        "clients": clients, "seconds": seconds, "shards": shards, "shard_kills": kills, **total,
        "hit_ratio_after_recovery": round(total["recovery_hits"] / max(1, total["recovery_blocks"]), 4),
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
    a = parser.parse_args()
    result = main(a.clients, a.seconds, a.shards, a.kill_every, a.prompts, a.blocks)
    for key, value in result.items():
        print(f"{key:26} {value}")
    print(json.dumps(result))
