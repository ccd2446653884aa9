"""The vLLM side of one key scheme (run in `.venv`, where vLLM is): vLLM's connector and
`CachedModel` derive the same namespace and block keys for SmolLM2, those keys are the store
keys of the prompt's page chain (SGLang's page keys, tests/sglang/test_sglang_keys.py), and
the codec the SGLang backend builds from the model folder's config.json is the connector's."""

from __future__ import annotations

import json
import pydoc_data.topics
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvpool.hf import codec_for, namespace_for_model
from kvpool.models import SMOLLM2, smollm2_path
from kvpool.proto.keys import block_keys, page_block_key, page_digests
from kvpool.services.tier import Tier, TierConfig, start_tier


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=1, budget_bytes=16 << 20, shard_cpus=0.1, name="vkeys"))
    yield t
    t.shutdown()


def vllm_config() -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(
        model=str(smollm2_path().resolve()), served_model_name=SMOLLM2, dtype="float32",
        max_model_len=4096, enforce_eager=True,
    ).create_engine_config()  # fmt: skip


@pytest.mark.parametrize("page", [None, 16, 64])
def test_vllm_and_cached_model_keys_are_the_page_chains_store_keys(
    smollm2: Any, tier: Tier, page: int | None
) -> None:
    from kvpool.vllm import Settings, namespace_for_vllm

    model, tokenizer = smollm2
    extra: dict[str, Any] = {"endpoint": tier.endpoint}  # the connector's defaults otherwise
    if page is not None:
        extra["page_tokens"] = page
    ns, codec = namespace_for_vllm(vllm_config(), Settings.from_extra(extra))
    kw = {} if page is None else {"page_tokens": page}
    hf = namespace_for_model(model, codec_for(model, 3, 2), **kw)
    assert ns.page_tokens == hf.page_tokens == (page or 64)
    assert ns.id == hf.id and ns.root == hf.root
    tokens = tokenizer(pydoc_data.topics.topics["typesseq"]).input_ids[:600]
    keys = block_keys(ns, tokens)
    assert len(keys) == 2 and keys == block_keys(hf, tokens)
    n = 256 // ns.page_tokens
    chain = page_digests(tokens, ns.page_tokens)
    assert keys == [page_block_key(ns, chain[(b + 1) * n - 1]) for b in range(2)]
    # what the SGLang backend reads from the model folder gives the connector's codec
    config = SimpleNamespace(**json.loads((smollm2_path() / "config.json").read_text()))
    assert codec_for(config, 3, 2).describe() == codec.describe()


def test_page_sizes_the_connector_cannot_use_are_refused(tier: Tier) -> None:
    from kvpool.proto.errors import NamespaceError
    from kvpool.vllm import Settings, namespace_for_vllm

    with pytest.raises(ValueError, match="page_tokens"):
        Settings.from_extra({"endpoint": tier.endpoint, "page_tokens": -2})
    with pytest.raises(NamespaceError, match="divide"):  # 48 does not divide the 256-token block
        namespace_for_vllm(vllm_config(), Settings.from_extra(
            {"endpoint": tier.endpoint, "page_tokens": 48, "basis": "none"}
        ))  # fmt: skip
    first, _ = namespace_for_vllm(vllm_config(), Settings.from_extra(
        {"endpoint": tier.endpoint, "page_tokens": 0, "basis": "none"}
    ))  # fmt: skip
    assert first.page_tokens == 0  # the first scheme, one chain over whole blocks
