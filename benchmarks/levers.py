"""Levers: what each lever of a 2-bit KV codec costs in perplexity, measured one at a time.

    python benchmarks/levers.py
    python benchmarks/levers.py --windows 3
    python benchmarks/levers.py --only prediction codec   # the rows whose names hold these

Method: fake quantization in torch. The prefix KV is quantized and dequantized in fp32, with no
block format, and the model scores the continuation from the result; only the two codec rows go
through the real codec (`encode` then `decode`, 256-token blocks). That isolates one lever at a
time: the ablation rows quantize the keys alone or the values alone at a fixed budget, the other
tensor exact (fp32, as the model computed it).

Model: SmolLM2-135M-Instruct (fp32, CPU; `kvpool.models.load`, no download). Development texts
(read while trying levers, so no longer held out; benchmarks/fidelity.py scores other text), three
kinds: prose (Isaac Newton's Opticks, the text shipped with the installed tvm_ffi package at
`3rdparty/libbacktrace/Isaac.Newton-Opticks.txt`), reference docs (`pydoc_data.topics.topics`
"execmodel", "import" and "exceptions") and code (the source of the stdlib's `inspect.py`). Per
text `--windows` windows (default 2) of 1024 prefix + 513 tokens, evenly spaced (window i of n
starts at (i + 1/2) / n of the room). The prefix is run once and its KV kept; each row scores
tokens 1025..1536 (512 per window) with one forward of tokens 1024..1535 over the row's prefix
KV. Reference: the prefix KV rounded to fp16. ppl_increase_pct = 100 * (exp(mean NLL - mean
reference NLL) - 1), pooled over all texts' windows, and per text.

Calibration reads a separate sample: `pydoc_data` topics "compound" + "types" and the stdlib's
`argparse.py` source, up to 3 windows of 1024 tokens each (6144 tokens). From it, per layer and
kv head: the PCA bases (eigenvectors of the covariance, by decreasing variance, and the mean) of
the pre-RoPE keys and of the values; the query energy of each key component (E[q_i^2] of the
pre-RoPE queries per channel, averaged over the kv head's query heads and over each rotary pair,
carried into the PCA basis); the output energy of each value component (u^T W_o^T W_o u, W_o the
o_proj columns of the kv head's query heads, averaged).

Quantizers (the first token, the attention sink, is kept exact in every row and kept out of the
groups' ranges): min/max uniform with an fp16 minimum and scale per group, or NF (Lloyd-Max
levels of a Gaussian, an fp16 mean and std per group; NF rows keep 4- and 8-bit bands uniform).
Keys per channel: groups of G tokens of one channel. PCA bands: the components in groups of G
tokens, one width per chunk of 8 components from {0, 2, 3, 4, 8} per layer (shared by the kv
heads, non-increasing along the components), chosen greedily for the most variance removed
(weighted by query or output energy, or not) per bit within ~2.0 bits per value, parameters
included; a width-0 component is replaced by its calibration mean. Values per token: groups of
64 channels of one token, after no rotation, the Hadamard rotation or the PCA basis.

Inter-layer prediction (AQUA-KV's lever; see `Predictor`): each layer's keys and values are
predicted by linear maps from the layer before as the decoder already has it (closed loop, so
only the residual's quantization error remains), and only the residual is coded: the key
residual in its own PCA basis per head at query-weighted band widths (~2.0 bits), the value
residual Hadamard-rotated at 2 bits per token. The maps are fitted by least squares on the
calibration sample, through the same loop. Their parameters ((2HD + 1) HD + (3HD + 1) HD floats
per layer, 21 MB for SmolLM2) are per namespace, like a key basis, and not counted in the bits.
The "values only" prediction row predicts from the keys as the codec decodes them but gives the
model the exact keys. Cheaper maps (the "maps" rows, `fit_map`): the both-tensors row again with
per-head maps (block-diagonal: each kv head from its own head only) and with rank-16/32/64 maps
(the full least-squares map projected on the leading directions of its fitted values).

The next ratio (`--ratio`, issue 22 part 4; only these rows, none of the rows above): the real
codec v2 with inter-layer prediction, its basis calibrated as benchmarks/fidelity.py calibrates
its v2 rows (`kvpool.calibrate.calibrate_basis(..., predict=True)` on `basis_sample`, 6 windows,
cached under .cache/profiles/ by `basis_path`), values 2-bit per token G=64 with the Hadamard
rotation, 1 sink, pre-RoPE keys; the value groups min/max (the codec's default) or symmetric (one
fp16 scale, no minimum: `CodecConfig(symmetric_values=True)`, the maps fitted for it), at key band
budgets RATIO_ROWS. Their bits per value are measured like fidelity.py's: encoded bytes (headers,
sink, padding included) over the prefix's values.

KL: the mean over scored tokens of KL(reference || row) of the next-token distributions, in
millinats: always >= 0 and much steadier across windows than the perplexity change, so it is
the figure to rank levers by.

Bits per value: code bits plus 2 fp16 parameters per group (2 + 32/128 = 2.25 for 2-bit keys
per channel, 2 + 32/64 = 2.5 for 2-bit values per token); rows of both tensors average the two.
Block headers and the fp16 sink token are not counted here (fidelity.py counts them).
compression_ratio = 16 / bits_per_value. Prints a table, then one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fidelity import PROSE_HELD_OUT  # benchmarks/, on sys.path as the script's folder
from torch import Tensor

from kvpool.calibrate import least_squares, principal, reduced_rank
from kvpool.hf import cache_from_kv, kv_from_cache, rope_params
from kvpool.kernels import basis as codec_basis
from kvpool.kernels.basis import as_rows
from kvpool.kernels.codec import CodecConfig, decode, encode
from kvpool.kernels.transforms import RopeParams, hadamard, redo_rope, undo_rope
from kvpool.models import load

PREFIX, CONTINUATION, BLOCK, SINKS = 1024, 512, 256, 1
CALIBRATION_WINDOWS = 3  # per calibration text, of PREFIX tokens
WIDTHS = (0, 2, 3, 4, 8)  # band widths
NF = {
    2: torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104]),
    3: torch.tensor([-2.1519, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1519]),
}
KV = tuple[Tensor, Tensor]
# cheaper prediction maps tried (issue 22 part 3): block-diagonal per head, and low rank
MAP_FORMS = ("head", "rank:16", "rank:32", "rank:64")
# the same in bfloat16 (products in bfloat16 too: about twice as fast on AVX-512 BF16; issue 22's
# decode goal), the ranks whose decode reaches about 0.5 GB/s or more (benchmarks/codec.py)
BF16_FORMS = ("rank:64:bf16", "rank:96:bf16")
# the next ratio (issue 22 part 4): (key band budget, symmetric value groups) of `--ratio` rows
# (1.7 and 0.9: the largest budgets whose blocks, measured, reach 8x and 10x: 8.13x, 10.24x;
# 1.45 and 0.65 min/max: about 8x and 10x with the codec's default value groups, for comparison;
# 1.25 symmetric: between the two)
RATIO_ROWS = ((1.7, True), (0.9, True), (1.45, False), (0.65, False), (1.25, True))


def eval_texts() -> dict[str, str]:
    from pydoc_data.topics import topics

    spec = importlib.util.find_spec("tvm_ffi")
    assert spec is not None and spec.origin is not None, "tvm_ffi ships the prose text"
    opticks = Path(spec.origin).parent / "3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"
    return {
        "prose": opticks.read_text(),
        "docs": "\n\n".join(topics[t] for t in ("execmodel", "import", "exceptions")),
        "code": Path(inspect.__file__).read_text(),
    }


def calibration_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics["compound"] + "\n\n" + topics["types"], Path(argparse.__file__).read_text()]


@dataclass
class Window:
    tokens: Tensor  # [1, PREFIX + CONTINUATION + 1]
    keys: Tensor  # the prefix's KV [L, H, PREFIX, D], fp32
    values: Tensor
    reference_nll: float  # summed over the CONTINUATION scored tokens, fp16 prefix KV
    reference_logp: Tensor  # [CONTINUATION, vocab], fp16 prefix KV


@dataclass
class Calibration:
    key_mean: Tensor  # [L, H, 1, D], pre-RoPE
    key_basis: Tensor  # [L, H, D, D], columns by decreasing variance
    key_var: Tensor  # [L, H, D]
    key_weight: Tensor  # query energy per key component [L, H, D]
    value_mean: Tensor
    value_basis: Tensor
    value_var: Tensor
    value_weight: Tensor  # output energy per value component
    query: Tensor  # query energy per pre-RoPE key channel [L, H, D], RoPE pairs shared
    keys: Tensor  # the calibration sample's pre-RoPE keys and values [L, H, T, D], no sinks
    values: Tensor


@dataclass
class Row:
    name: str
    tensor: str  # "both", "keys" or "values"
    bits: float
    apply: Callable[[Tensor, Tensor], KV]


@torch.inference_mode()
def logp(model: Any, tokens: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Log-probabilities [CONTINUATION, vocab] of the tokens after each continuation token."""
    cont = tokens[:, PREFIX : PREFIX + CONTINUATION]
    logits = model(cont, past_key_values=cache_from_kv(model, keys, values)).logits[0]
    return torch.log_softmax(logits.float(), -1)


