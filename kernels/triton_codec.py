"""The Triton codec, the CUDA fast path: fused kernels, quantize+pack and unpack+dequantize in one pass.

Where it stands: kvpool.kernels.codec uses it for CUDA tensors whose head_dim is a power of two;
tests run it under TRITON_INTERPRET=1 on the CPU and check its codes against reference.py.

One launch covers every layer of one tensor (keys or values) that shares a bit width, so a
block costs two launches in the common uniform case. Each program handles one tile:
  keys:   one (layer, head, group of G tokens): tile [G, D], groups along tokens (axis 0)
  values: one (layer, head, BLOCK_T tokens):   tile [BLOCK_T, D], groups of GV channels
and writes packed codes, fp16 scales and fp16 minimums straight into the block's payload at the
layer's section offsets (kvpool.proto.blockformat). Symmetric value groups (SYM, the format's
SYMMETRIC_VALUES) write and read no minimums: their offset is -h * s (reference.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvpool.kernels import env
from kvpool.proto.blockformat import BlockHeader, Section
from kvpool.proto.errors import NonFiniteError

_INTERPRET = env.TRITON_INTERPRET  # Triton's interpreter: CPU tensors too
_VALUE_ROWS = 16  # tokens per program for per-token groups
_KEY_WARPS = 8  # a key tile is [G, D]: up to 128 x 128 values
_VALUE_WARPS = 4


def supports(device: torch.device, head_dim: int) -> bool:
    """Whether the Triton path can run for tensors on `device` with this head_dim."""
    on_device = device.type == "cuda" or (_INTERPRET and device.type == "cpu")
    return on_device and head_dim >= 8 and head_dim & (head_dim - 1) == 0


# ---- packing helpers (inlined into the kernels) -------------------------------------------


@triton.jit
def _pack_plane(codes, R: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SHIFT: tl.constexpr):
    # codes: int32 [R, D] -> uint8 [R, D * W / 8]; byte j holds codes j, j + D/M, ... (M = 8/W)
    M: tl.constexpr = 8 // W
    part = (codes >> SHIFT) & ((1 << W) - 1)
    part = tl.reshape(part, (R, M, D // M))
    shifts = tl.arange(0, M) * W
    return tl.sum(part << shifts[None, :, None], axis=1).to(tl.uint8)


@triton.jit
def _unpack_plane(packed, R: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SHIFT: tl.constexpr):
    # packed: uint8 [R, D * W / 8] -> int32 [R, D], the plane's bits placed at SHIFT
    M: tl.constexpr = 8 // W
    shifts = tl.arange(0, M) * W
    part = (packed.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << W) - 1)
    return tl.reshape(part, (R, D)) << SHIFT


@triton.jit
def _store_codes(base, rows, codes, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    # base: uint8 pointer of the section's codes; rows: [R] row indices (head * T + token)
    ROW_BYTES: tl.constexpr = D * BITS // 8
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    NLOW: tl.constexpr = D * LOW // 8
    low = _pack_plane(codes, R, D, LOW, 0)
    tl.store(base + rows[:, None] * ROW_BYTES + tl.arange(0, NLOW)[None, :], low)
    if BITS == 3:
        high = _pack_plane(codes, R, D, 1, 2)
        tl.store(base + rows[:, None] * ROW_BYTES + NLOW + tl.arange(0, D // 8)[None, :], high)


@triton.jit
def _load_codes(base, rows, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    ROW_BYTES: tl.constexpr = D * BITS // 8
    LOW: tl.constexpr = 2 if BITS == 3 else BITS
    NLOW: tl.constexpr = D * LOW // 8
    low = tl.load(base + rows[:, None] * ROW_BYTES + tl.arange(0, NLOW)[None, :])
    codes = _unpack_plane(low, R, D, LOW, 0)
    if BITS == 3:
        high = tl.load(base + rows[:, None] * ROW_BYTES + NLOW + tl.arange(0, D // 8)[None, :])
        codes = codes | _unpack_plane(high, R, D, 1, 2)
    return codes


@triton.jit
def _quantize(x, lo, hi, BITS: tl.constexpr):
    # x: fp32 tile; lo, hi: group min/max broadcastable to x -> codes, fp16 scale, fp16 min
    QMAX: tl.constexpr = (1 << BITS) - 1
    scale = tl.maximum(
        tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)), 5.9604644775390625e-08
    )
    s16 = scale.to(tl.float16)
    m16 = lo.to(tl.float16)
    return s16, m16


@triton.jit
def _section(meta_ptr, slot):
    # one row of the launch plan: (layer, codes offset, scales offset, mins offset, first
    # channel); the tensor's row pointers then start at that channel
    row = meta_ptr + 5 * slot
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)


@triton.jit
def _bad(x):
    # 1 if any element is NaN, inf or beyond the fp16 range of the scales, else 0
    return tl.max(((x != x) | (tl.abs(x) > 65504.0)).to(tl.int32))


# ---- kernels --------------------------------------------------------------------------------


@triton.jit
def _encode_keys_kernel(
    # pointers
    x_ptr, out_ptr, meta_ptr, flag_ptr,
    # sizes and strides
    H, T, stride_l, stride_h, stride_t,
    # meta-parameters
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
):  # fmt: skip
    pid, g = tl.program_id(0), tl.program_id(1)
    h = pid % H
    layer, codes_off, scales_off, mins_off, first = _section(meta_ptr, pid // H)
    tok = g * G + tl.arange(0, G)
    ch = tl.arange(0, D)
    x = tl.load(
        x_ptr + layer * stride_l + h * stride_h + tok[:, None] * stride_t + first + ch[None, :]
    )
    x = x.to(tl.float32)
    tl.atomic_max(flag_ptr, _bad(x))
    QMAX: tl.constexpr = (1 << BITS) - 1
    s16, m16 = _quantize(x, tl.min(x, axis=0), tl.max(x, axis=0), BITS)  # [D]
    q = tl.math.div_rn(
        x - m16.to(tl.float32)[None, :], tl.broadcast_to(s16.to(tl.float32)[None, :], (G, D))
    )
    codes = tl.minimum(tl.maximum(tl.floor(q + 0.5), 0.0), QMAX).to(tl.int32)
    _store_codes(out_ptr + codes_off, h * T + tok, codes, G, D, BITS)
    p = (h * (T // G) + g) * D + ch
    tl.store((out_ptr + scales_off).to(tl.pointer_type(tl.float16)) + p, s16)
    tl.store((out_ptr + mins_off).to(tl.pointer_type(tl.float16)) + p, m16)


@triton.jit
def _encode_values_kernel(
    # pointers
    x_ptr, out_ptr, meta_ptr, flag_ptr,
    # sizes and strides
    H, T, stride_l, stride_h, stride_t,
    # meta-parameters
    D: tl.constexpr, GV: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
    SYM: tl.constexpr,
):  # fmt: skip
    pid, b = tl.program_id(0), tl.program_id(1)
    h = pid % H
    layer, codes_off, scales_off, mins_off, first = _section(meta_ptr, pid // H)
    tok = b * BT + tl.arange(0, BT)
    ch = tl.arange(0, D)
    x = tl.load(
        x_ptr + layer * stride_l + h * stride_h + tok[:, None] * stride_t + first + ch[None, :]
    )
    x = x.to(tl.float32)
    tl.atomic_max(flag_ptr, _bad(x))
    QMAX: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = D // GV
    xg = tl.reshape(x, (BT, NG, GV))
    lo, hi = tl.min(xg, axis=2), tl.max(xg, axis=2)  # [BT, NG]
    if SYM:  # one fp16 scale, the offset -h * s in fp32 (exact)
        HALF: tl.constexpr = QMAX * 0.5
        a = tl.maximum(-lo, hi)
        s16 = tl.maximum(
            tl.math.div_rn(a, tl.full(a.shape, HALF, tl.float32)), 5.9604644775390625e-08
        ).to(tl.float16)
        m = s16.to(tl.float32) * -HALF
    else:
        s16, m16 = _quantize(xg, lo, hi, BITS)
        m = m16.to(tl.float32)
    sf = tl.broadcast_to(s16.to(tl.float32)[:, :, None], (BT, NG, GV))
    q = tl.math.div_rn(xg - m[:, :, None], sf)
    codes = tl.minimum(tl.maximum(tl.floor(q + 0.5), 0.0), QMAX).to(tl.int32)
    _store_codes(out_ptr + codes_off, h * T + tok, tl.reshape(codes, (BT, D)), BT, D, BITS)
    p = (h * T + tok[:, None]) * NG + tl.arange(0, NG)[None, :]
    tl.store((out_ptr + scales_off).to(tl.pointer_type(tl.float16)) + p, s16)
    if not SYM:
        tl.store((out_ptr + mins_off).to(tl.pointer_type(tl.float16)) + p, m16)


@triton.jit
def _decode_kernel(
    # pointers
    in_ptr, y_ptr, meta_ptr,
    # sizes and strides
    H, T, stride_l, stride_h, stride_t,
    # meta-parameters
    D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
    IS_KEY: tl.constexpr, SYM: tl.constexpr,
):  # fmt: skip
    pid, b = tl.program_id(0), tl.program_id(1)
    h = pid % H
    layer, codes_off, scales_off, mins_off, first = _section(meta_ptr, pid // H)
    tok = b * BT + tl.arange(0, BT)
    ch = tl.arange(0, D)
    codes = _load_codes(in_ptr + codes_off, h * T + tok, BT, D, BITS).to(tl.float32)
    sp = (in_ptr + scales_off).to(tl.pointer_type(tl.float16))
    mp = (in_ptr + mins_off).to(tl.pointer_type(tl.float16))
    if IS_KEY:  # BT == G: one parameter row [D] for the tile
        p = (h * (T // G) + b) * D + ch
        y = (
            codes * tl.load(sp + p).to(tl.float32)[None, :]
            + tl.load(mp + p).to(tl.float32)[None, :]
        )
    else:
        NG: tl.constexpr = D // G
        p = (h * T + tok[:, None]) * NG + tl.arange(0, NG)[None, :]
        s = tl.load(sp + p).to(tl.float32)[:, :, None]
        NEG_HALF: tl.constexpr = -0.5 * ((1 << BITS) - 1)  # symmetric: the offset is -h * s
        m = s * NEG_HALF if SYM else tl.load(mp + p).to(tl.float32)[:, :, None]
        y = tl.reshape(tl.reshape(codes, (BT, NG, G)) * s + m, (BT, D))
    dst = y_ptr + layer * stride_l + h * stride_h + tok[:, None] * stride_t + first + ch[None, :]
    tl.store(dst, y.to(y_ptr.dtype.element_ty))


# ---- wrappers -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _launch_plan(
    sections: tuple[Section, ...], device: torch.device
) -> tuple[tuple[int, int, Tensor], ...]:
    """(bits, channels, meta) per bit width and section width: meta = int64 [n, 5] rows
    (layer, codes, scales, mins, first channel)."""
    by_kind: dict[tuple[int, int], list[list[int]]] = {}
    for s in sections:
        row = [s.layer, s.codes, s.scales, s.mins, s.first]
        by_kind.setdefault((s.bits, s.channels), []).append(row)
    return tuple(
        (bits, channels, torch.tensor(rows, dtype=torch.int64, device=device))
        for (bits, channels), rows in by_kind.items()
    )


def _check(x: Tensor, header: BlockHeader) -> None:
    assert x.dim() == 4 and x.stride(-1) == 1, "x must be [L, H, T, D] with contiguous channels"
    assert x.shape[-1] == header.head_dim and x.shape[-2] == header.tokens


def quantize_into(
    x: Tensor, sections: list[Section], header: BlockHeader, payload: Tensor, flag: Tensor
) -> None:
    """Launch the encode kernels for x: [L, H, T, D]; flag (int32 [1]) becomes 1 on bad input.

    Asynchronous: nothing waits for the device.
    """
    _check(x, header)
    _, h, t, _ = x.shape
    is_key = sections[0].is_key
    for bits, d, meta in _launch_plan(tuple(sections), payload.device):
        n = meta.shape[0]
        if is_key:
            grid = (n * h, t // header.group_size)
            _encode_keys_kernel[grid](
                x, payload, meta, flag, h, t, x.stride(0), x.stride(1), x.stride(2),
                D=d, G=header.group_size, BITS=bits, num_warps=_KEY_WARPS,
            )  # fmt: skip
        else:
            grid = (n * h, t // _VALUE_ROWS)
            _encode_values_kernel[grid](
                x, payload, meta, flag, h, t, x.stride(0), x.stride(1), x.stride(2),
                D=d, GV=header.value_group, BITS=bits, BT=_VALUE_ROWS, SYM=sections[0].symmetric,
                num_warps=_VALUE_WARPS,
            )  # fmt: skip


def encode_tensor(x: Tensor, sections: list[Section], header: BlockHeader, payload: Tensor) -> None:
    """Quantize and pack x: [L, H, T, D] into the payload's sections; raises on NaN/inf."""
    flag = torch.zeros(1, dtype=torch.int32, device=payload.device)
    quantize_into(x, sections, header, payload, flag)
    if int(flag.item()):
        raise NonFiniteError("block holds NaN, inf or a magnitude beyond fp16 (65504)")


def decode_tensor(
    payload: Tensor, sections: list[Section], header: BlockHeader, out: Tensor
) -> None:
    """Unpack and dequantize the payload's sections into out: [L, H, T, D]. Asynchronous."""
    _check(out, header)
    _, h, t, _ = out.shape
    is_key = sections[0].is_key
    group = header.group_size if is_key else header.value_group
    rows = header.group_size if is_key else _VALUE_ROWS
    for bits, d, meta in _launch_plan(tuple(sections), payload.device):
        grid = (meta.shape[0] * h, t // rows)
        _decode_kernel[grid](
            payload, out, meta, h, t, out.stride(0), out.stride(1), out.stride(2),
            D=d, G=group, BITS=bits, BT=rows, IS_KEY=is_key, SYM=sections[0].symmetric,
            num_warps=_KEY_WARPS if is_key else _VALUE_WARPS,
        )  # fmt: skip
