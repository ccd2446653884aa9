"""The packed layout attention reads: one layer's KV exactly as the codec wrote it into blocks.

Where it stands: a leaf of kernels/ that the attention spec (attention.py) and its backends
(cpu_attention.py, triton_attention.py) all import, and that imports none of them; kvpool.packed
(client/packed.py) builds its buffers in it, and `block_layer` views a verified block as it.

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

Keys in a key basis (codec v2, KEY_BASIS without PREDICTED; `key_runs` then names the runs and
key_bits is 0): a row holds the n stored components, run after run (run r: ch_r components at
b_r bits, planar within its own ch_r * b_r / 8 bytes), and the key is mean + rows^T c:
  key_codes    uint8 [B, H, T', sum of ch_r * b_r / 8]
  key_scales   fp16  [B, H, T' / G, n]       per-component groups of G tokens
  key_mins     fp16  [B, H, T' / G, n]
  key_basis    (mean fp32 [H, D], rows fp32 [H, n, D]): the layer's basis, row j the column of
               the j-th stored component
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kvpool.kernels.basis import KeyBasis
from kvpool.kernels.transforms import RopeParams, rope_tables
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
    key_runs: tuple[tuple[int, int], ...] = ()  # keys in a basis: (components, bits) per run
    key_basis: tuple[Tensor, Tensor] | None = None  # keys in a basis: (mean, rows)

    def __post_init__(self) -> None:
        b, h, cap = self.key_codes.shape[:3]
        d, g, gv = self.head_dim, self.group, self.value_group
        if self.key_runs or self.key_basis is not None:
            self._check_basis()
        elif self.key_bits not in SUPPORTED_BITS:
            raise CodecError(f"bit widths must be in {SUPPORTED_BITS}")
        if self.value_bits not in SUPPORTED_BITS:
            raise CodecError(f"bit widths must be in {SUPPORTED_BITS}")
        if d % 8 or g <= 0 or gv <= 0 or d % gv or cap % g or self.tokens % g:
            raise CodecError("packed KV needs head_dim % 8 == 0, Gv | D and T, T' multiples of G")
        if not 0 <= self.tokens <= cap:
            raise CodecError(f"{self.tokens} tokens in a packed buffer of {cap}")
        kd, row = d, d * self.key_bits // 8  # key channels, bytes of a key row
        if self.key_runs:
            kd, row = self.components, sum(ch * bits // 8 for ch, bits in self.key_runs)
        want: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            "key_codes": ((b, h, cap, row), torch.uint8),
            "key_scales": ((b, h, cap // g, kd), torch.float16),
            "key_mins": ((b, h, cap // g, kd), torch.float16),
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

    def _check_basis(self) -> None:
        if not self.key_runs or self.key_basis is None or self.key_bits != 0:
            raise CodecError("keys in a basis have key_runs, key_basis and key_bits 0")
        if any(ch <= 0 or ch % 8 or bits not in SUPPORTED_BITS for ch, bits in self.key_runs):
            raise CodecError(f"a key run is 8k components of {SUPPORTED_BITS} bits")
        h, n, d = self.key_codes.shape[1], self.components, self.head_dim
        mean, rows = self.key_basis
        for x, shape in ((mean, (h, d)), (rows, (h, n, d))):
            if tuple(x.shape) != shape or x.dtype != torch.float32 or not x.is_contiguous():
                raise CodecError(f"the key basis is {tuple(x.shape)} {x.dtype}, expected {shape}"
                                 " float32, contiguous")  # fmt: skip
            if x.device != self.key_codes.device:
                raise CodecError("the key basis lives with the codes")

    @property
    def components(self) -> int:
        """n: key components stored per row (keys in a basis), else 0."""
        return sum(ch for ch, _ in self.key_runs)

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
        codes = b * h * t * (self.key_codes.shape[3] + self.value_codes.shape[3])
        params = 2 * 2 * b * h * (t // self.group * self.key_scales.shape[3]
                                  + t * (d // self.value_group))  # fmt: skip
        return codes + params + (4 * b * h * t if self.positions is not None else 0)


# the block options packed rows are attended under (any other: decode the block)
_ATTENDED = Flag.PRE_ROPE_KEYS | Flag.HADAMARD_VALUES | Flag.MAC | Flag.KEY_BASIS


def block_layer(
    header: BlockHeader, payload: Tensor, layer: int, key_basis: KeyBasis | None = None
) -> PackedKV:
    """One layer of a verified block as PackedKV (B = 1, views into `payload`, the uint8 bytes
    after the header; for keys in a basis, the runs' codes and parameters side by side, copied).
    Its sink rows hold filler codes; the exact sinks are `block_sinks`. key_basis: the block's
    (KEY_BASIS). PREDICTED blocks are refused: their layers are residuals of a prediction from
    the layer before as rebuilt, so they are decoded (kernels/attention.py says why)."""
    if header.layout != Layout.KV:
        raise CodecError("attention over packed rows needs the KV layout")
    if header.has_flag(Flag.PREDICTED):
        raise CodecError("a predicted block (codec v2 with maps) is decoded, not attended packed")
    if header.flags & ~_ATTENDED:
        raise CodecError(f"packed attention does not read block options {header.flags:#x}")
    h, t, d = header.heads, header.tokens, header.head_dim
    v = header.tensor_sections(1)[layer]
    keys = [s for s in header.tensor_sections(0) if s.layer == layer]
    runs: tuple[tuple[int, int], ...] = ()
    basis = None
    if header.has_flag(Flag.KEY_BASIS):
        if key_basis is None:
            raise CodecError("this block's keys are in a key basis: pass the namespace's")
        key_basis.check(header)
        if not keys:
            raise CodecError(f"layer {layer} stores no key components")
        runs = tuple((s.channels, s.bits) for s in keys)
        mean, rows = basis_rows(key_basis, layer, tuple((s.first, s.channels) for s in keys))
        basis = mean.to(payload.device), rows.to(payload.device)
    k = keys[0]

    def part(offset: int, n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
        size = n * torch.tensor([], dtype=dtype).element_size()
        return payload[offset : offset + size].view(dtype).view(1, *shape)

    g, gv = header.group_size, header.value_group
    rope = None
    if header.has_flag(Flag.PRE_ROPE_KEYS):
        rope = RopeParams(header.rope_theta, header.rotary_dim, header.rope_scaling)

    def key_part(name: str, per_row: bool) -> Tensor:  # the key sections side by side
        pieces = []
        for s in keys:
            if per_row:
                n = h * t * s.channels * s.bits // 8
                pieces.append(part(s.codes, n, torch.uint8, (h, t, s.channels * s.bits // 8)))
            else:
                pieces.append(part(getattr(s, name), s.n_params, torch.float16,
                                   (h, t // g, s.channels)))  # fmt: skip
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    return PackedKV(
        key_codes=key_part("codes", True),
        key_scales=key_part("scales", False),
        key_mins=key_part("mins", False),
        value_codes=part(v.codes, h * t * d * v.bits // 8, torch.uint8, (h, t, d * v.bits // 8)),
        value_scales=part(v.scales, v.n_params, torch.float16, (h, t, d // gv)),
        value_mins=part(v.mins, v.n_params, torch.float16, (h, t, d // gv)),
        key_bits=0 if runs else k.bits, value_bits=v.bits, group=g, value_group=gv, tokens=t,
        head_dim=d, rope=rope, hadamard_values=header.has_flag(Flag.HADAMARD_VALUES),
        key_runs=runs, key_basis=basis,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def basis_rows(
    key_basis: KeyBasis, layer: int, runs: tuple[tuple[int, int], ...]
) -> tuple[Tensor, Tensor]:
    """The layer's (mean [H, D], rows [H, n, D]) of `PackedKV.key_basis` for components stored in
    runs of (first, count): row j the basis column of the j-th stored component (CPU)."""
    mean, rotation = key_basis.mean[layer], key_basis.rotation[layer]  # [H, D], [H, D, D]
    picked = torch.cat([torch.arange(first, first + n) for first, n in runs])
    return mean.contiguous(), rotation[:, :, picked].transpose(1, 2).contiguous()


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


def check_query(q: Tensor, kv: PackedKV) -> int:
    """R, the query heads per kv head, after checking q [B, Hq, Q, D] against kv."""
    if q.dim() != 4 or q.shape[0] != kv.batch or q.shape[-1] != kv.head_dim:
        raise CodecError(f"q is {tuple(q.shape)}, expected [{kv.batch}, Hq, Q, {kv.head_dim}]")
    if q.shape[1] % kv.heads or q.device != kv.key_codes.device:
        raise CodecError(f"q's {q.shape[1]} heads are not a multiple of {kv.heads} kv heads")
    return int(q.shape[1]) // kv.heads
