"""A transformers cache that keeps the prompt's KV packed, and attends to it without expanding it.

Where it stands: inside an inference worker, in place of a DynamicCache. Blocks fetched from the
tier go in as they came (their sections, already in the attention kernels' layout); tokens the
model computes go to a full-precision window and are folded into packed rows, G at a time, once
more than `window` recent tokens are held.

    fetched blocks --verify--> sections per layer (no decoding) ----------------+
    model's new K/V --> exact window (the last `window`..`window + G` tokens) --fold (encode)--+
                                                                                  v
    decode step: q --packed_attention (C loop / Triton)--> (o, lse) --merge-- exact window, sinks
    prefill (Q > 16 queries): the packed rows are dequantized for that call and SDPA runs

Codecs: v1 (KIVI-layout keys) and v2 with a key basis are attended packed (v2's keys: each
row rebuilt from its components in the C loop, see kernels/attention.py); v2 blocks with
inter-layer prediction (PREDICTED) are decoded once as they are added, the whole stack (layer l
is a residual of a prediction from layer l - 1 as rebuilt, so no layer can be read alone), and
their rows kept exact; tokens the model computes are then folded in the basis without the maps.

MiniKV's request-private selection (`Selection`): after a prefill the cache keeps, per layer
and kv head, the tokens that received most attention from the prompt's last queries plus the
recent window (budgets shrinking with depth), and quantizes only those. What it keeps depends
on the question, so these rows are never stored in the shared tier.

Batch 1 (one sequence), like CachedModel. Call `use_packed_attention(model)` once: it registers
the attention function that recognises this cache's layers (and runs SDPA for anything else).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpool.kernels.attention import dequantize, merge, packed_attention, window_scores
from kvpool.kernels.basis import KeyBasis
from kvpool.kernels.codec import CodecConfig, decode_plan, encode, verified_payload
from kvpool.kernels.packed_kv import PackedKV, block_layer, block_sinks, rope_at
from kvpool.kernels.transforms import RopeParams, rotated
from kvpool.proto.blockformat import CHUNK, BlockHeader, Flag
from kvpool.proto.errors import CodecError

ATTENTION = "kvpool_packed"
FUSED_QUERIES = 16  # up to this many query tokens attend through the packed kernels
# Recent tokens kept exact. On SmolLM2-135M (difflib.py, 4096 + 512 tokens, K3V2) a window of
# 64 / 128 / 256 / 640 cost +12.1 / +9.2 / +6.9 / +6.8% perplexity against +6.8% for the same
# blocks decoded: this small model leans on its last few hundred tokens.
WINDOW = 256
# Key and value widths of the tokens decode steps add, once they leave the window (None: the
# codec's). On the same difflib.py run (window 256), the continuation folded at K3V2 / K4V4 /
# K8V8 cost +6.94 / +6.85 / +6.81% against +6.81% for the blocks decoded, for 35.2 / 35.6 /
# 36.3 MB: generated tokens are few next to a long prompt, and the model leans on them.
FOLD_BITS: tuple[int, int] | None = (4, 4)


def use_packed_attention(model: Any) -> None:
    """Make `model` attend through `packed_attention` when its cache is a PackedCache (and
    through PyTorch SDPA, as before, with any other cache)."""
    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def _attention(
    module: Any, query: Tensor, key: Any, value: Any, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[Tensor, None]:  # fmt: skip
    if isinstance(key, PackedLayer):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return key.attend(query, scale), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


@dataclass(frozen=True)
class Selection:
    """MiniKV-style layer-discriminative selection, applied once after a prefill.

    keep: the fraction of the prompt's tokens kept on average over layers; pyramid: how much
    the budget leans to the first layers (layer l of L keeps keep * (1 + pyramid * (1 - 2l /
    (L - 1))) of the tokens); queries: the prompt's last tokens whose attention scores the
    rest (SnapKV's observation window)."""

    keep: float = 0.5
    pyramid: float = 0.5
    queries: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1 or not 0 <= self.pyramid < 1 or self.queries <= 0:
            raise ValueError("keep in (0, 1], pyramid in [0, 1), queries > 0")

    def budget(self, layer: int, layers: int) -> float:
        tilt = 1 - 2 * layer / (layers - 1) if layers > 1 else 0.0
        return min(1.0, self.keep * (1 + self.pyramid * tilt))


class PackedLayer(CacheLayerMixin):
    """One layer: packed rows (growing buffers, `PackedKV` layout), the exact sink tokens, and
    an exact window of the most recent tokens [1, H, n, D] in the model's dtype."""

    is_sliding = False
    is_compileable = False

    def __init__(self, codec: CodecConfig, layer: int, layers: int, window: int,
                 selection: Selection | None = None, device: torch.device | None = None,
                 fold_bits: tuple[int, int] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.home = device or torch.device("cpu")  # where the packed rows live
        self.basis = codec.key_basis  # the blocks' (all layers), or None
        key_bits, value_bits = codec.bits_per_layer(layers)
        self.codec = replace(codec, key_bits=key_bits[layer], value_bits=value_bits[layer],
                             key_basis=layer_basis(self.basis, layer))  # fmt: skip
        self.layer, self.layers, self.window, self.selection = layer, layers, window, selection
        self.fold_codec = None  # decode steps' tokens, folded at their own widths
        if fold_bits is not None:
            self.fold_codec = replace(self.codec, key_bits=fold_bits[0], value_bits=fold_bits[1],
                                      sink_tokens=0)  # fmt: skip
        self.packed: PackedKV | None = None  # capacity may exceed packed.tokens
        self.recent: PackedKV | None = None  # rows folded by decode steps (fold_codec), positioned
        self.sinks: tuple[Tensor, Tensor] | None = None  # exact [1, H, S, D]
        self.decoded: tuple[Tensor, Tensor] | None = None  # predicted blocks' rows [1, H, n, D]
        self.seen = 0  # positions so far: the next token's position
        self.selected = False
        self._buffers: tuple[Tensor, Tensor] | None = None  # the window's storage
        self.record = 0  # tokens still to copy into `recorded` (exact, for storing blocks)
        self.recorded: list[tuple[Tensor, Tensor]] = []

    # ---- CacheLayerMixin ----------------------------------------------------------------

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[:, :, :0]
        self.keys, self.values = empty, value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        """Appends the new tokens to the exact window; returns this layer twice, which the
        registered attention function recognises (see `attend`)."""
        if key_states.shape[0] != 1:
            raise ValueError("a PackedCache holds one sequence (batch 1)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        self._push(key_states, value_states)
        self.seen += key_states.shape[-2]
        if self.record > 0:
            n = min(self.record, key_states.shape[-2])
            self.recorded.append((key_states[0, :, :n].clone(), value_states[0, :, :n].clone()))
            self.record -= n
        return self, self

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self._buffers = None
        self.packed, self.recent, self.sinks, self.seen, self.selected = None, None, None, 0, False
        self.decoded = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a PackedCache holds one sequence: no beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a PackedCache holds one sequence")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("a PackedCache holds one sequence")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a PackedCache cannot drop packed tokens")

    # ---- attention ----------------------------------------------------------------------

    def attend(self, query: Tensor, scale: float) -> Tensor:
        """Attention of query [1, Hq, Q, D] (the newest Q tokens, already in the window) over
        everything this layer holds -> [1, Q, Hq, D] as transformers' attention functions
        return it. Then the window is folded (or, after a prefill, selected) into packed rows."""
        assert self.keys is not None and self.values is not None
        nq = query.shape[2]
        if nq > FUSED_QUERIES or self.packed is None:
            out = self._attend_expanded(query, scale)
        else:
            q = query * scale if query.dtype == torch.float32 else query.float() * scale
            exact = [(self.keys, self.values, nq)]
            if self.sinks is not None:
                exact.insert(0, (*self.sinks, 0))
            if self.decoded is not None:  # predicted blocks' rows (their sinks among them)
                exact.insert(0, (*self.decoded, 0))
            out, lse = packed_attention(q, self.packed, self._sink_rows(), exact)
            if self.recent is not None:
                out = merge([(out, lse), packed_attention(q, self.recent)])
        if self.selection is not None and not self.selected and nq > 1:
            self._select(query, scale)
        self._fold(decoding=nq <= FUSED_QUERIES)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def _attend_expanded(self, query: Tensor, scale: float) -> Tensor:
        """SDPA over the packed rows dequantized for this call, the sinks and the window."""
        assert self.keys is not None and self.values is not None
        keys, values = [self.keys], [self.values]
        for part, s in ((self.recent, 0), (self.packed, self._sink_rows())):
            if part is not None:  # cached rows in any order: only the window's are masked
                pk, pv = dequantize(part)
                keys.insert(0, pk[:, :, s:].to(self.dtype))
                values.insert(0, pv[:, :, s:].to(self.dtype))
        for exact in (self.sinks, self.decoded):
            if exact is not None:
                keys.insert(0, exact[0].to(self.dtype))
                values.insert(0, exact[1].to(self.dtype))
        k, v = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        nq, n = query.shape[2], k.shape[2]
        mask = None
        if n > nq:  # every cached row is visible; the new rows causally
            cols = torch.arange(n, device=query.device)
            mask = cols[None, :] <= torch.arange(nq, device=query.device)[:, None] + (n - nq)
        return F.scaled_dot_product_attention(
            query, k, v, attn_mask=mask, is_causal=mask is None and nq > 1, scale=scale,
            enable_gqa=True,
        )  # fmt: skip

    def _push(self, keys: Tensor, values: Tensor) -> None:
        """Append rows to the exact window: buffers with room for window + 2G rows, so that a
        decode step writes its row and copies nothing else."""
        assert self.keys is not None and self.values is not None
        n, q = self.keys.shape[2], keys.shape[2]
        if self._buffers is None or n + q > self._buffers[0].shape[2]:
            cap = max(n + q, self.window + 2 * self.codec.group_size)
            shape = (1, keys.shape[1], cap, keys.shape[3])
            new = tuple(torch.empty(shape, dtype=keys.dtype, device=keys.device) for _ in "kv")
            new[0][:, :, :n], new[1][:, :, :n] = self.keys, self.values
            self._buffers = (new[0], new[1])
        k, v = self._buffers
        k[:, :, n : n + q], v[:, :, n : n + q] = keys, values
        self.keys, self.values = k[:, :, : n + q], v[:, :, : n + q]

    def _drop(self, rows: int) -> None:
        """Forget the window's first `rows` rows (packed, or selected away); a buffer a prefill
        made large is given back."""
        assert self.keys is not None and self.values is not None and self._buffers is not None
        n = self.keys.shape[2]
        rest = n - rows
        small = self.window + 2 * self.codec.group_size
        if self._buffers[0].shape[2] > 2 * small:
            shape = (*self.keys.shape[:2], max(small, rest), self.keys.shape[3])
            new = tuple(torch.empty(shape, dtype=self.dtype, device=self.keys.device) for _ in "kv")
            self._buffers = (new[0], new[1])
        k, v = self._buffers
        k[:, :, :rest], v[:, :, :rest] = (
            self.keys[:, :, rows:].clone(),
            self.values[:, :, rows:].clone(),
        )
        self.keys, self.values = k[:, :, :rest], v[:, :, :rest]

    def _sink_rows(self) -> int:
        """Leading packed rows that hold filler codes: the sinks, kept exactly elsewhere."""
        return 0 if self.sinks is None or self.selected else self.sinks[0].shape[2]

    # ---- packing ------------------------------------------------------------------------

    def _fold(self, decoding: bool = False) -> None:
        """Pack the window's oldest G tokens while it holds more than window + G: at the
        codec's widths, or after a prefill's rows, at `fold_codec`'s, into `recent`."""
        assert self.keys is not None and self.values is not None
        g = self.codec.group_size
        while self.keys.shape[2] >= self.window + g:
            start = self.seen - self.keys.shape[2]
            k, v = self.keys[0, :, :g], self.values[0, :, :g]
            if self.fold_codec is not None and (self.recent is not None or (
                    decoding and self.packed is not None)):  # fmt: skip
                blob = encode(k[None], v[None], self.fold_codec, start_position=start)
                chunk = self._layer_of(blob)
                rows = torch.arange(start, start + g, dtype=torch.int32).expand(1, chunk.heads, g)
                self.recent = _extended(self.recent, chunk, rows, self.home, 4 * g)
            else:
                first = self.packed is None and self.decoded is None and not self.selected
                codec = self.codec if first else replace(self.codec, sink_tokens=0)
                offset = self.selected or self.decoded is not None  # rows carry positions
                assert offset or start == (self.packed.tokens if self.packed else 0)
                blob = encode(k[None], v[None], codec, start_position=start)
                header, payload = verified_payload(blob, key_basis=codec.key_basis)
                self.add_block(header, payload, start, layer=0, key_basis=codec.key_basis)
            self._drop(g)

    def _layer_of(self, blob: bytes) -> PackedKV:
        """The one layer of a block this layer encoded (with its own one-layer basis, if any)."""
        basis = self.codec.key_basis
        return block_layer(*verified_payload(blob, key_basis=basis), 0, basis)

    def add_block(
        self, header: BlockHeader, payload: Tensor, position: int, layer: int | None = None,
        key_basis: KeyBasis | None = None,
    ) -> None:  # fmt: skip
        """Append the rows of a verified block's `layer` (default: this layer's index; a block
        just folded holds this layer alone, in `key_basis`, default the cache's) after the
        packed rows."""
        layer = self.layer if layer is None else layer
        chunk = block_layer(header, payload, layer, key_basis or self.basis)
        if header.sink_tokens:
            if self.packed is not None and self.packed.tokens:
                raise CodecError("a block with sink tokens must come first")
            k, v = block_sinks(header, payload)
            self.sinks = (
                k[layer][None].to(self.home, copy=True),
                v[layer][None].to(self.home, copy=True),
            )
        if not self.selected and self.decoded is None:  # row index = position
            return self._append(chunk, None)
        rows = torch.arange(position, position + chunk.tokens, dtype=torch.int32)
        positions = rows.expand(1, chunk.heads, chunk.tokens)
        return self._append(chunk, positions)

    def add_decoded(self, keys: Tensor, values: Tensor) -> None:
        """Append exact rows [H, n, D] (a predicted block's layer, decoded: RoPE applied, sinks
        exact), kept apart from the packed rows and attended as they are."""
        k, v = keys[None].to(self.home), values[None].to(self.home)
        if self.decoded is not None:
            k, v = torch.cat((self.decoded[0], k), dim=2), torch.cat((self.decoded[1], v), dim=2)
        self.decoded = (k, v)

    def _append(self, chunk: PackedKV, positions: Tensor | None) -> None:
        self.packed = _extended(self.packed, chunk, positions, self.home, 0)

    def _select(self, query: Tensor, scale: float) -> None:
        """MiniKV: keep this layer's heavy hitters among the exact prompt rows, plus sinks and
        the recent window; pack the kept rows with each row's position."""
        assert self.selection is not None and self.keys is not None and self.values is not None
        self.selected = True
        if self.packed is not None:  # only rows this request computed are selected
            return
        sel, g = self.selection, self.codec.group_size
        n = self.keys.shape[2]
        sinks = self.codec.sink_tokens
        recent = min(n - sinks, self.window)
        pool = n - sinks - recent  # candidates: between the sinks and the recent window
        budget = sel.budget(self.layer, self.layers) * n - sinks - recent
        keep = min(pool // g, max(0, round(budget / g))) * g  # whole groups of G tokens
        if pool <= 0:
            self.selected = False  # nothing to choose from (yet)
            return
        if sinks:
            self.sinks = (self.keys[:, :, :sinks].half(), self.values[:, :, :sinks].half())
        if keep == 0:  # this layer keeps only its sinks and the recent window
            return self._drop(n - recent)
        w = min(sel.queries, query.shape[2])
        scores = window_scores(query[:, :, -w:].float() * scale, self.keys)[0]  # [H, n]
        cand = scores[:, sinks : sinks + pool]
        idx = cand.topk(keep, dim=-1).indices.sort(dim=-1).values + sinks  # [H, keep]
        h, d = self.keys.shape[1], self.keys.shape[3]
        k = self.keys[0].gather(1, idx[..., None].expand(h, keep, d))
        v = self.values[0].gather(1, idx[..., None].expand(h, keep, d))
        codec = replace(self.codec, sink_tokens=0, rope=None)
        if self.codec.rope is not None:  # pre-RoPE at each kept row's own position
            k = _undo_rope_at(k, self.codec.rope, idx)
        blob = encode(k[None], v[None], codec, start_position=sinks)
        chunk = replace(self._layer_of(blob), rope=self.codec.rope)
        spare = self.window + self.codec.group_size
        self.packed = _extended(None, chunk, idx.to(torch.int32)[None], self.home, spare)
        self._drop(n - recent)

    # ---- accounting ---------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held for this layer's tokens: packed rows in use, sinks and the window."""
        total = sum(p.nbytes for p in (self.packed, self.recent) if p is not None)
        for t in (*(self.sinks or ()), *(self.decoded or ()), self.keys, self.values):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    @property
    def allocated(self) -> int:
        """Bytes of this layer's buffers, spare capacity included."""
        total = self.nbytes
        for p in (self.packed, self.recent):
            if p is not None:
                tensors = [p.key_codes, p.key_scales, p.key_mins, p.value_codes, p.value_scales,
                           p.value_mins, p.positions]  # fmt: skip
                total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
                total -= p.nbytes
        return total


def layer_basis(basis: KeyBasis | None, layer: int) -> KeyBasis | None:
    """A one-layer key basis of `basis`'s layer (without prediction maps): what a layer's own
    folds of G tokens are coded in (private rows, never stored, so the id matters to no one)."""
    if basis is None:
        return None
    per = basis.mean.shape[-1] // CHUNK
    widths = basis.widths[layer * per : (layer + 1) * per]
    return KeyBasis(basis.mean[layer : layer + 1], basis.rotation[layer : layer + 1], widths)


def _extended(
    base: PackedKV | None, chunk: PackedKV, positions: Tensor | None, home: torch.device,
    spare: int,
) -> PackedKV:  # fmt: skip
    """base's rows followed by chunk's, in base's buffers when they have room, else in new ones
    a quarter larger (or `spare` rows larger, for a first chunk); positions kept when given."""
    if base is None:
        cap = -(-(chunk.tokens + spare) // chunk.group) * chunk.group
        base = replace(_grown(chunk, cap, home, with_positions=positions is not None), tokens=0)
    t0 = base.tokens
    t1 = t0 + chunk.tokens
    if t1 > base.key_codes.shape[2]:
        cap = -(-max(t1, t0 + t0 // 4) // chunk.group) * chunk.group
        base = _grown(base, cap, home)
    for name, lo, hi in _rows(t0, t1, chunk.group):
        getattr(base, name)[:, :, lo:hi] = getattr(chunk, name)[:, :, : hi - lo]
    if base.positions is not None:
        assert positions is not None
        base.positions[:, :, t0:t1] = positions.to(home)
    return replace(base, tokens=t1)


def _rows(t0: int, t1: int, g: int) -> list[tuple[str, int, int]]:
    """(buffer, first, end) of the tokens [t0, t1) in each PackedKV buffer."""
    return [
        ("key_codes", t0, t1), ("key_scales", t0 // g, t1 // g), ("key_mins", t0 // g, t1 // g),
        ("value_codes", t0, t1), ("value_scales", t0, t1), ("value_mins", t0, t1),
    ]  # fmt: skip


def _grown(kv: PackedKV, cap: int, device: torch.device, with_positions: bool = False) -> PackedKV:
    """A PackedKV like kv with buffers of `cap` rows, holding kv's rows."""
    g = kv.group

    def buf(x: Tensor, rows: int) -> Tensor:
        out = torch.empty(*x.shape[:2], rows, *x.shape[3:], dtype=x.dtype, device=device)
        n = min(rows, x.shape[2])
        out[:, :, :n] = x[:, :, :n]
        return out

    positions = kv.positions
    if positions is not None or with_positions:
        positions = torch.zeros(kv.batch, kv.heads, cap, dtype=torch.int32, device=device)
        if kv.positions is not None:
            positions[:, :, : kv.tokens] = kv.positions[:, :, : kv.tokens]
    return replace(
        kv,
        key_codes=buf(kv.key_codes, cap), key_scales=buf(kv.key_scales, cap // g),
        key_mins=buf(kv.key_mins, cap // g), value_codes=buf(kv.value_codes, cap),
        value_scales=buf(kv.value_scales, cap), value_mins=buf(kv.value_mins, cap),
        positions=positions,
    )  # fmt: skip


def _undo_rope_at(keys: Tensor, rope: RopeParams, positions: Tensor) -> Tensor:
    """keys [H, n, D] at `positions` [H, n] -> pre-RoPE keys (float32)."""
    k = keys.float()
    turned = rotated(k, *rope_at(rope, positions), -1.0)
    return torch.cat((turned, k[..., rope.rotary_dim :]), dim=-1)


class PackedCache(Cache):
    """A cache for `model` (batch 1) whose prompt KV stays packed with `codec` (KIVI-layout
    keys, or keys in a key basis; a predicting basis's blocks are decoded as they are added):
    `window` recent tokens stay exact, older ones are packed G at a time. `selection`: MiniKV's
    request-private selection after the first prefill."""

    def __init__(self, model: Any, codec: CodecConfig, window: int = WINDOW,
                 selection: Selection | None = None,
                 fold_bits: tuple[int, int] | None = FOLD_BITS) -> None:  # fmt: skip
        if window < 0:
            raise ValueError("window must be >= 0")
        self.codec = codec
        from kvpool.model_facts import model_layout

        layers, _, _ = model_layout(model)
        device = getattr(model, "device", None)
        super().__init__(layers=[PackedLayer(codec, i, layers, window, selection, device, fold_bits)
                                 for i in range(layers)])  # fmt: skip

    def add_blocks(self, blocks: Iterable[tuple[BlockHeader, Tensor]]) -> int:
        """Append verified blocks of the prompt's prefix, in order, from position 0 (see
        `KVPool.get_payloads`); returns the tokens added."""
        added = 0
        for header, payload in blocks:
            position = self.get_seq_length()
            if header.start_position != position:
                raise CodecError(f"block at {header.start_position}, the cache is at {position}")
            layers = [layer for layer in self.layers if isinstance(layer, PackedLayer)]
            if header.has_flag(Flag.PREDICTED):  # the whole stack rebuilt once, kept exact
                keys, values = self._decoded(header, payload)
                for i, layer in enumerate(layers):
                    layer.add_decoded(keys[i], values[i])
            else:
                for layer in layers:
                    layer.add_block(header, payload, position)
            for layer in layers:
                layer.seen += header.tokens
            added += header.tokens
        return added

    def _decoded(self, header: BlockHeader, payload: Tensor) -> tuple[Tensor, Tensor]:
        """A predicted block's keys (RoPE applied) and values [L, H, T, D], decoded."""
        basis = self.codec.key_basis
        if basis is None or not basis.predicted:
            raise CodecError("a predicted block needs the cache's codec to hold its basis and maps")
        basis.check(header)
        plan = decode_plan(header, "auto", payload.device)
        out = [torch.empty(plan.shape, dtype=torch.float32, device=payload.device) for _ in "kv"]
        plan.decode(payload, header, out, basis)
        return out[0], out[1]

    def start_recording(self, tokens: int) -> None:
        """Keep an exact copy of the next `tokens` tokens each layer is given (a prompt's new
        blocks, to be stored in the tier: packed rows are never re-encoded)."""
        for layer in self.layers:
            assert isinstance(layer, PackedLayer)
            layer.record, layer.recorded = tokens, []

    def take_recorded(self) -> tuple[Tensor, Tensor] | None:
        """(keys, values) [L, H, n, D] recorded since `start_recording`, and stop recording."""
        parts = []
        for layer in self.layers:
            assert isinstance(layer, PackedLayer)
            parts.append(layer.recorded)
            layer.record, layer.recorded = 0, []
        if not parts or not parts[0]:
            return None
        keys = torch.stack([torch.cat([k for k, _ in p], dim=1) for p in parts])
        values = torch.stack([torch.cat([v for _, v in p], dim=1) for p in parts])
        return keys, values

    @property
    def nbytes(self) -> int:
        """Bytes held for the cached tokens (packed rows in use, sinks, exact windows)."""
        return sum(layer.nbytes for layer in self.layers if isinstance(layer, PackedLayer))

    @property
    def allocated(self) -> int:
        return sum(layer.allocated for layer in self.layers if isinstance(layer, PackedLayer))
