"""Attention straight from packed KV: decode steps that read the codec's 2/3/4-bit codes in place.

Where it stands: kvpool.client.packed keeps a layer's prefix packed, exactly as the codec wrote
it into blocks (sections concatenated along tokens), and calls `packed_attention` for each decode
step; the fp16/fp32 window of recent tokens and the exact sink tokens are attended in torch and
merged by log-sum-exp. Nothing is expanded to a full-precision cache.

    q [B, Hq, Q, D] --scores over packed keys (dequantized per row, RoPE redone per position)--
        softmax over the packed tokens (lse kept) --p . V over packed values-- (Hadamard undone once)
        --> (o [B, Hq, Q, D], lse [B, Hq, Q]) --merge with the exact window--> attention output

The layout (`PackedKV`, shapes and all) is packed_kv.py's.

Codec v2 keys in a key basis (KEY_BASIS, no maps) are attended packed too, but not by projecting
the query into the basis once. A key is stored pre-RoPE as components c in the basis of its
(layer, head), k = mu + R c, and the model attends to RoPE_p(k) at the key's position p:

    q . RoPE_p(mu + R c) = (RoPE_p^T q) . mu + (R^T RoPE_p^T q) . c

RoPE_p turns each channel pair (a, a + D/2) by its own angle p * theta_a, and R mixes channels of
every frequency, so R^T RoPE_p^T q changes with p: "project once, q . mu + (R^T q) . c" holds
only without RoPE (or for an R that maps each rotation plane onto itself and commutes with the
turn, which a PCA basis does not). Splitting by frequency does not save it either: with
A_a = the rows a and a + D/2 of R weighted by q's pair, the score is sum_a cos(p theta_a) (.) +
sin(p theta_a) (.), each term an [n]-vector dot with c: D * n products per token and query row,
what rebuilding the key costs, times the R query rows of a kv head. So the C loop rebuilds each
row from its components in scratch (mu + R c: D * n products per token and kv head, R stays in
cache), redoes RoPE and scores it against all R query rows, the layer never materialized
(`scores_basis_impl` in _cpu_attention.c). That is n times the dequantize work of KIVI keys:
2.1-2.4x one SDPA layer over fp32 keys at 4K tokens here, a SmolLM2 decode step 1.2-1.3x the
DynamicCache's (benchmarks/results/2026-12-07-attention-cpu.log). On CUDA, v2 rows are dequantized then attended (no Triton loop
yet).

Blocks of codec v2 with inter-layer prediction (PREDICTED) are decoded, never attended packed:
a predicted layer's codes are only the residual of a prediction from the layer before as
rebuilt, keys from [K_l-1, V_l-1] and values from [K_l, K_l-1, V_l-1] through the maps (a dense
[2HD + 1, HD] product per token, heads mixed; per-head maps still mix K and V), so q . k at
layer l needs every token of layer l - 1 rebuilt first, and that one of l - 2, down to layer 0:
attending layer l packed would mean rebuilding layers 0..l every decode step (L(L+1)/2 layer
rebuilds per step instead of L once). The whole stack is rebuilt once, as the block is added
(kvpool.packed keeps those rows exact), and attention then reads the rebuilt rows.

Three interchangeable backends give the same result within float tolerance: "reference"
(dequantize, then attend: the spec, below), "cpu" (the C loop: cpu_attention.py and
_cpu_attention.c) and "triton" (CUDA, triton_attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvpool.kernels import reference
from kvpool.kernels.packed_kv import PackedKV, check_query, rope_at, row_positions
from kvpool.kernels.transforms import hadamard, rotated
from kvpool.proto.errors import CodecError


def dequantize(kv: PackedKV) -> tuple[Tensor, Tensor]:
    """The packed rows as the model would hold them: keys (RoPE redone) and values (Hadamard
    undone), float32 [B, H, T, D]. The spec the fused paths are held to."""
    t, d, g, gv = kv.tokens, kv.head_dim, kv.group, kv.value_group
    if kv.key_runs:  # components, run by run, then mean + rows^T c
        at, parts = 0, []
        for ch, bits in kv.key_runs:
            parts.append(reference.unpack(kv.key_codes[:, :, :t, at : at + ch * bits // 8], bits,
                                          ch).float())  # fmt: skip
            at += ch * bits // 8
        codes = torch.cat(parts, dim=-1)
    else:
        codes = reference.unpack(kv.key_codes[:, :, :t], kv.key_bits, d).float()
    scale = kv.key_scales[:, :, : t // g].float().repeat_interleave(g, dim=2)
    keys = codes * scale + kv.key_mins[:, :, : t // g].float().repeat_interleave(g, dim=2)
    if kv.key_basis is not None:
        mean, rows = kv.key_basis
        keys = keys @ rows + mean[:, None]  # [B, H, T, n] @ [H, n, D]
    if kv.rope is not None:
        turned = rotated(keys, *rope_at(kv.rope, row_positions(kv)), 1.0)
        keys = torch.cat((turned, keys[..., kv.rope.rotary_dim :]), dim=-1)
    codes = reference.unpack(kv.value_codes[:, :, :t], kv.value_bits, d).float()
    scale = kv.value_scales[:, :, :t].float().repeat_interleave(gv, dim=3)
    values = codes * scale + kv.value_mins[:, :, :t].float().repeat_interleave(gv, dim=3)
    if kv.hadamard_values:
        values = hadamard(values)
    return keys, values


def attention_reference(q: Tensor, kv: PackedKV, skip: int = 0) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, Q, D] (pre-scaled) over the packed rows skip..T-1: its output
    o [B, Hq, Q, D] and log-sum-exp lse [B, Hq, Q], float32 (lse -inf, o 0 if no row counts)."""
    r = check_query(q, kv)
    keys, values = dequantize(kv)
    keys, values = keys[:, :, skip:], values[:, :, skip:]
    scores = q.float() @ keys.repeat_interleave(r, dim=1).transpose(-1, -2)
    return _softmax_output(scores, values.repeat_interleave(r, dim=1))


