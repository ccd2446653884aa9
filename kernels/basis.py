"""The calibrated key basis and the inter-layer prediction loop of codec v2.

Where it stands: `kvpool calibrate --basis [--predict]` fits a `KeyBasis` (client/calibrate.py);
`CodecConfig(key_basis=...)` then stores keys as components in it (blockformat, KEY_BASIS), and
with prediction maps every layer after the first as residuals of a prediction from the layer
before (PREDICTED). `predicted_loop` is the one loop of PREDICTED blocks: the writer
(codec.encode), the reader (codec.decode) and the calibration's closed-loop fit each run it with
their own steps, so the three rebuild layers the same way.

    layer l-1 as rebuilt --maps--> prediction of layer l --+ decoded residual--> layer l rebuilt
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kvpool.kernels.transforms import hadamard, rotated
from kvpool.proto.blockformat import BASIS_ID_BYTES, CHUNK, SUPPORTED_BITS, BlockHeader
from kvpool.proto.errors import BlockMismatchError, CodecError

# one layer's parts as `_rebuild_rows` reads them: the key map's rows from K_l-1, from V_l-1,
# its bias, its up factor B^T (None: a full map); the value map's rows from K_l, K_l-1, V_l-1,
# its bias, its B^T; the rotation's rows [H, n, D] back from the stored components (None: none)
_KeyParts = tuple[Tensor, Tensor, Tensor, Tensor | None]
_ValueParts = tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]
_RowParts = tuple[_KeyParts | None, _ValueParts | None, Tensor | None]  # layer 0: no maps


@dataclass(frozen=True, eq=False)
class KeyBasis:
    """Transform coding of keys: per (layer, kv head) an orthonormal basis of the key space (of
    pre-RoPE keys when the codec undoes RoPE) and the keys' mean, calibrated once per namespace
    (`kvpool calibrate --basis`), and a width per 8 components, 0 for components not stored
    (decoded as the mean). Blocks then hold the keys' components, a run of components at each
    width (blockformat, KEY_BASIS). Equal bases have equal ids; `id` is in the block header and
    in `CodecConfig.describe()`, hence in the namespace id.

    mean [L, H, D] and rotation [L, H, D, D] (column j: component j), float32, on the CPU.

    Inter-layer prediction (AQUA-KV's idea; `kvpool calibrate --basis --predict`): with
    key_maps [L - 1, 2HD + 1, HD] and value_maps [L - 1, 3HD + 1, HD] (float32; the last row a
    bias), layer l >= 1's keys are predicted as [K_l-1, V_l-1, 1] @ key_maps[l - 1] and its
    values as [K_l, K_l-1, V_l-1, 1] @ value_maps[l - 1] (rows [T, H * D], heads side by side,
    pre-RoPE keys), from the layers as the reader reconstructs them; layer 0's keys as `mean`,
    its values as 0. The basis then codes the key residual, and blocks hold residuals
    (blockformat, PREDICTED). Per-head maps (block-diagonal: each head predicted from its own
    head of the inputs only, `kvpool calibrate --basis --predict --per-head-maps`) are
    key_maps [L - 1, H, 2D + 1, D] and value_maps [L - 1, H, 3D + 1, D]: [K_l-1, V_l-1, 1] of
    head h (rows [T, 2D]) @ key_maps[l - 1, h], H times fewer products and floats. Rank-r maps
    (`--map-rank R`, 0 < r < HD) are two factors stacked along the rows: key_maps
    [L - 1, 2HD + 1 + HD, r] and value_maps [L - 1, 3HD + 1 + HD, r], the first k HD + 1 rows
    the down factor A (last of them its bias), the last HD rows the up factor B transposed: the
    prediction is ([inputs, 1] @ A) @ B^T, (k + 1) HD r products per token instead of k HD HD.
    Maps of any form may be bfloat16 (`--bf16-maps`): half the bytes to ship, and products at
    about twice float32's rate on CPUs with AVX-512 BF16 (and on GPUs). The inputs are then
    rounded to bfloat16 for the products, and each product's result is bfloat16 (see `mapped`),
    for the writer, the reader and the calibration's fit alike."""

    mean: Tensor
    rotation: Tensor
    widths: tuple[int, ...]  # [L * D / 8]
    key_maps: Tensor | None = None
    value_maps: Tensor | None = None
    _copies: dict[torch.device, tuple[Tensor | None, ...]] = field(
        default_factory=dict, init=False, repr=False
    )
    _row_parts: dict[torch.device, list[_RowParts]] = field(  # see _row_parts
        default_factory=dict, init=False, repr=False
    )

    def on(self, device: torch.device) -> tuple[Tensor | None, ...]:
        """(mean, rotation, key_maps, value_maps) on `device`, copied there once."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.mean, self.rotation, self.key_maps, self.value_maps
        if device not in self._copies:
            parts = (self.mean, self.rotation, self.key_maps, self.value_maps)
            self._copies[device] = tuple(None if t is None else t.to(device) for t in parts)
        return self._copies[device]

    def __getstate__(self) -> dict[str, object]:
        # pickled (to a worker) without device copies
        return {**self.__dict__, "_copies": {}, "_row_parts": {}}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)

    def __post_init__(self) -> None:
        if self.mean.dim() != 3 or self.rotation.shape != (*self.mean.shape, self.mean.shape[-1]):
            raise CodecError("a key basis is mean [L, H, D] and rotation [L, H, D, D]")
        layers, _, dim = self.mean.shape
        if dim % CHUNK or len(self.widths) != layers * dim // CHUNK:
            raise CodecError(f"a key basis has one width per {CHUNK} components of each layer")
        if any(w not in (0, *SUPPORTED_BITS) for w in self.widths):
            raise CodecError(f"key basis widths must be 0 or in {SUPPORTED_BITS}")
        if self.mean.dtype != torch.float32 or self.rotation.dtype != torch.float32:
            raise CodecError("a key basis is float32")
        if not bool(torch.isfinite(self.rotation).all() and torch.isfinite(self.mean).all()):
            raise CodecError("a key basis must be finite")
        eye = torch.eye(dim).expand_as(self.rotation)
        if float((self.rotation.transpose(-1, -2) @ self.rotation - eye).abs().max()) > 1e-3:
            raise CodecError("a key basis rotation must be orthonormal")
        if (self.key_maps is None) != (self.value_maps is None):
            raise CodecError("a predicting key basis has both key_maps and value_maps")
        if self.key_maps is not None and self.value_maps is not None:
            heads = self.mean.shape[1]
            width = heads * dim
            full = ((layers - 1, 2 * width + 1, width), (layers - 1, 3 * width + 1, width))
            per_head = (
                (layers - 1, heads, 2 * dim + 1, dim),
                (layers - 1, heads, 3 * dim + 1, dim),
            )
            got = (tuple(self.key_maps.shape), tuple(self.value_maps.shape))
            rank = got[0][-1]
            low = ((layers - 1, 3 * width + 1, rank), (layers - 1, 4 * width + 1, rank))
            shaped = got in (full, per_head) or (got == low and 0 < rank < width)
            if layers < 2 or not shaped:
                raise CodecError(
                    f"prediction maps must be {full} (or per head {per_head}, or of rank r < "
                    f"{width} {low[0][:2]} + (r,), {low[1][:2]} + (r,)) for this basis, got {got}"
                )
            maps = (self.key_maps, self.value_maps)
            if self.key_maps.dtype != self.value_maps.dtype or self.key_maps.dtype not in (
                torch.float32,
                torch.bfloat16,
            ):
                raise CodecError("prediction maps are both float32 or both bfloat16")
            if not all(bool(torch.isfinite(m).all()) for m in maps):
                raise CodecError("prediction maps must be finite")

    @property
    def predicted(self) -> bool:
        """Whether blocks in this basis hold residuals of an inter-layer prediction."""
        return self.key_maps is not None

    @property
    def per_head_maps(self) -> bool:
        """Whether the prediction maps are per head (block-diagonal)."""
        return self.key_maps is not None and self.key_maps.dim() == 4

    @property
    def bf16_maps(self) -> bool:
        """Whether the maps are bfloat16: their products then run in bfloat16 (see `mapped`)."""
        return self.key_maps is not None and self.key_maps.dtype == torch.bfloat16

    @property
    def map_rank(self) -> int:
        """The rank r of low-rank (factored) prediction maps; 0 for full or per-head maps."""
        if self.key_maps is None or self.key_maps.dim() != 3:
            return 0
        rank = self.key_maps.shape[-1]
        return rank if rank < self.mean.shape[1] * self.mean.shape[2] else 0

    @functools.cached_property
    def id(self) -> bytes:
        digest = hashlib.sha256(b"kvpool key basis 1")
        digest.update(struct.pack("<3I", *self.mean.shape))
        digest.update(self.mean.contiguous().numpy().tobytes())
        digest.update(self.rotation.contiguous().numpy().tobytes())
        digest.update(bytes(self.widths))
        if self.key_maps is not None and self.value_maps is not None:
            digest.update(
                b"per-head prediction maps" if self.per_head_maps
                else b"low-rank prediction maps" if self.map_rank else b"prediction maps"
            )  # fmt: skip
            if self.bf16_maps:
                digest.update(b"bfloat16 maps")
            for m in (self.key_maps, self.value_maps):
                raw = m.view(torch.int16) if self.bf16_maps else m  # numpy has no bfloat16
                digest.update(raw.contiguous().numpy().tobytes())
        return digest.digest()[:BASIS_ID_BYTES]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyBasis) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def bits_per_key(self) -> float:
        """Code bits per key value (without the groups' scales and minimums)."""
        return sum(self.widths) / len(self.widths)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": 1, "mean": self.mean, "rotation": self.rotation,
                    "widths": list(self.widths), "key_maps": self.key_maps,
                    "value_maps": self.value_maps}, path)  # fmt: skip
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyBasis:
        """Raises CodecError for a file that is not a valid key basis."""
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
            if data.get("format") != 1:
                raise CodecError(f"{path}: not a kvpool key basis (format {data.get('format')})")
            widths = tuple(int(w) for w in data["widths"])
            maps = data.get("key_maps"), data.get("value_maps")
            return cls(data["mean"], data["rotation"], widths, *maps)
        except CodecError:
            raise
        except Exception as e:  # torch.load of foreign bytes raises almost anything (IndexError,
            # EOFError, struct.error, UnicodeDecodeError...): all of it means "not a basis"
            raise CodecError(
                f"{path}: not a readable key basis ({type(e).__name__}: {e})"
            ) from None

    def check(self, header: BlockHeader) -> None:
        """This basis is the one a block was encoded with (BlockMismatchError otherwise)."""
        if header.basis_id != self.id:
            raise BlockMismatchError(
                f"the block's key basis is {header.basis_id.hex()}, this reader holds {self.id.hex()}"
            )

    @functools.cached_property
    def extent(self) -> tuple[int, ...]:
        """Per layer, the components up to the last one stored: the rest are never computed."""
        per = self.mean.shape[-1] // CHUNK
        rows = [self.widths[i * per : (i + 1) * per] for i in range(self.mean.shape[0])]
        return tuple(CHUNK * max((c + 1 for c, w in enumerate(r) if w), default=0) for r in rows)

    @functools.cached_property
    def gaps(self) -> tuple[tuple[int, int, int], ...]:
        """(layer, first, end) of each run of components not stored below its layer's extent
        (width 0 between stored ones): a decoder that reuses its buffers zeroes them."""
        per = self.mean.shape[-1] // CHUNK
        return tuple(
            (layer, c * CHUNK, (c + 1) * CHUNK)
            for layer, n in enumerate(self.extent)
            for c in range(n // CHUNK)
            if not self.widths[layer * per + c]
        )

    def to_components(self, keys: Tensor) -> Tensor:
        """keys [L, H, T, D] -> their components (those past `extent` left 0), float32."""
        mean, rot = self.on(keys.device)[:2]
        assert mean is not None and rot is not None
        out = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
        for layer, n in enumerate(self.extent):
            centred = keys[layer].float() - mean[layer][:, None]
            torch.matmul(centred, rot[layer][:, :, :n], out=out[layer, :, :, :n])
        return out

    def from_components_(self, components: Tensor, out: Tensor) -> Tensor:
        """components [L, H, T, D] float32 -> keys into `out` (any float dtype), layer by layer."""
        mean, rot = self.on(components.device)[:2]
        assert mean is not None and rot is not None
        for layer, n in enumerate(self.extent):
            part = components[layer, :, :, :n]
            keys = torch.matmul(part, rot[layer][:, :, :n].transpose(-1, -2))
            out[layer].copy_(keys.add_(mean[layer][:, None]))
        return out

    def predict_keys(self, layer: int, keys_before: Tensor, values_before: Tensor) -> Tensor:
        """Layer `layer`'s predicted pre-RoPE keys [H, T, D] from layer - 1's keys and values
        [H, T, D] (as reconstructed); layer 0's: the mean."""
        mean, _, key_maps, _ = self.on(keys_before.device)
        if layer == 0:
            assert mean is not None
            return mean[0][:, None].expand_as(keys_before)
        assert key_maps is not None
        return mapped(key_maps[layer - 1], [keys_before, values_before])

    def predict_values(
        self, layer: int, keys: Tensor, keys_before: Tensor, values_before: Tensor
    ) -> Tensor:
        """Layer `layer`'s predicted values [H, T, D] from its keys and layer - 1's (layer 0: 0)."""
        if layer == 0:
            return torch.zeros_like(keys)
        value_maps = self.on(keys.device)[3]
        assert value_maps is not None
        return mapped(value_maps[layer - 1], [keys, keys_before, values_before])

    def rotation_of(self, layer: int, device: torch.device) -> Tensor:
        """Layer `layer`'s stored components' columns [H, D, n] (n: `extent`)."""
        rotation = self.on(device)[1]
        assert rotation is not None
        return rotation[layer, :, :, : self.extent[layer]]


def as_rows(inputs: list[Tensor]) -> Tensor:
    """[H, T, D] tensors -> rows [T, sum of H * D]: per token, each tensor's heads side by side."""
    return torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in inputs], 1)


