"""Block operations per second of small blocks: one RPC per block, batches, and Redis, one run.

    python benchmarks/batch_ops.py                 # 3 shards, 4096 blocks of about 4.6 KiB
    python benchmarks/batch_ops.py --blocks 8192 --prefix 32

A tier of `--shards` Ray shard actors (as `kvpool serve` starts them) on this machine and one
client process. The blocks form prefixes of `--prefix` blocks (a request's worth), each bound
to its key and position (one block encoded once and re-sealed per key, untimed), each put with
its parent. Phases, each on fresh keys (the gets read what the put before them stored):

  put / get            TierClient.put / get, one block per call, `--inflight` calls at once
                       (the same-host path: lookups, gets and puts on the shards' Unix sockets)
  tcp put / get        the same with the same-host path off: one gRPC call per block
  batch put / get      TierClient.put_many / get_many of one prefix per call, `--inflight`
                       prefixes at once: one batch request per shard on its Unix socket
  tcp batch put / get  the same over gRPC (one BatchPut / BatchGet per shard)
  redis set / get      a real redis-server, redis-py with hiredis: one pipeline of SETs / GETs
                       per prefix (what a Redis-backed cache does per request), one connection

Figures are block operations per second (blocks moved / wall time). On a shared 2-core machine
the absolute figures are noise; compare the ratios of one run. Prints a table, then one JSON
object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence

import redis
import torch
from store import bind  # benchmarks/, on sys.path as the script's folder

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto.keys import block_keys
from kvpool.services.redis_server import RedisServer
from kvpool.services.tier import TierConfig, start_tier
from kvpool.transport import BlockPut, ClientConfig, TierClient

CODEC = CodecConfig(2, 2, 64)
NS = namespace_for("bench/batch", 2, 1, 64, torch.float16, CODEC, block_tokens=64)


def template() -> bytes:
    g = torch.Generator().manual_seed(0)
    shape = (NS.layers, NS.kv_heads, NS.block_tokens, NS.head_dim)
    return encode(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half(),
                  CODEC)  # fmt: skip


def prefixes(seed: int, count: int, length: int, blob: bytes) -> list[list[BlockPut]]:
    """`count` prefixes of `length` blocks, fresh keys for `seed`."""
    out = []
    for p in range(count):
        start = (seed * 100_000 + p) * 10_000
        tokens = range(start, start + length * NS.block_tokens)
        keys = block_keys(NS, tokens)
        out.append([BlockPut(k, keys[0], i, bind(blob, NS, k, i), keys[i - 1] if i else b"")
                    for i, k in enumerate(keys)])  # fmt: skip
    return out


async def timed(
    limit: int, items: Sequence[object], fn: Callable[[object], Awaitable[int]]
) -> float:
    """Block operations per second of fn over items, `limit` at once."""
    gate = asyncio.Semaphore(limit)

    async def one(item: object) -> int:
        async with gate:
            return await fn(item)

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(one(x) for x in items)))
    return n / (time.perf_counter() - t0)


async def kvpool_phases(endpoint: str, args: argparse.Namespace, blob: bytes) -> dict[str, float]:
    count = args.blocks // args.prefix
    sock = TierClient(endpoint, ClientConfig(timeout_s=60.0, max_inflight=args.inflight))
    tcp = TierClient(endpoint, ClientConfig(timeout_s=60.0, max_inflight=args.inflight,
                                            same_host=False))  # fmt: skip
    out: dict[str, float] = {}
    try:
        for name, tier, seed in (("", sock, 1), ("tcp_", tcp, 2)):
            blocks = [b for p in prefixes(seed, count, args.prefix, blob) for b in p]

            async def put(b: object, tier: TierClient = tier) -> int:
                assert isinstance(b, BlockPut)
                return int(await tier.put(NS, b.key, b.chain, b.position, b.data, b.parent))

            async def get(b: object, tier: TierClient = tier) -> int:
                assert isinstance(b, BlockPut)
                return int(await tier.get(NS, b.key) == b.data)

            await tier.lookup(NS, [blocks[0].key])  # topology and arenas, untimed
            out[f"{name}put"] = await timed(args.inflight, blocks, put)
            out[f"{name}get"] = await timed(args.inflight, blocks, get)
        for name, tier, seed in (("batch_", sock, 3), ("tcp_batch_", tcp, 4)):
            batch = prefixes(seed, count, args.prefix, blob)

            async def put_many(p: object, tier: TierClient = tier) -> int:
                assert isinstance(p, list)
                return sum(await tier.put_many(NS, p))

            async def get_many(p: object, tier: TierClient = tier) -> int:
                assert isinstance(p, list)
                got = await tier.get_many(NS, [b.key for b in p])
                return sum(g == b.data for g, b in zip(got, p, strict=True))

            out[f"{name}put"] = await timed(args.inflight, batch, put_many)
            out[f"{name}get"] = await timed(args.inflight, batch, get_many)
    finally:
        await sock.close()
        await tcp.close()
    return out


def redis_phases(port: int, args: argparse.Namespace, blob: bytes) -> dict[str, float]:
    count = args.blocks // args.prefix
    r = redis.Redis("127.0.0.1", port)
    batch = [[os.urandom(32) for _ in range(args.prefix)] for _ in range(count)]
    t0 = time.perf_counter()
    for keys in batch:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.set(k, blob)
        pipe.execute()
    put = args.blocks / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    got = 0
    for keys in batch:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        got += sum(v == blob for v in pipe.execute())
    get = got / (time.perf_counter() - t0)
    return {"redis_set": put, "redis_get": get}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--blocks", type=int, default=4096)
    p.add_argument("--prefix", type=int, default=32, help="blocks per request (per batch)")
    p.add_argument("--inflight", type=int, default=16)
    args = p.parse_args()
    blob = template()
    tier = start_tier(TierConfig(shards=args.shards, budget_bytes=1 << 30, shard_cpus=0.1,
                                 metrics_port=None, name="batch-bench"))  # fmt: skip
    try:
        result = asyncio.run(kvpool_phases(tier.endpoint, args, blob))
    finally:
        tier.shutdown()
    with RedisServer() as server:
        result.update(redis_phases(server.port, args, blob))
    result = {k: round(v) for k, v in result.items()}
    result["block_bytes"] = len(blob)
    for path in ("batch", "tcp_batch"):
        result[f"{path}_get_vs_redis"] = round(result[f"{path}_get"] / result["redis_get"], 2)
        result[f"{path}_put_vs_redis"] = round(result[f"{path}_put"] / result["redis_set"], 2)
    for k, v in result.items():
        print(f"{k:22s} {v:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
