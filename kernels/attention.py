"""Attention straight from packed KV: decode steps that read the codec's 2/3/4-bit codes in place.

Where it stands: kvpool.client.packed keeps a layer's prefix packed, exactly as the codec wrote
it into blocks (sections concatenated along tokens), and calls `packed_attention` for each decode
step; the fp16/fp32 window of recent tokens and the exact sink tokens are attended in torch and
merged by log-sum-exp. Nothing is expanded to a full-precision cache.

    q [B, Hq, Q, D] --scores over packed keys (dequantized per row, RoPE redone per position)--
        softmax over the packed tokens (lse kept) --p . V over packed values-- (Hadamard undone once)
        --> (o [B, Hq, Q, D], lse [B, Hq, Q]) --merge with the exact window--> attention output

For one layer (`PackedKV`), B sequences of H kv heads and T packed tokens (T a multiple of G):
  key_codes    uint8 [B, H, T', D * kb / 8]  rows packed in bit planes (blockformat), T' >= T
  key_scales   fp16  [B, H, T' / G, D]       per-channel groups of G tokens (KIVI keys)
  key_mins     fp16  [B, H, T' / G, D]
  value_codes  uint8 [B, H, T', D * vb / 8]
  value_scales fp16  [B, H, T', D / Gv]      per-token groups of Gv channels (KIVI values)
  value_mins   fp16  [B, H, T', D / Gv]
  positions    int32 [B, H, T'] or None      each row's position (None: the row index), used to
                                             redo RoPE on pre-RoPE keys (MiniKV selection keeps
                                             different tokens per head)
Only the first T rows count (T' is the buffers' capacity). GQA: Hq = R * H, query head
h * R + r reads kv head h. Queries come pre-multiplied by the softmax scale.

Three interchangeable backends give the same result within float tolerance: "reference"
(dequantize, then attend: the spec, below), "cpu" (the C loop, _cpu_codec.c) and "triton"
(CUDA, triton_attention.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvpool.kernels import reference
from kvpool.kernels.transforms import RopeParams, hadamard, rope_tables, rotated
from kvpool.proto.blockformat import SUPPORTED_BITS, BlockHeader, Flag, Layout
from kvpool.proto.errors import CodecError


@dataclass(frozen=True)
class PackedKV:
    """One layer's packed keys and values (shapes in the module docstring)."""

    key_codes: Tensor
    key_scales: Tensor
    key_mins: Tensor
    value_codes: Tensor
    value_scales: Tensor
    value_mins: Tensor
    key_bits: int
    value_bits: int
    group: int  # G: tokens per key group
    value_group: int  # Gv: channels per value group
    tokens: int  # T: rows in use
    head_dim: int
    rope: RopeParams | None = None  # keys are pre-RoPE: redo it at each row's position
    hadamard_values: bool = False  # values were rotated: rotate the output back
    positions: Tensor | None = None

    def __post_init__(self) -> None:
        b, h, cap = self.key_codes.shape[:3]
        d, g, gv = self.head_dim, self.group, self.value_group
        if self.key_bits not in SUPPORTED_BITS or self.value_bits not in SUPPORTED_BITS:
            raise CodecError(f"bit widths must be in {SUPPORTED_BITS}")
        if d % 8 or g <= 0 or gv <= 0 or d % gv or cap % g or self.tokens % g:
            raise CodecError("packed KV needs head_dim % 8 == 0, Gv | D and T, T' multiples of G")
        if not 0 <= self.tokens <= cap:
            raise CodecError(f"{self.tokens} tokens in a packed buffer of {cap}")
        want: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "key_codes": ((b, h, cap, d * self.key_bits // 8), torch.uint8),
            "key_scales": ((b, h, cap // g, d), torch.float16),
            "key_mins": ((b, h, cap // g, d), torch.float16),
            "value_codes": ((b, h, cap, d * self.value_bits // 8), torch.uint8),
            "value_scales": ((b, h, cap, d // gv), torch.float16),
            "value_mins": ((b, h, cap, d // gv), torch.float16),
        }
        if self.positions is not None:
            want["positions"] = ((b, h, cap), torch.int32)
        for name, (shape, dtype) in want.items():
            x = getattr(self, name)
            if tuple(x.shape) != shape or x.dtype != dtype or x.device != self.key_codes.device:
                raise CodecError(f"{name} is {tuple(x.shape)} {x.dtype}, expected {shape} {dtype}")
            if not x.is_contiguous():
                raise CodecError(f"{name} must be contiguous")
        if self.hadamard_values and d & (d - 1):
            raise CodecError("hadamard_values needs a power-of-two head_dim")
        if self.rope is not None and self.rope.rotary_dim > d:
            raise CodecError(f"rotary_dim {self.rope.rotary_dim} exceeds head_dim {d}")

    @property
    def batch(self) -> int:
        return int(self.key_codes.shape[0])

    @property
    def heads(self) -> int:
        return int(self.key_codes.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the T rows in use (codes, group parameters, positions)."""
        b, h, t, d = self.batch, self.heads, self.tokens, self.head_dim
        codes = b * h * t * d * (self.key_bits + self.value_bits) // 8
        params = 2 * 2 * b * h * (t // self.group * d + t * (d // self.value_group))
        return codes + params + (4 * b * h * t if self.positions is not None else 0)


def block_layer(header: BlockHeader, payload: Tensor, layer: int) -> PackedKV:
    """One layer of a verified block as PackedKV (B = 1, views into `payload`, the uint8 bytes
    after the header): the sections are already in this layout. Its sink rows hold filler
    codes; the exact sinks are `block_sinks`."""
    if header.layout != Layout.KV or header.has_flag(Flag.KEY_BASIS):
        raise CodecError("attention over packed rows needs KIVI-layout keys (no key basis)")
    k, v = header.tensor_sections(0)[layer], header.tensor_sections(1)[layer]
    h, t, d = header.heads, header.tokens, header.head_dim

    def part(offset: int, n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        size = n * torch.tensor([], dtype=dtype).element_size()
        return payload[offset : offset + size].view(dtype).view(1, *shape)

    g, gv = header.group_size, header.value_group
    rope = None
    if header.has_flag(Flag.PRE_ROPE_KEYS):
        rope = RopeParams(header.rope_theta, header.rotary_dim, header.rope_scaling)
    return PackedKV(
        key_codes=part(k.codes, h * t * d * k.bits // 8, torch.uint8, (h, t, d * k.bits // 8)),
        key_scales=part(k.scales, k.n_params, torch.float16, (h, t // g, d)),
        key_mins=part(k.mins, k.n_params, torch.float16, (h, t // g, d)),
        value_codes=part(v.codes, h * t * d * v.bits // 8, torch.uint8, (h, t, d * v.bits // 8)),
        value_scales=part(v.scales, v.n_params, torch.float16, (h, t, d // gv)),
        value_mins=part(v.mins, v.n_params, torch.float16, (h, t, d // gv)),
        key_bits=k.bits, value_bits=v.bits, group=g, value_group=gv, tokens=t, head_dim=d,
        rope=rope, hadamard_values=header.has_flag(Flag.HADAMARD_VALUES),
    )  # fmt: skip


def block_sinks(header: BlockHeader, payload: Tensor) -> tuple[Tensor, Tensor]:
    """The block's exact sink tokens, keys and values fp16 [L, H, S, D] (S may be 0)."""
    shape = (header.layers, header.heads, header.sink_tokens, header.head_dim)
    n = shape[0] * shape[1] * shape[2] * shape[3]
    start = header.sinks_offset
    keys = payload[start : start + 2 * n].view(torch.float16).view(shape)
    return keys, payload[start + 2 * n : start + 4 * n].view(torch.float16).view(shape)


def rope_span(
    rope: RopeParams, top: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin float32 [S, rotary_dim] of positions 0..S-1, S >= top a power of two (at least
    1024): a growing sequence reuses a few tables."""
    span = 1024
    while span < top:
        span *= 2
    return rope_tables(rope, 0, span, device or torch.device("cpu"))


@functools.lru_cache(maxsize=16)
def rope_span_t(rope: RopeParams, span: int) -> tuple[Tensor, Tensor]:
    """`rope_span`'s CPU tables for `span` positions (a power of two), first halves transposed:
    cos, sin float32 [rotary_dim / 2, span], for the C loop's tiles of 16 positions."""
    cos, sin = rope_tables(rope, 0, span, torch.device("cpu"))
    half = rope.rotary_dim // 2
    return cos[:, :half].t().contiguous(), sin[:, :half].t().contiguous()


def rope_at(rope: RopeParams, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin float32 [..., rotary_dim] at integer `positions` [...]."""
    top = int(positions.max()) + 1 if positions.numel() else 1
    cos, sin = rope_span(rope, top, positions.device)
    return cos[positions.long()], sin[positions.long()]


def row_positions(kv: PackedKV) -> Tensor:
    """Each used row's position, int32 [B, H, T]."""
    if kv.positions is not None:
        return kv.positions[:, :, : kv.tokens]
    rows = torch.arange(kv.tokens, dtype=torch.int32, device=kv.key_codes.device)
    return rows.expand(kv.batch, kv.heads, kv.tokens)


def dequantize(kv: PackedKV) -> tuple[Tensor, Tensor]:
    """The packed rows as the model would hold them: keys (RoPE redone) and values (Hadamard
    undone), float32 [B, H, T, D]. The spec the fused paths are held to."""
    t, d, g, gv = kv.tokens, kv.head_dim, kv.group, kv.value_group
    codes = reference.unpack(kv.key_codes[:, :, :t], kv.key_bits, d).float()
    scale = kv.key_scales[:, :, : t // g].float().repeat_interleave(g, dim=2)
    keys = codes * scale + kv.key_mins[:, :, : t // g].float().repeat_interleave(g, dim=2)
    if kv.rope is not None:
        turned = rotated(keys, *rope_at(kv.rope, row_positions(kv)), 1.0)
        keys = torch.cat((turned, keys[..., kv.rope.rotary_dim :]), dim=-1)
    codes = reference.unpack(kv.value_codes[:, :, :t], kv.value_bits, d).float()
    scale = kv.value_scales[:, :, :t].float().repeat_interleave(gv, dim=3)
    values = codes * scale + kv.value_mins[:, :, :t].float().repeat_interleave(gv, dim=3)
    if kv.hadamard_values:
        values = hadamard(values)
    return keys, values


def check_query(q: Tensor, kv: PackedKV) -> int:
    """R, the query heads per kv head, after checking q [B, Hq, Q, D] against kv."""
    if q.dim() != 4 or q.shape[0] != kv.batch or q.shape[-1] != kv.head_dim:
        raise CodecError(f"q is {tuple(q.shape)}, expected [{kv.batch}, Hq, Q, {kv.head_dim}]")
    if q.shape[1] % kv.heads or q.device != kv.key_codes.device:
        raise CodecError(f"q's {q.shape[1]} heads are not a multiple of {kv.heads} kv heads")
    return int(q.shape[1]) // kv.heads


def attention_reference(q: Tensor, kv: PackedKV, skip: int = 0) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, Q, D] (pre-scaled) over the packed rows skip..T-1: its output
    o [B, Hq, Q, D] and log-sum-exp lse [B, Hq, Q], float32 (lse -inf, o 0 if no row counts)."""
    r = check_query(q, kv)
    keys, values = dequantize(kv)
    keys, values = keys[:, :, skip:], values[:, :, skip:]
    scores = q.float() @ keys.repeat_interleave(r, dim=1).transpose(-1, -2)
    return _softmax_output(scores, values.repeat_interleave(r, dim=1))


def _softmax_output(scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min).unsqueeze(-1))
    return p @ values, lse


def exact_attention(
    q: Tensor, keys: Tensor, values: Tensor, causal: int = 0
) -> tuple[Tensor, Tensor]:
    """(o, lse) of q [B, Hq, Q, D] (pre-scaled) over exact keys/values [B, H, N, D]; causal > 0:
    the last `causal` rows are the queries' own tokens, each sees those up to itself. The R
    query heads of a kv head are one [R * Q, D] matrix against its keys: nothing repeated."""
    b, hq, nq, d = q.shape
    h, n = keys.shape[1], keys.shape[2]
    qf = q.float().reshape(b, h, hq // h * nq, d)
    scores = qf @ keys.float().transpose(-1, -2)  # [B, H, R * Q, N]
    if causal:
        rows = (torch.arange(hq // h * nq, device=q.device) % nq + (n - nq))[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    o, lse = _softmax_output(scores, values.float())
    return o.view(b, hq, nq, d), lse.view(b, hq, nq)


def merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Attention over the union of disjoint sets of rows from each set's (o, lse)."""
    lse = torch.stack([p[1] for p in parts])  # [n, B, Hq, Q]
    weights = torch.softmax(lse, dim=0).nan_to_num(0.0)
    return sum((w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts, strict=True)),
               torch.zeros_like(parts[0][0]))  # fmt: skip


def packed_attention(
    q: Tensor, kv: PackedKV, skip: int = 0, exact: Sequence[tuple[Tensor, Tensor, int]] = (),
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(o, lse) of q [B, Hq, Q, D] (pre-scaled, any float dtype) over packed rows skip..T-1 and
    the exact segments (keys, values [B, H, n, D], causal: `exact_attention`), on the fastest
    backend for q's device: Triton on CUDA, the C loop on the CPU (one call for all of it)."""
    check_query(q, kv)
    if not 0 <= skip <= kv.tokens:
        raise CodecError(f"skip {skip} outside 0..{kv.tokens}")
    for keys, values, causal in exact:
        if (
            keys.shape != values.shape
            or keys.shape[:2] != (kv.batch, kv.heads)
            or not 0 <= causal <= min(q.shape[2], keys.shape[2])
        ):
            raise CodecError(f"an exact segment of {tuple(keys.shape)} does not fit this layer")
    if backend in ("auto", "cpu") and q.device.type == "cpu" and kv.head_dim % 16 == 0:
        from kvpool.kernels import cpu

        return cpu.packed_attention(q, kv, skip, exact)
    if backend == "reference":
        part = attention_reference(q, kv, skip)
    elif backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
        from kvpool.kernels import triton_attention

        part = triton_attention.packed_attention(q, kv, skip)
    else:
        raise CodecError(f"backend {backend!r} cannot run on device {q.device}")
    if not exact:
        return part
    parts = [part, *(exact_attention(q, k, v, c) for k, v, c in exact)]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    return merge(parts), lse


def window_scores_reference(q: Tensor, keys: Tensor) -> Tensor:
    """MiniKV/SnapKV's selection score: the attention each key receives from the last W queries
    of the prompt, summed over those queries and over the query heads of its kv head.

    q [B, Hq, W, D] (pre-scaled; the prompt's last W tokens) and keys [B, H, N, D] (exact, the
    whole prompt, N >= W; query i sits at position N - W + i and sees keys up to it, causal)
    -> scores float32 [B, H, N]."""
    r = q.shape[1] // keys.shape[1]
    scores = q.float() @ keys.float().repeat_interleave(r, dim=1).transpose(-1, -2)
    n, w = keys.shape[2], q.shape[2]
    rows = torch.arange(w, device=q.device)[:, None] + (n - w)
    scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # [B, Hq, W, N]
    return p.sum(dim=2).view(q.shape[0], keys.shape[1], r, n).sum(dim=2)


def window_scores(q: Tensor, keys: Tensor, block: int = 1024) -> Tensor:
    """`window_scores_reference` without the [W, N] matrix of every head at once: two passes
    over key blocks (the log-sum-exp of each query row, then each key's share), as a
    flash-attention loop would; Triton on CUDA, blockwise torch elsewhere."""
    if (
        q.dim() != 4
        or keys.dim() != 4
        or q.shape[-1] != keys.shape[-1]
        or q.shape[1] % keys.shape[1]
    ):
        raise CodecError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} do not match")
    if q.shape[2] > keys.shape[2]:
        raise CodecError("the query window is longer than the prompt")
    if q.device.type == "cuda":
        from kvpool.kernels import triton_attention

        return triton_attention.window_scores(q, keys)
    b, hq, w, _ = q.shape
    h, n = keys.shape[1], keys.shape[2]
    r = hq // h
    qf = q.float().reshape(b, h, r * w, -1)
    pos = (torch.arange(w, device=q.device) + (n - w)).repeat(r)  # [R * W]: each row's position
    lse = torch.full((b, h, r * w), float("-inf"), device=q.device)
    for lo in range(0, n, block):  # pass 1: log-sum-exp of each query row
        s = _window_block(qf, keys, pos, lo, block)
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    out = torch.empty(b, h, n, device=q.device)
    for lo in range(0, n, block):  # pass 2: what each key receives
        s = _window_block(qf, keys, pos, lo, block)
        out[:, :, lo : lo + block] = torch.exp(s - lse.unsqueeze(-1)).sum(dim=2)
    return out


def _window_block(qf: Tensor, keys: Tensor, pos: Tensor, lo: int, block: int) -> Tensor:
    k = keys[:, :, lo : lo + block].float()
    s = qf @ k.transpose(-1, -2)  # [B, H, R * W, block]
    cols = torch.arange(lo, lo + k.shape[2], device=qf.device)
    return s.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
