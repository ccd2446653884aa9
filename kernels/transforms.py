"""Invertible transforms applied before quantization and undone after it (codec options).

Where it stands: kvpool.kernels.codec calls these around the quantizer on any device.
  - pre-RoPE keys: keys leave the model with the rotary embedding applied; rotating them back
    to position 0 before quantizing keeps each channel's distribution the same across tokens,
    which per-channel groups need. Re-applied after dequantizing; exact up to float rounding.
  - Hadamard values: an orthonormal Hadamard rotation along head_dim spreads outlier channels
    over all channels before the per-token groups are formed; its transpose (itself) undoes it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kvpool.proto.errors import CodecError


@dataclass(frozen=True)
class RopeParams:
    """Rotary embedding as Hugging Face Llama-family models apply it ("rotate half" style).

    theta: the base; rotary_dim: leading channels of each head that are rotated;
    scaling: linear position scaling (positions are divided by it).
    """

    theta: float
    rotary_dim: int
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.theta <= 0 or self.scaling <= 0:
            raise CodecError("rope theta and scaling must be positive")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise CodecError(f"rotary_dim must be positive and even, got {self.rotary_dim}")


@functools.lru_cache(maxsize=256)
def _cos_sin_cpu(rope: RopeParams, start: int, tokens: int) -> tuple[Tensor, Tensor]:
    # cos, sin: [T, rotary_dim], angles computed in float64 then rounded once
    half = rope.rotary_dim // 2
    inv_freq = 1.0 / (rope.theta ** (torch.arange(half, dtype=torch.float64) * 2 / rope.rotary_dim))
    pos = torch.arange(start, start + tokens, dtype=torch.float64) / rope.scaling
    angles = torch.outer(pos, inv_freq).repeat(1, 2)
    return angles.cos().float(), angles.sin().float()


def rope_tables(
    rope: RopeParams, start: int, tokens: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos, sin float32 [tokens, rotary_dim] of positions start.. (each half repeated)."""
    cos, sin = _cos_sin_cpu(rope, start, tokens)  # blocks repeat the same positions: cached
    return cos.to(device), sin.to(device)


def rotated(k: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """k [..., D] float32 -> its first rotary_dim channels ("rotate half" style) turned by
    sign * the angles whose cos/sin [..., rotary_dim] are given (broadcast against k's rows)."""
    r = cos.shape[-1]
    if r > k.shape[-1]:
        raise CodecError(f"rotary_dim {r} exceeds head_dim {k.shape[-1]}")
    x = k[..., :r]
    turned = torch.cat((x[..., r // 2 :].neg(), x[..., : r // 2]), dim=-1)
    return torch.addcmul(x * cos, turned, sin, value=sign)


def _rotated(k: Tensor, rope: RopeParams, start: int, sign: float) -> Tensor:
    # k: [..., T, D] float32 -> its first rotary_dim channels rotated by sign * angle(position)
    if rope.rotary_dim > k.shape[-1]:
        raise CodecError(f"rotary_dim {rope.rotary_dim} exceeds head_dim {k.shape[-1]}")
    cos, sin = rope_tables(rope, start, k.shape[-2], k.device)
    return rotated(k, cos, sin, sign)


def _rotate(k: Tensor, rope: RopeParams, start: int, sign: float) -> Tensor:
    result = _rotated(k, rope, start, sign)
    if rope.rotary_dim == k.shape[-1]:
        return result
    out = k.clone()
    out[..., : rope.rotary_dim] = result
    return out


def undo_rope(keys: Tensor, rope: RopeParams, start: int) -> Tensor:
    """keys [L, H, T, D] as the model cached them at positions start.. -> pre-RoPE keys (fp32)."""
    return _rotate(keys.float(), rope, start, -1.0)


def redo_rope(keys: Tensor, rope: RopeParams, start: int) -> Tensor:
    """pre-RoPE keys [L, H, T, D] -> keys rotated to positions start.. (fp32)."""
    return _rotate(keys.float(), rope, start, 1.0)


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> Tensor:
    if n <= 0 or n & (n - 1):
        raise CodecError(f"the Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


def redo_rope_(keys: Tensor, rope: RopeParams, start: int) -> Tensor:
    """`redo_rope` in place on float32 keys [L, H, T, D], one layer at a time (the temporaries
    are one layer's size, not the block's)."""
    for layer in keys:
        layer[..., : rope.rotary_dim] = _rotated(layer, rope, start, 1.0)
    return keys


def hadamard(x: Tensor) -> Tensor:
    """x [..., D] -> x @ H_D (orthonormal, symmetric, its own inverse), in float32."""
    h = _hadamard_cpu(x.shape[-1]).to(x.device)
    return x.float() @ h


def hadamard_(x: Tensor) -> Tensor:
    """`hadamard` in place on float32 x [L, ...], one leading slice at a time."""
    h = _hadamard_cpu(x.shape[-1]).to(x.device)
    for part in x:
        part.copy_(part @ h)
    return x
