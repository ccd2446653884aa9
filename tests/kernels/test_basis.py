"""Transform coding of keys (KeyBasis, block flag KEY_BASIS): keys stored as components in a
calibrated basis, a run of components at each width, on every backend."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kvpool.kernels.codec import Block, CodecConfig, KeyBasis, decode, encode
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.blockformat import CHUNK, Flag, parse_header, seal
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
    a = alike_on_every_backend(k, v, cfg)
    assert torch.equal(a.keys[:, :, :1], k[:, :, :1].half().to(dtype))  # type: ignore[index]


def alike_on_every_backend(k: Tensor, v: Tensor, cfg: CodecConfig) -> Block:
    """Every backend writes the same block (on CUDA, a code may flip at a rounding boundary)
    and decodes it alike; returns the reference's decoding."""
    basis = cfg.key_basis
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
    return a


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


def test_any_bytes_that_are_no_basis_are_refused_with_a_codec_error(tmp_path: Path) -> None:
    """torch.load of foreign bytes fails in many ways (IndexError, EOFError, struct.error...);
    a published artifact is foreign bytes, so each of them must come back as CodecError."""
    import random

    rng = random.Random(20261207)
    good = random_basis().save(tmp_path / "basis.pt").read_bytes()
    junk = [rng.randbytes(n) for n in (1, 2, 7, 64, 4096) for _ in range(40)]
    junk += [good[:n] for n in range(0, len(good), max(1, len(good) // 64))]  # truncated
    for _ in range(200):  # a valid file with bytes flipped
        flipped = bytearray(good)
        flipped[rng.randrange(len(good))] ^= 1 << rng.randrange(8)
        junk.append(bytes(flipped))
    refused = 0
    for i, data in enumerate(junk):
        path = tmp_path / f"junk{i}.pt"
        path.write_bytes(data)
        try:
            KeyBasis.load(path)
        except CodecError:
            refused += 1
    assert refused >= len(junk) - 200  # flipped bytes inside a tensor may still load


def test_headers_with_a_basis_are_checked() -> None:
    """KEY_BASIS needs its id, key widths per 8 components (0 allowed only there), the KV
    layout; a basis id without the flag is refused."""
    from dataclasses import replace

    from kvpool.proto.blockformat import Layout

    basis = random_basis()
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM)
    header = parse_header(encode(k, v, config(basis)))
    for bad in (
        dict(basis_id=b""),  # the flag without the id
        dict(basis_id=b"x" * 8),  # an id of the wrong length
        dict(key_bits=header.key_bits[:-1]),  # not a width per 8 components
        dict(flags=header.flags & ~Flag.KEY_BASIS),  # an id (and width 0) without the flag
        dict(key_bits=(5,) * len(header.key_bits)),  # not a width
        dict(layout=Layout.LATENT, value_bits=()),  # a basis for a latent block
    ):
        with pytest.raises(BlockFormatError):
            replace(header, **bad)


def test_bases_that_are_not_float32_finite_or_this_format_are_refused(tmp_path: Path) -> None:
    good = random_basis()
    with pytest.raises(CodecError):
        KeyBasis(good.mean.double(), good.rotation.double(), WIDTHS)
    nan = good.mean.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(CodecError):
        KeyBasis(nan, good.rotation, WIDTHS)
    path = tmp_path / "future.pt"
    torch.save({"format": 2, "mean": good.mean, "rotation": good.rotation,
                "widths": list(WIDTHS)}, path)  # fmt: skip
    with pytest.raises(CodecError, match="format 2"):
        KeyBasis.load(path)


def test_the_c_loop_refuses_strides_and_transforms_it_cannot_apply() -> None:
    """Rows or heads that would overlap, a Hadamard rotation of a non-power-of-two row, RoPE
    tables without their sine or wider than a row: ValueError, nothing written."""
    from kvpool.kernels import _cpu_codec

    codes = torch.zeros(2 * 16 * 24 // 4, dtype=torch.uint8)
    params = torch.ones(2 * 16, dtype=torch.float16)
    out = torch.full((2, 16, 64), 7.0)
    cos = torch.ones(16, 24)

    def call(d: int, head_stride: int, row_stride: int, *extra: int) -> None:
        _cpu_codec.decode_section(
            codes.data_ptr(), params.data_ptr(), params.data_ptr(), 2, 16, d, 0, d, 2,
            out.data_ptr(), head_stride, row_stride, 3, *extra,
        )  # fmt: skip

    for bad in (
        (24, 16 * 64, 16),  # rows overlap
        (24, 8 * 64, 64),  # heads overlap
        (24, 16 * 64, 64, 1),  # a Hadamard rotation of 24 values
        (24, 16 * 64, 64, 0, cos.data_ptr(), 0, 24),  # cosines without sines
        (24, 16 * 64, 64, 0, cos.data_ptr(), cos.data_ptr(), 32),  # rotary beyond the row
    ):
        with pytest.raises(ValueError):
            call(*bad)
    assert bool((out == 7.0).all())
    call(24, 16 * 64, 64, 0, cos.data_ptr(), cos.data_ptr(), 24)  # the same, well formed
    assert not bool((out[..., :24] == 7.0).any()) and bool((out[..., 24:] == 7.0).all())


# ---- inter-layer prediction (block flag PREDICTED) ----------------------------------------------


def predicting_basis(seed: int = 0, widths: tuple[int, ...] = WIDTHS) -> KeyBasis:
    """A random basis with random prediction maps (gain about 1/2 per layer)."""
    g = torch.Generator().manual_seed(seed)
    plain = random_basis(widths, seed)
    width = HEADS * DIM
    key_maps = torch.randn(LAYERS - 1, 2 * width + 1, width, generator=g) / (2 * width) ** 0.5 / 2
    value_maps = torch.randn(LAYERS - 1, 3 * width + 1, width, generator=g) / (3 * width) ** 0.5 / 2
    mean = plain.mean.clone()
    mean[1:] = 0  # layers after the first are predicted, their mean is in the maps' bias
    return KeyBasis(mean, plain.rotation, widths, key_maps, value_maps)


def predictable_kv(basis: KeyBasis, noise: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """KV whose layer 1 is the basis's prediction from layer 0 plus `noise` (pre-RoPE keys)."""
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=64, dim=DIM, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    k[1] = basis.predict_keys(1, k[0], v[0]) + noise * torch.randn(k[1].shape, generator=g)
    v[1] = basis.predict_values(1, k[1], k[0], v[0]) + noise * torch.randn(v[1].shape, generator=g)
    return k, v


def test_predicted_layers_store_only_what_the_prediction_misses() -> None:
    """Layer 1 is layer 0 through the maps plus a little noise: coded as residuals, it comes
    back several times closer than the same basis without the maps codes it; layer 0, coded
    against its mean, as close as before. The header says PREDICTED and names the basis."""
    basis = predicting_basis(widths=(8,) * 8 + (3,) * 8)
    plain = KeyBasis(random_basis().mean, basis.rotation, basis.widths)
    k, v = predictable_kv(basis, noise=0.05)
    blob = encode(k, v, config(basis))
    header = parse_header(blob)
    assert header.has_flag(Flag.PREDICTED) and header.basis_id == basis.id
    got, ref = decode(blob, key_basis=basis), decode(encode(k, v, config(plain)), key_basis=plain)
    assert got.keys is not None and got.values is not None
    assert ref.keys is not None and ref.values is not None
    for ours, theirs, x in ((got.keys, ref.keys, k), (got.values, ref.values, v)):
        assert float((ours[1] - x[1]).abs().max()) < 0.25 * float((theirs[1] - x[1]).abs().max())
    assert float((got.keys[0] - k[0]).abs().max()) < 0.01 * float(k[0].abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_predicted_blocks_are_the_same_on_every_backend(dtype: torch.dtype) -> None:
    """The closed loop rebuilds each layer from its codes: the reference and the C loop write
    the same bytes, and every backend decodes them alike, sinks exact."""
    basis = predicting_basis(seed=2)
    k, v = predictable_kv(basis, noise=0.3, seed=4)
    k, v = k.to(dtype), v.to(dtype)
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1)
    a = alike_on_every_backend(k, v, cfg)
    assert a.keys is not None and a.values is not None
    assert torch.equal(a.keys[:, :, :1], k[:, :, :1].half().to(dtype))
    assert torch.equal(a.values[:, :, :1], v[:, :, :1].half().to(dtype))
    assert float((a.values - v).abs().max()) < 0.5 * float(v.abs().max())
    plain, packed = encode(k, v, cfg), encode(k, v, replace(cfg, deflate=True))  # deflated:
    a, b = decode(plain, key_basis=basis), decode(packed, key_basis=basis)  # the published way
    assert len(packed) < len(plain) and a.keys is not None and b.keys is not None
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)  # type: ignore[arg-type]


def test_predicted_blocks_need_their_maps() -> None:
    """Without a basis, or with the same rotation and widths but no maps (another id):
    refused; a PREDICTED header without KEY_BASIS, or naming a basis without maps, is refused;
    maps of the wrong shape or dtype, with NaN, or only one of the two make no basis."""
    from dataclasses import replace

    basis = predicting_basis()
    no_maps = KeyBasis(basis.mean, basis.rotation, basis.widths)
    k, v = predictable_kv(basis, noise=0.1)
    blob = encode(k, v, config(basis))
    with pytest.raises(CodecError):
        decode(blob)
    with pytest.raises(BlockMismatchError):
        decode(blob, key_basis=no_maps)
    header = parse_header(blob)
    with pytest.raises(BlockFormatError):
        replace(header, flags=header.flags & ~Flag.KEY_BASIS, basis_id=b"",
                key_bits=(2,) * LAYERS)  # fmt: skip
    # a header (checksum intact) that claims PREDICTED for a basis without maps: refused
    plain = encode(k, v, config(no_maps))
    h = parse_header(plain)
    forged = seal(replace(h, flags=h.flags | Flag.PREDICTED),
                  memoryview(plain)[h.header_len : h.header_len + h.payload_len], None)  # fmt: skip
    with pytest.raises(CodecError, match="must hold the maps"):
        decode(forged, key_basis=no_maps)
    assert basis.key_maps is not None and basis.value_maps is not None
    km, vm = basis.key_maps, basis.value_maps
    nan = km.clone()
    nan[0, 0, 0] = float("nan")
    for bad in ((km[:, :-1], vm), (km, None), (km.double(), vm), (nan, vm), (km, km)):
        with pytest.raises(CodecError):
            KeyBasis(basis.mean, basis.rotation, basis.widths, *bad)
    with pytest.raises(CodecError, match="prediction maps"):  # one layer: nothing to predict
        KeyBasis(basis.mean[:1], basis.rotation[:1], basis.widths[:8], km[:0], vm[:0])


def test_a_predicting_basis_saves_and_loads(tmp_path: Path) -> None:
    basis = predicting_basis()
    loaded = KeyBasis.load(basis.save(tmp_path / "basis.pt"))
    assert loaded.predicted and loaded.id == basis.id
    assert loaded.key_maps is not None and basis.key_maps is not None
    assert torch.equal(loaded.key_maps, basis.key_maps)
    assert basis.id != KeyBasis(basis.mean, basis.rotation, basis.widths).id


def test_a_predicting_basis_pickles_without_its_device_copies() -> None:
    import pickle

    basis = predicting_basis()
    basis._copies[torch.device("meta")] = (None,)  # as if it had been used on a device
    back = pickle.loads(pickle.dumps(basis))
    assert back.id == basis.id and back.predicted and back._copies == {}
    k, v = predictable_kv(basis, noise=0.1)
    assert decode(encode(k, v, config(basis)), key_basis=back).keys is not None


def test_predicted_blocks_decode_into_given_tensors() -> None:
    """decode(out=...) (how get_blocks and the vLLM connector read) rebuilds predicted layers
    into the caller's fp16 tensors, here a slice of a longer cache, as a plain decode does."""
    basis = predicting_basis()
    k, v = predictable_kv(basis, noise=0.2)
    blob = encode(k, v, config(basis, sink_tokens=1, hadamard_values=True))
    cache_k = torch.zeros(LAYERS, HEADS, 128, DIM, dtype=torch.float16)
    cache_v = torch.zeros_like(cache_k)
    got = decode(blob, out=(cache_k[:, :, 32:96], cache_v[:, :, 32:96]), key_basis=basis)
    ref = decode(blob, dtype=torch.float16, key_basis=basis)
    assert got.keys is not None and ref.keys is not None and ref.values is not None
    assert torch.equal(cache_k[:, :, 32:96], ref.keys) and torch.equal(
        cache_v[:, :, 32:96], ref.values
    )
    assert not cache_k[:, :, :32].any() and not cache_v[:, :, 96:].any()


def test_predicted_blocks_refuse_what_fp16_cannot_hold() -> None:
    """NaN, inf, or a magnitude beyond fp16 anywhere: NonFiniteError, even where the maps
    would have predicted it well enough to leave a small residual."""
    from kvpool.proto.errors import NonFiniteError

    basis = predicting_basis()
    for bad in (float("nan"), float("inf"), 1e5):
        k, v = predictable_kv(basis, noise=0.1)
        v[1, 0, 5, 3] = bad
        with pytest.raises(NonFiniteError):
            encode(k, v, config(basis))


def per_head_twin(basis: KeyBasis) -> KeyBasis:
    """`basis` with its maps cut to their per-head blocks [L - 1, H, k D + 1, D]."""
    assert basis.key_maps is not None and basis.value_maps is not None

    def blocks(m: Tensor, k: int) -> Tensor:
        out = torch.empty(LAYERS - 1, HEADS, k * DIM + 1, DIM)
        for h in range(HEADS):
            cols = slice(h * DIM, (h + 1) * DIM)
            for i in range(k):
                rows = slice(i * HEADS * DIM + h * DIM, i * HEADS * DIM + (h + 1) * DIM)
                out[:, h, i * DIM : (i + 1) * DIM] = m[:, rows, cols]
            out[:, h, -1] = m[:, -1, cols]
        return out

    return KeyBasis(basis.mean, basis.rotation, basis.widths, blocks(basis.key_maps, 2),
                    blocks(basis.value_maps, 3))  # fmt: skip


def block_diagonal(basis: KeyBasis) -> KeyBasis:
    """A per-head basis's maps written as full maps, zero between heads."""
    assert basis.key_maps is not None and basis.value_maps is not None

    def full(m: Tensor, k: int) -> Tensor:
        out = torch.zeros(LAYERS - 1, k * HEADS * DIM + 1, HEADS * DIM)
        for h in range(HEADS):
            cols = slice(h * DIM, (h + 1) * DIM)
            for i in range(k):
                rows = slice(i * HEADS * DIM + h * DIM, i * HEADS * DIM + (h + 1) * DIM)
                out[:, rows, cols] = m[:, h, i * DIM : (i + 1) * DIM]
            out[:, -1, cols] = m[:, h, -1]
        return out

    return KeyBasis(basis.mean, basis.rotation, basis.widths, full(basis.key_maps, 2),
                    full(basis.value_maps, 3))  # fmt: skip


def test_per_head_maps_predict_as_their_block_diagonal_full_maps() -> None:
    """Per-head maps [L - 1, H, k D + 1, D] give the predictions of the full maps that hold
    them as diagonal blocks, but are another basis (another id): a block of one is refused by
    the other. Their blocks are the same on every backend and decode as close as the full
    maps' do."""
    basis = per_head_twin(predicting_basis(seed=3))
    twin = block_diagonal(basis)
    assert basis.per_head_maps and not twin.per_head_maps and basis.id != twin.id
    k, v = predictable_kv(basis, noise=0.1, seed=5)
    torch.testing.assert_close(basis.predict_keys(1, k[0], v[0]), twin.predict_keys(1, k[0], v[0]),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    torch.testing.assert_close(basis.predict_values(1, k[1], k[0], v[0]),
                               twin.predict_values(1, k[1], k[0], v[0]), atol=1e-5, rtol=1e-5)  # fmt: skip
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1)
    got = alike_on_every_backend(k, v, cfg)
    ref = decode(encode(k, v, replace_basis(cfg, twin)), key_basis=twin)
    assert got.keys is not None and got.values is not None and ref.keys is not None
    assert ref.values is not None
    for ours, theirs, x in ((got.keys, ref.keys, k), (got.values, ref.values, v)):
        assert float((ours - x).abs().max()) <= 1.25 * float((theirs - x).abs().max()) + 1e-3
    with pytest.raises(BlockMismatchError):
        decode(encode(k, v, cfg), key_basis=twin)


def replace_basis(cfg: CodecConfig, basis: KeyBasis) -> CodecConfig:
    from dataclasses import replace

    return replace(cfg, key_basis=basis)


def test_per_head_maps_save_load_and_are_checked(tmp_path: Path) -> None:
    basis = per_head_twin(predicting_basis())
    loaded = KeyBasis.load(basis.save(tmp_path / "basis.pt"))
    assert loaded.per_head_maps and loaded.id == basis.id
    assert basis.key_maps is not None and basis.value_maps is not None
    km, vm = basis.key_maps, basis.value_maps
    full = block_diagonal(basis)
    assert full.key_maps is not None
    for bad in ((km[:, :, :-1], vm), (km, full.value_maps), (full.key_maps, vm)):
        with pytest.raises(CodecError, match="prediction maps"):
            KeyBasis(basis.mean, basis.rotation, basis.widths, *bad)


def test_calibration_fits_per_head_maps_in_the_closed_loop() -> None:
    """Keys and values whose every head of layer l is a linear function of the same head of
    layer l - 1: the per-head fit finds maps that leave a residual far below the layers' own
    scale, of the per-head shapes; the full fit's maps are the full shapes."""
    from kvpool.calibrate import _fit_predicted

    g = torch.Generator().manual_seed(7)
    tokens = 256
    k = torch.empty(LAYERS, HEADS, tokens, DIM)
    v = torch.empty_like(k)
    k[0] = torch.randn(HEADS, tokens, DIM, generator=g)
    v[0] = torch.randn(HEADS, tokens, DIM, generator=g)
    a = torch.randn(HEADS, 2 * DIM, DIM, generator=g) / (2 * DIM) ** 0.5
    b = torch.randn(HEADS, 3 * DIM, DIM, generator=g) / (3 * DIM) ** 0.5
    k[1] = torch.cat([k[0], v[0]], -1) @ a
    v[1] = torch.cat([k[1], k[0], v[0]], -1) @ b
    basis = _fit_predicted(k, v, None, 3.0, 128, 4, per_head=True)
    assert basis.per_head_maps and basis.key_maps is not None and basis.value_maps is not None
    assert basis.key_maps.shape == (LAYERS - 1, HEADS, 2 * DIM + 1, DIM)
    assert basis.value_maps.shape == (LAYERS - 1, HEADS, 3 * DIM + 1, DIM)
    prediction = basis.predict_keys(1, k[0], v[0])
    assert float((prediction - k[1]).abs().max()) < 0.2 * float(k[1].abs().max())
    full = _fit_predicted(k, v, None, 3.0, 128, 4)
    assert not full.per_head_maps and full.key_maps is not None
    assert full.key_maps.shape == (LAYERS - 1, 2 * HEADS * DIM + 1, HEADS * DIM)


# ---- symmetric value groups with prediction (SYMMETRIC_VALUES | PREDICTED) ----------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_predicted_blocks_with_symmetric_values_are_the_same_on_every_backend(
    dtype: torch.dtype,
) -> None:
    """The value residuals in symmetric groups: the closed loop writes the same bytes on every
    backend (the reader's rebuild uses the same offsets -h s), decodes alike, and the block is
    smaller than with min/max groups by exactly the values' minimums."""
    basis = predicting_basis(seed=3)
    k, v = predictable_kv(basis, noise=0.3, seed=5)
    k, v = k.to(dtype), v.to(dtype)
    options = {"rope": RopeParams(10000.0, DIM), "hadamard_values": True, "sink_tokens": 1}
    cfg = config(basis, symmetric_values=True, **options)
    a = alike_on_every_backend(k, v, cfg)
    assert a.values is not None
    sym, plain = encode(k, v, cfg), encode(k, v, config(basis, **options))
    minmax = decode(plain, key_basis=basis).values
    assert minmax is not None
    rms = lambda x: float(x.float().pow(2).mean().sqrt())  # noqa: E731
    assert rms(a.values - v) < 0.5 * rms(v)  # 2-bit codes: about 0.4 of the spread
    assert rms(a.values - v) < 1.25 * rms(minmax - v)  # about what min/max groups achieve
    header = parse_header(sym)
    assert header.has_flag(Flag.PREDICTED) and header.has_flag(Flag.SYMMETRIC_VALUES)
    assert len(plain) - len(sym) == sum(2 * s.n_params for s in header.tensor_sections(1))


def test_calibration_fits_the_maps_for_symmetric_value_groups() -> None:
    """calibrate_basis's symmetric_values reaches the closed loop: the maps differ from those
    fitted for min/max groups (the layer before is rebuilt from other codes), and the basis file
    gets its own name."""
    import argparse

    from kvpool.calibrate import _fit_predicted, basis_path

    g = torch.Generator().manual_seed(9)
    k = torch.randn(LAYERS, HEADS, 256, DIM, generator=g)
    v = torch.randn(LAYERS, HEADS, 256, DIM, generator=g) + 0.5 * k
    sym = _fit_predicted(k, v, None, 2.0, 128, 2, symmetric_values=True)
    plain = _fit_predicted(k, v, None, 2.0, 128, 2)
    assert sym.value_maps is not None and plain.value_maps is not None
    assert not torch.equal(sym.value_maps, plain.value_maps)
    assert sym.id != plain.id
    options = argparse.Namespace(group_size=128, key_bits=1.5, predict=True)
    named = basis_path("m", argparse.Namespace(**vars(options), symmetric_values=True))
    assert named.name.endswith("-pred-vsym.pt") and named != basis_path("m", options)


# ---- low-rank maps, and the reader's loop over rows (issue 22 part 3) ---------------------------


def low_rank_twin(basis: KeyBasis, rank: int) -> KeyBasis:
    """`basis` with each map cut to rank `rank` (its leading right singular vectors), stored as
    KeyBasis's two factors [k H D + 1 + H D, rank]."""
    assert basis.key_maps is not None and basis.value_maps is not None

    def factors(m: Tensor) -> Tensor:
        up = torch.linalg.svd(m[:, :-1].double(), full_matrices=False)[2][:, :rank]
        up = up.transpose(-1, -2).float()  # [L - 1, H D, rank]
        return torch.cat([m @ up, up], 1).contiguous()

    return KeyBasis(basis.mean, basis.rotation, basis.widths, factors(basis.key_maps),
                    factors(basis.value_maps))  # fmt: skip


def test_low_rank_maps_predict_as_the_product_of_their_factors() -> None:
    """Rank-r maps predict ([x, 1] @ A) @ B^T, the full map A @ B^T's prediction; they are
    another basis (another id), save and load, and maps of rank 0, of rank H D or more, or of
    two ranks make no basis."""
    basis = low_rank_twin(predicting_basis(seed=3), 24)
    assert basis.map_rank == 24 and not basis.per_head_maps and basis.predicted
    assert basis.key_maps is not None and basis.value_maps is not None
    width = HEADS * DIM
    product = KeyBasis(basis.mean, basis.rotation, basis.widths,
                       basis.key_maps[:, : 2 * width + 1] @ basis.key_maps[:, 2 * width + 1 :].mT,
                       basis.value_maps[:, : 3 * width + 1] @ basis.value_maps[:, 3 * width + 1 :].mT)  # fmt: skip
    assert product.map_rank == 0 and product.id != basis.id
    k, v = predictable_kv(basis, noise=0.1, seed=5)
    torch.testing.assert_close(basis.predict_keys(1, k[0], v[0]),
                               product.predict_keys(1, k[0], v[0]), atol=1e-4, rtol=1e-4)  # fmt: skip
    torch.testing.assert_close(basis.predict_values(1, k[1], k[0], v[0]),
                               product.predict_values(1, k[1], k[0], v[0]), atol=1e-4, rtol=1e-4)  # fmt: skip
    with pytest.raises(BlockMismatchError):
        decode(encode(k, v, config(basis)), key_basis=product)
    km, vm = basis.key_maps, basis.value_maps
    for bad in ((km[..., :0], vm[..., :0]), (km[..., :12], vm),
                (torch.zeros(LAYERS - 1, 3 * width + 1, width), torch.zeros(LAYERS - 1, 4 * width + 1, width))):  # fmt: skip
        with pytest.raises(CodecError, match="prediction maps"):
            KeyBasis(basis.mean, basis.rotation, basis.widths, *bad)


def test_low_rank_blocks_are_the_same_on_every_backend(tmp_path: Path) -> None:
    """Blocks of a rank-r basis: the same bytes from every writer, decoded alike by every
    reader, about as close to the KV as the full maps' blocks; the basis saves and loads."""
    full = predicting_basis(seed=2)
    basis = low_rank_twin(full, 32)
    loaded = KeyBasis.load(basis.save(tmp_path / "basis.pt"))
    assert loaded.id == basis.id and loaded.map_rank == 32
    k, v = predictable_kv(full, noise=0.3, seed=4)
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1)
    got = alike_on_every_backend(k, v, cfg)
    ref = decode(encode(k, v, replace_basis(cfg, full)), key_basis=full)
    assert got.keys is not None and got.values is not None
    assert ref.keys is not None and ref.values is not None
    for ours, theirs, x in ((got.keys, ref.keys, k), (got.values, ref.values, v)):
        assert float((ours - x).abs().max()) <= 1.5 * float((theirs - x).abs().max())


def bf16_twin(basis: KeyBasis) -> KeyBasis:
    """`basis` with its maps rounded to bfloat16 (`kvpool calibrate --bf16-maps`)."""
    assert basis.key_maps is not None and basis.value_maps is not None
    return KeyBasis(basis.mean, basis.rotation, basis.widths, basis.key_maps.bfloat16(),
                    basis.value_maps.bfloat16())  # fmt: skip


@pytest.mark.parametrize("form", ["full", "rank", "head"])
def test_bfloat16_maps_are_their_own_basis_and_decode_alike_on_every_backend(
    form: str, tmp_path: Path
) -> None:
    """bfloat16 maps (of any form) are another basis than the float32 maps they round (another
    id), saved and loaded as bfloat16; maps of two dtypes, of another dtype or not finite make
    no basis. Their blocks: the same
    bytes from every writer; every reader's decoding within bfloat16 rounding of the
    reference's (the readers sum their bfloat16 products in other orders), about as close to
    the KV as the float32 maps' blocks."""
    full = predicting_basis(seed=2)
    f32 = {"full": full, "rank": low_rank_twin(full, 32), "head": per_head_twin(full)}[form]
    basis = bf16_twin(f32)
    assert basis.bf16_maps and not f32.bf16_maps and basis.id != f32.id
    assert basis.map_rank == f32.map_rank and basis.per_head_maps == f32.per_head_maps
    loaded = KeyBasis.load(basis.save(tmp_path / "basis.pt"))
    assert loaded.id == basis.id and loaded.bf16_maps
    assert f32.value_maps is not None and basis.key_maps is not None
    with pytest.raises(CodecError, match="both float32 or both bfloat16"):
        KeyBasis(basis.mean, basis.rotation, basis.widths, basis.key_maps, f32.value_maps)
    with pytest.raises(CodecError, match="both float32 or both bfloat16"):  # another dtype
        KeyBasis(basis.mean, basis.rotation, basis.widths, basis.key_maps.half(),
                 basis.value_maps.half())  # fmt: skip
    nan = basis.key_maps.clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(CodecError, match="finite"):
        KeyBasis(basis.mean, basis.rotation, basis.widths, nan, basis.value_maps)
    k, v = predictable_kv(full, noise=0.3, seed=4)
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1)
    ref = encode(k, v, cfg, backend="reference")
    assert encode(k, v, cfg, backend="cpu") == ref
    assert encode(k.to(TRITON_DEVICE), v.to(TRITON_DEVICE), cfg, backend="triton") == ref or (
        TRITON_DEVICE != "cpu"
    )
    want = decode(ref, backend="reference", key_basis=basis)
    plain = decode(encode(k, v, replace_basis(cfg, f32)), key_basis=f32)
    for got in (decode(ref, backend="cpu", key_basis=basis),
                decode(ref, device=TRITON_DEVICE, backend="triton", key_basis=basis)):  # fmt: skip
        for ours, theirs, base, x in ((got.keys, want.keys, plain.keys, k),
                                      (got.values, want.values, plain.values, v)):  # fmt: skip
            assert ours is not None and theirs is not None and base is not None
            ours = ours.cpu().float()
            assert float((ours - theirs).abs().max()) <= 2**-6 * float(theirs.abs().max())
            assert float((ours - x).abs().max()) <= 1.25 * float((base - x).abs().max())


