"""The fast paths against the spec: the C loop (CPU) and the Triton kernels must write the same
bytes as the torch reference, and decode to the same tensors (up to output rounding).

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), on small
shapes; with one they run on CUDA.
"""

import pytest
import torch

from kvpool.kernels.codec import CodecConfig, decode, encode, encode_latent
from kvpool.kernels.transforms import RopeParams
from tests.kernels.helpers import kv

CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
BITS = [2, 3, 4, 8]
GROUPS = [32, 64]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # decoders may round the fp32 result to bf16/fp16 differently by one ulp
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cpu_loop_matches_reference(dtype: torch.dtype, bits: int, group: int) -> None:
    k, v = kv(tokens=128, dim=128, dtype=dtype, seed=bits)
    cfg = CodecConfig(bits, bits, group)
    ref = encode(k, v, cfg, backend="reference")
    assert encode(k, v, cfg, backend="cpu") == ref
    a, b = decode(ref, backend="reference"), decode(ref, backend="cpu")
    assert (
        a.keys is not None and b.keys is not None and a.values is not None and b.values is not None
    )
    _close(a.keys, b.keys)
    _close(a.values, b.values)
    f32 = decode(ref, dtype=torch.float32, backend="cpu")
    assert f32.keys is not None and torch.equal(
        f32.keys, decode(ref, dtype=torch.float32, backend="reference").keys
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_triton_codes_equal_reference_bit_for_bit(
    dtype: torch.dtype, bits: int, group: int
) -> None:
    k, v = kv(tokens=64, dim=64, dtype=dtype, seed=bits)
    cfg = CodecConfig(bits, bits, group)
    ref = encode(k, v, cfg, backend="reference")
    got = encode(k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), cfg, backend="triton")
    assert got == ref
    a = decode(ref, backend="reference")
    b = decode(ref, device=TRITON_DEVICE, backend="triton")
    assert (
        a.keys is not None and b.keys is not None and a.values is not None and b.values is not None
    )
    _close(a.keys, b.keys)
    _close(a.values, b.values)


def test_triton_mixed_bits_profile_and_latent() -> None:
    k, v = kv(layers=4, tokens=64, dim=64, seed=7)
    cfg = CodecConfig(key_bits=(2, 4, 8, 3), value_bits=(4, 2, 2, 8), group_size=32)
    ref = encode(k, v, cfg, backend="reference")
    assert encode(k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), cfg, backend="triton") == ref
    latent = torch.randn(3, 64, 128)
    lcfg = CodecConfig(key_bits=(2, 3, 4), group_size=64)
    lref = encode_latent(latent, lcfg, backend="reference")
    assert encode_latent(latent.to(TRITON_DEVICE), lcfg, backend="triton") == lref
    assert encode_latent(latent, lcfg, backend="cpu") == lref
    out = decode(lref, device=TRITON_DEVICE, backend="triton").latent
    assert out is not None
    _close(out, decode(lref, backend="reference").latent)  # type: ignore[arg-type]


def test_triton_rejects_non_finite_input() -> None:
    from kvpool.proto.errors import NonFiniteError

    k, v = kv(tokens=64, dim=64)
    v[1, 0, 5, 3] = float("nan")
    with pytest.raises(NonFiniteError):
        encode(
            k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), CodecConfig(group_size=32), backend="triton"
        )


def test_forcing_triton_where_it_cannot_run_raises() -> None:
    from kvpool.proto.errors import CodecError

    k, v = kv(tokens=64, dim=24)  # not a power of two
    with pytest.raises(CodecError):
        encode(
            k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), CodecConfig(group_size=32), backend="triton"
        )
    # auto falls back to a path that can run
    assert decode(encode(k, v, CodecConfig(group_size=32))).keys is not None


