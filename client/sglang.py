"""kvpool inside SGLang: a HiCache L3 storage backend.

Where it stands: inside an SGLang scheduler process, below its host KV pool. HiCache keeps KV
in GPU memory, then in a host pool, then in a storage backend; `KVPoolStorage` is that backend,
loaded by SGLang's own factory:

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvpool",
        "module_path": "kvpool.sglang", "class_name": "KVPoolStorage", "interface_v1": 1,
        "endpoint": "127.0.0.1:PORT", "model_path": "MODEL_DIR"}'

SGLang hands the backend one key per page (a chained sha256 of the page's tokens) and the
page's slots in the host pool; it never hands over token ids. kvpool's key scheme chains over
pages the same way (`kvpool.proto.keys`), so the backend stores each group of
`block_tokens / page_size` pages as one kvpool block, compressed by kvpool's codec, under
`page_block_key(namespace, digest of the block's last page)`: the key vLLM's connector and
`CachedModel` compute from the same tokens in the same namespace. The page's index in its
prompt comes from `HiCacheStorageExtraInfo.prefix_keys` (the page keys before the call's).

    batch_set_v1:    pages -> whole blocks (pages of a block split over two calls wait for
                     the rest, bounded) -> lookup -> encode -> one put_many
    batch_exists:    pages -> their blocks' keys (a block whose last page is not known is a
                     miss) -> one lookup -> the leading run of pages whose blocks are present
    batch_get_v1:    pages -> their blocks -> one get_many -> verify (namespace, key, position,
                     MAC) and decode each -> the asked pages into the host pool's slots

The codec is the vLLM connector's: the bit options, or with `basis: "auto"` (the default) the
key basis published in the tier for the model (codec v2), asked at start; while the tier cannot
say which, the backend is disabled (every call a miss) and asks again when due.

Best effort like the rest of kvpool: a missing, refused or corrupt block is a miss (a refused
one is deleted from the tier), a tier that is down makes backups report failure and reads
miss; nothing raises into SGLang's prefetch or backup threads, and no page is written into the
host pool unless its block was verified. Wrong settings raise at start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import (
    STORAGE_BATCH_SIZE,
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)
from torch import Tensor

from kvpool.basis import BasisUnavailable, published_codec
from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import FORMAT_DTYPES, Binding, CodecConfig, KeyBasis, block_header
from kvpool.kernels.codec import decode as decode_block
from kvpool.kernels.codec import encode as encode_block
from kvpool.model_facts import codec_for
from kvpool.proto.blockformat import Layout
from kvpool.proto.errors import (
    BlockFormatError,
    CodecError,
    KVPoolError,
    TierError,
)
from kvpool.proto.keys import BlockHash, Namespace, page_block_key, run_keys
from kvpool.transport import BlockPut, ClientConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
# keys of the extra config that SGLang itself reads (the factory's and the interface switch)
SGLANG_KEYS = frozenset({"backend_name", "module_path", "class_name", "interface_v1"})
REFUSALS = (BlockFormatError, CodecError, RuntimeError)  # a fetched block refused: a miss


class SettingsError(KVPoolError, ValueError):
    """The backend's extra config, or the host pool it is given, is not one it can serve."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """`--hicache-storage-backend-extra-config`, checked; unknown keys are refused."""

    endpoint: str  # the tier, as `kvpool serve` prints it
    model_name: str = ""  # default: SGLang's model name; must equal other engines' to share
    model_path: str = ""  # the model's folder (config.json): its RoPE, for pre_rope
    block_tokens: int = 256  # kvpool block: a multiple of the page size, at most 128 pages
    key_bits: int = 3
    value_bits: int = 2
    group_size: int = 128
    sink_tokens: int = 4
    pre_rope: bool = True  # quantize keys before RoPE (needs model_path)
    hadamard_values: bool = True
    key_basis: str = ""  # a `kvpool calibrate --basis` file (codec v2)
    # "auto": the key basis published in the tier for model_name (codec v2, as the vLLM
    # connector takes it) when there is one, else the bit options; "none": the bit options
    basis: str = "auto"
    salt: str = ""  # the tenant's salt
    mac_key_file: str = ""  # the tenant's MAC secret: blocks are signed and verified
    token_file: str = ""  # the tenant's token (needs tls_ca)
    tls_ca: str = ""
    tls_server_name: str = ""
    rpc_timeout_s: float = 5.0
    call_timeout_s: float = 10.0  # one whole batch call
    max_pending_mib: int = 256  # pages waiting for the rest of their block, at most

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> Settings:
        extra = {k: v for k, v in (extra or {}).items() if k not in SGLANG_KEYS}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise SettingsError(
                f"kvpool storage: unknown extra config keys {unknown}; known: {sorted(names)}"
            )
        if not extra.get("endpoint"):
            raise SettingsError("kvpool storage: the extra config needs 'endpoint'")
        kinds: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
        values: dict[str, Any] = {}
        for name, value in extra.items():
            kind = kinds[str(names[name].type)]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if not ok or (kind is not bool and isinstance(value, bool)):
                raise SettingsError(f"kvpool storage: {name}={value!r} is not a {kind.__name__}")
            values[name] = kind(value)
        s = cls(**values)
        for name in ("block_tokens", "rpc_timeout_s", "call_timeout_s"):
            if getattr(s, name) <= 0:
                raise SettingsError(f"kvpool storage: {name} must be positive")
        if s.max_pending_mib < 0:
            raise SettingsError("kvpool storage: max_pending_mib must be >= 0")
        if s.basis not in ("auto", "none"):
            raise SettingsError(f"kvpool storage: basis={s.basis!r} is not 'auto' or 'none'")
        if s.pre_rope and not s.model_path:
            raise SettingsError(
                "kvpool storage: pre_rope needs model_path (the model's folder, for its RoPE); "
                "or set pre_rope false"
            )
        return s

    def model_config(self, layout: tuple[int, int, int]) -> SimpleNamespace:
        """The model's config.json (model_path), or only the pool's shape without it."""
        return _model_config(self.model_path) if self.model_path else _bare_config(*layout)

    def codec(self, layout: tuple[int, int, int]) -> CodecConfig:
        """The codec of the bit options, built as the vLLM connector and `codec_for` build it
        (same description for the same model and options, so the engines share blocks)."""
        config = self.model_config(layout)
        try:
            codec = codec_for(
                config, self.key_bits, self.value_bits, self.group_size, self.pre_rope,
                self.hadamard_values, self.sink_tokens,
            )  # fmt: skip
        except (CodecError, AttributeError, TypeError) as e:
            raise SettingsError(f"kvpool storage: no codec for this model: {e}") from e
        if self.key_basis:
            basis = KeyBasis.load(self.key_basis)
            if tuple(basis.mean.shape) != layout:
                raise SettingsError(
                    f"kvpool storage: key basis {self.key_basis} does not fit a "
                    f"{'x'.join(map(str, layout))} KV"
                )
            codec = dataclasses.replace(codec, key_basis=basis)
        return codec

    def client_config(self) -> ClientConfig:
        token = Path(self.token_file).read_text().strip() if self.token_file else None
        return ClientConfig(
            timeout_s=min(self.rpc_timeout_s, self.call_timeout_s),
            call_timeout_s=self.call_timeout_s, tls_ca_file=self.tls_ca or None,
            tls_server_name=self.tls_server_name or None, token=token,
        )  # fmt: skip


