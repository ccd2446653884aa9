"""Model facts: what a transformers model's config says about the KV it caches, and the codec
that fits it.

Where it stands: a leaf of the client (the codec's types and the contract's errors only), read
by everything that turns a model into blocks: `kvpool.hf`, `kvpool.packed`, `kvpool.calibrate`,
`kvpool.ingest` and the vLLM connector. `model` may be a model or its config throughout.
"""

from __future__ import annotations

from typing import Any

from kvpool.kernels.codec import CodecConfig, KeyBasis
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.errors import CodecError


def _text_config(model: Any) -> Any:
    """The text part of a model's config; `model` may also be a config itself."""
    config = getattr(model, "config", model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_layout(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only transformers model (or its config)."""
    c = _text_config(model)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim


def rope_params(model: Any) -> RopeParams | None:
    """The model's rotary embedding, when it is one the codec can undo exactly (plain or
    linearly scaled); None otherwise (then keys are quantized as the model caches them)."""
    c = _text_config(model)
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    kind = params.get("rope_type", params.get("type", "default"))
    if theta is None or kind not in ("default", "linear"):
        return None
    _, _, head_dim = model_layout(model)
    factor = float(params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    scaling = float(params.get("factor", 1.0)) if kind == "linear" else 1.0
    return RopeParams(float(theta), int(head_dim * factor), scaling)


def codec_for(
    model: Any, key_bits: int | tuple[int, ...] = 2, value_bits: int | tuple[int, ...] = 2,
    group_size: int = 128, pre_rope: bool = True, hadamard_values: bool = True, sink_tokens: int = 4,
    key_basis: KeyBasis | None = None,
) -> CodecConfig:  # fmt: skip
    """A codec for `model` (or its config): pre-RoPE keys with the model's own RoPE parameters
    when it has a RoPE the codec can undo; values rotated when head_dim is a power of two.
    key_basis (codec v2): keys stored as components in it (key_bits is then unused); it must be
    of this model's KV layout. `kvpool.basis.published_codec` picks the published basis."""
    layers, kv_heads, head_dim = model_layout(model)
    rope = rope_params(model) if pre_rope else None
    if pre_rope and rope is None:
        raise CodecError("this model's RoPE cannot be undone exactly: use pre_rope=False")
    if key_basis is not None and tuple(key_basis.mean.shape) != (layers, kv_heads, head_dim):
        raise CodecError(
            f"the key basis is for a {'x'.join(map(str, key_basis.mean.shape))} KV, this "
            f"model's is {layers}x{kv_heads}x{head_dim}"
        )
    pow2 = head_dim & (head_dim - 1) == 0
    return CodecConfig(
        key_bits=key_bits, value_bits=value_bits, group_size=group_size, rope=rope,
        hadamard_values=hadamard_values and pow2, sink_tokens=sink_tokens, key_basis=key_basis,
    )  # fmt: skip
