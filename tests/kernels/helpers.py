"""Shared by the codec tests: random blocks and the error bound the spec promises."""

from __future__ import annotations

import torch
from torch import Tensor

from kvpool.kernels import reference


def kv(
    layers: int = 2,
    heads: int = 2,
    tokens: int = 128,
    dim: int = 64,
    dtype=torch.float16,
    seed: int = 0,
    device="cpu",
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(layers, heads, tokens, dim, generator=g) * 2 + 0.5
    v = torch.randn(layers, heads, tokens, dim, generator=g)
    return k.to(dtype).to(device), v.to(dtype).to(device)


def error_bound(x: Tensor, is_key: bool, group: int, bits: int) -> Tensor:
    """Per-element bound on |x - x_hat| for x [H, T, D]: half a quantization step, plus what
    rounding the group's scale and minimum to fp16 can add (clamping at the group's ends)."""
    scale, lo = reference.group_params(x, is_key, group, bits)
    s = scale.float().repeat_interleave(group, dim=1 if is_key else 2)
    m = lo.float().repeat_interleave(group, dim=1 if is_key else 2)
    qmax = 2**bits - 1
    return 0.5 * s + m.abs() * 2**-10 + qmax * s * 2**-10 + 1e-6