def _model_config(path: str) -> SimpleNamespace:
    """The model's config.json as attributes (what `codec_for` reads)."""
    file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return SimpleNamespace(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise SettingsError(f"kvpool storage: cannot read the model config {file}: {e}") from e


def _bare_config(layers: int, heads: int, head_dim: int) -> SimpleNamespace:
    """A config with the pool's shape only (no RoPE): for pre_rope false without model_path."""
    return SimpleNamespace(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=head_dim, hidden_size=heads * head_dim,
    )  # fmt: skip


def page_kv(pool: Any, index: int) -> Tensor:
    """The page of the host pool that starts at slot `index`, as a view [2 (K, V), layers,
    heads, page, head_dim] into the pool, whatever its layout (writes go into the pool)."""
    p, kv = pool.page_size, pool.kv_buffer
    if index < 0 or index % p or index + p > pool.size:
        raise IndexError(f"host slot {index} is not the start of a page of the pool")
    if pool.layout == "layer_first":  # [2, L, slots, H, D]
        return kv[:, :, index : index + p].permute(0, 1, 3, 2, 4)
    if pool.layout == "page_first":  # [2, slots, L, H, D]
        return kv[:, index : index + p].permute(0, 2, 3, 1, 4)
    if pool.layout == "page_first_direct":  # [2, pages, L, P, H, D]
        return kv[:, index // p].permute(0, 1, 3, 2, 4)
    if pool.layout == "page_head":  # [2, pages, H, P, L, D]
        return kv[:, index // p].permute(0, 3, 1, 2, 4)
    raise SettingsError(f"kvpool storage: host pool layout {pool.layout!r} is not supported")


@dataclasses.dataclass
class _Pending:
    """Pages of a block whose last pages have not been backed up yet: [2, L, H, n*P, D]."""

    first_page: int
    kv: Tensor


class KVPoolStorage(HiCacheStorage):
    """SGLang's HiCache storage backend on a kvpool tier (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Any = None) -> None:
        self.storage_config = storage_config
        self.settings = Settings.from_extra(storage_config.extra_config)
        c = storage_config
        if not (c.extra_config or {}).get("interface_v1"):
            raise SettingsError(
                'kvpool storage needs "interface_v1": 1 in the extra config (it reads pages '
                "from the host pool in place, with their place in the prompt)"
            )
        if c.is_mla_model:
            raise SettingsError(
                "kvpool storage: MLA models are not supported yet (their host pool holds the "
                "latent only); use another HiCache backend for them"
            )
        if c.pp_size > 1 or c.attn_cp_size > 1 or c.dcp_size > 1:
            raise SettingsError(
                "kvpool storage: pipeline or context parallelism is not supported "
                f"(pp_size={c.pp_size}, attn_cp_size={c.attn_cp_size}, dcp_size={c.dcp_size})"
            )
        if c.should_split_heads:
            raise SettingsError("kvpool storage: split heads (tp_lcm_size) are not supported")
        self.pool: KVPool | None = None
        self.namespace: Namespace | None = None
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._pending_bytes = 0
        self._lock = threading.Lock()  # SGLang calls from its backup and prefetch threads

    # -- start -----------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Check the host pool, derive the namespace and connect to the tier."""
        host = mem_pool_host
        if getattr(host, "layout", None) not in LAYOUTS:
            raise SettingsError(
                f"kvpool storage: host pool {type(host).__name__} with layout "
                f"{getattr(host, 'layout', None)!r} is not supported; layouts: {LAYOUTS}"
            )
        kv = getattr(host, "kv_buffer", None)
        dims = 5 if host.layout in ("layer_first", "page_first") else 6
        if not isinstance(kv, Tensor) or kv.dim() != dims or kv.shape[0] != 2:
            raise SettingsError(
                f"kvpool storage: host pool {type(host).__name__} does not hold K and V per "
                "head (an MLA or another kind of pool): not supported"
            )
        if getattr(host, "v_head_dim", host.head_dim) != host.head_dim:
            raise SettingsError("kvpool storage: K and V head dims differ")
        if host.dtype not in FORMAT_DTYPES:
            raise SettingsError(f"kvpool storage: host pool dtype {host.dtype} is not supported")
        s, page = self.settings, host.page_size
        if s.block_tokens % page:
            raise SettingsError(
                f"kvpool storage: block_tokens {s.block_tokens} is not a multiple of the page "
                f"size {page}"
            )
        if s.block_tokens // page > STORAGE_BATCH_SIZE:
            raise SettingsError(
                f"kvpool storage: a block of {s.block_tokens // page} pages is more than SGLang "
                f"asks about at once ({STORAGE_BATCH_SIZE}); raise --page-size or lower "
                "block_tokens"
            )
        layout = (host.layer_num, host.head_num, host.head_dim)
        codec = self.settings.codec(layout)
        if s.block_tokens % codec.group_size:
            raise SettingsError(
                f"kvpool storage: block_tokens {s.block_tokens} is not a multiple of the codec's "
                f"group_size {codec.group_size}"
            )
        self._mac_key = Path(s.mac_key_file).read_bytes().strip() if s.mac_key_file else b""
        self._name = s.model_name or self.storage_config.model_name or ""
        if not self._name:
            raise SettingsError("kvpool storage: no model name (set model_name)")
        self._layout, self._dtype, self._codec = layout, host.dtype, codec
        self._config = self.settings.model_config(layout)
        super().register_mem_pool_host(host)
        self.page = page
        self.pages_per_block = s.block_tokens // page
        self._retry_at, self._retry_s = 0.0, 2.0
        self._connect_lock = threading.Lock()
        self._connect()

    def _connect(self) -> bool:
        """The namespace and the tier client, once the codec is known: with basis "auto" (and
        one tensor-parallel rank: a published basis spans every KV head) the tier says whether
        a key basis is published for the model, as it tells the vLLM connector. While it cannot
        say (down, silent shards, a record this worker cannot honour) the backend is disabled:
        every call misses or fails, said loudly, and it asks again when due (2 s, doubling to
        60 s). It never stores nor reads blocks in a namespace the other engines may not use."""
        if self.pool is not None:
            return True
        with self._connect_lock:
            if self.pool is not None:
                return True
            if time.monotonic() < self._retry_at:
                return False
            s, codec = self.settings, self._codec
            if s.basis == "auto" and not s.key_basis and self.storage_config.tp_size == 1:
                try:
                    codec, _ = published_codec(
                        self._config, s.endpoint, name=self._name, salt=s.salt.encode(),
                        mac_key=self._mac_key, config=s.client_config(),
                        fallback=lambda: self._codec,
                    )  # fmt: skip
                    if s.block_tokens % codec.group_size:
                        raise BasisUnavailable(f"its group_size {codec.group_size} does not "
                                               f"divide block_tokens {s.block_tokens}")  # fmt: skip
                except BasisUnavailable as e:
                    log.error("kvpool storage: disabled, %s; asking again in %.0f s",
                              e, self._retry_s)  # fmt: skip
                    self._retry_at = time.monotonic() + self._retry_s
                    self._retry_s = min(60.0, 2 * self._retry_s)
                    return False
            self.namespace = namespace_for(
                self._name, *self._layout, self._dtype, codec, block_tokens=s.block_tokens,
                page_tokens=self.page, tp_rank=self.storage_config.tp_rank,
                tp_size=self.storage_config.tp_size, salt=s.salt.encode(), mac_key=self._mac_key,
            )  # fmt: skip
            self.pool = KVPool(s.endpoint, self.namespace, codec, config=s.client_config())
            return True

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    # -- the v1 interface ------------------------------------------------------------------

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading pages of `keys` the tier holds (their whole block)."""
        try:
            plan = self._plan(keys, extra_info) if self._connect() else None
            if plan is None:
                return 0
            _, blocks, page_block = plan
            present = self._tier(self._pool.tier.lookup(self._ns, [k for _, k in blocks]), 0)
            have = {b for b, _ in blocks[:present]}
            return next((i for i, b in enumerate(page_block) if b not in have), len(keys))
        except Exception:  # never into SGLang's prefetch thread
            log.exception("kvpool storage: lookup failed")
            return 0

    def batch_get_v1(
        self, keys: list[str], host_indices: Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:  # fmt: skip
        """Fetch the blocks of `keys` in one batch and write each asked page into its host
        slots; True for each page written (the ones after a miss are not)."""
        done = [False] * len(keys)
        try:
            plan = self._plan(keys, extra_info, host_indices) if self._connect() else None
            if plan is None:
                return done
            start, blocks, page_block = plan
            blobs = self._tier(self._pool.tier.get_many(self._ns, [k for _, k in blocks]), None)
            if blobs is None:
                return done
            for (b, key), blob in zip(blocks, blobs, strict=True):
                kv = self._verified(b, key, blob)
                if kv is None:
                    break
                for i, pb in enumerate(page_block):
                    if pb != b:
                        continue
                    slot = int(host_indices[i * self.page])
                    offset = (start + i - b * self.pages_per_block) * self.page
                    page_kv(self.mem_pool_host, slot).copy_(kv[..., offset : offset + self.page, :])
                    done[i] = True
            first_miss = done.index(False) if False in done else len(done)
            return [i < first_miss for i in range(len(done))]
        except Exception:  # never into SGLang's prefetch thread
            log.exception("kvpool storage: get failed")
            return [False] * len(keys)

    def batch_set_v1(
        self, keys: list[str], host_indices: Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:  # fmt: skip
        """Store the whole blocks the pages of `keys` complete; pages of a block that ends
        after this call wait for the rest of it (bounded). False for each page of a block the
        tier did not take because it failed."""
        try:
            if not self._connect():
                return [False] * len(keys)
            return self._set(keys, host_indices, extra_info)
        except Exception:
            log.exception("kvpool storage: backup failed")
            return [False] * len(keys)

    # -- the generic interface: pages as flat tensors (SGLang's default without interface_v1) --

    def batch_set(
        self, keys: list[str], values: Any = None, target_locations: Any = None,
        target_sizes: Any = None,
    ) -> bool:  # fmt: skip
        raise SettingsError(
            'kvpool storage needs "interface_v1": 1 in the extra config (pages are read from '
            "the host pool in place, with their place in the prompt)"
        )

    def batch_get(
        self, keys: list[str], target_locations: Any = None, target_sizes: Any = None
    ) -> list[Tensor | None]:
        raise SettingsError('kvpool storage needs "interface_v1": 1 in the extra config')

    def set(
        self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None
    ) -> bool:
        return self.batch_set([key], [value])

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Tensor | None:
        return self.batch_get([key], [target_location])[0]

    def exists(self, key: str) -> bool:
        """Without its place in a prompt a page has no block: use batch_exists."""
        return False

    # -- internals -------------------------------------------------------------------------

    @property
    def _pool(self) -> KVPool:
        if self.pool is None:
            raise SettingsError("kvpool storage: no host pool registered")
        return self.pool

    @property
    def _ns(self) -> Namespace:
        assert self.namespace is not None
        return self.namespace

    def _tier(self, coro: Coroutine[Any, Any, T], default: T) -> T:
        """Run a tier call on the client's loop within the call deadline; a failure is
        `default` (logged)."""
        timeout = self.settings.call_timeout_s

        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        try:
            return self._pool.call(bounded())
        except (TierError, TimeoutError) as e:
            log.warning("kvpool storage: tier call failed: %s", e)
            return default

    def _plan(
        self, keys: Sequence[str], extra_info: HiCacheStorageExtraInfo | None,
        host_indices: Tensor | None = None,
    ) -> tuple[int, list[tuple[int, BlockHash]], list[int]] | None:  # fmt: skip
        """(index of keys[0] in its prompt, [(block, key)] of the blocks the pages fall in
        whose last page is known, in order, and each page's block). None when the pages'
        place is unknown (no prefix_keys) or the keys are malformed."""
        prefix = extra_info.prefix_keys if extra_info is not None else None
        if prefix is None or not keys:
            return None
        if host_indices is not None and host_indices.numel() != len(keys) * self.page:
            raise ValueError(f"{host_indices.numel()} host slots for {len(keys)} pages")
        start, n = len(prefix), self.pages_per_block
        chain = [*prefix, *keys]
        page_block = [(start + i) // n for i in range(len(keys))]
        wanted = [b for b in dict.fromkeys(page_block) if (b + 1) * n <= len(chain)]
        stored = self._prefix_keys(chain, wanted[-1] + 1) if wanted else []
        blocks = [(b, stored[b]) for b in wanted]
        known = set(wanted)
        page_block = [b if b in known else -1 for b in page_block]
        return start, blocks, page_block

    def _prefix_keys(self, chain: Sequence[str], blocks: int) -> list[BlockHash]:
        """The stored keys of the prompt's first `blocks` blocks from its page keys (`chain`,
        from the first page): each block's last page's, placed by its run (`run_keys`)."""
        n = self.pages_per_block
        return run_keys([page_block_key(self._ns, bytes.fromhex(chain[(b + 1) * n - 1]))
                         for b in range(blocks)])  # fmt: skip

    def _verified(self, b: int, key: BlockHash, blob: bytes | None) -> Tensor | None:
        """Block b, checked to be the one asked for and decoded: [2, L, H, B, D] in the pool's
        dtype; None for a miss or a refused block (deleted from the tier)."""
        if blob is None:
            return None
        ns, pool = self._ns, self._pool
        shape = (ns.layers, ns.kv_heads, ns.block_tokens, ns.head_dim)
        dtype = self.mem_pool_host.dtype
        expect = block_header(
            Layout.KV, dtype, shape, pool.codec, b * ns.block_tokens,
            Binding(ns.id, key, ns.mac_key),
        )  # fmt: skip
        try:
            block = decode_block(
                blob, "cpu", dtype, expect=expect, mac_key=ns.mac_key,
                key_basis=pool.codec.key_basis,
            )  # fmt: skip
        except REFUSALS as e:
            pool.stats.rejected_blocks += 1
            log.error("kvpool storage: block %d refused: %s", b, e)
            self._tier(pool.tier.delete(ns, [key]), 0)
            return None
        assert block.keys is not None and block.values is not None
        return torch.stack((block.keys, block.values))

    def _set(
        self, keys: list[str], host_indices: Tensor, extra_info: HiCacheStorageExtraInfo | None
    ) -> list[bool]:
        prefix = extra_info.prefix_keys if extra_info is not None else None
        if prefix is None:
            log.warning("kvpool storage: pages without their place in the prompt not stored")
            return [False] * len(keys)
        if host_indices.numel() != len(keys) * self.page:
            raise ValueError(f"{host_indices.numel()} host slots for {len(keys)} pages")
        if not keys:
            return []
        ns, n, p = self._ns, self.pages_per_block, self.page
        start = len(prefix)
        chain = [*prefix, *keys]
        end = start + len(keys)
        ok = [True] * len(keys)
        # whole blocks this call completes: pages [b*n, (b+1)*n) with (b+1)*n <= end
        todo: list[tuple[int, list[int]]] = []  # (block, page indices in keys, -1: pending)
        for b in range(start // n, end // n):
            todo.append((b, list(range(b * n - start, (b + 1) * n - start))))
        tail = end // n * n  # the pages of a block that ends after this call wait
        with self._lock:
            pending = self._pending.pop(prefix[-1], None) if prefix and start % n else None
            if pending is not None:
                self._pending_bytes -= pending.kv.numel() * pending.kv.element_size()
            if end > tail:
                first = max(tail, start)
                pages = [page_kv(self.mem_pool_host, int(host_indices[(j - start) * p]))
                         for j in range(first, end)]  # fmt: skip
                kv = torch.cat(pages, dim=3)
                if pending is not None and first == start and pending.first_page == tail:
                    kv = torch.cat((pending.kv, kv), dim=3)
                    first = tail
                if first == tail:
                    self._stash(keys[-1], _Pending(tail, kv))
        blocks: list[tuple[int, Tensor]] = []
        for b, idx in todo:
            head = [j for j in idx if j < 0]
            if head and (pending is None or pending.first_page != b * n):
                continue  # the block's first pages were never seen here: a dropped save
            parts = [pending.kv] if head and pending is not None else []
            parts += [page_kv(self.mem_pool_host, int(host_indices[j * p])) for j in idx if j >= 0]
            kv = torch.cat(parts, dim=3)
            if kv.shape[3] != ns.block_tokens:
                continue
            blocks.append((b, kv))
        if not blocks:
            return ok
        prefix_keys = self._prefix_keys(chain, blocks[-1][0] + 1)
        present = self._tier(self._pool.tier.lookup(ns, prefix_keys), 0)
        blocks = [(b, kv) for b, kv in blocks if b >= present]
        if not blocks:
            return ok
        puts = [
            BlockPut(prefix_keys[b], prefix_keys[0], b, self._encode(b, prefix_keys[b], kv),
                     prefix_keys[b - 1] if b else b"")
            for b, kv in blocks
        ]  # fmt: skip
        stored = self._tier(self._pool.tier.put_many(ns, puts, prefix=prefix_keys), None)
        if stored is None:  # the tier failed: these pages were not stored
            for b, _ in blocks:
                for j in range(max(0, b * n - start), min(len(keys), (b + 1) * n - start)):
                    ok[j] = False
        else:
            stats = self._pool.stats
            for put, new in zip(puts, stored, strict=True):
                stats.blocks_put += int(new)
                stats.bytes_put += len(put.data) if new else 0
        return ok

    def _encode(self, b: int, key: BlockHash, kv: Tensor) -> bytes:
        ns = self._ns
        binding = Binding(ns.id, key, ns.mac_key)
        return encode_block(
            kv[0], kv[1], self._pool.codec, start_position=b * ns.block_tokens, binding=binding
        )

    def _stash(self, last_key: str, pending: _Pending) -> None:
        """Keep pages waiting for the rest of their block, oldest dropped beyond the bound."""
        size = pending.kv.numel() * pending.kv.element_size()
        limit = self.settings.max_pending_mib << 20
        if size > limit:
            return
        self._pending[last_key] = pending
        self._pending_bytes += size
        while self._pending_bytes > limit:
            _, old = self._pending.popitem(last=False)
            self._pending_bytes -= old.kv.numel() * old.kv.element_size()
