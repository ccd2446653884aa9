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
