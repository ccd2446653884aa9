"""Tenant quotas end to end: two tenants with tokens over TLS on a real shard, the real client.
A tenant that writes several times its share of the shard's budget evicts its own blocks, never
another tenant's working set; without a quota, the same traffic does evict it (the control).
Also `kvpool serve --tenant-quota` and a Ray tier wired with the tokens file's quotas."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch

from kvpool.cli import main
from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import Binding, CodecConfig, encode
from kvpool.proto.errors import TierError
from kvpool.proto.keys import block_keys
from kvpool.services.security import ServerSecurity, store_key
from kvpool.services.server import ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import ClientConfig
from tests.services.test_security import pki  # noqa: F401  (pki: a fixture)

CODEC = CodecConfig(2, 2, 64)
B = 64
NS = namespace_for("test/quotas", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
BUDGET = 16  # blocks per shard
A_PROMPT = list(range(6 * B))  # tenant A's working set: one 6-block prefix
B_PROMPTS = [list(range(10_000 * (p + 1), 10_000 * (p + 1) + 4 * B)) for p in range(8)]  # 32 blocks

OLD_FORM = {"token-a": "tenant-a", "token-b": "tenant-b"}
NEW_FORM = {"token-a": {"tenant": "tenant-a"}, "token-b": {"tenant": "tenant-b", "quota": 0.5}}


def tensors(blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 2, blocks * B, 64, generator=g).half() for _ in range(2))
    return k, v


BLOCK = len(encode(*tensors(1, seed=0), CODEC, binding=Binding(NS.id, bytes(32))))  # bytes


def security(pki: Path, tmp_path: Path, tokens: dict[str, object]) -> ServerSecurity:  # noqa: F811
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    return ServerSecurity(str(pki / "server.crt"), str(pki / "server.key"), tokens_file=str(path))


def pool(address: str, pki: Path, token: str, same_host: bool) -> KVPool:  # noqa: F811
    config = ClientConfig(
        timeout_s=10.0, tls_ca_file=str(pki / "ca.crt"), token=token, same_host=same_host
    )
    return KVPool(address, NS, CODEC, config=config)


def held(store: BlockStore, tenant: str, prompts: list[list[int]]) -> int:
    """Blocks of these prompts the store holds for `tenant`."""
    keys = [store_key(tenant, NS.id, k) for p in prompts for k in block_keys(NS, p)]
    return sum(key in store for key in keys)


def scan(b: KVPool) -> None:
    """Tenant B writes 4x its quota, each prompt in two turns (put, then read back and put
    what is missing): its blocks are reused as much as A's, so recency and frequency alone
    cannot tell them from A's working set."""
    for p, tokens in enumerate(B_PROMPTS):
        kv = tensors(4, seed=100 + p)
        for _ in range(2):
            b.put(tokens, kv)
            b.get(tokens)


@pytest.mark.parametrize(
    "tokens,tenant_quota,same_host",
    [
        (OLD_FORM, 0.5, True),  # kvpool serve --tenant-quota 0.5; the same-host path
        (OLD_FORM, 0.5, False),  # ... over gRPC
        (NEW_FORM, None, True),  # tenant-b's quota from the tokens file; tenant-a has none
        (OLD_FORM, None, True),  # the control: no quota
    ],
    ids=["tenant-quota", "tenant-quota-grpc", "tokens-file-quota", "no-quota"],
)
def test_a_tenants_scan_evicts_its_own_blocks_first(
    pki: Path,  # noqa: F811
    tmp_path: Path,
    tokens: dict[str, object],
    tenant_quota: float | None,
    same_host: bool,
) -> None:
    sec = security(pki, tmp_path, tokens)
    store = BlockStore(BUDGET * BLOCK, tenant_quota=tenant_quota, quotas=sec.quotas())
    srv = ShardServer(store, "quotas", security=sec)
    srv.start()
    try:
        with (
            pool(srv.address, pki, "token-a", same_host) as a,
            pool(srv.address, pki, "token-b", same_host) as b,
        ):
            assert a.put(A_PROMPT, tensors(6, seed=1)) == 6
            assert store.snapshot().bytes == 6 * BLOCK
            hit = a.get(A_PROMPT)
            assert hit is not None and hit.tokens == 6 * B
            scan(b)
            stats = store.snapshot()
            a_left = held(store, "tenant-a", [A_PROMPT])
            if tenant_quota is None and not sec.quotas():  # the control
                assert store.quota_bytes("tenant-b") is None
                assert a_left < 6 and a.lookup(A_PROMPT) < 6 * B  # B's scan evicted A's blocks
                assert stats.quota_evictions == 0
                return
            assert store.quota_bytes("tenant-b") == BUDGET * BLOCK // 2
            assert held(store, "tenant-b", B_PROMPTS) * BLOCK <= store.quota_bytes("tenant-b")
            assert held(store, "tenant-b", B_PROMPTS[-1:]) == 4  # B keeps its latest prompt
            assert stats.quota_evictions == 32 - 8 and stats.evictions == stats.quota_evictions
            assert a_left == 6 and a.lookup(A_PROMPT) == 6 * B
            hit = a.get(A_PROMPT)
            assert hit is not None and hit.tokens == 6 * B
    finally:
        srv.stop()


