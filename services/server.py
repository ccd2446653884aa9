"""The gRPC face of one shard: kvpool.v1.KVPool over a BlockStore.

Where it stands: a shard actor (services/shard.py) runs `ShardServer` in its own thread and
event loop; clients stream blocks to it directly. Three layers, outside in:

- `Edge`, one server interceptor for every kvpool.v1 RPC: authenticates the caller (tenant
  token), caps the concurrent streams of each tenant (or peer host when authentication is off),
  maps refusals to status codes and observes per-RPC metrics.
- `KVPoolServicer`: translates messages and calls the store; no shard state but the store.
  Shards keep no per-namespace state: a Put carries its namespace and the block must match it.
- `Uploads`: the byte budget of uploads in flight, per shard and per tenant or peer.

Refusals and their codes:

    INVALID_ARGUMENT     malformed request: bad key length, missing header, truncated stream,
                         bytes that are not a kvpool block, a namespace that is not its id
    FAILED_PRECONDITION  unsupported format version, block that does not match its namespace,
                         key or position
    RESOURCE_EXHAUSTED   block or key list over a limit; upload budget or stream cap reached
    DEADLINE_EXCEEDED    an upload that stalls (idle timeout) or takes too long
    DATA_LOSS            checksum mismatch of an upload
    UNAUTHENTICATED      authentication on and no valid tenant token

A miss is not an error: Lookup counts present keys, Get answers found = false. Checksums and
other work proportional to a block's size run off the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.blockformat import (
    FORMAT_VERSION,
    ID_BYTES,
    BlockHeader,
    Flag,
    Layout,
    check_bound,
    verify,
)
from kvpool.proto.errors import (
    BlockFormatError,
    BlockMismatchError,
    ChecksumError,
    UnsupportedVersionError,
)
from kvpool.proto.keys import Namespace
from kvpool.proto.messages import HINTS, namespace_from_proto, pack
from kvpool.services.artifacts import ArtifactLimits, ArtifactServicer, ArtifactStore
from kvpool.services.artifacts import handlers as artifact_handlers
from kvpool.services.hot import HotKeys
from kvpool.services.metrics import ShardMetrics
from kvpool.services.security import ServerSecurity, store_key, tenant_of
from kvpool.services.shared import Arena, ArenaRefused, Arenas, Owner
from kvpool.services.store import Blob, BlockStore, BlockTooLargeError, PutItem

if TYPE_CHECKING:  # redis-py is needed only where a Redis tier is configured
    from kvpool.services.redis_tier import RedisTier

log = logging.getLogger(__name__)
SERVICE_NAME = "kvpool.v1.KVPool"
CHUNK_BYTES = 1 << 20
NAMESPACES_KEPT = 64  # checked namespaces a shard remembers (see KVPoolServicer._namespace)
INLINE_CHECK_BYTES = 64 << 10  # blocks up to this size are checked on the event loop (tens of us)
STREAMING = frozenset({"Put", "Get", "BatchPut", "BatchGet"})


@dataclass(frozen=True)
class Limits:
    max_block_bytes: int = 64 << 20
    max_keys: int = 4096  # per Lookup / Delete
    max_message_bytes: int = 4 << 20  # one chunk; gRPC enforces it
    upload_bytes: int = 128 << 20  # announced bytes of all uploads in flight on the shard
    peer_upload_bytes: int = 64 << 20  # ... of one tenant (or peer host without authentication)
    peer_streams: int = 32  # concurrent Put/Get streams of one tenant (or peer host)
    admission_wait_s: float = 2.0  # how long an upload may wait for room in the budget
    idle_timeout_s: float = 5.0  # longest wait for the next message of an upload
    upload_timeout_s: float = 60.0  # longest a whole upload may take
    shared_bytes: int = 512 << 20  # same-host arenas of all callers (services/shared.py)
    peer_shared_bytes: int = 256 << 20  # ... of one tenant (or peer host)
    shared_idle_s: float = 120.0  # an arena unused this long may be closed to make room

    def __post_init__(self) -> None:
        if not self.max_block_bytes <= self.peer_upload_bytes <= self.upload_bytes:
            raise ValueError(
                "limits need max_block_bytes <= peer_upload_bytes <= upload_bytes, so that "
                "every block a shard accepts fits the upload budgets"
            )
        if self.peer_shared_bytes > self.shared_bytes:
            raise ValueError("limits need peer_shared_bytes <= shared_bytes")


T = TypeVar("T")
TopologyFn = Callable[[], Awaitable[pb.TopologyResponse]]
_CALLER: ContextVar[Owner] = ContextVar("kvpool_caller")  # (tenant, peer key)
# the same-host socket's requests: op -> (the method they count as, their message)
_LOCAL: dict[bytes, tuple[str, Any]] = {
    b"L": ("LookupShared", pb.LookupRequest),
    b"G": ("GetShared", pb.GetSharedRequest),
    b"P": ("PutShared", pb.PutSharedRequest),
    b"g": ("BatchGetShared", pb.BatchGetSharedRequest),
    b"p": ("BatchPutShared", pb.BatchPutSharedRequest),
    b"r": ("ProbeShared", pb.ProbeSharedRequest),
    b"t": ("Touch", pb.TouchRequest),
}


class Refused(Exception):
    """A request the shard refuses, with its status code (mapped by `Edge`)."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class _Malformed:
    """Stands for a request whose bytes did not parse (see `_parse`)."""


MALFORMED: Any = _Malformed()


def _parse(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that turns unparsable bytes into MALFORMED, so the servicer can
    answer INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return MALFORMED

    return parse


def _well_formed(request: object) -> None:
    if request is MALFORMED:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the request does not parse as kvpool.v1")


def _check_id(value: bytes, what: str) -> None:
    if len(value) != ID_BYTES:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be {ID_BYTES} bytes, got {len(value)}"
        )


def _check_parent(info: pb.BlockInfo) -> None:
    """A block at position 0 has no parent; another names its nearest ancestor on this shard,
    or none (empty) when the client places no earlier block of its prefix here."""
    if info.position == 0 and info.parent:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a block at position 0 has no parent")
    if info.parent:
        _check_id(info.parent, "parent")


