"""The torch reference: the spec of quantization and packing."""

import pytest
import torch

from kvpool.kernels import reference
from tests.kernels.helpers import error_bound

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("is_key", [True, False])
def test_round_trip_within_half_a_step(bits: int, group: int, is_key: bool) -> None:
    x = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(bits + group)) * 3
    codes, scale, lo = reference.quantize(x, is_key, group, bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    x_hat = reference.dequantize(codes, scale, lo, is_key, group, torch.float32)
    err = (x - x_hat).abs()
    assert bool((err <= error_bound(x, is_key, group, bits)).all()), float(err.max())
    # and the bound is tight enough to mean something: 2-bit error is visible
    assert float(err.max()) > 0 or bits == 8


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("is_key", [True, False])
def test_constant_groups_give_no_nan(bits: int, is_key: bool) -> None:
    x = torch.full((1, 64, 64), 3.25)
    x[0, 32:] = -7.0
    codes, scale, lo = reference.quantize(x, is_key, 32, bits)
    assert bool((scale > 0).all())
    x_hat = reference.dequantize(codes, scale, lo, is_key, 32, torch.float32)
    assert bool(torch.isfinite(x_hat).all())
    assert torch.equal(x_hat, x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [8, 64, 128, 512])
def test_pack_unpack_inverse_and_dense(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 5, n), dtype=torch.uint8)
    packed = reference.pack(codes, bits)
    assert packed.shape == (3, 5, n * bits // 8)
    assert torch.equal(reference.unpack(packed, bits, n), codes)


def test_packing_is_planar_and_byte_addressed() -> None:
    # 2 bits, a row of 8: byte j holds codes j and j + 2, j + 4, j + 6 at shifts 0, 2, 4, 6
    codes = torch.tensor([[1, 2, 3, 0, 2, 1, 0, 3]], dtype=torch.uint8)
    packed = reference.pack(codes, 2)
    assert packed.tolist() == [[1 | 3 << 2 | 2 << 4 | 0 << 6, 2 | 0 << 2 | 1 << 4 | 3 << 6]]
    # 3 bits: a 2-bit plane (n/4 bytes) then a 1-bit plane of the high bits (n/8 bytes)
    codes3 = torch.tensor([[7, 0, 4, 3, 5, 6, 1, 2]], dtype=torch.uint8)
    p3 = reference.pack(codes3, 3)
    assert p3.shape == (1, 3)
    assert p3[0, 2].item() == sum(((c >> 2) & 1) << i for i, c in enumerate(codes3[0].tolist()))


# ---- symmetric groups (SYMMETRIC_VALUES): one fp16 scale, no minimum ---------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_symmetric_groups_round_trip_within_half_a_step(bits: int, group: int) -> None:
    """Every value within half a step s of its level (c - h) s, h = (2^b - 1) / 2, the levels
    symmetric about zero; s = max|x| / h, so a group's largest magnitude is a level (up to
    the scale's fp16 rounding); the offsets are -h s exactly, nothing else to store."""
    x = torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(bits * group)) * 3 + 0.7
    codes, scale, offset = reference.quantize(x, False, group, bits, symmetric=True)
    half = (2**bits - 1) / 2
    assert scale.dtype == torch.float16 and offset.dtype == torch.float32
    assert torch.equal(offset, scale.float() * -half)
    x_hat = reference.dequantize(codes, scale, offset, False, group, torch.float32)
    s = scale.float().repeat_interleave(group, dim=2)
    levels = x_hat / s + half  # the codes again, exactly: the levels are symmetric about 0
    assert torch.equal(levels, codes.float())
    err = (x - x_hat).abs()
    assert bool((err <= 0.5 * s + half * s * 2**-10 + 1e-6).all()), float(err.max())
    amax = x.view(2, 64, -1, group).abs().amax(3)
    torch.testing.assert_close(scale.float() * half, amax, rtol=2**-10, atol=0)
    assert float(err.max()) > 0 or bits == 8


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_groups_of_zeros_or_one_sign_give_no_nan(bits: int) -> None:
    x = torch.zeros(1, 4, 64)
    x[0, 1] = 2.5  # one sign only: codes in the upper half
    x[0, 2, :32] = -1.0
    codes, scale, offset = reference.quantize(x, False, 32, bits, symmetric=True)
    assert bool((scale > 0).all())
    x_hat = reference.dequantize(codes, scale, offset, False, 32, torch.float32)
    assert bool(torch.isfinite(x_hat).all())
    # a constant group is its top (or bottom) level: exact up to the scale's fp16 rounding
    torch.testing.assert_close(x_hat[0, 1], x[0, 1], rtol=2**-10, atol=0)
    torch.testing.assert_close(x_hat[0, 2, :32], x[0, 2, :32], rtol=2**-10, atol=0)
    assert float(x_hat[0, 0].abs().max()) <= 2**-24 * 2**bits  # zeros: within a tiny step


def test_symmetric_groups_are_per_token_only() -> None:
    with pytest.raises(AssertionError):
        reference.quantize(torch.randn(1, 64, 64), True, 32, 2, symmetric=True)