def score(model: Any, w: Window, keys: Tensor, values: Tensor) -> tuple[float, float]:
    """(NLL minus the reference's, KL(reference || this)), each summed over the scored tokens."""
    lp = logp(model, w.tokens, keys, values)
    target = w.tokens[0, PREFIX + 1 :, None]
    nll = -float(lp.gather(1, target).sum())
    kl = float((w.reference_logp.exp() * (w.reference_logp - lp)).sum())
    return nll - w.reference_nll, kl


@torch.inference_mode()
def windows(
    model: Any, tokenizer: Any, text: str, count: int,
    avoid: tuple[float, float] | None = None,
) -> list[Window]:  # fmt: skip
    """`count` windows at evenly spaced offsets of `text`; SystemExit if one would overlap the
    fraction `avoid` of the text (held-out text)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    n, span = ids.shape[1], PREFIX + CONTINUATION + 1
    starts = [round((i + 0.5) * (n - span) / count) for i in range(count)]
    if avoid is not None and any(avoid[0] * n < s + span and s < avoid[1] * n for s in starts):
        raise SystemExit(f"{count} windows per text would read the held-out part of the book "
                         f"({avoid[0]:.0%}-{avoid[1]:.0%}); the default, 2, does not")  # fmt: skip
    out = []
    for s in starts:
        tokens = ids[:, s : s + span]
        prefix = model(tokens[:, :PREFIX], use_cache=True).past_key_values
        keys, values = kv_from_cache(prefix, PREFIX)
        ref = logp(model, tokens, keys.half().float(), values.half().float())
        nll = -float(ref.gather(1, tokens[0, PREFIX + 1 :, None]).sum())
        out.append(Window(tokens, keys, values, nll, ref))
    return out


def pca(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [L, H, T, D] -> mean [L, H, 1, D], basis [L, H, D, D], variances [L, H, D]."""
    mean = x.mean(2, keepdim=True)
    xc = x - mean
    var, basis = torch.linalg.eigh(xc.transpose(-1, -2) @ xc / x.shape[2])
    return mean, basis.flip(-1), var.flip(-1).clamp_min(0)


