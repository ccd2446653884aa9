"""The block format's SYMMETRIC_VALUES layout, read with the contract alone (no torch): what the
tier checks of a block."""

import pytest

from kvpool.proto.blockformat import (
    BlockHeader,
    DType,
    Flag,
    Layout,
    parse_header,
    seal,
    verify,
)
from kvpool.proto.errors import BlockFormatError


def header(flags: int = 0, layout: Layout = Layout.KV) -> BlockHeader:
    kv = layout == Layout.KV
    return BlockHeader(
        layout=layout, dtype=DType.FLOAT16, layers=3, heads=2 if kv else 1, tokens=128,
        head_dim=64, group_size=64, key_bits=(2, 3, 4), value_bits=(2, 2, 8) if kv else (),
        flags=flags,
    )  # fmt: skip


@pytest.mark.parametrize("layout", [Layout.KV, Layout.LATENT])
def test_symmetric_value_sections_hold_no_minimums(layout: Layout) -> None:
    """Per-token sections lose their minimums (mins == scales); key sections keep theirs; the
    payload is shorter by exactly the minimums' (aligned) bytes."""
    plain, sym = header(0, layout), header(Flag.SYMMETRIC_VALUES, layout)
    per_token = [s for s in sym.sections if not s.is_key]
    assert per_token and all(s.symmetric and s.mins == s.scales for s in per_token)
    assert all(not s.symmetric and s.mins > s.scales for s in sym.sections if s.is_key)
    assert not any(s.symmetric for s in plain.sections)
    saved = sum((2 * s.n_params + 15) // 16 * 16 for s in per_token)
    assert plain.payload_len - sym.payload_len == saved > 0
    last = sym.sections[-1]
    assert last.scales + (2 * last.n_params + 15) // 16 * 16 == sym.sinks_offset


def test_a_symmetric_block_parses_back_and_the_flag_is_checked() -> None:
    sym = header(Flag.SYMMETRIC_VALUES)
    blob = seal(sym, bytes(sym.payload_len))
    assert verify(blob) == sym and parse_header(blob).has_flag(Flag.SYMMETRIC_VALUES)
    with pytest.raises(BlockFormatError, match="unknown option flags"):
        header(Flag.SYMMETRIC_VALUES | 64)


def skewed_payload(n: int, seed: int = 7) -> bytes:
    """Bytes of 2-bit codes whose middle levels are the common ones, as min/max groups give."""
    import random

    rng = random.Random(seed)
    codes = rng.choices(range(4), weights=(1, 8, 8, 1), k=4 * n)
    return bytes(
        c0 | c1 << 2 | c2 << 4 | c3 << 6 for c0, c1, c2, c3 in zip(*[iter(codes)] * 4, strict=True)
    )


def test_a_deflated_block_is_shorter_and_gives_back_the_same_payload() -> None:
    from kvpool.proto.blockformat import payload_bytes

    plain = header(Flag.SYMMETRIC_VALUES)
    payload = skewed_payload(plain.payload_len)
    blob, raw = seal(plain, payload, deflate=True), seal(plain, payload)
    got = verify(blob)
    assert len(blob) < 0.9 * len(raw) and got.stored_len == got.total_len - got.header_len
    assert got == plain and got.stored_payload_len < got.payload_len  # equality ignores it
    assert bytes(payload_bytes(blob, got)) == payload == bytes(payload_bytes(raw, verify(raw)))
    assert blob[10] & Flag.DEFLATED and not raw[10] & Flag.DEFLATED  # the wire's flags byte
    signed = header(Flag.MAC)
    with_mac = seal(signed, skewed_payload(signed.payload_len), b"secret", deflate=True)
    assert verify(with_mac, b"secret") == signed and len(with_mac) < 0.9 * signed.total_len
    incompressible = bytes(range(256)) * (plain.payload_len // 256 + 1)
    stored = seal(plain, incompressible[: plain.payload_len], deflate=True)  # kept as it is
    assert parse_header(stored).stored_len == 0 and len(stored) == plain.total_len


def test_deflated_payloads_that_do_not_inflate_to_the_layout_are_refused() -> None:
    """A stream that is corrupt, ends early, inflates to more than the layout (a bomb: only the
    layout's bytes are ever inflated) or has bytes after its end; a stored length that is not
    shorter than the layout. Each is a BlockFormatError, after the crc passes."""
    import zlib

    from kvpool.proto.blockformat import crc32, payload_bytes

    plain = header()

    def forged(stream: bytes) -> bytes:  # a block whose crc is right for `stream`
        blob = seal(plain, skewed_payload(plain.payload_len), deflate=True)
        h = parse_header(blob)
        assert h.stored_len
        new = replace_stored(bytes(blob[: h.header_len - 4]), len(stream))
        return new + crc32(stream, crc32(new)).to_bytes(4, "little") + stream

    def deflate(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()

    good = deflate(skewed_payload(plain.payload_len))
    bomb = deflate(bytes(64 * plain.payload_len))
    for stream, why in (
        (good[:-9], "does not inflate"),  # ends early
        (bytes([good[0] ^ 0x06]) + good[1:], "corrupt|does not inflate"),
        (bomb, "does not inflate"),
        (good + b"\x00\x01", "after the end"),
        (deflate(skewed_payload(plain.payload_len - 16)), "does not inflate"),  # too short
    ):
        blob = forged(stream)
        h = verify(blob)  # the crc is right: the stream itself is what is wrong
        with pytest.raises(BlockFormatError, match=why):
            payload_bytes(blob, h)
    with pytest.raises(BlockFormatError, match="deflated payload of"):
        verify(forged(bytes(plain.payload_len)))  # not shorter than the layout


def replace_stored(head: bytes, stored: int) -> bytes:
    """The header bytes (up to the crc) with the payload length field set to `stored`."""
    from kvpool.proto.blockformat import _FIXED

    fields = list(_FIXED.unpack_from(head))
    fields[16] = stored
    return _FIXED.pack(*fields) + head[_FIXED.size :]
