"""The transformers integration with a real model (SmolLM2-135M-Instruct) and a real tier:
cached prefixes give the same generations when the codec is (near) lossless, stay close at
2-3 bits, keep positions right in a forward loop, and never mix models or codecs."""

from __future__ import annotations

import pydoc_data.topics
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvpool.client import KVPool
from kvpool.hf import CachedModel, codec_for, namespace_for_model, rope_params
from kvpool.proto.blockformat import DType
from kvpool.proto.errors import NamespaceError
from kvpool.services.tier import Tier, TierConfig, start_tier

TEXT = pydoc_data.topics.topics["typesseq"]  # real English prose from the Python manual


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=128 << 20, shard_cpus=0.1, name="hf"))
    yield t
    t.shutdown()


def prompt(tokenizer: Any, n: int, offset: int = 0) -> torch.Tensor:
    ids = tokenizer(TEXT).input_ids[offset : offset + n]
    assert len(ids) == n
    return torch.tensor([ids])


def cached_model(model: Any, tier: Tier, *codec_args: Any, **ns_kwargs: Any) -> CachedModel:
    codec = codec_for(model, *codec_args)
    pool = KVPool(tier.endpoint, namespace_for_model(model, codec, **ns_kwargs), codec)
    return CachedModel(model, pool)


def test_namespace_and_codec_come_from_the_model_config(smollm2) -> None:
    model, _ = smollm2
    codec = codec_for(model)
    ns = namespace_for_model(model, codec)
    assert (ns.model, ns.layers, ns.kv_heads, ns.head_dim, ns.dtype) == (
        "HuggingFaceTB/SmolLM2-135M-Instruct", 30, 3, 64, DType.FLOAT32,
    )  # fmt: skip
    assert codec.rope == rope_params(model) and codec.rope is not None
    assert (codec.rope.theta, codec.rope.rotary_dim) == (100000.0, 64)
    assert ns.codec == codec.describe()


def test_generate_with_an_8bit_cached_prefix_equals_generate_without(smollm2, tier) -> None:
    model, tok = smollm2
    cm = cached_model(model, tier, 8, 8, 32)
    ids = prompt(tok, 600)  # two full blocks and an 88-token tail
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=16, do_sample=False)
    first = cm.generate(ids, max_new_tokens=16, do_sample=False)  # a miss: stores two blocks
    assert cm.last_cached_tokens == 0 and cm.pool.lookup(ids[0]) == 512
    second = cm.generate(ids, max_new_tokens=16, do_sample=False)  # fetches 512 tokens
    assert cm.last_cached_tokens == 512 and cm.last_fetched_bytes > 0
    assert torch.equal(first, reference) and torch.equal(second, reference)
    cm.pool.close()


def test_a_forward_loop_keeps_positions_right(smollm2, tier) -> None:
    model, tok = smollm2
    cm = cached_model(model, tier, 8, 8, 32)
    ids = prompt(tok, 520, offset=700)
    cm.prefill(ids)  # stores two blocks
    logits, cache = cm.prefill(ids)  # 512 tokens from the tier, 8 computed
    assert cm.last_cached_tokens == 512 and cache.get_seq_length() == 520
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        ref_logits, ref_cache = out.logits[:, -1], out.past_key_values
        torch.testing.assert_close(logits, ref_logits, atol=0.1, rtol=0)
        mine, ref = [], []
        for _ in range(8):  # greedy decode steps on both caches
            mine.append(int(logits.argmax(-1)))
            ref.append(int(ref_logits.argmax(-1)))
            logits = model(torch.tensor([[mine[-1]]]), past_key_values=cache).logits[:, -1]
            ref_logits = model(torch.tensor([[ref[-1]]]), past_key_values=ref_cache).logits[:, -1]
    assert mine == ref
    cm.pool.close()


def test_a_block_aligned_prompt_reuses_all_but_its_last_token(smollm2, tier) -> None:
    model, tok = smollm2
    cm = cached_model(model, tier, 8, 8, 32)
    ids = prompt(tok, 512, offset=2200)
    cm.prefill(ids)
    logits, cache = cm.prefill(ids)  # both blocks come back; the cache is cut to 511 tokens
    assert cm.last_cached_tokens == 511 and cache.get_seq_length() == 512
    with torch.inference_mode():
        torch.testing.assert_close(logits, model(ids).logits[:, -1], atol=0.1, rtol=0)
    cm.pool.close()


def test_a_prefix_at_under_3_bits_stays_close(smollm2, tier) -> None:
    model, tok = smollm2
    cm = cached_model(model, tier, 3, 2, 128)  # keys 3.25, values 2.5 bits per value
    ids = prompt(tok, 640, offset=1500)
    head, tail = ids[:, :513], ids[:, 513:]
    cm.prefill(head)  # stores the 512-token prefix
    with torch.inference_mode():
        exact = model(ids).logits[0, 512:]
        cache = cm.fetch(head)
        assert cm.last_cached_tokens == 512
        q = model(ids[:, 512:], past_key_values=cache).logits[0]
    lp, lq = exact.log_softmax(-1), q.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    agree = float((exact.argmax(-1) == q.argmax(-1)).float().mean())
    nll = [float(-x[:-1].gather(1, tail[0, :, None]).mean()) for x in (lp, lq)]
    assert kl < 0.15 and agree > 0.85 and nll[1] < nll[0] * 1.15, (kl, agree, nll)
    cm.pool.close()


def test_other_models_and_codecs_never_share_blocks(smollm2, tier) -> None:
    model, tok = smollm2
    ids = prompt(tok, 300, offset=3000)
    cm = cached_model(model, tier, 2, 2, 128)
    cm.prefill(ids)
    assert cm.pool.lookup(ids[0]) == 256
    for other in (
        cached_model(model, tier, 3, 2, 128),  # another codec
        cached_model(model, tier, 2, 2, 128, name="someone/else"),  # another model id
        cached_model(model, tier, 2, 2, 128, salt=b"tenant-b"),  # another tenant
    ):
        assert other.pool.lookup(ids[0]) == 0
        assert other.fetch(ids).get_seq_length() == 0
        other.pool.close()
    tiny = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152))  # fmt: skip
    with pytest.raises(NamespaceError):
        CachedModel(tiny, cm.pool)  # a pool whose namespace describes another model
    cm.pool.close()


def test_batched_input_is_refused(smollm2, tier) -> None:
    model, _ = smollm2
    cm = cached_model(model, tier)
    with pytest.raises(ValueError):
        cm.prefill(torch.zeros(2, 8, dtype=torch.long))
    cm.pool.close()