def mapped(m: Tensor, inputs: list[Tensor]) -> Tensor:
    """`as_rows(inputs)` through a prediction map m [rows + 1, H * D] (last row: bias) -> the
    predicted [H, T, D]; or, for per-head maps m [H, k D + 1, D], each head's inputs side by
    side ([T, k D]) through its own map; or, for rank-r maps m [rows + 1 + H D, r], through
    the down factor m[:rows + 1] (last row: bias), then the up factor m[rows + 1:] transposed.
    Maps of another dtype (bfloat16) take the inputs rounded to theirs; the prediction comes
    back in the inputs' dtype."""
    if m.dtype != inputs[0].dtype:  # bfloat16 maps: bfloat16 products, a float32 prediction
        return mapped(m, [x.to(m.dtype) for x in inputs]).to(inputs[0].dtype)
    heads, tokens, dim = inputs[0].shape
    if m.dim() == 3:
        return torch.baddbmm(m[:, -1:], torch.cat(inputs, -1), m[:, :-1])
    rows = len(inputs) * heads * dim
    y = torch.addmm(m[rows], as_rows(inputs), m[:rows])
    if m.shape[0] > rows + 1:  # low rank
        y = y @ m[rows + 1 :].T
    return y.view(tokens, heads, -1).transpose(0, 1)


