"""SGLang's own page keys (its C++ hash) are kvpool's page chain, so kvpool's block keys from
tokens (what vLLM's connector and CachedModel compute) are the keys the SGLang backend stores
pages under, in both directions through a real tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sglang.srt.mem_cache.utils import get_hash_str

from kvpool.client import KVPool, namespace_for
from kvpool.model_facts import codec_for
from kvpool.proto.keys import block_keys, page_block_key, page_digests
from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.sglang import Settings
from tests.sglang.hicache import (
    BLOCK,
    CONFIG,
    MODEL,
    PAGE,
    backend,
    dynamic,
    fill,
    host_pool,
    info,
    model_dir,
    pages,
)

TOKENS = [(101 * i + 13) % 49152 for i in range(12 * PAGE + 5)]  # 3 blocks and a tail


@pytest.mark.parametrize("page", [1, 16, 64])
def test_sglangs_page_keys_are_kvpools_page_chain(page: int) -> None:
    theirs = get_hash_str(TOKENS, None, page_size=page)
    ours = [d.hex() for d in page_digests(TOKENS, page)]
    assert len(ours) == len(TOKENS) // page >= 3
    # SGLang also keys a partial last page; only full pages are ever stored, by either
    assert theirs[: len(ours)] == ours and len(theirs) == -(-len(TOKENS) // page)
    # a chain continued from a prior page (SGLang's last_hash) is the same chain
    k = 2
    assert get_hash_str(TOKENS[k * page :], theirs[k - 1], page_size=page) == theirs[k:]


def test_block_keys_from_tokens_are_the_keys_of_sglangs_last_pages(tmp_path: Path) -> None:
    host = host_pool("page_first")
    store = backend(host, dynamic("127.0.0.1:1", model_path=model_dir(tmp_path), basis="none"))
    ns = store.namespace
    assert ns is not None and ns.page_tokens == PAGE and ns.block_tokens == BLOCK
    theirs = get_hash_str(TOKENS, None, page_size=PAGE)
    n = BLOCK // PAGE
    expect = [page_block_key(ns, bytes.fromhex(theirs[(b + 1) * n - 1])) for b in range(3)]
    assert block_keys(ns, TOKENS) == expect
    # the backend's namespace is the one a worker derives from the same model facts
    settings = Settings.from_extra(dynamic("127.0.0.1:1", model_path=model_dir(tmp_path)))
    codec = codec_for(type("C", (), CONFIG), 3, 2, 64)
    assert settings.codec((4, 3, 64)).describe() == codec.describe()
    worker = namespace_for(MODEL, 4, 3, 64, torch.float16, codec, block_tokens=BLOCK,
                           page_tokens=PAGE)  # fmt: skip
    assert worker.id == ns.id and worker.root == ns.root
    store.close()


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=64 << 20, shard_cpus=0.1, name="sglkeys"))
    yield t
    t.shutdown()


def test_blocks_cross_between_a_worker_and_the_sglang_backend(tier: Tier, tmp_path: Path) -> None:
    host = host_pool("page_head")
    store = backend(host, dynamic(tier.endpoint, model_path=model_dir(tmp_path), salt="x"))
    ns, codec = store.namespace, store.pool.codec
    worker = KVPool(tier.endpoint, ns, codec)  # what CachedModel and the vLLM connector use
    theirs = get_hash_str(TOKENS, None, page_size=PAGE)
    try:
        # SGLang stores pages; the worker finds and reads them by tokens
        slots = host.alloc(12 * PAGE)
        fill(host, slots, seed=2)
        store.batch_set_v1(theirs[:12], slots, info([]))
        assert worker.lookup(TOKENS) == 3 * BLOCK
        got = worker.get(TOKENS)
        assert got is not None and got.tokens == 3 * BLOCK
        host.kv_buffer.zero_()
        into = host.alloc(12 * PAGE)
        assert store.batch_get_v1(theirs[:12], into, info([])) == [True] * 12
        assert torch.equal(pages(host, into), torch.stack((got.keys, got.values)))
        # the worker stores another prompt by tokens; SGLang finds and loads it by its keys
        other = [t + 1 for t in TOKENS]
        kv = torch.randn(2, 4, 3, len(other), 64).half()
        assert worker.put(other, (kv[0], kv[1])) == 3
        keys = get_hash_str(other, None, page_size=PAGE)  # 13: the tail page too
        assert store.batch_exists(keys, info([])) == 12
        into = host.alloc(12 * PAGE)
        assert store.batch_get_v1(keys[:12], into, info([])) == [True] * 12
        back = worker.get(other)
        assert back is not None
        assert torch.equal(pages(host, into), torch.stack((back.keys, back.values)))
    finally:
        worker.close()
        store.close()
