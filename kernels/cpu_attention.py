"""Attention over packed rows on the CPU: the C loop in _cpu_attention.c, in one call.

Where it stands: kvpool.kernels.attention dispatches here for CPU queries (`packed_attention`,
backend "auto" or "cpu"); kvpool.packed calls that for each decode step over a layer's packed
prefix. The loop is built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2/FMA/F16C) and the baseline;
the best this CPU has runs, capped by KVPOOL_CPU_ISA (kernels/env.py) or `use_isa`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor

from kvpool.kernels import _cpu_attention, env
from kvpool.kernels.cpu_codec import DTYPE_CODES, POOL
from kvpool.kernels.packed_kv import PackedKV, rope_span, rope_span_t


def use_isa(name: str | None) -> str:
    """Run the C loop built for `name` ("x86-64-v4", "x86-64-v3" or "x86-64"), or the best
    below it this CPU has (None: the best there is); returns the one in use. ValueError for
    an unknown name."""
    return str(_cpu_attention.use_isa(name))


ISA = use_isa(env.CPU_ISA)  # the one in use since import


def packed_attention(
    q: Tensor, kv: PackedKV, skip: int = 0, exact: Sequence[tuple[Tensor, Tensor, int]] = (),
    workers: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """`attention.packed_attention` on the CPU, in one C call: each packed key row is
    dequantized in scratch (RoPE redone at its position) and scored, exp(score - max) taken,
    p . V summed over the packed value rows (the Hadamard rotation undone once), and the exact
    segments (keys, values [B, H, n, D], causal) attended in the same pass. `workers` > 1
    splits the packed tokens among the worker threads, merged by log-sum-exp (it pays only
    where the cores are not SMT siblings)."""
    b, hq, nq, d = q.shape
    t, heads, rq = kv.tokens, kv.batch * kv.heads, hq // kv.heads * nq
    qf = q.float().contiguous()
    tables = [0] * 7  # cos, sin, rotary, positions, then the tiles' cosT, sinT, span (0: none)
    if kv.rope is not None and t > skip:
        top = t if kv.positions is None else int(kv.positions[:, :, :t].max()) + 1
        cos, sin = rope_span(kv.rope, top)  # cached: alive after this call
        pos = 0 if kv.positions is None else kv.positions.data_ptr()
        tables[:4] = cos.data_ptr(), sin.data_ptr(), kv.rope.rotary_dim, pos
        if kv.positions is None and kv.rope.rotary_dim == d and not kv.key_runs:  # 16 at a time
            cos_t, sin_t = rope_span_t(kv.rope, cos.shape[0])
            tables[4:] = cos_t.data_ptr(), sin_t.data_ptr(), cos.shape[0]
    segments, alive = [], []
    for keys, values, causal in (e for e in exact if e[0].shape[2] > 0):
        k, v = (x if _heads_apart(x) else x.contiguous() for x in (keys, values))
        if k.stride(1) != v.stride(1) or k.dtype != v.dtype or k.shape != v.shape:
            k, v = k.contiguous(), v.contiguous()
        alive += [k, v]
        segments.append((k.data_ptr(), v.data_ptr(), DTYPE_CODES[k.dtype], k.shape[2],
                         k.stride(1), causal))  # fmt: skip
    cap = max(kv.key_codes.shape[2], 1)
    keys_arg = (kv.key_codes.data_ptr(), kv.key_scales.data_ptr(), kv.key_mins.data_ptr(), heads,
                cap, max(t, kv.group), d, kv.group, kv.key_bits)  # fmt: skip
    values_arg = (kv.value_codes.data_ptr(), kv.value_scales.data_ptr(), kv.value_mins.data_ptr(),
                  heads, cap, max(t, kv.group), d, kv.value_group, kv.value_bits)  # fmt: skip
    basis = None
    if kv.key_basis is not None:  # keys in a basis: each row rebuilt as mean + rows^T c
        mean, rows = (x if kv.batch == 1 else x.repeat(kv.batch, *[1] * (x.dim() - 1))
                      for x in kv.key_basis)  # fmt: skip
        alive += [mean, rows]
        basis = (mean.data_ptr(), rows.data_ptr(), kv.components, kv.key_runs)
    bounds = sorted({skip + (t - skip) * w // workers for w in range(workers)} | {t})
    ranges = list(itertools.pairwise(bounds)) or [(t, t)]
    if len(ranges) == 1:  # the C loop finishes the softmax itself: o and lse
        o, lse, total = torch.empty(b, hq, nq, d), torch.empty(b, hq, nq), torch.empty(b, hq, nq)
        _cpu_attention.attend(keys_arg, values_arg, qf.data_ptr(), rq, nq, ranges[0][0], t, skip,
                          int(kv.hadamard_values), o.data_ptr(), lse.data_ptr(),
                          total.data_ptr(), tuple(segments), *tables, 1, basis)  # fmt: skip
        return o, lse
    acc = torch.empty(len(ranges), b, hq, nq, d)
    mx = torch.empty(len(ranges), b, hq, nq)
    total = torch.empty(len(ranges), b, hq, nq)

    def one(i: int) -> None:
        lo, hi = ranges[i]
        _cpu_attention.attend(keys_arg, values_arg, qf.data_ptr(), rq, nq, lo, hi, skip,
                          int(kv.hadamard_values), acc[i].data_ptr(), mx[i].data_ptr(),
                          total[i].data_ptr(), tuple(segments) if i == 0 else (), *tables, 0,
                          basis)  # fmt: skip

    list(POOL.map(one, range(len(ranges))))
    lse = mx + total.log()
    o = (acc / total.unsqueeze(-1)).nan_to_num_(0.0)  # no counted row: 0
    weights = torch.softmax(lse, dim=0).nan_to_num(0.0)
    return (weights.unsqueeze(-1) * o).sum(0), torch.logsumexp(lse, dim=0)


def _heads_apart(x: Tensor) -> bool:
    """[B, H, n, D] with rows of D contiguous, one head's rows in a run, heads evenly apart."""
    b, h, _, d = x.shape
    return x.stride(3) == 1 and x.stride(2) == d and (b == 1 or x.stride(0) == h * x.stride(1))
