"""vLLM integration: a KV connector that loads cached prefixes from a kvpool tier and saves new
ones, so separate vLLM engines share compressed prefixes (with each other and with transformers
workers whose namespace agrees).

Where it stands: inside a vLLM engine, between its scheduler, its paged KV cache and the tier.

    scheduler  get_num_new_matched_tokens: lookup of the prompt's block keys -> tokens the tier
               holds beyond the engine's own prefix cache (the last prompt token always runs)
               build_connector_meta: per request, what to load this step and which full kvpool
               blocks of its prompt became complete (to save)
    worker     start_load_kv: fetch + verify + decode the blocks -> scatter into the paged KV at
               the request's slots; a block that does not arrive or is refused -> its vLLM
               blocks go to get_block_ids_with_load_errors and vLLM recomputes them
               save_kv_layer: gather the completed blocks from the paged KV, layer by layer,
               into a copy owned by the connector
               wait_for_save: hand the copies to the client's loop (encode + put in the
               background); the forward pass never waits for the tier

Load it with
    KVTransferConfig(kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"endpoint": "127.0.0.1:50051", ...})
Every key of `kv_connector_extra_config` is described in `Settings`.

The paged layout is not assumed: at registration the connector writes marked keys and values
through the attention backend's own cache writer into a scratch block and reads back where
each value landed. A layout that is not a plain permutation of unquantized values (fp8 caches,
split kernel blocks, hybrid models) is refused with an error naming what differs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvpool.basis import BasisUnavailable, published_codec
from kvpool.calibrate import Profile, profile_codec
from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig, KeyBasis, decode, encode
from kvpool.model_facts import codec_for
from kvpool.proto.errors import KVPoolError, NamespaceError
from kvpool.proto.keys import Namespace
from kvpool.transport import ClientConfig

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
BASIS_RETRY_S = 2.0  # a connector disabled for want of its key basis asks again (doubling to 60)


class LayoutError(KVPoolError):
    """vLLM hands over a KV cache layout this connector does not know."""


# ---- configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """`kv_connector_extra_config`, checked. Unknown keys are refused (a typo never silently
    falls back to a default)."""

    endpoint: str  # the tier, as `kvpool serve` prints it: host:port[,host:port...]
    model_name: str = ""  # default: the served model name; must equal other workers' to share
    block_tokens: int = 256  # kvpool block, a multiple of vLLM's block size
    # the key scheme's page: SGLang's --page-size, to share blocks with its engines; -1: the
    # default, gcd(64, block_tokens); 0: the first scheme (one chain over whole blocks)
    page_tokens: int = -1
    key_bits: int = 3
    value_bits: int = 2
    group_size: int = 128
    sink_tokens: int = 4
    pre_rope: bool = True  # quantize keys before RoPE (undone and redone exactly)
    hadamard_values: bool = True
    profile: str = ""  # a `kvpool calibrate` profile (JSON path); replaces the bit options
    key_basis: str = ""  # a `kvpool calibrate --basis` file (codec v2): keys stored in it
    # "auto": without profile or key_basis, the key basis published in the tier for model_name
    # (codec v2; the bit options are then unused) when there is one; "none": the bit options
    basis: str = "auto"
    salt: str = ""  # the tenant's salt (keys of different salts never meet)
    mac_key_file: str = ""  # the tenant's MAC secret: blocks are signed and verified
    token_file: str = ""  # the tenant's token (needs tls_ca)
    tls_ca: str = ""
    tls_server_name: str = ""
    rpc_timeout_s: float = 5.0
    call_timeout_s: float = 10.0  # a whole load or save
    lookup_timeout_s: float = 1.0  # the scheduler waits this long at most per request
    retry_after_s: float = 2.0  # after a failed lookup, skip lookups this long (doubling to 60 s)
    max_pending_save_mib: int = 1024  # saves in flight beyond this are dropped (counted)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> Settings:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(names))
        if unknown:
            raise ValueError(
                f"kvpool connector: unknown kv_connector_extra_config keys {unknown}; "
                f"known: {sorted(names)}"
            )
        if not extra.get("endpoint"):
            raise ValueError("kvpool connector: kv_connector_extra_config needs 'endpoint'")
        kinds: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
        values: dict[str, Any] = {}
        for name, value in extra.items():
            kind = kinds[str(names[name].type)]
            if (kind is bool) != isinstance(value, bool) or isinstance(value, (dict, list)):
                raise ValueError(f"kvpool connector: {name}={value!r} is not a {kind.__name__}")
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"kvpool connector: {name}={value!r} is not a {kind.__name__}"
                ) from None
        s = cls(**values)
        for name in ("block_tokens", "rpc_timeout_s", "call_timeout_s", "lookup_timeout_s"):
            if getattr(s, name) <= 0:
                raise ValueError(f"kvpool connector: {name} must be positive")
        if s.basis not in ("auto", "none"):
            raise ValueError(f"kvpool connector: basis={s.basis!r} is not 'auto' or 'none'")
        if s.page_tokens < -1:
            raise ValueError("kvpool connector: page_tokens is -1 (the default), 0 or a page size")
        if s.max_pending_save_mib < 0 or s.retry_after_s < 0:
            raise ValueError("kvpool connector: max_pending_save_mib and retry_after_s are >= 0")
        return s

    def client_config(self, lookups_only: bool = False) -> ClientConfig:
        token = Path(self.token_file).read_text().strip() if self.token_file else None
        call = self.lookup_timeout_s if lookups_only else self.call_timeout_s
        config = ClientConfig(
            timeout_s=min(self.rpc_timeout_s, call), call_timeout_s=call,
            tls_ca_file=self.tls_ca or None, tls_server_name=self.tls_server_name or None,
            token=token,
        )  # fmt: skip
        if lookups_only:  # the scheduler only looks up: the smallest arena, for its lookup socket
            config = dataclasses.replace(config, shared_slots=1, shared_slot_bytes=64 << 10)
        return config


def namespace_for_vllm(
    vllm_config: VllmConfig, settings: Settings, tp_rank: int = 0
) -> tuple[Namespace, CodecConfig]:
    """The namespace (and codec) of this engine's KV: model name and revision, dtype, layers,
    KV heads per rank, head dim, block size, tensor-parallel rank and size, from vLLM's config."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache = vllm_config.cache_config
    if parallel.pipeline_parallel_size != 1:
        raise LayoutError("kvpool connector: pipeline parallelism is not supported")
    if cache.cache_dtype not in ("auto", None) and str(cache.cache_dtype) != str(model.dtype):
        raise LayoutError(
            f"kvpool connector: kv_cache_dtype={cache.cache_dtype!r} is not supported "
            "(kvpool quantizes the model dtype's KV itself): use kv_cache_dtype='auto'"
        )
    dtype = model.dtype
    if not isinstance(dtype, torch.dtype):  # vLLM resolves 'auto' etc. before connectors exist
        raise LayoutError(f"kvpool connector: the model's dtype is unresolved ({dtype!r})")
    if settings.block_tokens % cache.block_size:
        raise ValueError(
            f"kvpool connector: block_tokens {settings.block_tokens} must be a multiple of "
            f"vLLM's block size {cache.block_size}"
        )
    hf = model.hf_text_config
    layers = model.get_num_layers(parallel)
    heads = model.get_num_kv_heads(parallel)
    head_dim = model.get_head_size()
    name = settings.model_name or str(model.served_model_name)  # vLLM: falls back to the path
    mac_key = Path(settings.mac_key_file).read_bytes().strip() if settings.mac_key_file else b""
    if settings.profile:
        profile = Profile.load(settings.profile)
        if (profile.layers, profile.kv_heads, profile.head_dim) != (layers, heads, head_dim):
            raise NamespaceError(
                f"profile {settings.profile} is for a {profile.layers}x{profile.kv_heads}x"
                f"{profile.head_dim} KV, this model's is {layers}x{heads}x{head_dim}"
            )
        codec = profile_codec(profile)
    else:
        codec = codec_for(
            hf, settings.key_bits, settings.value_bits, settings.group_size,
            pre_rope=settings.pre_rope, hadamard_values=settings.hadamard_values,
            sink_tokens=settings.sink_tokens,
        )  # fmt: skip
    if settings.basis == "auto" and not (settings.profile or settings.key_basis):
        if parallel.tensor_parallel_size == 1:  # a published basis spans every KV head
            codec, _ = published_codec(
                hf, settings.endpoint, name=name, salt=settings.salt.encode(), mac_key=mac_key,
                config=settings.client_config(), fallback=lambda: codec,
            )  # fmt: skip
        else:
            log.info("kvpool connector: with tensor parallelism blocks use the bit options")
    if settings.key_basis:  # codec v2: keys as components in the calibrated basis
        basis = KeyBasis.load(settings.key_basis)
        if tuple(basis.mean.shape) != (layers, heads, head_dim):
            raise NamespaceError(
                f"key basis {settings.key_basis} is for a {'x'.join(map(str, basis.mean.shape))} "
                f"KV, this model's (per tensor-parallel rank) is {layers}x{heads}x{head_dim}"
            )
        codec = dataclasses.replace(codec, key_basis=basis)
    ns = namespace_for(
        name, layers, heads, head_dim, dtype, codec,
        revision=str(model.revision or ""), block_tokens=settings.block_tokens,
        page_tokens=None if settings.page_tokens < 0 else settings.page_tokens,
        tp_rank=tp_rank, tp_size=parallel.tensor_parallel_size,
        salt=settings.salt.encode(), mac_key=mac_key,
    )  # fmt: skip
    return ns, codec


