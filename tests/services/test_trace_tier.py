"""A slice of the production trace through real shards (gRPC servers without Ray) and the
client's batch calls, as benchmarks/trace_replay.py drives them: with room for everything, the
tier serves exactly the hits an infinite cache would, so keys, placement, parents and batches
reproduce the trace's sharing; with little room, what a lookup finds is always readable."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.blockformat import parse_header, seal
from kvpool.services.security import store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.trace import TRACE_BLOCK_TOKENS, TraceKeys, read_trace
from kvpool.transport import BlockPut, ClientConfig, TierClient

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-conversation.jsonl"
CODEC = CodecConfig(2, 2, 32)
NS = namespace_for("trace/tier", 1, 1, 32, torch.float16, CODEC, block_tokens=TRACE_BLOCK_TOKENS)
pytestmark = pytest.mark.skipif(not TRACE.exists(), reason="the shared trace is not here")


def template() -> bytes:
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, TRACE_BLOCK_TOKENS, 32)
    return encode(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half(),
                  CODEC)  # fmt: skip


def bind(blob: bytes, key: bytes, position: int) -> bytes:
    header = parse_header(blob)
    bound = dataclasses.replace(header, namespace_id=NS.id, key=key,
                                start_position=position * header.tokens)  # fmt: skip
    return seal(bound, memoryview(blob)[header.header_len :])


def tier(budget: int) -> Iterator[list[ShardServer]]:
    servers: list[ShardServer] = []

    async def topology() -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=1, shards=[
            pb.Shard(shard_id=s.shard_id, address=s.address) for s in servers])  # fmt: skip

    for i in range(3):
        servers.append(ShardServer(BlockStore(budget), f"t{i}", topology))
        servers[-1].start()
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def replay(servers: list[ShardServer], requests: int, probes: bool) -> tuple[int, int, int]:
    """(hit tokens through the tier, hit tokens of an infinite cache, blocks read), in order;
    reads by lookup and get_many, or by get_prefix (`probes`)."""
    reqs = read_trace(TRACE, limit=requests)
    tk = TraceKeys(NS)
    blob = template()

    async def go() -> tuple[int, int, int]:
        client = TierClient(servers[0].address, ClientConfig(timeout_s=30.0))
        seen: set[bytes] = set()
        hit = bound = read = 0
        try:
            for r in reqs:
                keys = tk(r)
                if probes:
                    n = len(await client.get_prefix(NS, keys))
                    read += n
                else:
                    n = await client.lookup(NS, keys) if keys else 0
                if n and not probes:
                    got = await client.get_many(NS, keys[:n])
                    assert all(b is not None for b in got)  # what a lookup found is readable
                    read += n
                puts = [BlockPut(k, keys[0], i, bind(blob, k, i))
                        for i, k in enumerate(keys) if i >= n]  # fmt: skip
                if puts:
                    await client.put_many(NS, puts, prefix=keys)
                m = 0
                while m < len(keys) and keys[m] in seen:
                    m += 1
                seen.update(keys)
                hit += r.hit_tokens(n)
                bound += r.hit_tokens(m)
        finally:
            await client.close()
        return hit, bound, read

    return asyncio.run(go())


@pytest.mark.parametrize("probes", [False, True], ids=["lookup-get_many", "get_prefix"])
def test_with_room_for_everything_the_tier_serves_every_hit_the_trace_has(probes: bool) -> None:
    for servers in tier(64 << 20):
        hit, bound, read = replay(servers, 150, probes)
        assert hit == bound > 0
        served = [s.store.snapshot().bytes_served for s in servers]
        assert all(b > 0 for b in served) and sum(served) >= read * len(template())


@pytest.mark.parametrize("probes", [False, True], ids=["lookup-get_many", "get_prefix"])
def test_with_little_room_hits_stay_readable_and_within_the_bound(probes: bool) -> None:
    blocks_per_shard = 40
    for servers in tier(blocks_per_shard * len(template())):
        hit, bound, _ = replay(servers, 150, probes)
        assert 0 < hit <= bound
        assert all(s.store.snapshot().evictions > 0 for s in servers)
        root = store_key(None, NS.id, TraceKeys(NS)(read_trace(TRACE, limit=1)[0])[0])
        assert any(root in s.store for s in servers)  # the block every request starts with