# (layer, inputs) -> the map that predicts the layer from `inputs`: [K_l-1, V_l-1] for keys,
# [K_l, K_l-1, V_l-1] for values (a reader's and writer's come from the basis; calibration fits
# them as it goes)
MapStep = Callable[[int, list[Tensor]], Tensor]
# (layer, prediction [H, T, D]) -> the decoded residual to add to it [H, T, D], float32
ResidualStep = Callable[[int, Tensor], Tensor]


def predicted_loop(
    out: tuple[Tensor, Tensor], first_keys: Tensor, key_map: MapStep, value_map: MapStep,
    key_residual: ResidualStep, value_residual: ResidualStep,
) -> None:  # fmt: skip
    """Rebuild a predicted block's pre-RoPE keys and values into `out` (float32 [L, H, T, D]),
    layer by layer: layer 0's keys are predicted as `first_keys` [H, D] (the basis's mean), its
    values as 0; layer l's keys as `mapped(key_map(l, [K, V]), [K, V])` of layer l - 1 as
    rebuilt, its values from [K_l, K_l-1, V_l-1] likewise; each layer is then its prediction
    plus the residual its step decodes (a writer's step codes the residual first, so both sides
    rebuild from the same bits)."""
    keys, values = out
    for layer in range(keys.shape[0]):
        before = [keys[layer - 1], values[layer - 1]] if layer else []
        if layer:
            pk = mapped(key_map(layer, before), before)
        else:
            pk = first_keys[:, None].expand_as(keys[0])
        keys[layer] = pk + key_residual(layer, pk)
        inputs = [keys[layer], *before]
        pv = mapped(value_map(layer, inputs), inputs) if layer else torch.zeros_like(keys[0])
        values[layer] = pv + value_residual(layer, pv)


