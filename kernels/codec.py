"""Encode a block of KV cache into a self-describing blob, and decode it back.

Where it stands: the kvpool client calls `encode` before a put and `decode` after a get, on the
device where the KV lives. The cache tier never sees tensors, only the blobs.

    keys, values [L, H, T, D] --(undo RoPE, keep sinks, Hadamard)--> quantize+pack per section
        --> payload (device) --> header + crc32 + payload (bytes)
    bytes --> verify --> payload --> unpack+dequantize --> (Hadamard, redo RoPE, sinks) --> tensors

The per-section work runs on one of three interchangeable backends with identical output:
"triton" (CUDA), "cpu" (the C loop) and "reference" (plain torch, the spec).
"""

from __future__ import annotations

import functools
import warnings
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from kvpool.kernels import reference, scratch
from kvpool.kernels.basis import (
    KeyBasis,
    Store,
    keys_from_components,
    predicted_loop,
    rebuild,
    rebuild_rows,
    store_rows,
)
from kvpool.kernels.transforms import (
    RopeParams,
    hadamard,
    hadamard_,
    redo_rope_,
    rope_tables,
    undo_rope,
)
from kvpool.proto.blockformat import (
    SUPPORTED_BITS,
    SUPPORTED_GROUPS,
    UNBOUND,
    BlockHeader,
    DType,
    Flag,
    Layout,
    Section,
    check_length,
    parse_header,
    payload_bytes,
    seal,
    verify,
)
from kvpool.proto.errors import BlockMismatchError, CodecError, NonFiniteError

Backend = Literal["auto", "triton", "cpu", "reference"]
TORCH_DTYPES = {
    DType.FLOAT16: torch.float16,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT32: torch.float32,
}
FORMAT_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
_CHECKS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvblock-check")