def check_block(header: BlockHeader, ns: Namespace) -> None:
    """A stored block must be of its namespace's shape, and carry a MAC exactly when its
    namespace says blocks do (the MAC itself only readers with the secret can check)."""
    if header.has_flag(Flag.MAC) != bool(ns.integrity):
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"namespace integrity {ns.integrity or 'none'!r}, block MAC "
            f"{'present' if header.has_flag(Flag.MAC) else 'absent'}",
        )
    heads = 1 if ns.layout == Layout.LATENT else ns.kv_heads
    want = (ns.layout, ns.dtype, ns.layers, heads, ns.head_dim, ns.block_tokens)
    got = (header.layout, header.dtype, header.layers, header.heads, header.head_dim, header.tokens)
    if want != got:
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "block (layout, dtype, layers, heads, head_dim, tokens) "
            f"{tuple(int(x) for x in got)} does not match its namespace {tuple(int(x) for x in want)}",
        )


def peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7" (one host, whatever its connections)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


# -- the upload budget --------------------------------------------------------------------------


class Uploads:
    """Bytes of uploads in flight, per shard and per tenant or peer. An upload reserves the
    size it announces before a byte of it is buffered, waits a little for room, and is refused
    with RESOURCE_EXHAUSTED if none comes; nothing is allocated for a refused upload."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.by_peer: Counter[str] = Counter()
        self._room = asyncio.Condition()

    def _fits(self, peer: str, size: int) -> bool:
        return (
            self.total + size <= self.limits.upload_bytes
            and self.by_peer[peer] + size <= self.limits.peer_upload_bytes
        )

    @contextlib.asynccontextmanager
    async def reserve(self, peer: str, size: int) -> AsyncIterator[None]:
        limits = self.limits  # size <= max_block_bytes: it fits both budgets (see Limits)
        async with self._room:
            try:
                if not self._fits(peer, size):  # else no waiting (and no task to wait in)
                    await asyncio.wait_for(
                        self._room.wait_for(lambda: self._fits(peer, size)),
                        limits.admission_wait_s,
                    )
            except TimeoutError:
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"upload budget full ({self.total} bytes in flight on the shard, "
                    f"{self.by_peer[peer]} from this caller)",
                ) from None
            self.total += size
            self.by_peer[peer] += size
        try:
            yield
        finally:
            async with self._room:
                self.total -= size
                self.by_peer[peer] -= size
                if not self.by_peer[peer]:
                    del self.by_peer[peer]
                self._room.notify_all()


async def _next_message(it: AsyncIterator[T], deadline: float, limits: Limits,
                       stalled: str) -> T | None:  # fmt: skip
    """The next message of an upload stream (None at its end), within the idle timeout and
    before `deadline`; DEADLINE_EXCEEDED with the detail `stalled` otherwise."""
    wait = max(0.0, min(limits.idle_timeout_s, deadline - time.monotonic()))
    try:
        return await asyncio.wait_for(anext(it, None), wait)
    except TimeoutError:
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, stalled) from None


async def receive(stream: AsyncIterator[pb.PutRequest], size: int, limits: Limits) -> bytearray:
    """The chunks of an upload, joined as they arrive (one copy; memory follows the bytes
    received, never the size announced). Refuses a stream that stalls, runs too long, sends
    more or fewer bytes than announced, or sends anything but chunks."""
    buf = bytearray()
    deadline = time.monotonic() + limits.upload_timeout_s
    it = aiter(stream)
    while True:
        msg = await _next_message(
            it, deadline, limits, f"upload stalled at {len(buf)} of {size} bytes"
        )
        if msg is None:
            break
        _well_formed(msg)
        if msg.WhichOneof("part") != "chunk":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "info sent twice in one Put")
        if len(buf) + len(msg.chunk) > size:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"more than the announced {size} bytes")
        buf += msg.chunk
    if len(buf) != size:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, f"truncated stream: {len(buf)} of {size} bytes"
        )
    return buf


def verify_upload(data: Blob, info: pb.BlockInfo, ns: Namespace) -> None:
    """An uploaded block is intact, of its namespace's shape, and bound to the namespace id,
    key and position it is put under."""
    try:
        header = verify(data)
        check_bound(header, info.namespace_id, info.key, info.position)
    except ChecksumError as e:
        raise Refused(grpc.StatusCode.DATA_LOSS, f"upload corrupted: {e}") from None
    except (UnsupportedVersionError, BlockMismatchError) as e:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
    except BlockFormatError as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"not a kvpool block: {e}") from None
    check_block(header, ns)


def namespace_of(info: pb.BlockInfo) -> Namespace:
    """The namespace a Put names, checked against its id and this shard's format version."""
    if not info.HasField("namespace"):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a Put names its namespace")
    try:
        ns = namespace_from_proto(info.namespace)
    except ValueError as e:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad namespace: {e}") from None
    if ns.format_version != FORMAT_VERSION:
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"block format version {ns.format_version}; this shard stores version {FORMAT_VERSION}",
        )
    if ns.id != info.namespace_id:
        raise Refused(
            grpc.StatusCode.INVALID_ARGUMENT, "namespace_id is not the namespace's digest"
        )
    return ns


# -- batch uploads ------------------------------------------------------------------------------


class _Incoming:
    """A block of a BatchPut while its bytes arrive: `buf` is None unless it was admitted
    (refused or already present: its bytes are skipped); `budget` holds its reservation."""

    def __init__(self, info: pb.BlockInfo, result: pb.BlockStored) -> None:
        self.info, self.result = info, result
        self.admitted = False
        self.received = 0
        self.buf: Blob | None = None  # a bytearray while its bytes arrive
        self.budget: contextlib.AsyncExitStack | None = None
        self.ns: Namespace | None = None
        self.key = self.chain = b""

    async def refuse(self, e: Refused, store: BlockStore) -> None:
        self.refused(e, store)
        await self.release()

    def refused(self, e: Refused, store: BlockStore) -> None:
        """Count the refusal and say it in the block's result (its reservation stays held)."""
        store.count(rejected=1)
        self.result.stored, self.result.code, self.result.detail = False, e.code.value[0], e.detail

    async def release(self) -> None:
        self.buf = None
        if self.budget is not None:
            budget, self.budget = self.budget, None
            await budget.aclose()


