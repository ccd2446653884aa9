"""The tier end to end: a real local Ray cluster, shard actors serving real gRPC, the client.

One Ray instance and one two-shard tier serve the whole module (Ray takes seconds to start).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import ray
import torch

from kvpool.client import AsyncKVPool, KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig, decode, encode
from kvpool.proto.keys import block_keys
from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.transport import ClientConfig

CODEC = CodecConfig(2, 2, 64)
B = 64  # block_tokens
NS = namespace_for("test/tier", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
CONFIG = TierConfig(shards=2, budget_bytes=32 << 20, shard_cpus=0.1, name="test")
FAST = ClientConfig(timeout_s=3.0, topology_ttl_s=0.5)


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NS.layers, NS.kv_heads, tokens, NS.head_dim)
    return torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()


def tokens(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(CONFIG)
    yield t
    t.shutdown()


@pytest.fixture
def client(tier: Tier) -> Iterator[KVPool]:
    with KVPool(tier.endpoint, NS, CODEC, config=FAST) as c:
        yield c


def test_tensors_round_trip_through_the_tier(client) -> None:
    toks = tokens(4 * B + 10, seed=1)
    k, v = kv(len(toks), seed=1)
    assert client.lookup(toks) == 0 and client.get(toks) is None
    assert client.put(toks, (k, v)) == 4  # full blocks only; the 10-token tail is not stored
    assert client.lookup(toks) == 4 * B
    got = client.get(toks)
    assert (
        got is not None and got.tokens == 4 * B and got.keys is not None and got.values is not None
    )
    for i in range(4):  # exactly what the codec gives locally, block by block
        local = decode(
            encode(k[:, :, i * B : (i + 1) * B], v[:, :, i * B : (i + 1) * B], CODEC, i * B)
        )
        assert torch.equal(got.keys[:, :, i * B : (i + 1) * B], local.keys)
        assert torch.equal(got.values[:, :, i * B : (i + 1) * B], local.values)
    assert client.put(toks, (k, v)) == 0  # stored already: nothing is encoded or sent
    assert client.stats.put_failures == client.stats.get_failures == 0


def test_partial_prefix_hits(client) -> None:
    toks = tokens(3 * B, seed=2)
    client.put(toks, kv(3 * B, seed=2))
    longer = toks + tokens(2 * B, seed=3)
    assert client.lookup(longer) == 3 * B
    got = client.get(longer)
    assert got is not None and got.tokens == 3 * B and got.keys is not None
    assert got.keys.shape == (2, 2, 3 * B, 64)
    diverged = list(toks)
    diverged[B + 5] += 1  # block 1 differs: only block 0 is shared
    assert client.lookup(diverged) == B
    assert client.lookup(toks[: 2 * B + 3]) == 2 * B


def test_the_async_client(tier) -> None:
    async def run() -> tuple[int, int, int]:
        c = AsyncKVPool(tier.endpoint, NS, CODEC, config=FAST)
        toks = tokens(2 * B, seed=4)
        stored = await c.put(toks, kv(2 * B, seed=4))
        got = await c.get(toks)
        await c.close()
        return stored, await_tokens(got), c.stats.blocks_fetched

    def await_tokens(got) -> int:
        return 0 if got is None else got.tokens

    assert asyncio.run(run()) == (2, 2 * B, 2)


def test_tenants_and_codecs_never_share_blocks(tier, client) -> None:
    toks = tokens(2 * B, seed=5)
    client.put(toks, kv(2 * B, seed=5))
    salted = namespace_for(
        "test/tier", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"tenant-b"
    )
    other_codec = CodecConfig(4, 4, 64)
    other = namespace_for("test/tier", 2, 2, 64, torch.float16, other_codec, block_tokens=B)
    for ns, codec in ((salted, CODEC), (other, other_codec)):
        with KVPool(tier.endpoint, ns, codec, config=FAST) as c:
            assert c.lookup(toks) == 0 and c.get(toks) is None


def test_another_process_hits_the_same_prefix(tier, client) -> None:
    toks = tokens(3 * B, seed=6)
    client.put(toks, kv(3 * B, seed=6))
    code = (
        "import torch; from kvpool.client import KVPool, namespace_for;"
        "from kvpool.kernels.codec import CodecConfig;"
        f"codec = CodecConfig(2, 2, 64); ns = namespace_for('test/tier', 2, 2, 64, torch.float16, codec, block_tokens={B});"
        f"c = KVPool({tier.endpoint!r}, ns, codec); got = c.get({toks!r});"
        "print(got.tokens, float(got.keys.float().abs().sum())); c.close()"
    )
    env = {**os.environ, "PYTHONHASHSEED": "777"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    n, total = out.stdout.split()
    mine = client.get(toks)
    assert mine is not None and mine.keys is not None
    assert int(n) == 3 * B and float(total) == pytest.approx(float(mine.keys.float().abs().sum()))


def test_a_tier_that_is_down_gives_misses_and_dropped_saves() -> None:
    with KVPool("127.0.0.1:1", NS, CODEC, config=ClientConfig(timeout_s=1.0)) as c:
        toks = tokens(2 * B, seed=7)
        t0 = time.monotonic()
        assert c.lookup(toks) == 0
        assert c.put(toks, kv(2 * B, seed=7)) == 0
        assert c.get(toks) is None
        assert time.monotonic() - t0 < 30
        assert c.stats.lookup_failures >= 1


def test_bad_input_still_raises(client) -> None:
    with pytest.raises(ValueError):
        client.put(tokens(2 * B), kv(B))  # KV shorter than the full blocks
    with pytest.raises(ValueError):
        client.lookup([-1] * B)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_a_killed_shard_gives_misses_then_serves_again(tier, client) -> None:
    toks = tokens(8 * B, seed=8)
    client.put(toks, kv(8 * B, seed=8))
    assert client.lookup(toks) == 8 * B
    keys = block_keys(NS, toks)
    owners = [client.tier.owners(k)[0] for k in keys]
    victim = owners[0]
    pid = ray.get(tier.shards[victim].pid.remote())
    tier.kill_shard(victim)  # Ray restarts it: same id, same port, empty store
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    assert client.lookup(toks) == 0  # block 0 lived there: a miss, not an error
    assert client.get(toks) is None
    tier.wait_serving()  # Ray restarted it
    assert client.lookup(toks) == 0  # restarted empty
    assert client.put(toks, kv(8 * B, seed=8)) == owners.count(victim)  # only its blocks again
    assert client.lookup(toks) == 8 * B


def test_shards_added_to_a_running_tier_take_new_blocks(tier, client) -> None:
    before = client.tier.epoch
    gcs = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "serve", "--address", gcs, "--name", CONFIG.name,
         "--shards", "1", "--budget", "32MiB", "--shard-cpus", "0.1", "--detach"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(tier.topology()) == 3
    wait_for(lambda: (client.call(client.tier.refresh(force=True)), client.tier.epoch != before)[1])
    assert len(client.tier._addresses) == 3
    toks = tokens(24 * B, seed=9)
    assert client.put(toks, kv(24 * B, seed=9)) == 24
    assert client.lookup(toks) == 24 * B
    per_shard = {s.shard_id: s.blocks for s in client.call(client.tier.stats())}
    assert len(per_shard) == 3 and all(n > 0 for n in per_shard.values())


def test_replicated_blocks_survive_a_dead_shard(ray_session: None) -> None:
    config = TierConfig(
        shards=2, budget_bytes=16 << 20, shard_cpus=0.1, replication=2, name="replicated"
    )
    tier = start_tier(config)
    try:
        with KVPool(tier.endpoint, NS, CODEC, config=FAST) as c:
            toks = tokens(4 * B, seed=10)
            assert c.put(toks, kv(4 * B, seed=10)) == 4
            stats = c.call(c.tier.stats())
            assert [s.blocks for s in stats] == [4, 4]  # every block on both shards
            tier.kill_shard("shard-0", restart=False)
            got = c.get(toks)
            assert got is not None and got.tokens == 4 * B
    finally:
        tier.shutdown()
