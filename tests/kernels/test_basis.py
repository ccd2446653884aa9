"""Transform coding of keys (KeyBasis, block flag KEY_BASIS): keys stored as components in a
calibrated basis, a run of components at each width, on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvpool.kernels.codec import CodecConfig, KeyBasis, decode, encode
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.blockformat import CHUNK, Flag, parse_header
from kvpool.proto.errors import BlockFormatError, BlockMismatchError, CodecError
from tests.kernels.helpers import kv
from tests.kernels.test_backends import TRITON_DEVICE, _close

LAYERS, HEADS, DIM = 2, 2, 64
# per layer, one width per 8 components: runs of 8, 16 and 24 (split 16 + 8), dropped tails
WIDTHS = (*(8, 4, 3, 3, 2, 2, 2, 0), *(4, 4, 3, 3, 3, 2, 0, 0))


def random_basis(widths: tuple[int, ...] = WIDTHS, seed: int = 0) -> KeyBasis:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(LAYERS, HEADS, DIM, DIM, generator=g))
    return KeyBasis(torch.randn(LAYERS, HEADS, DIM, generator=g), q.contiguous(), widths)


def config(basis: KeyBasis, **options) -> CodecConfig:
    return CodecConfig(value_bits=2, group_size=32, key_basis=basis, **options)


def test_keys_in_the_span_of_the_stored_components_come_back() -> None:
    """At 8 bits on every stored component, keys whose dropped components are zero (their
    basis mean) decode to themselves within 8-bit error; the header names the basis."""
    basis = random_basis(widths=(8,) * 7 + (0,) + (8,) * 6 + (0, 0))
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM, dtype=torch.float32)
    components = basis.to_components(k)
    for layer in range(LAYERS):  # zero the components the basis does not store
        kept = torch.tensor(basis.widths[layer * 8 : (layer + 1) * 8]).repeat_interleave(CHUNK)
        components[layer, ..., kept == 0] = 0
    k = basis.from_components_(components, torch.empty_like(k))
    blob = encode(k, v, config(basis))
    header = parse_header(blob)
    assert header.has_flag(Flag.KEY_BASIS) and header.basis_id == basis.id
    assert header.key_bits == basis.widths
    got = decode(blob, key_basis=basis)
    assert got.keys is not None
    assert float((got.keys - k).abs().max()) < 0.05 * float(k.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backends_write_the_same_blocks_and_decode_alike(dtype: torch.dtype) -> None:
    basis = random_basis()
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM, dtype=dtype, seed=3)
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1)
    ref = encode(k, v, cfg, backend="reference")
    assert encode(k, v, cfg, backend="cpu") == ref
    got = encode(k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), cfg, backend="triton")
    if TRITON_DEVICE == "cpu":  # the same transforms on the same device: the same bytes
        assert got == ref
    else:  # the basis product and RoPE round differently on CUDA: a code may flip at a boundary
        differ = sum(a != b for a, b in zip(got, ref, strict=True))
        assert len(got) == len(ref) and differ < 0.01 * len(ref)
    a = decode(ref, backend="reference", key_basis=basis)
    b = decode(ref, backend="cpu", key_basis=basis)
    c = decode(ref, device=TRITON_DEVICE, backend="triton", key_basis=basis)
    for x, y, z in ((a.keys, b.keys, c.keys), (a.values, b.values, c.values)):
        assert x is not None and y is not None and z is not None
        _close(x, y)  # the C loop undoes the Hadamard rotation itself, in another order
        _close(x, z.cpu())
    assert torch.equal(a.keys[:, :, :1], k[:, :, :1].half().to(dtype))  # type: ignore[index]


def test_a_block_decodes_only_with_its_basis() -> None:
    basis, other = random_basis(), random_basis(seed=1)
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM)
    blob = encode(k, v, config(basis))
    with pytest.raises(CodecError):
        decode(blob)
    with pytest.raises(BlockMismatchError):
        decode(blob, key_basis=other)
    bad = bytearray(blob)
    bad[parse_header(blob).header_len - 5] ^= 1  # inside the basis id: the crc no longer holds
    with pytest.raises(BlockFormatError):
        decode(bytes(bad), key_basis=basis)
    assert config(basis).describe() != config(other).describe()
    assert basis.id.hex() in config(basis).describe()


def test_fewer_bits_for_fewer_components() -> None:
    basis = random_basis()
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM)
    with_basis = len(encode(k, v, config(basis)))
    plain = len(encode(k, v, CodecConfig(key_bits=4, value_bits=2, group_size=32)))
    assert basis.bits_per_key < 4 and with_basis < plain


def test_bad_bases_are_refused(tmp_path: Path) -> None:
    good = random_basis()
    with pytest.raises(CodecError):  # not orthonormal
        KeyBasis(good.mean, good.rotation * 2, WIDTHS)
    with pytest.raises(CodecError):  # a width per 8 components of each layer
        KeyBasis(good.mean, good.rotation, WIDTHS[:-1])
    with pytest.raises(CodecError):  # 5 bits is not a width
        KeyBasis(good.mean, good.rotation, (5, *WIDTHS[1:]))
    with pytest.raises(CodecError):  # for another shape of keys
        k, v = kv(layers=LAYERS, heads=HEADS + 1, tokens=64, dim=DIM)
        encode(k, v, config(good))
    path = good.save(tmp_path / "basis.pt")
    loaded = KeyBasis.load(path)
    assert loaded == good and loaded.id == good.id and loaded.widths == good.widths
    (tmp_path / "junk.pt").write_bytes(b"not a basis")
    with pytest.raises(CodecError):
        KeyBasis.load(tmp_path / "junk.pt")
