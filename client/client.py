"""The API inference workers use: lookup, put and get of KV caches by token prefix.

Where it stands: the top of the data path, inside the worker process.

    put(tokens, kv):  block keys -> lookup (skip stored blocks) -> encode each new full block
                      on the KV's device -> one batch per owning shard (each block with its
                      parent, the block before it)
    get(tokens):      block keys -> lookup (longest cached prefix) -> fetch blocks in parallel
                      -> check each is the block asked for -> decode on the worker's device
                      -> concatenate along tokens

Every block is bound to its namespace id, key and position (and, with the namespace's
`mac_key`, carries the tenant's MAC). A fetched block is compared with the header the client
itself would have written for that position before any decoding: a corrupt, misplaced,
misshapen or forged block is a counted miss (`stats.rejected_blocks`, the
`kvpool_client_rejected_blocks_total` metric), never an exception and never a tensor at the
wrong place; the client deletes it from the tier so that the next put heals the prefix.

The cache is best effort, like every serious KV cache connector: a put that fails is a dropped
save and a get that fails is a miss. Neither raises because the tier is slow or down, and each
call has a deadline (`ClientConfig.call_timeout_s`); the failure is logged and counted in
`stats`. Bad input (wrong shapes, bad tokens) does raise.

`AsyncKVPool` is for asyncio code; `KVPool` wraps it for synchronous code with an event loop
in a background thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry
from torch import Tensor

from kvpool.kernels.codec import (
    FORMAT_DTYPES,
    Binding,
    Block,
    CodecConfig,
    block_header,
    check_out,
    decode,
    encode,
    encode_latent,
    verified_payload,
)
from kvpool.metrics import client_metrics
from kvpool.proto.blockformat import BlockHeader, Layout
from kvpool.proto.errors import (
    BlockFormatError,
    BlockMismatchError,
    ChecksumError,
    CodecError,
    ForgedBlockError,
    NamespaceError,
    TierError,
)
from kvpool.proto.keys import BlockHash, Namespace, block_keys
from kvpool.transport import BlockPut, ClientConfig, TierClient

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
KV = tuple[Tensor, Tensor] | Tensor  # (keys, values) [L, H, T, D] each, or latent [L, T, C]
# what a fetched block can fail with: a miss, counted, and the block is deleted from the tier
REFUSALS = (BlockFormatError, CodecError, RuntimeError)


def namespace_for(
    model: str, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, codec: CodecConfig,
    **kwargs: Any,
) -> Namespace:  # fmt: skip
    """A Namespace whose codec field is `codec.describe()` (the form `AsyncKVPool` checks)."""
    if dtype not in FORMAT_DTYPES:
        raise NamespaceError(f"dtype {dtype} not supported")
    return Namespace(
        model=model, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
        dtype=FORMAT_DTYPES[dtype], codec=codec.describe(), **kwargs,
    )  # fmt: skip


@dataclass
class ClientStats:
    """What this client did; failures are the saves it dropped and the gets it turned to misses."""

    lookups: int = 0
    blocks_put: int = 0
    blocks_existing: int = 0
    blocks_fetched: int = 0
    bytes_put: int = 0
    bytes_fetched: int = 0
    put_failures: int = 0
    get_failures: int = 0
    lookup_failures: int = 0
    rejected_blocks: int = 0  # fetched, then refused: corrupt, misplaced, misshapen or forged


@dataclass
class CachedPrefix:
    """The KV of the longest cached prefix: `tokens` tokens, on the client's device."""

    tokens: int
    keys: Tensor | None = None  # [L, H, tokens, D]
    values: Tensor | None = None
    latent: Tensor | None = None  # [L, tokens, C]
    fetched_bytes: int = 0


