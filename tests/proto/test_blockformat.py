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
