"""The packed cache with a real model (SmolLM2-135M-Instruct): decode steps attend to packed
rows and give what a DynamicCache of the same decoded rows gives, the window folds G tokens at
a time, the cache is several times smaller, MiniKV selection keeps its budgets, and a
CachedModel fetches tier blocks into it undecoded and stores the prompt's new blocks."""

from __future__ import annotations

import pydoc_data.topics
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvpool.client import KVPool
from kvpool.hf import CachedModel, cache_from_kv, codec_for, kv_from_cache, namespace_for_model
from kvpool.kernels.codec import CodecConfig, KeyBasis, decode, encode
from kvpool.packed import PackedCache, PackedLayer, Selection, use_packed_attention
from kvpool.proto.errors import CodecError
from kvpool.services.tier import Tier, TierConfig, start_tier

TEXT = pydoc_data.topics.topics["typesseq"]  # the same prose as test_hf


@pytest.fixture
def model(smollm2: tuple[Any, Any]) -> Iterator[Any]:
    m, _ = smollm2
    use_packed_attention(m)
    yield m
    m.set_attn_implementation("sdpa")


def ids_of(tokenizer: Any, n: int) -> torch.Tensor:
    ids = tokenizer(TEXT).input_ids[:n]
    assert len(ids) == n
    return torch.tensor([ids])


def layers_of(cache: PackedCache) -> list[PackedLayer]:
    return [layer for layer in cache.layers if isinstance(layer, PackedLayer)]


@torch.inference_mode()
def step_logits(model: Any, ids: torch.Tensor, cache: Any, prefix: int) -> torch.Tensor:
    """Prefill `prefix` tokens into `cache`, then one decode step per remaining token."""
    model(ids[:, :prefix], past_key_values=cache)
    steps = [
        model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(prefix, ids.shape[1])
    ]
    return torch.cat(steps, dim=1)[0]


@pytest.mark.parametrize("bits", [2, 3])
def test_decode_steps_over_packed_rows_equal_a_cache_of_the_decoded_rows(
    model, smollm2, bits
) -> None:
    """The prefix is packed (a block from encode), then every step attends through the packed
    kernel; a DynamicCache of the same block decoded must give the same logits."""
    _, tok = smollm2
    ids = ids_of(tok, 300)
    codec = codec_for(model, key_bits=bits, value_bits=2)  # pre-RoPE, Hadamard, 4 sinks
    with torch.inference_mode():
        exact = DynamicCache(config=model.config)
        model(ids[:, :256], past_key_values=exact)
        blob = encode(*kv_from_cache(exact, 256), codec)
    header_payload = _payload(blob)
    packed = PackedCache(model, codec, window=512)  # no folding: the steps stay exact
    assert packed.add_blocks([header_payload]) == 256
    reference = cache_from_kv(model, *(lambda b: (b.keys, b.values))(decode(blob)))
    with torch.inference_mode():
        want = torch.cat(
            [model(ids[:, i : i + 1], past_key_values=reference).logits for i in range(256, 300)], 1
        )[0]
        got = torch.cat(
            [model(ids[:, i : i + 1], past_key_values=packed).logits for i in range(256, 300)], 1
        )[0]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    assert packed.get_seq_length() == 300
    # and the packed rows are the decode path, not a copy of full precision
    assert layers_of(packed)[0].packed is not None and layers_of(packed)[0].keys.shape[2] == 44


def _payload(blob: bytes, basis: KeyBasis | None = None) -> tuple[Any, torch.Tensor]:
    from kvpool.kernels.codec import verified_payload

    return verified_payload(blob, key_basis=basis)


def test_the_window_folds_g_tokens_at_a_time_and_stays_faithful(model, smollm2) -> None:
    _, tok = smollm2
    ids = ids_of(tok, 560)
    codec = codec_for(model, key_bits=8, value_bits=8)
    packed = PackedCache(model, codec, window=128)
    got = step_logits(model, ids, packed, 400)
    for layer in layers_of(packed):
        assert layer.packed is not None and layer.packed.tokens % 128 == 0
        recent = layer.recent.tokens if layer.recent is not None else 0  # folded by decode steps
        assert layer.packed.tokens + recent + layer.keys.shape[2] == 560
        assert 128 <= layer.keys.shape[2] < 256
        assert layer.sinks is not None and layer.sinks[0].shape[2] == 4
    want = step_logits(model, ids, DynamicCache(config=model.config), 400)
    # 8-bit packing of everything older than the window: the same next tokens
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.97
    assert (
        F.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="batchmean")
        < 0.01
    )


