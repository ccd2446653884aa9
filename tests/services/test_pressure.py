"""A tier beside a process that takes the node's memory: shards shrink their budget and evict
while the node is short of memory, and grow back once it is not (issue 21). The pressure is
real: a subprocess allocates and touches memory. The shards' reserve is set just under what
the node has available when the test starts, so a modest hog (3 GiB on a node with several
times that free) is pressure to them and never to the machine."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import ray
import torch

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.services.shard import available_bytes, next_budget
from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.transport import ClientConfig

CODEC = CodecConfig(2, 2, 64)
B = 256
NS = namespace_for("test/pressure", 8, 8, 128, torch.float16, CODEC, block_tokens=B)
HOG = 3 << 30
MARGIN = 1536 << 20  # pressure starts once the hog has taken this much of what was available
BUDGET = 64 << 20
HOG_CODE = """
import sys
a = bytearray(int(sys.argv[1]))
a[::4096] = b"\\x01" * len(range(0, len(a), 4096))  # touch every page: resident, not promised
print("ready", flush=True)
sys.stdin.read()
"""


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_next_budget_gives_back_the_shortfall_and_recovers_by_halves() -> None:
    mib = 1 << 20
    # 100 MiB short: the bytes held minus the shortfall, never below 1 MiB
    assert next_budget(512 * mib, 512 * mib, 300 * mib, 900 * mib, 1000 * mib) == 200 * mib
    assert next_budget(512 * mib, 512 * mib, 50 * mib, 900 * mib, 1000 * mib) == mib
    # the budget never grows under pressure, even when the store holds little
    assert next_budget(10 * mib, 512 * mib, 300 * mib, 900 * mib, 1000 * mib) == 10 * mib
    # no pressure: half the headroom back, up to the configured budget
    assert next_budget(10 * mib, 512 * mib, 0, 1200 * mib, 1000 * mib) == 110 * mib
    assert next_budget(10 * mib, 512 * mib, 0, 9000 * mib, 1000 * mib) == 512 * mib
    assert next_budget(512 * mib, 512 * mib, 0, 9000 * mib, 1000 * mib) == 512 * mib


@pytest.fixture
def tier(ray_session: None) -> Iterator[Tier]:
    if available_bytes() < HOG + (6 << 30):
        pytest.skip("not enough free memory for a safe 3 GiB hog")
    config = TierConfig(
        shards=1, budget_bytes=BUDGET, shard_cpus=0.1, name="pressure",
        memory_reserve_bytes=available_bytes() - MARGIN, pressure_period_s=0.2,
    )  # fmt: skip
    t = start_tier(config)
    yield t
    t.shutdown()


def test_shards_give_memory_back_under_pressure_and_take_it_again(tier: Tier) -> None:
    shard = next(iter(tier.shards.values()))

    def stats() -> dict[str, int]:
        return dict(ray.get(shard.stats.remote()))

    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 50000, (24 * B,), generator=g).tolist()
    k, v = (torch.randn(8, 8, 24 * B, 128, generator=g).half() for _ in range(2))
    with KVPool(tier.endpoint, NS, CODEC, config=ClientConfig(timeout_s=10)) as pool:
        assert pool.put(toks, (k, v)) == 24
        assert pool.lookup(toks) == 24 * B
        held = stats()["bytes"]
        assert stats()["budget_bytes"] == BUDGET and held > BUDGET // 4
        hog = subprocess.Popen(
            [sys.executable, "-c", HOG_CODE, str(HOG)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "ready"
            # short by ~1.5 GiB, more than the store holds: it gives back everything it can
            wait_for(lambda: stats()["budget_bytes"] < BUDGET and stats()["bytes"] < held // 2)
            assert stats()["evictions"] > 0
            assert pool.lookup(toks) < 24 * B  # evicted blocks are misses, not errors
            assert pool.stats.lookup_failures == 0
        finally:
            assert hog.stdin is not None
            hog.stdin.close()
            hog.wait(timeout=60)
        wait_for(lambda: stats()["budget_bytes"] == BUDGET)  # the hog is gone: all of it back
        assert pool.put(toks, (k, v)) > 0 and pool.lookup(toks) == 24 * B
