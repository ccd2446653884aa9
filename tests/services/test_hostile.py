"""A shard that trusts no client, a client that never hands a model a wrong tensor.

Each test reproduces one way a hostile peer hurt the tier before (issue 9) against a real
ShardServer (in its own process where memory is measured) and real clients: stalled and slow
uploads, junk namespaces, keys claimed across namespaces and tenants, crc-valid blocks of the
wrong shape or position in memory and in Redis, and blocks forged without the tenant's MAC key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import Binding, CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import Namespace, block_keys
from kvpool.proto.messages import namespace_to_proto
from kvpool.services.redis_tier import RedisTier
from kvpool.services.security import store_key
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import ClientConfig, channel_credentials
from tests.services.test_security import issue

CODEC = CodecConfig(8, 8, 64)  # 8-bit: a round trip is close enough to compare tensors
B = 64
NS = namespace_for("test/hostile", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
TOKENS = list(range(3 * B))
Code = grpc.StatusCode


def kv(seed: int, heads: int = 2, tokens: int = 3 * B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, heads, tokens, 64)
    return torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()


def bound_block(ns: Namespace, key: bytes, position: int, heads: int = 2, seed: int = 7) -> bytes:
    """A crc-valid block bound to (ns, key, position); `heads` may differ from ns's."""
    k, v = kv(seed, heads, B)
    return encode(k, v, CODEC, start_position=position * B, binding=Binding(ns.id, key))


# -- a shard in its own process, with TLS and two tenants ---------------------------------------

SHARD = """
import sys
from kvpool.services.security import ServerSecurity
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore
from kvpool.services.shard import fixed_mmap_threshold
d = sys.argv[1]
fixed_mmap_threshold()
limits = Limits(max_block_bytes=12 << 20, upload_bytes=32 << 20, peer_upload_bytes=16 << 20,
                peer_streams=8, admission_wait_s=0.2, idle_timeout_s=1.0, upload_timeout_s=3.0)
security = ServerSecurity(f"{d}/server.crt", f"{d}/server.key", None, f"{d}/tokens.json") if d else None
srv = ShardServer(BlockStore(32 << 20), "hostile", limits=limits, security=security,
                  metrics_port=0, shared_dir=None)
print(srv.start(), srv.metrics_address, flush=True)
sys.stdin.read()
srv.stop()
"""