@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("rotate", [False, True])
def test_the_readers_loop_over_rows_rebuilds_what_the_one_loop_rebuilds(
    rank: int, rotate: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """basis.rebuild_rows (the reader's loop for full and low-rank maps: rows, products summed
    in place, tokens split over a pool's workers) gives `predicted_loop`'s layers within float
    rounding, keys with RoPE redone by either store (torch's or the C loop's) alike; a component between stored ones is read as the 0 the decoder leaves there."""
    from concurrent.futures import ThreadPoolExecutor

    from kvpool.kernels import cpu_codec
    from kvpool.kernels.basis import rebuild_loop, rebuild_rows, store_rows
    from kvpool.kernels.transforms import redo_rope, rope_tables

    widths = (*(8, 0, 3, 3, 2, 2, 2, 0), *(4, 4, 3, 3, 3, 2, 0, 0))  # a gap in layer 0
    basis = predicting_basis(seed=6, widths=widths)
    basis = low_rank_twin(basis, rank) if rank else basis
    assert basis.gaps == ((0, 8, 16),)
    g = torch.Generator().manual_seed(8)
    tokens = 128
    coded = [torch.randn(LAYERS, HEADS, tokens, DIM, generator=g) for _ in range(2)]
    coded[0][0, :, :, 8:16] = 0
    want = (torch.empty_like(coded[0]), torch.empty_like(coded[1]))
    rebuild_loop(basis, coded, rotate, want)  # predicted_loop: the specification
    rope = RopeParams(10000.0, DIM)
    tables = rope_tables(rope, 0, tokens, torch.device("cpu"))
    plain = (torch.empty_like(coded[0]), torch.empty_like(coded[1]))
    rebuild_rows(basis, coded, rotate, plain)
    torch.testing.assert_close(plain, want, atol=1e-4, rtol=1e-5)
    with ThreadPoolExecutor(2) as pool:  # 2 workers: the tokens split in two runs
        runs: list[int] = []
        spread = pool.map
        monkeypatch.setattr(pool, "map", lambda fn, it: spread(fn, runs.extend(it) or runs))
        for store in (store_rows, cpu_codec.store_rows):
            got = (torch.empty(coded[0].shape, dtype=torch.float16),
                   torch.empty(coded[0].shape, dtype=torch.float16))  # fmt: skip
            rebuild_rows(basis, coded, rotate, got, tables, store, pool, workers=2)
            torch.testing.assert_close(got[1], want[1].half(), atol=2e-3, rtol=2**-10)
            torch.testing.assert_close(got[0], redo_rope(want[0], rope, 0).half(),
                                       atol=2e-3, rtol=2**-10)  # fmt: skip
        assert runs == [0, 1, 0, 1]  # two runs of 64 tokens, each store


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_c_loops_store_writes_rows_as_torch_does(dtype: torch.dtype) -> None:
    """cpu_codec.store_rows: float32 rows of any row stride into a slice of a cache, in its
    dtype, RoPE redone (a partial rotary dim) or not, as basis.store_rows does in torch."""
    from kvpool.kernels import cpu_codec
    from kvpool.kernels.basis import store_rows
    from kvpool.kernels.transforms import rope_tables

    g = torch.Generator().manual_seed(1)
    rows = torch.randn(16, HEADS, DIM, generator=g).transpose(0, 1)  # [H, T, D], token-major
    tables = rope_tables(RopeParams(10000.0, 32), 5, 16, torch.device("cpu"))
    for rope in (None, tables):
        want = torch.zeros(HEADS, 32, DIM, dtype=dtype)
        got = torch.zeros_like(want)
        store_rows(rows, want[:, 8:24], rope)
        cpu_codec.store_rows(rows, got[:, 8:24], rope)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=2**-8)
        assert not got[:, :8].any() and not got[:, 24:].any()


