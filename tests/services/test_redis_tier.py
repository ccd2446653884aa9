"""Redis as the second tier, against a real Redis server: write-through and spill on eviction,
read-through on a memory miss, blocks that outlive a shard restart, tenants kept apart."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import ray
import redis
import torch

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto.keys import block_keys
from kvpool.services.redis_server import free_port
from kvpool.services.redis_tier import RedisTier
from kvpool.services.security import store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.services.tier import TierConfig, start_tier

CODEC = CodecConfig(2, 2, 64)
B = 64
NS = namespace_for("test/redis", 2, 2, 64, torch.float16, CODEC, block_tokens=B)


def url(server) -> str:
    return f"redis://{server.host}:{server.port}/0"


def kv(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 2, tokens, 64)
    return torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()


def redis_key(key: bytes) -> bytes:
    """Where the shard (no authentication) keeps a block of NS in Redis."""
    return RedisTier.redis_key(store_key(None, NS.id, key))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def shard(redis_server) -> Iterator[tuple[ShardServer, RedisTier]]:
    """One shard without Ray whose memory holds 3 blocks, spilling evictions to Redis."""
    redis.Redis(redis_server.host, redis_server.port).flushall()
    tier = RedisTier(url(redis_server), ttl_s=60, mode="evicted")
    block = len(encode(*kv(B, 0), CODEC))
    srv = ShardServer(BlockStore(3 * block, on_evict=tier.offer), "s0", redis=tier)
    srv.start()
    yield srv, tier
    srv.stop()
    tier.close()


def test_evicted_blocks_are_read_through_from_redis(shard) -> None:
    srv, tier = shard
    with KVPool(srv.address, NS, CODEC) as pool:
        toks = tokens(8 * B, seed=1)
        k, v = kv(8 * B, seed=1)
        assert pool.put(toks, (k, v)) == 8
        tier.flush()
        assert len(srv.store) == 3 and tier.written == 5  # five evictions went to Redis
        assert pool.lookup(toks) == 8 * B  # memory and Redis together hold the whole prefix
        got = pool.get(toks)
        assert got is not None and got.tokens == 8 * B and got.keys is not None
        assert srv.store.stats.redis_hits >= 5
        missing = block_keys(NS, tokens(B, seed=99))[0]
        assert pool.call(pool.tier.get(NS, missing)) is None  # in neither tier
        assert srv.store.stats.redis_misses == 1


def test_a_corrupted_block_in_redis_is_a_miss(shard, redis_server) -> None:
    srv, tier = shard
    r = redis.Redis(redis_server.host, redis_server.port)
    with KVPool(srv.address, NS, CODEC) as pool:
        toks = tokens(5 * B, seed=2)
        pool.put(toks, kv(5 * B, seed=2))
        tier.flush()
        in_redis = [k for k in block_keys(NS, toks) if r.exists(redis_key(k))]
        key = in_redis[0]
        raw = bytearray(r.get(redis_key(key)))  # type: ignore[arg-type]
        raw[-5] ^= 0xFF
        r.set(redis_key(key), bytes(raw))
        before = srv.store.stats.checksum_failures
        got = pool.get(toks)
        index = block_keys(NS, toks).index(key)
        assert got is None or got.tokens == index * B  # the prefix ends before the bad block
        assert srv.store.stats.checksum_failures == before + 1


def test_an_intact_block_under_another_key_in_redis_is_a_miss(shard, redis_server) -> None:
    """A block moved to another Redis key (a poisoned Redis, a copy gone wrong) is intact but
    bound to its own key and position: the read-through refuses it and counts it."""
    srv, tier = shard
    r = redis.Redis(redis_server.host, redis_server.port)
    with KVPool(srv.address, NS, CODEC) as pool:
        toks = tokens(5 * B, seed=7)
        assert pool.put(toks, kv(5 * B, seed=7)) == 5
        tier.flush()
        keys = block_keys(NS, toks)
        in_redis = [k for k in keys if r.exists(redis_key(k))]
        assert len(in_redis) == 2  # memory holds three blocks: two were spilled
        r.set(redis_key(in_redis[1]), r.get(redis_key(in_redis[0])))  # type: ignore[arg-type]
        before = srv.store.snapshot()
        got = pool.get(toks)
        index = keys.index(in_redis[1])
        assert got is None or got.tokens == index * B  # the prefix ends before the moved block
        after = srv.store.snapshot()
        assert after.mismatched_blocks == before.mismatched_blocks + 1
        assert after.checksum_failures == before.checksum_failures  # intact, only misplaced
        assert store_key(None, NS.id, in_redis[1]) not in srv.store  # not put back into memory


def test_deleting_removes_from_redis_too(shard) -> None:
    srv, _ = shard
    with KVPool(srv.address, NS, CODEC) as pool:
        toks = tokens(6 * B, seed=3)
        pool.put(toks, kv(6 * B, seed=3))
        keys = block_keys(NS, toks)
        assert pool.call(pool.tier.delete(NS, keys)) == 6
        assert pool.lookup(toks) == 0


def test_a_restarted_shard_serves_its_blocks_again_from_redis(ray_session, redis_server) -> None:
    redis.Redis(redis_server.host, redis_server.port).flushall()
    config = TierConfig(
        shards=1, budget_bytes=16 << 20, shard_cpus=0.1, name="redis", redis_url=url(redis_server),
        port=free_port(),  # a fixed port: the restarted shard comes back at the same address
    )  # fmt: skip
    tier = start_tier(config)
    try:
        with KVPool(tier.endpoint, NS, CODEC) as pool:
            toks = tokens(4 * B, seed=4)
            assert pool.put(toks, kv(4 * B, seed=4)) == 4
            r = redis.Redis(redis_server.host, redis_server.port)
            deadline = time.monotonic() + 30
            while len(r.keys("kvpool:*")) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)  # written behind by the shard
            assert len(r.keys("kvpool:*")) == 4
            assert all(0 < r.ttl(k) <= 3600 for k in r.keys("kvpool:*"))
            handle = tier.shards["shard-0"]
            pid = ray.get(handle.pid.remote())
            tier.kill_shard("shard-0")
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            tier.wait_serving()  # Ray restarted it
            assert ray.get(handle.stats.remote())["blocks"] == 0  # restarted empty
            got = pool.get(toks)
            assert got is not None and got.tokens == 4 * B  # from Redis
            assert ray.get(handle.stats.remote())["redis_hits"] == 4
    finally:
        tier.shutdown()


def test_tenants_stay_apart_in_redis(shard) -> None:
    srv, tier = shard
    other = namespace_for("test/redis", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"b")
    with KVPool(srv.address, NS, CODEC) as a, KVPool(srv.address, other, CODEC) as b:
        toks = tokens(6 * B, seed=5)
        a.put(toks, kv(6 * B, seed=5))
        tier.flush()
        assert b.lookup(toks) == 0 and b.get(toks) is None


def test_a_redis_that_is_down_leaves_the_memory_tier_working() -> None:
    from kvpool.services.redis_server import free_port

    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, mode="all")  # nobody there
    srv = ShardServer(BlockStore(16 << 20), "s-down", redis=tier)
    srv.start()
    try:
        with KVPool(srv.address, NS, CODEC) as pool:
            toks = tokens(3 * B, seed=6)
            assert pool.put(toks, kv(3 * B, seed=6)) == 3  # memory took them
            tier.flush()
            assert tier.written == 0 and tier.errors >= 3  # each write-behind failed, counted
            assert pool.lookup(toks) == 3 * B
            got = pool.get(toks)
            assert got is not None and got.tokens == 3 * B
            missing = block_keys(NS, tokens(B, seed=98))[0]
            assert pool.call(pool.tier.get(NS, missing)) is None  # read-through error: a miss
            assert pool.stats.get_failures == 0
    finally:
        srv.stop()
        tier.close()


@pytest.mark.parametrize("kwargs", [{"mode": "some"}, {"ttl_s": 0}])
def test_bad_redis_tier_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        RedisTier("redis://127.0.0.1:1/0", **kwargs)
