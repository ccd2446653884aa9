"""encode/decode of whole blocks: round trips, options, layouts, and every documented error."""

import struct
from dataclasses import replace

import pytest
import torch

from kvpool.kernels.codec import (
    Binding,
    CodecConfig,
    block_header,
    decode,
    encode,
    encode_latent,
)
from kvpool.kernels.transforms import RopeParams, hadamard, redo_rope, undo_rope
from kvpool.proto.blockformat import (
    FORMAT_VERSION,
    UNBOUND,
    BlockHeader,
    DType,
    Flag,
    Layout,
    check_bound,
    parse_header,
    verify,
)
from kvpool.proto.errors import (
    BlockFormatError,
    BlockMismatchError,
    ChecksumError,
    CodecError,
    ForgedBlockError,
    NonFiniteError,
    TruncatedBlockError,
    UnsupportedVersionError,
)
from tests.kernels.helpers import error_bound, kv

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_round_trip_every_width_group_dtype(dtype: torch.dtype, bits: int, group: int) -> None:
    k, v = kv(tokens=128, dim=64, dtype=dtype, seed=group)
    blob = encode(k, v, CodecConfig(bits, bits, group))
    out = decode(blob, dtype=torch.float32)
    assert out.keys is not None and out.values is not None
    assert out.keys.shape == k.shape and out.keys.dtype == torch.float32
    vgroup = min(group, 64)
    for layer in range(k.shape[0]):
        for x, x_hat, is_key, g in ((k, out.keys, True, group), (v, out.values, False, vgroup)):
            err = (x[layer].float() - x_hat[layer]).abs()
            assert bool((err <= error_bound(x[layer], is_key, g, bits)).all())
    assert decode(blob).keys.dtype == dtype  # type: ignore[union-attr]


def test_llama_shaped_block_compresses_7x_at_2_bits() -> None:
    header = BlockHeader(
        layout=Layout.KV, dtype=DType.FLOAT16, layers=32, heads=8, tokens=256, head_dim=128,
        group_size=128, key_bits=(2,) * 32, value_bits=(2,) * 32,
    )  # fmt: skip
    fp16_bytes = 2 * 32 * 8 * 256 * 128 * 2
    assert fp16_bytes / (header.header_len + header.payload_len) >= 7.0
    # bits per value = b + 32/G (fp16 scale and minimum per group of G)
    assert header.payload_len * 8 / header.elements == pytest.approx(2 + 32 / 128, rel=1e-3)


def test_per_layer_bit_profile_is_recorded_and_used() -> None:
    k, v = kv(layers=3, seed=3)
    cfg = CodecConfig(key_bits=(8, 2, 4), value_bits=(3, 8, 2), group_size=64)
    blob = encode(k, v, cfg)
    header = verify(blob)
    assert header.key_bits == (8, 2, 4) and header.value_bits == (3, 8, 2)
    out = decode(blob, dtype=torch.float32)
    err = (out.keys - k.float()).abs().amax(dim=(1, 2, 3))  # type: ignore[operator]
    assert float(err[0]) < float(err[2]) < float(err[1])  # 8 bits < 4 bits < 2 bits


