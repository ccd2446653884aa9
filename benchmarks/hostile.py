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
                if not isinstance(value, bytes) or len(value) < 36 + 124:
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


# -- the flood alone, measured: python benchmarks/hostile.py [--rounds 12,12,24] ----------------

SHARD = """
import sys
from kvpool.services.server import Limits, ShardServer
from kvpool.services.shard import fixed_mmap_threshold
from kvpool.services.store import BlockStore
fixed_mmap_threshold()
srv = ShardServer(BlockStore(256 << 20), "flood", limits=Limits(), shared_dir=None)
print(srv.start(), flush=True)
sys.stdin.read()
srv.stop()
"""


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith(f"{field}:"))


def flood_rounds(rounds: list[int], trickle_s: float) -> list[dict[str, Any]]:
    """Floods of refused uploads against one shard process (default Limits: 128 MiB of
    uploads in flight, 64 MiB per caller): `n` Puts per round, each announcing 60 MiB, pushing
    59 MiB at once, then a byte every 3 s for `trickle_s`. Per round: the shard's peak RSS
    (VmHWM, reset before the round) and RSS after, in MiB, and the codes the client saw."""
    import subprocess
    import sys
    from collections import Counter
    from pathlib import Path

    import grpc
    import torch

    from kvpool.client import namespace_for
    from kvpool.kernels.codec import CodecConfig
    from kvpool.proto import kvpool_pb2 as pb
    from kvpool.proto import kvpool_pb2_grpc as pb_grpc
    from kvpool.proto.messages import namespace_to_proto

    ns = namespace_for("bench/flood", 4, 2, 64, torch.float16, CodecConfig(2, 2, 64))
    chunk = os.urandom(1 << 20)

    async def one_round(address: str, n: int) -> Counter[str]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.KVPoolStub(channel)

            async def put() -> str:
                key = os.urandom(32)

                async def messages() -> Any:
                    info = pb.BlockInfo(
                        namespace_id=ns.id, key=key, chain=key, position=0, size=60 << 20,
                        namespace=namespace_to_proto(ns),
                    )  # fmt: skip
                    yield pb.PutRequest(info=info)
                    for _ in range(59):
                        yield pb.PutRequest(chunk=chunk)
                    for _ in range(int(trickle_s // 3)):
                        await asyncio.sleep(3.0)
                        yield pb.PutRequest(chunk=b"x")

                try:
                    await stub.Put(messages(), timeout=trickle_s + 60)
                except grpc.aio.AioRpcError as e:
                    return e.code().name
                return "OK"

            return Counter(await asyncio.gather(*(put() for _ in range(n))))

    proc = subprocess.Popen(
        [sys.executable, "-c", SHARD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    address, out = proc.stdout.readline().strip(), []
    try:
        baseline = _status_mib(proc.pid, "VmRSS")
        for n in rounds:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # a new peak for this round
            codes = asyncio.run(one_round(address, n))
            out.append({
                "streams": n, "baseline_mib": round(baseline, 1),
                "peak_mib": round(_status_mib(proc.pid, "VmHWM"), 1),
                "after_mib": round(_status_mib(proc.pid, "VmRSS"), 1), "client_codes": dict(codes),
            })  # fmt: skip
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=flood_rounds.__doc__)
    parser.add_argument("--rounds", default="12,12,24", help="Puts per round")
    parser.add_argument("--trickle-s", type=float, default=9.0)
    a = parser.parse_args()
    rows = flood_rounds([int(n) for n in a.rounds.split(",")], a.trickle_s)
    for row in rows:
        print(row)
    print(json.dumps(rows))