@pytest.mark.parametrize("rotate", [False, True])
def test_the_one_loop_rebuilds_over_its_own_residuals(rotate: bool) -> None:
    """rebuild_loop with `out` the residuals themselves (as rebuild runs per-head maps, in the
    decoder's scratch) rebuilds the same layers, bit for bit, as into fresh tensors."""
    from kvpool.kernels.basis import rebuild_loop

    g = torch.Generator().manual_seed(4)
    for basis in (predicting_basis(seed=2), per_head_twin(predicting_basis(seed=2))):
        coded = [torch.randn(LAYERS, HEADS, 64, DIM, generator=g) for _ in range(2)]
        want = (torch.empty_like(coded[0]), torch.empty_like(coded[1]))
        rebuild_loop(basis, coded, rotate, want)
        rebuild_loop(basis, coded, rotate, (coded[0], coded[1]))
        assert torch.equal(coded[0], want[0]) and torch.equal(coded[1], want[1])


def test_the_decoders_scratch_buffers_are_lent_and_reused() -> None:
    from kvpool.kernels import scratch

    shape, cpu = (3, 5), torch.device("cpu")
    with scratch.lent(shape, cpu, 2) as first, scratch.lent(shape, cpu, 1) as other:
        assert other[0].data_ptr() not in {x.data_ptr() for x in first}  # lent at once
    with scratch.lent(shape, cpu, 3) as again:
        kept = {x.data_ptr() for x in again}
        assert {x.data_ptr() for x in first} <= kept and other[0].data_ptr() in kept
        assert all(x.shape == shape and x.dtype == torch.float32 for x in again)