def test_rope_undo_redo_is_exact_up_to_rounding() -> None:
    k, _ = kv(tokens=64, dim=64, dtype=torch.float32)
    rope = RopeParams(theta=10000.0, rotary_dim=48, scaling=2.0)
    back = redo_rope(undo_rope(k, rope, 1000), rope, 1000)
    torch.testing.assert_close(back, k, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(undo_rope(k, rope, 1000), k)
    assert torch.equal(undo_rope(k, rope, 0)[..., 48:], k[..., 48:])  # unrotated channels stay


def test_pre_rope_keys_round_trip() -> None:
    k, v = kv(tokens=128, dim=64, dtype=torch.float32)
    rope = RopeParams(theta=10000.0, rotary_dim=64)
    blob = encode(k, v, CodecConfig(4, 4, 32, rope=rope), start_position=512)
    header = verify(blob)
    assert header.start_position == 512 and header.rope_theta == 10000.0
    out = decode(blob)
    # error bound in the pre-RoPE frame; a rotation preserves each pair's norm
    pre = undo_rope(k, rope, 512)
    err = (undo_rope(out.keys, rope, 512) - pre).abs()  # type: ignore[arg-type]
    bound = torch.stack([error_bound(pre[i], True, 32, 4) for i in range(2)])
    assert bool((err <= bound + 1e-4).all())


def test_hadamard_values_round_trip() -> None:
    h = hadamard(torch.eye(64))
    torch.testing.assert_close(h @ h, torch.eye(64), atol=1e-5, rtol=0)
    k, v = kv(tokens=64, dim=64, dtype=torch.float32)
    v[:, :, :, 7] *= 30  # an outlier channel: the rotation spreads it
    plain = decode(encode(k, v, CodecConfig(2, 2, 64))).values
    rotated = decode(encode(k, v, CodecConfig(2, 2, 64, hadamard_values=True))).values
    e_plain = float((plain - v).pow(2).mean())  # type: ignore[operator]
    e_rot = float((rotated - v).pow(2).mean())  # type: ignore[operator]
    assert e_rot < e_plain


def test_sink_tokens_are_kept_in_fp16_only_at_position_zero() -> None:
    k, v = kv(tokens=64, dim=64, dtype=torch.float32)
    k[:, :, 0] *= 50  # attention-sink-like outliers
    cfg = CodecConfig(2, 2, 32, sink_tokens=4)
    out = decode(encode(k, v, cfg))
    assert torch.equal(out.keys[:, :, :4], k[:, :, :4].half().float())  # type: ignore[index]
    assert torch.equal(out.values[:, :, :4], v[:, :, :4].half().float())  # type: ignore[index]
    plain = decode(encode(k, v, CodecConfig(2, 2, 32)))
    rest = slice(4, 32)
    e_sink = float((out.keys[:, :, rest] - k[:, :, rest]).abs().mean())  # type: ignore[index]
    e_plain = float((plain.keys[:, :, rest] - k[:, :, rest]).abs().mean())  # type: ignore[index]
    assert e_sink < e_plain  # the outlier token no longer widens its groups
    assert verify(encode(k, v, cfg, start_position=64)).sink_tokens == 0


def test_all_options_together() -> None:
    k, v = kv(tokens=128, dim=64, dtype=torch.bfloat16)
    cfg = CodecConfig(
        (3, 4), (2, 3), 32, rope=RopeParams(10000.0, 64), hadamard_values=True, sink_tokens=2
    )
    out = decode(encode(k, v, cfg), dtype=torch.float32)
    assert out.keys is not None and bool(torch.isfinite(out.keys).all())
    assert float((out.values - v.float()).abs().mean()) < 0.5  # type: ignore[operator]


def test_latent_layout() -> None:
    latent = torch.randn(3, 64, 128, dtype=torch.float16)
    blob = encode_latent(latent, CodecConfig(key_bits=4, group_size=32, sink_tokens=1))
    header = verify(blob)
    assert header.layout == Layout.LATENT and header.value_bits == ()
    out = decode(blob)
    assert out.keys is None and out.latent is not None and out.latent.shape == latent.shape
    for layer in range(3):
        err = (out.latent[layer].float() - latent[layer].float()).abs()[1:]
        bound = error_bound(latent[layer : layer + 1], False, 32, 4)[0][1:]
        assert bool((err <= bound + 2e-3).all())
    assert torch.equal(out.latent[:, 0], latent[:, 0])
    with pytest.raises(CodecError):
        encode_latent(latent, CodecConfig(rope=RopeParams(10000.0, 64)))


def test_decode_to_another_dtype_and_device() -> None:
    k, v = kv()
    out = decode(encode(k, v), device="cpu", dtype=torch.bfloat16)
    assert out.keys.dtype == torch.bfloat16 and out.keys.device.type == "cpu"  # type: ignore[union-attr]
    with pytest.raises(CodecError):
        decode(encode(k, v), dtype=torch.int8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_into_given_tensors_gives_the_same_block(dtype: torch.dtype) -> None:
    """out=: the tensors are filled and returned, equal to a fresh decode, and reusable."""
    k, v = kv(tokens=128, dim=64, dtype=torch.bfloat16)
    cfg = CodecConfig(3, 2, 32, rope=RopeParams(10000.0, 32), hadamard_values=True, sink_tokens=2)
    blobs = [encode(k, v, cfg, start_position=0), encode(v, k, cfg, start_position=128)]
    out = (torch.full(k.shape, float("nan"), dtype=dtype), torch.zeros(k.shape, dtype=dtype))
    for blob in blobs:
        got = decode(blob, out=out)
        want = decode(blob, dtype=dtype)
        assert got.keys is out[0] and got.values is out[1]
        assert torch.equal(out[0], want.keys) and torch.equal(out[1], want.values)  # type: ignore[arg-type]
    latent = torch.randn(3, 64, 128, dtype=torch.float16)
    blob = encode_latent(latent, CodecConfig(key_bits=4, group_size=32, sink_tokens=1))
    target = torch.empty(3, 64, 128, dtype=dtype)
    assert decode(blob, out=(target,)).latent is target
    assert torch.equal(target, decode(blob, dtype=dtype).latent)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decoding_into_a_slice_of_a_longer_cache(backend: str, dtype: torch.dtype) -> None:
    """out= may be cache[:, :, a:b] of a longer sequence (heads apart by its length): each block
    lands in its slice exactly as a fresh decode, and nothing outside the slice is written."""
    k, v = kv(tokens=64, dim=64)
    for cfg in (CodecConfig(2, 2, 32), CodecConfig(3, 2, 32, rope=RopeParams(10000.0, 64),
                                                   hadamard_values=True, sink_tokens=1)):  # fmt: skip
        cache = [torch.full((*k.shape[:2], 192, 64), 7.0, dtype=dtype) for _ in range(2)]
        for i, start in enumerate((64, 0)):
            blob = encode(k + i, v - i, cfg, start_position=start)
            got = decode(blob, out=tuple(c[:, :, start : start + 64] for c in cache),
                         backend=backend)  # type: ignore[arg-type]  # fmt: skip
            want = decode(blob, dtype=dtype, backend=backend)  # type: ignore[arg-type]
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)  # type: ignore[arg-type]
            assert got.keys.data_ptr() == cache[0][:, :, start].data_ptr()  # type: ignore[union-attr]
        assert all(bool((c[:, :, 128:] == 7.0).all()) for c in cache)


def test_unusable_decode_targets_raise_codec_error() -> None:
    k, v = kv(tokens=128, dim=64)
    blob = encode(k, v)
    good = torch.empty(k.shape)
    for out in [
        (good,),  # one tensor for two
        (good, torch.empty(k.shape[0], k.shape[1], 64, 64)),  # half the tokens
        (good, torch.empty(k.shape, dtype=torch.float16)),  # mixed dtypes
        (good, torch.empty(k.shape[::-1]).transpose(0, 3).transpose(1, 2)),  # not contiguous
        (good, torch.empty(*k.shape[1:]).expand(k.shape)),  # every layer the same memory
        (good, torch.empty(*k.shape[:3], 128)[..., :64]),  # rows of D not contiguous
        (torch.empty(k.shape, dtype=torch.int32), torch.empty(k.shape, dtype=torch.int32)),
        (good, None),
    ]:
        with pytest.raises(CodecError):
            decode(blob, out=out)  # type: ignore[arg-type]


def test_encoding_is_deterministic() -> None:
    k, v = kv(seed=11)
    assert encode(k, v) == encode(k.clone(), v.clone())


# ---- binding and MAC (format version 2) ---------------------------------------------------

NS_ID, KEY, OTHER = b"n" * 32, b"k" * 32, b"o" * 32


def test_a_block_is_bound_to_its_namespace_key_and_position() -> None:
    k, v = kv(tokens=64, dim=64)
    cfg = CodecConfig(group_size=32)
    blob = encode(k, v, cfg, start_position=128, binding=Binding(NS_ID, KEY))
    header = verify(blob)
    assert header.version == FORMAT_VERSION == 4
    assert (header.namespace_id, header.key, header.start_position) == (NS_ID, KEY, 128)
    check_bound(header, NS_ID, KEY, 2)  # block 2 of 64 tokens starts at 128
    for namespace_id, key, position in ((OTHER, KEY, 2), (NS_ID, OTHER, 2), (NS_ID, KEY, 1)):
        with pytest.raises(BlockMismatchError):
            check_bound(header, namespace_id, key, position)
    unbound = verify(encode(k, v, cfg))
    assert unbound.namespace_id == unbound.key == UNBOUND
    # the binding changes the header only, not the payload or its size
    assert len(blob) == len(encode(k, v, cfg, start_position=128))
    torch.testing.assert_close(decode(blob).keys, decode(encode(k, v, cfg, 128)).keys)


def test_decode_refuses_a_block_other_than_the_one_expected() -> None:
    k, v = kv(tokens=64, dim=64)
    cfg = CodecConfig(group_size=32)
    blob = encode(k, v, cfg, start_position=64, binding=Binding(NS_ID, KEY))
    shape = (2, 2, 64, 64)
    expect = block_header(Layout.KV, torch.float16, shape, cfg, 64, Binding(NS_ID, KEY))
    assert decode(blob, expect=expect).keys is not None
    others = [
        block_header(Layout.KV, torch.float16, shape, cfg, 64, Binding(NS_ID, OTHER)),  # key
        block_header(Layout.KV, torch.float16, shape, cfg, 64, Binding(OTHER, KEY)),  # namespace
        block_header(Layout.KV, torch.float16, shape, cfg, 0, Binding(NS_ID, KEY)),  # position
        block_header(
            Layout.KV, torch.float16, shape, CodecConfig(4, 4, 32), 64, Binding(NS_ID, KEY)
        ),
        block_header(Layout.KV, torch.float32, shape, cfg, 64, Binding(NS_ID, KEY)),  # dtype
    ]
    for other in others:
        with pytest.raises(BlockMismatchError):
            decode(blob, expect=other)


def test_a_mac_verifies_only_under_the_tenants_secret() -> None:
    k, v = kv(tokens=64, dim=64)
    cfg = CodecConfig(group_size=32)
    secret = b"tenant secret"
    blob = encode(k, v, cfg, binding=Binding(NS_ID, KEY, secret))
    header = verify(blob)  # the tier checks crc and binding without the secret
    assert header.has_flag(Flag.MAC) and len(blob) == header.total_len
    assert header.total_len == header.header_len + header.payload_len + 32
    assert verify(blob, secret) == header
    plain = decode(blob, mac_key=secret)
    torch.testing.assert_close(plain.keys, decode(encode(k, v, cfg)).keys)
    with pytest.raises(ForgedBlockError):
        verify(blob, b"another tenant")
    with pytest.raises(ForgedBlockError):  # a block without a MAC, where one is required
        decode(encode(k, v, cfg, binding=Binding(NS_ID, KEY)), mac_key=secret)
    with pytest.raises(ChecksumError):  # a flipped MAC byte also breaks the crc
        bad = bytearray(blob)
        bad[-1] ^= 1
        verify(bytes(bad), secret)


# ---- bad blobs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob() -> bytes:
    k, v = kv(tokens=64, dim=64)
    return encode(k, v, CodecConfig(group_size=32))


def test_truncated_blobs_raise(blob: bytes) -> None:
    for cut in (0, 3, 10, parse_header(blob).header_len - 1, len(blob) // 2, len(blob) - 1):
        with pytest.raises(TruncatedBlockError):
            decode(blob[:cut])


def test_corrupted_byte_raises_checksum_error(blob: bytes) -> None:
    header_len = parse_header(blob).header_len
    for pos in (header_len, header_len + 100, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(ChecksumError):
            decode(bytes(bad))


def test_checksum_is_zlibs_crc32(blob: bytes) -> None:
    """The stored checksum is plain CRC-32 (zlib's), whichever library computed it: blocks
    sealed where zlib-ng is installed verify where it is not, and the other way round."""
    import zlib

    crc_at = parse_header(blob).header_len - 4
    stored = struct.unpack_from("<I", blob, crc_at)[0]
    assert stored == zlib.crc32(blob[parse_header(blob).header_len :], zlib.crc32(blob[:crc_at]))


def test_corrupted_header_field_raises(blob: bytes) -> None:
    bad = bytearray(blob)
    bad[len(blob) - parse_header(blob).payload_len - 5] ^= 1  # the last value-bits byte
    with pytest.raises(BlockFormatError):
        decode(bytes(bad))


def test_unknown_version_and_magic_raise(blob: bytes) -> None:
    future = blob[:4] + struct.pack("<H", 99) + blob[6:]
    with pytest.raises(UnsupportedVersionError):
        decode(future)
    with pytest.raises(BlockFormatError):
        decode(b"NOPE" + blob[4:])
    with pytest.raises(BlockFormatError):
        decode(blob + b"\0")


# ---- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e6])
def test_non_finite_or_out_of_range_input_is_rejected(bad: float) -> None:
    k, v = kv(dtype=torch.float32)
    k[1, 1, 17, 5] = bad
    for backend in ("cpu", "reference"):
        with pytest.raises(NonFiniteError):
            encode(k, v, CodecConfig(group_size=32), backend=backend)  # type: ignore[arg-type]


def test_bad_shapes_and_configs_raise_codec_error() -> None:
    k, v = kv(tokens=64, dim=64)
    cases = [
        lambda: encode(k[0], v[0]),  # 3-d
        lambda: encode(k, v[:, :, :32]),  # mismatched shapes
        lambda: encode(k.int(), v.int()),  # integer dtype
        lambda: encode(k, v, CodecConfig(group_size=128)),  # 64 tokens, G = 128
        lambda: encode(k[..., :60], v[..., :60], CodecConfig(group_size=32)),  # head_dim 60
        lambda: CodecConfig(key_bits=5),
        lambda: CodecConfig(group_size=48),
        lambda: encode(k, v, CodecConfig(key_bits=(2, 2, 2), group_size=32)),  # 3 for 2 layers
        lambda: encode(k, v, CodecConfig(group_size=32), start_position=-1),
        lambda: encode(k, v, CodecConfig(group_size=32, sink_tokens=64)),
        lambda: encode(k, v, CodecConfig(group_size=32, rope=RopeParams(10000.0, 128))),
        lambda: encode("keys", v),  # type: ignore[arg-type]
    ]
    for case in cases:
        with pytest.raises(CodecError):
            case()


# ---- symmetric value groups (SYMMETRIC_VALUES) ------------------------------------------------

# a block written before the option existed (HEAD 37a6e66, reference backend): kv(2, 2, 64, 64)
# of helpers' recipe under seed 11, K2 V2 G=32, pre-RoPE, Hadamard, 1 sink
OLD_BLOCK_SHA256 = "ba4b890467147ff0ea5654e64be77914e72cdd20380f5e5839cefce6d029dab1"


def _old_style_block() -> bytes:
    g = torch.Generator().manual_seed(11)
    k = (torch.randn(2, 2, 64, 64, generator=g) * 2 + 0.5).half()
    v = torch.randn(2, 2, 64, 64, generator=g).half()
    cfg = CodecConfig(2, 2, 32, rope=RopeParams(10000.0, 64), hadamard_values=True, sink_tokens=1)
    return encode(k, v, cfg, backend="reference")


def test_blocks_without_the_option_are_byte_for_byte_those_of_before() -> None:
    """The option changes nothing for blocks without it: the same bytes as the format before
    it (so those blocks, in any tier, still decode), read on every CPU backend alike."""
    import hashlib

    blob = _old_style_block()
    assert hashlib.sha256(blob).hexdigest() == OLD_BLOCK_SHA256
    header = verify(blob)
    assert not header.has_flag(Flag.SYMMETRIC_VALUES) and header.version == FORMAT_VERSION
    assert not any(s.symmetric for s in header.sections)
    a, b = decode(blob, backend="reference"), decode(blob, backend="cpu")
    assert a.values is not None and b.values is not None
    torch.testing.assert_close(a.values.float(), b.values.float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_values_drop_the_minimums_and_round_trip(bits: int) -> None:
    """SYMMETRIC_VALUES: each value section is codes | scales (no minimums), the block that much
    smaller, the keys' sections as before; values come back within half a step."""
    k, v = kv(tokens=128, dim=64, dtype=torch.float32, seed=bits)
    plain, sym = CodecConfig(2, bits, 64), CodecConfig(2, bits, 64, symmetric_values=True)
    a, b = encode(k, v, plain), encode(k, v, sym)
    ha, hb = verify(a), verify(b)
    assert hb.has_flag(Flag.SYMMETRIC_VALUES) and not ha.has_flag(Flag.SYMMETRIC_VALUES)
    values = hb.tensor_sections(1)
    assert all(s.symmetric and s.mins == s.scales for s in values)
    assert not any(s.symmetric for s in hb.tensor_sections(0))
    assert len(a) - len(b) == sum(2 * s.n_params for s in values)  # 2 * 128 fp16: aligned
    out = decode(b, dtype=torch.float32).values
    assert out is not None
    half = (2**bits - 1) / 2
    step = v.view(2, 2, 128, 1, 64).abs().amax(-1, keepdim=True) / half
    err = (out - v).view(2, 2, 128, 1, 64).abs()
    assert bool((err <= 0.5 * step * (1 + 2**-9) + 1e-6).all())


def test_symmetric_values_are_another_namespace_and_another_expected_header() -> None:
    """The option is in the codec's description (so in the namespace id) and in the header:
    a reader expecting one format refuses a block of the other."""
    k, v = kv(tokens=64, dim=64)
    plain, sym = CodecConfig(2, 2, 32), CodecConfig(2, 2, 32, symmetric_values=True)
    assert plain.describe() != sym.describe() and "symv=1" in sym.describe()
    assert "symv" not in plain.describe()  # namespaces of before unchanged
    shape = (2, 2, 64, 64)
    want_plain = block_header(Layout.KV, torch.float16, shape, plain, 0)
    want_sym = block_header(Layout.KV, torch.float16, shape, sym, 0)
    with pytest.raises(BlockMismatchError):
        decode(encode(k, v, sym), expect=want_plain)
    with pytest.raises(BlockMismatchError):
        decode(encode(k, v, plain), expect=want_sym)
    assert decode(encode(k, v, sym), expect=want_sym).values is not None


def test_a_header_whose_symmetric_flag_was_flipped_is_refused() -> None:
    """Flipping the flag changes the payload's layout: the payload length field no longer
    matches, so parse_header refuses it before the checksum (BlockFormatError); so is a
    DEFLATED flag on a plain payload (a stored length not shorter than the layout), and an
    unknown flag bit."""
    import zlib

    k, v = kv(tokens=64, dim=64)
    for cfg in (CodecConfig(2, 2, 32), CodecConfig(2, 2, 32, symmetric_values=True)):
        blob = bytearray(encode(k, v, cfg))
        flags_at = struct.calcsize("<4sHHBB")  # magic, version, header_len, layout, dtype
        assert blob[flags_at] == parse_header(bytes(blob)).flags
        for flip in (Flag.SYMMETRIC_VALUES, Flag.DEFLATED, 128):
            bad = bytearray(blob)
            bad[flags_at] ^= int(flip)
            header_len = parse_header(bytes(blob)).header_len
            crc = zlib.crc32(bytes(bad[header_len:]), zlib.crc32(bytes(bad[: header_len - 4])))
            bad[header_len - 4 : header_len] = struct.pack("<I", crc)  # a well-sealed forgery
            with pytest.raises(
                BlockFormatError, match=r"payload length|unknown option|deflated payload of"
            ):
                decode(bytes(bad))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_deflated_blocks_decode_to_exactly_the_plain_blocks_tensors(backend: str) -> None:
    """DEFLATED is lossless and outside the namespace: each layout and option set gives the
    same tensors, bit for bit, from a shorter block; a reader expecting the plain header takes
    the deflated block (equality ignores the stored length); MAC and binding as before."""
    rope = RopeParams(theta=10000.0, rotary_dim=64)
    k, v = kv(layers=3, heads=2, tokens=128, dim=64, dtype=torch.float16, seed=3)
    binding = Binding(b"n" * 32, b"k" * 32, b"secret")
    for config in (
        CodecConfig(2, 2, 128),
        CodecConfig(3, 2, 64, rope=rope, hadamard_values=True, sink_tokens=4),
        CodecConfig(2, 2, 128, hadamard_values=True, symmetric_values=True),
    ):
        plain = encode(k, v, config, backend=backend, binding=binding)
        packed = encode(k, v, replace(config, deflate=True), backend=backend, binding=binding)
        assert len(packed) < len(plain) and parse_header(packed).stored_len
        assert config.describe() == replace(config, deflate=True).describe()
        want = block_header(Layout.KV, torch.float16, tuple(k.shape), config, 0, binding)
        a = decode(plain, backend=backend, expect=want, mac_key=b"secret")
        b = decode(packed, backend=backend, expect=want, mac_key=b"secret")
        assert a.keys is not None and b.keys is not None and a.values is not None
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        with pytest.raises(ForgedBlockError):
            decode(packed, backend=backend, mac_key=b"other")
    latent = torch.randn(2, 128, 64, generator=torch.Generator().manual_seed(5)).half()
    one, two = encode_latent(latent), encode_latent(latent, CodecConfig(2, deflate=True))
    assert len(two) < len(one)
    assert torch.equal(decode(one).latent, decode(two).latent)  # type: ignore[arg-type]


def test_a_deflated_block_with_a_broken_stream_is_refused_not_decoded() -> None:
    """A flipped bit inside the stored stream fails the crc (ChecksumError), and no tensors come
    back (streams with a good crc that do not inflate: tests/proto/test_blockformat.py)."""
    k, v = kv(tokens=128, dim=64, seed=4)
    blob = bytearray(encode(k, v, CodecConfig(2, 2, 64, deflate=True)))
    h = parse_header(blob)
    blob[h.header_len + 20] ^= 0x10
    with pytest.raises(ChecksumError):
        decode(bytes(blob))