@dataclass(frozen=True)
class CodecConfig:
    """How blocks are quantized. Part of the namespace: readers and writers must agree.

    key_bits / value_bits: one width for every layer, or one per layer (the layer-discriminative
    profile), each from {2, 3, 4, 8}. group_size: G in {32, 64, 128} (values: clamped to
    head_dim). rope: when set, keys are quantized before the rotary embedding.
    hadamard_values: rotate values along head_dim before quantizing. sink_tokens: the first S
    tokens of a sequence are kept in fp16 (in the block that starts at position 0). key_basis:
    store keys as components in a calibrated basis, at its widths (key_bits is then unused).
    symmetric_values: per-token groups (values, the latent) keep one fp16 scale and no minimum,
    levels symmetric about zero (blockformat's SYMMETRIC_VALUES): 2 + 16/G bits instead of
    2 + 32/G, for values centred on zero (predicted residuals, Hadamard-rotated values).
    deflate: store payloads deflated (blockformat's DEFLATED: lossless, about an eighth fewer
    bytes for codec v2; the only option outside the namespace, since readers decode both).
    """

    key_bits: int | tuple[int, ...] = 2
    value_bits: int | tuple[int, ...] = 2
    group_size: int = 128
    rope: RopeParams | None = None
    hadamard_values: bool = False
    sink_tokens: int = 0
    key_basis: KeyBasis | None = None
    symmetric_values: bool = False
    deflate: bool = False

    def __post_init__(self) -> None:
        if self.group_size not in SUPPORTED_GROUPS:
            raise CodecError(f"group_size {self.group_size} not in {SUPPORTED_GROUPS}")
        for bits in (self.key_bits, self.value_bits):
            for b in (bits,) if isinstance(bits, int) else bits:
                if b not in SUPPORTED_BITS:
                    raise CodecError(f"bit width {b} not in {SUPPORTED_BITS}")
        if self.sink_tokens < 0:
            raise CodecError("sink_tokens must be >= 0")

    def describe(self) -> str:
        """A canonical one-line description: the codec part of a namespace."""

        def widths(bits: int | tuple[int, ...]) -> str:
            return str(bits) if isinstance(bits, int) else ",".join(map(str, bits))

        rope = self.rope
        rope_s = f"{rope.theta!r}/{rope.rotary_dim}/{rope.scaling!r}" if rope else "none"
        basis = f" basis={self.key_basis.id.hex()}" if self.key_basis is not None else ""
        k = "basis" if self.key_basis is not None else widths(self.key_bits)
        sym = " symv=1" if self.symmetric_values else ""  # absent: the namespaces of before
        return (
            f"kivi k={k} v={widths(self.value_bits)} g={self.group_size} "
            f"rope={rope_s} hadamard={int(self.hadamard_values)} sinks={self.sink_tokens}"
            f"{basis}{sym}"
        )

    def bits_per_layer(self, layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(key bits, value bits) with one entry per layer."""

        def expand(bits: int | tuple[int, ...], what: str) -> tuple[int, ...]:
            if isinstance(bits, int):
                return (bits,) * layers
            if len(bits) != layers:
                raise CodecError(f"{what} has {len(bits)} entries for a {layers}-layer block")
            return tuple(bits)

        return expand(self.key_bits, "key_bits"), expand(self.value_bits, "value_bits")


@dataclass(frozen=True)
class Binding:
    """Where a block belongs: its namespace id, its own block key, and the tenant's MAC secret
    (b"": no MAC). Written into the block's header (and MAC) by `encode`."""

    namespace_id: bytes = UNBOUND
    key: bytes = UNBOUND
    mac_key: bytes = b""


@dataclass
class Block:
    """A decoded block: keys and values [L, H, T, D], or latent [L, T, C]."""

    header: BlockHeader
    keys: Tensor | None = None
    values: Tensor | None = None
    latent: Tensor | None = None


# ---- public API ---------------------------------------------------------------------------


def encode(
    keys: Tensor,
    values: Tensor,
    config: CodecConfig = CodecConfig(),
    start_position: int = 0,
    backend: Backend = "auto",
    binding: Binding = Binding(),
) -> bytes:
    """keys, values [layers, kv_heads, T, head_dim] (fp32/fp16/bf16, same shape) -> block bytes.

    start_position: the absolute position of the block's first token (RoPE, sink tokens).
    binding: the namespace id and key the block is stored under, and the tenant's MAC secret.
    Raises CodecError for a bad shape, dtype or configuration, NonFiniteError for NaN/inf.
    """
    _check_tensor(keys, "keys", 4)
    _check_tensor(values, "values", 4)
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.device != values.device:
        raise CodecError(
            f"keys {tuple(keys.shape)} {keys.dtype} and values {tuple(values.shape)} "
            f"{values.dtype} must match in shape, dtype and device"
        )
    layers, heads, tokens, head_dim = keys.shape
    header = block_header(
        Layout.KV, keys.dtype, (layers, heads, tokens, head_dim), config, start_position, binding
    )
    sinks = header.sink_tokens
    sink_k, sink_v = keys[:, :, :sinks].half(), values[:, :, :sinks].half()
    if config.rope is not None:
        keys = undo_rope(keys, config.rope, start_position)
    basis = config.key_basis
    predicted = basis is not None and basis.predicted
    if config.hadamard_values and not predicted:  # predicted: the loop rotates the residual
        values = hadamard(values)
    keys, values = _fill_sinks(keys, sinks), _fill_sinks(values, sinks)
    if basis is not None and predicted:
        return _encode_predicted(header, basis, keys, values, [sink_k, sink_v], backend,
                                 binding.mac_key, config.deflate)  # fmt: skip
    if basis is not None:
        keys = basis.to_components(keys)
    return _encode_payload(
        header, [keys, values], [sink_k, sink_v], backend, binding.mac_key, config.deflate
    )


def encode_latent(
    latent: Tensor, config: CodecConfig = CodecConfig(), start_position: int = 0,
    backend: Backend = "auto", binding: Binding = Binding(),
) -> bytes:  # fmt: skip
    """latent [layers, T, latent_dim] (MLA/CLLA-style caches; per-token groups) -> block bytes.

    Uses config.key_bits as the bits per layer; RoPE and Hadamard options do not apply.
    """
    _check_tensor(latent, "latent", 3)
    if config.rope is not None or config.hadamard_values:
        raise CodecError("the latent layout takes no RoPE or Hadamard option")
    layers, tokens, dim = latent.shape
    header = block_header(
        Layout.LATENT, latent.dtype, (layers, 1, tokens, dim), config, start_position, binding
    )
    x = latent.unsqueeze(1)
    sink = x[:, :, : header.sink_tokens].half()
    fill = [_fill_sinks(x, header.sink_tokens)]
    return _encode_payload(header, fill, [sink], backend, binding.mac_key, config.deflate)


def decode(
    blob: bytes | bytearray | memoryview,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backend: Backend = "auto",
    expect: BlockHeader | None = None,
    mac_key: bytes = b"",
    out: tuple[Tensor, ...] | None = None,
    key_basis: KeyBasis | None = None,
) -> Block:
    """Block bytes -> Block with tensors on `device` in `dtype` (default: the encoded dtype).

    expect: the header the block must have (see `block_header`): its shape, codec, position,
    namespace id and key; anything else is refused before any decoding. mac_key: the tenant's
    secret; the block must then carry a valid MAC. out: tensors to decode into instead of new
    ones, (keys, values) [L, H, T, D] or (latent,) [L, T, C], contiguous, on `device`, all of
    one dtype (which then is the output dtype); the Block returned holds them. key_basis: the
    namespace's, for blocks whose keys were stored in it (CodecError without it).

    Raises BlockFormatError (or its subclasses TruncatedBlockError, UnsupportedVersionError,
    ChecksumError, BlockMismatchError, ForgedBlockError) for a blob that is not an intact block
    of this format, or not the expected one; CodecError for an unusable `out`.
    """
    header = _checked_header(blob, expect, key_basis)
    # The checksum (and MAC) run beside the decoding, which reads only within the lengths just
    # checked; nothing decoded is returned unless they pass.
    checks = _CHECKS.submit(verify, blob, mac_key)
    try:
        block = _decode_payload(blob, header, device, dtype, backend, out, key_basis)
    except Exception:
        if (error := checks.exception()) is not None:  # a bad block: say so, not what it broke
            raise error from None
        raise
    if (error := checks.exception()) is not None:  # waits: the blob is read until then
        raise error
    return block


def _checked_header(
    blob: bytes | bytearray | memoryview, expect: BlockHeader | None, key_basis: KeyBasis | None
) -> BlockHeader:
    """The blob's header, once it is shown to be `expect` and readable with `key_basis`."""
    header = parse_header(blob)
    check_length(blob, header)
    if expect is not None and header != expect:
        raise BlockMismatchError(f"got {_describe(header)}, expected {_describe(expect)}")
    if header.has_flag(Flag.KEY_BASIS):
        if key_basis is None:
            raise CodecError("this block's keys are in a key basis: pass the namespace's")
        key_basis.check(header)
    return header


def verified_payload(
    blob: bytes | bytearray | memoryview, expect: BlockHeader | None = None, mac_key: bytes = b"",
    key_basis: KeyBasis | None = None,
) -> tuple[BlockHeader, Tensor]:  # fmt: skip
    """A block's header and its payload, uint8 (a copy: the blob may be a view into a shared
    arena), after every check `decode` makes (header, `expect`, key basis, checksum and MAC),
    for readers that use the sections as they are (kvpool.packed). Raises as `decode` does."""
    header = _checked_header(blob, expect, key_basis)
    verify(blob, mac_key)
    payload = bytearray(payload_bytes(blob, header))
    return header, torch.frombuffer(payload, dtype=torch.uint8)


@dataclass(frozen=True)
class DecodePlan:
    """How blocks of one format are decoded on one backend and device, worked out once from a
    header (`decode_plan`): which backend module decodes the sections, and which of the
    transforms it does itself (the C loop undoes the values' Hadamard rotation and redoes RoPE
    row by row) or torch does after it, in float32."""

    impl: ModuleType
    shape: tuple[int, int, int, int]  # [L, H, T, D]
    latent: bool
    basis: bool  # keys are components in a key basis: rotated back in torch
    predicted: bool  # layers rebuilt by basis.rebuild, which redoes RoPE as it stores them
    rope: RopeParams | None
    hadamard_values: bool
    fused: bool  # impl.decode_tensor takes hadamard= and rope=
    torch_rope: bool  # RoPE redone in torch, on the float32 keys
    torch_hadamard: bool  # the Hadamard rotation undone in torch, on the float32 values
    # keys in a basis (not predicted) rebuilt by basis.keys_from_components from the C loop's
    # components, run by run of tokens, and stored with RoPE by the C loop: no float32 copy
    key_runs: bool = False

    def work_in_float32(self, i: int) -> bool:
        """Whether tensor i is rebuilt in float32 before it is written in the output dtype
        (predicted blocks: basis.rebuild writes each layer in the output dtype itself)."""
        if self.predicted:
            return False
        if i == 0:
            return (self.basis and not self.key_runs) or self.torch_rope
        return self.torch_hadamard

    def decode(
        self, payload: Tensor, header: BlockHeader, targets: list[Tensor],
        key_basis: KeyBasis | None,
    ) -> None:  # fmt: skip
        """The payload (on the device) into `targets` [L, H, T, D] (any format dtype)."""
        device, shape, impl = payload.device, self.shape, self.impl
        works = [
            t if t.dtype == torch.float32 or not self.work_in_float32(i)
            else torch.empty(shape, dtype=torch.float32, device=device)
            for i, t in enumerate(targets)
        ]  # fmt: skip
        rope = self.rope
        tables = None  # RoPE's tables for the C loop or basis.rebuild, which redo it row by row
        if rope is not None and (self.fused or self.predicted):
            tables = rope_tables(rope, header.start_position, header.tokens, device)
        if self.predicted:
            assert key_basis is not None
            if not key_basis.predicted:  # a header may claim PREDICTED for a plain basis's id
                raise CodecError("this block's layers are predicted: its basis must hold the maps")
            store = getattr(impl, "store_rows", store_rows)  # the C loop's, or torch's
            # the C loop's threads and how many split the tokens (torch's backends: none)
            pool = getattr(impl, "POOL", None)
            workers = impl.rebuild_workers() if hasattr(impl, "rebuild_workers") else 1
            if hasattr(impl, "residuals") and not key_basis.per_head_maps:
                # the C loop decodes each layer's residuals for each run of tokens when the
                # rebuild reaches it (in cache, straight into the rows the loop adds to)
                source = impl.residuals(payload, header, key_basis.gaps, self.hadamard_values)
                rebuild_rows(key_basis, source, False, (works[0], works[1]), tables, store, pool,
                             workers)  # fmt: skip
            else:
                self._rebuild_decoded(payload, header, key_basis, works, tables, store, pool,
                                      workers)  # fmt: skip
        else:
            for i, work in enumerate(works):
                sections = header.tensor_sections(i)
                if i == 0 and self.key_runs:  # rebuilt and stored layer by layer, with RoPE
                    assert key_basis is not None
                    source = impl.components(payload, header, key_basis.gaps)
                    keys_from_components(key_basis, source, work, tables, impl.store_rows,
                                         impl.POOL, impl.rebuild_workers())  # fmt: skip
                elif i == 0 and self.basis:
                    assert key_basis is not None
                    components = torch.zeros(shape, dtype=torch.float32, device=device)  # 0: mean
                    impl.decode_tensor(payload, sections, header, components)
                    key_basis.from_components_(components, work)
                elif self.fused:
                    impl.decode_tensor(payload, sections, header, work,
                                       hadamard=i == 1 and self.hadamard_values,
                                       rope=tables if i == 0 else None)  # fmt: skip
                else:
                    impl.decode_tensor(payload, sections, header, work)
        if self.torch_hadamard:
            hadamard_(works[1])
        if rope is not None and self.torch_rope:
            redo_rope_(works[0], rope, header.start_position)
        if header.sink_tokens:
            n = header.layers * header.heads * header.sink_tokens * header.head_dim
            for i, work in enumerate(works):
                start = header.sinks_offset + 2 * n * i
                sink = payload[start : start + 2 * n].view(torch.float16)
                work[:, :, : header.sink_tokens] = sink.view(*shape[:2], header.sink_tokens, -1)
        for work, target in zip(works, targets, strict=True):
            if work is not target:
                target.copy_(work)

    def _rebuild_decoded(
        self, payload: Tensor, header: BlockHeader, key_basis: KeyBasis, works: list[Tensor],
        tables: tuple[Tensor, Tensor] | None, store: Store, pool: Executor | None, workers: int,
    ) -> None:  # fmt: skip
        """A predicted block's layers rebuilt from its residuals decoded whole first (float32
        [L, H, T, D] each, the decoder's scratch): torch's backends, and per-head maps."""
        impl = self.impl
        with scratch.lent(self.shape, payload.device, 2) as coded:  # reused: no page faults
            # key components past a layer's extent are never read, those between stored ones
            # are 0; value sections cover every channel
            for layer, first, end in key_basis.gaps:
                coded[0][layer, :, :, first:end] = 0
            impl.decode_tensor(payload, header.tensor_sections(0), header, coded[0])
            values = header.tensor_sections(1)
            if self.fused and self.hadamard_values:  # the C loop rotates the residuals back
                impl.decode_tensor(payload, values, header, coded[1], hadamard=True)
            else:
                impl.decode_tensor(payload, values, header, coded[1])
            rotated = self.hadamard_values and not self.fused
            rebuild(key_basis, coded, rotated, (works[0], works[1]), tables, store, pool, workers)


def decode_plan(header: BlockHeader, backend: Backend, device: torch.device) -> DecodePlan:
    """The plan for decoding blocks of `header`'s format with `backend` on `device`."""
    rope = None
    if header.has_flag(Flag.PRE_ROPE_KEYS):
        rope = RopeParams(header.rope_theta, header.rotary_dim, header.rope_scaling)
    shape = (header.layers, header.heads, header.tokens, header.head_dim)
    return _plan(backend, device, header.layout, shape, header.flags, rope)


@functools.lru_cache(maxsize=64)
def _plan(
    backend: Backend, device: torch.device, layout: Layout, shape: tuple[int, int, int, int],
    flags: int, rope: RopeParams | None,
) -> DecodePlan:  # fmt: skip
    impl = _backend(backend, device, shape[3])
    basis = bool(flags & Flag.KEY_BASIS)  # then decode() made sure key_basis is its basis
    predicted = bool(flags & Flag.PREDICTED)
    hadamard_values = bool(flags & Flag.HADAMARD_VALUES)
    fused = getattr(impl, "FUSES_TRANSFORMS", False)
    key_runs = basis and not predicted and hasattr(impl, "components")
    return DecodePlan(
        impl=impl, shape=shape, latent=layout == Layout.LATENT, basis=basis, predicted=predicted,
        rope=rope, hadamard_values=hadamard_values, fused=fused,
        torch_rope=rope is not None and (basis or not fused) and not predicted and not key_runs,
        # predicted: basis.rebuild redoes RoPE as it stores each layer (key_runs: likewise)
        # predicted: basis.rebuild undoes the rotation of the value residuals itself
        torch_hadamard=hadamard_values and not fused and not predicted, key_runs=key_runs,
    )  # fmt: skip


def _decode_payload(
    blob: bytes | bytearray | memoryview, header: BlockHeader, device: str | torch.device,
    dtype: torch.dtype | None, backend: Backend, out: tuple[Tensor, ...] | None,
    key_basis: KeyBasis | None,
) -> Block:  # fmt: skip
    device = torch.device(device)
    plan = decode_plan(header, backend, device)
    if out is not None:
        targets = check_out(out, plan.shape, plan.latent, device)
        out_dtype = targets[0].dtype
    else:
        out_dtype = dtype or TORCH_DTYPES[header.dtype]
        targets = [torch.empty(plan.shape, dtype=out_dtype, device=device)
                   for _ in range(header.tensors_per_layer)]  # fmt: skip
    if out_dtype not in FORMAT_DTYPES:
        raise CodecError(f"cannot decode to {out_dtype}; use float16, bfloat16 or float32")
    with warnings.catch_warnings():  # read-only bytes: the payload is only ever read
        warnings.simplefilter("ignore", UserWarning)
        payload = torch.frombuffer(payload_bytes(blob, header), dtype=torch.uint8)
    plan.decode(payload.to(device, non_blocking=True), header, targets, key_basis)
    if plan.latent:
        return Block(header, latent=targets[0].squeeze(1) if out is None else out[0])
    return Block(header, keys=targets[0], values=targets[1])


# ---- internals ----------------------------------------------------------------------------


def check_out(
    out: tuple[Tensor, ...], shape: tuple[int, int, int, int], latent: bool,
    device: torch.device | None = None,
) -> list[Tensor]:  # fmt: skip
    """Tensors a block of `shape` [L, H, T, D] can be decoded into: (keys, values) of that
    shape, or (latent,) [L, T, D]; of one dtype the format decodes to, on `device` when given;
    contiguous or a slice of a contiguous tensor along T (each row of D contiguous, heads and
    layers apart: `cache[:, :, a:b]`). Returns them as [L, H, T, D] views; CodecError otherwise."""
    want = [(shape[0], shape[2], shape[3])] if latent else [shape, shape]
    if not isinstance(out, tuple | list) or len(out) != len(want):
        raise CodecError(f"out must be {len(want)} tensor(s) for this block")
    for x, size in zip(out, want, strict=True):
        if not isinstance(x, Tensor) or tuple(x.shape) != size:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise CodecError(f"out tensor is {got}, the block needs {size}")
        if x.dtype != out[0].dtype or not _rows_apart(x):
            raise CodecError("out tensors must be of one dtype, with rows of D contiguous, apart")
        if device is not None and not (
            x.device.type == device.type and device.index in (None, x.device.index)
        ):
            raise CodecError(f"out tensors must be on {device}")
    if out[0].dtype not in FORMAT_DTYPES:
        raise CodecError(f"cannot decode to {out[0].dtype}; use float16, bfloat16 or float32")
    return [x.unsqueeze(1) for x in out] if latent else list(out)


def _rows_apart(x: Tensor) -> bool:
    """x's last dim is contiguous, its rows follow one another along the token dim, and every
    leading dim steps past the whole extent of the dims after it: no two elements share memory."""
    if x.stride(-1) != 1 or (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        return False
    extent = x.shape[-2] * x.shape[-1]
    for dim in range(x.dim() - 3, -1, -1):
        if x.shape[dim] > 1 and x.stride(dim) < extent:
            return False
        extent = max(extent, x.stride(dim) * x.shape[dim])
    return True


def _check_tensor(x: Tensor, name: str, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise CodecError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise CodecError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FORMAT_DTYPES:
        raise CodecError(f"{name} dtype {x.dtype} not supported (float16, bfloat16, float32)")


def block_header(
    layout: Layout, dtype: torch.dtype, shape: tuple[int, int, int, int], config: CodecConfig,
    start_position: int, binding: Binding = Binding(),
) -> BlockHeader:  # fmt: skip
    """The header `encode` writes for a block of `shape` [layers, heads (1: latent), tokens,
    head_dim] at `start_position`: what a reader expects of the block it asked for."""
    layers, heads, tokens, head_dim = shape
    if len(binding.namespace_id) != len(UNBOUND) or len(binding.key) != len(UNBOUND):
        raise CodecError(f"a binding's namespace id and key are {len(UNBOUND)} bytes each")
    key_bits, value_bits = config.bits_per_layer(layers)
    if start_position < 0:
        raise CodecError(f"start_position must be >= 0, got {start_position}")
    if tokens % config.group_size:
        raise CodecError(
            f"tokens ({tokens}) must be a multiple of group_size ({config.group_size})"
        )
    if head_dim % 8 or head_dim % min(config.group_size, head_dim):
        raise CodecError(f"head_dim {head_dim} must be a multiple of 8 and of the value group")
    if config.hadamard_values and head_dim & (head_dim - 1):
        raise CodecError(f"hadamard_values needs a power-of-two head_dim, got {head_dim}")
    sinks = config.sink_tokens if start_position == 0 else 0
    if sinks >= tokens:
        raise CodecError(f"sink_tokens ({sinks}) must be fewer than the block's tokens ({tokens})")
    rope = config.rope
    if rope is not None and rope.rotary_dim > head_dim:
        raise CodecError(f"rotary_dim {rope.rotary_dim} exceeds head_dim {head_dim}")
    basis = config.key_basis
    if basis is not None:
        if layout != Layout.KV or basis.mean.shape != (layers, heads, head_dim):
            raise CodecError(
                f"the key basis is for keys {tuple(basis.mean.shape)} [layers, heads, head_dim], "
                f"the block's are {(layers, heads, head_dim)}"
            )
        key_bits = basis.widths
    flags = (
        (Flag.PRE_ROPE_KEYS if rope else 0)
        | (Flag.HADAMARD_VALUES if config.hadamard_values else 0)
        | (Flag.MAC if binding.mac_key else 0)
        | (Flag.KEY_BASIS if basis is not None else 0)
        | (Flag.PREDICTED if basis is not None and basis.predicted else 0)
        | (Flag.SYMMETRIC_VALUES if config.symmetric_values else 0)
    )
    return BlockHeader(
        layout=layout, dtype=FORMAT_DTYPES[dtype], layers=layers, heads=heads, tokens=tokens,
        head_dim=head_dim, group_size=config.group_size, key_bits=key_bits,
        value_bits=value_bits if layout == Layout.KV else (), flags=int(flags), sink_tokens=sinks,
        start_position=start_position, rope_theta=rope.theta if rope else 0.0,
        rope_scaling=rope.scaling if rope else 1.0, rotary_dim=rope.rotary_dim if rope else 0,
        namespace_id=binding.namespace_id, key=binding.key,
        basis_id=basis.id if basis is not None else b"",
    )  # fmt: skip


def _describe(h: BlockHeader) -> str:
    return (
        f"(layers {h.layers}, heads {h.heads}, tokens {h.tokens}, head_dim {h.head_dim}, "
        f"start {h.start_position}, namespace {h.namespace_id.hex()[:12]}, key {h.key.hex()[:12]})"
    )


def _fill_sinks(x: Tensor, sinks: int) -> Tensor:
    """Replace the sink rows by the first non-sink token so they do not widen any group."""
    if not sinks:
        return x
    x = x.clone()
    x[:, :, :sinks] = x[:, :, sinks : sinks + 1]
    return x


def _encode_payload(
    header: BlockHeader, tensors: list[Tensor], sinks: list[Tensor], backend: Backend,
    mac_key: bytes, deflate: bool,
) -> bytes:  # fmt: skip
    device = tensors[0].device
    impl = _backend(backend, device, header.head_dim)
    payload = torch.zeros(header.payload_len, dtype=torch.uint8, device=device)
    for i, x in enumerate(tensors):
        impl.encode_tensor(x.contiguous(), header.tensor_sections(i), header, payload)
    if header.sink_tokens:
        flat = torch.cat([s.contiguous().flatten() for s in sinks]).view(torch.uint8)
        payload[header.sinks_offset :] = flat
    return seal(header, payload.cpu().numpy().data, mac_key or None, deflate)


def _encode_predicted(
    header: BlockHeader, basis: KeyBasis, keys: Tensor, values: Tensor, sinks: list[Tensor],
    backend: Backend, mac_key: bytes, deflate: bool,
) -> bytes:  # fmt: skip
    """The writer's run of `basis.predicted_loop`: each layer's residuals quantized into the
    payload and decoded back before the layer is rebuilt, as a reader will rebuild it."""
    for x in (keys, values):  # residuals may be small where the tensors themselves are not
        if not bool(torch.isfinite(x).all()) or float(x.abs().max()) > 65504.0:
            raise NonFiniteError("block holds NaN, inf or a magnitude beyond fp16 (65504)")
    device = keys.device
    impl = _backend(backend, device, header.head_dim)
    payload = torch.zeros(header.payload_len, dtype=torch.uint8, device=device)
    by_layer: list[list[list[Section]]] = [[[] for _ in range(header.layers)] for _ in range(2)]
    for i in range(2):
        for s in header.tensor_sections(i):
            by_layer[i][s.layer].append(s)
    coded = [torch.zeros(keys.shape, dtype=torch.float32, device=device) for _ in range(2)]

    def code(i: int, layer: int) -> None:
        if by_layer[i][layer]:
            impl.encode_tensor(coded[i], by_layer[i][layer], header, payload)
            impl.decode_tensor(payload, by_layer[i][layer], header, coded[i])

    rotate = header.has_flag(Flag.HADAMARD_VALUES)
    mean, _, key_maps, value_maps = basis.on(device)
    assert mean is not None and key_maps is not None and value_maps is not None

    def key_residual(layer: int, prediction: Tensor) -> Tensor:
        rot = basis.rotation_of(layer, device)
        n = rot.shape[-1]
        coded[0][layer, :, :, :n] = (keys[layer].float() - prediction) @ rot
        code(0, layer)
        return coded[0][layer, :, :, :n] @ rot.transpose(-1, -2)

    def value_residual(layer: int, prediction: Tensor) -> Tensor:
        r = values[layer].float() - prediction
        coded[1][layer] = hadamard(r) if rotate else r
        code(1, layer)
        return hadamard(coded[1][layer]) if rotate else coded[1][layer]

    rebuilt = (torch.empty_like(coded[0]), torch.empty_like(coded[1]))
    predicted_loop(rebuilt, mean[0], lambda layer, _: key_maps[layer - 1],
                   lambda layer, _: value_maps[layer - 1], key_residual, value_residual)  # fmt: skip
    if header.sink_tokens:
        flat = torch.cat([s.contiguous().flatten() for s in sinks]).view(torch.uint8)
        payload[header.sinks_offset :] = flat
    return seal(header, payload.cpu().numpy().data, mac_key or None, deflate)


def _backend(name: Backend, device: torch.device, head_dim: int) -> ModuleType:
    """The module that implements encode_tensor / decode_tensor for this device."""
    if name == "reference":
        return reference
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from kvpool.kernels import triton_codec

        if triton_codec.supports(device, head_dim):
            return triton_codec
        if name == "triton":
            raise CodecError(
                f"the Triton path cannot run here (device {device}, head_dim {head_dim})"
            )
        return reference
    if name in ("cpu", "auto") and device.type == "cpu":
        from kvpool.kernels import cpu_codec

        return cpu_codec
    raise CodecError(f"backend {name!r} cannot run on device {device}")