def two_blocks(model: Any, ids: torch.Tensor, codec: CodecConfig) -> tuple[list[bytes], Any]:
    """The model's KV of ids[:, :512] encoded as two 256-token blocks, and a DynamicCache of
    the blocks decoded (what a store-then-decode path attends to)."""
    exact = DynamicCache(config=model.config)
    model(ids[:, :512], past_key_values=exact)
    k, v = kv_from_cache(exact, 512)
    blobs = [encode(k[:, :, i : i + 256], v[:, :, i : i + 256], codec, start_position=i)
             for i in (0, 256)]  # fmt: skip
    blocks = [decode(b, key_basis=codec.key_basis) for b in blobs]
    decoded = cache_from_kv(model, torch.cat([b.keys for b in blocks], 2),
                            torch.cat([b.values for b in blocks], 2))  # fmt: skip
    return blobs, decoded


def test_two_bit_packing_costs_what_store_and_decode_costs(model, smollm2) -> None:
    """Perplexity of a continuation after a stored 3/2-bit prefix of two blocks: attending to
    the blocks packed, step by step (the continuation's own older tokens fold into packed rows
    too), stays within half a point of decoding the blocks into a DynamicCache."""
    _, tok = smollm2
    ids = ids_of(tok, 768)
    codec = codec_for(model, key_bits=3, value_bits=2)

    def ppl(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:-1], ids[0, 513:]).exp())

    with torch.inference_mode():
        blobs, stored = two_blocks(model, ids, codec)
        store_logits = model(ids[:, 512:], past_key_values=stored).logits[0]
        base = model(ids).logits[0, 512:]
        runs = {}
        for fold_bits in (None, (8, 8)):  # decode steps' tokens at the codec's widths, or 8-bit
            packed = PackedCache(model, codec, window=16, fold_bits=fold_bits)
            assert packed.add_blocks([_payload(b) for b in blobs]) == 512
            steps = [
                model(ids[:, i : i + 1], past_key_values=packed).logits for i in range(512, 768)
            ]
            runs[fold_bits] = ppl(torch.cat(steps, 1)[0])
            layer = layers_of(packed)[0]
            if fold_bits is None:  # one fold of the continuation's own, after the blocks' rows
                assert layer.packed.tokens == 640 and layer.recent is None
            else:  # the same fold, apart, at its own widths and positions
                assert layer.packed.tokens == 512 and layer.recent is not None
                assert layer.recent.tokens == 128 and layer.recent.key_bits == 8
                assert torch.equal(
                    layer.recent.positions[0, 0, :128], torch.arange(512, 640, dtype=torch.int32)
                )
    base_ppl, store_ppl = ppl(base), ppl(store_logits)
    assert store_ppl > base_ppl * 1.01  # the codec is lossy: the comparison means something
    for packed_ppl in runs.values():
        assert abs(packed_ppl - store_ppl) / base_ppl < 0.005, (base_ppl, store_ppl, runs)


def test_the_packed_cache_is_several_times_smaller(model, smollm2) -> None:
    _, tok = smollm2
    ids = ids_of(tok, 1024)
    packed = PackedCache(model, codec_for(model), window=128)
    dynamic = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(ids, past_key_values=packed)
        model(ids, past_key_values=dynamic)
    full = sum(layer.keys.numel() * 4 * 2 for layer in dynamic.layers)
    assert full / packed.nbytes > 5
    assert packed.allocated >= packed.nbytes