def _runs(sizes: list[int], most: int) -> list[int]:
    """The lengths of consecutive runs of `sizes` whose admissible sizes (at most `most` each:
    larger blocks are refused alone) sum to at most `most`; every run has one block at least."""
    runs: list[int] = []
    n = total = 0
    for size in sizes:
        size = size if size <= most else 0
        if n and total + size > most:
            runs.append(n)
            n = total = 0
        n += 1
        total += size
    if n:
        runs.append(n)
    return runs


# -- the servicer ---------------------------------------------------------------------------------


class KVPoolServicer(pb_grpc.KVPoolServicer):
    """Messages in, store calls, messages out. The caller's tenant comes from `Edge`."""

    def __init__(
        self, store: BlockStore, shard_id: str, topology: TopologyFn, limits: Limits = Limits(),
        redis: RedisTier | None = None,
    ) -> None:  # fmt: skip
        self.store, self.shard_id, self.limits, self.redis = store, shard_id, limits, redis
        self.uploads = Uploads(limits)
        self._topology = topology
        self.arenas: Arenas | None = None  # the same-host path, when the server has one
        self.metrics: ShardMetrics | None = None
        # namespaces recently put, by id: (the message checked, the namespace); a batch of
        # small blocks repeats one namespace, and checking it costs more than the block
        self._namespaces: collections.OrderedDict[bytes, tuple[pb.Namespace, Namespace]] = (
            collections.OrderedDict()
        )
        self.hot = HotKeys()  # blocks read so often here that clients should spread them

    def _namespace(self, info: pb.BlockInfo) -> Namespace:
        """`namespace_of(info)`, remembered for the last NAMESPACES_KEPT namespaces."""
        known = self._namespaces.get(info.namespace_id)
        if known is not None and info.HasField("namespace") and known[0] == info.namespace:
            self._namespaces.move_to_end(info.namespace_id)
            return known[1]
        ns = namespace_of(info)
        kept = pb.Namespace()
        kept.CopyFrom(info.namespace)
        self._namespaces[info.namespace_id] = (kept, ns)
        if len(self._namespaces) > NAMESPACES_KEPT:
            self._namespaces.popitem(last=False)
        return ns

    def _keys(self, namespace_id: bytes, keys: list[bytes]) -> list[bytes]:
        """The store keys of a request's keys, after checking their number and lengths."""
        _check_id(namespace_id, "namespace_id")
        if len(keys) > self.limits.max_keys:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(keys)} keys in one request; the limit is {self.limits.max_keys}",
            )
        tenant, _ = _CALLER.get()
        for key in keys:
            _check_id(key, "key")
        return [store_key(tenant, namespace_id, k) for k in keys]

    async def Lookup(self, request: pb.LookupRequest, context: Any) -> pb.LookupResponse:
        _well_formed(request)
        return await self._lookup(request)

    async def _lookup(self, request: pb.LookupRequest) -> pb.LookupResponse:
        keys = self._keys(request.namespace_id, list(request.keys))
        return pb.LookupResponse(present=await self._leading(keys))

    async def _leading(self, keys: list[bytes]) -> int:
        """How many of these store keys, in order, memory (then Redis) holds."""
        n = self.store.leading(keys)
        if self.redis is not None and n < len(keys):
            n += await asyncio.to_thread(self.redis.leading, keys[n:])
        return n

    async def Put(
        self, request_iterator: AsyncIterator[pb.PutRequest], context: Any
    ) -> pb.PutResponse:
        first = await asyncio.wait_for(
            anext(aiter(request_iterator), None), self.limits.idle_timeout_s
        )
        if first is None or first is MALFORMED or first.WhichOneof("part") != "info":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a Put stream starts with info")
        info = first.info
        ns, key, chain = self._admit_put(info)
        if key in self.store:
            self.store.count(put_existing=1)
            return pb.PutResponse(stored=False)  # immutable: no work, the rest is not read
        async with self.uploads.reserve(_CALLER.get()[1], info.size):
            data = await receive(request_iterator, info.size, self.limits)
            await asyncio.to_thread(verify_upload, data, info, ns)
        return self._store(info, key, chain, data)

    def _admit_put(self, info: pb.BlockInfo) -> tuple[Namespace, bytes, bytes]:
        """A put's namespace and store keys, after checking them and the announced size."""
        ns = self._namespace(info)
        [key, chain] = self._keys(info.namespace_id, [info.key, info.chain])
        _check_parent(info)
        if info.hints & ~HINTS:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"hints {info.hints:#x}: bits 1 and 2 only"
            )
        limit = min(self.limits.max_block_bytes, self.store.budget_bytes)
        if info.size > limit:
            raise Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"block of {info.size} bytes over the limit of {limit}",
            )
        return ns, key, chain

    def _store(self, info: pb.BlockInfo, key: bytes, chain: bytes, data: Blob) -> pb.PutResponse:
        """Store an admitted, verified block under its store keys (its parent's too)."""
        block = _Incoming(info, pb.BlockStored())
        block.key, block.chain, block.buf = key, chain, data
        [refused] = self._store_many([block])
        if refused is not None:
            raise refused  # counted where the RPC is refused
        return pb.PutResponse(stored=block.result.stored)

    async def Get(self, request: pb.GetRequest, context: Any) -> AsyncIterator[pb.GetResponse]:
        data, replicas = await self._read(request)
        if data is None:
            yield pb.GetResponse(found=False)
            return
        view = memoryview(data)
        yield pb.GetResponse(
            found=True, size=len(data), chunk=bytes(view[:CHUNK_BYTES]), replicas=replicas
        )
        for off in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
            yield pb.GetResponse(chunk=bytes(view[off : off + CHUNK_BYTES]))

    async def BatchGet(
        self, request: pb.BatchGetRequest, context: Any
    ) -> AsyncIterator[pb.BatchGetResponse]:
        _well_formed(request)
        found, hints, forks = await self._read_many(request.namespace_id, list(request.keys))
        heads = [
            (pb.BlockFound(found=d is not None, size=0 if d is None else len(d), replicas=r,
                           branched=f), d)
            for d, r, f in zip(found, hints, forks, strict=True)
        ]  # fmt: skip
        for blocks, data in pack(heads, CHUNK_BYTES):
            yield pb.BatchGetResponse(blocks=blocks, data=data)

    async def _read_many(
        self, namespace_id: bytes, keys: list[bytes]
    ) -> tuple[list[Blob | None], list[int], list[bool]]:
        """The blocks of `keys` (None for a miss), the replicas each should have, as `_read`
        reads each, and whether each found one has branched (`BlockStore.branched`)."""
        store_keys = self._keys(namespace_id, keys)
        found = self.store.get_many(store_keys)
        if self.redis is not None:
            misses = [i for i, d in enumerate(found) if d is None]
            again = await asyncio.gather(*(
                self._read_through(pb.GetRequest(namespace_id=namespace_id, key=keys[i]),
                                   store_keys[i])
                for i in misses
            ))  # fmt: skip
            for i, data in zip(misses, again, strict=True):
                found[i] = data
        hints = [
            0 if d is None else self.hot.read(k, len(d))
            for k, d in zip(store_keys, found, strict=True)
        ]
        return found, hints, [bool(f) for f in self.store.branched(store_keys)]

    async def BatchPut(
        self, request_iterator: AsyncIterator[pb.BatchPutRequest], context: Any
    ) -> pb.BatchPutResponse:
        """The blocks of the stream one after the other, each as a Put: admitted (its size
        reserved in the upload budget) when its first byte is due, its bytes kept only if it
        was admitted, then checked, stored and its reservation released. A refusal ends only
        its block; at most one block of a stream holds a reservation."""
        results: list[pb.BlockStored] = []
        waiting: collections.deque[_Incoming] = collections.deque()
        deadline = time.monotonic() + self.limits.upload_timeout_s
        it = aiter(request_iterator)
        try:
            while True:
                msg = await _next_message(it, deadline, self.limits, "upload stalled")
                if msg is None:
                    break
                _well_formed(msg)
                if len(results) + len(msg.blocks) > self.limits.max_keys:
                    raise Refused(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {self.limits.max_keys} blocks in one BatchPut",
                    )
                for info in msg.blocks:
                    results.append(pb.BlockStored())
                    waiting.append(_Incoming(info, results[-1]))
                await self._feed(waiting, memoryview(msg.data))
            if waiting:
                block = waiting[0]
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              f"truncated stream: {block.received} of {block.info.size} bytes")  # fmt: skip
        finally:
            if waiting:
                await waiting[0].release()
        return pb.BatchPutResponse(blocks=results)

    async def _feed(self, waiting: collections.deque[_Incoming], data: memoryview) -> None:
        """Hand a message's bytes to the blocks waiting for them, in order: each admitted when
        it comes first, finished when complete (then off `waiting`)."""
        while True:
            while waiting:
                block = waiting[0]
                if not block.admitted:
                    await self._admit_block(block)
                if block.received < block.info.size:
                    break
                await self._finish_block(waiting.popleft())
            if not data:
                return
            if not waiting:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "bytes beyond the announced blocks")
            block = waiting[0]
            part = data[: block.info.size - block.received]
            if block.buf is not None:
                block.buf += part
            block.received += len(part)
            data = data[len(part) :]

    async def _admit_block(self, block: _Incoming, reserve: bool = True) -> None:
        """Admit a block of a batch as a Put is admitted: refused (its bytes will be skipped),
        already present (likewise), or its size reserved in the upload budget (`reserve`
        False: the caller holds a reservation that covers it)."""
        block.admitted = True
        try:
            block.ns, block.key, block.chain = self._admit_put(block.info)
            if block.key in self.store:
                self.store.count(put_existing=1)
                return
            if reserve:
                block.budget = contextlib.AsyncExitStack()
                await block.budget.enter_async_context(
                    self.uploads.reserve(_CALLER.get()[1], block.info.size)
                )
            block.buf = bytearray()
        except Refused as e:
            await block.refuse(e, self.store)

    async def _finish_block(self, block: _Incoming) -> None:
        """Check a complete admitted block, store it, release its reservation."""
        try:
            if await self._checked(block):
                self._refuse_each([block], self._store_many([block]))
        finally:
            await block.release()

    async def _checked(self, block: _Incoming) -> bool:
        """Whether a complete admitted block is intact and bound where it is put (checked off
        the event loop unless it is small); refused (and False) if not, False if it was
        refused or already present before."""
        if block.buf is None or block.ns is None:
            return False
        try:
            if block.info.size <= INLINE_CHECK_BYTES:
                verify_upload(block.buf, block.info, block.ns)
            else:
                await asyncio.to_thread(verify_upload, block.buf, block.info, block.ns)
        except Refused as e:
            await block.refuse(e, self.store)
            return False
        return True

    def _store_many(self, blocks: list[_Incoming]) -> list[Refused | None]:
        """Store checked blocks of one request as one batch of the store (one lock, one tick:
        the blocks of a prefix age together, deepest first, as one store orders a batch) and
        set each one's result; returns each one's refusal or None. When one is too large for
        the store, each is stored on its own, so that only it is refused."""
        if not blocks:
            return []
        tenant = _CALLER.get()[0]
        items: list[PutItem] = []
        hints: list[int] = []
        for b in blocks:
            assert b.buf is not None
            up = b.info.parent
            parent = store_key(tenant, b.info.namespace_id, up) if up else None
            items.append((b.key, b.chain, b.info.position, b.buf, parent, tenant))
            hints.append(b.info.hints)
        try:
            stored = self.store.put_many(items, hints)
        except BlockTooLargeError as e:
            if len(blocks) == 1:
                return [Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))]
            return [self._store_many([b])[0] for b in blocks]
        for b, item, ok in zip(blocks, items, stored, strict=True):
            b.result.stored = ok
            if ok and self.redis is not None and self.redis.mode == "all":
                self.redis.offer(b.key, b.chain, b.info.position, item[3])
        return [None] * len(blocks)

    def _refuse_each(self, blocks: list[_Incoming], refusals: list[Refused | None]) -> None:
        """Count and state in each block's result the refusal `_store_many` gave it."""
        for b, refused in zip(blocks, refusals, strict=True):
            if refused is not None:
                b.refused(refused, self.store)

    async def OpenShared(
        self, request: pb.OpenSharedRequest, context: Any
    ) -> pb.OpenSharedResponse:
        _well_formed(request)
        if self.arenas is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "no same-host path on this shard")
        try:
            arena = self.arenas.open(_CALLER.get(), request.size)
        except ArenaRefused as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.full else grpc.StatusCode.OUT_OF_RANGE
            raise Refused(code, str(e)) from None
        assert arena.ticket is not None
        return pb.OpenSharedResponse(session=arena.session, ticket=arena.ticket,
                                     socket_path=self.arenas.path, size=arena.size)  # fmt: skip

    async def GetShared(self, request: pb.GetSharedRequest, context: Any) -> pb.GetSharedResponse:
        _well_formed(request)
        return await self._get_shared(self._session(request.session), request)

    async def _get_shared(self, arena: Arena, request: pb.GetSharedRequest) -> pb.GetSharedResponse:
        """Read a block as Get does and copy it into the caller's `arena` at the request's
        offset when it fits in its capacity (that span is checked before anything is read)."""
        self._within(arena, request.offset, request.capacity)
        request_ = pb.GetRequest(namespace_id=request.namespace_id, key=request.key)
        data, replicas = await self._read(request_)
        if data is None:
            return pb.GetSharedResponse(found=False)
        fits = len(data) <= request.capacity
        if fits:
            self._live(arena).view[request.offset : request.offset + len(data)] = data
        return pb.GetSharedResponse(found=True, size=len(data), fits=fits, replicas=replicas)

    async def PutShared(self, request: pb.PutSharedRequest, context: Any) -> pb.PutResponse:
        _well_formed(request)
        return await self._put_shared(self._session(request.session), request)

    async def _put_shared(self, arena: Arena, request: pb.PutSharedRequest) -> pb.PutResponse:
        """Store the block the caller wrote into its `arena` at the request's offset, checked
        exactly as an upload."""
        info, offset = request.info, request.offset
        self._within(arena, offset, info.size)
        ns, key, chain = self._admit_put(info)
        if key in self.store:
            self.store.count(put_existing=1)
            return pb.PutResponse(stored=False)
        async with self.uploads.reserve(_CALLER.get()[1], info.size):
            # a copy: the caller can still write there
            data = self._live(arena).view[offset : offset + info.size]
            await asyncio.to_thread(verify_upload, data, info, ns)
        return self._store(info, key, chain, data)

    async def _batch_get_shared(
        self, arena: Arena, request: pb.BatchGetSharedRequest
    ) -> pb.BatchGetSharedResponse:
        """Read blocks as BatchGet does and copy those found, in key order, back to back into
        the caller's `arena` from the request's offset while they fit in its capacity."""
        self._within(arena, request.offset, request.capacity)
        found, hints, forks = await self._read_many(request.namespace_id, list(request.keys))
        view = self._live(arena).view
        at, end, copied, full = request.offset, request.offset + request.capacity, 0, False
        reply = pb.BatchGetSharedResponse()
        for data, replicas, fork in zip(found, hints, forks, strict=True):
            reply.blocks.add(found=data is not None, size=0 if data is None else len(data),
                             replicas=replicas, branched=fork)  # fmt: skip
            if data is None or full:
                continue
            if at + len(data) > end:
                full = True
                continue
            view[at : at + len(data)] = data
            at += len(data)
            copied += 1
        reply.copied = copied
        return reply

    async def _batch_put_shared(
        self, arena: Arena, request: pb.BatchPutSharedRequest
    ) -> pb.BatchPutResponse:
        """Store the blocks the caller wrote back to back into its `arena` from the request's
        offset, each admitted, copied out, checked and stored as a PutShared; a refusal ends
        only its block."""
        if len(request.blocks) > self.limits.max_keys:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"more than {self.limits.max_keys} blocks in one batch")  # fmt: skip
        if request.HasField("touch"):
            self._touch(request.touch)
        sizes = [info.size for info in request.blocks]
        self._within(arena, request.offset, sum(sizes))
        reply = pb.BatchPutResponse()
        at, first = request.offset, 0
        for run in _runs(sizes, self.limits.max_block_bytes):  # one reservation per run
            held = sum(s for s in sizes[first : first + run] if s <= self.limits.max_block_bytes)
            async with contextlib.AsyncExitStack() as budget:
                try:
                    await budget.enter_async_context(self.uploads.reserve(_CALLER.get()[1], held))
                    refused = None
                except Refused as e:
                    refused = e
                checked: list[_Incoming] = []
                for info in request.blocks[first : first + run]:
                    block = _Incoming(info, reply.blocks.add())
                    if refused is not None:
                        await block.refuse(refused, self.store)
                    else:
                        await self._admit_block(block, reserve=False)
                    if block.buf is not None:  # a copy: the caller can still write there
                        block.buf += self._live(arena).view[at : at + info.size]
                        block.received = info.size
                        if await self._checked(block):
                            checked.append(block)
                    at += info.size
                self._refuse_each(checked, self._store_many(checked))  # the run as one batch
                for block in checked:
                    await block.release()
            first += run
        return reply

    async def _probe_shared(
        self, arena: Arena, request: pb.ProbeSharedRequest
    ) -> pb.BatchGetSharedResponse:
        """Which of a prefix's keys this shard holds, and the leading run of them copied back
        to back into the caller's `arena` from the request's offset while they fit in its
        capacity; nothing the store keeps or counts changes (the caller touches what it uses).
        With a Redis tier, the keys it holds right after the leading run in memory count as
        present, not copied (the caller reads them as a get does)."""
        self._within(arena, request.offset, request.capacity)
        if request.HasField("touch"):
            self._touch(request.touch)
        keys = self._keys(request.namespace_id, list(request.keys))
        peeks = self.store.peek_many(keys)  # (block, branched) of each key held
        lead = next((i for i, p in enumerate(peeks) if p is None), len(peeks))
        behind = 0
        if self.redis is not None and lead < len(keys):
            behind = await asyncio.to_thread(self.redis.leading, keys[lead:])
        view = self._live(arena).view
        at, end, copied = request.offset, request.offset + request.capacity, 0
        reply = pb.BatchGetSharedResponse()
        for i, (key, peek) in enumerate(zip(keys, peeks, strict=True)):
            if peek is None:
                reply.blocks.add(found=lead <= i < lead + behind)
                continue
            data, fork = peek
            reply.blocks.add(found=True, size=len(data), replicas=self.hot.peek(key, len(data)),
                             branched=fork)  # fmt: skip
            if i == copied and at + len(data) <= end:  # still in the leading run, and fits
                view[at : at + len(data)] = data
                at += len(data)
                copied += 1
        reply.copied = copied
        return reply

    def _touch(self, request: pb.TouchRequest) -> int:
        """Touch the blocks of `request` a probe served and the caller used, as a read does,
        and mark those it names `branched` (`BlockStore.mark_branched`); how many of its keys
        are still here."""
        if request.branched:
            self.store.mark_branched(self._keys(request.namespace_id, list(request.branched)))
        if not request.keys:
            return 0
        keys = self._keys(request.namespace_id, list(request.keys))
        found = self.store.get_many(keys)
        for key, data in zip(keys, found, strict=True):
            if data is not None:
                self.hot.read(key, len(data))
        return sum(d is not None for d in found)

    def _live(self, arena: Arena) -> Arena:
        """`arena`, unless it was closed (idle, or by its owner) while a request awaited."""
        if arena.view.closed:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the shared-memory session ended")
        return arena

    async def local(self, owner: Owner, arena: Arena, op: bytes, body: bytes) -> tuple[int, bytes]:
        """A request on the same-host socket (services/shared.py): a LookupRequest (op b"L"),
        GetSharedRequest (b"G") or PutSharedRequest (b"P"), answered as its gRPC twin answers
        `owner`, with the socket's own arena as the session. Returns (0, the response) or (a
        gRPC status code, its detail); ValueError for an op or body that does not parse."""
        kind = _LOCAL.get(op)
        if kind is None:
            raise ValueError(f"unknown op {op!r}")
        method, message = kind
        try:
            request = message.FromString(body)
        except DecodeError:
            raise ValueError("the request does not parse") from None
        t0, code = time.perf_counter(), "OK"
        token = _CALLER.set(owner)
        try:
            if isinstance(request, pb.LookupRequest):
                reply: Any = await self._lookup(request)
            elif isinstance(request, pb.GetSharedRequest):
                reply = await self._get_shared(arena, request)
            elif isinstance(request, pb.BatchGetSharedRequest):
                reply = await self._batch_get_shared(arena, request)
            elif isinstance(request, pb.BatchPutSharedRequest):
                reply = await self._batch_put_shared(arena, request)
            elif isinstance(request, pb.ProbeSharedRequest):
                reply = await self._probe_shared(arena, request)
            elif isinstance(request, pb.TouchRequest):
                reply = pb.TouchResponse(touched=self._touch(request))
            else:
                reply = await self._put_shared(arena, request)
            return 0, reply.SerializeToString()
        except Refused as e:  # counted as the gRPC edge counts a refused call
            self.store.count(rejected=1)
            code = e.code.name
            return e.code.value[0], e.detail.encode()
        finally:
            _CALLER.reset(token)
            if self.metrics is not None:
                self.metrics.observe(method, code, time.perf_counter() - t0)

    def _session(self, session: bytes) -> Arena:
        """The caller's arena `session` (FAILED_PRECONDITION when it is not, or no longer, theirs)."""
        if self.arenas is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "no same-host path on this shard")
        try:
            return self.arenas.session(session, _CALLER.get())
        except ArenaRefused as e:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None

    @staticmethod
    def _within(arena: Arena, offset: int, length: int) -> None:
        if offset + length > arena.size:
            raise Refused(grpc.StatusCode.OUT_OF_RANGE,
                          f"bytes [{offset}, {offset + length}) outside the {arena.size}-byte arena")  # fmt: skip

    async def CloseShared(
        self, request: pb.CloseSharedRequest, context: Any
    ) -> pb.CloseSharedResponse:
        _well_formed(request)
        if self.arenas is not None:
            self.arenas.close(request.session, _CALLER.get())
        return pb.CloseSharedResponse()

    async def _read(self, request: pb.GetRequest) -> tuple[Blob | None, int]:
        """The requested block (None on a miss) and the replicas it should have (`HotKeys`),
        as `_read_many` reads it. A block in memory was verified when it was uploaded and is
        immutable; it is not checked again here (a crc of 4.5 MB costs more than the whole
        same-host transfer): every reader verifies what it decodes, and deletes a block that
        fails. Blocks read through from Redis are checked like uploads."""
        _well_formed(request)
        [data], [replicas], _ = await self._read_many(request.namespace_id, [request.key])
        return data, replicas

    async def _read_through(self, request: pb.GetRequest, key: bytes) -> Blob | None:
        """A memory miss read from the Redis tier, checked like an upload (intact, bound to
        this namespace id, key and position) and put back into memory."""
        if self.redis is None:
            return None
        found = await asyncio.to_thread(self.redis.get, key)
        if found is None:
            self.store.count(redis_misses=1)
            return None
        chain, position, data = found

        def check() -> None:
            check_bound(verify(data), request.namespace_id, request.key, position)

        try:
            await asyncio.to_thread(check)
        except BlockMismatchError as e:
            self.store.count(mismatched_blocks=1, redis_misses=1)
            log.error("shard %s: misplaced block in Redis %s: %s", self.shard_id, key.hex()[:16], e)
            return None
        except BlockFormatError as e:
            self.store.count(checksum_failures=1, redis_misses=1)
            log.error("shard %s: corrupt block in Redis %s: %s", self.shard_id, key.hex()[:16], e)
            return None
        self.store.count(redis_hits=1)
        with contextlib.suppress(BlockTooLargeError):
            # Redis does not keep the parent: the block re-enters memory without its tree edge
            self.store.put(key, chain, position, data, parent=None, tenant=_CALLER.get()[0])
        return data

    async def Touch(self, request: pb.TouchRequest, context: Any) -> pb.TouchResponse:
        _well_formed(request)
        return pb.TouchResponse(touched=self._touch(request))

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        _well_formed(request)
        keys = self._keys(request.namespace_id, list(request.keys))
        deleted = self.store.delete(keys)
        if self.redis is not None:
            deleted |= await asyncio.to_thread(self.redis.delete, keys)
        return pb.DeleteResponse(deleted=len(deleted))

    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        s = self.store.snapshot()
        return pb.StatsResponse(
            shard_id=self.shard_id, blocks=s.blocks, bytes=s.bytes, budget_bytes=s.budget_bytes,
            hits=s.hits, misses=s.misses, puts=s.puts, put_existing=s.put_existing,
            evictions=s.evictions, checksum_failures=s.checksum_failures, rejected=s.rejected,
            bytes_served=s.bytes_served,
        )  # fmt: skip

    async def Topology(self, request: pb.TopologyRequest, context: Any) -> pb.TopologyResponse:
        try:
            return await self._topology()
        except Exception as e:  # the control plane is briefly away (e.g. restarting)
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"topology unavailable: {e}") from None