# (layer, first token, end token, a buffer [H, n, D] float32, the layer's value rows [H, n, D]
# float32) -> the layer's key components for tokens [first, end) ([H, n, D] float32, in the
# buffer or elsewhere; those past the layer's extent are never read, those in the basis's gaps
# must be 0), its value residuals written into the value rows, the Hadamard rotation undone:
# how `rebuild_rows` reads a predicted block's decoded residuals, layer by layer
Residuals = Callable[[int, int, int, Tensor, Tensor], Tensor]


def decoded(coded: list[Tensor], rotate: bool) -> Residuals:
    """The `Residuals` of residuals decoded whole (`rebuild`'s coded: key components and value
    residuals [L, H, T, D] float32, values Hadamard-rotated under `rotate`)."""

    def residuals(layer: int, first: int, end: int, _: Tensor, value_rows: Tensor) -> Tensor:
        residual = coded[1][layer, :, first:end]
        value_rows.copy_(hadamard(residual) if rotate else residual)
        return coded[0][layer, :, first:end]

    return residuals


# (layer, first token, end token, a buffer [H, n, D] float32) -> the layer's key components for
# tokens [first, end) ([H, n, D] float32, in the buffer or elsewhere; those past the layer's
# extent are never read, those in the basis's gaps must be 0)
Components = Callable[[int, int, int, Tensor], Tensor]


