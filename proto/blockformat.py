"""The stored block format: a self-describing header, then the packed payload.

Where it stands: the contract between writers, the tier and readers. The codec
(kvpool.kernels.codec) writes and reads blocks in this format; the cache tier checks a block's
header, binding and checksum with this module alone, without torch; the client checks that a
fetched block is the one it asked for (`BlockHeader` equality) and, with a tenant secret, its MAC.

Wire layout, all integers little-endian:

    block    = header | payload | mac (32 bytes, only with the MAC flag)
    header   = FIXED (struct below) | key bits[layers] | value bits[layers]
               | (KEY_BASIS only) basis id (16 bytes) | crc32
    payload  = for each layer: the key section(s), then the value section (latent: one section)
               then, when sink tokens are kept, fp16 sinks [L, H, S, D] of keys, then values
    section  = packed codes | fp16 scales | fp16 minimums, each padded to 16 bytes
               (SYMMETRIC_VALUES: a value section is packed codes | fp16 scales, no minimums)

KEY_BASIS (transform coding of keys): keys are stored as their components in a calibrated
orthonormal basis per (layer, head), named by the basis id; the reader must hold that basis.
"key bits" then holds one width per 8 components of each layer ([layers * head_dim / 8], 0: not
stored, decoded as the basis mean), and a layer's keys are several sections, one per run of
equal nonzero widths, split into power-of-two runs of components (largest first), in order.

PREDICTED (with KEY_BASIS; the basis then also holds linear maps between layers): layer l's
keys and values are predicted from layer l - 1 as the reader reconstructs it, and the sections
hold only what the prediction missed: the key residual's components in the basis, the value
residual (Hadamard-rotated under HADAMARD_VALUES). A reader rebuilds the layers in order.

SYMMETRIC_VALUES: the sections grouped per token (values; the latent) keep one fp16 scale per
group and no minimum: at b bits a code c stands for (c - (2^b - 1) / 2) * s, levels symmetric
about zero (2-bit: -1.5 s, -0.5 s, 0.5 s, 1.5 s), for residuals centred on zero (PREDICTED) or
Hadamard-rotated values. 2-bit values per token at G=64 then cost 2.25 bits instead of 2.5. The
flag changes the payload's layout and the codec's part of the namespace, so blocks of the two
formats never mix; a block without it reads as before.

DEFLATED (any block; lossless): the payload is stored as one raw deflate stream (RFC 1951,
Huffman coding only, no string matches), and the header's payload length field holds the stored
length, which must be shorter than the layout's. 2-bit codes are far from uniform (a group's
minimum and maximum are the only values at the end levels), so their bytes carry about 1.5 to
1.7 bits of information per code: codec v2's blocks shrink by about an eighth, and the decoded
tensors are those of the plain block, bit for bit. So it is not part of the namespace and blocks
of both kinds may meet under one key; `BlockHeader` equality ignores it (`stored_len`). The
crc32 and MAC cover the stored bytes; a reader inflates only after the header checks, to
exactly the layout's length (`payload_bytes`), never more.

A block is bound to where it belongs: its header names its namespace id, its own block key,
its start position and token count. A block of the right shape stored under another key or
position therefore fails the shard's check on Put and on Redis read-through, and the client's
check before decoding.

Packed codes: one row is the `head_dim` codes of one (head, token). A row is split into bit
planes (2 bits: one 2-bit plane; 3 bits: a 2-bit plane of the low bits and a 1-bit plane of
the high bit; 4 bits: one 4-bit plane; 8 bits: one byte per code). A plane of width w packs
m = 8 / w codes per byte, "planar": byte j of the plane holds codes j, j + n/m, j + 2n/m, ...
(n = row length) at bit offsets 0, w, 2w, ...  Byte-addressed, so the format has no endianness.

The crc32 covers the header up to the crc field, the whole payload and the MAC. The MAC is
HMAC-SHA256 under the tenant's secret over the header up to the crc field and the payload
(1.4 GB/s here with SHA extensions against 0.53 GB/s for keyed BLAKE2b).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field, replace
from enum import IntEnum

try:  # zlib-ng: the same CRC-32, 10-15x faster than zlib's (it folds with carry-less multiplies),
    # and deflate streams in the same format, 2-3x faster both ways
    import zlib_ng.zlib_ng as _zlib
except ImportError:  # e.g. where only the contract is installed: zlib gives the same values
    import zlib as _zlib  # type: ignore[no-redef]

from kvpool.proto.errors import (
    BlockFormatError,
    BlockMismatchError,
    ChecksumError,
    ForgedBlockError,
    TruncatedBlockError,
    UnsupportedVersionError,
)

crc32 = _zlib.crc32
_INFLATE_ERROR: type[Exception] = _zlib.error  # type: ignore[assignment]  # zlib-ng: its own class
MAGIC = b"KVPB"
FORMAT_VERSION = 4  # 3: KEY_BASIS; 4: PREDICTED
ID_BYTES = 32  # namespace ids and block keys
MAC_BYTES = 32
BASIS_ID_BYTES = 16
CHUNK = 8  # components per key width under KEY_BASIS
UNBOUND = bytes(ID_BYTES)  # the namespace id and key of a block encoded outside any namespace
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
ALIGN = 16

# magic, version, header_len, layout, dtype, flags, group, layers, heads, head_dim,
# sink_tokens, rotary_dim, tokens, start_position, rope_theta, rope_scaling, payload_len,
# namespace_id, key
_FIXED = struct.Struct("<4sHHBBBxHHHHHHIQddQ32s32s")
_CRC = struct.Struct("<I")


class Layout(IntEnum):
    KV = 1  # keys and values [layers, kv_heads, tokens, head_dim]
    LATENT = 2  # one latent vector per token and layer [layers, tokens, latent_dim]


class DType(IntEnum):
    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT32 = 3


class Flag(IntEnum):
    PRE_ROPE_KEYS = 1  # keys were quantized with the rotary embedding undone
    HADAMARD_VALUES = 2  # values were quantized after an orthonormal Hadamard rotation
    MAC = 4  # a tenant MAC follows the payload
    KEY_BASIS = 8  # keys stored as components in a calibrated basis, widths per 8 components
    PREDICTED = 16  # layers predicted from the layer before; sections hold residuals (KEY_BASIS)
    SYMMETRIC_VALUES = 32  # per-token sections: one fp16 scale per group, no minimum
    DEFLATED = 64  # the payload is stored deflated (wire only: BlockHeader.stored_len)


def plane_widths(bits: int) -> tuple[int, ...]:
    """Bit widths of the planes a `bits`-bit code is split into (low bits first)."""
    return {2: (2,), 3: (2, 1), 4: (4,), 8: (8,)}[bits]


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Section:
    """Where one (layer, tensor) lives in the payload, in bytes from the payload start: the
    channels [first, first + channels) of that layer's tensor (all of head_dim, except for keys
    under KEY_BASIS, where a section holds a run of components)."""

    codes: int
    scales: int
    mins: int
    bits: int
    is_key: bool  # key sections group G tokens of a channel; others G channels of a token
    n_params: int  # scales (= minimums) in the section
    layer: int = 0
    first: int = 0
    channels: int = 0
    symmetric: bool = False  # SYMMETRIC_VALUES: no minimums (`mins` == `scales`, unused)


# validated shapes -> (sections, sinks_offset, payload_len): a header's layout costs more than
# parsing it, and a namespace's blocks all share one shape
_LAYOUTS: dict[tuple[object, ...], tuple[tuple[Section, ...], int, int]] = {}
_LAYOUTS_KEPT = 256


@dataclass(frozen=True)
class BlockHeader:
    """Everything needed to decode a block, and everything that changes its bytes."""

    layout: Layout
    dtype: DType
    layers: int
    heads: int  # kv heads; 1 for the latent layout
    tokens: int
    head_dim: int  # latent_dim for the latent layout
    group_size: int
    key_bits: tuple[int, ...]  # per layer; the latent layout's bits
    value_bits: tuple[int, ...]  # per layer; empty for the latent layout
    flags: int = 0
    sink_tokens: int = 0
    start_position: int = 0
    rope_theta: float = 0.0
    rope_scaling: float = 1.0
    rotary_dim: int = 0
    namespace_id: bytes = UNBOUND
    key: bytes = UNBOUND
    basis_id: bytes = b""  # KEY_BASIS only
    version: int = FORMAT_VERSION
    stored_len: int = field(default=0, compare=False)  # DEFLATED: the stored payload's bytes
    sections: tuple[Section, ...] = field(init=False, repr=False, compare=False)
    sinks_offset: int = field(init=False, repr=False, compare=False)
    payload_len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate_placement()
        shape = (self.version, self.layout, self.dtype, self.layers, self.heads, self.tokens,
                 self.head_dim, self.group_size, self.key_bits, self.value_bits, self.flags,
                 self.sink_tokens, self.rope_theta, self.rope_scaling, self.rotary_dim,
                 len(self.basis_id))  # fmt: skip
        known = _LAYOUTS.get(shape)
        if known is None:  # a new shape: validated and laid out once (every block repeats it)
            self._validate()
            known = self._layout()
            if len(_LAYOUTS) >= _LAYOUTS_KEPT:
                _LAYOUTS.clear()
            _LAYOUTS[shape] = known
        sections, sinks_offset, payload_len = known
        object.__setattr__(self, "sections", sections)
        object.__setattr__(self, "sinks_offset", sinks_offset)
        object.__setattr__(self, "payload_len", payload_len)
        if self.stored_len and not 0 < self.stored_len < payload_len:
            raise BlockFormatError(
                f"a deflated payload of {self.stored_len} bytes for a {payload_len}-byte layout"
            )

    def _layout(self) -> tuple[tuple[Section, ...], int, int]:
        """(sections, sinks_offset, payload_len) of a validated header's shape."""
        sections: list[Section] = []
        offset = 0
        tensors = [(True, self.key_bits), (False, self.value_bits)]
        if self.layout == Layout.LATENT:
            tensors = [(False, self.key_bits)]
        symmetric = self.has_flag(Flag.SYMMETRIC_VALUES)
        for layer in range(self.layers):
            for is_key, bits_per_layer in tensors:
                if is_key and self.has_flag(Flag.KEY_BASIS):
                    runs = self._key_runs(layer)
                else:
                    runs = [(0, self.head_dim, bits_per_layer[layer])]
                for first, channels, bits in runs:
                    rows = self.heads * self.tokens
                    group = self.group_size if is_key else self.value_group
                    n_params = rows * channels // group
                    sym = symmetric and not is_key
                    codes = offset
                    scales = codes + _pad(rows * channels * bits // 8)
                    mins = scales if sym else scales + _pad(2 * n_params)
                    offset = mins + _pad(2 * n_params)
                    sections.append(Section(codes, scales, mins, bits, is_key, n_params,
                                            layer, first, channels, sym))  # fmt: skip
        return tuple(sections), offset, offset + 2 * self.sink_elements

    def _key_runs(self, layer: int) -> list[tuple[int, int, int]]:
        """(first component, count, bits) of a layer's key sections under KEY_BASIS."""
        per = self.head_dim // CHUNK
        widths = self.key_bits[layer * per : (layer + 1) * per]
        runs: list[tuple[int, int, int]] = []
        c = 0
        while c < per:
            end = c
            while end < per and widths[end] == widths[c]:
                end += 1
            left, first = (end - c) * CHUNK, c * CHUNK
            while widths[c] and left:  # power-of-two pieces, largest first
                piece = 1 << (left.bit_length() - 1)
                runs.append((first, piece, widths[c]))
                first, left = first + piece, left - piece
            c = end
        return runs

    def tensor_sections(self, tensor: int) -> list[Section]:
        """The sections of keys (0), values (1) or the latent (0), in payload order."""
        if self.layout == Layout.LATENT:
            return list(self.sections)
        return [s for s in self.sections if s.is_key == (tensor == 0)]

    @property
    def value_group(self) -> int:
        """Group size along channels (values, latent): the group size clamped to head_dim."""
        return min(self.group_size, self.head_dim)

    @property
    def tensors_per_layer(self) -> int:
        return 1 if self.layout == Layout.LATENT else 2

    @property
    def sink_elements(self) -> int:
        """fp16 elements of the kept sink tokens, all tensors and layers."""
        per_tensor = self.layers * self.heads * self.sink_tokens * self.head_dim
        return per_tensor * self.tensors_per_layer

    @property
    def header_len(self) -> int:
        return (
            _FIXED.size + len(self.key_bits) + len(self.value_bits) + len(self.basis_id) + _CRC.size
        )

    @property
    def mac_len(self) -> int:
        return MAC_BYTES if self.flags & Flag.MAC else 0

    @property
    def stored_payload_len(self) -> int:
        """Bytes of the payload as stored: deflated (DEFLATED) or as laid out."""
        return self.stored_len or self.payload_len

    @property
    def total_len(self) -> int:
        """Bytes of the whole block: header, stored payload and MAC."""
        return self.header_len + self.stored_payload_len + self.mac_len

    @property
    def elements(self) -> int:
        """Values the block stands for (keys and values, or latent)."""
        return self.layers * self.heads * self.tokens * self.head_dim * self.tensors_per_layer

    def _validate_placement(self) -> None:
        """The checks of what changes from block to block of one shape: ids and position."""
        if self.sink_tokens and self.start_position != 0:
            raise BlockFormatError("sink tokens are only kept in a block starting at position 0")
        if self.start_position < 0:
            raise BlockFormatError("start_position must be >= 0")
        if len(self.namespace_id) != ID_BYTES or len(self.key) != ID_BYTES:
            raise BlockFormatError(f"namespace id and key must be {ID_BYTES} bytes")

    def _validate(self) -> None:
        """The checks of the shape (see `_validate_placement` for the rest)."""
        if self.version != FORMAT_VERSION:
            raise UnsupportedVersionError(f"block format version {self.version}")
        for name in ("layers", "heads", "tokens", "head_dim"):
            if getattr(self, name) <= 0:
                raise BlockFormatError(f"{name} must be positive, got {getattr(self, name)}")
        if self.group_size not in SUPPORTED_GROUPS:
            raise BlockFormatError(f"group size {self.group_size} not in {SUPPORTED_GROUPS}")
        if self.tokens % self.group_size:
            raise BlockFormatError(
                f"tokens ({self.tokens}) must be a multiple of the group size ({self.group_size})"
            )
        if self.head_dim % 8 or self.head_dim % self.value_group:
            raise BlockFormatError(
                f"head_dim {self.head_dim} must be a multiple of 8 and of the group size"
            )
        want_value_bits = 0 if self.layout == Layout.LATENT else self.layers
        basis = bool(self.flags & Flag.KEY_BASIS)
        want_key_bits = self.layers * self.head_dim // CHUNK if basis else self.layers
        if len(self.key_bits) != want_key_bits or len(self.value_bits) != want_value_bits:
            raise BlockFormatError("bits per layer do not match the number of layers")
        for b in self.value_bits:
            if b not in SUPPORTED_BITS:
                raise BlockFormatError(f"bit width {b} not in {SUPPORTED_BITS}")
        for b in self.key_bits:
            if b not in SUPPORTED_BITS and not (basis and b == 0):
                raise BlockFormatError(f"bit width {b} not in {SUPPORTED_BITS}")
        if len(self.basis_id) != (BASIS_ID_BYTES if basis else 0):
            raise BlockFormatError("a basis id comes with KEY_BASIS, and only with it")
        if basis and self.layout != Layout.KV:
            raise BlockFormatError("a key basis needs the KV layout")
        if not 0 <= self.sink_tokens < self.tokens:
            raise BlockFormatError(f"sink_tokens {self.sink_tokens} out of range")
        if self.flags & ~(
            Flag.PRE_ROPE_KEYS
            | Flag.HADAMARD_VALUES
            | Flag.MAC
            | Flag.KEY_BASIS
            | Flag.PREDICTED
            | Flag.SYMMETRIC_VALUES
        ):
            raise BlockFormatError(f"unknown option flags {self.flags:#x}")
        if self.flags & Flag.PREDICTED and not basis:
            raise BlockFormatError("PREDICTED blocks keep their keys in a basis (KEY_BASIS)")
        if self.flags & Flag.PRE_ROPE_KEYS:
            if self.layout == Layout.LATENT:
                raise BlockFormatError("pre-RoPE keys need the KV layout")
            if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
                raise BlockFormatError(f"rotary_dim {self.rotary_dim} invalid")
            if not (self.rope_theta > 0 and self.rope_scaling > 0):
                raise BlockFormatError("rope_theta and rope_scaling must be positive")

    def has_flag(self, flag: Flag) -> bool:
        return bool(self.flags & flag)

    def pack(self) -> bytes:
        """The header bytes without the trailing crc32 (see `seal`)."""
        fixed = _FIXED.pack(
            MAGIC, self.version, self.header_len, self.layout, self.dtype,
            self.flags | (Flag.DEFLATED if self.stored_len else 0),
            self.group_size, self.layers, self.heads, self.head_dim, self.sink_tokens,
            self.rotary_dim, self.tokens, self.start_position, self.rope_theta,
            self.rope_scaling, self.stored_payload_len, self.namespace_id, self.key,
        )  # fmt: skip
        return fixed + bytes(self.key_bits) + bytes(self.value_bits) + self.basis_id


def block_mac(
    mac_key: bytes, head: bytes | memoryview, payload: bytes | bytearray | memoryview
) -> bytes:
    """HMAC-SHA256 under the tenant's secret of the header (up to its crc) and the payload."""
    mac = hmac.new(mac_key, head, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


def seal(
    header: BlockHeader, payload: bytes | bytearray | memoryview, mac_key: bytes | None = None,
    deflate: bool = False,
) -> bytes:  # fmt: skip
    """Join header and payload into a block, with the crc32 over both (and the MAC): a header
    with the MAC flag needs `mac_key`, one without refuses it. `deflate`: store the payload
    deflated (DEFLATED) when that makes it shorter."""
    if len(payload) != header.payload_len or header.stored_len:
        raise BlockFormatError(f"payload is {len(payload)} bytes, header says {header.payload_len}")
    if deflate:
        packer = _zlib.compressobj(1, _zlib.DEFLATED, -15, 9, _zlib.Z_HUFFMAN_ONLY)
        packed = packer.compress(payload) + packer.flush()
        if len(packed) < len(payload):
            header, payload = replace(header, stored_len=len(packed)), packed
    if bool(mac_key) != header.has_flag(Flag.MAC):
        raise BlockFormatError("a block carries a MAC exactly when a mac_key is given")
    head = header.pack()
    mac = block_mac(mac_key, head, payload) if mac_key else b""
    crc = crc32(mac, crc32(payload, crc32(head)))
    return b"".join((head, _CRC.pack(crc), payload, mac))


def parse_header(blob: bytes | bytearray | memoryview) -> BlockHeader:
    """Read and validate a block's header (no checksum check; see `verify`)."""
    if len(blob) < _FIXED.size:
        raise TruncatedBlockError(f"{len(blob)} bytes is shorter than a block header")
    (magic, version, header_len, layout, dtype, flags, group, layers, heads, head_dim, sinks,
     rotary_dim, tokens, start, theta, scaling, payload_len, namespace_id, key,
     ) = _FIXED.unpack_from(blob)  # fmt: skip
    stored_len = payload_len if flags & Flag.DEFLATED else 0
    flags &= ~Flag.DEFLATED
    if magic != MAGIC:
        raise BlockFormatError(f"not a kvpool block (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(
            f"block format version {version}; this build reads version {FORMAT_VERSION}"
        )
    try:
        layout, dtype = Layout(layout), DType(dtype)
    except ValueError as e:
        raise BlockFormatError(str(e)) from None
    n_value_bits = 0 if layout == Layout.LATENT else layers
    basis = flags & Flag.KEY_BASIS
    n_key_bits = layers * head_dim // CHUNK if basis else layers
    id_len = BASIS_ID_BYTES if basis else 0
    if header_len != _FIXED.size + n_key_bits + n_value_bits + id_len + _CRC.size:
        raise BlockFormatError(f"header length {header_len} does not match its layer count")
    if len(blob) < header_len:
        raise TruncatedBlockError(f"{len(blob)} bytes is shorter than the {header_len}-byte header")
    bits = bytes(blob[_FIXED.size : header_len - _CRC.size - id_len])
    header = BlockHeader(
        layout=layout, dtype=dtype, layers=layers, heads=heads, tokens=tokens,
        head_dim=head_dim, group_size=group, key_bits=tuple(bits[:n_key_bits]),
        value_bits=tuple(bits[n_key_bits:]), flags=flags, sink_tokens=sinks,
        start_position=start, rope_theta=theta, rope_scaling=scaling, rotary_dim=rotary_dim,
        namespace_id=namespace_id, key=key,
        basis_id=bytes(blob[header_len - _CRC.size - id_len : header_len - _CRC.size]),
        stored_len=stored_len,
    )  # fmt: skip
    if header.stored_payload_len != payload_len:
        raise BlockFormatError(
            f"payload length field {payload_len} does not match the layout ({header.payload_len})"
        )
    return header


def check_length(blob: bytes | bytearray | memoryview, header: BlockHeader) -> None:
    """The blob is exactly as long as its header says (TruncatedBlockError, BlockFormatError)."""
    total = header.total_len
    if len(blob) < total:
        raise TruncatedBlockError(f"block is {len(blob)} bytes, its header says {total}")
    if len(blob) > total:
        raise BlockFormatError(f"block is {len(blob)} bytes, its header says {total}")


def verify(blob: bytes | bytearray | memoryview, mac_key: bytes | None = None) -> BlockHeader:
    """Parse the header, check the length and the crc32 (and, given the tenant's `mac_key`,
    that the block carries a valid MAC); return the header.

    Raises TruncatedBlockError, BlockFormatError, UnsupportedVersionError, ChecksumError or
    ForgedBlockError.
    """
    header = parse_header(blob)
    check_length(blob, header)
    view = memoryview(blob)
    crc_at = header.header_len - _CRC.size
    (stored,) = _CRC.unpack_from(view, crc_at)
    crc = crc32(view[header.header_len :], crc32(view[:crc_at]))
    if crc != stored:
        raise ChecksumError(f"crc32 {crc:#010x} != stored {stored:#010x}")
    if mac_key:
        if not header.has_flag(Flag.MAC):
            raise ForgedBlockError("the block carries no MAC; this namespace requires one")
        payload_end = header.header_len + header.stored_payload_len
        want = block_mac(mac_key, view[:crc_at], view[header.header_len : payload_end])
        if not hmac.compare_digest(want, view[payload_end:]):
            raise ForgedBlockError("the block's MAC does not verify under the tenant's secret")
    return header


def payload_bytes(blob: bytes | bytearray | memoryview, header: BlockHeader) -> bytes | memoryview:
    """The payload of a block whose header and length are checked, as laid out: a view into
    `blob`, or for a DEFLATED block the stream inflated to exactly `header.payload_len` bytes
    (BlockFormatError for a stream that is corrupt, ends early or has bytes after its end)."""
    start = header.header_len
    stored = memoryview(blob)[start : start + header.stored_payload_len]
    if not header.stored_len:
        return stored
    unpacker = _zlib.decompressobj(-15)
    try:
        payload = unpacker.decompress(stored, header.payload_len)
    except _INFLATE_ERROR as e:
        raise BlockFormatError(f"the deflated payload is corrupt: {e}") from None
    if len(payload) != header.payload_len or not unpacker.eof or unpacker.unconsumed_tail:
        raise BlockFormatError(
            f"the deflated payload does not inflate to the layout's {header.payload_len} bytes"
        )
    if unpacker.unused_data:
        raise BlockFormatError("bytes after the end of the deflated payload")
    return payload


def check_bound(header: BlockHeader, namespace_id: bytes, key: bytes, position: int) -> None:
    """The tier's binding check: the header names this namespace id, key and start position."""
    if header.namespace_id != namespace_id or header.key != key:
        raise BlockMismatchError("the block is bound to another namespace or key")
    if header.start_position != position * header.tokens:
        raise BlockMismatchError(
            f"the block starts at {header.start_position}, not at block {position}"
        )
