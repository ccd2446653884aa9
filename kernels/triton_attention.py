"""The CUDA decode path over packed KV: fused Triton kernels that attend straight from the codes.

Where it stands: kvpool.kernels.attention dispatches here (`packed_attention(..., backend=
"triton")`, or "auto" on CUDA, and `window_scores` on CUDA); kvpool.packed calls those for
each decode step over a layer's packed prefix and merges the result with the exact window by
log-sum-exp. Tests run the kernels under TRITON_INTERPRET=1 on the CPU against the torch spec
(`attention_reference`, `window_scores_reference`).

packed_attention, flash-decoding style, two launches:
  _attend_kernel   grid (B * H kv heads, token splits). A program holds the R * Q query rows
                   of its kv head and walks its split in tiles of BT packed rows: unpack the key
                   codes' bit planes, dequantize with the tile's per-channel group parameters,
                   redo RoPE at each row's position (cos/sin computed in the kernel), score,
                   online softmax, dequantize the values per token (groups of Gv channels),
                   accumulate p . V. It writes the split's partial (max, sum, accumulator).
  _combine_kernel  grid (B * H,): merges the splits by log-sum-exp, undoes the values' Hadamard
                   rotation once on the output, writes o [B, Hq, Q, D] and lse [B, Hq, Q].
RoPE is folded into the query side: with kr = k * cos + rotate_half(k) * sin,
q . kr = q . (k * cos) + q' . (k * sin), q' = -rotate_half(q); no channel shuffle of the keys.

window_scores, two passes, nothing of size [W, N] materialized:
  _window_lse_kernel  grid (B * Hq, query blocks): each query row's log-sum-exp over the keys it
                      sees (causal), looping over key blocks.
  _window_sum_kernel  grid (B * H, key blocks): each key's sum of exp(s - lse) over the window's
                      queries and the R query heads of its kv head.

Products: `dot` picks how scores and p . V are computed: "fma" (broadcast multiply and sum in
fp32, rows padded only to a power of two: for the few query rows of a decode step), "ieee"
(tl.dot in exact fp32, rows padded to 16), "tf32" / "tf32x3" (tensor cores; tf32 rounds the
inputs to 10 mantissa bits, like fp16 attention). The default is exact fp32.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kvpool.kernels import env
from kvpool.kernels.packed_kv import PackedKV, check_query
from kvpool.kernels.transforms import RopeParams
from kvpool.kernels.triton_codec import _load_codes
from kvpool.proto.errors import CodecError

_INTERPRET = env.TRITON_INTERPRET  # Triton's interpreter: CPU tensors too
DOTS = ("fma", "ieee", "tf32", "tf32x3")
_FMA_ROWS = 8  # "auto": broadcast products up to this many query rows per kv head, else tl.dot
_FMA_ELEMENTS = 16384  # an "fma" tile's product [rows, BT, D] stays within this many elements
_MAX_TILE = 64  # packed rows per tile
_SPLIT_ROWS_PER_QUERY_ROW = 16  # a split covers at least 16 * BLOCK_M (>= 128) packed rows:
# its partial (BLOCK_M x D fp32) stays small next to the rows it reads
_WARPS = 4
_WINDOW_ROWS = 32  # window_scores: query rows and keys per block
_WINDOW_KEYS = 64


# ---- helpers (inlined into the kernels) -----------------------------------------------------


@triton.jit
def _mm_t(a, b, DOT: tl.constexpr):
    # a [M, K] @ b[N, K]^T -> [M, N] float32
    if DOT == "fma":
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    else:
        return tl.dot(a, tl.trans(b), input_precision=DOT)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    # a [M, K] @ b [K, N] -> [M, N] float32
    if DOT == "fma":
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT)


@triton.jit
def _cos_sin(posf, f_hi, f_lo):
    # cos and sin of the angle posf * f, f = f_hi + f_lo (fp32 pair of the float64 frequency),
    # to about 1e-6 rad at any position below 2^24: the product's rounding error (an fma) and
    # f_lo are carried separately, and the angle is reduced to [-pi, pi] by 2 pi as the fp32
    # pair 6.2831854820251465 - 1.7484555314695172e-07 (each step one fma)
    a = posf * f_hi
    e = tl.fma(posf, f_hi, -a) + posf * f_lo
    n = tl.floor(a * 0.15915494309189535 + 0.5)
    r = tl.fma(-n, 6.2831854820251465, a)
    r = tl.fma(-n, -1.7484555314695172e-07, r) + e
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rope_cos_sin(posf, freq_ptr, BT: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    # posf [BT] fp32 positions -> cos, sin [BT, D]. freq_ptr: fp32 [2, D], each channel's
    # frequency inv_freq / scaling as a (high, low) pair, the halves repeated, 0 past
    # rotary_dim (cos 1, sin 0 there). HALF: rotary_dim == D, the second half repeats the
    # first: compute it once and broadcast.
    if HALF:
        ch = tl.arange(0, D // 2)
        f_hi, f_lo = tl.load(freq_ptr + ch), tl.load(freq_ptr + D + ch)
        c, s = _cos_sin(posf[:, None], f_hi[None, :], f_lo[None, :])
        c = tl.reshape(tl.broadcast_to(c[:, None, :], (BT, 2, D // 2)), (BT, D))
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (BT, 2, D // 2)), (BT, D))
    else:
        ch = tl.arange(0, D)
        f_hi, f_lo = tl.load(freq_ptr + ch), tl.load(freq_ptr + D + ch)
        c, s = _cos_sin(posf[:, None], f_hi[None, :], f_lo[None, :])
    return c, s


# ---- packed attention kernels ---------------------------------------------------------------


@triton.jit
def _attend_kernel(
    # pointers
    q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, pos_ptr, freq_ptr,
    m_ptr, l_ptr, acc_ptr,
    # sizes
    H, R, Q, T, CAP, SKIP, TILES_PER_SPLIT, SPLITS,
    # strides (q, in elements)
    stride_qb, stride_qh, stride_qq, stride_qd,
    # meta-parameters
    D: tl.constexpr, BLOCK_M: tl.constexpr, BT: tl.constexpr, G: tl.constexpr,
    GV: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr, TILE_PARAMS: tl.constexpr,
    ROPE: tl.constexpr, ROT_DIM: tl.constexpr, HALF: tl.constexpr, HAS_POS: tl.constexpr,
    DOT: tl.constexpr,
):  # fmt: skip
    bh, split = tl.program_id(0), tl.program_id(1)
    bh64 = bh.to(tl.int64)
    b, h = bh // H, bh % H
    NG: tl.constexpr = D // GV

    # the kv head's query rows m = r * Q + i (query head h * R + r, query i), fp32
    rows = tl.arange(0, BLOCK_M)
    ch = tl.arange(0, D)
    live = rows < R * Q
    q_row = q_ptr + b.to(tl.int64) * stride_qb + (h * R + rows // Q) * stride_qh
    q_row += (rows % Q) * stride_qq
    q = tl.load(q_row[:, None] + ch[None, :] * stride_qd, mask=live[:, None], other=0.0)
    q = q.to(tl.float32)
    if ROPE:  # q' = -rotate_half(q) on the rotary channels, 0 past them
        HR: tl.constexpr = ROT_DIM // 2
        partner = tl.where(ch < HR, ch + HR, ch - HR)
        sign = tl.where(ch < HR, 1.0, -1.0)
        qr = tl.load(
            q_row[:, None] + partner[None, :] * stride_qd,
            mask=live[:, None] & (ch < ROT_DIM)[None, :],
            other=0.0,
        )
        qr = qr.to(tl.float32) * sign[None, :]

    # this head's buffers
    KROW: tl.constexpr = D * KB // 8
    VROW: tl.constexpr = D * VB // 8
    k_codes = kc_ptr + bh64 * CAP * KROW
    v_codes = vc_ptr + bh64 * CAP * VROW
    k_params = bh64 * (CAP // G) * D
    v_params = bh64 * CAP * NG

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    first = SKIP // BT + split * TILES_PER_SPLIT
    last = tl.minimum(first + TILES_PER_SPLIT, tl.cdiv(T, BT))
    for tile in range(first, last):
        tok = tile * BT + tl.arange(0, BT)
        valid = (tok >= SKIP) & (tok < T)
        row = tl.minimum(tok, T - 1)  # rows past T: a real row's copy, masked out of the scores

        # keys: codes * scale + min per channel, groups of G rows
        k = _load_codes(k_codes, row, BT, D, KB).to(tl.float32)
        if TILE_PARAMS:  # the tile lies inside one group: one parameter row
            p = k_params + (tile * BT // G) * D + ch
            k = k * tl.load(ks_ptr + p).to(tl.float32)[None, :]
            k += tl.load(km_ptr + p).to(tl.float32)[None, :]
        else:
            p = k_params + (row // G)[:, None] * D + ch[None, :]
            k = k * tl.load(ks_ptr + p).to(tl.float32) + tl.load(km_ptr + p).to(tl.float32)

        if ROPE:
            if HAS_POS:
                posf = tl.load(pos_ptr + bh64 * CAP + row).to(tl.float32)
            else:
                posf = row.to(tl.float32)
            c, s = _rope_cos_sin(posf, freq_ptr, BT, D, HALF)
            if DOT == "fma":
                kc, ksn = k * c, k * s
                scores = tl.sum(
                    q[:, None, :] * kc[None, :, :] + qr[:, None, :] * ksn[None, :, :], 2
                )
            else:
                scores = _mm_t(q, k * c, DOT) + _mm_t(qr, k * s, DOT)
        else:
            scores = _mm_t(q, k, DOT)
        scores = tl.where(valid[None, :], scores, float("-inf"))

        # online softmax (a tile with no valid row leaves the state as it was)
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        prob = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)

        # values: codes * scale + min per token, groups of GV channels
        v = _load_codes(v_codes, row, BT, D, VB).to(tl.float32)
        p = v_params + row[:, None] * NG + tl.arange(0, NG)[None, :]
        vs = tl.load(vs_ptr + p).to(tl.float32)[:, :, None]
        vm = tl.load(vm_ptr + p).to(tl.float32)[:, :, None]
        v = tl.reshape(tl.reshape(v, (BT, NG, GV)) * vs + vm, (BT, D))
        acc = acc * alpha[:, None] + _mm(prob, v, DOT)
        m_i = m_new

    part = (bh64 * SPLITS + split) * BLOCK_M + rows
    tl.store(m_ptr + part, m_i)
    tl.store(l_ptr + part, l_i)
    tl.store(acc_ptr + part[:, None] * D + ch[None, :], acc)


@triton.jit
def _combine_kernel(
    # pointers
    m_ptr, l_ptr, acc_ptr, o_ptr, lse_ptr,
    # sizes
    M, SPLITS, HSCALE,
    # meta-parameters
    D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
    HADAMARD: tl.constexpr, LOG2D: tl.constexpr,
):  # fmt: skip
    # ROWS >= BLOCK_M, >= 16: the rows this program holds (tl.dot's minimum for the rotation)
    bh64 = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    ch = tl.arange(0, D)
    held = rows < BLOCK_M
    sp = tl.arange(0, BLOCK_S)
    parts = (bh64 * SPLITS + sp[:, None]) * BLOCK_M + rows[None, :]
    inside = (sp < SPLITS)[:, None] & held[None, :]
    m = tl.load(m_ptr + parts, mask=inside, other=float("-inf"))  # [BLOCK_S, ROWS]
    top = tl.max(m, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top_safe[None, :])
    total = tl.sum(w * tl.load(l_ptr + parts, mask=inside, other=0.0), axis=0)
    acc = tl.zeros((ROWS, D), tl.float32)
    for s in range(SPLITS):
        part = (bh64 * SPLITS + s) * BLOCK_M + rows
        ws = tl.exp(tl.load(m_ptr + part, mask=held, other=float("-inf")) - top_safe)
        a = tl.load(acc_ptr + part[:, None] * D + ch[None, :], mask=held[:, None], other=0.0)
        acc += ws[:, None] * a
    safe_total = tl.where(total > 0, total, 1.0)
    o = acc / safe_total[:, None]
    if HADAMARD:  # o @ H_D, H[i, j] = (-1)^popcount(i & j) / sqrt(D)
        bits = ch[:, None] & ch[None, :]
        ones = tl.zeros((D, D), tl.int32)
        for k in tl.static_range(LOG2D):
            ones += (bits >> k) & 1
        hmat = tl.where((ones & 1) == 0, HSCALE, -HSCALE)
        o = tl.dot(o, hmat, input_precision="ieee")
    lse = tl.where(total > 0, top_safe + tl.log(safe_total), float("-inf"))
    out = bh64 * M + rows
    tl.store(o_ptr + out[:, None] * D + ch[None, :], o, mask=(rows < M)[:, None])
    tl.store(lse_ptr + out, lse, mask=rows < M)


# ---- window score kernels -------------------------------------------------------------------


@triton.jit
def _window_lse_kernel(
    # pointers
    q_ptr, k_ptr, lse_ptr,
    # sizes
    HQ, R, W, N,
    # strides (in elements)
    stride_qb, stride_qh, stride_qw, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    # meta-parameters
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid, blk = tl.program_id(0), tl.program_id(1)
    b, hq = pid // HQ, pid % HQ
    i = blk * BM + tl.arange(0, BM)
    ch = tl.arange(0, D)
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + hq * stride_qh + i * stride_qw
    q = tl.load(q_rows[:, None] + ch[None, :] * stride_qd, mask=(i < W)[:, None], other=0.0)
    q = q.to(tl.float32)
    k_head = k_ptr + b.to(tl.int64) * stride_kb + (hq // R) * stride_kh
    seen = N - W + i  # the last key each query sees
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    end = tl.minimum(N, N - W + (blk + 1) * BM)
    for n0 in range(0, end, BN):
        n = n0 + tl.arange(0, BN)
        k = tl.load(
            k_head + n[:, None] * stride_kn + ch[None, :] * stride_kd,
            mask=(n < N)[:, None],
            other=0.0,
        )
        s = _mm_t(q, k.to(tl.float32), DOT)
        s = tl.where((n[None, :] <= seen[:, None]) & (n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid.to(tl.int64) * W + i, lse, mask=i < W)


@triton.jit
def _window_sum_kernel(
    # pointers
    q_ptr, k_ptr, lse_ptr, out_ptr,
    # sizes
    H, R, W, N,
    # strides (in elements)
    stride_qb, stride_qh, stride_qw, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    # meta-parameters
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr,
):  # fmt: skip
    pid, blk = tl.program_id(0), tl.program_id(1)
    b, h = pid // H, pid % H
    n = blk * BN + tl.arange(0, BN)
    ch = tl.arange(0, D)
    k_head = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    k = tl.load(
        k_head + n[:, None] * stride_kn + ch[None, :] * stride_kd, mask=(n < N)[:, None], other=0.0
    )
    k = k.to(tl.float32)
    acc = tl.zeros((BN,), tl.float32)
    first = tl.maximum(blk * BN - (N - W), 0) // BM * BM  # earlier queries see none of the block
    for r in range(R):
        hq = h * R + r
        q_head = q_ptr + b.to(tl.int64) * stride_qb + hq * stride_qh
        lse_head = lse_ptr + (b * H * R + hq).to(tl.int64) * W
        for i0 in range(first, W, BM):
            i = i0 + tl.arange(0, BM)
            q = tl.load(
                q_head + i[:, None] * stride_qw + ch[None, :] * stride_qd,
                mask=(i < W)[:, None],
                other=0.0,
            )
            lse = tl.load(lse_head + i, mask=i < W, other=float("inf"))
            s = _mm_t(q.to(tl.float32), k, DOT)
            s = tl.where(n[None, :] <= (N - W + i)[:, None], s, float("-inf"))
            acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)
    tl.store(out_ptr + pid.to(tl.int64) * N + n, acc, mask=n < N)


# ---- wrappers -------------------------------------------------------------------------------


def _check_device(device: torch.device, head_dim: int) -> None:
    if not (device.type == "cuda" or (_INTERPRET and device.type == "cpu")):
        raise CodecError(
            f"the Triton attention kernels run on CUDA (or the CPU under TRITON_INTERPRET=1), "
            f"not on {device}"
        )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise CodecError(
            f"the Triton attention kernels need a power-of-two head_dim >= 16, got {head_dim}"
        )


def _check_dot(dot: str) -> None:
    if dot not in DOTS:
        raise CodecError(f"dot must be one of {DOTS}, got {dot!r}")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _frequencies(rope: RopeParams, head_dim: int, device: torch.device) -> Tensor:
    """float32 [2, head_dim]: each channel's RoPE frequency inv_freq / scaling, computed in
    float64 (the halves repeated, 0 past rotary_dim) and split into a high and a low fp32 part."""
    half = rope.rotary_dim // 2
    inv = 1.0 / (rope.theta ** (torch.arange(half, dtype=torch.float64) * 2 / rope.rotary_dim))
    freq = torch.zeros(head_dim, dtype=torch.float64)
    freq[: rope.rotary_dim] = (inv / rope.scaling).repeat(2)
    high = freq.float()
    return torch.stack((high, (freq - high.double()).float())).to(device)


@functools.lru_cache(maxsize=8)
def _programs(device: torch.device) -> int:
    """How many programs keep the device busy: a few per streaming multiprocessor."""
    if device.type != "cuda":
        return 8
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _tile_rows(group: int, limit: int) -> tuple[int, bool]:
    """(BT, whether each tile lies inside one key group): the largest power of two <= limit
    (>= 16, tl.dot's minimum) that divides G, else 16 with parameters gathered per row."""
    bt = limit
    while bt > 16 and group % bt:
        bt //= 2
    return bt, group % bt == 0


def packed_attention(
    q: Tensor, kv: PackedKV, skip: int = 0, *, splits: int | None = None, dot: str | None = None
) -> tuple[Tensor, Tensor]:
    """(o, lse) of q [B, Hq, Q, D] (pre-scaled, any float dtype) over the packed rows
    skip..T-1 of kv: o float32 [B, Hq, Q, D], lse float32 [B, Hq, Q] (-inf and o = 0 where no
    row counts); `attention_reference`'s contract. splits: token splits per kv head (default:
    enough programs to fill the device); dot: how products are computed (module docstring;
    default "fma" for up to 8 query rows per kv head, else "ieee")."""
    r = check_query(q, kv)
    _check_device(q.device, kv.head_dim)
    if not q.dtype.is_floating_point:
        raise CodecError(f"q must be a float tensor, got {q.dtype}")
    if not 0 <= skip <= kv.tokens:
        raise CodecError(f"skip {skip} outside 0..{kv.tokens}")
    b, hq, nq, d = q.shape
    h, t = kv.heads, kv.tokens
    rows = r * nq
    if b * hq * nq == 0:  # nothing to launch
        empty = torch.zeros(b, hq, nq, d, dtype=torch.float32, device=q.device)
        return empty, torch.full((b, hq, nq), float("-inf"), device=q.device)
    dot = dot or ("fma" if rows <= _FMA_ROWS else "ieee")
    _check_dot(dot)
    if dot == "fma":
        block_m = _pow2(rows)
        limit = min(_MAX_TILE, max(16, _pow2(_FMA_ELEMENTS // (block_m * d) + 1) // 2))
    else:
        block_m, limit = max(16, _pow2(rows)), _MAX_TILE
    bt, tile_params = _tile_rows(kv.group, limit)

    tiles = max(0, -(-t // bt) - skip // bt)
    if splits is None:
        want = -(-_programs(q.device) // (b * h))
        least = max(128, _SPLIT_ROWS_PER_QUERY_ROW * block_m)
        splits = min(want, max(1, -(-tiles * bt // least)))
    if splits < 1:
        raise CodecError(f"splits must be positive, got {splits}")
    per_split = max(1, -(-tiles // splits))
    splits = max(1, -(-tiles // per_split))

    dev = q.device
    m = torch.empty(b * h, splits, block_m, dtype=torch.float32, device=dev)
    lsum = torch.empty_like(m)
    acc = torch.empty(b * h, splits, block_m, d, dtype=torch.float32, device=dev)
    rope = kv.rope
    freq = _frequencies(rope, d, dev) if rope is not None else m  # m: an unused pointer
    pos = kv.positions if kv.positions is not None else m
    _attend_kernel[(b * h, splits)](
        q, kv.key_codes, kv.key_scales, kv.key_mins, kv.value_codes, kv.value_scales,
        kv.value_mins, pos, freq, m, lsum, acc,
        h, r, nq, t, kv.key_codes.shape[2], skip, per_split, splits,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        D=d, BLOCK_M=block_m, BT=bt, G=kv.group, GV=kv.value_group, KB=kv.key_bits,
        VB=kv.value_bits, TILE_PARAMS=tile_params, ROPE=rope is not None,
        ROT_DIM=rope.rotary_dim if rope is not None else 0,
        HALF=rope is not None and rope.rotary_dim == d, HAS_POS=kv.positions is not None,
        DOT=dot, num_warps=_WARPS,
    )  # fmt: skip

    o = torch.empty(b, hq, nq, d, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=dev)
    _combine_kernel[(b * h,)](
        m, lsum, acc, o, lse,
        rows, splits, 1.0 / math.sqrt(d),
        D=d, BLOCK_M=block_m, ROWS=max(16, block_m), BLOCK_S=_pow2(splits),
        HADAMARD=kv.hadamard_values, LOG2D=d.bit_length() - 1, num_warps=_WARPS,
    )  # fmt: skip
    return o, lse


def window_scores(q: Tensor, keys: Tensor, *, dot: str = "ieee") -> Tensor:
    """MiniKV/SnapKV selection scores float32 [B, H, N] of keys [B, H, N, D] (exact) from the
    prompt's last W queries q [B, Hq, W, D] (pre-scaled, causal: query i at position N - W + i);
    `window_scores_reference`'s contract, in two passes over key blocks."""
    if q.dim() != 4 or keys.dim() != 4:
        raise CodecError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} must be 4-d")
    b, hq, w, d = q.shape
    _, h, n, _ = keys.shape
    if keys.shape[0] != b or keys.shape[3] != d or h == 0 or hq % h:
        raise CodecError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} do not match")
    if w > n:
        raise CodecError(f"the query window ({w}) is longer than the prompt ({n})")
    if not (q.dtype.is_floating_point and keys.dtype.is_floating_point):
        raise CodecError(f"q and keys must be float tensors, got {q.dtype} and {keys.dtype}")
    if q.device != keys.device:
        raise CodecError(f"q is on {q.device}, keys on {keys.device}")
    _check_device(q.device, d)
    _check_dot(dot)
    if dot == "fma":
        raise CodecError("window_scores uses tl.dot: dot must be ieee, tf32 or tf32x3")
    r = hq // h
    lse = torch.empty(b, hq, w, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    if b * w * n == 0:
        return out.zero_()
    bm = min(_WINDOW_ROWS, max(16, _pow2(w)))
    strides = (*q.stride(), *keys.stride())
    _window_lse_kernel[(b * hq, -(-w // bm))](
        q, keys, lse, hq, r, w, n, *strides,
        D=d, BM=bm, BN=_WINDOW_KEYS, DOT=dot, num_warps=_WARPS,
    )  # fmt: skip
    _window_sum_kernel[(b * h, -(-n // _WINDOW_KEYS))](
        q, keys, lse, out, h, r, w, n, *strides,
        D=d, BM=bm, BN=_WINDOW_KEYS, DOT=dot, num_warps=_WARPS,
    )  # fmt: skip
    return out