@dataclass
class ShardProcess:
    """A shard in its own process: 32 MiB budget, 32 MiB of uploads in flight (16 per caller)."""

    address: str
    metrics: str  # host:port of its /metrics
    pid: int

    def rss_mib(self) -> float:
        return status_mib(self.pid, "VmRSS")

    def reset_peak(self) -> None:
        """Start a new high-water mark of its resident memory (Linux: clear_refs 5)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        """The most memory it held resident since `reset_peak` (VmHWM): no sampling."""
        return status_mib(self.pid, "VmHWM")

    def put_codes(self) -> Counter[str]:
        """How the shard itself ended the Puts it handled, by status code (its metrics)."""
        with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=30) as r:
            text = r.read().decode()
        return Counter(
            {
                sample.labels["code"]: int(sample.value)
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "kvpool_shard_requests_total" and sample.labels["method"] == "Put"
            }
        )


@contextlib.contextmanager
def shard_process(pki: Path | None) -> Iterator[ShardProcess]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARD, str(pki or "")], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    address, metrics = proc.stdout.readline().split()
    try:
        yield ShardProcess(address, metrics, proc.pid)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca = issue(d / "ca", "kvpool test CA", None, ca=True)
    issue(d / "server", "shard", ca, server=True)
    (d / "tokens.json").write_text(json.dumps({"token-good": "good", "token-evil": "evil"}))
    return d


@pytest.fixture(scope="module")
def shard(pki: Path) -> Iterator[ShardProcess]:
    """A shard process with TLS and two tenants."""
    with shard_process(pki) as s:
        yield s


def redis_url(server: object) -> str:
    return f"redis://{server.host}:{server.port}/0"  # type: ignore[attr-defined]


def status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def config(pki: Path | None, token: str) -> ClientConfig:
    if pki is None:
        return ClientConfig(timeout_s=10)
    return ClientConfig(tls_ca_file=str(pki / "ca.crt"), token=token, timeout_s=10)


def stalled_puts(
    address: str, pki: Path | None, token: str, streams: int, size: int, send: int
) -> list[grpc.StatusCode]:
    """`streams` concurrent Puts that announce `size` bytes, send `send` of them (1 MiB chunks),
    then stall until the shard ends them; their status codes. The client is grpc's sync API:
    grpc.aio's client reports INTERNAL ("Internal error from Core") for a call whose write the
    shard cut off by ending it, in place of the status the shard sent (grpc/grpc#36066), which
    is what this test checks (the shard's own count of codes is checked too)."""
    keys = block_keys(NS, range(B * streams))
    chunk = os.urandom(min(send, 1 << 20))
    release = threading.Event()

    def messages(key: bytes) -> Iterator[pb.PutRequest]:
        info = pb.BlockInfo(
            namespace_id=NS.id, key=key, chain=key, position=0, size=size,
            namespace=namespace_to_proto(NS),
        )  # fmt: skip
        yield pb.PutRequest(info=info)
        for _ in range(send // max(1, len(chunk))):
            yield pb.PutRequest(chunk=chunk)
        release.wait(120)  # stalled: the shard must end the call

    if pki is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(
            address, channel_credentials(str(pki / "ca.crt"), token=token)
        )
    codes = []
    with channel:
        stub = pb_grpc.KVPoolStub(channel)
        calls = [stub.Put.future(messages(k), timeout=120) for k in keys]
        for call in calls:
            try:
                call.result()
                codes.append(Code.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        release.set()
    return codes


def test_stalled_uploads_keep_rss_bounded_and_other_tenants_served(shard, pki) -> None:
    base, codes_before = shard.rss_mib(), shard.put_codes()
    shard.reset_peak()
    # The old shard allocated every announced size up front: 12 x 12 MiB before a byte came.
    with concurrent.futures.ThreadPoolExecutor(1) as attacker:
        attack = attacker.submit(
            stalled_puts, shard.address, pki, "token-evil", 12, 12 << 20, 1 << 20
        )
        good = put_and_get(shard.address, pki)
        codes = attack.result()
    peak = shard.peak_mib()
    assert good == 3 * B  # the good tenant stored and fetched all its blocks meanwhile
    # 8 streams admitted at most (the per-tenant stream cap), 16 MiB of them (the per-tenant
    # budget); the rest refused at once, the admitted ones dropped when they stalled.
    assert codes.count(Code.RESOURCE_EXHAUSTED) >= 12 - 8
    assert set(codes) <= {Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED}
    assert Code.DEADLINE_EXCEEDED in codes
    # ... and so the shard says it answered them (the good tenant's Puts were OK)
    refused = shard.put_codes() - codes_before
    del refused["OK"]  # the good tenant's
    assert refused == Counter(c.name for c in codes)
    assert peak - base < 16 + 3 * 8 + 16  # bytes received + the good tenant's blocks + slack
    # nothing of the stalled uploads was stored, and the budget is free again
    assert put_and_get(shard.address, pki, "token-evil", seed=5) == 3 * B


def test_refused_uploads_cost_no_memory() -> None:
    """Issue 21: 12 Puts announcing 12 MiB each push 11 MiB at once, then stall. One fits the
    caller's 16 MiB upload budget; the others are refused. The bytes the refused ones pushed
    were held all the same (gRPC's flow-control windows, grown by BDP probing, let in tens of
    MiB of a stream the shard never reads), and each refused upload's received bytes stayed
    resident afterwards (a reference cycle through the abort): three rounds must neither peak
    above the bytes the budget admits nor leave memory behind."""
    with shard_process(None) as shard:
        assert put_and_get(shard.address, None) == 3 * B  # warm: gRPC's first-use allocations
        base = shard.rss_mib()
        shard.reset_peak()
        codes: list[grpc.StatusCode] = []
        for _ in range(3):
            codes += stalled_puts(shard.address, None, "", 12, 12 << 20, 11 << 20)
        peak, after = shard.peak_mib(), shard.rss_mib()
        assert Code.OK not in codes
        by_shard = shard.put_codes()
        assert set(by_shard) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, by_shard
        assert by_shard["DEADLINE_EXCEEDED"] >= 3  # one admitted per round, then stalled
        assert peak - base < 16 + 16, (base, peak)  # one caller's upload budget + slack
        assert after - base < 16, (base, after)  # nothing of the rounds left behind


def put_and_get(address: str, pki: Path | None, token: str = "token-good", seed: int = 1) -> int:
    ns = namespace_for("test/hostile", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"s")
    with KVPool(address, ns, CODEC, config=config(pki, token)) as pool:
        k, v = kv(seed)
        pool.put(TOKENS, (k, v))
        hit = pool.get(TOKENS)
        assert pool.stats.put_failures == 0 and pool.stats.get_failures == 0, pool.stats
        assert hit is not None and hit.keys is not None
        torch.testing.assert_close(hit.keys, k[:, :, : hit.tokens], atol=0.05, rtol=0.02)
        return hit.tokens


def test_slow_uploads_are_dropped_at_their_deadline(shard, pki) -> None:
    address = shard.address
    creds = channel_credentials(str(pki / "ca.crt"), token="token-evil")
    key = block_keys(NS, range(B))[0]

    async def trickle() -> grpc.StatusCode:
        async with grpc.aio.secure_channel(address, creds) as channel:
            stub = pb_grpc.KVPoolStub(channel)

            async def messages() -> AsyncIterator[pb.PutRequest]:
                info = pb.BlockInfo(
                    namespace_id=NS.id, key=key, chain=key, position=0, size=8 << 20,
                    namespace=namespace_to_proto(NS),
                )  # fmt: skip
                yield pb.PutRequest(info=info)
                for _ in range(40):  # 64 KiB every 0.5 s: never idle 1 s, never done in 3 s
                    yield pb.PutRequest(chunk=bytes(64 << 10))
                    await asyncio.sleep(0.5)

            t0 = time.monotonic()
            try:
                await stub.Put(messages(), timeout=30)
            except grpc.aio.AioRpcError as e:
                assert time.monotonic() - t0 < 10
                return e.code()
            return Code.OK

    assert asyncio.run(trickle()) == Code.DEADLINE_EXCEEDED


# -- one shard in this process, for the rest ----------------------------------------------------


@pytest.fixture(scope="module")
def local(redis_server) -> Iterator[ShardServer]:
    tier = RedisTier(redis_url(redis_server), ttl_s=600, mode="all")
    srv = ShardServer(BlockStore(64 << 20), "local", redis=tier, limits=Limits())
    srv.start()
    yield srv
    srv.stop()
    tier.close()


def pool(srv: ShardServer, ns: Namespace = NS) -> KVPool:
    return KVPool(srv.address, ns, CODEC, config=ClientConfig(timeout_s=10))


def test_junk_namespaces_leave_no_state_to_exhaust(local) -> None:
    """1,100 distinct namespaces (the old cap was 1,024 per shard, never freed): each a miss or
    a stored block like any other, and a namespace that comes after works."""
    key = bytes(32)
    with grpc.insecure_channel(local.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        for i in range(1100):
            junk = pb.LookupRequest(namespace_id=i.to_bytes(32, "little"), keys=[key])
            assert stub.Lookup(junk, timeout=10).present == 0
    ns = namespace_for("test/after-junk", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
    with pool(local, ns) as p:
        assert p.put(TOKENS, kv(2)) == 3
        hit = p.get(TOKENS)
        assert hit is not None and hit.tokens == 3 * B


def test_no_namespace_claims_another_namespaces_keys(local) -> None:
    a = namespace_for("test/claim-a", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
    b = namespace_for("test/claim-b", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
    key = block_keys(a, TOKENS)[0]
    with grpc.insecure_channel(local.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        for ns, seed in ((a, 1), (b, 2)):  # the same key under two namespaces
            data = encode(*kv(seed, 2, B), CODEC, binding=Binding(ns.id, key))
            info = pb.BlockInfo(
                namespace_id=ns.id, key=key, chain=key, position=0, size=len(data),
                namespace=namespace_to_proto(ns),
            )  # fmt: skip
            reply = stub.Put(iter([pb.PutRequest(info=info), pb.PutRequest(chunk=data)]))
            assert reply.stored  # B's put is not a no-op because A holds the key
        for ns in (a, b):
            got = b"".join(r.chunk for r in stub.Get(pb.GetRequest(namespace_id=ns.id, key=key)))
            assert got and local.store.get(store_key(None, ns.id, key)) == got
        assert local.store.get(store_key(None, a.id, key)) != local.store.get(
            store_key(None, b.id, key)
        )


def test_misplaced_and_misshapen_blocks_in_memory_are_counted_misses(local) -> None:
    """A compromised shard (or a bug) serving crc-valid blocks that are not the ones asked for:
    the client refuses each before decoding and returns the prefix before it."""
    ns = namespace_for("test/misplaced", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
    keys = block_keys(ns, TOKENS)
    with pool(local, ns) as p:
        assert p.put(TOKENS, kv(3)) == 3
        sk = [store_key(None, ns.id, k) for k in keys]
        # block 1 replaced by block 0's bytes (right shape, wrong key and position);
        local.store.delete([sk[1]])
        local.store.put(sk[1], sk[0], 1, local.store.get(sk[0]) or b"")
        hit = p.get(TOKENS)
        assert hit is not None and hit.tokens == B and p.stats.rejected_blocks == 1
        # ... then by a block bound to its key and position with one KV head instead of two
        local.store.delete([sk[1]])
        local.store.put(sk[1], sk[0], 1, bound_block(ns, keys[1], 1, heads=1))
        hit = p.get(TOKENS)
        assert hit is not None and hit.tokens == B and p.stats.rejected_blocks == 2
        # ... then by one bound to its key but claiming another start position
        local.store.delete([sk[1]])
        local.store.put(sk[1], sk[0], 1, bound_block(ns, keys[1], 2))
        hit = p.get(TOKENS)
        assert hit is not None and hit.tokens == B and p.stats.rejected_blocks == 3
        assert p.stats.get_failures == 0
        rejected = p._client.metrics.rejected_blocks.labels("mismatch")._value.get()
        assert rejected >= 3
        # block by block (vLLM's path): the blocks end before the refused one, counted
        local.store.delete([sk[1]])
        local.store.put(sk[1], sk[0], 1, local.store.get(sk[0]) or b"")
        starts = [b.header.start_position for b in p.get_blocks(TOKENS, present=3 * B)]
        assert starts == [0] and p.stats.rejected_blocks == 4


def test_misplaced_and_misshapen_blocks_in_redis_are_misses(local, redis_server) -> None:
    ns = namespace_for("test/redis-poison", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
    keys = block_keys(ns, TOKENS)
    sk = [store_key(None, ns.id, k) for k in keys]
    r = redis.Redis.from_url(redis_url(redis_server))

    def poison(i: int, data: bytes, position: int) -> None:
        value = sk[0] + position.to_bytes(4, "little") + data  # the Redis tier's value layout
        r.set(b"kvpool:v2:" + sk[i].hex().encode(), value)

    poison(0, bound_block(ns, keys[0], 0), 0)  # a good block 0
    poison(1, bound_block(ns, keys[0], 0), 1)  # block 0's bytes under key 1: the shard refuses
    before = local.store.snapshot()
    with pool(local, ns) as p:
        hit = p.get(TOKENS)
        assert hit is not None and hit.tokens == B
        after = local.store.snapshot()
        assert after.mismatched_blocks == before.mismatched_blocks + 1
        poison(1, bound_block(ns, keys[1], 1, heads=1), 1)  # bound right, wrong shape: the
        hit = p.get(TOKENS)  # shard cannot tell (it knows no namespace); the client can
        assert hit is not None and hit.tokens == B
        assert p.stats.rejected_blocks == 1 and p.stats.get_failures == 0
    r.close()


def test_forged_blocks_are_misses_with_a_mac_key(local, redis_server) -> None:
    secret = b"tenant secret" * 2
    ns = namespace_for(
        "test/mac", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"t", mac_key=secret
    )
    forger_ns = namespace_for(
        "test/mac", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"t", mac_key=b"guess"
    )
    assert forger_ns.id == ns.id and block_keys(forger_ns, TOKENS) == block_keys(ns, TOKENS)
    with pool(local, forger_ns) as forger:  # knows the keys, not the secret: writes first
        assert forger.put(TOKENS, kv(4)) == 3
    with pool(local, ns) as reader:
        assert reader.lookup(TOKENS) == 3 * B  # present, but not the tenant's
        assert reader.get(TOKENS) is None
        assert reader.stats.rejected_blocks >= 1
        assert reader._client.metrics.rejected_blocks.labels("mac")._value.get() >= 1
        # the refused block was deleted: the tenant's own put now heals the prefix
        k, v = kv(6)
        assert reader.put(TOKENS, (k, v)) == 3
        hit = reader.get(TOKENS)
        assert hit is not None and hit.tokens == 3 * B and hit.keys is not None
        torch.testing.assert_close(hit.keys, k[:, :, : hit.tokens], atol=0.05, rtol=0.02)
    # the tenant's own blocks, then a block without a MAC planted in Redis as the next block
    more = [*TOKENS, *range(5000, 5000 + B)]
    keys = block_keys(ns, more)
    local.store.delete([store_key(None, ns.id, k) for k in keys[:3]])
    r = redis.Redis.from_url(redis_url(redis_server))
    r.delete(*(b"kvpool:v2:" + store_key(None, ns.id, k).hex().encode() for k in keys[:3]))
    with pool(local, ns) as writer:
        k, v = kv(5, 2, 4 * B)
        assert writer.put(TOKENS, (k, v)) == 3
        plain = bound_block(ns, keys[3], 3)  # bound right, written without the secret
        value = store_key(None, ns.id, keys[0]) + (3).to_bytes(4, "little") + plain
        r.set(b"kvpool:v2:" + store_key(None, ns.id, keys[3]).hex().encode(), value)
        assert writer.lookup(more) == 4 * B
        hit = writer.get(more)
        assert hit is not None and hit.tokens == 3 * B and hit.keys is not None
        torch.testing.assert_close(hit.keys, k[:, :, : 3 * B], atol=0.05, rtol=0.02)
        assert writer.stats.rejected_blocks == 1
    r.close()


def test_a_tier_that_never_answers_is_a_miss_within_the_call_deadline() -> None:
    """A peer that accepts connections and then says nothing: every call ends at its deadline
    as a miss or a dropped save, counted, for the sync client too."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    cfg = ClientConfig(timeout_s=30, call_timeout_s=0.5)
    try:
        with KVPool(address, NS, CODEC, config=cfg) as p:
            t0 = time.monotonic()
            assert p.get(TOKENS) is None
            assert p.lookup(TOKENS) == 0
            assert p.put(TOKENS, kv(8)) == 0
            assert list(p.get_blocks(TOKENS, present=3 * B)) == []
            assert time.monotonic() - t0 < 12  # four calls, not four 30 s RPC deadlines
            s = p.stats
            assert s.lookup_failures + s.get_failures + s.put_failures >= 4
    finally:
        silent.close()