# ---- the paged layout ---------------------------------------------------------------------


@dataclass(frozen=True)
class PagedLayout:
    """Where each key and value of a vLLM block lives: `key_index[h, t, d]` (and
    `value_index`) is the flat offset of head h, token t, dim d inside one block of a layer's
    cache tensor [num_blocks, ...].

    When both maps are affine (offset + h * sh + t * st + d * sd: every layout vLLM's CPU
    backend uses in fp32 and most GPU ones), gather and scatter are strided copies of views of
    the cache; otherwise they go element by element through the maps (about 4x slower)."""

    block_size: int
    heads: int
    head_dim: int
    key_index: Tensor  # [H, block_size, D] int64
    value_index: Tensor
    affine: tuple[tuple[int, ...], tuple[int, ...]] | None = field(init=False)
    flat: Tensor = field(init=False)  # both maps, keys first: the element-wise fallback

    def __post_init__(self) -> None:
        k, v = self._strides(self.key_index), self._strides(self.value_index)
        object.__setattr__(self, "affine", (k, v) if k is not None and v is not None else None)
        flat = torch.cat([self.key_index.flatten(), self.value_index.flatten()])
        object.__setattr__(self, "flat", flat)

    def _strides(self, index: Tensor) -> tuple[int, int, int, int] | None:
        """(offset, head stride, token stride, dim stride) when `index` is affine."""
        off = int(index[0, 0, 0])
        steps = [int(index[1, 0, 0]) - off if self.heads > 1 else 0,
                 int(index[0, 1, 0]) - off if self.block_size > 1 else 0,
                 int(index[0, 0, 1]) - off if self.head_dim > 1 else 0]  # fmt: skip
        h, t, d = (torch.arange(n).view(shape) for n, shape in zip(
            index.shape, ((-1, 1, 1), (1, -1, 1), (1, 1, -1)), strict=True))  # fmt: skip
        if not torch.equal(index, off + h * steps[0] + t * steps[1] + d * steps[2]):
            return None
        return off, steps[0], steps[1], steps[2]

    def _views(self, cache: Tensor) -> tuple[Tensor, Tensor] | None:
        """Keys and values of every block as strided views [num_blocks, H, block_size, D]."""
        if self.affine is None or not cache.is_contiguous():
            return None
        per_block = cache[0].numel()
        shape = (cache.shape[0], self.heads, self.block_size, self.head_dim)
        return tuple(  # type: ignore[return-value]
            cache.as_strided(shape, (per_block, *st[1:]), cache.storage_offset() + st[0])
            for st in self.affine
        )

    def gather(self, cache: Tensor, block_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [H, n * block_size, D] of the blocks `block_ids` (in order)."""
        n = len(block_ids)
        views = self._views(cache)
        if views is not None:
            out = [x.index_select(0, block_ids).transpose(0, 1) for x in views]
            return tuple(x.reshape(self.heads, n * self.block_size, -1) for x in out)  # type: ignore[return-value]
        rows = cache.view(cache.shape[0], -1).index_select(0, block_ids)
        both = rows.index_select(1, self.flat).view(n, 2, self.heads, self.block_size, -1)
        k, v = both.permute(1, 2, 0, 3, 4).reshape(2, self.heads, n * self.block_size, -1)
        return k, v

    def scatter(self, cache: Tensor, block_ids: Tensor, keys: Tensor, values: Tensor) -> None:
        """Write keys and values [H, n * block_size, D] into the blocks `block_ids`."""
        n = len(block_ids)
        views = self._views(cache)
        if views is not None:
            for view, x in zip(views, (keys, values), strict=True):
                x = x.view(self.heads, n, self.block_size, -1).transpose(0, 1)
                view.index_copy_(0, block_ids, x.to(cache.dtype))
            return
        both = torch.stack([keys, values]).view(2, self.heads, n, self.block_size, -1)
        rows = both.permute(2, 0, 1, 3, 4).reshape(n, -1)
        flat = cache.view(cache.shape[0], -1)
        flat[block_ids.unsqueeze(1), self.flat.unsqueeze(0)] = rows.to(flat.dtype)


def probe_layout(layer: Any, cache: Tensor, heads: int, head_dim: int) -> PagedLayout:
    """Find where the attention backend writes each key and value, by writing marked tensors
    through `layer.impl.do_kv_cache_update` into a scratch block shaped like one of `cache`.
    One pass per bit of the source index, with values 0 and 1 (exact in every float dtype) over
    a background of 2: every written element tells one bit of which value it holds."""
    if not hasattr(layer, "impl") or not hasattr(layer.impl, "do_kv_cache_update"):
        raise LayoutError(
            f"kvpool connector: the attention backend of {type(layer).__name__} has no "
            "do_kv_cache_update; its KV layout cannot be checked"
        )
    if cache.dim() < 2 or not cache.is_contiguous():
        raise LayoutError(f"kvpool connector: a KV cache of shape {tuple(cache.shape)}")
    per_block = cache[0].numel()
    block_size = per_block // (2 * heads * head_dim)
    if block_size * 2 * heads * head_dim != per_block:
        raise LayoutError(
            f"kvpool connector: a block of shape {tuple(cache.shape[1:])} does not hold "
            f"keys and values of {heads} heads x {head_dim} dims"
        )
    n = heads * block_size * head_dim
    source = torch.arange(2 * n, dtype=torch.int64)
    scratch = torch.empty((1, *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
    slots = torch.arange(block_size, dtype=torch.int64, device=cache.device)
    found = torch.zeros(per_block, dtype=torch.int64)
    written: Tensor | None = None
    for bit in range(int(2 * n - 1).bit_length()):
        marks = ((source >> bit) & 1).to(cache.dtype).to(cache.device)
        # [heads, tokens, dim] -> the [tokens, heads, dim] the backend takes
        k = marks[:n].view(heads, block_size, head_dim).transpose(0, 1).contiguous()
        v = marks[n:].view(heads, block_size, head_dim).transpose(0, 1).contiguous()
        scratch.fill_(2)
        try:
            layer.impl.do_kv_cache_update(layer, k, v, scratch, slots)
        except (RuntimeError, ValueError, TypeError) as e:
            raise LayoutError(f"kvpool connector: the backend cannot write a block: {e}") from e
        got = scratch.flatten().float().cpu()
        if not bool(((got == 0) | (got == 1) | (got == 2)).all()):
            raise LayoutError("kvpool connector: the backend transforms KV values (quantized?)")
        this = got != 2
        if written is None:
            written = this
        elif not bool((written == this).all()):
            raise LayoutError("kvpool connector: the backend's writes depend on the values")
        found |= (got == 1).long() << bit
    assert written is not None
    places = written.nonzero().flatten()
    sources = found[places]
    index = torch.full((2 * n,), -1, dtype=torch.int64)
    if len(places) == 2 * n and bool((sources < 2 * n).all()):
        index[sources] = places
    if bool((index < 0).any()):  # some value not written, written twice, or out of range
        raise LayoutError(
            f"kvpool connector: the backend's block layout is not a permutation of "
            f"{heads}x{block_size}x{head_dim} keys and values"
        )
    shape = (heads, block_size, head_dim)
    return PagedLayout(block_size, heads, head_dim, index[:n].view(shape), index[n:].view(shape))


# ---- scheduler -> worker metadata ---------------------------------------------------------


@dataclass
class LoadSpec:
    """Load tokens [start, end) of a request into its vLLM blocks; `tokens` are its prompt's
    tokens up to the end of the last kvpool block needed."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]  # the request's vLLM blocks covering [0, end)
    start: int
    end: int


@dataclass
class SaveSpec:
    """Save kvpool blocks [first, first + len(block_ids) // ratio) of a request's prompt."""

    req_id: str
    tokens: list[int]  # the prompt up to the end of the last block saved
    block_ids: list[int]  # the vLLM blocks of those kvpool blocks
    first: int


@dataclass
class _Staged:
    """A save being gathered during one step: the KV copied out so far, layer by layer."""

    keys: Tensor  # [L, H, tokens, D], on the CPU
    values: Tensor
    block_ids: Tensor  # the vLLM blocks, on the cache's device
    layers: set[int] = field(default_factory=set)


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Tracked:
    """A running request, as the scheduler side follows it."""

    tokens: list[int]
    block_ids: list[int]
    saved: int  # kvpool blocks [0, saved) are in the tier or on their way
    end: int  # tokens computed once the last scheduled step ran


# ---- metrics ------------------------------------------------------------------------------

_COUNTERS = {
    "requests_loaded": "requests that loaded a prefix from kvpool",
    "tokens_loaded": "prompt tokens loaded from kvpool instead of computed",
    "bytes_loaded": "encoded bytes fetched from kvpool",
    "load_seconds": "seconds spent fetching, decoding and placing loaded prefixes",
    "load_failed_blocks": "vLLM blocks whose load failed (recomputed)",
    "tokens_saved": "prompt tokens handed to kvpool to save",
    "bytes_saved": "encoded bytes the tier stored",
    "save_seconds": "seconds the forward pass spent gathering KV to save",
    "saves_dropped": "saves dropped (tier down, budget full, failed load)",
}


@dataclass
class KVPoolStats(KVConnectorStats):
    """Counters of one interval, summed across workers; shipped to vLLM's stat loggers."""

    def __post_init__(self) -> None:
        self.data = {name: self.data.get(name, 0) for name in _COUNTERS}

    def reset(self) -> None:
        self.data = dict.fromkeys(_COUNTERS, 0)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if name in _COUNTERS:
                self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: self.data.get(name, 0) for name in _COUNTERS}

    def is_empty(self) -> bool:
        return not any(self.data.get(name, 0) for name in _COUNTERS)