def _handlers(s: KVPoolServicer) -> grpc.GenericRpcHandler:
    """kvpool.v1.KVPool's handlers, with request parsing that cannot fail (see `_parse`)."""
    u, us, su = (
        grpc.unary_unary_rpc_method_handler,
        grpc.unary_stream_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
    )
    handlers = {
        "Lookup": u(s.Lookup, _parse(pb.LookupRequest), pb.LookupResponse.SerializeToString),
        "Put": su(s.Put, _parse(pb.PutRequest), pb.PutResponse.SerializeToString),
        "Get": us(s.Get, _parse(pb.GetRequest), pb.GetResponse.SerializeToString),
        "BatchGet": us(s.BatchGet, _parse(pb.BatchGetRequest), pb.BatchGetResponse.SerializeToString),
        "BatchPut": su(s.BatchPut, _parse(pb.BatchPutRequest), pb.BatchPutResponse.SerializeToString),
        "Delete": u(s.Delete, _parse(pb.DeleteRequest), pb.DeleteResponse.SerializeToString),
        "Touch": u(s.Touch, _parse(pb.TouchRequest), pb.TouchResponse.SerializeToString),
        "Stats": u(s.Stats, _parse(pb.StatsRequest), pb.StatsResponse.SerializeToString),
        "Topology": u(s.Topology, _parse(pb.TopologyRequest), pb.TopologyResponse.SerializeToString),
        "OpenShared": u(s.OpenShared, _parse(pb.OpenSharedRequest), pb.OpenSharedResponse.SerializeToString),
        "GetShared": u(s.GetShared, _parse(pb.GetSharedRequest), pb.GetSharedResponse.SerializeToString),
        "PutShared": u(s.PutShared, _parse(pb.PutSharedRequest), pb.PutResponse.SerializeToString),
        "CloseShared": u(s.CloseShared, _parse(pb.CloseSharedRequest), pb.CloseSharedResponse.SerializeToString),
    }  # fmt: skip
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