# (a layer's rows [H, T, D] float32 (rows contiguous), its target [H, T, D], RoPE's (cos, sin)
# [T, rotary] or None) -> the rows written into the target in its dtype, RoPE redone on them
Store = Callable[[Tensor, Tensor, tuple[Tensor, Tensor] | None], None]


def store_rows(rows: Tensor, target: Tensor, rope: tuple[Tensor, Tensor] | None) -> None:
    """The torch `Store` (cpu_codec.store_rows does the same in one pass of the C loop)."""
    target.copy_(rows)
    if rope is not None:
        target[..., : rope[0].shape[-1]] = rotated(rows, *rope, 1.0)


def keys_from_components(
    basis: KeyBasis, source: Components, out: Tensor, rope: tuple[Tensor, Tensor] | None = None,
    store: Store = store_rows, pool: Executor | None = None, workers: int = 1,
) -> None:  # fmt: skip
    """A KEY_BASIS block's keys into `out` ([L, H, T, D], any float dtype) from their components
    as `source` decodes them, layer by layer and run by run of tokens: `from_components_`'s
    products (each layer's heads in one batched product, plus the mean), stored through `store`
    with RoPE redone when `rope`'s tables are given. With a `pool`, the tokens are split over up
    to `workers` of its threads, as `rebuild_rows` splits them."""

    def run(a: int, b: int) -> None:
        _, heads, _, dim = out.shape
        mean, rotation = basis.on(out.device)[:2]
        assert mean is not None and rotation is not None
        buffer, keys = (torch.empty(heads, b - a, dim, device=out.device) for _ in range(2))
        tables = None if rope is None else (rope[0][a:b], rope[1][a:b])
        for layer, n in enumerate(basis.extent):
            if n:
                part = source(layer, a, b, buffer)[:, :, :n]
                torch.bmm(part, rotation[layer, :, :, :n].transpose(-1, -2), out=keys)
                keys.add_(mean[layer][:, None])
            else:  # no component stored: the mean
                keys.copy_(mean[layer][:, None].expand_as(keys))
            store(keys, out[layer][:, a:b], tables)

    _over_runs(out.shape[2], run, pool, workers)