@dataclass
class AsyncKVPool:
    """Client of one namespace on one tier. Create and use it inside one event loop."""

    endpoints: str | Sequence[str]
    namespace: Namespace
    codec: CodecConfig
    device: torch.device | str = "cpu"
    config: ClientConfig = field(default_factory=ClientConfig)
    stats: ClientStats = field(default_factory=ClientStats)
    registry: CollectorRegistry | None = None  # Prometheus registry; None: the process default

    def __post_init__(self) -> None:
        if self.namespace.codec != self.codec.describe():
            raise NamespaceError(
                f"namespace codec {self.namespace.codec!r} is not this codec "
                f"({self.codec.describe()!r}): build it with namespace_for()"
            )
        if self.namespace.integrity and not self.namespace.mac_key:
            raise NamespaceError("a namespace with integrity needs its mac_key to read and write")
        self.device = torch.device(self.device)
        self.tier = TierClient(self.endpoints, self.config, on_failure=self._shard_failed)
        self.block_tokens = self.namespace.block_tokens
        self.metrics = client_metrics(self.registry)

    def _failures(self) -> int:
        s = self.stats
        return s.lookup_failures + s.put_failures + s.get_failures + s.rejected_blocks

    def _failed(self, operation: str, error: Exception) -> None:
        setattr(
            self.stats, f"{operation}_failures", getattr(self.stats, f"{operation}_failures") + 1
        )
        self.metrics.failures.labels(operation).inc()
        log.warning("kvpool %s failed (a miss or a dropped save): %s", operation, error)

    async def _count_failure(self, operation: str, error: Exception) -> None:
        self._failed(operation, error)  # on the loop, where the other counts are made

    def _shard_failed(self, operation: str, error: TierError) -> None:
        """A shard's failure that a tier call absorbed (one shard of a lookup, one replica)."""
        self._failed(operation, error)

    def _observe(self, operation: str, status: str, t0: float, failures_before: int) -> None:
        if self._failures() != failures_before:
            status = "error"
        self.metrics.request_duration.labels(operation, status).observe(time.perf_counter() - t0)

    # -- the three calls -------------------------------------------------------------------

    async def lookup(self, tokens: Sequence[int] | Tensor) -> int:
        """How many leading tokens of `tokens` are cached (a multiple of block_tokens)."""
        keys = block_keys(self.namespace, tokens)
        t0, failures = time.perf_counter(), self._failures()
        n = await self._lookup(keys) * self.block_tokens
        self._observe("lookup", "ok", t0, failures)
        return n

    async def _bounded(self, operation: str, call: Coroutine[Any, Any, T], default: T) -> T:
        """`call` within the call deadline; past it, `default` (a miss, a dropped save)."""
        try:
            return await asyncio.wait_for(call, self.config.call_timeout_s)
        except TimeoutError as e:
            self._failed(operation, e)
            return default

    async def put(self, tokens: Sequence[int] | Tensor, kv: KV, first_block: int = 0) -> int:
        """Encode and store every full block of `tokens` not stored yet; returns how many new
        blocks the tier took. `kv` covers at least the full blocks of `tokens`, starting at
        block `first_block` (the blocks before it are not stored by this call)."""
        keys = block_keys(self.namespace, tokens)
        if not 0 <= first_block <= len(keys):
            raise CodecError(f"first_block {first_block} outside the {len(keys)} full blocks")
        tensors = self._check_kv(kv, (len(keys) - first_block) * self.block_tokens)
        t0, failures = time.perf_counter(), self._failures()
        stored = await self._bounded("put", self._put(keys, tensors, first_block), 0)
        self._observe("put", "ok", t0, failures)
        return stored

    async def _put(self, keys: list[BlockHash], tensors: list[Tensor], first: int) -> int:
        """Encode the blocks not stored yet in groups of max_inflight / 2, each group sent as
        one put_many (one BatchPut per shard) while the next one is encoded."""
        start = max(first, await self._lookup(keys))
        step = max(1, self.config.max_inflight // 2)
        stored = 0
        sending: asyncio.Task[int] | None = None
        try:
            for lo in range(start, len(keys), step):
                group = range(lo, min(lo + step, len(keys)))
                blobs = await asyncio.to_thread(self._encode_group, tensors, keys, group, first)
                if sending is not None:
                    stored += await sending
                sending = asyncio.create_task(self._put_blocks(keys, group, blobs))
            return stored + (await sending if sending is not None else 0)
        finally:
            if sending is not None:
                sending.cancel()

    async def get(
        self, tokens: Sequence[int] | Tensor, dtype: torch.dtype | None = None,
        present: int | None = None, out: tuple[Tensor, ...] | None = None,
    ) -> CachedPrefix | None:  # fmt: skip
        """The KV of the longest cached prefix of `tokens`, or None on a miss.

        Blocks are fetched in parallel and each is verified and decoded on the client's device
        (in the namespace's dtype unless `dtype` is given) as soon as it arrives. `present`: a
        token count a lookup just returned, to skip a second one. If a block vanishes between
        lookup and fetch, the prefix ends before it.

        out: tensors to decode into, on their device and in their dtype, with no copy after
        the decode: (keys, values) [L, H, T, D] or (latent,) [L, T, C], where T, a multiple of
        the block size, caps the prefix fetched (for instance pinned host memory, or a CUDA
        cache, or a slice of one along T; see `check_out`). The prefix returned holds views of
        their first `tokens` tokens; what lies beyond is unspecified (as is all of `out` after
        a call that timed out: decodes under way finish into it)."""
        if out is not None:  # before anything is fetched: a bad buffer is the caller's error
            self._check_out_prefix(out)
        keys = block_keys(self.namespace, tokens)
        t0, failures = time.perf_counter(), self._failures()
        prefix = await self._bounded("get", self._get(keys, dtype, present, out), None)
        self._observe("get", "miss" if prefix is None else "hit", t0, failures)
        if prefix is not None:
            self.metrics.hit_tokens.inc(prefix.tokens)
        return prefix

    async def _get(
        self, keys: list[BlockHash], dtype: torch.dtype | None, present: int | None,
        out: tuple[Tensor, ...] | None,
    ) -> CachedPrefix | None:  # fmt: skip
        bt = self.block_tokens
        n = await self._lookup(keys) if present is None else present // bt
        n = min(n, len(keys), out[0].shape[-2] // bt if out else len(keys))
        if n == 0:
            return None
        out_dtype = out[0].dtype if out else dtype or _torch_dtype(self.namespace)

        def target(i: int) -> tuple[Tensor, ...] | None:  # block i's slice of `out`
            return None if out is None else tuple(x[..., i * bt : (i + 1) * bt, :] for x in out)

        async def fetch(i: int) -> tuple[Block | None, int]:
            async with self._block_view(keys[i]) as blob:
                if blob is None:
                    return None, 0
                try:
                    block = await asyncio.to_thread(
                        self._decode, blob, keys, i, out_dtype, target(i)
                    )
                    return block, len(blob)
                except REFUSALS as e:  # a miss, counted
                    await self._refuse(keys, i, e)
                    return None, 0

        blocks: list[Block] = []
        fetched = 0
        for block, size in await asyncio.gather(*(fetch(i) for i in range(n))):
            if block is None:
                break
            blocks.append(block)
            fetched += size
        if not blocks:
            return None
        prefix = CachedPrefix(tokens=len(blocks) * bt, fetched_bytes=fetched)
        if out is not None:
            views = [x[..., : prefix.tokens, :] for x in out]
            if self.namespace.layout == Layout.LATENT:
                prefix.latent = views[0]
            else:
                prefix.keys, prefix.values = views
        elif self.namespace.layout == Layout.LATENT:
            prefix.latent = torch.cat([b.latent for b in blocks if b.latent is not None], dim=1)
        else:
            prefix.keys = torch.cat([b.keys for b in blocks if b.keys is not None], dim=2)
            prefix.values = torch.cat([b.values for b in blocks if b.values is not None], dim=2)
        return prefix

    async def close(self) -> None:
        await self.tier.close()

    # -- internals -------------------------------------------------------------------------

    async def _lookup(self, keys: list[BlockHash]) -> int:
        self.stats.lookups += 1
        self.metrics.lookups.inc()
        limit = self.config.max_lookup_keys
        try:
            return await self._bounded("lookup", self.tier.lookup(self.namespace, keys[:limit]), 0)
        except TierError as e:
            self._failed("lookup", e)
            return 0

    async def _evict(self, key: BlockHash) -> None:
        """Delete a block this client refused, so that the next put of its prefix stores the
        real one (blocks are immutable: a bad block would otherwise stand as a permanent miss)."""
        try:
            await self.tier.delete(self.namespace, [key])
        except TierError as e:
            self._failed("get", e)

    async def _refuse(self, keys: list[BlockHash], i: int, error: Exception) -> None:
        """Block i of a prefix failed verification: count it, log it, delete it."""
        self._reject(error)
        log.error("block %d of a prefix refused: %s", i, error)
        await self._evict(keys[i])

    def _reject(self, error: Exception) -> None:
        self.stats.rejected_blocks += 1
        reason = "format"
        if isinstance(error, ChecksumError):
            reason = "checksum"
        elif isinstance(error, BlockMismatchError):
            reason = "mismatch"
        elif isinstance(error, ForgedBlockError):
            reason = "mac"
        self.metrics.rejected_blocks.labels(reason).inc()

    async def _put_blocks(self, keys: list[BlockHash], group: range, blobs: list[bytes]) -> int:
        """Blocks `group` of the prefix, each with its parent, in one put_many."""
        blocks = [BlockPut(keys[i], keys[0], i, blob, keys[i - 1] if i else b"")
                  for i, blob in zip(group, blobs, strict=True)]  # fmt: skip
        try:
            stored = await self.tier.put_many(self.namespace, blocks, prefix=keys)
        except TierError as e:
            self._failed("put", e)
            return 0
        for blob, ok in zip(blobs, stored, strict=True):
            if ok:
                self.stats.blocks_put += 1
                self.stats.bytes_put += len(blob)
                self.metrics.sent_bytes.inc(len(blob))
            else:
                self.stats.blocks_existing += 1
        return sum(stored)

    async def _get_block(self, key: BlockHash) -> bytes | None:
        try:
            blob = await self.tier.get(self.namespace, key)
        except TierError as e:
            self._failed("get", e)
            return None
        self._received(blob)
        return blob

    @contextlib.asynccontextmanager
    async def _block_view(self, key: BlockHash) -> AsyncIterator[bytes | memoryview | None]:
        """The block to decode inside the `async with`: straight from a same-host arena slot
        (no copy) unless the namespace verifies a MAC, which must see bytes the shard can no
        longer change (then a copy, as `_get_block`)."""
        if self.namespace.mac_key:
            yield await self._get_block(key)
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                blob = await stack.enter_async_context(self.tier.view(self.namespace, key))
            except TierError as e:
                self._failed("get", e)
                blob = None
            self._received(blob)
            yield blob

    def _received(self, blob: bytes | memoryview | None) -> None:
        if blob is not None:
            self.stats.blocks_fetched += 1
            self.stats.bytes_fetched += len(blob)
            self.metrics.received_bytes.inc(len(blob))

    def _check_kv(self, kv: KV, tokens: int) -> list[Tensor]:
        """The tensors of `kv`, checked against the namespace: shape, dtype, enough tokens."""
        ns = self.namespace
        want: tuple[int | None, ...]
        if ns.layout == Layout.LATENT:
            if not isinstance(kv, Tensor):
                raise CodecError("a latent namespace stores one tensor [layers, tokens, dim]")
            tensors, want, token_dim = [kv], (ns.layers, None, ns.head_dim), 1
        else:
            if isinstance(kv, Tensor) or len(kv) != 2:
                raise CodecError(
                    "a KV namespace stores (keys, values) [layers, kv_heads, tokens, head_dim]"
                )
            tensors, want, token_dim = list(kv), (ns.layers, ns.kv_heads, None, ns.head_dim), 2
        for t in tensors:
            shape = tuple(t.shape)
            if len(shape) != len(want) or any(
                w not in (None, s) for w, s in zip(want, shape, strict=False)
            ):
                raise CodecError(f"KV of shape {shape} does not match the namespace {want}")
            if shape[token_dim] < tokens:
                raise CodecError(
                    f"KV covers {shape[token_dim]} tokens, the full blocks need {tokens}"
                )
            if FORMAT_DTYPES.get(t.dtype) != ns.dtype:
                raise CodecError(f"KV dtype {t.dtype} is not the namespace's {ns.dtype.name}")
        return tensors

    def _binding(self, keys: list[BlockHash], i: int) -> Binding:
        return Binding(self.namespace.id, keys[i], self.namespace.mac_key)

    def _check_out_prefix(self, out: tuple[Tensor, ...]) -> None:
        """`out` for get: like a block's (check_out), with any multiple of the block size in T."""
        ns = self.namespace
        if not isinstance(out, tuple | list) or not out or not isinstance(out[0], Tensor):
            raise CodecError("out must be a tuple of tensors")
        tokens = out[0].shape[-2] if out[0].dim() >= 2 else 0
        if tokens <= 0 or tokens % self.block_tokens:
            raise CodecError(f"out holds {tokens} tokens, not a multiple of {self.block_tokens}")
        shape = (ns.layers, ns.kv_heads, tokens, ns.head_dim)
        check_out(out, shape, ns.layout == Layout.LATENT)

    def expected_header(self, keys: list[BlockHash], i: int) -> BlockHeader:
        """The header of block i of the prefix whose keys are `keys`, as this client writes it:
        what a fetched block must have to be decoded."""
        ns = self.namespace
        heads = 1 if ns.layout == Layout.LATENT else ns.kv_heads
        shape = (ns.layers, heads, self.block_tokens, ns.head_dim)
        return block_header(
            ns.layout, _torch_dtype(ns), shape, self.codec, i * self.block_tokens,
            self._binding(keys, i),
        )  # fmt: skip

    def _decode(
        self, blob: bytes | memoryview, keys: list[BlockHash], i: int, dtype: torch.dtype,
        out: tuple[Tensor, ...] | None = None,
    ) -> Block:  # fmt: skip
        expect = self.expected_header(keys, i)
        device = out[0].device if out else self.device
        with self.metrics.decode_seconds.time():
            block = decode(blob, device, dtype, expect=expect, mac_key=self.namespace.mac_key,
                           out=out, key_basis=self.codec.key_basis)  # fmt: skip
        self.metrics.hit_blocks.inc()
        return block

    def _verified(
        self, blob: bytes | memoryview, keys: list[BlockHash], i: int
    ) -> tuple[BlockHeader, Tensor]:
        expect = self.expected_header(keys, i)
        with self.metrics.decode_seconds.time():
            found = verified_payload(blob, expect, self.namespace.mac_key, self.codec.key_basis)
        self.metrics.hit_blocks.inc()
        return found

    def _encode_group(
        self, tensors: list[Tensor], keys: list[BlockHash], group: range, first: int
    ) -> list[bytes]:
        return [self._encode(tensors, keys, i, first) for i in group]

    def _encode(self, tensors: list[Tensor], keys: list[BlockHash], i: int, first: int) -> bytes:
        """Block i of the prefix, from tensors that start at block `first`."""
        b, binding = self.block_tokens, self._binding(keys, i)
        lo, hi = (i - first) * b, (i - first + 1) * b
        with self.metrics.encode_seconds.time():
            if self.namespace.layout == Layout.LATENT:
                x = tensors[0][:, lo:hi]
                return encode_latent(x, self.codec, start_position=i * b, binding=binding)
            k, v = (t[:, :, lo:hi] for t in tensors)
            return encode(k, v, self.codec, start_position=i * b, binding=binding)


def _torch_dtype(ns: Namespace) -> torch.dtype:
    return {v: k for k, v in FORMAT_DTYPES.items()}[ns.dtype]


class KVPool:
    """Synchronous client: the same calls as AsyncKVPool, from any thread.

    Its event loop runs in a daemon thread. lookup, put and get end within their call deadline
    (`ClientConfig.call_timeout_s`) as a miss or a dropped save; this wrapper waits a few
    seconds more at most, then cancels the call and answers the same."""

    def __init__(self, endpoints: str | Sequence[str], namespace: Namespace, codec: CodecConfig,
                 device: torch.device | str = "cpu", config: ClientConfig | None = None,
                 registry: CollectorRegistry | None = None) -> None:  # fmt: skip
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvpool-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncKVPool:
            return AsyncKVPool(
                endpoints, namespace, codec, device, config or ClientConfig(), registry=registry
            )

        self._client = self._run(make())
        self._wait_s = self._client.config.call_timeout_s + 5.0

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    @property
    def namespace(self) -> Namespace:
        return self._client.namespace

    @property
    def codec(self) -> CodecConfig:
        return self._client.codec

    @property
    def tier(self) -> TierClient:
        return self._client.tier

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _bounded(self, operation: str, coro: Coroutine[Any, Any, T], default: T) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout=self._wait_s)
        except concurrent.futures.TimeoutError as e:
            future.cancel()
            self._loop.call_soon_threadsafe(self._client._failed, operation, e)
            return default

    def lookup(self, tokens: Sequence[int] | Tensor) -> int:
        return self._bounded("lookup", self._client.lookup(tokens), 0)

    def put(self, tokens: Sequence[int] | Tensor, kv: KV, first_block: int = 0) -> int:
        return self._bounded("put", self._client.put(tokens, kv, first_block), 0)

    def put_nowait(
        self, tokens: Sequence[int] | Tensor, kv: KV, first_block: int = 0
    ) -> concurrent.futures.Future[int]:
        """Start a put on the client's loop and return at once; the future gives what `put`
        returns (a put never raises for the tier: it ends as a dropped save). The caller must
        not modify `kv` until the future is done."""
        return asyncio.run_coroutine_threadsafe(
            self._client.put(tokens, kv, first_block), self._loop
        )

    def get(
        self, tokens: Sequence[int] | Tensor, dtype: torch.dtype | None = None,
        present: int | None = None, out: tuple[Tensor, ...] | None = None,
    ) -> CachedPrefix | None:  # fmt: skip
        if out is not None:  # raised here, not counted as a failed call
            self._client._check_out_prefix(out)
        return self._bounded("get", self._client.get(tokens, dtype, present, out), None)

    def get_blocks(
        self, tokens: Sequence[int] | Tensor, present: int | None = None, first_block: int = 0,
        out: tuple[Tensor, ...] | None = None,
    ) -> Generator[Block, None, None]:  # fmt: skip
        """Blocks `first_block`, `first_block` + 1, ... of the longest cached prefix of
        `tokens`, for engines that copy each block into a cache of their own.

        The client's loop fetches them all in parallel while the calling thread verifies and
        decodes them one at a time, in order, into `out` when given ((keys, values)
        [L, H, block_tokens, D] or (latent,) [L, block_tokens, C], contiguous, one dtype; see
        `decode`): no allocation and no concatenation per block, and each Block yielded holds
        `out`, valid until the next one is taken. The blocks end at the first one missing,
        refused (counted and deleted, as in `get`) or not back within the call deadline."""
        client, ns = self._client, self.namespace
        if out is not None:  # before anything is fetched: a bad buffer is the caller's error
            shape = (ns.layers, ns.kv_heads, ns.block_tokens, ns.head_dim)
            check_out(out, shape, ns.layout == Layout.LATENT)
        dtype = out[0].dtype if out else _torch_dtype(ns)

        def read(blob: bytes | memoryview, keys: list[BlockHash], i: int) -> Block:
            return client._decode(blob, keys, i, dtype, out)

        return self._blocks(tokens, present, first_block, read)

    def get_payloads(
        self, tokens: Sequence[int] | Tensor, present: int | None = None, first_block: int = 0
    ) -> Generator[tuple[BlockHeader, Tensor], None, None]:
        """Like `get_blocks`, but each block is only verified, not decoded: its header and
        payload (uint8), whose sections a PackedCache attends to as they are."""
        client = self._client

        def read(
            blob: bytes | memoryview, keys: list[BlockHash], i: int
        ) -> tuple[BlockHeader, Tensor]:
            return client._verified(blob, keys, i)

        return self._blocks(tokens, present, first_block, read)

    def _blocks(
        self, tokens: Sequence[int] | Tensor, present: int | None, first_block: int,
        read: Callable[[bytes | memoryview, list[BlockHash], int], R],
    ) -> Generator[R, None, None]:  # fmt: skip
        """The loop behind get_blocks and get_payloads: fetch in parallel, read in order."""
        client, ns = self._client, self.namespace
        keys = block_keys(ns, tokens)
        t0, failures = time.perf_counter(), client._failures()
        n = min(len(keys), (self.lookup(tokens) if present is None else present) // ns.block_tokens)
        futures = [asyncio.run_coroutine_threadsafe(client._get_block(keys[i]), self._loop)
                   for i in range(first_block, n)]  # fmt: skip
        deadline = time.monotonic() + client.config.call_timeout_s
        got = 0
        try:
            for i, future in zip(range(first_block, n), futures, strict=True):
                try:
                    blob = future.result(timeout=max(0.0, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError as e:
                    self._run(client._count_failure("get", e))
                    return
                if blob is None:
                    return
                try:
                    item = read(blob, keys, i)
                except REFUSALS as e:
                    refused = asyncio.run_coroutine_threadsafe(
                        client._refuse(keys, i, e), self._loop
                    )
                    with contextlib.suppress(concurrent.futures.TimeoutError):
                        refused.result(timeout=max(0.0, deadline - time.monotonic()))
                    return
                got += 1
                yield item
        finally:
            for future in futures:
                future.cancel()
            client._observe("get", "hit" if got else "miss", t0, failures)
            client.metrics.hit_tokens.inc(got * ns.block_tokens)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine (e.g. one of `tier`'s) on the client's loop."""
        return self._run(coro)

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
