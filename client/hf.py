"""Hugging Face transformers integration: prefill only what the tier does not hold.

Where it stands: inside an inference worker, between its model and the KVPool client.

    input_ids [1, T] --lookup--> longest cached prefix P (full blocks, P < T)
        --cost check--> fetch + decode into a DynamicCache (positions 0..P-1)
        --model / model.generate--> prefill of tokens P..T-1 only, then decode as usual
        --store--> the prompt's new full blocks go back to the tier

Everything that shapes the stored bytes (layers, KV heads, head dim, dtype, RoPE) is read from
the model's config, never typed by the user; the model id and revision are part of the
namespace, so two models never share blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import Cache, DynamicCache

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.model_facts import codec_for, model_layout, rope_params
from kvpool.packed import WINDOW
from kvpool.proto.errors import NamespaceError
from kvpool.proto.keys import Namespace
from kvpool.transport import ClientConfig

__all__ = [
    "CachedModel", "CostModel", "cache_from_kv", "codec_for", "kv_from_cache", "model_layout",
    "namespace_for_model", "rope_params",
]  # fmt: skip


def namespace_for_model(
    model: Any, codec: CodecConfig, name: str | None = None, **kwargs: Any
) -> Namespace:
    """The namespace of `model` with `codec`: model id (unless `name` is given), revision and KV
    layout from its config; `kwargs` go to Namespace (block_tokens, salt, tp_rank...)."""
    layers, kv_heads, head_dim = model_layout(model)
    c = model.config
    name = name or getattr(c, "_name_or_path", "") or c.model_type
    kwargs.setdefault("revision", str(getattr(c, "_commit_hash", None) or ""))
    return namespace_for(name, layers, kv_heads, head_dim, model.dtype, codec, **kwargs)


@dataclass
class CostModel:
    """Fetch a cached prefix only when it is predicted to be faster than recomputing it.

    Both rates are learned from what this worker measures (exponential moving averages);
    until the first prefill is measured, fetching is assumed worth it."""

    fetch_bytes_per_s: float = 50e6  # fetch and decode together; ~54e6 measured on a 2-core CPU
    fetch_overhead_s: float = 0.003  # lookup + one round trip
    prefill_s_per_token: float | None = None
    min_tokens: int = 1
    alpha: float = 0.3

    def worth_fetching(self, tokens: int, nbytes: int) -> bool:
        if tokens < self.min_tokens:
            return False
        if self.prefill_s_per_token is None:
            return True
        fetch = self.fetch_overhead_s + nbytes / self.fetch_bytes_per_s
        return fetch < tokens * self.prefill_s_per_token

    def saw_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            rate = seconds / tokens
            old = self.prefill_s_per_token
            self.prefill_s_per_token = rate if old is None else old + self.alpha * (rate - old)

    def saw_fetch(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.fetch_bytes_per_s += self.alpha * (nbytes / seconds - self.fetch_bytes_per_s)


def cache_from_kv(model: Any, keys: Tensor, values: Tensor) -> DynamicCache:
    """A DynamicCache holding keys/values [L, H, T, D] for batch 1 at positions 0..T-1."""
    cache = DynamicCache(config=model.config)
    for layer in range(keys.shape[0]):
        cache.update(keys[layer].unsqueeze(0), values[layer].unsqueeze(0), layer)
    return cache


def kv_from_cache(cache: Any, tokens: int, row: int = 0) -> tuple[Tensor, Tensor]:
    """The first `tokens` positions of batch row `row` of a cache as (keys, values)
    [L, H, tokens, D]."""
    keys = torch.stack([layer.keys[row, :, :tokens] for layer in cache.layers])
    values = torch.stack([layer.values[row, :, :tokens] for layer in cache.layers])
    return keys, values


class CachedModel:
    """A transformers causal LM whose prompt prefills go through a kvpool tier (batch 1).

    cached = CachedModel(model, pool)
    out = cached.generate(input_ids, max_new_tokens=64)  # fetch, prefill the rest, store
    logits, cache = cached.prefill(input_ids)            # the same for a forward loop
    """

    def __init__(
        self, model: Any, pool: KVPool, cost: CostModel | None = None, packed: bool = False,
        window: int = WINDOW,
    ) -> None:  # fmt: skip
        expected = namespace_for_model(model, pool.codec, **_same_options(pool.namespace))
        if expected.id != pool.namespace.id:
            raise NamespaceError(
                "the pool's namespace does not describe this model (name, layout, dtype or codec "
                "differ): build it with namespace_for_model(model, codec)"
            )
        self.model, self.pool = model, pool
        self.cost = cost or CostModel()
        self.last_cached_tokens = 0  # tokens the last fetch put into the cache
        self.last_fetched_bytes = 0
        self._tier_tokens = 0  # leading tokens of the last prompt the tier held
        self.packed, self.window = packed, window
        if packed:  # attention over packed rows: kvpool.packed
            from kvpool.packed import use_packed_attention

            use_packed_attention(model)

    @classmethod
    def connect(
        cls, model: Any, endpoint: str, *, name: str | None = None, salt: bytes = b"",
        mac_key: bytes = b"", config: ClientConfig | None = None, **kwargs: Any,
    ) -> CachedModel:  # fmt: skip
        """`model` on the tier at `endpoint` with the codec every worker of the model shares:
        codec v2 with the key basis published for it (`kvpool calibrate --basis --predict
        --publish`), else K3V2 (logged once). `name`: the model's name in the tier (default its
        config's `_name_or_path`); salt, mac_key: the tenant's; kwargs go to CachedModel.
        BasisUnavailable when a basis is published but cannot be had: nothing is written."""
        from kvpool.basis import published_codec

        config = config or ClientConfig()
        codec, _ = published_codec(model, endpoint, name=name, salt=salt, mac_key=mac_key,
                                   config=config)  # fmt: skip
        ns = namespace_for_model(model, codec, name=name, salt=salt, mac_key=mac_key)
        return cls(model, KVPool(endpoint, ns, codec, model.device, config), **kwargs)

    def fetch(self, input_ids: Tensor) -> Cache:
        """A cache holding the longest cached prefix of `input_ids` [1, T] that is worth
        fetching, cut to at most T-1 tokens: the last token always runs, to give logits. With
        `packed`, a PackedCache of the whole blocks below T (as they came: nothing decoded)."""
        tokens = self._tokens(input_ids)
        self.last_cached_tokens = self.last_fetched_bytes = 0
        n = self._tier_tokens = self.pool.lookup(tokens)
        use = min(n, len(tokens) - 1)
        if self.packed:
            use -= use % self.pool.namespace.block_tokens
        blocks = -(-use // self.pool.namespace.block_tokens)
        if use <= 0 or not self.cost.worth_fetching(use, blocks * self._block_bytes()):
            return self._empty(len(tokens))
        t0 = time.perf_counter()
        if self.packed:
            return self._fetch_packed(tokens, use, t0)
        hit = self.pool.get(tokens[:n], dtype=self.model.dtype, present=n)
        if hit is None or hit.keys is None or hit.values is None:
            return DynamicCache(config=self.model.config)
        self.cost.saw_fetch(hit.fetched_bytes, time.perf_counter() - t0)
        use = min(hit.tokens, len(tokens) - 1)
        self.last_cached_tokens, self.last_fetched_bytes = use, hit.fetched_bytes
        return cache_from_kv(self.model, hit.keys[:, :, :use], hit.values[:, :, :use])

    def _empty(self, prompt: int) -> Cache:
        if not self.packed:
            return DynamicCache(config=self.model.config)
        from kvpool.packed import PackedCache

        cache = PackedCache(self.model, self.pool.codec, self.window)
        cache.start_recording(prompt)
        return cache

    def _fetch_packed(self, tokens: list[int], use: int, t0: float) -> Cache:
        from kvpool.packed import PackedCache

        cache = PackedCache(self.model, self.pool.codec, self.window)
        payloads = list(self.pool.get_payloads(tokens[:use], present=use))
        cached = cache.add_blocks(payloads)
        fetched = sum(header.total_len for header, _ in payloads)  # as stored (deflated)
        if cached:
            self.cost.saw_fetch(fetched, time.perf_counter() - t0)
        self.last_cached_tokens, self.last_fetched_bytes = cached, fetched
        cache.start_recording(len(tokens) - cached)
        return cache

    def store(self, input_ids: Tensor, cache: Any) -> int:
        """Store the full blocks of the prompt `input_ids` [1, T] held in `cache` that the
        tier did not hold when `fetch` looked."""
        tokens = self._tokens(input_ids)
        full = len(tokens) - len(tokens) % self.pool.namespace.block_tokens
        if full == 0 or full <= self._tier_tokens:
            return 0
        if hasattr(cache, "take_recorded"):  # a PackedCache: its new tokens, recorded exactly
            recorded, first = cache.take_recorded(), self.last_cached_tokens
            if recorded is None or first + recorded[0].shape[2] < full:
                return 0
            kv = (recorded[0][:, :, : full - first], recorded[1][:, :, : full - first])
            bt = self.pool.namespace.block_tokens
            return self.pool.put(tokens[:full], kv, first_block=first // bt)
        return self.pool.put(tokens[:full], kv_from_cache(cache, full))

    @torch.inference_mode()
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, Cache]:
        """(logits of the last position [1, vocab], the cache of the whole prompt)."""
        cache = self.fetch(input_ids)
        start = cache.get_seq_length()
        t0 = time.perf_counter()
        out = self.model(input_ids[:, start:], past_key_values=cache, use_cache=True)
        if out.logits.is_cuda:
            torch.cuda.synchronize(out.logits.device)  # time the work, not its launch
        self.cost.saw_prefill(input_ids.shape[1] - start, time.perf_counter() - t0)
        self.store(input_ids, cache)
        return out.logits[:, -1], cache

    @torch.inference_mode()
    def generate(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        """`model.generate` with the prompt's cached prefix fetched first and its new blocks
        stored afterwards; returns the generated ids like `model.generate`."""
        cache = self.fetch(input_ids)
        kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        out = self.model.generate(input_ids, past_key_values=cache, **kwargs)
        self.store(input_ids, cache)
        return out

    def _tokens(self, input_ids: Tensor) -> list[int]:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
        return input_ids[0].tolist()

    def _block_bytes(self) -> int:
        ns = self.pool.namespace
        values = 2 * ns.layers * ns.kv_heads * ns.block_tokens * ns.head_dim
        return values * 3 // 8  # about 3 bits per value, enough for a cost estimate


def _same_options(ns: Namespace) -> dict[str, Any]:
    return {
        "name": ns.model, "revision": ns.revision, "block_tokens": ns.block_tokens,
        "tp_rank": ns.tp_rank, "tp_size": ns.tp_size, "salt": ns.salt, "mac_key": ns.mac_key,
    }  # fmt: skip