def _over_runs(tokens: int, run: Callable[[int, int], None], pool: Executor | None,
              workers: int) -> None:  # fmt: skip
    """run(a, b) over runs of tokens [a, b) covering [0, tokens): one run, or with a `pool` up
    to `workers` runs of at least 64 tokens, one per thread (a token's layers depend on that
    token's only)."""
    parts = max(1, min(workers, tokens // 64)) if pool is not None else 1
    cuts = [tokens * i // parts for i in range(parts + 1)]
    if parts == 1 or pool is None:
        return run(0, tokens)
    list(pool.map(lambda i: run(cuts[i], cuts[i + 1]), range(parts)))


def rebuild(
    basis: KeyBasis, coded: list[Tensor], rotate: bool, out: tuple[Tensor, Tensor],
    rope: tuple[Tensor, Tensor] | None = None, store: Store = store_rows,
    pool: Executor | None = None, workers: int = 1,
) -> None:  # fmt: skip
    """The reader's run of the predicted loop: the decoded residuals `coded` (key components and
    value residuals [L, H, T, D], float32, values Hadamard-rotated under `rotate`) -> keys and
    values into `out` ([L, H, T, D], any float dtype), layer by layer through `store` (keys
    with RoPE redone when `rope`'s tables are given, pre-RoPE otherwise). Full and low-rank
    maps go through `rebuild_rows` (its tokens split over up to `workers` threads of `pool`
    when one is given), per-head maps through `rebuild_loop` in place: it overwrites `coded`."""
    if not basis.per_head_maps:
        return rebuild_rows(basis, coded, rotate, out, rope, store, pool, workers)
    rebuilt = (coded[0], coded[1])
    rebuild_loop(basis, coded, rotate, rebuilt)
    for layer in range(rebuilt[0].shape[0]):
        store(rebuilt[0][layer], out[0][layer], rope)
        store(rebuilt[1][layer], out[1][layer], None)


def rebuild_loop(
    basis: KeyBasis, coded: list[Tensor], rotate: bool, out: tuple[Tensor, Tensor]
) -> None:
    """`predicted_loop` over decoded residuals (as `rebuild` takes them): keys (pre-RoPE) and
    values into `out` ([L, H, T, D] float32; may be `coded` itself: each layer's residuals are
    read before the layer is written), for maps of any shape; the specification that
    `rebuild_rows` computes faster."""
    device = coded[0].device
    mean, _, key_maps, value_maps = basis.on(device)
    assert mean is not None and key_maps is not None and value_maps is not None

    def key_residual(layer: int, _prediction: Tensor) -> Tensor:
        rot = basis.rotation_of(layer, device)
        return coded[0][layer, :, :, : rot.shape[-1]] @ rot.transpose(-1, -2)

    def value_residual(layer: int, _prediction: Tensor) -> Tensor:
        return hadamard(coded[1][layer]) if rotate else coded[1][layer]

    predicted_loop(out, mean[0], lambda layer, _: key_maps[layer - 1],
                   lambda layer, _: value_maps[layer - 1], key_residual, value_residual)  # fmt: skip


def rebuild_rows(
    basis: KeyBasis, coded: list[Tensor] | Residuals, rotate: bool, out: tuple[Tensor, Tensor],
    rope: tuple[Tensor, Tensor] | None = None, store: Store = store_rows,
    pool: Executor | None = None, workers: int = 1,
) -> None:  # fmt: skip
    """`rebuild` for full or low-rank maps, as a few large matrix products per layer: the same
    sums as `predicted_loop`'s (so the same layers up to float rounding), in another order.
    Each layer is held as rows [T, H * D] (token-major: the maps' own layout, so no
    concatenation or transposition feeds them), K and V of only the layer before and this one;
    [K_l-1, V_l-1, 1] @ A is summed from its parts in place; the heads' key residuals come from
    one batched product, added into their columns in one pass; the layer is then stored
    head-major, with RoPE. `coded` is the decoded residuals as `rebuild` takes them, or a
    `Residuals` that decodes each layer's when the loop reaches it (`rotate` then unused).
    Components past a layer's extent are never read; those in `basis.gaps` must be 0.

    A token's layers depend on that token's only, so with a `pool`, up to `workers` of its
    threads each run the whole loop over their own run of at least 64 tokens (on the CPU: the C
    loop's threads, each running torch on one thread: cpu_codec.rebuild_workers says how many
    may run at once without fighting torch's threads)."""
    source = coded if callable(coded) else decoded(coded, rotate)

    def run(a: int, b: int) -> None:
        tables = None if rope is None else (rope[0][a:b], rope[1][a:b])
        _rebuild_rows(basis, source, a, b, (out[0][:, :, a:b], out[1][:, :, a:b]), tables, store)

    _over_runs(out[0].shape[2], run, pool, workers)


def _row_parts(basis: KeyBasis, device: torch.device) -> list[_RowParts]:
    """Per layer the views of its maps (none for layer 0) and of the rotation that the loop over
    rows multiplies by, cut once per basis and device, not per layer of every block's run (two
    workers cutting them at once both store the same views)."""
    if device in basis._row_parts:
        return basis._row_parts[device]
    _, rotation, key_maps, value_maps = basis.on(device)
    assert rotation is not None and key_maps is not None and value_maps is not None
    width = basis.mean.shape[1] * basis.mean.shape[2]
    rank = basis.map_rank
    parts: list[_RowParts] = []
    for layer, n in enumerate(basis.extent):
        rows = rotation[layer, :, :, :n].transpose(-1, -2) if n else None
        if not layer:
            parts.append((None, None, rows))
            continue
        k, v = key_maps[layer - 1], value_maps[layer - 1]
        parts.append((
            (k[:width], k[width : 2 * width], k[2 * width], k[2 * width + 1 :].T if rank else None),
            (v[:width], v[width : 2 * width], v[2 * width : 3 * width], v[3 * width],
             v[3 * width + 1 :].T if rank else None),
            rows,
        ))  # fmt: skip
    basis._row_parts[device] = parts
    return parts


def _rebuild_rows(
    basis: KeyBasis, source: Residuals, first: int, end: int, out: tuple[Tensor, Tensor],
    rope: tuple[Tensor, Tensor] | None, store: Store,
) -> None:  # fmt: skip
    device = out[0].device
    mean, _, key_maps, _ = basis.on(device)
    assert mean is not None and key_maps is not None
    parts = _row_parts(basis, device)
    layers, heads, tokens, dim = out[0].shape  # tokens [first, end) of the block
    width = heads * dim
    ring = torch.empty(2, 2, tokens, width, dtype=torch.float32, device=device)  # [l % 2, K|V]
    # bfloat16 maps: the products' inputs, each layer rounded once when it is rebuilt
    low = None if key_maps.dtype == torch.float32 else torch.empty_like(ring, dtype=key_maps.dtype)
    # the products' outputs when they cannot go straight into the float32 rows (bfloat16 maps),
    # and the low-rank latent: allocated once, not per layer
    product = None if low is None else torch.empty_like(low[0, 0])
    rank = basis.map_rank
    latent = torch.empty(tokens, rank, dtype=key_maps.dtype, device=device) if rank else None
    turned = torch.empty(heads, tokens, dim, dtype=torch.float32, device=device)  # key residual
    components = torch.empty(heads, tokens, dim, dtype=torch.float32, device=device)
    rows_of = [ring[i].unbind(0) for i in range(2)]  # [l % 2] -> (K, V) rows [T, H D]
    reads = rows_of if low is None else [low[i].unbind(0) for i in range(2)]  # as products read
    heads_of = [(k.view(tokens, heads, dim), v.view(tokens, heads, dim).transpose(0, 1))
                for k, v in rows_of]  # fmt: skip
    out_k, out_v = out[0].unbind(0), out[1].unbind(0)
    for layer in range(layers):
        k, v = rows_of[layer % 2]
        key_heads, value_heads = heads_of[layer % 2]
        kx, vx = reads[layer % 2]  # this layer's rows as products read them
        k_before, v_before = reads[(layer - 1) % 2]
        key_parts, value_parts, rows = parts[layer]
        if key_parts is None:  # layer 0
            k.copy_(mean[0].reshape(1, width).expand(tokens, width))
        else:
            from_k, from_v, bias, up = key_parts
            into = k if product is None else product  # float32 maps: straight into k
            if up is not None:
                z = torch.addmm(bias, k_before, from_k, out=latent)
                torch.mm(z.addmm_(v_before, from_v), up, out=into)
            else:
                torch.addmm(bias, k_before, from_k, out=into).addmm_(v_before, from_v)
            if product is not None:
                k.copy_(product)
        # the value residual straight into this layer's V rows (the prediction is added to it)
        coded = source(layer, first, end, components, value_heads)
        if rows is not None:  # every head's residual in one product, added by one pass
            n = rows.shape[-2]
            key_heads.add_(torch.bmm(coded[:, :, :n], rows, out=turned).transpose(0, 1))
        if low is not None:
            kx.copy_(k)
        if value_parts is not None:
            v_from_k, v_from_kb, v_from_vb, v_bias, v_up = value_parts
            if v_up is not None:
                z = torch.addmm(v_bias, kx, v_from_k, out=latent)
                z.addmm_(k_before, v_from_kb).addmm_(v_before, v_from_vb)
                if product is None:
                    v.addmm_(z, v_up)
                else:
                    v.add_(torch.mm(z, v_up, out=product))
            elif product is None:
                v.addmm_(k, v_from_k).addmm_(k_before, v_from_kb)
                v.addmm_(v_before, v_from_vb).add_(v_bias)
            else:
                pv = torch.addmm(v_bias, kx, v_from_k, out=product)
                v.add_(pv.addmm_(k_before, v_from_kb).addmm_(v_before, v_from_vb))
        if low is not None:
            vx.copy_(v)
        store(key_heads.transpose(0, 1), out_k[layer], rope)
        store(value_heads, out_v[layer], None)