def test_triton_decodes_into_a_slice_of_a_longer_cache() -> None:
    """The kernels write through out's strides: a block decoded into cache[:, :, a:b]."""
    k, v = kv(tokens=64, dim=64, seed=5)
    ref = encode(k, v, CodecConfig(2, 2, 32), start_position=64, backend="reference")
    cache = [torch.zeros(*k.shape[:2], 192, 64, device=TRITON_DEVICE) for _ in range(2)]
    got = decode(ref, out=tuple(c[:, :, 64:128] for c in cache), backend="triton")
    want = decode(ref, dtype=torch.float32, backend="reference")
    assert got.keys is not None and want.keys is not None and want.values is not None
    _close(cache[0][:, :, 64:128].cpu(), want.keys)
    _close(cache[1][:, :, 64:128].cpu(), want.values)
    assert not any(bool(c[:, :, :64].any() or c[:, :, 128:].any()) for c in cache)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_c_loop_fuses_the_transforms_within_rounding(dtype: torch.dtype) -> None:
    """The C loop undoes the Hadamard rotation and redoes RoPE row by row as it decodes (a fast
    Walsh-Hadamard transform, tabled angles); torch does both after the reference decode."""
    k, v = kv(layers=3, tokens=128, dim=128, dtype=dtype, seed=9)
    for start in (0, 128 * 5):
        cfg = CodecConfig(3, 2, 64, rope=RopeParams(500000.0, 96), hadamard_values=True,
                          sink_tokens=2)  # fmt: skip
        blob = encode(k, v, cfg, start_position=start, backend="reference")
        for out_dtype in (dtype, torch.float32):
            a = decode(blob, dtype=out_dtype, backend="reference")
            b = decode(blob, dtype=out_dtype, backend="cpu")
            assert a.keys is not None and b.keys is not None
            assert a.values is not None and b.values is not None
            _close(a.keys, b.keys)
            _close(a.values, b.values)


# ---- symmetric value groups (SYMMETRIC_VALUES) ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_symmetric_values_same_bytes_on_the_c_loop(
    dtype: torch.dtype, bits: int, group: int
) -> None:
    """Symmetric value groups: the C loop writes the reference's bytes and decodes them to the
    same tensors (float32 exactly), with and without the fused Hadamard rotation."""
    k, v = kv(tokens=128, dim=128, dtype=dtype, seed=bits + 1)
    for rotate in (False, True):
        cfg = CodecConfig(2, bits, group, hadamard_values=rotate, symmetric_values=True)
        ref = encode(k, v, cfg, backend="reference")
        assert encode(k, v, cfg, backend="cpu") == ref
        a, b = decode(ref, backend="reference"), decode(ref, backend="cpu")
        assert a.values is not None and b.values is not None and b.keys is not None
        _close(a.values, b.values)
        _close(a.keys, b.keys)
        f32 = [decode(ref, dtype=torch.float32, backend=x).values for x in ("cpu", "reference")]
        assert f32[0] is not None and f32[1] is not None
        if not rotate:  # the rotation is undone in another order by the C loop
            assert torch.equal(f32[0], f32[1])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_symmetric_values_triton_codes_equal_reference_bit_for_bit(bits: int, group: int) -> None:
    k, v = kv(tokens=64, dim=64, dtype=torch.float16, seed=bits + 2)
    cfg = CodecConfig(bits, bits, group, symmetric_values=True)
    ref = encode(k, v, cfg, backend="reference")
    assert encode(k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), cfg, backend="triton") == ref
    a = decode(ref, backend="reference")
    b = decode(ref, device=TRITON_DEVICE, backend="triton")
    assert a.values is not None and b.values is not None and a.keys is not None
    _close(a.values, b.values)
    _close(a.keys, b.keys)


def test_symmetric_latent_on_every_backend() -> None:
    """The latent layout's sections are per token too: symmetric on every backend alike."""
    latent = torch.randn(3, 64, 128)
    cfg = CodecConfig(key_bits=(2, 3, 4), group_size=64, symmetric_values=True)
    ref = encode_latent(latent, cfg, backend="reference")
    assert encode_latent(latent, cfg, backend="cpu") == ref
    assert encode_latent(latent.to(TRITON_DEVICE), cfg, backend="triton") == ref
    want = decode(ref, backend="reference").latent
    assert want is not None
    for backend, device in (("cpu", "cpu"), ("triton", TRITON_DEVICE)):
        got = decode(ref, device=device, backend=backend).latent
        assert got is not None
        _close(got, want)


def test_the_c_loop_refuses_symmetric_key_groups() -> None:
    """Symmetric groups are per token; the C loop says so rather than read no minimums."""
    from kvpool.kernels import _cpu_codec

    x = torch.zeros(1, 64, 64)
    out = torch.zeros(64 * 64)
    with pytest.raises(ValueError, match="per token"):
        _cpu_codec.encode_section(
            x.data_ptr(), 3, 1, 64, 64, 1, 32, 2, out.data_ptr(), out.data_ptr(),
            out.data_ptr(), 1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="per token"):
        _cpu_codec.decode_section(
            out.data_ptr(), out.data_ptr(), out.data_ptr(), 1, 64, 64, 1, 32, 2, x.data_ptr(),
            64 * 64, 64, 3, 0, 0, 0, 0, 1,
        )  # fmt: skip
