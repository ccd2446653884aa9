"""Block keys: chained prefix hashes over full blocks of tokens.

Where it stands: the first step of every client call. Tokens are cut into blocks of
`block_tokens`; block i's key commits to the namespace (model, KV layout, codec, TP rank) and
the tenant salt through the namespace root, and to every token before it through a chain.

The chain runs over pages of `page_tokens` tokens, exactly as SGLang's HiCache chains its page
keys, so that an engine that never sees token ids (SGLang's storage backend) derives the same
block keys from its own page keys as vLLM's connector and `CachedModel` derive from tokens:

    d_j    = sha256(d_{j-1} || tokens of page j as little-endian uint32)   (d_0: no prior)
    root   = sha256("kvpool/v2 root" || namespace id || sha256(salt) || page_tokens)
    key_b  = sha256("kvpool/v2 block" || root || d_{last page of block b})

The chain itself is engine-neutral; the namespace (model, codec, TP rank, tenant salt) still
isolates blocks through `root`, in every key. `page_tokens` divides `block_tokens`; unless
given it is gcd(64, block_tokens) (64, SGLang's usual HiCache page, for 256-token blocks).
`page_tokens=0` keeps the first scheme, one chain over whole blocks from the root:

    root   = sha256("kvpool/v1 root" || namespace id || sha256(salt))
    key_b  = sha256(key_{b-1} || tokens of block b as little-endian uint32)   (key_{-1}: root)

The scheme is the client's choice, like the salt: it is not part of the namespace id the tier
sees, only of the keys. Two schemes never share a key, so blocks stored under one are misses
under the other.

Placement in the key. The tier places a key by its first 8 bytes (`kvpool.ring`), so a block's
stored key is its chain digest (`key_b` above) with the first `PLACE_BYTES` bytes replaced by
those of the first block of its run (`run_head`): the blocks of a run share one owner, and a
request's blocks cost one message per run, not one per shard they hash to. Runs double from
one block up to `RUN_BLOCKS` ({0}, {1}, {2, 3}, {4..7}, then 8 at a time): a shared prefix of
s blocks (a system prompt every request reads) can pull at most s of the blocks after it,
different in each request, onto its own shard, and only where s is not a run's start (and
`kvpool.ring.Placement` spreads a run that turns hot). The cap is the unit of load balance:
a prompt of up to 24 blocks is 6 runs with a cap of 8 or of 16, and a cap of 8 halves what
one long prompt read again and again puts on one shard (on a 2,000-request slice of the
Mooncake trace, 16 shards: bytes served max over mean 1.29 at 8, 1.46 at 16). The other 24 bytes are the digest's own: keys collide only if 192 bits of sha256 do, and
every key still commits to the namespace (through `root`) and to every earlier token. Every
reader derives the same key (`block_keys`, `chain_block`, `run_keys` for engines that hold page
digests), so nothing that routes by key needs to know about runs.

Only full blocks have keys. Tokens are hashed as fixed-width little-endian integers whatever
their container (list, numpy array, torch tensor, any integer dtype), so keys are identical
across processes, machines and Python hash seeds. Torch-free: the tier and tools use it too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NewType

import numpy as np

from kvpool.proto.blockformat import FORMAT_VERSION, DType, Layout
from kvpool.proto.errors import NamespaceError, TokenError

BlockHash = NewType("BlockHash", bytes)
KEY_BYTES = 32
_ROOT_TAG = b"kvpool/v1 root\x00"
_PAGE_ROOT_TAG = b"kvpool/v2 root\x00"
_PAGE_BLOCK_TAG = b"kvpool/v2 block\x00"
DEFAULT_PAGE_TOKENS = 64
RUN_BLOCKS = 8  # the longest run of blocks placed together (a power of two)
PLACE_BYTES = 8  # the key bytes the ring places by: a run's first block's
_TRAILER = 12  # a chain state after a block: its digest, then the next position and run head
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
    client. A namespace rebuilt from the wire has `integrity` but no key.

    page_tokens: the key scheme (see the module docstring): the page of the chain, a divisor
    of `block_tokens`; None picks gcd(64, block_tokens); 0 is the first scheme (a chain over
    whole blocks). Client-side like the salt: not in `id`, only in `root`."""

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
    page_tokens: int | None = None

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
        if self.page_tokens is None:
            object.__setattr__(
                self, "page_tokens", math.gcd(DEFAULT_PAGE_TOKENS, self.block_tokens)
            )
        if not isinstance(self.page_tokens, int) or self.page_tokens < 0:
            raise NamespaceError(
                f"page_tokens must be a non-negative int, got {self.page_tokens!r}"
            )
        if self.page_tokens and self.block_tokens % self.page_tokens:
            raise NamespaceError(
                f"page_tokens {self.page_tokens} must divide block_tokens {self.block_tokens}"
            )
        object.__setattr__(self, "dtype", DType(self.dtype))
        object.__setattr__(self, "layout", Layout(self.layout))

    def fields(self) -> dict[str, Any]:
        """The namespace's public fields (everything but the salt), JSON-ready."""
        d = asdict(self)
        d.pop("salt")
        d.pop("mac_key")
        d.pop("page_tokens")
        d["dtype"], d["layout"] = int(self.dtype), int(self.layout)
        return d

    @functools.cached_property  # the fields are frozen; the value is not a field (not compared)
    def id(self) -> bytes:
        """sha256 of the canonical JSON of the public fields: what the tier registers."""
        canon = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(_NAMESPACE_TAG + canon.encode()).digest()

    @functools.cached_property
    def root(self) -> bytes:
        """Commits to the namespace id, the tenant salt and the key scheme (every block key
        commits to it)."""
        salt = hashlib.sha256(self.salt).digest()
        if not self.page_tokens:
            return hashlib.sha256(_ROOT_TAG + self.id + salt).digest()
        scheme = self.page_tokens.to_bytes(4, "little")
        return hashlib.sha256(_PAGE_ROOT_TAG + self.id + salt + scheme).digest()


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
    state = chain_start(namespace)
    for off in range(0, len(buf), step):
        state, key = chain_block(namespace, state, buf[off : off + step])
        keys.append(key)
    return keys