class KVPoolPromMetrics(KVConnectorPromMetrics):
    """`kvpool_vllm_<counter>_total` in the engine's Prometheus registry (vllm serve's
    /metrics), one series per engine."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:  # fmt: skip
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for name, doc in _COUNTERS.items():
            counter = self._counter_cls(
                name=f"kvpool_vllm_{name}", documentation=doc, labelnames=labelnames
            )
            self.counters[name] = {
                idx: counter.labels(*values) for idx, values in per_engine_labelvalues.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            series = self.counters.get(name, {}).get(engine_idx)
            if series is not None and value:
                series.inc(value)  # type: ignore[union-attr]  # counters only


# ---- the connector ------------------------------------------------------------------------


class KVPoolConnector(KVConnectorBase_V1):
    """vLLM KV connector (v1 API) backed by a kvpool tier. Both roles in one class, as vLLM
    expects: the scheduler role looks up and plans; the worker role loads and saves."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:  # fmt: skip
        super().__init__(vllm_config, role, kv_cache_config)  # type: ignore[arg-type]
        transfer = self._kv_transfer_config
        self.settings = Settings.from_extra(dict(transfer.kv_connector_extra_config or {}))
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            log.warning(
                "kvpool connector: kv_load_failure_policy is %r: a failed load (tier down "
                "mid-request, a refused block) fails the request; 'recompute' recomputes it",
                transfer.kv_load_failure_policy,
            )
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            raise LayoutError(
                "kvpool connector: models with several KV cache groups (hybrid attention) "
                "are not supported"
            )
        self.vllm_block = vllm_config.cache_config.block_size
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        # The scheduler looks up rank 0's blocks; every rank saves the same prefixes.
        self._setup = (vllm_config, tp_rank, role == KVConnectorRole.SCHEDULER)
        self.disabled = ""  # why this connector neither loads nor saves, while it must not
        self._basis_retry_at, self._basis_backoff_s = 0.0, BASIS_RETRY_S
        self.namespace: Namespace
        self.codec: CodecConfig
        self.pool: KVPool
        self._resolve()
        self.block_tokens = self.namespace.block_tokens
        self.ratio = self.block_tokens // self.vllm_block
        self._skip_lookups_until = 0.0  # after a failed lookup: the tier is not asked for a while
        self._retry_after_s = self.settings.retry_after_s
        # scheduler side
        self._asked: dict[str, tuple[int, int]] = {}  # req -> (local hit, tier hit) tokens
        self._loads: dict[str, tuple[int, int]] = {}  # req -> tokens [start, end) to load
        self._reqs: dict[str, _Tracked] = {}
        # worker side
        self._caches: list[Tensor] = []
        self._layer_index: dict[str, int] = {}
        self._layout: PagedLayout | None = None
        self._staging: dict[str, _Staged] = {}
        self._scratch: tuple[Tensor, Tensor] | None = None  # one decoded block, reused by loads
        self._device = torch.device("cpu")
        self._failed_reqs: set[str] = set()
        self._load_errors: set[int] = set()
        self._lock = threading.Lock()
        self._pending_bytes = 0
        self.totals = KVPoolStats()
        self._interval = KVPoolStats()
        self._client_seen = (0, 0)  # (bytes fetched, bytes put) already counted
        log.info("kvpool connector (%s): tier %s, namespace %s, codec %s", role.name,
                 self.settings.endpoint, self.namespace.id.hex()[:16], self.namespace.codec)  # fmt: skip

    def _resolve(self) -> None:
        """Find this engine's namespace and codec (the published key basis, by default) and
        open the pool for them. If a basis may be published but cannot be had, any other codec
        would write blocks of a namespace no other worker of the model reads: the connector is
        then disabled (said once, loudly) and tries again later (`_retry_basis`)."""
        vllm_config, tp_rank, scheduler = self._setup
        try:
            namespace, codec = namespace_for_vllm(vllm_config, self.settings, tp_rank)
        except BasisUnavailable as e:
            if not self.disabled:
                log.error(
                    "kvpool connector DISABLED: %s. Any other codec would write blocks of "
                    "another namespace, which no other worker of this model reads: this engine "
                    "computes every prefill itself, and asks the tier again every %.0f-60 s "
                    "(basis='none' or a key_basis file opts out of the published basis).",
                    e, BASIS_RETRY_S,
                )  # fmt: skip
            self.disabled = str(e)
            self._basis_retry_at = time.monotonic() + self._basis_backoff_s
            self._basis_backoff_s = min(60.0, 2 * self._basis_backoff_s)
            if hasattr(self, "pool"):
                return
            fallback = dataclasses.replace(self.settings, basis="none")  # never used for data
            namespace, codec = namespace_for_vllm(vllm_config, fallback, tp_rank)
        else:
            if self.disabled:
                log.warning("kvpool connector enabled: codec %s", codec.describe())
            self.disabled = ""
            if hasattr(self, "pool"):
                self.pool.close()
        self.namespace, self.codec = namespace, codec
        self.pool = KVPool(self.settings.endpoint, namespace, codec,
                           config=self.settings.client_config(lookups_only=scheduler))  # fmt: skip

    def _retry_basis(self) -> bool:
        """Whether the connector may load and save now: a disabled one asks again when due."""
        if self.disabled and time.monotonic() >= self._basis_retry_at:
            self._resolve()
        return not self.disabled

    # -- scheduler side --------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = _shareable_tokens(request)
        if tokens is None or not self._retry_basis():
            return 0, False
        hit = self._lookup(tokens)
        self._asked[request.request_id] = (num_computed_tokens, hit)
        # The last prompt token always runs (its logits start the generation).
        usable = min(hit, (len(tokens) - 1) // self.vllm_block * self.vllm_block)
        return max(0, usable - num_computed_tokens), False

    def _lookup(self, tokens: list[int]) -> int:
        """Tokens of `tokens` the tier holds; 0 when it is down. The scheduler thread waits on
        this, so a tier that fails is not asked again for a while (2 s, doubling to 60 s):
        meanwhile every request is a miss and computes its prefill, as without kvpool."""
        now = time.monotonic()
        if now < self._skip_lookups_until:
            return 0
        failures = self.pool.stats.lookup_failures
        hit = self.pool.lookup(tokens)
        if self.pool.stats.lookup_failures > failures:
            self._skip_lookups_until = time.monotonic() + self._retry_after_s
            log.warning("kvpool connector: tier lookup failed; not asking for %.0f s",
                        self._retry_after_s)  # fmt: skip
            self._retry_after_s = min(60.0, 2 * self._retry_after_s)
        else:
            self._retry_after_s = self.settings.retry_after_s
        return hit

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        asked = self._asked.get(request.request_id)
        if num_external_tokens > 0 and asked is not None:
            start = asked[0]
            self._loads[request.request_id] = (start, start + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPoolMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            asked = self._asked.pop(new.req_id, None)
            if asked is None or new.prompt_token_ids is None:
                continue
            t = _Tracked(
                list(new.prompt_token_ids), list(new.block_ids[0]),
                saved=asked[1] // self.block_tokens, end=new.num_computed_tokens,
            )  # fmt: skip
            self._reqs[new.req_id] = t
            self._plan(meta, new.req_id, t, new.num_computed_tokens, scheduled[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            running = self._reqs.get(req_id)
            if running is None:
                continue
            self._asked.pop(req_id, None)
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                running.block_ids = list(ids[0]) if ids else []
            elif ids:
                running.block_ids.extend(ids[0])
            computed = cached.num_computed_tokens[i]
            if computed < running.end:  # vLLM went back (a failed load, a preemption)
                running.saved = min(running.saved, computed // self.block_tokens)
            self._plan(meta, req_id, running, computed, scheduled.get(req_id, 0))
        return meta

    def _plan(self, meta: KVPoolMetadata, req_id: str, t: _Tracked, computed: int,
              scheduled: int) -> None:  # fmt: skip
        load = self._loads.pop(req_id, None)
        if load is not None:
            start, end = load
            blocks = -(-end // self.block_tokens)
            meta.loads.append(LoadSpec(
                req_id, t.tokens[: blocks * self.block_tokens],
                t.block_ids[: -(-end // self.vllm_block)], start, end,
            ))  # fmt: skip
        t.end = computed + scheduled
        upto = min(t.end, len(t.tokens)) // self.block_tokens
        if upto > t.saved:
            meta.saves.append(SaveSpec(
                req_id, t.tokens[: upto * self.block_tokens],
                t.block_ids[t.saved * self.ratio : upto * self.ratio], t.saved,
            ))  # fmt: skip
            t.saved = upto

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._asked.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        return False, None  # saves copy their KV out during the step: free the blocks now

    # -- worker side: registration ---------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        ns = self.namespace
        by_index = {extract_layer_index(name): name for name in kv_caches}
        if sorted(by_index) != list(range(ns.layers)) or len(kv_caches) != ns.layers:
            raise LayoutError(
                f"kvpool connector: expected one KV cache per layer 0..{ns.layers - 1}, got "
                f"{sorted(kv_caches)}"
            )
        names = [by_index[i] for i in range(ns.layers)]
        caches = [kv_caches[name] for name in names]
        first = caches[0]
        for name, c in zip(names, caches, strict=True):
            if c.shape != first.shape or c.dtype != first.dtype:
                raise LayoutError(f"kvpool connector: layer {name} has another KV shape")
        want = self._vllm_config.model_config.dtype
        if first.dtype != want:
            raise LayoutError(f"kvpool connector: KV cache dtype {first.dtype}, model {want}")
        num_blocks = self._kv_cache_config.num_blocks if self._kv_cache_config else None
        if num_blocks is not None and first.shape[0] != num_blocks:
            raise LayoutError(
                f"kvpool connector: KV cache of shape {tuple(first.shape)}: blocks are not its "
                f"leading dimension ({num_blocks} blocks)"
            )
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention.attention import Attention

        layer = get_layers_from_vllm_config(self._vllm_config, Attention, [names[0]])[names[0]]
        layout = probe_layout(layer, first, ns.kv_heads, ns.head_dim)
        if layout.block_size != self.vllm_block:
            raise LayoutError(
                f"kvpool connector: kernel blocks of {layout.block_size} tokens, scheduler "
                f"blocks of {self.vllm_block}"
            )
        self._layout, self._caches, self._device = layout, caches, first.device
        self._scratch = self._warm_up(first)
        self._layer_index = {name: i for i, name in enumerate(names)}
        log.info("kvpool connector: %d layers of %s, layout checked", ns.layers,
                 tuple(first.shape))  # fmt: skip

    def _warm_up(self, cache: Tensor) -> tuple[Tensor, Tensor]:
        """The scratch block loads decode into, allocated once and touched by one encode and
        decode of a synthetic block, so that the first load finds its memory mapped and the
        codec's threads started."""
        ns = self.namespace
        shape = (ns.layers, ns.kv_heads, self.block_tokens, ns.head_dim)
        keys = torch.randn(shape, dtype=cache.dtype, device=cache.device)
        values = torch.randn(shape, dtype=cache.dtype, device=cache.device)
        blob = encode(keys, values, self.codec)
        decode(blob, cache.device, out=(keys, values), key_basis=self.codec.key_basis)
        return keys, values

    # -- worker side: loading --------------------------------------------------------------

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        self._failed_reqs = set()
        enabled = self._retry_basis() if meta.loads or meta.saves else not self.disabled
        for spec in meta.loads:
            if not enabled:  # planned by a scheduler that resolved the basis: recompute
                self._load_errors.update(spec.block_ids[spec.start // self.vllm_block :])
                self._failed_reqs.add(spec.req_id)
                continue
            self._load(spec)

    def _load(self, spec: LoadSpec) -> None:
        """Tokens [start, end) of a request, block by block: each kvpool block is decoded into
        the scratch block as it arrives and its part of the range scattered into the request's
        vLLM blocks. The blocks before `start` (vLLM's own prefix cache hit) are not fetched."""
        assert self._layout is not None and self._scratch is not None
        t0 = time.perf_counter()
        bt, bs = self.block_tokens, self.vllm_block
        ok_end = spec.start
        blocks = self.pool.get_blocks(spec.tokens, present=len(spec.tokens),
                                      first_block=spec.start // bt, out=self._scratch)  # fmt: skip
        with contextlib.closing(blocks):
            for block in blocks:
                assert block.keys is not None and block.values is not None
                first = block.header.start_position
                lo, hi = max(first, spec.start), min(first + bt, spec.end)
                ids = torch.tensor(spec.block_ids[lo // bs : hi // bs], device=self._device)
                for cache, k, v in zip(self._caches, block.keys, block.values, strict=True):
                    self._layout.scatter(cache, ids, k[:, lo - first : hi - first],
                                         v[:, lo - first : hi - first])  # fmt: skip
                ok_end = hi
                if ok_end >= spec.end:
                    break
        if ok_end > spec.start:
            self._count(tokens_loaded=ok_end - spec.start, requests_loaded=1)
        if ok_end < spec.end:  # vLLM recomputes from the first block that did not load
            failed = spec.block_ids[ok_end // bs :]
            self._load_errors.update(failed)
            self._failed_reqs.add(spec.req_id)
            self._count(load_failed_blocks=len(failed))
            log.warning(
                "kvpool connector: request %s loaded %d of %d tokens; vLLM recomputes the rest",
                spec.req_id, ok_end - spec.start, spec.end - spec.start,
            )  # fmt: skip
        self._count(load_seconds=time.perf_counter() - t0)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv (every block holds all layers)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- worker side: saving ---------------------------------------------------------------

    def save_kv_layer(self, layer_name: str, kv_layer: Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:  # fmt: skip
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        i = self._layer_index.get(layer_name)
        if i is None or not meta.saves or self.disabled:
            return
        t0 = time.perf_counter()
        for spec in meta.saves:
            if spec.req_id not in self._failed_reqs:
                self._gather(spec, i, kv_layer)
        self._count(save_seconds=time.perf_counter() - t0)

    def _gather(self, spec: SaveSpec, layer: int, cache: Tensor) -> None:
        assert self._layout is not None
        staged = self._staging.get(spec.req_id)
        if staged is None:
            ns = self.namespace
            shape = (ns.layers, ns.kv_heads, len(spec.block_ids) * self.vllm_block, ns.head_dim)
            k = torch.empty(shape, dtype=cache.dtype, device="cpu")
            ids = torch.tensor(spec.block_ids, device=cache.device)
            staged = self._staging[spec.req_id] = _Staged(k, torch.empty_like(k), ids)
        keys, values = self._layout.gather(cache, staged.block_ids)
        staged.keys[layer].copy_(keys)
        staged.values[layer].copy_(values)
        staged.layers.add(layer)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVPoolMetadata)
        for spec in meta.saves:
            if (
                spec.req_id in self._failed_reqs or self.disabled
            ):  # computed over a partial prefix: never save
                self._staging.pop(spec.req_id, None)
                self._count(saves_dropped=1)
                continue
            for layer in range(self.namespace.layers):  # any layer the engine did not pass us
                staged = self._staging.get(spec.req_id)
                if staged is None or layer not in staged.layers:
                    self._gather(spec, layer, self._caches[layer])
            staged = self._staging.pop(spec.req_id)
            self._submit(spec, staged.keys, staged.values)
        self._staging.clear()

    def _submit(self, spec: SaveSpec, keys: Tensor, values: Tensor) -> None:
        nbytes = 2 * keys.numel() * keys.element_size()
        with self._lock:
            full = self._pending_bytes + nbytes > self.settings.max_pending_save_mib << 20
            if not full:
                self._pending_bytes += nbytes
        if full:
            self._count(saves_dropped=1)
            return
        future = self.pool.put_nowait(spec.tokens, (keys, values), first_block=spec.first)
        self._count(tokens_saved=keys.shape[2])

        def done(f: concurrent.futures.Future[int]) -> None:
            with self._lock:
                self._pending_bytes -= nbytes
            if f.cancelled() or f.exception() is not None:
                self._count(saves_dropped=1)

        future.add_done_callback(done)

    # -- stats -----------------------------------------------------------------------------

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, value in deltas.items():
                self._interval.data[name] += value
                self.totals.data[name] += value

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        stats = self.pool.stats
        fetched, put = stats.bytes_fetched, stats.bytes_put
        self._count(
            bytes_loaded=fetched - self._client_seen[0], bytes_saved=put - self._client_seen[1]
        )
        self._client_seen = (fetched, put)
        with self._lock:
            if self._interval.is_empty():
                return None
            out, self._interval = self._interval, KVPoolStats()
        return out

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return KVPoolStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: Any, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics:  # fmt: skip
        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def wait_for_pending_saves(self, timeout_s: float = 60.0) -> bool:
        """Block until saves in flight are done (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending_bytes == 0:
                    return True
            time.sleep(0.01)
        return False

    def shutdown(self) -> None:
        self.wait_for_pending_saves(self.settings.call_timeout_s)
        self.pool.close()


def _shareable_tokens(request: Request) -> list[int] | None:
    """The prompt tokens whose KV depends on nothing else; None for requests kvpool must not
    share (multimodal inputs, prompt embeddings, LoRA adapters)."""
    if request.prompt_token_ids is None or getattr(request, "prompt_embeds", None) is not None:
        return None
    if getattr(request, "mm_features", None) or getattr(request, "lora_request", None):
        return None
    return list(request.prompt_token_ids)