def test_selection_keeps_a_pyramid_of_heavy_hitters(model, smollm2) -> None:
    _, tok = smollm2
    ids = ids_of(tok, 900)
    selection = Selection(keep=0.5, pyramid=0.5, queries=32)
    codec = codec_for(model, key_bits=3, value_bits=2)
    packed = PackedCache(model, codec, window=128, selection=selection)
    logits = step_logits(model, ids, packed, 800)
    kept = []
    for layer in layers_of(packed):
        assert layer.selected and layer.sinks is not None and layer.sinks[0].shape[2] == 4
        rows = 0
        if layer.packed is not None:  # None: the layer kept only its sinks and recent tokens
            assert layer.packed.positions is not None
            pos = layer.packed.positions[0, :, : layer.packed.tokens]
            assert bool((pos[:, 1:] > pos[:, :-1]).all())  # distinct positions, in order
            assert int(pos.min()) >= 4 and int(pos.max()) < 800 - 128  # not sinks or recent
            rows = layer.packed.tokens
        kept.append(4 + rows + layer.keys.shape[2])
    assert kept[0] > kept[-1]  # budgets shrink with depth
    assert sum(kept) / len(kept) < 0.6 * 900
    assert packed.get_seq_length() == 900
    with torch.inference_mode():
        full = model(ids).logits[0, 800:]
    # half the tokens at 3/2 bits: close to the full model, nowhere near chance
    agree = (logits.argmax(-1) == full.argmax(-1)).float().mean()
    assert agree > 0.8, agree


def random_basis(predict: bool, seed: int = 0) -> KeyBasis:
    """SmolLM2's shape (30 layers, 3 kv heads, head_dim 64): a random orthonormal basis, every
    component kept (4 or 3 bits: a random basis has no tail to drop), and with `predict` random
    per-head maps of gain about 1/2."""
    g = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(30, 3, 64, 64, generator=g))
    mean = torch.randn(30, 3, 64, generator=g) * 0.5
    widths = (4, 4, 4, 4, 3, 3, 3, 3) * 30
    if not predict:
        return KeyBasis(mean, rotation.contiguous(), widths)
    key_maps = torch.randn(29, 3, 129, 64, generator=g) / 129**0.5 / 2
    value_maps = torch.randn(29, 3, 193, 64, generator=g) / 193**0.5 / 2
    return KeyBasis(mean, rotation.contiguous(), widths, key_maps, value_maps)


@pytest.mark.parametrize("predict", [False, True], ids=["v2-basis", "v2-predicted"])
def test_v2_blocks_give_what_their_decoded_rows_give(model, smollm2, predict) -> None:
    """Two v2 blocks (pre-RoPE keys in a key basis, Hadamard 2-bit values, 4 sinks): without
    maps attended packed (each key row rebuilt from its components in the C loop), with maps
    decoded once as they are added (kept exact). A prefill of 160 more tokens then folds 128 of
    them into packed rows in the layer's basis, and decode steps attend to everything. Logits
    as a DynamicCache of the decoded blocks gives: the same up to the fold, then close."""
    _, tok = smollm2
    ids = ids_of(tok, 696)
    basis = random_basis(predict)
    codec = replace(codec_for(model, key_bits=2, value_bits=2), key_basis=basis)
    with torch.inference_mode():
        blobs, reference = two_blocks(model, ids, codec)
        packed = PackedCache(model, codec, window=32, fold_bits=None)
        assert packed.add_blocks([_payload(b, basis) for b in blobs]) == 512
        first = layers_of(packed)[0]
        if predict:
            assert first.packed is None and first.decoded[0].shape == (1, 3, 512, 64)
        else:
            assert first.decoded is None and first.packed.key_runs and first.sinks is not None
        logits = {}
        for name, cache in (("want", reference), ("got", packed)):
            prefill = model(ids[:, 512:672], past_key_values=cache).logits[0]
            steps = [model(ids[:, i : i + 1], past_key_values=cache).logits[0]
                     for i in range(672, 696)]  # fmt: skip
            logits[name] = prefill, torch.cat(steps)
    torch.testing.assert_close(logits["got"][0], logits["want"][0], atol=2e-3, rtol=1e-3)
    # steps after the fold: the 128 folded tokens are quantized where the reference is exact
    agree = (logits["got"][1].argmax(-1) == logits["want"][1].argmax(-1)).float().mean()
    assert agree > 0.9, agree
    layer = layers_of(packed)[0]
    assert layer.packed is not None and layer.packed.key_runs  # the fold, in the basis
    assert layer.packed.tokens == (128 if predict else 640)
    assert packed.get_seq_length() == 696


