"""kvpool's HiCache backend against SGLang's real host pools, made by SGLang's factory, on a
real tier: what SGLang's cache controller calls (batch_set_v1, batch_exists, batch_get_v1)
with the page keys and prefix keys it passes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.utils import get_hash_str

from kvpool.basis import publish_basis
from kvpool.kernels.codec import KeyBasis
from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.sglang import SettingsError
from tests.sglang.hicache import (
    HEAD_DIM,
    HEADS,
    LAYERS,
    LAYOUTS,
    MODEL,
    PAGE,
    backend,
    dynamic,
    fill,
    host_pool,
    info,
    model_dir,
    pages,
    round_trip,
)

TOKENS = [(31 * i + 7) % 49152 for i in range(10 * PAGE)]  # 10 pages: 2 blocks and 2 pages


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=128 << 20, shard_cpus=0.1, name="sglang"))
    yield t
    t.shutdown()


@pytest.fixture(scope="module")
def keys() -> list[str]:
    """SGLang's own page keys for TOKENS (its C++ hash)."""
    out = get_hash_str(TOKENS, None, page_size=PAGE)
    assert isinstance(out, list) and len(out) == 10
    return out


def settings(tier: Tier, tmp_path: Path, **more: object) -> dict[str, object]:
    return dynamic(tier.endpoint, model_path=model_dir(tmp_path), **more)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pages_backed_up_then_prefetched_equal_the_codec_round_trip(
    tier: Tier, keys: list[str], tmp_path: Path, layout: str
) -> None:
    host = host_pool(layout)
    store = backend(host, settings(tier, tmp_path, salt=layout))
    slots = host.alloc(len(TOKENS))
    fill(host, slots, seed=LAYOUTS.index(layout))
    written = pages(host, slots)
    # backed up in two calls split inside block 1 (pages 0-5, then 6-9), as two radix nodes are
    ok = store.batch_set_v1(keys[:6], slots[: 6 * PAGE], info([]))
    ok += store.batch_set_v1(keys[6:], slots[6 * PAGE :], info(keys[:6]))
    assert ok == [True] * 10
    assert store.pool.stats.blocks_put == 2
    # every page of the 2 whole blocks is there; the 2 tail pages (no whole block) are not
    assert store.batch_exists(keys, info([])) == 8
    assert store.batch_exists(keys[5:], info(keys[:5])) == 3
    host.kv_buffer.zero_()
    into = host.alloc(len(TOKENS))
    got = store.batch_get_v1(keys, into, info([]))
    assert got == [True] * 8 + [False] * 2
    expect = round_trip(store, written, keys)
    assert torch.equal(pages(host, into[: 8 * PAGE]), expect)
    assert (pages(host, into[8 * PAGE :]) == 0).all()  # nothing written for a miss
    # a prefetch that starts inside a block (SGLang holds the first 5 pages) gets the rest
    host.kv_buffer.zero_()
    later = host.alloc(5 * PAGE)
    assert store.batch_get_v1(keys[5:], later, info(keys[:5])) == [True] * 3 + [False] * 2
    assert torch.equal(pages(host, later[: 3 * PAGE]), expect[..., 5 * PAGE :, :])
    store.close()


def test_a_missing_block_ends_the_prefetch_there(
    tier: Tier, keys: list[str], tmp_path: Path
) -> None:
    host = host_pool("page_first")
    store = backend(host, settings(tier, tmp_path, salt="missing"))
    slots = host.alloc(len(TOKENS))
    fill(host, slots, seed=7)
    store.batch_set_v1(keys, slots, info([]))
    assert store.batch_exists(keys, info([])) == 8
    block0 = store._plan(keys, info([]))[1][0][1]  # type: ignore[index]
    assert store.pool.call(store.pool.tier.delete(store.namespace, [block0])) == 1
    assert store.batch_exists(keys, info([])) == 0
    # block 1 alone is still there: pages after the missing block are never loaded
    into = host.alloc(len(TOKENS))
    assert store.batch_get_v1(keys, into, info([])) == [False] * 10
    assert store.batch_exists(keys[4:], info(keys[:4])) == 4
    assert store.batch_get_v1(keys[4:], into[: 6 * PAGE], info(keys[:4]))[:4] == [True] * 4
    store.close()


