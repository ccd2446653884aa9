"""A hostile process beside a tier, for `benchmarks/faults.py --hostile`.

It runs in its own process and, until told to stop, cycles through everything issue 9 found a
client could do to a shard, counting each request it makes (`hostile_requests`):
- stalled uploads: Puts that announce a large block, send one chunk and then nothing;
- floods of refused uploads (issue 21): 12 Puts at once, each announcing a 60 MiB block of a
  valid namespace and pushing 59 MiB of it at once, then trickling one byte every 3 s; one
  fits the upload budget, the others are refused, and the bytes they pushed must not stay;
- oversized uploads: Puts announcing more than a block may be;
- junk namespaces: Lookups, Gets and Deletes under random namespace ids, Puts whose namespace
  does not describe their block;
- garbage bytes: random bytes as the request of every RPC;
- misplaced blocks: real blocks put under other keys or positions;
- forged blocks, through the Redis tier (the attacker holds Redis, not the tenant's secret):
  every stored value is rewritten with a block bound to the same namespace, key and position,
  crc-valid, of the right shape, whose keys and values are all FORGED_VALUE, without a valid MAC.
Clients that ever decode a block of FORGED_VALUE have accepted a forgery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from typing import Any

FORGED_VALUE = 3.0


def run(endpoint: str, redis_url: str | None, shape: tuple[int, int, int], block_tokens: int,
        stop: Any, results: Any) -> None:  # fmt: skip
    """Process entry point: attack `endpoint` until `stop` is set; put the request count."""
    results.put(asyncio.run(_attack(endpoint, redis_url, shape, block_tokens, stop)))


async def _attack(
    endpoint: str, redis_url: str | None, shape: tuple[int, int, int], block_tokens: int, stop: Any
) -> int:
    import grpc
    import torch

    from kvpool.client import namespace_for
    from kvpool.kernels.codec import Binding, CodecConfig, encode
    from kvpool.proto import kvpool_pb2 as pb
    from kvpool.proto import kvpool_pb2_grpc as pb_grpc
    from kvpool.proto.messages import namespace_to_proto

    rng = random.Random(7)
    codec = CodecConfig(2, 2, 64)
    ns = namespace_for("bench/hostile", *shape, torch.float16, codec, block_tokens=block_tokens)
    layers, heads, dim = shape
    noise = torch.randn(layers, heads, block_tokens, dim).half()
    addresses = endpoint.split(",")
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [pb_grpc.KVPoolStub(c) for c in channels]
    count = 0

    def info(
        key: bytes, size: int, position: int = 0, namespace: Any = None, parent: bytes = b""
    ) -> Any:
        return pb.BlockInfo(
            namespace_id=ns.id, key=key, chain=key, position=position, size=size,
            namespace=namespace_to_proto(ns) if namespace is None else namespace, parent=parent,
        )  # fmt: skip

    async def put(stub: Any, first: Any, chunks: list[bytes], stall_s: float = 0.0) -> None:
        nonlocal count
        count += 1

        async def messages() -> Any:
            yield pb.PutRequest(info=first)
            for c in chunks:
                yield pb.PutRequest(chunk=c)
            if stall_s:
                await asyncio.sleep(stall_s)

        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Put(messages(), timeout=stall_s + 10)

    async def raw(channel: Any, method: str, payload: bytes) -> None:
        nonlocal count
        count += 1
        call = channel.unary_unary(f"/kvpool.v1.KVPool/{method}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(payload, timeout=5)

    def block(key: bytes, position: int, value: float | None = None) -> bytes:
        kv = noise if value is None else torch.full_like(noise, value)
        return encode(kv, kv, codec, block_tokens * position, binding=Binding(ns.id, key))

    async def forge_redis() -> None:
        """Rewrite every block in Redis with a forgery bound to the same place."""
        nonlocal count
        if redis_url is None:
            return
        import redis.asyncio as aredis

        from kvpool.proto.blockformat import parse_header

        r = aredis.Redis.from_url(redis_url)
        try:
            async for name in r.scan_iter(match=b"kvpool:v2:*", count=64):
                value = await r.get(name)
                count += 1
                if value is None or len(value) < 36 + 124:
                    continue
                head = parse_header(value[36:])
                kv = torch.full(
                    (head.layers, head.heads, head.tokens, head.head_dim), FORGED_VALUE
                ).half()
                codec_of = CodecConfig(head.key_bits, head.value_bits, head.group_size)
                fake = encode(
                    kv,
                    kv,
                    codec_of,
                    head.start_position,
                    binding=Binding(head.namespace_id, head.key),
                )
                await r.set(name, value[:36] + fake, keepttl=True)
                count += 1
        finally:
            await r.aclose()

    async def stalled() -> None:  # announce 12 MiB, send 1 MiB, then nothing for 20 s
        await put(rng.choice(stubs), info(os.urandom(32), 12 << 20), [os.urandom(1 << 20)], 20.0)

    async def flood() -> None:  # 12 x (60 MiB announced, 59 MiB at once, then 1 byte / 3 s)
        nonlocal count
        stub, chunk = rng.choice(stubs), os.urandom(1 << 20)

        async def one() -> None:
            async def messages() -> Any:
                yield pb.PutRequest(info=info(os.urandom(32), 60 << 20))
                for _ in range(59):
                    yield pb.PutRequest(chunk=chunk)
                while not stop.is_set():
                    await asyncio.sleep(3.0)
                    yield pb.PutRequest(chunk=b"x")

            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Put(messages(), timeout=120)

        count += 12
        await asyncio.gather(*(one() for _ in range(12)))

    async def malformed() -> None:
        stub, key = rng.choice(stubs), os.urandom(32)
        await put(stub, info(key, 1 << 30), [os.urandom(1 << 16)])  # oversized
        junk_ns = pb.Namespace(model="junk", layers=1)  # not its id, not its block's shape
        await put(stub, info(key, 1 << 16, namespace=junk_ns), [b"x"])
        b = block(key, 0)  # misplaced: a real block under another key, then another position
        await put(stub, info(os.urandom(32), len(b)), [b])
        await put(stub, info(key, len(b), position=1, parent=os.urandom(32)), [b])
        for method in ("Lookup", "Get", "Delete", "Put", "Stats", "Topology"):
            await raw(rng.choice(channels), method, os.urandom(rng.randrange(1, 4096)))
        junk = pb.LookupRequest(namespace_id=os.urandom(32), keys=[os.urandom(32)] * 64)
        await raw(rng.choice(channels), "Lookup", junk.SerializeToString())

    async def forever(attack: Any, pause_s: float) -> None:
        while not stop.is_set():
            await attack()
            await asyncio.sleep(pause_s)

    try:
        await asyncio.gather(
            *(forever(stalled, 0.1) for _ in range(8)),
            forever(flood, 1.0),
            forever(malformed, 0.05),
            forever(forge_redis, 1.0),
        )
    finally:
        for c in channels:
            await c.close()
    return count