def test_calibration_fits_low_rank_maps_in_the_closed_loop() -> None:
    """Layer 1 a rank-r function of layer 0: the rank-r fit ([L - 1, k H D + 1 + H D, r]
    factors, from layer 0 as rebuilt from its codes) leaves a residual far below the layer's
    scale and half a rank-r/2 fit's or less; basis files get their own name."""
    import argparse

    from kvpool.calibrate import _fit_predicted, basis_path, reduced_rank
    from kvpool.kernels.basis import as_rows

    g = torch.Generator().manual_seed(7)
    tokens, width, rank = 256, HEADS * DIM, 8
    k = torch.empty(LAYERS, HEADS, tokens, DIM)
    v = torch.empty_like(k)
    k[0] = torch.randn(HEADS, tokens, DIM, generator=g)
    v[0] = torch.randn(HEADS, tokens, DIM, generator=g)
    a, b = torch.randn(2 * width, rank, generator=g), torch.randn(rank, width, generator=g)
    k[1] = (as_rows([k[0], v[0]]) @ a @ b / width).view(tokens, HEADS, DIM).transpose(0, 1)
    v[1] = 0.5 * k[1]
    basis = _fit_predicted(k, v, None, 3.0, 128, 4, rank=rank)
    assert basis.map_rank == rank and basis.key_maps is not None
    assert basis.key_maps.shape == (LAYERS - 1, 3 * width + 1, rank)
    miss = lambda b: float((b.predict_keys(1, k[0], v[0]) - k[1]).pow(2).mean())  # noqa: E731
    lower = _fit_predicted(k, v, None, 3.0, 128, 4, rank=rank // 2)
    assert miss(basis) < 0.1 * float(k[1].pow(2).mean()) and miss(basis) < 0.5 * miss(lower)
    with pytest.raises(CodecError, match="rank"):
        reduced_rank([k[0], v[0]], k[1], width)
    options = argparse.Namespace(group_size=128, key_bits=2.0, predict=True, map_rank=64)
    assert basis_path("m", options).name.endswith("-pred-rank64.pt")
    # bfloat16 maps: rounded as fitted, as good a fit, a file of their own
    low = _fit_predicted(k, v, None, 3.0, 128, 4, rank=rank, bf16=True)
    assert low.bf16_maps and low.map_rank == rank and low.id != basis.id
    assert miss(low) < 0.1 * float(k[1].pow(2).mean()) and miss(low) < 0.5 * miss(lower)
    options = argparse.Namespace(**vars(options), bf16_maps=True)
    assert basis_path("m", options).name.endswith("-pred-rank64-bf16.pt")


def test_the_c_loops_store_refuses_rows_tables_and_strides_it_cannot_write() -> None:
    """store_rows' own checks, before it touches memory: an unknown dtype or empty shape, RoPE
    tables without their pair or of an odd or too wide rotary dim, rows or heads that overlap."""
    from kvpool.kernels import _cpu_codec

    rows = torch.zeros(HEADS, 16, DIM)
    out = torch.zeros(HEADS, 16, DIM, dtype=torch.float16)
    src, dst = rows.data_ptr(), out.data_ptr()

    def store(*args: int, h: int = HEADS, t: int = 16, rs: int = DIM, dtype: int = 1) -> None:
        _cpu_codec.store_rows(src, h, t, DIM, 16 * DIM, DIM, dst, 16 * rs, rs, dtype, *args)

    store()  # the shape as it is: stored
    for bad, why in (
        (lambda: store(dtype=9), "bad rows"),
        (lambda: store(t=0), "bad rows"),
        (lambda: store(src, 0, 32), "bad RoPE tables"),  # cos without sin
        (lambda: store(src, src, 31), "bad RoPE tables"),  # odd rotary dim
        (lambda: store(src, src, DIM + 2), "bad RoPE tables"),
        (lambda: store(rs=DIM - 8), "overlap"),
    ):
        with pytest.raises(ValueError, match=why):
            bad()


def test_a_c_extension_built_before_this_checkout_is_refused_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale build (no store_rows) is an ImportError naming the rebuild, not an
    AttributeError in the middle of a predicted decode."""
    import importlib.util
    import sys
    import types

    import kvpool.kernels

    stale = types.ModuleType("kvpool.kernels._cpu_codec")
    stale.__file__ = "stale/_cpu_codec.so"
    monkeypatch.setitem(sys.modules, "kvpool.kernels._cpu_codec", stale)
    monkeypatch.setattr(kvpool.kernels, "_cpu_codec", stale, raising=False)
    spec = importlib.util.find_spec("kvpool.kernels.cpu_codec")
    assert spec is not None and spec.loader is not None
    with pytest.raises(ImportError, match="pip install -e"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # a fresh copy