# -- the edge -------------------------------------------------------------------------------------


class Edge(grpc.aio.ServerInterceptor):
    """Every kvpool.v1 RPC passes here: the caller's tenant from its token (UNAUTHENTICATED
    without a valid one when `tokens` is set), a cap on the concurrent streams of each tenant
    or peer host, `Refused` mapped to its status code, and one metrics observation per RPC.
    Other services (grpc.health.v1) pass untouched."""

    def __init__(
        self, tokens: Mapping[str, str] | None, limits: Limits, store: BlockStore,
        metrics: ShardMetrics | None,
    ) -> None:  # fmt: skip
        self.tokens, self.limits, self.store, self.metrics = tokens, limits, store, metrics
        self.streams: Counter[str] = Counter()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # fmt: skip
        handler = await continuation(details)
        prefix = f"/{SERVICE_NAME}/"
        if handler is None or not details.method.startswith(prefix):
            return handler
        method = details.method[len(prefix) :]
        metadata = tuple(details.invocation_metadata or ())
        tenant = None if self.tokens is None else tenant_of(self.tokens, metadata)
        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, tenant, handler.unary_stream), **serdes
            )
        behavior = handler.unary_unary or handler.stream_unary
        wrap = grpc.unary_unary_rpc_method_handler
        if handler.stream_unary:
            wrap = grpc.stream_unary_rpc_method_handler
        return wrap(self._unary(method, tenant, behavior), **serdes)

    @contextlib.contextmanager
    def _admit(self, method: str, tenant: str | None, context: Any) -> Any:
        """Authenticate, bind the caller for the servicer, and hold a stream slot."""
        if self.tokens is not None and tenant is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "a valid tenant token is required")
        peer = tenant if tenant is not None else peer_host(context.peer() or "")
        token = _CALLER.set((tenant, peer))
        streaming = method in STREAMING
        if streaming:
            if self.streams[peer] >= self.limits.peer_streams:
                _CALLER.reset(token)
                raise Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.streams[peer]} streams open from this caller; "
                    f"the limit is {self.limits.peer_streams}",
                )
            self.streams[peer] += 1
        try:
            yield
        finally:
            if streaming:
                self.streams[peer] -= 1
                if not self.streams[peer]:
                    del self.streams[peer]
            _CALLER.reset(token)

    @contextlib.asynccontextmanager
    async def _rpc(
        self, method: str, tenant: str | None, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Around one RPC: admission, `Refused` (and a stalled upload) to its status code, and
        one metrics observation with the code it ended with.

        A refusal inside the RPC sets the status and ends the RPC normally, with no exception
        left behind: aborting (an exception kept by the call, chained to the one caught, whose
        traceback holds the RPC's frames) tied an upload's received bytes into a reference
        cycle that only a full garbage collection freed; each refused upload stayed resident."""
        t0, code = time.perf_counter(), "OK"
        try:
            with self._admit(method, tenant, context):
                try:
                    yield
                except Refused as e:
                    code = self._refuse(context, e)
                except (TimeoutError, asyncio.TimeoutError):  # a read that stalled
                    stalled = Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "stalled")
                    code = self._refuse(context, stalled)
        except Refused as e:  # at admission, before the RPC ran: nothing of it is held
            code = self._refuse(context, e)
            await context.abort(e.code, e.detail)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self._observe(method, code, t0)

    def _unary(self, method: str, tenant: str | None, behavior: Callable[..., Any]) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._rpc(method, tenant, context):
                return await behavior(request, context)

        return run

    def _stream(self, method: str, tenant: str | None, behavior: Callable[..., Any]) -> Any:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._rpc(method, tenant, context):
                async for reply in behavior(request, context):
                    yield reply

        return run

    def _refuse(self, context: grpc.aio.ServicerContext, e: Refused) -> str:
        """Count a refusal and set the RPC's status to it; returns the code's name."""
        self.store.count(rejected=1)
        context.set_code(e.code)
        context.set_details(e.detail)
        return e.code.name

    def _observe(self, method: str, code: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code, time.perf_counter() - t0)


class ShardServer:
    """A grpc.aio server for one shard, running in its own thread and event loop.

    `start()` returns once the port is bound; `address` is then "host:port". Used by the shard
    actor, and directly by tests and tools that want a tier without Ray.
    """

    def __init__(
        self,
        store: BlockStore,
        shard_id: str,
        topology: TopologyFn | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        limits: Limits = Limits(),
        metrics_port: int | None = None,
        redis: RedisTier | None = None,
        security: ServerSecurity | None = None,
        health_port: int | None = None,
        shared_dir: str | None = tempfile.gettempdir(),
    ) -> None:
        """health_port: also serve grpc.health.v1 alone, in plaintext, on this port (0: any free
        port), for probes that cannot speak TLS (Kubernetes gRPC probes); None: no such port.
        shared_dir: where the same-host path's Unix socket goes (clients on this host must
        reach it under the same path); None: no same-host path."""
        self.store, self.shard_id, self.limits = store, shard_id, limits
        self.redis, self.security = redis, security or ServerSecurity()
        self.host, self.port = host, port
        self.metrics = ShardMetrics(store)
        self._metrics_port = metrics_port  # None: no /metrics server (0: any free port)
        self.advertise_host = advertise_host or host
        self._topology = topology or self._single_topology
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"grpc-{shard_id}", daemon=True
        )
        self._server: grpc.aio.Server | None = None
        self.health_port = health_port
        self._health_server: grpc.aio.Server | None = None
        self.shared_dir = shared_dir
        self.arenas: Arenas | None = None
        self.artifacts = ArtifactStore(ArtifactLimits())  # key bases and the records naming them

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    @property
    def health_address(self) -> str:
        """host:port of the plaintext health-only listener, or "" when there is none."""
        return f"{self.advertise_host}:{self.health_port}" if self._health_server else ""

    @property
    def metrics_address(self) -> str:
        """host:port of `/metrics`, or "" when not served."""
        return f"{self.advertise_host}:{self.metrics.port}" if self.metrics.port else ""

    async def _single_topology(self) -> pb.TopologyResponse:
        return pb.TopologyResponse(
            epoch=1, replication=1, shards=[pb.Shard(shard_id=self.shard_id, address=self.address)]
        )

    async def _start(self) -> int:
        opts = [
            ("grpc.max_receive_message_length", self.limits.max_message_bytes),
            ("grpc.max_send_message_length", self.limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # No BDP probing: it grows every stream's flow-control window toward the link's
            # bandwidth-delay product (tens of MiB on loopback), and gRPC buffers that much of
            # a stream the shard has not read: 11 refused 60 MiB uploads took RSS from 147 to
            # 877 MiB. Without it a stream the shard does not read holds at most its 64 KiB
            # window; one it reads opens the window to the message it waits for (put and get
            # throughput on loopback unchanged: 390-410 and 840-1050 MB/s either way).
            ("grpc.http2.bdp_probe", 0),
        ]
        edge = Edge(self.security.tenants(), self.limits, self.store, self.metrics)
        server = grpc.aio.server(options=opts, interceptors=[edge])
        servicer = KVPoolServicer(
            self.store, self.shard_id, self._topology, self.limits, self.redis
        )
        servicer.metrics = self.metrics
        if self.shared_dir is not None and hasattr(os, "memfd_create"):
            lim = self.limits
            self.arenas = servicer.arenas = Arenas(
                self.shared_dir, self.shard_id, lim.shared_bytes, lim.peer_shared_bytes,
                lim.shared_idle_s, servicer.local, lim.max_keys, self._loop,
            )  # fmt: skip
        artifacts = ArtifactServicer(self.artifacts, _CALLER.get, Refused, self.redis)
        server.add_generic_rpc_handlers((_handlers(servicer), artifact_handlers(artifacts)))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        bind = f"{self.host}:{self.port}"
        if self.security.tls:
            port = server.add_secure_port(bind, self.security.credentials())
        else:
            port = server.add_insecure_port(bind)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if self.health_port is not None:  # its own listener: grpc.health.v1 and nothing else
            health_only = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_only)
            self.health_port = health_only.add_insecure_port(f"{self.host}:{self.health_port}")
            await health_only.start()
            self._health_server = health_only
        return port

    def start(self) -> str:
        if self._metrics_port is not None:
            self.metrics.serve(self.host, self._metrics_port)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        log.info("shard %s serving on %s", self.shard_id, self.address)
        return self.address

    def submit(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if self._health_server is not None:
            asyncio.run_coroutine_threadsafe(self._health_server.stop(0), self._loop).result(5)
            self._health_server = None
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(
                timeout=grace + 5
            )
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self.arenas is not None:
            self.arenas.stop()
            self.arenas = None
