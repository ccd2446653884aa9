"""Attention over packed KV on the CPU: a block's sections viewed in place equal what decode
gives, the C loop equals dequantize-then-attend, exact pieces merge to the whole, window scores
match their reference, and bad arguments are refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kvpool.kernels import _cpu_attention, cpu_attention
from kvpool.kernels.attention import (
    attention_reference,
    dequantize,
    exact_attention,
    merge,
    packed_attention,
    window_scores,
    window_scores_reference,
)
from kvpool.kernels.codec import CodecConfig, KeyBasis, decode, encode
from kvpool.kernels.packed_kv import PackedKV, block_layer, block_sinks
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.blockformat import parse_header
from kvpool.proto.errors import CodecError
from tests.kernels.helpers import kv as random_kv

ROPE = RopeParams(10000.0, 64)
CONFIGS = [
    CodecConfig(),
    CodecConfig(key_bits=3, value_bits=4, rope=ROPE, hadamard_values=True, sink_tokens=4),
    CodecConfig(key_bits=(8, 2), value_bits=(2, 3), group_size=64, rope=RopeParams(500.0, 32)),
]


def payload_of(blob: bytes) -> tuple:
    header = parse_header(blob)
    return header, torch.frombuffer(bytearray(blob), dtype=torch.uint8)[header.header_len :]


def packed(config: CodecConfig, tokens: int = 256, seed: int = 0, layer: int = 1):
    k, v = random_kv(layers=2, heads=3, tokens=tokens, dim=64, dtype=torch.float32, seed=seed)
    blob = encode(k, v, config)
    header, payload = payload_of(blob)
    return blob, header, payload, block_layer(header, payload, layer)


@pytest.mark.parametrize("config", CONFIGS, ids=["2bit", "k3v4-rope-hadamard-sinks", "profile"])
def test_a_blocks_sections_in_place_dequantize_to_what_decode_gives(config) -> None:
    blob, header, payload, _ = packed(config)
    block = decode(blob)
    s = header.sink_tokens
    for layer in range(2):
        keys, values = dequantize(block_layer(header, payload, layer))
        torch.testing.assert_close(keys[0, :, s:], block.keys[layer, :, s:], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(
            values[0, :, s:], block.values[layer, :, s:], atol=2e-5, rtol=1e-5
        )
    sink_k, sink_v = block_sinks(header, payload)
    assert sink_k.shape == (2, 3, s, 64)
    if s:
        torch.testing.assert_close(sink_k.float(), block.keys[:, :, :s])
        torch.testing.assert_close(sink_v.float(), block.values[:, :, :s])


def grown(kv: PackedKV, cap: int, positions: torch.Tensor | None = None) -> PackedKV:
    """kv's rows in buffers of `cap` rows (the packed cache's spare capacity), filled with junk."""

    def buf(x: torch.Tensor, rows: int) -> torch.Tensor:
        out = torch.randint(0, 255, (*x.shape[:2], rows, *x.shape[3:]), dtype=torch.uint8)
        out = out.view(x.dtype) if x.dtype == torch.uint8 else (out.float() / 255).to(x.dtype)
        out[:, :, : x.shape[2]] = x
        return out

    g = kv.group
    pos = None
    if positions is not None:
        pos = torch.full((kv.batch, kv.heads, cap), 10**6, dtype=torch.int32)
        pos[:, :, : kv.tokens] = positions
    return replace(
        kv, key_codes=buf(kv.key_codes, cap), key_scales=buf(kv.key_scales, cap // g),
        key_mins=buf(kv.key_mins, cap // g), value_codes=buf(kv.value_codes, cap),
        value_scales=buf(kv.value_scales, cap), value_mins=buf(kv.value_mins, cap),
        positions=pos,
    )  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=["2bit", "k3v4-rope-hadamard-sinks", "profile"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize(("r", "nq", "skip"), [(3, 1, 0), (1, 2, 4), (3, 4, 130), (3, 8, 17)])
@pytest.mark.parametrize("workers", [1, 2])
def test_the_c_loop_equals_dequantize_then_attend(config, layer, r, nq, skip, workers) -> None:
    *_, kv = packed(config, layer=layer)
    q = torch.randn(1, 3 * r, nq, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    want_o, want_lse = attention_reference(q, kv, skip)
    got_o, got_lse = cpu_attention.packed_attention(q, kv, skip, workers=workers)
    torch.testing.assert_close(got_o, want_o, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-5, rtol=1e-5)
    # against attention over the decoded block, by a route that shares nothing with the above
    # (past the sinks, whose packed rows hold filler codes)
    block = decode(encode(*random_kv(2, 3, 256, 64, torch.float32, 0), config))
    s = max(skip, config.sink_tokens)
    keys, values = block.keys[layer, None, :, s:], block.values[layer, None, :, s:]
    sdpa = F.scaled_dot_product_attention(q, keys, values, scale=1.0, enable_gqa=True)
    torch.testing.assert_close(
        cpu_attention.packed_attention(q, kv, s)[0], sdpa, atol=5e-5, rtol=1e-4
    )


def check_scattered_positions(kv: PackedKV, atol: float) -> None:
    """kv's 256 rows at scattered positions per head, in buffers with spare capacity: the C
    loop gives the reference's output, and the positions matter (at the row index the scores
    differ)."""
    perm = torch.stack([torch.randperm(5000, generator=torch.Generator().manual_seed(h))[:256]
                        for h in range(3)]).to(torch.int32)[None]  # fmt: skip
    wide = grown(replace(kv, positions=perm.contiguous()), 512, perm)
    q = torch.randn(1, 9, 2, 64) * 0.3
    want = attention_reference(q, wide, 4)
    got = cpu_attention.packed_attention(q, wide, 4)
    torch.testing.assert_close(got[0], want[0], atol=atol, rtol=1e-4)
    plain = attention_reference(q, grown(kv, 512), 4)
    assert (plain[0] - got[0]).abs().max() > 1e-3


def test_spare_capacity_and_per_head_positions() -> None:
    *_, kv = packed(CONFIGS[1])
    check_scattered_positions(kv, atol=2e-5)


def test_a_block_of_batch_two_and_no_counting_rows() -> None:
    *_, kv = packed(CONFIGS[0])
    two = replace(kv, **{f: torch.cat([getattr(kv, f)] * 2) for f in (
        "key_codes", "key_scales", "key_mins", "value_codes", "value_scales", "value_mins")})  # fmt: skip
    q = torch.randn(2, 6, 1, 64)
    torch.testing.assert_close(
        packed_attention(q, two), attention_reference(q, two), atol=2e-5, rtol=1e-4
    )
    o, lse = packed_attention(q, two, skip=256)
    assert bool((o == 0).all()) and bool(torch.isinf(lse).all())


def test_exact_pieces_merge_into_the_whole() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 3, 32, generator=g)
    k, v = torch.randn(1, 2, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)
    whole = exact_attention(q, k, v, causal=3)
    mask = torch.ones(3, 40, dtype=torch.bool).tril(37)
    torch.testing.assert_close(
        whole[0], F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    )  # fmt: skip
    parts = [
        exact_attention(q, k[:, :, :25], v[:, :, :25]),
        exact_attention(q, k[:, :, 25:], v[:, :, 25:], causal=3),
    ]
    torch.testing.assert_close(merge(parts), whole[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("hq", "h", "w", "n", "block"), [(3, 1, 8, 100, 32), (6, 2, 16, 300, 64), (4, 2, 20, 20, 7)]
)
def test_window_scores_blockwise_equal_the_reference(hq, h, w, n, block) -> None:
    g = torch.Generator().manual_seed(hq)
    q = torch.randn(2, hq, w, 32, generator=g) * 0.5
    keys = torch.randn(2, h, n, 32, generator=g)
    want = window_scores_reference(q, keys)
    torch.testing.assert_close(window_scores(q, keys, block=block), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want.sum(-1), torch.full(want.shape[:2], float(hq // h * w)))
    assert float(want[..., 0].min()) > 0  # the first key is seen by every window query
    with pytest.raises(CodecError, match="do not match"):
        window_scores(q, torch.randn(2, 5, n, 32))  # hq is not a multiple of 5 kv heads
    with pytest.raises(CodecError, match="longer than the prompt"):
        window_scores(torch.randn(1, hq, n + 1, 32), keys[:1])


def test_bad_arguments_are_refused() -> None:
    *_, kv = packed(CONFIGS[0])
    with pytest.raises(CodecError, match="key_codes"):
        replace(kv, key_codes=kv.key_codes[:, :, :, :8].contiguous())
    with pytest.raises(CodecError, match="multiples of G"):
        replace(kv, tokens=100)
    with pytest.raises(CodecError, match="tokens in a packed buffer"):
        replace(kv, tokens=384)
    with pytest.raises(CodecError, match="heads"):
        packed_attention(torch.randn(1, 4, 1, 64), kv)
    with pytest.raises(CodecError, match="skip"):
        packed_attention(torch.randn(1, 3, 1, 64), kv, skip=300)
    with pytest.raises(CodecError, match="cannot run"):
        packed_attention(torch.randn(1, 3, 1, 64), kv, backend="cuda-only")
    basis = KeyBasis(
        torch.zeros(2, 3, 64), torch.eye(64).expand(2, 3, 64, 64).contiguous(), (2,) * 16
    )
    k, v = random_kv(2, 3, 128, 64, torch.float32)
    h2, p2 = payload_of(encode(k, v, CodecConfig(key_basis=basis)))
    with pytest.raises(CodecError, match="key basis"):
        block_layer(h2, p2, 0)
    keys = (
        kv.key_codes.data_ptr(),
        kv.key_scales.data_ptr(),
        kv.key_mins.data_ptr(),
        3,
        256,
        256,
        64,
        128,
        2,
    )
    vals = (
        kv.value_codes.data_ptr(),
        kv.value_scales.data_ptr(),
        kv.value_mins.data_ptr(),
        3,
        256,
        256,
        64,
        64,
        2,
    )
    out = torch.empty(9, 64), torch.empty(9), torch.empty(9)
    q = torch.randn(9, 64)
    # q, RQ, Q, t0, t1, skip, hadamard, acc, max, sum, exact segments, cos, sin, rotary, positions
    head = (q.data_ptr(), 3, 1, 0, 256, 0, 0, *(x.data_ptr() for x in out))
    window = torch.randn(3, 8, 64)
    segment = (window.data_ptr(), window.data_ptr(), 3, 8, 8 * 64, 1)
    _cpu_attention.attend(keys, vals, *head, (segment,), 0, 0, 0, 0)  # valid
    assert bool(torch.isfinite(out[0]).all())
    for bad_keys, bad_vals, bad_head, tail, msg in [
        ((*keys[:8], 5), vals, head, ((), 0, 0, 0, 0), "bits"),
        ((*keys[:6], 40, *keys[7:]), vals, head, ((), 0, 0, 0, 0), "packed shape"),
        (keys, (*vals[:3], 2, *vals[4:]), head, ((), 0, 0, 0, 0), "do not match"),
        (keys, vals, (*head[:2], 2, *head[3:]), ((), 0, 0, 0, 0), "do not match"),  # RQ % Q
        (keys, vals, (*head[:4], 300, *head[5:]), ((), 0, 0, 0, 0), "token range"),
        (keys, vals, (*head[:3], 10, 5, *head[5:]), ((), 0, 0, 0, 0), "token range"),
        (keys, vals, head, ((), 1, 0, 64, 0), "RoPE"),
        (keys, vals, head, ((), 1, 1, 64, 0, 1, 1, 10), "transposed"),  # span < t1
        (keys, vals, head, ((segment,) * 3, 0, 0, 0, 0), "at most 2"),
        (keys, vals, head, (((*segment[:4], 64, 1),), 0, 0, 0, 0), "exact segment"),  # overlap
        (keys, vals, head, (((*segment[:5], 2),), 0, 0, 0, 0), "exact segment"),  # causal > Q
        (keys, vals, head, (((*segment[:2], 7, *segment[3:]),), 0, 0, 0, 0), "exact segment"),
    ]:
        with pytest.raises(ValueError, match=msg):
            _cpu_attention.attend(bad_keys, bad_vals, *bad_head, *tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("nq", "workers"), [(1, 1), (3, 1), (2, 2)])
def test_exact_segments_join_the_packed_rows_in_one_softmax(dtype, nq, workers) -> None:
    *_, kv = packed(CONFIGS[1])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 9, nq, 64, generator=g) * 0.3
    sinks = [torch.randn(1, 3, 4, 64, generator=g).to(dtype) for _ in range(2)]
    window = [
        torch.randn(1, 3, 40, 64, generator=g).to(dtype)[:, :, 7:] for _ in range(2)
    ]  # a slice
    exact = [(*sinks, 0), (*window, nq)]
    parts = [
        attention_reference(q, kv, 4),
        exact_attention(q, *sinks),
        exact_attention(q, *window, causal=nq),
    ]
    want = merge(parts)
    got, lse = cpu_attention.packed_attention(q, kv, 4, exact, workers=workers)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(
        lse, torch.logsumexp(torch.stack([p[1] for p in parts]), 0), atol=3e-5, rtol=1e-5
    )
    ref, _ = packed_attention(q, kv, 4, exact, backend="reference")
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-4)
    # nothing packed counts: the exact rows alone
    only, _ = cpu_attention.packed_attention(q, kv, 256, exact)
    torch.testing.assert_close(only, merge(parts[1:]), atol=3e-5, rtol=1e-4)
    with pytest.raises(CodecError, match="does not fit"):
        packed_attention(q, kv, 4, [(torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64), 0)])


def test_verified_payload_checks_what_decode_checks() -> None:
    from kvpool.kernels.codec import block_header, verified_payload
    from kvpool.proto.blockformat import Layout
    from kvpool.proto.errors import BlockMismatchError, ChecksumError

    k, v = random_kv(2, 3, 128, 64, torch.float32)
    blob = encode(k, v, CONFIGS[0])
    header, payload = verified_payload(blob)
    assert (
        payload.numel() == header.payload_len
        and bytes(payload.numpy()) == blob[header.header_len :]
    )
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(ChecksumError):
        verified_payload(bytes(bad))
    other = block_header(Layout.KV, torch.float32, (2, 3, 128, 64), CONFIGS[0], 128)
    with pytest.raises(BlockMismatchError):
        verified_payload(blob, expect=other)


# ---- codec v2: keys in a key basis ------------------------------------------------------------

# one width per 8 components: runs of 8, 16 and 24 (split 16 + 8), a dropped chunk between
# stored ones, and a dropped tail
BASIS_WIDTHS = (*(8, 4, 3, 3, 0, 2, 2, 0), *(4, 4, 3, 3, 3, 2, 0, 0))


def basis_config(predict: bool = False, **options) -> CodecConfig:
    g = torch.Generator().manual_seed(7)
    rotation, _ = torch.linalg.qr(torch.randn(2, 3, 64, 64, generator=g))
    maps = ()
    if predict:
        maps = (torch.randn(1, 3, 129, 64, generator=g) * 0.05,
                torch.randn(1, 3, 193, 64, generator=g) * 0.05)  # fmt: skip
    basis = KeyBasis(torch.randn(2, 3, 64, generator=g), rotation.contiguous(), BASIS_WIDTHS, *maps)
    return CodecConfig(key_basis=basis, **options)


BASIS_CONFIGS = [
    basis_config(),
    basis_config(rope=ROPE, hadamard_values=True, sink_tokens=4, value_bits=3),
    basis_config(rope=RopeParams(500.0, 32), group_size=64),
]
ISAS = ["x86-64-v4", "x86-64-v3", "x86-64"]


@pytest.mark.parametrize("config", BASIS_CONFIGS, ids=["plain", "rope-hadamard-sinks", "partial"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize(
    ("r", "nq", "skip", "workers"), [(3, 1, 4, 1), (1, 2, 0, 2), (3, 4, 70, 1)]
)
def test_keys_in_a_basis_attend_as_their_decoded_block(config, layer, r, nq, skip, workers) -> None:
    """A v2 block's layer (no maps) viewed packed: dequantize equals decode, and the C loop (each
    key row rebuilt from its components, RoPE redone) equals decode-then-SDPA, on every ISA."""
    k, v = random_kv(2, 3, 256, 64, torch.float32, 0)
    blob = encode(k, v, config)
    header, payload = payload_of(blob)
    kv = block_layer(header, payload, layer, config.key_basis)
    assert kv.key_bits == 0 and kv.components == 48  # 6 of 8 chunks stored in each layer
    block = decode(blob, key_basis=config.key_basis)
    s = max(skip, config.sink_tokens)
    keys, values = dequantize(kv)
    torch.testing.assert_close(keys[0, :, s:], block.keys[layer, :, s:], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(values[0, :, s:], block.values[layer, :, s:], atol=2e-5, rtol=1e-5)
    q = torch.randn(1, 3 * r, nq, 64, generator=torch.Generator().manual_seed(1)) * 0.3
    sdpa = F.scaled_dot_product_attention(q, block.keys[layer, None, :, s:],
                                          block.values[layer, None, :, s:], scale=1.0,
                                          enable_gqa=True)  # fmt: skip
    want = attention_reference(q, kv, s)
    try:
        for isa in ISAS:
            cpu_attention.use_isa(isa)
            got = cpu_attention.packed_attention(q, kv, s, workers=workers)
            torch.testing.assert_close(got[0], sdpa, atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(got[1], want[1], atol=5e-5, rtol=1e-5)
    finally:
        cpu_attention.use_isa(cpu_attention.ISA)


def test_keys_in_a_basis_with_positions_and_spare_capacity() -> None:
    config = BASIS_CONFIGS[1]
    header, payload = payload_of(encode(*random_kv(2, 3, 256, 64, torch.float32, 0), config))
    check_scattered_positions(block_layer(header, payload, 1, config.key_basis), atol=3e-5)


def test_keys_in_a_basis_are_refused_where_they_cannot_be_read() -> None:
    config = BASIS_CONFIGS[0]
    header, payload = payload_of(encode(*random_kv(2, 3, 128, 64, torch.float32, 0), config))
    with pytest.raises(CodecError, match="key basis"):
        block_layer(header, payload, 0)  # no basis given
    from kvpool.proto.errors import BlockMismatchError

    with pytest.raises(BlockMismatchError):
        block_layer(header, payload, 0, basis_config(predict=True).key_basis)  # another basis
    predicted = basis_config(predict=True)
    h2, p2 = payload_of(encode(*random_kv(2, 3, 128, 64, torch.float32, 0), predicted))
    with pytest.raises(CodecError, match="decoded, not attended"):
        block_layer(h2, p2, 1, predicted.key_basis)
    kv = block_layer(header, payload, 0, config.key_basis)
    with pytest.raises(CodecError, match="key_runs, key_basis"):
        replace(kv, key_basis=None)
    with pytest.raises(CodecError, match="expected"):
        replace(kv, key_basis=(kv.key_basis[0], kv.key_basis[1][:, :8].contiguous()))
    with pytest.raises(CodecError, match="key run"):
        replace(kv, key_runs=((12, 2), *kv.key_runs[1:]))
    # the C loop's own checks
    mean, rows = kv.key_basis
    keys = (kv.key_codes.data_ptr(), kv.key_scales.data_ptr(), kv.key_mins.data_ptr(), 3, 128,
            128, 64, 128, 0)  # fmt: skip
    vals = (kv.value_codes.data_ptr(), kv.value_scales.data_ptr(), kv.value_mins.data_ptr(), 3,
            128, 128, 64, 64, 2)  # fmt: skip
    out = torch.empty(3, 64), torch.empty(3), torch.empty(3)
    q = torch.randn(3, 64)
    head = (q.data_ptr(), 1, 1, 0, 128, 0, 0, *(x.data_ptr() for x in out), ())
    basis = (mean.data_ptr(), rows.data_ptr(), kv.components, kv.key_runs)
    _cpu_attention.attend(keys, vals, *head, 0, 0, 0, 0, 0, 0, 0, 1, basis)  # valid
    torch.testing.assert_close(out[0][None, :, None], attention_reference(q[None, :, None], kv)[0],
                               atol=2e-5, rtol=1e-4)  # fmt: skip
    for bad_keys, bad_basis, msg in [
        (keys, None, "0 bits come with a basis"),
        ((*keys[:8], 2), basis, "0 bits come with a basis"),
        (keys, (*basis[:2], 40, basis[3]), "add up"),
        (keys, (*basis[:2], 48, ((48, 5),)), "8k components"),
        (keys, (*basis[:2], 48, ((44, 2), (4, 2))), "8k components"),
        (keys, (*basis[:2], 80, ((80, 2),)), "bad key basis"),  # more than head_dim
    ]:
        with pytest.raises(ValueError, match=msg):
            _cpu_attention.attend(bad_keys, vals, *head, 0, 0, 0, 0, 0, 0, 0, 1, bad_basis)


def test_the_isa_is_chosen_as_asked() -> None:
    """use_isa caps the loop's instruction set at the level asked (never above the CPU's) and
    says which runs; the results agree across levels (test_keys_in_a_basis_attend_...)."""
    best = cpu_attention.use_isa(None)
    try:
        assert best in ISAS
        assert cpu_attention.use_isa("x86-64") == "x86-64"
        assert cpu_attention.use_isa("x86-64-v3") == ("x86-64-v3" if best != "x86-64" else best)
        assert cpu_attention.use_isa("x86-64-v4") == best
        with pytest.raises(ValueError, match="unknown ISA"):
            cpu_attention.use_isa("avx1024")
    finally:
        cpu_attention.use_isa(cpu_attention.ISA)
