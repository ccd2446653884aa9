"""The codec's specification in plain torch: quantize, pack, unpack, dequantize.

Where it stands: kvpool.kernels.codec calls these on any device when no faster path applies;
the Triton kernels (triton_codec.py) and the CPU loop (_cpu_codec.c) must produce the same codes
bit for bit, and tests check that they do.

KIVI asymmetric quantization of one tensor section x: [H, T, D] (one layer's keys or values):
  keys   ("per channel"): each group is G consecutive tokens of one channel,
         scales/mins: [H, T/G, D]
  values ("per token"):   each group is G consecutive channels of one token,
         scales/mins: [H, T, D/G]
For a group with minimum m and maximum M, at b bits:
  s     = fp16(max((M - m) / (2^b - 1), 2^-24))      m16 = fp16(m)
  code  = clamp(floor((x - m16) / s + 0.5), 0, 2^b - 1)     (all in fp32)
  x_hat = code * s + m16
Symmetric groups (values under SYMMETRIC_VALUES; per-token groups only), h = (2^b - 1) / 2:
  s     = fp16(max(max(-m, M) / h, 2^-24))      m32 = -h * s  (fp32, exact)
  code  = clamp(floor((x - m32) / s + 0.5), 0, 2^b - 1)
  x_hat = code * s + m32 = (code - h) * s          (no minimum stored)
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpool.proto.blockformat import BlockHeader, Section, plane_widths
from kvpool.proto.errors import NonFiniteError

SCALE_EPS = 2.0**-24  # the smallest positive fp16 (subnormal): a constant group gives s = eps


def group_params(
    x: Tensor, is_key: bool, group: int, bits: int, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """fp16 scales and minimums of a section x: [H, T, D] (shapes in the module docstring);
    symmetric: fp16 scales and the fp32 offsets -h * s they imply (no minimum stored)."""
    xf = x.float()
    h, t, d = xf.shape
    if is_key:
        grouped = xf.view(h, t // group, group, d)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    else:
        grouped = xf.view(h, t, d // group, group)
        lo, hi = grouped.amin(dim=3), grouped.amax(dim=3)
    if symmetric:
        assert not is_key, "symmetric groups are per token"
        half = (2**bits - 1) / 2
        scale = (torch.maximum(-lo, hi) / half).clamp_min(SCALE_EPS).half()
        return scale, symmetric_offset(scale, bits)
    scale = ((hi - lo) / float(2**bits - 1)).clamp_min(SCALE_EPS)
    return scale.half(), lo.half()


def symmetric_offset(scale: Tensor, bits: int) -> Tensor:
    """-h * s in fp32 (exact): what a symmetric group's codes are offset by, in place of m16."""
    return scale.float() * -((2**bits - 1) / 2)


def _expand(p: Tensor, is_key: bool, group: int) -> Tensor:
    """Broadcast group parameters back to [H, T, D] (fp32)."""
    return p.float().repeat_interleave(group, dim=1 if is_key else 2)


def quantize(
    x: Tensor, is_key: bool, group: int, bits: int, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [H, T, D] float -> codes uint8 [H, T, D], scales fp16, mins fp16 (symmetric: the
    fp32 offsets, not stored)."""
    scale, lo = group_params(x, is_key, group, bits, symmetric)
    s, m = _expand(scale, is_key, group), _expand(lo, is_key, group)
    codes = torch.floor((x.float() - m) / s + 0.5).clamp_(0, 2**bits - 1)
    return codes.to(torch.uint8), scale, lo


def dequantize(
    codes: Tensor, scale: Tensor, lo: Tensor, is_key: bool, group: int, dtype: torch.dtype
) -> Tensor:
    """codes uint8 [H, T, D] and fp16 group parameters -> x_hat [H, T, D] of `dtype`."""
    s, m = _expand(scale, is_key, group), _expand(lo, is_key, group)
    return (codes.float() * s + m).to(dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [..., n] -> packed bytes uint8 [..., n * bits / 8], planar (blockformat)."""
    n = codes.shape[-1]
    planes, shift = [], 0
    for w in plane_widths(bits):
        per_byte = 8 // w
        part = ((codes >> shift) & (2**w - 1)).to(torch.int32)
        part = part.view(*codes.shape[:-1], per_byte, n // per_byte)
        weights = torch.tensor([1 << (w * k) for k in range(per_byte)], dtype=torch.int32)
        planes.append((part * weights.to(codes.device)[:, None]).sum(dim=-2).to(torch.uint8))
        shift += w
    return torch.cat(planes, dim=-1)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """packed bytes uint8 [..., n * bits / 8] -> codes uint8 [..., n]."""
    codes = torch.zeros(*packed.shape[:-1], n, dtype=torch.uint8, device=packed.device)
    start, shift = 0, 0
    for w in plane_widths(bits):
        per_byte = 8 // w
        plane = packed[..., start : start + n // per_byte]
        shifts = torch.arange(0, 8, w, dtype=torch.uint8, device=packed.device)
        part = (plane.unsqueeze(-2) >> shifts[:, None]) & (2**w - 1)
        codes |= part.reshape(*packed.shape[:-1], n) << shift
        start += n // per_byte
        shift += w
    return codes


def _params_view(payload: Tensor, offset: int, n: int) -> Tensor:
    return payload[offset : offset + 2 * n].view(torch.float16)


def encode_tensor(x: Tensor, sections: list[Section], header: BlockHeader, payload: Tensor) -> None:
    """Quantize and pack x: [L, H, T, D] into the payload's sections (the spec of the layout)."""
    if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 65504.0:
        raise NonFiniteError("block holds NaN, inf or a magnitude beyond fp16 (65504)")
    for s in sections:
        group = header.group_size if s.is_key else header.value_group
        part = x[s.layer, :, :, s.first : s.first + s.channels]
        codes, scale, lo = quantize(part.contiguous(), s.is_key, group, s.bits, s.symmetric)
        packed = pack(codes, s.bits).flatten()
        payload[s.codes : s.codes + packed.numel()] = packed
        _params_view(payload, s.scales, s.n_params).copy_(scale.flatten())
        if not s.symmetric:
            _params_view(payload, s.mins, s.n_params).copy_(lo.flatten())


def decode_tensor(
    payload: Tensor, sections: list[Section], header: BlockHeader, out: Tensor
) -> None:
    """Unpack and dequantize the payload's sections into out: [L, H, T, D]."""
    _, h, t, _ = out.shape
    for s in sections:
        group = header.group_size if s.is_key else header.value_group
        d = s.channels
        n_bytes = h * t * d * s.bits // 8
        codes = unpack(payload[s.codes : s.codes + n_bytes].view(h, t, -1), s.bits, d)
        pshape = (h, t // group, d) if s.is_key else (h, t, d // group)
        scale = _params_view(payload, s.scales, s.n_params).view(pshape)
        if s.symmetric:
            lo = symmetric_offset(scale, s.bits)
        else:
            lo = _params_view(payload, s.mins, s.n_params).view(pshape)
        part = dequantize(codes, scale, lo, s.is_key, group, out.dtype)
        out[s.layer, :, :, s.first : s.first + d] = part
