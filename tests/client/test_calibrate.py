"""Calibration: the greedy allocator, exact bit accounting, profiles as codecs, a real model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvpool.calibrate import (
    Profile,
    allocate,
    bits_per_value,
    default_path,
    profile_codec,
    retarget,
)
from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.kernels.transforms import RopeParams
from kvpool.proto.errors import CodecError

LAYERS, HEADS, DIM = 8, 3, 64
WIDTHS = (2, 3, 4)
ROPE = RopeParams(100000.0, 64)


def cost(key_bits, value_bits) -> float:
    codec = CodecConfig(tuple(key_bits), tuple(value_bits), 128, rope=ROPE, sink_tokens=1)
    return bits_per_value(codec, HEADS, DIM, context_tokens=1024)


def synthetic_loss() -> dict[str, list[list[float]]]:
    """Key layer i costs (i+1)^2 at 2 bits; values are 10x less sensitive; each extra bit
    divides the loss by about 5, as quantization error does."""
    key = [[(i + 1) ** 2 * f for f in (1.0, 0.2, 0.04)] for i in range(LAYERS)]
    value = [[0.1 * (LAYERS - i) * f for f in (1.0, 0.2, 0.04)] for i in range(LAYERS)]
    return {"key": key, "value": value}


def test_bits_per_value_is_exact_from_the_block_format() -> None:
    codec = CodecConfig((2, 3, 4, 8), (2, 2, 3, 4), 128, rope=ROPE, sink_tokens=4)
    g = torch.Generator().manual_seed(0)
    nbytes = 0
    for start in (0, 256):
        k = torch.randn(4, HEADS, 256, DIM, generator=g)
        nbytes += len(encode(k, k.clone(), codec, start_position=start))
    want = nbytes * 8 / (2 * 4 * HEADS * 512 * DIM)
    assert bits_per_value(codec, HEADS, DIM, context_tokens=512) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("target", [2.5, 16 / 6, 3.0])
def test_allocation_fills_the_budget_and_follows_sensitivity(target: float) -> None:
    loss = synthetic_loss()
    key_bits, value_bits = allocate(loss, WIDTHS, cost, target)
    achieved = cost(key_bits, value_bits)
    assert achieved <= target
    # no single upgrade still fits: the budget is used up to the granularity of the format
    for bits in (key_bits, value_bits):
        for layer, b in enumerate(bits):
            if b < WIDTHS[-1]:
                up = list(bits)
                up[layer] = WIDTHS[WIDTHS.index(b) + 1]
                trial = (up, value_bits) if bits is key_bits else (key_bits, up)
                assert cost(*trial) > target
    # more sensitive keys never get fewer bits; the most sensitive got more than the least
    assert key_bits == sorted(key_bits)
    assert key_bits[-1] > key_bits[0]
    assert sum(key_bits) >= sum(value_bits)


def test_allocation_rejects_an_impossible_target() -> None:
    with pytest.raises(CodecError):
        allocate(synthetic_loss(), WIDTHS, cost, 2.0)


def test_a_width_whose_measured_loss_is_higher_is_never_preferred() -> None:
    loss = synthetic_loss()
    loss["key"][LAYERS - 1] = [5.0, 6.0, 7.0]  # noisy: more bits measured worse, so no gain
    key_bits, _ = allocate(loss, WIDTHS, cost, 2.5)
    assert key_bits[LAYERS - 1] == 2 and max(key_bits) > 2


def profile(**changes) -> Profile:
    loss = synthetic_loss()
    key_bits, value_bits = allocate(loss, WIDTHS, cost, 2.6)
    p = Profile(
        model="org/model", layers=LAYERS, kv_heads=HEADS, head_dim=DIM, group_size=128,
        sink_tokens=1, hadamard_values=True, rope=dataclasses.asdict(ROPE), key_bits=key_bits,
        value_bits=value_bits, target_bits=2.6, achieved_bits=cost(key_bits, value_bits),
        context_tokens=1024, block_tokens=256, widths=list(WIDTHS), sensitivity=loss,
    )  # fmt: skip
    return dataclasses.replace(p, **changes)


def test_profile_round_trips_to_a_per_layer_codec(tmp_path) -> None:
    p = profile()
    loaded = Profile.load(p.save(tmp_path / "p.json"))
    assert loaded == p
    codec = profile_codec(loaded)
    assert codec.key_bits == tuple(p.key_bits) and codec.value_bits == tuple(p.value_bits)
    assert codec.rope == ROPE and codec.hadamard_values and codec.sink_tokens == 1
    assert ",".join(map(str, p.key_bits)) in codec.describe()
    assert bits_per_value(codec, HEADS, DIM) == pytest.approx(p.achieved_bits)
    no_rope = profile_codec(profile(rope=None))
    assert no_rope.rope is None


def test_a_different_profile_is_a_different_namespace() -> None:
    a = profile()
    b = retarget(a, 3.0)
    assert b.key_bits != a.key_bits and b.achieved_bits <= 3.0
    ids = {
        namespace_for("org/model", LAYERS, HEADS, DIM, torch.float16, profile_codec(p)).id
        for p in (a, b)
    }
    assert len(ids) == 2


def test_default_path_names_model_options_and_target() -> None:
    path = default_path(profile(target_bits=2.5))
    assert path.parent.name == "profiles" and path.name == "model-g128-s1-t2.5.json"


def test_calibrating_a_real_model() -> None:
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from kvpool import calibrate as cal
    from kvpool.models import load

    try:
        model, tokenizer = load()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ids = tokenizer(topics["formatstrings"]).input_ids
    p = cal.calibrate(
        model, ids, target_bits=2.6, widths=(2, 3), samples=1, prefix_tokens=256,
        continuation_tokens=16, context_tokens=256, block_tokens=256,
    )  # fmt: skip
    layers = model.config.num_hidden_layers
    assert p.layers == layers and len(p.key_bits) == len(p.value_bits) == layers
    assert p.achieved_bits <= 2.6
    assert p.achieved_bits == pytest.approx(
        bits_per_value(cal.profile_codec(p), p.kv_heads, p.head_dim, 256, 256)
    )
    low = {t: [row[0] for row in p.sensitivity[t]] for t in ("key", "value")}
    assert all(x >= 0 for t in low for x in low[t])
    most = max(range(layers), key=lambda i: low["key"][i])
    least = min(range(layers), key=lambda i: low["key"][i])
    assert p.key_bits[most] > p.key_bits[least]
    assert p.sample["kl_profile"] < p.sample["kl_all_2_bit"]


def test_bands_follow_the_variance_within_the_budget() -> None:
    from kvpool.calibrate import allocate_bands

    dim = 64
    falling = torch.logspace(2, -4, dim)  # a layer whose components matter less and less
    variance = torch.stack([falling, falling * 100, torch.zeros(dim)])
    widths = allocate_bands(variance, key_bits=2.0, group_size=128)
    assert len(widths) == 3 * dim // 8
    for layer in range(3):
        w = widths[layer * 8 : (layer + 1) * 8]
        assert list(w) == sorted(w, reverse=True)  # wider first, where the variance is
        bits = (sum(w) * 8 + 8 * sum(1 for x in w if x) * 32 / 128) / dim
        assert bits <= 2.0
    assert widths[16:] == (0,) * 8  # nothing spent on a layer with nothing to store
    assert max(widths[:8]) > 2 and min(widths[:8]) == 0  # unequal widths: water-filling


def test_a_key_basis_from_a_real_model_beats_per_channel_2_bit() -> None:
    """calibrate_basis on one text: the basis fits the model; keys of another text stored in it
    at 2.0 bits per value come back closer than per-channel 2-bit pre-RoPE keys (2.25 bits)."""
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from kvpool import calibrate as cal
    from kvpool.hf import codec_for, kv_from_cache, model_layout
    from kvpool.kernels.codec import decode

    try:
        model, tokenizer = load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    basis = cal.calibrate_basis(
        model, tokenizer(topics["compound"]).input_ids, key_bits=2.0, windows=2,
        window_tokens=512,
    )  # fmt: skip
    layers, heads, dim = model_layout(model)
    assert basis.mean.shape == (layers, heads, dim) and basis.bits_per_key < 2.0
    with pytest.raises(CodecError, match="at least 512"):  # not one window of sample
        cal.calibrate_basis(model, list(range(100)), window_tokens=512)
    ids = torch.tensor(tokenizer(topics["types"]).input_ids[:256])[None]
    with torch.inference_mode():
        keys, values = kv_from_cache(model(ids, use_cache=True).past_key_values, 256)
    plain = codec_for(model, 2, 2, sink_tokens=1)
    v2 = dataclasses.replace(plain, key_basis=basis)
    errors = []
    for codec in (plain, v2):
        got = decode(encode(keys, values, codec), key_basis=codec.key_basis).keys
        assert got is not None
        errors.append(float((got - keys)[:, :, 1:].norm() / keys[:, :, 1:].norm()))
    assert errors[1] < 0.8 * errors[0], errors


def test_query_weights_spend_the_key_bits_where_the_queries_look() -> None:
    """Two bases at 2.0 bits from one text, widths allocated with and without the queries'
    energy: on another text, the error the decoded keys put into the attention logits q . k
    (the model's own queries and keys, after RoPE) is smaller with the weights."""
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from kvpool import calibrate as cal
    from kvpool.hf import codec_for, kv_from_cache, model_layout, rope_params
    from kvpool.kernels.codec import decode
    from kvpool.kernels.transforms import redo_rope

    try:
        model, tokenizer = load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sample = tokenizer(topics["compound"]).input_ids
    bases = [
        cal.calibrate_basis(model, sample, key_bits=2.0, windows=2, window_tokens=512,
                            query_weighted=weighted)
        for weighted in (False, True)
    ]  # fmt: skip
    assert bases[0].widths != bases[1].widths and bases[0].id != bases[1].id
    _, kv_heads, dim = model_layout(model)
    queries: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(lambda _m, _i, out: queries.append(out[0]))
        for layer in model.model.layers
    ]
    ids = torch.tensor(tokenizer(topics["types"]).input_ids[:256])[None]
    try:
        with torch.inference_mode():
            keys, values = kv_from_cache(model(ids, use_cache=True).past_key_values, 256)
    finally:
        for h in hooks:
            h.remove()
    rope = rope_params(model)
    assert rope is not None
    q = torch.stack([x.reshape(256, -1, dim).transpose(0, 1) for x in queries]).float()
    q = redo_rope(q, rope, 0)  # [L, H_q, T, D], as attention sees them
    errors = []
    for basis in bases:
        codec = dataclasses.replace(codec_for(model, 2, 2, sink_tokens=1), key_basis=basis)
        got = decode(encode(keys, values, codec), key_basis=basis).keys
        assert got is not None
        err = (got - keys).float().repeat_interleave(q.shape[1] // kv_heads, dim=1)
        errors.append(float((q @ err.transpose(-1, -2)).pow(2).mean()))
    assert errors[1] < 0.97 * errors[0], errors  # measured: 0.93 (15 of 30 layers better)


def test_predicted_layers_from_a_real_model_come_back_closer() -> None:
    """A predicting basis (calibrate_basis(predict=True)) from the basis sample: on another text, at
    the same key widths budget and the same 2-bit values, blocks hold about as many bytes and
    decode to keys and values closer to the model's than the plain basis's blocks."""
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from kvpool import calibrate as cal
    from kvpool.hf import codec_for, kv_from_cache
    from kvpool.kernels.codec import decode, encode

    try:
        model, tokenizer = load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sample = cal.basis_sample(tokenizer)  # the maps need a few thousand tokens to fit
    bases = [
        cal.calibrate_basis(model, sample, key_bits=2.0, windows=4, predict=predict)
        for predict in (False, True)
    ]  # fmt: skip
    assert not bases[0].predicted and bases[1].predicted
    ids = torch.tensor(tokenizer(topics["formatstrings"]).input_ids[:256])[None]
    with torch.inference_mode():
        keys, values = kv_from_cache(model(ids, use_cache=True).past_key_values, 256)
    sizes, errors = [], []
    for basis in bases:
        codec = dataclasses.replace(codec_for(model, 2, 2, sink_tokens=1), key_basis=basis)
        blob = encode(keys, values, codec)
        got = decode(blob, key_basis=basis)
        assert got.keys is not None and got.values is not None
        sizes.append(len(blob))
        errors.append([float((a - b).norm() / b.norm()) for a, b in
                       ((got.keys, keys), (got.values, values))])  # fmt: skip
    assert sizes[1] < 1.02 * sizes[0], sizes
    assert errors[1][0] < 0.8 * errors[0][0] and errors[1][1] < 0.7 * errors[0][1], errors


def load_model():  # type: ignore[no-untyped-def]
    from kvpool.models import load

    return load()


def test_the_cli_writes_a_key_basis(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    from pydoc_data.topics import topics

    from kvpool.cli import main
    from kvpool.kernels.codec import KeyBasis

    try:
        load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    text = tmp_path / "sample.txt"
    text.write_text(topics["compound"])
    out = tmp_path / "basis.pt"
    main(["calibrate", "--basis", "--key-bits", "1.5", "--samples", "1", "--text", str(text),
          "--out", str(out)])  # fmt: skip
    basis = KeyBasis.load(out)
    assert basis.id.hex() in capsys.readouterr().out and basis.bits_per_key < 1.5


def test_the_cli_refuses_basis_options_without_basis(capsys) -> None:
    from kvpool.cli import main

    for option in ("--predict", "--no-query-weights"):
        with pytest.raises(SystemExit) as e:
            main(["calibrate", option])
        assert e.value.code == 2 and "go with --basis" in capsys.readouterr().err


def test_calibrating_a_basis_refuses_what_it_cannot_use() -> None:
    """Query weights need Llama-style q_proj modules; prediction needs windows holding at
    least one group of tokens after the sink: CodecError, with what to change."""
    from types import SimpleNamespace

    from kvpool import calibrate as cal

    with pytest.raises(CodecError, match="no-query-weights"):
        cal._QueryEnergy(SimpleNamespace(model=SimpleNamespace()))
    pytest.importorskip("transformers")
    try:
        model, _ = load_model()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.raises(CodecError, match="no group of 128"):
        cal.calibrate_basis(model, list(range(1000, 1256)), window_tokens=128, predict=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--map-rank", "8"],  # maps need --predict
        ["calibrate", "--basis", "--predict", "--per-head-maps", "--map-rank", "8"],
        ["calibrate", "--basis", "--predict", "--map-rank", "-1"],
        ["calibrate", "--basis", "--symmetric-values"],  # maps fitted for them need --predict
        ["calibrate", "--symmetric-values"],
        ["calibrate", "--basis", "--bf16-maps"],  # bfloat16 maps need --predict
    ],
)
def test_calibrate_refuses_options_that_do_not_go_together(argv: list[str], capsys) -> None:
    from kvpool.cli import main

    with pytest.raises(SystemExit) as refused:
        main(argv)  # before any model is loaded
    assert refused.value.code == 2 and "goes with" in capsys.readouterr().err