def test_serve_refuses_a_quota_without_tokens_or_out_of_range(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--tenant-quota", "0.5"])
    assert e.value.code == 2
    assert "--tenant-quota needs --auth-tokens" in capsys.readouterr().err
    for bad in ("0", "1.5", "-0.2", "nan", "half"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--auth-tokens", "tokens.json", "--tenant-quota", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--tenant-quota" in err and bad in err


def test_tier_config_validates_the_quota(pki: Path, tmp_path: Path) -> None:  # noqa: F811
    from kvpool.services.tier import TierConfig

    sec = security(pki, tmp_path, OLD_FORM)
    assert TierConfig(security=sec, tenant_quota=1.0).tenant_quota == 1.0
    with pytest.raises(ValueError, match="needs tenant tokens"):
        TierConfig(tenant_quota=0.5)
    for bad in (0.0, 1.01, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"tenant_quota must lie in \(0, 1\]"):
            TierConfig(security=sec, tenant_quota=bad)


def test_a_ray_tier_wires_the_quotas_into_its_shards(
    ray_session: None,
    pki: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`kvpool serve --tenant-quota 0.25` with tenant-b given 0.5 in the tokens file: the
    shard holds tenant-a to the default share and tenant-b to its own, and /metrics counts
    the quota evictions."""
    import ray

    from kvpool.services.tier import TierConfig, start_tier

    sec = security(pki, tmp_path, NEW_FORM)
    config = TierConfig(
        shards=1, budget_bytes=BUDGET * BLOCK, shard_cpus=0.1, name="quotas", security=sec,
        tenant_quota=0.25,
    )  # fmt: skip
    tier = start_tier(config)
    try:
        with (
            pool(tier.endpoint, pki, "token-a", True) as a,
            pool(tier.endpoint, pki, "token-b", True) as b,
        ):
            assert a.put(A_PROMPT, tensors(6, seed=1)) == 6
            assert a.lookup(A_PROMPT) == 4 * B  # tenant-a's 0.25: 4 blocks, its leaves went
            scan(b)
            assert a.lookup(A_PROMPT) == 4 * B
            assert [b.lookup(p) for p in B_PROMPTS[-2:]] == [4 * B, 4 * B]  # 8 blocks: its 0.5
            assert b.lookup(B_PROMPTS[-3]) == 0
        [shard] = tier.shards.values()
        stats = ray.get(shard.stats.remote())
        assert stats["quota_evictions"] == stats["evictions"] == 2 + 24
        [(_, _, metrics)] = tier.topology()
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "kvpool_shard_quota_evictions_total 26.0" in text
    finally:
        tier.shutdown()


@pytest.mark.parametrize("same_host", [True, False], ids=["put-shared", "put-grpc"])
def test_a_block_over_its_tenants_quota_is_refused_once_and_not_stored(
    pki: Path,  # noqa: F811
    tmp_path: Path,
    same_host: bool,
) -> None:
    """A block within the shard's budget but over its tenant's quota passes admission and is
    refused by the store: the one-block put (PutShared, or Put over gRPC) ends
    RESOURCE_EXHAUSTED, nothing is stored, and the refusal is counted once."""
    sec = security(pki, tmp_path, {"token-b": {"tenant": "tenant-b", "quota": 0.05}})
    store = BlockStore(BUDGET * BLOCK, quotas=sec.quotas())  # tenant-b: under one block
    srv = ShardServer(store, "quota-refusal", security=sec)
    srv.start()
    try:
        with pool(srv.address, pki, "token-b", same_host) as b:
            key = block_keys(NS, B_PROMPTS[0])[0]
            data = encode(*tensors(1, seed=5), CODEC, binding=Binding(NS.id, key))
            with pytest.raises(TierError) as refused:
                b.call(b.tier.put(NS, key, key, 0, data))
            assert refused.value.code == "RESOURCE_EXHAUSTED"
            assert store_key("tenant-b", NS.id, key) not in store and len(store) == 0
            assert store.snapshot().rejected == 1
    finally:
        srv.stop()