def test_refusals(model, smollm2) -> None:
    _, tok = smollm2
    basis = random_basis(predict=True)
    blob = encode(*[torch.randn(30, 3, 128, 64)] * 2, CodecConfig(key_basis=basis))
    with pytest.raises(CodecError, match="its basis and maps"):  # the cache's codec lacks it
        PackedCache(model, codec_for(model)).add_blocks([_payload(blob, basis)])
    cache = PackedCache(model, codec_for(model))
    with pytest.raises(ValueError, match="batch 1"), torch.inference_mode():
        model(torch.ones(2, 8, dtype=torch.long), past_key_values=cache)
    with pytest.raises(ValueError, match="batch 1"):  # beams are a batch
        model.generate(ids_of(tok, 16), past_key_values=PackedCache(model, codec_for(model)),
                       max_new_tokens=2, num_beams=2, do_sample=False)  # fmt: skip
    with pytest.raises(ValueError, match="window"):
        PackedCache(model, codec_for(model), window=-1)
    for bad in ({"keep": 0.0}, {"keep": 1.5}, {"pyramid": 1.0}, {"queries": 0}):
        with pytest.raises(ValueError, match="keep in"):
            Selection(**bad)
    k, v = torch.randn(30, 3, 128, 64), torch.randn(30, 3, 128, 64)
    first = encode(k, v, codec_for(model))  # sinks: the block at position 0
    cache = PackedCache(model, codec_for(model))
    cache.add_blocks([_payload(first)])
    with pytest.raises(CodecError, match="must come first"):  # a second block with sinks
        layers_of(cache)[0].add_block(*_payload(first), 128)
    with pytest.raises(CodecError, match="block at"):
        blob = encode(*[torch.randn(30, 3, 128, 64)] * 2, codec_for(model), start_position=128)
        PackedCache(model, codec_for(model)).add_blocks([_payload(blob)])


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=128 << 20, shard_cpus=0.1, name="packed"))
    yield t
    t.shutdown()


def test_a_cached_model_fetches_blocks_packed_and_stores_new_ones(model, smollm2, tier) -> None:
    _, tok = smollm2
    basis = KeyBasis(
        torch.zeros(30, 3, 64), torch.eye(64).expand(30, 3, 64, 64).contiguous(), (2,) * 240
    )
    with_basis = CodecConfig(key_basis=basis)
    pool = KVPool(tier.endpoint, namespace_for_model(model, with_basis, name="basis"), with_basis)
    ids = ids_of(tok, 600)
    CachedModel(model, pool, packed=True).prefill(ids)  # stores the prompt's two v2 blocks
    packed = CachedModel(model, pool, packed=True)  # codec v2: keys attended in their basis
    logits, cache = packed.prefill(ids)
    assert packed.last_cached_tokens == 512 and isinstance(cache, PackedCache)
    plain = CachedModel(model, pool)  # the same blocks decoded
    with torch.inference_mode():
        plain_logits, _ = plain.prefill(ids)
    assert plain.last_cached_tokens == 512
    torch.testing.assert_close(logits, plain_logits, atol=1e-2, rtol=1e-3)
    pool.close()
    codec = codec_for(model, 8, 8)
    pool = KVPool(tier.endpoint, namespace_for_model(model, codec, name="packed-test"), codec)
    ids = ids_of(tok, 600)  # two blocks of 256 and a tail
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=12, do_sample=False)
    first = CachedModel(model, pool, packed=True)
    out = first.generate(ids, max_new_tokens=12, do_sample=False)
    assert first.last_cached_tokens == 0 and pool.lookup(ids[0].tolist()) == 512  # stored
    second = CachedModel(model, pool, packed=True)
    again = second.generate(ids, max_new_tokens=12, do_sample=False)
    assert second.last_cached_tokens == 512 and second.last_fetched_bytes > 0
    assert torch.equal(out, reference) and torch.equal(again, reference)
    logits, cache = second.prefill(ids)
    assert isinstance(cache, PackedCache) and cache.get_seq_length() == 600
    # the blocks a packed prefill stored decode like any others: a plain CachedModel hits them
    plain = CachedModel(model, pool)
    with torch.inference_mode():
        plain_logits, _ = plain.prefill(ids)
    assert plain.last_cached_tokens == 512
    torch.testing.assert_close(logits, plain_logits, atol=1e-2, rtol=1e-3)
    pool.close()
