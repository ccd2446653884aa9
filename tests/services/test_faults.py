"""Shards killed at random under a put/get load: no client exception, no wrong tensor, and
every block comes back once the shards are up again. (benchmarks/faults.py runs the 60 s,
4-process version and reports counts.)"""

from __future__ import annotations

import random
import threading
import time

import torch

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig, decode, encode
from kvpool.services.tier import TierConfig, start_tier
from kvpool.transport import ClientConfig

B = 64
CODEC = CodecConfig(2, 2, 64)
NS = namespace_for("test/faults", 2, 2, 64, torch.float16, CODEC, block_tokens=B)


def prompt(seed: int) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor], list]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 50000, (3 * B,), generator=g).tolist()
    k, v = (torch.randn(2, 2, 3 * B, 64, generator=g).half() for _ in range(2))
    parts = [slice(i * B, (i + 1) * B) for i in range(3)]
    return toks, (k, v), [decode(encode(k[:, :, s], v[:, :, s], CODEC, s.start)) for s in parts]


def test_random_shard_kills_under_load(ray_session) -> None:
    tier = start_tier(TierConfig(shards=3, budget_bytes=64 << 20, shard_cpus=0.1, name="faults"))
    data = [prompt(seed) for seed in range(6)]
    errors, wrong, checked = [0], [0], [0]
    stop = threading.Event()

    def check(pool: KVPool, p: int) -> int:
        toks, _, expect = data[p]
        got = pool.get(toks)
        if got is None or got.keys is None or got.values is None:
            return 0
        for i in range(got.tokens // B):
            s = slice(i * B, (i + 1) * B)
            checked[0] += 1
            wrong[0] += not (
                torch.equal(got.keys[:, :, s], expect[i].keys)
                and torch.equal(got.values[:, :, s], expect[i].values)
            )
        return got.tokens // B

    def worker(seed: int, pool: KVPool) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                p = rng.randrange(len(data))
                pool.put(data[p][0], data[p][1])
                check(pool, rng.randrange(len(data)))
            except Exception:
                errors[0] += 1

    config = ClientConfig(timeout_s=2.0, topology_ttl_s=1.0)
    pools = [KVPool(tier.endpoint, NS, CODEC, config=config) for _ in range(2)]
    threads = [threading.Thread(target=worker, args=(i, pool)) for i, pool in enumerate(pools)]
    try:
        for t in threads:
            t.start()
        rng = random.Random(0)
        for _ in range(3):
            time.sleep(2.5)
            tier.kill_shard(rng.choice(sorted(tier.shards)))
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        tier.wait_serving()  # every shard back up
        hits = 0
        for p in range(len(data)):
            pools[0].put(data[p][0], data[p][1])
            hits += check(pools[0], p)
        assert errors[0] == 0 and wrong[0] == 0 and checked[0] > 0
        assert all(pool.stats.rejected_blocks == 0 for pool in pools)  # no bad block reached
        assert hits == 3 * len(data)  # hits come back after the restarts
        assert (
            sum(
                pool.stats.lookup_failures + pool.stats.put_failures + pool.stats.get_failures
                for pool in pools
            )
            > 0
        )
    finally:
        stop.set()
        for pool in pools:
            pool.close()
        tier.shutdown()
