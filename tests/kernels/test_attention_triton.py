"""The Triton attention kernels against their torch spec: packed_attention against
attention_reference (every key/value bit width, RoPE redone at row indices or at given
positions, Hadamard values, GQA, several queries, skipped rows, token splits), window_scores
against window_scores_reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small shapes;
with one they run on CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from kvpool.kernels import attention, reference, triton_attention
from kvpool.kernels.attention import attention_reference, window_scores_reference
from kvpool.kernels.packed_kv import PackedKV
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.errors import CodecError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(atol=1e-4, rtol=1e-4)


def packed(
    *,
    batch: int = 2,
    heads: int = 2,
    tokens: int = 64,
    capacity: int = 80,
    dim: int = 32,
    group: int = 16,
    value_group: int = 16,
    key_bits: int = 2,
    value_bits: int = 2,
    rope: RopeParams | None = None,
    hadamard: bool = False,
    positions: int | None = None,
    seed: int = 0,
) -> PackedKV:
    """Random keys/values encoded by the reference quantizer, one [H, T', D] section per
    sequence; rows past `tokens` hold real codes too (they must not count). positions: None
    for row indices, else each head's rows at a random draw of distinct positions below it."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, capacity, dim, generator=g) * 2 + 0.5
    values = torch.randn(batch, heads, capacity, dim, generator=g)
    parts: dict[str, list[Tensor]] = {n: [] for n in ("kc", "ks", "km", "vc", "vs", "vm")}
    for b in range(batch):
        codes, scale, lo = reference.quantize(keys[b], True, group, key_bits)
        parts["kc"].append(reference.pack(codes, key_bits))
        parts["ks"].append(scale)
        parts["km"].append(lo)
        codes, scale, lo = reference.quantize(values[b], False, value_group, value_bits)
        parts["vc"].append(reference.pack(codes, value_bits))
        parts["vs"].append(scale)
        parts["vm"].append(lo)
    t = {n: torch.stack(x).contiguous().to(DEVICE) for n, x in parts.items()}
    pos = None
    if positions is not None:
        draws = [torch.randperm(positions, generator=g)[:capacity] for _ in range(batch * heads)]
        pos = torch.stack(draws).view(batch, heads, capacity).int().to(DEVICE)
    return PackedKV(
        t["kc"], t["ks"], t["km"], t["vc"], t["vs"], t["vm"], key_bits, value_bits, group,
        value_group, tokens, dim, rope, hadamard, pos,
    )  # fmt: skip


def queries(kv: PackedKV, r: int, q: int, seed: int = 1, dtype=torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(kv.batch, kv.heads * r, q, kv.head_dim, generator=g) / kv.head_dim**0.5
    return x.to(dtype).to(DEVICE)


def check(q: Tensor, kv: PackedKV, skip: int, **kw) -> tuple[Tensor, Tensor]:
    o, lse = triton_attention.packed_attention(q, kv, skip, **kw)
    want_o, want_lse = attention_reference(q, kv, skip)
    assert o.dtype == lse.dtype == torch.float32
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(lse.cpu(), want_lse.cpu(), **TOL)
    torch.testing.assert_close(o.cpu(), want_o.cpu(), **TOL)
    return o, lse


ROPE = RopeParams(10000.0, 32)
BITS = [(2, 3), (3, 2), (4, 8), (8, 4)]  # every width, for keys and for values
ROPES = ["none", "rows", "positions"]
SHAPES = [(3, 1, 21), (1, 2, 16), (3, 2, 5)]  # (R, Q, skip); R = Q = 1, skip 0: below


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rope", ROPES)
@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_attention_matches_reference(
    bits: tuple[int, int], rope: str, hadamard: bool, shape: tuple[int, int, int]
) -> None:
    kb, vb = bits
    r, nq, skip = shape
    kv = packed(
        key_bits=kb, value_bits=vb, rope=None if rope == "none" else ROPE, hadamard=hadamard,
        positions=300 if rope == "positions" else None, seed=kb * 10 + vb,
    )  # fmt: skip
    q = queries(kv, r, nq)
    check(q, kv, skip, splits=3)  # 4 tiles of 16 rows: 2 splits of 2 tiles each


@pytest.mark.parametrize("dot", triton_attention.DOTS)
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_product_modes_and_splits_agree(dot: str, splits: int | None) -> None:
    kv = packed(key_bits=3, value_bits=4, rope=RopeParams(500000.0, 16, 2.0), hadamard=True,
                positions=1000)  # fmt: skip
    check(queries(kv, 3, 2), kv, 7, splits=splits, dot=dot)


def test_many_query_rows_use_tl_dot() -> None:
    kv = packed(dim=64, value_group=64, key_bits=4, value_bits=2, rope=RopeParams(1e4, 64))
    check(queries(kv, 3, 16), kv, 3)  # 48 rows per kv head: the "ieee" default


@pytest.mark.parametrize("group", [8, 48])
def test_key_groups_that_are_not_a_tile(group: int) -> None:
    # G = 8: tiles of 16 rows span two groups (parameters gathered per row); G = 48: tiles of 16
    kv = packed(tokens=48, capacity=96, group=group, value_group=8, rope=ROPE, positions=200)
    for skip in (0, 9, 47):
        check(queries(kv, 1, 2), kv, skip, splits=2)


def test_far_positions_keep_their_angles() -> None:
    # angles up to ~2.6e6 rad, where fp32 products alone would be off by ~0.1 rad; the expected
    # keys are rotated here in float64 (the reference's tables would span 2^22 positions)
    rope = RopeParams(500000.0, 64, 2.0)
    kv = packed(dim=64, value_group=32, key_bits=4, value_bits=4, rope=rope, positions=80)
    assert kv.positions is not None
    far = kv.positions * 65_537 + 7  # distinct, up to ~5.2e6
    kv = dataclasses.replace(kv, positions=far.int().contiguous())
    q = queries(kv, 1, 1)
    keys, values = attention.dequantize(dataclasses.replace(kv, rope=None, positions=None))
    inv = 1.0 / rope.theta ** (torch.arange(32, dtype=torch.float64) / 32)
    angle = far[:, :, :64, None].cpu().double() / rope.scaling * inv.repeat(2)
    k = keys.cpu().double()
    half = torch.cat((-k[..., 32:], k[..., :32]), dim=-1)
    k = (k * angle.cos() + half * angle.sin()).float()
    scores = q.cpu() @ k.transpose(-1, -2)
    want = torch.softmax(scores, dim=-1) @ values.cpu()
    o, lse = triton_attention.packed_attention(q, kv, 0)
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(scores, dim=-1), **TOL)
    torch.testing.assert_close(o.cpu(), want, **TOL)


def test_no_rows_count() -> None:
    kv = packed()
    q = queries(kv, 3, 2)
    for skip, tokens in ((64, 64), (0, 0)):
        kv = dataclasses.replace(kv, tokens=tokens)
        o, lse = triton_attention.packed_attention(q, kv, skip)
        assert bool((lse == float("-inf")).all()) and bool((o == 0).all())


def test_query_dtypes_and_strides() -> None:
    kv = packed(rope=ROPE, hadamard=True)
    for dtype in (torch.float16, torch.bfloat16):
        check(queries(kv, 3, 2, dtype=dtype), kv, 1)
    q = queries(kv, 2, 3).transpose(2, 3).contiguous().transpose(2, 3)  # channels strided
    assert not q.is_contiguous()
    check(q, kv, 0)


def test_dispatch_and_merge_with_the_rest() -> None:
    # the two halves of the rows merged by log-sum-exp give attention over all of them
    kv = packed(rope=ROPE, positions=300)
    q = queries(kv, 3, 1)
    whole = attention.packed_attention(q, kv, 0, backend="triton")
    head = attention_reference(q, dataclasses.replace(kv, tokens=32), 0)
    tail = attention.packed_attention(q, kv, 32, backend="triton")
    torch.testing.assert_close(attention.merge([head, tail]).cpu(), whole[0].cpu(), **TOL)


def test_rejects_bad_input() -> None:
    kv = packed()
    q = queries(kv, 1, 1)
    with pytest.raises(CodecError, match="skip"):
        triton_attention.packed_attention(q, kv, 65)
    with pytest.raises(CodecError, match="dot"):
        triton_attention.packed_attention(q, kv, 0, dot="bf16")
    with pytest.raises(CodecError, match="float"):
        triton_attention.packed_attention(q.int(), kv, 0)
    with pytest.raises(CodecError, match="q is"):
        triton_attention.packed_attention(q[:, :, :, :16], kv, 0)
    odd = packed(dim=24, group=16, value_group=8)
    with pytest.raises(CodecError, match="power-of-two"):
        triton_attention.packed_attention(queries(odd, 1, 1), odd, 0)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1, 1), (2, 2, 3, 40, 100), (1, 2, 1, 64, 64), (2, 1, 4, 17, 130)],
)  # (B, H, R, W, N)
def test_window_scores_match_reference(shape: tuple[int, int, int, int, int]) -> None:
    b, h, r, w, n = shape
    g = torch.Generator().manual_seed(w + n)
    q = (torch.randn(b, h * r, w, 32, generator=g) / 2).to(DEVICE)
    keys = (torch.randn(b, h, n, 32, generator=g) * 2).to(DEVICE)
    got = triton_attention.window_scores(q, keys)
    torch.testing.assert_close(got.cpu(), window_scores_reference(q, keys).cpu(), **TOL)
    # each query's probabilities sum to one: a kv head's scores sum to R * W
    torch.testing.assert_close(got.sum(-1).cpu(), torch.full((b, h), float(r * w)), **TOL)


def test_window_scores_half_inputs_and_strides() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 8, 64, generator=g).half().to(DEVICE)
    keys = torch.randn(2, 80, 2, 64, generator=g).half().to(DEVICE).transpose(1, 2)  # strided
    got = triton_attention.window_scores(q, keys)
    torch.testing.assert_close(got.cpu(), window_scores_reference(q, keys).cpu(), **TOL)


def test_window_scores_rejects_bad_input() -> None:
    q, keys = torch.randn(1, 3, 4, 32), torch.randn(1, 2, 8, 32)
    with pytest.raises(CodecError, match="do not match"):
        triton_attention.window_scores(q.to(DEVICE), keys.to(DEVICE))
    with pytest.raises(CodecError, match="longer"):
        triton_attention.window_scores(keys.to(DEVICE), q[:, :2].to(DEVICE))
    with pytest.raises(CodecError, match="dot"):
        triton_attention.window_scores(q[:, :2].to(DEVICE), keys.to(DEVICE), dot="fma")