@torch.inference_mode()
def calibrate(model: Any, tokenizer: Any, rope: RopeParams) -> Calibration:
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim, per_kv = cfg.hidden_size // heads, heads // kv_heads
    query = torch.zeros(cfg.num_hidden_layers, kv_heads, dim)

    def hook(layer: int) -> Callable[..., None]:
        def f(module: Any, inputs: Any, out: Tensor) -> None:
            e = (out[0].reshape(-1, heads, dim).float() ** 2).mean(0)
            query[layer] += e.reshape(kv_heads, per_kv, dim).mean(1)

        return f

    layers = model.model.layers
    hooks = [m.self_attn.q_proj.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    keys, values = [], []
    try:
        for text in calibration_texts():
            ids = tokenizer(text, return_tensors="pt").input_ids
            for s in range(0, min(ids.shape[1] - PREFIX, CALIBRATION_WINDOWS * PREFIX), PREFIX):
                cache = model(ids[:, s : s + PREFIX], use_cache=True).past_key_values
                k, v = kv_from_cache(cache, PREFIX)
                keys.append(undo_rope(k, rope, 0))
                values.append(v.float())
    finally:
        for h in hooks:
            h.remove()
    query /= len(keys)
    half = dim // 2
    pair = (query[..., :half] + query[..., half:]) / 2  # RoPE mixes channels i and i + D/2
    query = torch.cat([pair, pair], -1)
    output = torch.zeros(cfg.num_hidden_layers, kv_heads, dim, dim)  # W_o^T W_o per kv head
    for i, m in enumerate(layers):
        w = m.self_attn.o_proj.weight.detach().float()
        for h in range(heads):
            wh = w[:, h * dim : (h + 1) * dim]
            output[i, h // per_kv] += wh.T @ wh / per_kv
    km, kb, kv = pca(torch.cat(keys, 2))
    vm, vb, vv = pca(torch.cat(values, 2))
    kw = torch.einsum("lhij,lhi->lhj", kb**2, query)
    vw = torch.einsum("lhij,lhik,lhkj->lhj", vb, output, vb)
    sample_k = torch.cat([k[:, :, SINKS:] for k in keys], 2)
    sample_v = torch.cat([v[:, :, SINKS:] for v in values], 2)
    t = sample_k.shape[2] // 128 * 128  # whole groups
    return Calibration(
        km, kb, kv, kw, vm, vb, vv, vw, query, sample_k[:, :, :t], sample_v[:, :, :t]
    )


def band_widths(var: Tensor, budget: float, group: int, weight: Tensor | None = None) -> Tensor:
    """[L, H, D] widths: per layer one width from WIDTHS per chunk of 8 components (shared by the
    heads, non-increasing), each step the upgrade removing the most (weighted) variance per bit,
    within `budget` bits per value including 2 fp16 parameters per group of a coded chunk."""
    layers, heads, dim = var.shape
    chunk = 8
    v = (var if weight is None else var * weight).mean(1)  # [L, D]
    out = torch.zeros(layers, heads, dim, dtype=torch.long)
    for layer in range(layers):
        w, spent = [0] * (dim // chunk), 0.0
        while True:
            best, pick, pick_cost = 0.0, -1, 0.0
            for c in range(dim // chunk):
                i = WIDTHS.index(w[c])
                if i + 1 == len(WIDTHS) or (c > 0 and w[c - 1] <= w[c]):
                    continue
                new = WIDTHS[i + 1]
                cost = chunk * (new - w[c]) + (chunk * 32 / group if w[c] == 0 else 0)
                if spent + cost > budget * dim + 1e-9:
                    continue
                gain = float(v[layer, c * chunk : (c + 1) * chunk].sum())
                gain *= 2.0 ** (-2 * w[c]) - 2.0 ** (-2 * new)
                if gain / cost > best:
                    best, pick, pick_cost = gain / cost, c, cost
            if pick < 0:
                break
            w[pick] = WIDTHS[WIDTHS.index(w[pick]) + 1]
            spent += pick_cost
        out[layer] = torch.tensor(w).repeat_interleave(chunk)
    return out


def band_bits(widths: Tensor, group: int) -> float:
    return float(widths.float().mean()) + 32 / group * float((widths > 0).float().mean())


def quantize(x: Tensor, bits: int, group: int, dim: int, nf: bool = False) -> Tensor:
    """x quantized and dequantized in groups of `group` along `dim`: min/max uniform (fp16
    minimum and scale) or, with nf and bits <= 3, NF levels (fp16 mean and std)."""
    x = x.transpose(dim, -1)
    g = x.reshape(*x.shape[:-1], -1, group)
    if nf and bits in NF:
        mean = g.mean(-1, keepdim=True).half().float()
        std = g.std(-1, keepdim=True).clamp_min(1e-6).half().float()
        levels = NF[bits]
        y = levels[((g - mean) / std).unsqueeze(-1).sub(levels).abs().argmin(-1)] * std + mean
    else:
        lo = g.amin(-1, keepdim=True).half().float()
        top = 2**bits - 1
        scale = ((g.amax(-1, keepdim=True) - lo) / top).clamp_min(2**-24).half().float()
        y = torch.floor((g - lo) / scale + 0.5).clamp(0, top) * scale + lo
    return y.reshape(x.shape).transpose(dim, -1)


def fill_sinks(x: Tensor) -> Tensor:
    """The sink rows replaced by the next token's, so they do not widen any group."""
    x = x.clone()
    x[:, :, :SINKS] = x[:, :, SINKS : 2 * SINKS]
    return x


def bands(x: Tensor, mean: Tensor, basis: Tensor, widths: Tensor, group: int, nf: bool) -> Tensor:
    c = fill_sinks((x - mean) @ basis)
    q = torch.zeros_like(c)
    for b in widths.unique().tolist():
        if b:
            q = torch.where((widths == b).unsqueeze(2), quantize(c, b, group, 2, nf), q)
    y = q @ basis.transpose(-1, -2) + mean
    y[:, :, :SINKS] = x[:, :, :SINKS]
    return y


def keys_bands(
    k: Tensor, cal: Calibration, rope: RopeParams, widths: Tensor, group: int, nf: bool = False
) -> Tensor:
    pre = undo_rope(k, rope, 0)
    return redo_rope(bands(pre, cal.key_mean, cal.key_basis, widths, group, nf), rope, 0)


def keys_channel(k: Tensor, rope: RopeParams, bits: int = 2, group: int = 128) -> Tensor:
    pre = undo_rope(k, rope, 0)
    q = quantize(fill_sinks(pre), bits, group, 2)
    q[:, :, :SINKS] = pre[:, :, :SINKS]
    return redo_rope(q, rope, 0)


def values_token(
    v: Tensor, cal: Calibration, rotation: str, nf: bool = False, bits: int = 2, group: int = 64
) -> Tensor:
    if rotation == "pca":
        c = (v - cal.value_mean) @ cal.value_basis
    else:
        c = hadamard(v) if rotation == "hadamard" else v.float()
    q = quantize(fill_sinks(c), bits, group, 3, nf)
    if rotation == "pca":
        y = q @ cal.value_basis.transpose(-1, -2) + cal.value_mean
    else:
        y = hadamard(q) if rotation == "hadamard" else q  # the Hadamard is its own inverse
    y[:, :, :SINKS] = v[:, :, :SINKS]
    return y


def through_codec(k: Tensor, v: Tensor, cfg: CodecConfig) -> KV:
    blocks = [
        decode(encode(k[:, :, s : s + BLOCK].half(), v[:, :, s : s + BLOCK].half(), cfg, start_position=s),
               dtype=torch.float32, key_basis=cfg.key_basis)
        for s in range(0, k.shape[2], BLOCK)
    ]  # fmt: skip
    keys = torch.cat([b.keys for b in blocks if b.keys is not None], 2)
    values = torch.cat([b.values for b in blocks if b.values is not None], 2)
    return keys, values


# ---- inter-layer prediction (AQUA-KV's lever) -------------------------------------------------


def mapped(m: Tensor, inputs: list[Tensor]) -> Tensor:
    """codec.mapped's product, with the bias added after the matmul rather than fused (addmm):
    the figures in benchmarks/results/ were measured so, and the closed loop carries a last-bit
    difference into other band widths (dev KL 6.25 vs 7.01 for the both-tensors row). bfloat16
    maps (factored, "rank:R:bf16") go through the codec's own product."""
    if m.dtype != torch.float32:
        return codec_basis.mapped(m, inputs)
    y = as_rows(inputs) @ m[:-1] + m[-1]
    return y.reshape(y.shape[0], inputs[0].shape[0], -1).transpose(0, 1)


@dataclass
class Predictor:
    """Inter-layer prediction, closed loop (the maps read the layer before as the decoder has it):
    keys_l ~ [K^_l-1, V^_l-1] (layer 0, or every layer when keys are not predicted: the
    calibration mean), the key residual coded in its own PCA basis per head at query-weighted
    band widths (~2.0 bits); values_l ~ [K^_l, K^_l-1, V^_l-1], the value residual Hadamard-
    rotated at 2 bits per token (G=64). Fitted on the calibration sample by the same loop."""

    key_maps: list[Tensor] | None  # per layer l >= 1: [2HD + 1, HD]; None: keys not predicted
    value_maps: list[Tensor]  # per layer l >= 1: [3HD + 1, HD]
    key_mean: Tensor  # [L, H, 1, D]
    bases: Tensor  # [L, H, D, D], the key residual's components by decreasing variance
    widths: Tensor  # [L, H, D]

    @property
    def key_bits(self) -> float:
        return band_bits(self.widths, 128)


def predicted(keys: Tensor, values: Tensor, p: Predictor) -> KV:
    """Pre-RoPE keys and values [L, H, T, D] (sink rows filled) -> as decoded."""
    (k, v), _ = _loop(keys, values, p, None, False)
    return k, v


def fit_predictor(cal: Calibration, predict_keys: bool, form: str = "full") -> Predictor:
    _, p = _loop(cal.keys, cal.values, None, cal, predict_keys, form)
    return p


def fit_map(inputs: list[Tensor], target: Tensor, form: str) -> Tensor:
    """A prediction map [rows + 1, H * D] from `inputs` to `target` [H, N, D] by least squares:
    "full" (every head from every head), "head" (block-diagonal: each head from its own heads
    of the inputs only; (k D + 1) D floats per head instead of (k H D + 1) H D) or "rank:R"
    (reduced-rank regression: the full map projected on the R leading directions of its fitted
    values, stored as two factors of (k H D + 1) R + R H D floats), or "rank:R:bf16" (the
    codec's own factors, `kvpool calibrate --map-rank R --bf16-maps`, rounded to bfloat16, their
    products in bfloat16)."""
    if form.endswith(":bf16"):
        return reduced_rank(inputs, target, int(form.split(":")[1])).bfloat16()
    if form == "full":
        return least_squares(inputs, target)
    heads, _, dim = target.shape
    if form == "head":
        m = torch.zeros(len(inputs) * heads * dim + 1, heads * dim)
        for h in range(heads):
            part = least_squares([x[h : h + 1] for x in inputs], target[h : h + 1])
            for i in range(len(inputs)):
                rows = slice(i * heads * dim + h * dim, i * heads * dim + (h + 1) * dim)
                m[rows, h * dim : (h + 1) * dim] = part[i * dim : (i + 1) * dim]
            m[-1, h * dim : (h + 1) * dim] = part[-1]
        return m
    rank = int(form.removeprefix("rank:"))
    full = least_squares(inputs, target)
    fitted = mapped(full, inputs).transpose(0, 1).reshape(target.shape[1], -1)
    directions = torch.linalg.svd(fitted.double(), full_matrices=False)[2][:rank].T.float()
    return full @ directions @ directions.T


def _loop(
    keys: Tensor, values: Tensor, p: Predictor | None, cal: Calibration | None, predict_keys: bool,
    form: str = "full",
) -> tuple[KV, Predictor]:  # fmt: skip
    layers = keys.shape[0]
    kh, vh = torch.empty_like(keys), torch.empty_like(values)
    key_maps: list[Tensor] = []
    value_maps: list[Tensor] = []
    bases, widths = [], []
    key_mean = keys.mean(2, keepdim=True) if p is None else p.key_mean
    if p is not None:
        predict_keys = p.key_maps is not None
    for layer in range(layers):
        before = [] if layer == 0 else [kh[layer - 1], vh[layer - 1]]
        if predict_keys and before:
            if p is None:
                key_maps.append(fit_map(before, keys[layer], form))
            maps = key_maps if p is None else p.key_maps
            assert maps is not None
            pk = mapped(maps[layer - 1], before)
        else:
            pk = key_mean[layer].expand_as(keys[layer])
        residual = keys[layer] - pk
        if p is None:
            assert cal is not None
            covariance = residual.transpose(-1, -2) @ residual / residual.shape[1]
            basis, var = principal(covariance, None)
            weight = torch.einsum("hij,hi->hj", basis**2, cal.query[layer])
            w = band_widths(var[None], 2.0, 128, weight[None])[0]
            bases.append(basis)
            widths.append(w)
        else:
            basis, w = p.bases[layer], p.widths[layer]
        comp = residual @ basis
        coded = torch.zeros_like(comp)
        for b in w.unique().tolist():
            if b:
                coded = torch.where((w == b).unsqueeze(1), quantize(comp, b, 128, 1), coded)
        kh[layer] = pk + coded @ basis.transpose(-1, -2)
        if not before:
            pv = torch.zeros_like(values[layer])
        else:
            x = [kh[layer], *before]
            if p is None:
                value_maps.append(fit_map(x, values[layer], form))
            pv = mapped((value_maps if p is None else p.value_maps)[layer - 1], x)
        vh[layer] = pv + hadamard(quantize(hadamard(values[layer] - pv), 2, 64, 2))
    if p is None:
        p = Predictor(key_maps if predict_keys else None, value_maps, key_mean,
                      torch.stack(bases), torch.stack(widths))  # fmt: skip
    return (kh, vh), p


def through_prediction(k: Tensor, v: Tensor, p: Predictor, rope: RopeParams) -> KV:
    pre = undo_rope(k, rope, 0)
    kh, vh = predicted(fill_sinks(pre), fill_sinks(v.float()), p)
    kh[:, :, :SINKS], vh[:, :, :SINKS] = pre[:, :, :SINKS], v[:, :, :SINKS]
    return redo_rope(kh, rope, 0), vh


def rows(cal: Calibration, rope: RopeParams, dim: int) -> list[Row]:
    def codec(key_bits: int) -> Row:
        cfg = CodecConfig(key_bits, 2, 128, rope=rope, hadamard_values=True, sink_tokens=SINKS)
        bits = (key_bits + 32 / 128 + 2 + 32 / min(128, dim)) / 2
        name = f"K{key_bits} V2 codec (pre-RoPE, Hadamard, {SINKS} sink)"
        return Row(name, "both", bits, lambda k, v: through_codec(k, v, cfg))

    def key_bands(name: str, group: int, weighted: bool, nf: bool = False) -> Row:
        w = band_widths(cal.key_var, 2.0, group, cal.key_weight if weighted else None)
        apply = lambda k, v: (keys_bands(k, cal, rope, w, group, nf), v)  # noqa: E731
        return Row(f"keys only: PCA bands ~2.0 bits, {name}", "keys", band_bits(w, group), apply)

    def value_token(name: str, rotation: str, nf: bool = False) -> Row:
        apply = lambda k, v: (k, values_token(v, cal, rotation, nf))  # noqa: E731
        return Row(f"values only: per-token 2-bit G=64, {name}", "values", 2 + 32 / 64, apply)

    def cheaper(form: str) -> Row:
        """The both-tensors prediction row with maps of another form."""
        p = fit_predictor(cal, predict_keys=True, form=form)
        name = f"K and V {prediction}, {form} maps (K residual bands ~2.0 bits, V residual 2-bit)"
        return Row(name, "both", (p.key_bits + 2 + 32 / 64) / 2,
                   lambda k, v: through_prediction(k, v, p, rope))  # fmt: skip

    vw = band_widths(cal.value_var, 2.0, 128, cal.value_weight)
    kw = band_widths(cal.key_var, 2.0, 128, cal.key_weight)
    both, values_only = fit_predictor(cal, predict_keys=True), fit_predictor(cal, False)
    prediction = "inter-layer prediction"
    return [
        codec(2),
        codec(3),
        Row("keys only: per-channel 2-bit G=128, pre-RoPE, no PCA", "keys", 2 + 32 / 128,
            lambda k, v: (keys_channel(k, rope), v)),
        key_bands("unweighted, G=128", 128, weighted=False),
        key_bands("query-weighted, G=128", 128, weighted=True),
        key_bands("query-weighted, G=256", 256, weighted=True),
        key_bands("query-weighted, NF levels, G=128", 128, weighted=True, nf=True),
        value_token("no rotation", "none"),
        value_token("Hadamard", "hadamard"),
        value_token("PCA basis", "pca"),
        value_token("Hadamard, NF levels", "hadamard", nf=True),
        Row("values only: PCA bands ~2.0 bits, output-weighted, G=128", "values",
            band_bits(vw, 128),
            lambda k, v: (k, bands(v, cal.value_mean, cal.value_basis, vw, 128, False))),
        Row("K PCA bands (weighted, ~2.0 bits incl. params) + V Hadamard per-token 2-bit",
            "both", (band_bits(kw, 128) + 2 + 32 / 64) / 2,
            lambda k, v: (keys_bands(k, cal, rope, kw, 128), values_token(v, cal, "hadamard"))),
        Row(f"keys only: {prediction} + residual PCA bands ~2.0 bits (weighted)", "keys",
            both.key_bits, lambda k, v: (through_prediction(k, v, both, rope)[0], v)),
        Row(f"values only: {prediction}, residual Hadamard per-token 2-bit G=64", "values",
            2 + 32 / 64, lambda k, v: (k, through_prediction(k, v, both, rope)[1])),
        Row(f"K PCA bands (weighted, ~2.0 bits) + V {prediction}", "both",
            (values_only.key_bits + 2 + 32 / 64) / 2,
            lambda k, v: through_prediction(k, v, values_only, rope)),
        Row(f"K and V {prediction} (K residual bands ~2.0 bits, V residual 2-bit)", "both",
            (both.key_bits + 2 + 32 / 64) / 2, lambda k, v: through_prediction(k, v, both, rope)),
        *(cheaper(form) for form in (*MAP_FORMS, *BF16_FORMS)),
    ]  # fmt: skip


def ratio_rows(model: Any, tokenizer: Any, rope: RopeParams, shape: tuple[int, ...]) -> list[Row]:
    """The real codec v2 with prediction at the budgets of RATIO_ROWS (see the docstring)."""
    from fidelity import load_basis  # the cached basis, else calibrated as fidelity.py does

    out = []
    zeros = torch.zeros(shape)  # bits depend on the shape alone: blocks are fixed-size
    for key_bits, symmetric in RATIO_ROWS:
        basis = load_basis(model, tokenizer, key_bits, predict=True, symmetric=symmetric)
        cfg = CodecConfig(2, 2, 128, rope=rope, hadamard_values=True, sink_tokens=SINKS,
                          key_basis=basis, symmetric_values=symmetric)  # fmt: skip
        size = sum(len(encode(zeros[:, :, t : t + BLOCK].half(), zeros[:, :, t : t + BLOCK].half(),
                              cfg, start_position=t)) for t in range(0, shape[2], BLOCK))  # fmt: skip
        kind = "symmetric" if symmetric else "min/max"
        name = f"codec v2 predicted, K bands {key_bits} bits, V residual 2-bit {kind}"
        out.append(Row(name, "both", 8 * size / (2 * zeros.numel()),
                       functools.partial(through_codec, cfg=cfg)))  # fmt: skip
    return out


def pct(delta_nll: float, tokens: int) -> float:
    return round(100 * math.expm1(delta_nll / tokens), 2)


def run(windows_per_text: int, only: list[str], ratio: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tokenizer = load()
    model.eval()
    rope = rope_params(model)
    assert rope is not None, "the levers are measured on pre-RoPE keys"
    # no development window may reach into it (token offsets against fidelity.py's character
    # offsets: a margin of 3% of the book for the difference)
    held_out = (PROSE_HELD_OUT[0] - 0.03, PROSE_HELD_OUT[1] + 0.03)
    data = {
        n: windows(model, tokenizer, t, windows_per_text, held_out if n == "prose" else None)
        for n, t in eval_texts().items()
    }
    tokens = {n: CONTINUATION * len(ws) for n, ws in data.items()}
    base = {n: round(math.exp(sum(w.reference_nll for w in ws) / tokens[n]), 4)
            for n, ws in data.items()}  # fmt: skip
    print(f"{model.config._name_or_path}: {windows_per_text} windows per text of {PREFIX} + "
          f"{CONTINUATION} scored tokens; reference (fp16) ppl {base}", flush=True)  # fmt: skip
    if ratio:
        todo = ratio_rows(model, tokenizer, rope, tuple(data["prose"][0].keys.shape))
    else:
        dim = model.config.hidden_size // model.config.num_attention_heads
        todo = rows(calibrate(model, tokenizer, rope), rope, dim)
    print(f"{'row':78s} {'bits/val':>8s} {'ratio':>6s} {'KL mnat':>7s} {'ppl +%':>7s}  by text",
          flush=True)  # fmt: skip
    out = []
    for row in todo:
        if only and not any(o in row.name for o in only):
            continue
        delta, kl = {}, 0.0
        for name, ws in data.items():
            scores = [score(model, w, *row.apply(w.keys, w.values)) for w in ws]
            delta[name] = sum(d for d, _ in scores)
            kl += sum(k for _, k in scores)
        by_text = {n: pct(d, tokens[n]) for n, d in delta.items()}
        pooled = pct(sum(delta.values()), sum(tokens.values()))
        kl_mnats = round(1000 * kl / sum(tokens.values()), 2)
        print(f"{row.name:78s} {row.bits:8.3f} {16 / row.bits:6.2f} {kl_mnats:7.2f} {pooled:7.2f}  "
              + "  ".join(f"{n} {p:.2f}" for n, p in by_text.items()), flush=True)  # fmt: skip
        out.append({
            "name": row.name,
            "tensor": row.tensor,
            "bits_per_value": round(row.bits, 4),
            "compression_ratio": round(16 / row.bits, 3),
            "kl_mnats": kl_mnats,
            "ppl_increase_pct": pooled,
            "ppl_increase_pct_by_text": by_text,
        })  # fmt: skip
    return {
        "model": model.config._name_or_path,
        "texts": list(data),
        "windows": windows_per_text,
        "prefix_tokens": PREFIX,
        "continuation_tokens": CONTINUATION,
        "base_ppl": base,
        "rows": out,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=2, help="windows per text, pooled (default 2)")
    p.add_argument("--only", nargs="*", default=[], help="rows whose name holds any of these")
    p.add_argument("--ratio", action="store_true", help="only the next ratio's rows (RATIO_ROWS)")
    a = p.parse_args()
    print(json.dumps(run(a.windows, a.only, a.ratio)))
