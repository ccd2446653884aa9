"""Block keys: chained prefix hashes over full blocks of tokens.

Where it stands: the first step of every client call. Tokens are cut into blocks of
`block_tokens`; block i's key commits to the namespace (model, KV layout, codec, TP rank) and
the tenant salt through the chain root, and to every token before it through the chain:

    root   = sha256("kvpool/v1 root" || namespace id || salt)
    key_i  = sha256(key_{i-1} || tokens of block i as little-endian uint32)

Only full blocks have keys. Tokens are hashed as fixed-width little-endian integers whatever
their container (list, numpy array, torch tensor, any integer dtype), so keys are identical
across processes, machines and Python hash seeds. Torch-free: the tier and tools use it too.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NewType

import numpy as np

from kvpool.proto.blockformat import FORMAT_VERSION, DType, Layout
from kvpool.proto.errors import NamespaceError, TokenError

BlockHash = NewType("BlockHash", bytes)
KEY_BYTES = 32
_ROOT_TAG = b"kvpool/v1 root\x00"
_NAMESPACE_TAG = b"kvpool/v1 namespace\x00"
_MAX_TOKEN = 2**32 - 1
MAC_SCHEME = "hmac-sha256"


@dataclass(frozen=True)
class Namespace:
    """Everything that changes the bytes of a stored block; blocks of different namespaces
    never share a key. `codec` is the canonical codec description (see
    `kvpool.kernels.codec.CodecConfig.describe`). The tenant salt is kept out of `id` (which
    the tier sees) and mixed only into the chain root (which it does not).

    mac_key: a tenant secret. When set, every block carries an HMAC-SHA256 under it that
    readers verify, so a block written without the secret (another tenant, a compromised
    shard, a poisoned Redis) is refused. `integrity` ("hmac-sha256" then) is public and part of
    `id`, so blocks with and without a MAC never share keys; the key itself never leaves the
    client. A namespace rebuilt from the wire has `integrity` but no key."""

    model: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: DType
    codec: str
    layout: Layout = Layout.KV
    revision: str = ""
    block_tokens: int = 256
    format_version: int = FORMAT_VERSION
    tp_rank: int = 0
    tp_size: int = 1
    integrity: str = ""
    salt: bytes = field(default=b"", repr=False)
    mac_key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise NamespaceError("namespace needs a model id")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens", "tp_size"):
            if getattr(self, name) <= 0:
                raise NamespaceError(f"namespace {name} must be positive")
        if not 0 <= self.tp_rank < self.tp_size:
            raise NamespaceError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        if not isinstance(self.salt, bytes) or not isinstance(self.mac_key, bytes):
            raise NamespaceError("salt and mac_key must be bytes")
        if self.mac_key and not self.integrity:
            object.__setattr__(self, "integrity", MAC_SCHEME)
        if self.integrity not in ("", MAC_SCHEME):
            raise NamespaceError(f"integrity must be '' or {MAC_SCHEME!r}, got {self.integrity!r}")
        object.__setattr__(self, "dtype", DType(self.dtype))
        object.__setattr__(self, "layout", Layout(self.layout))

    def fields(self) -> dict[str, Any]:
        """The namespace's public fields (everything but the salt), JSON-ready."""
        d = asdict(self)
        d.pop("salt")
        d.pop("mac_key")
        d["dtype"], d["layout"] = int(self.dtype), int(self.layout)
        return d

    @functools.cached_property  # the fields are frozen; the value is not a field (not compared)
    def id(self) -> bytes:
        """sha256 of the canonical JSON of the public fields: what the tier registers."""
        canon = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(_NAMESPACE_TAG + canon.encode()).digest()

    @property
    def root(self) -> bytes:
        """key_{-1}: commits to the namespace id and the tenant salt."""
        salt = hashlib.sha256(self.salt).digest()
        return hashlib.sha256(_ROOT_TAG + self.id + salt).digest()


def token_array(tokens: Sequence[int] | Any) -> np.ndarray:
    """Tokens as a 1-D little-endian uint32 array; raises for anything that is not a 1-D
    sequence of integers in [0, 2**32)."""
    if hasattr(tokens, "detach"):  # a torch tensor, possibly on a GPU
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype="<u4")
    if arr.dtype.kind not in "iu":
        raise TokenError(f"tokens must be integers, got {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > _MAX_TOKEN:
        raise TokenError("token ids must lie in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def block_keys(namespace: Namespace, tokens: Sequence[int] | Any) -> list[BlockHash]:
    """One key per full block of `tokens`, in order; the tail that does not fill a block has none."""
    arr = token_array(tokens)
    n = namespace.block_tokens
    buf = arr[: len(arr) - len(arr) % n].tobytes()
    step = 4 * n
    keys: list[BlockHash] = []
    prev = namespace.root
    for off in range(0, len(buf), step):
        prev = hashlib.sha256(prev + buf[off : off + step]).digest()
        keys.append(BlockHash(prev))
    return keys