def run_head(position: int, run_blocks: int | None = None) -> int:
    """The position of the first block of the run that block `position` belongs to: runs
    double from one block up to `run_blocks` (default RUN_BLOCKS), then stay that long."""
    r = RUN_BLOCKS if run_blocks is None else run_blocks
    if position < 0:
        raise ValueError(f"a block position is non-negative, got {position}")
    if position < r:
        return position and 1 << (position.bit_length() - 1)
    return position - position % r


def placed(head: bytes, digest: bytes) -> BlockHash:
    """A block's stored key: its own digest, placed with the head of its run."""
    return BlockHash(head[:PLACE_BYTES] + digest[PLACE_BYTES:])


def run_keys(digests: Sequence[bytes]) -> list[BlockHash]:
    """The stored keys of a prefix's blocks 0, 1, ... from their chain digests (`key_b` of the
    module docstring; `page_block_key` gives them from page digests)."""
    return [placed(digests[run_head(b)], d) for b, d in enumerate(digests)]


def chain_start(namespace: Namespace) -> bytes:
    """The chain's state before the first block: the root (first scheme) or no digest yet."""
    return b"" if namespace.page_tokens else namespace.root


def chain_block(namespace: Namespace, state: bytes, block: bytes) -> tuple[bytes, BlockHash]:
    """One block of the chain: (the state after it, its stored key), from the state before it
    and its tokens as little-endian uint32 bytes (`block_tokens` of them). A state is opaque:
    `chain_start`'s, or the one the previous block returned (the chain's digest, then the
    block's position and the placement bytes of its run's head)."""
    if len(block) != 4 * namespace.block_tokens:
        raise TokenError(f"a block is {4 * namespace.block_tokens} bytes, got {len(block)}")
    if len(state) == KEY_BYTES + _TRAILER:
        prior, position = state[:KEY_BYTES], int.from_bytes(state[KEY_BYTES:-PLACE_BYTES], "little")
        head = state[-PLACE_BYTES:]
    elif len(state) in (0, KEY_BYTES):
        prior, position, head = state, 0, b""
    else:
        raise TokenError(f"not a chain state: {len(state)} bytes")
    if not namespace.page_tokens:
        prior = digest = hashlib.sha256(prior + block).digest()
    else:
        step = 4 * namespace.page_tokens
        for off in range(0, len(block), step):
            prior = hashlib.sha256(prior + block[off : off + step]).digest()
        digest = _page_key(namespace, prior)
    if run_head(position) == position:
        head = digest[:PLACE_BYTES]
    return prior + (position + 1).to_bytes(4, "little") + head, placed(head, digest)


def page_block_key(namespace: Namespace, last_page: bytes) -> BlockHash:
    """The chain digest of the block whose last page has chain digest `last_page` (the page
    scheme), before placement: what an engine that holds page digests, not tokens, stores
    block b under is `run_keys` of these digests for blocks 0..b."""
    if not namespace.page_tokens:
        raise NamespaceError("the namespace chains whole blocks (page_tokens=0), not pages")
    if len(last_page) != KEY_BYTES:
        raise TokenError(f"a page digest is {KEY_BYTES} bytes, got {len(last_page)}")
    return _page_key(namespace, last_page)


def _page_key(namespace: Namespace, last_page: bytes) -> BlockHash:
    return BlockHash(hashlib.sha256(_PAGE_BLOCK_TAG + namespace.root + last_page).digest())


def page_digests(tokens: Sequence[int] | Any, page_tokens: int) -> list[bytes]:
    """SGLang's page keys for `tokens` (as raw digests; its hex strings are their .hex()):
    d_j = sha256(d_{j-1} || page j as little-endian uint32), d_0 without a prior. Full pages
    only."""
    if page_tokens <= 0:
        raise TokenError(f"page_tokens must be positive, got {page_tokens}")
    arr = token_array(tokens)
    buf = arr[: len(arr) - len(arr) % page_tokens].tobytes()
    step = 4 * page_tokens
    out: list[bytes] = []
    state = b""
    for off in range(0, len(buf), step):
        state = hashlib.sha256(state + buf[off : off + step]).digest()
        out.append(state)
    return out
