"""Calibration: per-layer bit widths for keys and values, spent where the model is sensitive.

Where it stands: offline, before a namespace is first used. It runs the model once on sample
text and writes a profile; `profile_codec(profile)` turns the profile into the CodecConfig that
every writer and reader of the namespace then uses (MiniKV's layer-discriminative idea, in a
form that is safe to share across requests):

    sample text --model--> exact prefix KV --codec at each width--> quantized copies
        --one layer's K (or V) swapped in at a time--> KL of next-token distributions
        --greedy allocation under a bits-per-value budget--> profile (JSON)
        --profile_codec--> CodecConfig(key_bits=(...), value_bits=(...)) --> namespace

Sensitivity of (layer, K or V) at the lowest width: the mean KL divergence, over a continuation,
between the next-token distributions with the exact prefix KV and with only that layer's K (or
V) quantized (everything else exact; the continuation's own KV is computed normally). At the
higher widths it is estimated, not measured: the measured KL scaled by the ratio of that
tensor's squared quantization error at the higher width to that at the lowest (second-order
behaviour of the KL in a small perturbation), which costs no forward pass.

Allocation: every (layer, tensor) starts at the lowest width; repeatedly take the upgrade (to
any higher width) with the largest estimated loss reduction per added bit among those that keep
the average bits per value within the target, until none fits. Bits per value are computed
exactly from the block format: every header, scale, minimum, padding and fp16 sink token of a
prefix of `context_tokens` tokens stored in blocks of `block_tokens`, over its K+V values.

Sharing: the per-layer widths are part of `CodecConfig.describe()`, hence of the namespace id
and of every block key. Writers and readers with different profiles therefore never see each
other's blocks (a different profile is a different namespace), and each block's header also
carries its widths, so a block always decodes the way it was encoded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvpool.kernels.basis import KeyBasis, as_rows, predicted_loop
from kvpool.kernels.codec import CodecConfig, block_header, decode, encode
from kvpool.kernels.transforms import RopeParams, undo_rope
from kvpool.proto.blockformat import CHUNK, SUPPORTED_BITS, Layout
from kvpool.proto.errors import CodecError

TENSORS = ("key", "value")


@dataclass
class Profile:
    """A calibrated bit profile and how it was measured (the JSON written by `kvpool calibrate`).

    sensitivity[tensor][layer][i]: the (estimated, except at widths[0]) mean KL in nats per
    token when only that layer's tensor is quantized at widths[i]."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    group_size: int
    sink_tokens: int
    hadamard_values: bool
    rope: dict[str, float] | None  # RopeParams fields when keys are quantized pre-RoPE
    key_bits: list[int]
    value_bits: list[int]
    target_bits: float
    achieved_bits: float
    context_tokens: int
    block_tokens: int
    widths: list[int]
    sensitivity: dict[str, list[list[float]]]
    sample: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls(**json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_json(Path(path).read_text())


def profile_codec(profile: Profile) -> CodecConfig:
    """The CodecConfig a profile describes, with one key and one value width per layer."""
    rope = RopeParams(
        float(profile.rope["theta"]), int(profile.rope["rotary_dim"]), float(profile.rope["scaling"])
    ) if profile.rope else None  # fmt: skip
    return CodecConfig(
        key_bits=tuple(profile.key_bits), value_bits=tuple(profile.value_bits),
        group_size=profile.group_size, rope=rope, hadamard_values=profile.hadamard_values,
        sink_tokens=profile.sink_tokens,
    )  # fmt: skip


def bits_per_value(
    codec: CodecConfig, kv_heads: int, head_dim: int, context_tokens: int = 1024,
    block_tokens: int = 256, layers: int | None = None,
) -> float:  # fmt: skip
    """Stored bits per K+V value of a `context_tokens` prefix in blocks of `block_tokens`
    (whole blocks; the first holds the sinks), exact from the block format."""
    if layers is None:
        if isinstance(codec.key_bits, int):
            raise CodecError("give `layers` for a codec with one width for every layer")
        layers = len(codec.key_bits)
    blocks = max(1, context_tokens // block_tokens)
    nbytes = 0
    for i in range(blocks):
        shape = (layers, kv_heads, block_tokens, head_dim)
        h = block_header(Layout.KV, torch.float16, shape, codec, i * block_tokens)
        nbytes += h.header_len + h.payload_len
    return nbytes * 8 / (2 * layers * kv_heads * blocks * block_tokens * head_dim)


Bits = tuple[list[int], list[int]]


def allocate(
    loss: Mapping[str, Sequence[Sequence[float]]], widths: Sequence[int],
    cost: Callable[[Sequence[int], Sequence[int]], float], target: float,
) -> Bits:  # fmt: skip
    """Greedy per-layer widths: (key_bits, value_bits) with cost(key_bits, value_bits) <= target.

    loss[tensor][layer][i]: the loss with that layer's tensor at widths[i] (made non-increasing
    in i before use). Starts with every width at widths[0]; repeatedly applies the upgrade with
    the largest loss reduction per added cost that keeps the cost within `target`, until no
    upgrade fits. Raises CodecError when even the lowest widths exceed the target."""
    layers = len(loss["key"])
    mono = {
        t: [[min(row[: i + 1]) for i in range(len(widths))] for row in loss[t]] for t in TENSORS
    }
    level = {t: [0] * layers for t in TENSORS}

    def bits() -> Bits:
        return [widths[i] for i in level["key"]], [widths[i] for i in level["value"]]

    current = cost(*bits())
    if current > target:
        raise CodecError(
            f"the lowest widths already cost {current:.4f} bits per value > target {target}"
        )
    while True:
        best: tuple[float, float, str, int, int] | None = None
        for t in TENSORS:
            for layer in range(layers):
                i = level[t][layer]
                for j in range(i + 1, len(widths)):
                    level[t][layer] = j
                    c = cost(*bits())
                    level[t][layer] = i
                    if c > target + 1e-12:
                        continue
                    gain = mono[t][layer][i] - mono[t][layer][j]
                    rate = gain / max(c - current, 1e-12)
                    if best is None or (rate, -c) > (best[0], -best[1]):
                        best = (rate, c, t, layer, j)
        if best is None:
            return bits()
        _, current, t, layer, j = best
        level[t][layer] = j


# ---- measuring sensitivities with a model --------------------------------------------------


def _roundtrip(keys: Tensor, values: Tensor, codec: CodecConfig, block_tokens: int) -> list[Tensor]:
    """keys, values [L, H, T, D] through encode/decode in blocks, as a pool would store them."""
    ks, vs = [], []
    for start in range(0, keys.shape[2], block_tokens):
        end = start + block_tokens
        blob = encode(keys[:, :, start:end], values[:, :, start:end], codec, start_position=start)
        block = decode(blob, dtype=keys.dtype, key_basis=codec.key_basis)
        assert block.keys is not None and block.values is not None
        ks.append(block.keys)
        vs.append(block.values)
    return [torch.cat(ks, dim=2), torch.cat(vs, dim=2)]


def _kl(ref_logp: Tensor, logits: Tensor) -> float:
    """Mean over positions of KL(p_ref || p) in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


@torch.inference_mode()
def calibrate(
    model: Any, token_ids: Sequence[int] | Tensor, *, target_bits: float = 2.5,
    group_size: int = 128, sink_tokens: int = 1, pre_rope: bool = True,
    hadamard_values: bool = True, widths: Sequence[int] = (2, 3, 4), prefix_tokens: int = 512,
    continuation_tokens: int = 64, samples: int = 4, context_tokens: int = 1024,
    block_tokens: int = 256, progress: Callable[[str], None] | None = None,
) -> Profile:  # fmt: skip
    """Measure per-layer sensitivities of `model` on `token_ids` and allocate widths for an
    average of at most `target_bits` bits per value (see the module docstring).

    `samples` windows at evenly spaced offsets of `token_ids`, run as one batch, each hold
    `prefix_tokens` (whole blocks of `block_tokens`), the quantized prefix, then
    `continuation_tokens`, the continuation the KL is averaged over."""
    from transformers import DynamicCache

    from kvpool.model_facts import codec_for, model_layout

    widths = sorted(set(widths))
    if not widths or any(w not in SUPPORTED_BITS for w in widths):
        raise CodecError(f"widths {widths} must be from {SUPPORTED_BITS}")
    if prefix_tokens <= 0 or prefix_tokens % block_tokens:
        raise CodecError(f"prefix_tokens {prefix_tokens} must be whole blocks of {block_tokens}")
    span = prefix_tokens + continuation_tokens
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if samples < 1 or len(ids) < samples * span:
        raise CodecError(f"the sample has {len(ids)} tokens; {samples} x {span} are needed")
    starts = [i * (len(ids) - span) // max(samples - 1, 1) for i in range(samples)]
    ids = torch.stack([ids[s : s + span] for s in starts]).to(model.device)
    layers, kv_heads, head_dim = model_layout(model)
    say = progress or (lambda _msg: None)

    def codec(key_bits: Any, value_bits: Any) -> CodecConfig:
        return codec_for(
            model, key_bits, value_bits, group_size, pre_rope=pre_rope,
            hadamard_values=hadamard_values, sink_tokens=sink_tokens,
        )  # fmt: skip

    # KV as [layers, samples * kv_heads, T, head_dim]: the codec treats heads independently,
    # so this quantizes every sample exactly as a pool storing it alone would.
    out = model(ids[:, :prefix_tokens], use_cache=True)
    exact = [
        torch.stack([getattr(layer, name) for layer in out.past_key_values.layers]).flatten(1, 2)
        for name in ("keys", "values")
    ]
    continuation = ids[:, prefix_tokens:]

    def logits_with(kv: list[Tensor]) -> Tensor:
        cache = DynamicCache(config=model.config)
        for layer in range(layers):
            k, v = (x[layer].unflatten(0, (samples, kv_heads)) for x in kv)
            cache.update(k, v, layer)
        return model(continuation, past_key_values=cache).logits.flatten(0, 1)

    ref_logp = torch.log_softmax(logits_with(exact).float(), dim=-1)
    quantized = {w: _roundtrip(exact[0], exact[1], codec(w, w), block_tokens) for w in widths}

    def sq_error(t: int, layer: int, w: int) -> float:
        return float((quantized[w][t][layer] - exact[t][layer]).float().pow(2).sum())

    sensitivity: dict[str, list[list[float]]] = {t: [] for t in TENSORS}
    low = widths[0]
    for t, name in enumerate(TENSORS):
        for layer in range(layers):
            kv = [x.clone() if i == t else x for i, x in enumerate(exact)]
            kv[t][layer] = quantized[low][t][layer]
            kl = _kl(ref_logp, logits_with(kv))
            base = max(sq_error(t, layer, low), 1e-30)
            sensitivity[name].append([kl * sq_error(t, layer, w) / base for w in widths])
            say(f"{name} layer {layer}: KL {kl:.5f} at {low} bits")

    rope = codec(low, low).rope
    profile = Profile(
        model=str(getattr(model.config, "_name_or_path", "") or model.config.model_type),
        layers=layers, kv_heads=kv_heads, head_dim=head_dim, group_size=group_size,
        sink_tokens=sink_tokens, hadamard_values=codec(low, low).hadamard_values,
        rope=asdict(rope) if rope else None, key_bits=[low] * layers, value_bits=[low] * layers,
        target_bits=target_bits, achieved_bits=0.0, context_tokens=context_tokens,
        block_tokens=block_tokens, widths=list(widths), sensitivity=sensitivity,
    )  # fmt: skip
    profile = retarget(profile, target_bits)
    chosen = _roundtrip(exact[0], exact[1], profile_codec(profile), block_tokens)
    profile.sample = {
        "samples": samples, "prefix_tokens": prefix_tokens,
        "continuation_tokens": continuation_tokens, "kl_profile": _kl(ref_logp, logits_with(chosen)),
        f"kl_all_{low}_bit": _kl(ref_logp, logits_with(quantized[low])),
        "kl_unit": "nats per token, mean over the continuation",
    }  # fmt: skip
    return profile


def retarget(profile: Profile, target_bits: float) -> Profile:
    """The same measurements, widths re-allocated for another target (no model needed)."""

    def cost(key_bits: Sequence[int], value_bits: Sequence[int]) -> float:
        trial = replace(profile, key_bits=list(key_bits), value_bits=list(value_bits))
        codec = profile_codec(trial)
        return bits_per_value(
            codec, profile.kv_heads, profile.head_dim, profile.context_tokens, profile.block_tokens
        )

    key_bits, value_bits = allocate(profile.sensitivity, profile.widths, cost, target_bits)
    return replace(
        profile, key_bits=key_bits, value_bits=value_bits, target_bits=target_bits,
        achieved_bits=round(cost(key_bits, value_bits), 6), sample=dict(profile.sample),
    )  # fmt: skip


def default_path(profile: Profile | None = None, **options: Any) -> Path:
    """Where `kvpool calibrate` keeps a profile: .cache/profiles/MODEL-gG-sS-tTARGET.json
    (under KVPOOL_CACHE_DIR when set); give a profile, or its model, group_size, sink_tokens
    and target_bits."""
    fields = asdict(profile) if profile else options
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", str(fields["model"]).split("/")[-1]).lower()
    name = f"{model}-g{fields['group_size']}-s{fields['sink_tokens']}-t{fields['target_bits']:.4g}"
    return Path(os.environ.get("KVPOOL_CACHE_DIR", ".cache")) / "profiles" / f"{name}.json"


# ---- the key basis (codec v2: transform coding of keys) ---------------------------------------

BASIS_WIDTHS = (0, 2, 3, 4, 8)


def calibrate_basis(
    model: Any, token_ids: Sequence[int] | Tensor, *, key_bits: float = 2.0,
    group_size: int = 128, windows: int = 6, window_tokens: int = 1024, pre_rope: bool = True,
    query_weighted: bool = True, predict: bool = False, value_bits: int = 2,
    progress: Callable[[str], None] | None = None, per_head_maps: bool = False,
    symmetric_values: bool = False, map_rank: int = 0, bf16_maps: bool = False,
) -> KeyBasis:  # fmt: skip
    """A key basis for `model` from sample text: per (layer, kv head), the principal components
    of its (pre-RoPE) keys over up to `windows` windows of `window_tokens` tokens of the sample
    (each window's first token, the attention sink, left out), and widths for about `key_bits`
    bits per key value, the groups' fp16 scales and minimums included (see `allocate_bands`).

    query_weighted: a component's error is weighed by the energy the model's queries put on it
    (E[(q . u)^2] for component u, from the same windows), since a key's error reaches the
    model only through q . k; otherwise by its variance alone. Measured on development text
    (benchmarks/levers.py), weighing cut the keys' share of the KL by about a third at 2.0 bits.

    predict: also fit inter-layer prediction maps (see KeyBasis), in the closed loop the codec
    runs: layer by layer over the sample, least squares from the layer before as rebuilt from
    its codes, the basis and widths of what the keys' prediction misses, and the values'
    residual quantized as blocks will be (Hadamard-rotated, `value_bits` per token;
    `symmetric_values`: in symmetric groups, one scale and no minimum, as CodecConfig's option).
    per_head_maps: block-diagonal maps, each head predicted from its own head only.
    map_rank: maps of this rank (0: full), stored as two factors (see KeyBasis): each the full
    least-squares map projected on the `map_rank` leading directions of what it predicts
    (reduced-rank regression).
    bf16_maps: the maps rounded to bfloat16 as each is fitted, so that the closed loop rebuilds
    the next layers with the bfloat16 products the codec will run (see KeyBasis)."""
    from kvpool.model_facts import rope_params

    rope = rope_params(model) if pre_rope else None
    if pre_rope and rope is None:
        raise CodecError("this model's RoPE cannot be undone exactly: use pre_rope=False")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    count = min(windows, len(ids) // window_tokens)
    if count < 1:
        raise CodecError(f"the sample has {len(ids)} tokens; at least {window_tokens} are needed")
    say = progress or (lambda _msg: None)
    total: Tensor | None = None
    outer: Tensor | None = None
    queries = _QueryEnergy(model) if query_weighted else None
    kept: list[tuple[Tensor, Tensor]] = []  # predict: whole groups of each window's keys, values
    n = 0
    for w in range(count):
        say(f"keys of window {w + 1}/{count}")
        chunk = ids[w * window_tokens : (w + 1) * window_tokens].to(model.device)
        with torch.inference_mode(), queries or contextlib.nullcontext():
            cache = model(chunk[None], use_cache=True).past_key_values
        keys = torch.stack([layer.keys[0] for layer in cache.layers]).float().cpu()
        if rope is not None:
            keys = undo_rope(keys, rope, 0)
        if predict:
            values = torch.stack([layer.values[0] for layer in cache.layers]).float().cpu()
            whole = (keys.shape[2] - 1) // group_size * group_size
            kept.append((keys[:, :, 1 : 1 + whole], values[:, :, 1 : 1 + whole]))
            continue
        keys = keys[:, :, 1:].double()  # [L, H, T, D], without the sink
        total = keys.sum(2) if total is None else total + keys.sum(2)
        part = keys.transpose(-1, -2) @ keys
        outer = part if outer is None else outer + part
        n += keys.shape[2]
    weights = queries.energy(rope) if queries is not None else None
    if predict:
        if not kept[0][0].shape[2]:
            raise CodecError(f"windows of {window_tokens} tokens hold no group of {group_size}")
        say("prediction maps, layer by layer")
        keys, values = (torch.cat(parts, 2) for parts in zip(*kept, strict=True))
        return _fit_predicted(keys, values, weights, key_bits, group_size, value_bits,
                              per_head_maps, symmetric_values, map_rank, bf16_maps)  # fmt: skip
    assert total is not None and outer is not None
    mean = total / n
    covariance = outer / n - mean[..., :, None] * mean[..., None, :]
    rotation, energy = principal(covariance, weights)
    widths = allocate_bands(energy.mean(1).float(), key_bits, group_size)
    say(f"basis: {sum(widths) / len(widths):.3f} code bits per key value")
    return KeyBasis(mean.float(), rotation.float().contiguous(), widths)


def _fit_predicted(
    keys: Tensor, values: Tensor, query: Tensor | None, key_bits: float, group_size: int,
    value_bits: int, per_head: bool = False, symmetric_values: bool = False, rank: int = 0,
    bf16: bool = False,
) -> KeyBasis:  # fmt: skip
    """The closed-loop fit of a predicting KeyBasis on pre-RoPE keys and values [L, H, N, D]
    (N in whole groups), run as the codec's own `predicted_loop`: for each layer, the key
    prediction (layer 0: the mean; then least squares on the layer before as rebuilt), the
    residual's basis and widths, the residual coded and decoded with the codec's own quantizer,
    then the same for the values."""
    from kvpool.kernels import reference
    from kvpool.kernels.transforms import hadamard

    layers, heads, _, dim = keys.shape
    mean = torch.zeros(layers, heads, dim)
    mean[0] = keys[0].mean(1)
    rotations = torch.zeros(layers, heads, dim, dim)
    widths: list[int] = []
    maps: tuple[list[Tensor], list[Tensor]] = ([], [])
    value_group = min(group_size, dim)

    def fit(i: int) -> Callable[[int, list[Tensor]], Tensor]:
        def step(layer: int, inputs: list[Tensor]) -> Tensor:
            target = (keys, values)[i][layer]
            if per_head:  # [H, k D + 1, D]: head h from head h of the inputs
                maps[i].append(torch.stack([
                    least_squares([x[h : h + 1] for x in inputs], target[h : h + 1])
                    for h in range(heads)
                ]))  # fmt: skip
            elif rank:
                maps[i].append(reduced_rank(inputs, target, rank))
            else:
                maps[i].append(least_squares(inputs, target))
            if bf16:  # what the codec will multiply by, from here on in the loop too
                maps[i][-1] = maps[i][-1].bfloat16()
            return maps[i][-1]

        return step

    def key_residual(layer: int, pk: Tensor) -> Tensor:
        residual = (keys[layer] - pk).double()
        covariance = residual.transpose(-1, -2) @ residual / residual.shape[1]
        rotation, energy = principal(covariance, None if query is None else query[layer])
        w = allocate_bands(energy.mean(0, keepdim=True).float(), key_bits, group_size)
        widths.extend(w)
        rotations[layer] = rotation.float()
        components = residual.float() @ rotations[layer]
        coded = torch.zeros_like(components)
        for c, bits in enumerate(w):
            if bits:
                part = components[:, :, c * CHUNK : (c + 1) * CHUNK].contiguous()
                q = reference.quantize(part, True, group_size, bits)
                coded[:, :, c * CHUNK : (c + 1) * CHUNK] = reference.dequantize(
                    *q, True, group_size, torch.float32
                )
        return coded @ rotations[layer].transpose(-1, -2)

    def value_residual(layer: int, pv: Tensor) -> Tensor:
        q = reference.quantize(hadamard(values[layer] - pv).contiguous(), False, value_group,
                               value_bits, symmetric_values)  # fmt: skip
        return hadamard(reference.dequantize(*q, False, value_group, torch.float32))

    rebuilt = (torch.empty_like(keys), torch.empty_like(values))
    predicted_loop(rebuilt, mean[0], fit(0), fit(1), key_residual, value_residual)
    return KeyBasis(
        mean,
        rotations.contiguous(),
        tuple(widths),
        torch.stack(maps[0]).contiguous(),
        torch.stack(maps[1]).contiguous(),
    )


def principal(covariance: Tensor, query: Tensor | None) -> tuple[Tensor, Tensor]:
    """Covariances [..., D, D] -> (components [..., D, D] by decreasing variance, each
    component's energy [..., D]: its variance, times the queries' energy on it when `query`
    [..., D] (per channel) is given)."""
    variance, rotation = torch.linalg.eigh(covariance)  # ascending
    variance, rotation = variance.flip(-1).clamp_min(0), rotation.flip(-1)
    if query is None:
        return rotation, variance
    return rotation, variance * torch.einsum("...ij,...i->...j", rotation**2, query)


def least_squares(inputs: list[Tensor], target: Tensor) -> Tensor:
    """The map [rows + 1, H * D] (last row: bias) that best takes `inputs` to `target` [H, N, D],
    with a small ridge (1e-3 of the mean diagonal) that keeps it well-conditioned."""
    x = torch.cat([as_rows(inputs), torch.ones(target.shape[1], 1)], 1).double()
    gram = x.T @ x
    ridge = 1e-3 * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(gram + ridge, x.T @ as_rows([target]).double()).float()


def reduced_rank(inputs: list[Tensor], target: Tensor, rank: int) -> Tensor:
    """The rank-`rank` map [rows + 1 + H * D, rank] (KeyBasis's two factors: down, its last row
    the bias, then up transposed) from `inputs` to `target` [H, N, D]: the least-squares map
    projected on the `rank` leading right singular vectors of the values it fits."""
    if not 0 < rank < target.shape[0] * target.shape[2]:
        raise CodecError(f"a map's rank must be in 1..{target.shape[0] * target.shape[2] - 1}")
    full = least_squares(inputs, target)
    fitted = torch.addmm(full[-1], as_rows(inputs), full[:-1])  # what it predicts, as rows
    up = torch.linalg.svd(fitted.double(), full_matrices=False)[2][:rank].T.float()  # [HD, r]
    return torch.cat([full @ up, up]).contiguous()


class _QueryEnergy:
    """While entered: the mean square of each layer's queries per channel, before RoPE (the
    output of `self_attn.q_proj`, as in Llama-family models), averaged over each kv head's
    query heads: `energy(rope)` [L, H_kv, D], float64."""

    def __init__(self, model: Any) -> None:
        from kvpool.model_facts import model_layout

        try:
            self.projections = [layer.self_attn.q_proj for layer in model.model.layers]
        except AttributeError:
            raise CodecError(
                "query weights need model.model.layers[i].self_attn.q_proj; "
                "calibrate with query_weighted=False (--no-query-weights)"
            ) from None
        self.layers, self.kv_heads, self.head_dim = model_layout(model)
        self.sums = torch.zeros(self.layers, self.kv_heads, self.head_dim, dtype=torch.float64)
        self.rows = 0
        self.hooks: list[Any] = []

    def _hook(self, layer: int) -> Callable[..., None]:
        def record(_module: Any, _inputs: Any, out: Tensor) -> None:
            q = out.detach().reshape(-1, out.shape[-1] // self.head_dim, self.head_dim)
            per_kv = q.shape[1] // self.kv_heads
            energy = q.double().pow(2).sum(0).reshape(self.kv_heads, per_kv, self.head_dim)
            self.sums[layer] += energy.mean(1).cpu()
            if layer == 0:
                self.rows += q.shape[0]

        return record

    def __enter__(self) -> _QueryEnergy:
        self.hooks = [
            p.register_forward_hook(self._hook(i)) for i, p in enumerate(self.projections)
        ]
        return self

    def __exit__(self, *_exc: object) -> None:
        for h in self.hooks:
            h.remove()

    def energy(self, rope: RopeParams | None) -> Tensor:
        e = self.sums / max(self.rows, 1)
        if rope is not None:  # RoPE turns channels i and i + r/2 into each other: share them
            half = rope.rotary_dim // 2
            pair = (e[..., :half] + e[..., half : 2 * half]) / 2
            e = torch.cat([pair, pair, e[..., 2 * half :]], -1)
        return e


def allocate_bands(variance: Tensor, key_bits: float, group_size: int) -> tuple[int, ...]:
    """Widths per 8 components for components of `variance` [L, D] (sorted, largest first):
    every layer starts with none stored; repeatedly raise the width (0 -> 2 -> 3 -> 4 -> 8) of
    the chunk that removes the most estimated error per bit (variance * 4^-width summed over
    its components; a chunk never wider than the one before it), while each layer's bits per
    key value, with 32 / G bits of fp16 scale and minimum per stored component, stay within
    `key_bits`. Reverse water-filling in steps the block format can store."""
    layers, dim = variance.shape
    chunks = variance.reshape(layers, dim // CHUNK, CHUNK).sum(-1).tolist()
    budget, params = key_bits * dim, 32 / group_size
    widths: list[int] = []
    for layer in range(layers):
        w = [0] * (dim // CHUNK)
        spent = 0.0
        while True:
            best, pick, pick_cost = 0.0, -1, 0.0
            for c, energy in enumerate(chunks[layer]):
                i = BASIS_WIDTHS.index(w[c])
                if i + 1 == len(BASIS_WIDTHS) or (c > 0 and w[c - 1] <= w[c]):
                    continue
                new = BASIS_WIDTHS[i + 1]
                cost = CHUNK * (new - w[c] + (params if w[c] == 0 else 0))
                gain = energy * (4.0 ** -w[c] - 4.0**-new) / cost
                if spent + cost <= budget + 1e-9 and gain > best:
                    best, pick, pick_cost = gain, c, cost
            if pick < 0:
                break
            w[pick] = BASIS_WIDTHS[BASIS_WIDTHS.index(w[pick]) + 1]
            spent += pick_cost
        widths += w
    return tuple(widths)


def basis_path(model: str, options: Any) -> Path:
    """Where `kvpool calibrate --basis` keeps a key basis:
    .cache/profiles/MODEL-basis-gG-kBITS[-postrope][-qw][-pred[-head][-rankR][-bf16][-vsym]].pt
    (under KVPOOL_CACHE_DIR when set; -qw: widths allocated by query-weighted error, the
    default; -pred: with inter-layer prediction maps; -head: per-head maps; -rankR: maps of rank
    R; -bf16: bfloat16 maps; -vsym: fitted for symmetric value groups)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.split("/")[-1]).lower()
    rope = "-postrope" if getattr(options, "no_pre_rope", False) else ""
    weights = "" if getattr(options, "no_query_weights", False) else "-qw"
    predict = "-pred" if getattr(options, "predict", False) else ""
    if predict and getattr(options, "per_head_maps", False):
        predict += "-head"
    rank: int = getattr(options, "map_rank", 0)
    if predict and rank:
        predict += f"-rank{rank}"
    if predict and getattr(options, "bf16_maps", False):
        predict += "-bf16"
    if predict and getattr(options, "symmetric_values", False):
        predict += "-vsym"
    file = f"{name}-basis-g{options.group_size}-k{options.key_bits:.4g}{rope}{weights}{predict}.pt"
    return Path(os.environ.get("KVPOOL_CACHE_DIR", ".cache")) / "profiles" / file


def basis_sample(tokenizer: Any) -> list[int]:
    """Token ids for `calibrate_basis`: the profile's sample (`default_sample`) and code, the
    standard library's argparse.py source."""
    import argparse

    code = Path(argparse.__file__).read_text()
    return default_sample(tokenizer) + list(tokenizer(code).input_ids)


def default_sample(tokenizer: Any) -> list[int]:
    """Token ids of calibration text that ships with Python: the reference manual's sections on
    compound statements and on the standard types (pydoc_data), no download."""
    from pydoc_data.topics import topics

    return list(tokenizer(topics["compound"] + "\n\n" + topics["types"]).input_ids)


def summary(profile: Profile) -> str:
    """A few lines for a terminal: widths per layer, the budget and the measured KL."""
    kl = {k: v for k, v in profile.sample.items() if k.startswith("kl_")}
    return "\n".join(
        [
            f"model {profile.model}: {profile.layers} layers, target {profile.target_bits} bits "
            f"per value, achieved {profile.achieved_bits:.4f} "
            f"(x{16 / profile.achieved_bits:.2f} vs fp16, {profile.context_tokens}-token prefix)",
            "key bits:   " + " ".join(map(str, profile.key_bits)),
            "value bits: " + " ".join(map(str, profile.value_bits)),
            "KL on the sample: "
            + ", ".join(f"{k[3:]} {v:.4f}" for k, v in kl.items() if isinstance(v, float)),
        ]
    )