def _softmax_output(scores: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.clamp_min(torch.finfo(torch.float32).min).unsqueeze(-1))
    return p @ values, lse


def exact_attention(
    q: Tensor, keys: Tensor, values: Tensor, causal: int = 0
) -> tuple[Tensor, Tensor]:
    """(o, lse) of q [B, Hq, Q, D] (pre-scaled) over exact keys/values [B, H, N, D]; causal > 0:
    the last `causal` rows are the queries' own tokens, each sees those up to itself. The R
    query heads of a kv head are one [R * Q, D] matrix against its keys: nothing repeated."""
    b, hq, nq, d = q.shape
    h, n = keys.shape[1], keys.shape[2]
    qf = q.float().reshape(b, h, hq // h * nq, d)
    scores = qf @ keys.float().transpose(-1, -2)  # [B, H, R * Q, N]
    if causal:
        rows = (torch.arange(hq // h * nq, device=q.device) % nq + (n - nq))[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    o, lse = _softmax_output(scores, values.float())
    return o.view(b, hq, nq, d), lse.view(b, hq, nq)


def merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Attention over the union of disjoint sets of rows from each set's (o, lse)."""
    lse = torch.stack([p[1] for p in parts])  # [n, B, Hq, Q]
    weights = torch.softmax(lse, dim=0).nan_to_num(0.0)
    return sum((w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts, strict=True)),
               torch.zeros_like(parts[0][0]))  # fmt: skip


def packed_attention(
    q: Tensor, kv: PackedKV, skip: int = 0, exact: Sequence[tuple[Tensor, Tensor, int]] = (),
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(o, lse) of q [B, Hq, Q, D] (pre-scaled, any float dtype) over packed rows skip..T-1 and
    the exact segments (keys, values [B, H, n, D], causal: `exact_attention`), on the fastest
    backend for q's device: Triton on CUDA, the C loop on the CPU (one call for all of it)."""
    check_query(q, kv)
    if not 0 <= skip <= kv.tokens:
        raise CodecError(f"skip {skip} outside 0..{kv.tokens}")
    for keys, values, causal in exact:
        if (
            keys.shape != values.shape
            or keys.shape[:2] != (kv.batch, kv.heads)
            or not 0 <= causal <= min(q.shape[2], keys.shape[2])
        ):
            raise CodecError(f"an exact segment of {tuple(keys.shape)} does not fit this layer")
    if backend in ("auto", "cpu") and q.device.type == "cpu" and kv.head_dim % 16 == 0:
        from kvpool.kernels import cpu_attention

        return cpu_attention.packed_attention(q, kv, skip, exact)
    if backend == "reference" or kv.key_runs:  # keys in a basis off the CPU: no Triton loop yet
        part = attention_reference(q, kv, skip)
    elif backend == "triton" or (backend == "auto" and q.device.type == "cuda"):
        from kvpool.kernels import triton_attention

        part = triton_attention.packed_attention(q, kv, skip)
    else:
        raise CodecError(f"backend {backend!r} cannot run on device {q.device}")
    if not exact:
        return part
    parts = [part, *(exact_attention(q, k, v, c) for k, v, c in exact)]
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    return merge(parts), lse


def window_scores_reference(q: Tensor, keys: Tensor) -> Tensor:
    """MiniKV/SnapKV's selection score: the attention each key receives from the last W queries
    of the prompt, summed over those queries and over the query heads of its kv head.

    q [B, Hq, W, D] (pre-scaled; the prompt's last W tokens) and keys [B, H, N, D] (exact, the
    whole prompt, N >= W; query i sits at position N - W + i and sees keys up to it, causal)
    -> scores float32 [B, H, N]."""
    r = q.shape[1] // keys.shape[1]
    scores = q.float() @ keys.float().repeat_interleave(r, dim=1).transpose(-1, -2)
    n, w = keys.shape[2], q.shape[2]
    rows = torch.arange(w, device=q.device)[:, None] + (n - w)
    scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, float("-inf"))
    p = torch.softmax(scores, dim=-1)  # [B, Hq, W, N]
    return p.sum(dim=2).view(q.shape[0], keys.shape[1], r, n).sum(dim=2)


def window_scores(q: Tensor, keys: Tensor, block: int = 1024) -> Tensor:
    """`window_scores_reference` without the [W, N] matrix of every head at once: two passes
    over key blocks (the log-sum-exp of each query row, then each key's share), as a
    flash-attention loop would; Triton on CUDA, blockwise torch elsewhere."""
    if (
        q.dim() != 4
        or keys.dim() != 4
        or q.shape[-1] != keys.shape[-1]
        or q.shape[1] % keys.shape[1]
    ):
        raise CodecError(f"q {tuple(q.shape)} and keys {tuple(keys.shape)} do not match")
    if q.shape[2] > keys.shape[2]:
        raise CodecError("the query window is longer than the prompt")
    if q.device.type == "cuda":
        from kvpool.kernels import triton_attention

        return triton_attention.window_scores(q, keys)
    b, hq, w, _ = q.shape
    h, n = keys.shape[1], keys.shape[2]
    r = hq // h
    qf = q.float().reshape(b, h, r * w, -1)
    pos = (torch.arange(w, device=q.device) + (n - w)).repeat(r)  # [R * W]: each row's position
    lse = torch.full((b, h, r * w), float("-inf"), device=q.device)
    for lo in range(0, n, block):  # pass 1: log-sum-exp of each query row
        s = _window_block(qf, keys, pos, lo, block)
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    out = torch.empty(b, h, n, device=q.device)
    for lo in range(0, n, block):  # pass 2: what each key receives
        s = _window_block(qf, keys, pos, lo, block)
        out[:, :, lo : lo + block] = torch.exp(s - lse.unsqueeze(-1)).sum(dim=2)
    return out


def _window_block(qf: Tensor, keys: Tensor, pos: Tensor, lo: int, block: int) -> Tensor:
    k = keys[:, :, lo : lo + block].float()
    s = qf @ k.transpose(-1, -2)  # [B, H, R * W, block]
    cols = torch.arange(lo, lo + k.shape[2], device=qf.device)
    return s.masked_fill(cols[None, :] > pos[:, None], float("-inf"))
