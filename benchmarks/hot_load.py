"""Per-shard load under a shared first block: bytes served max / mean, with and without
spreading hot blocks over replicas, one run.

    python benchmarks/hot_load.py                  # 16 shards, 400 requests of 23 blocks

`--shards` shards (gRPC servers in this process, without Ray; one client over TCP). Every
request is a prefix of 23 blocks: block 0 shared by all requests (a system prompt), blocks 1-3
one of 4 variants (tool sets), the rest its own, as in Mooncake's conversation trace. All
requests are put, then each reads its whole prefix with one get_many; the load of a shard is
the bytes it served (StatsResponse.bytes_served) during the reads. The first pass reads with
`max_hot_replicas=1` (no spreading), the second with the default; the shards' hot counters are
warm for the second. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

from batch_ops import NS, template
from store import bind

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.keys import BlockHash, block_keys
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import BlockPut, ClientConfig, TierClient


async def load(address: str, requests: list[list[BlockHash]], blob: bytes, hot: int) -> float:
    """max / mean of the bytes each shard served while every request read its prefix."""
    tier = TierClient(address, ClientConfig(same_host=False, max_hot_replicas=hot))
    try:
        for keys in requests:
            await tier.put_many(NS, [BlockPut(k, keys[0], i, bind(blob, NS, k, i),
                                              keys[i - 1] if i else b"")
                                     for i, k in enumerate(keys)])  # fmt: skip
        before = {s.shard_id: s.bytes_served for s in await tier.stats()}
        for keys in requests:
            await tier.get_many(NS, keys)
        served = [s.bytes_served - before[s.shard_id] for s in await tier.stats()]
    finally:
        await tier.close()
    return max(served) / (sum(served) / len(served))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--requests", type=int, default=400)
    args = p.parse_args()
    servers: list[ShardServer] = []

    async def topology() -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=1, shards=[
            pb.Shard(shard_id=s.shard_id, address=s.address) for s in servers])  # fmt: skip

    for i in range(args.shards):
        servers.append(ShardServer(BlockStore(1 << 30), f"s{i}", topology, shared_dir=None))
        servers[-1].start()
    rng = random.Random(0)
    b = NS.block_tokens
    requests = [
        block_keys(
            NS,
            [0] * b
            + [1000 + rng.randrange(4)] * 3 * b
            + [rng.randrange(10**6) for _ in range(19 * b)],
        )
        for _ in range(args.requests)
    ]
    blob = template()
    try:
        plain = asyncio.run(load(servers[0].address, requests, blob, hot=1))
        spread = asyncio.run(load(servers[0].address, requests, blob, hot=8))
    finally:
        for s in servers:
            s.stop()
    print(json.dumps({"shards": args.shards, "max_over_mean_plain": round(plain, 2),
                      "max_over_mean_hot_replicas": round(spread, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