def test_a_block_written_without_the_tenant_secret_is_a_miss_and_deleted(
    tier: Tier, keys: list[str], tmp_path: Path
) -> None:
    (tmp_path / "a.key").write_bytes(b"secret a")
    (tmp_path / "b.key").write_bytes(b"secret b")
    host = host_pool("page_first")
    writer = backend(
        host, settings(tier, tmp_path, salt="mac", mac_key_file=str(tmp_path / "a.key"))
    )
    reader = backend(
        host, settings(tier, tmp_path, salt="mac", mac_key_file=str(tmp_path / "b.key"))
    )
    assert writer.namespace.id == reader.namespace.id  # same namespace, other secret
    slots = host.alloc(len(TOKENS))
    fill(host, slots, seed=3)
    writer.batch_set_v1(keys, slots, info([]))
    assert reader.batch_exists(keys, info([])) == 8  # present, not yet verified
    host.kv_buffer.zero_()
    into = host.alloc(len(TOKENS))
    assert reader.batch_get_v1(keys, into, info([])) == [False] * 10
    assert (host.kv_buffer == 0).all()  # nothing of a refused block reaches the pool
    assert reader.pool.stats.rejected_blocks == 1
    assert reader.batch_exists(keys, info([])) == 0  # the refused block was deleted
    writer.close()
    reader.close()


def test_a_down_tier_fails_backups_cleanly_and_reads_miss(keys: list[str], tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    host = host_pool("page_first")
    store = backend(host, dynamic(dead, model_path=model_dir(tmp_path), rpc_timeout_s=0.5,
                                  call_timeout_s=2.0, basis="none"))  # fmt: skip
    slots = host.alloc(len(TOKENS))
    fill(host, slots, seed=1)
    before = host.kv_buffer.clone()
    assert store.batch_set_v1(keys, slots, info([])) == [False] * 8 + [True] * 2
    assert store.batch_exists(keys, info([])) == 0
    assert store.batch_get_v1(keys, slots, info([])) == [False] * 10
    assert torch.equal(host.kv_buffer, before)
    store.close()


def test_pages_without_their_place_in_the_prompt_are_not_stored(
    tier: Tier, keys: list[str], tmp_path: Path
) -> None:
    host = host_pool("page_first")
    store = backend(host, settings(tier, tmp_path, salt="noprefix"))
    slots = host.alloc(len(TOKENS))
    assert store.batch_set_v1(keys, slots, None) == [False] * 10
    assert store.batch_exists(keys, None) == 0
    assert store.batch_get_v1(keys, slots, None) == [False] * 10
    assert store.pool.stats.blocks_put == 0
    store.close()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"endpoint": ""}, "endpoint"),
        ({"blocktokens": 64}, "unknown"),
        ({"block_tokens": "64"}, "not a int"),
        ({"pre_rope": 1}, "not a bool"),
        ({"block_tokens": 40}, "multiple of the page"),
        ({"block_tokens": 129 * PAGE}, "more than SGLang asks"),
        ({"model_path": ""}, "pre_rope needs model_path"),
        ({"interface_v1": 0}, "interface_v1"),
        ({"max_pending_mib": -1}, "max_pending_mib"),
        ({"group_size": 128}, "group_size"),
        ({"basis": "v2"}, "basis"),
    ],
)
def test_settings_sglang_cannot_run_are_refused_at_start(
    tmp_path: Path, change: dict[str, object], match: str
) -> None:
    extra = {**dynamic("127.0.0.1:1", model_path=model_dir(tmp_path)), **change}
    with pytest.raises(SettingsError, match=match):
        backend(host_pool("page_first"), extra)


def test_mla_and_parallel_layouts_it_does_not_serve_are_refused(tmp_path: Path) -> None:
    extra = dynamic("127.0.0.1:1", model_path=model_dir(tmp_path))
    with pytest.raises(SettingsError, match="MLA"):
        backend(host_pool("page_first"), extra, is_mla_model=True)
    with pytest.raises(SettingsError, match="pipeline"):
        backend(host_pool("page_first"), extra, pp_size=2, pp_rank=1)
    store = backend(
        host_pool("page_first"), {**extra, "pre_rope": False, "model_path": "", "basis": "none"}
    )
    assert "rope=none" in store.pool.codec.describe()  # keys quantized as the pool holds them
    store.close()
    # SGLang's real MLA host pool (the latent only), even if the config did not say MLA
    mla = MLATokenToKVPool(
        size=256, page_size=PAGE, dtype=torch.float16, kv_lora_rank=64, qk_rope_head_dim=16,
        layer_num=2, device="cpu", enable_memory_saver=False,
    )  # fmt: skip
    mla_host = MLATokenToKVPoolHost(
        mla._mla_buffer_info(), host_to_device_ratio=2.0, host_size=0, page_size=PAGE,
        layout="page_first", pin_memory=False, device="cpu", device_capacity_tokens=256,
        start_layer=0, end_layer=2, target_layer_num=2,
    )  # fmt: skip
    with pytest.raises(SettingsError, match="K and V per head"):
        backend(mla_host, {**extra, "basis": "none"})


def test_with_basis_auto_a_tier_that_cannot_say_disables_it(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    host = host_pool("page_first")
    extra = dynamic(dead, model_path=model_dir(tmp_path), rpc_timeout_s=0.5, call_timeout_s=2.0)
    store = backend(host, extra)  # starts: SGLang is not stopped by its L3
    assert store.pool is None and store.namespace is None  # no namespace it may not use
    keys = [f"{i:064x}" for i in range(8)]
    slots = host.alloc(8 * PAGE)
    assert store.batch_set_v1(keys, slots, info([])) == [False] * 8
    assert store.batch_exists(keys, info([])) == 0
    assert store.batch_get_v1(keys, slots, info([])) == [False] * 8
    store.close()


def test_with_basis_auto_it_takes_the_key_basis_published_for_the_model(
    tier: Tier, keys: list[str], tmp_path: Path
) -> None:
    rotation = torch.linalg.qr(torch.randn(LAYERS, HEADS, HEAD_DIM, HEAD_DIM))[0]
    basis = KeyBasis(torch.zeros(LAYERS, HEADS, HEAD_DIM), rotation, (2,) * (LAYERS * 8))
    options = {"value_bits": 2, "group_size": 64, "sink_tokens": 4, "hadamard_values": True,
               "pre_rope": True}  # fmt: skip
    publish_basis(tier.endpoint, MODEL, basis, options, salt=b"v2")
    host = host_pool("page_first")
    store = backend(host, settings(tier, tmp_path, salt="v2"))
    assert store.pool.codec.key_basis is not None
    assert store.pool.codec.key_basis.id == basis.id and basis.id.hex() in store.namespace.codec
    none = backend(host, settings(tier, tmp_path, salt="v2", basis="none"))
    assert none.pool.codec.key_basis is None and none.namespace.id != store.namespace.id
    slots = host.alloc(len(TOKENS))
    fill(host, slots, seed=9)
    written = pages(host, slots)
    assert store.batch_set_v1(keys, slots, info([])) == [True] * 10
    assert none.batch_exists(keys, info([])) == 0  # another namespace: never mixed
    host.kv_buffer.zero_()
    into = host.alloc(len(TOKENS))
    assert store.batch_get_v1(keys, into, info([]))[:8] == [True] * 8
    assert torch.equal(pages(host, into[: 8 * PAGE]), round_trip(store, written, keys))
    store.close()
    none.close()
