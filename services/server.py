"""The gRPC face of one shard: kvpool.v1.KVPool over a BlockStore.

Where it stands: a shard actor (services/shard.py) runs `ShardServer` in its own thread and
event loop; clients stream blocks to it directly. The servicer only translates between
messages and the store, and maps every refusal to its status code:

    INVALID_ARGUMENT     malformed request: bad key length, missing header, truncated stream,
                         bytes that are not a kvpool block
    FAILED_PRECONDITION  unknown namespace, unsupported format version, block that does not
                         match its namespace
    RESOURCE_EXHAUSTED   block or key list over a limit
    DATA_LOSS            checksum mismatch (on upload, or of a stored block: then it is dropped)

A miss is not an error: Lookup counts present keys, Get answers found = false.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.blockformat import FORMAT_VERSION, BlockHeader, Layout, verify
from kvpool.proto.errors import BlockFormatError, ChecksumError, UnsupportedVersionError
from kvpool.proto.keys import KEY_BYTES, Namespace
from kvpool.proto.messages import namespace_from_proto
from kvpool.services.metrics import ShardMetrics
from kvpool.services.redis_tier import RedisTier
from kvpool.services.security import ServerSecurity, scoped, tenant_of
from kvpool.services.store import BlockStore, BlockTooLargeError

log = logging.getLogger(__name__)
SERVICE_NAME = "kvpool.v1.KVPool"
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_block_bytes: int = 256 << 20
    max_keys: int = 4096  # per Lookup / Delete
    max_message_bytes: int = 4 << 20  # one chunk; gRPC enforces it
    max_namespaces: int = 1024


TopologyFn = Callable[[], Awaitable[pb.TopologyResponse]]
T = TypeVar("T")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
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
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the request does not parse as kvpool.v1")


def _check_key(key: bytes, what: str = "key") -> None:
    if len(key) != KEY_BYTES:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be {KEY_BYTES} bytes, got {len(key)}"
        )


def check_block(header: BlockHeader, ns: Namespace) -> None:
    """A stored block must be of its namespace's shape: refuse anything else."""
    heads = 1 if ns.layout == Layout.LATENT else ns.kv_heads
    want = (ns.layout, ns.dtype, ns.layers, heads, ns.head_dim, ns.block_tokens)
    got = (header.layout, header.dtype, header.layers, header.heads, header.head_dim, header.tokens)
    if want != got:
        raise _Abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "block (layout, dtype, layers, heads, head_dim, tokens) "
            f"{tuple(int(x) for x in got)} does not match its namespace {tuple(int(x) for x in want)}",
        )


class KVPoolServicer(pb_grpc.KVPoolServicer):
    def __init__(
        self, store: BlockStore, shard_id: str, topology: TopologyFn, limits: Limits = Limits(),
        metrics: ShardMetrics | None = None, redis: RedisTier | None = None,
        tokens: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.store, self.shard_id, self.limits, self.metrics = store, shard_id, limits, metrics
        self.redis, self.tokens = redis, tokens
        self._topology = topology
        self._namespaces: dict[bytes, Namespace] = {}

    # -- helpers ----------------------------------------------------------------------------

    def _namespace(self, namespace_id: bytes) -> Namespace:
        ns = self._namespaces.get(namespace_id)
        if ns is None:
            _check_key(namespace_id, "namespace_id")
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"unknown namespace {namespace_id.hex()[:16]}: call RegisterNamespace first",
            )
        return ns

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        """The caller's tenant (None when authentication is off); UNAUTHENTICATED otherwise."""
        if self.tokens is None:
            return None
        tenant = tenant_of(self.tokens, tuple(context.invocation_metadata() or ()))
        if tenant is None:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "a valid tenant token is required")
        return tenant

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self._tenant(context)
        except _Abort as e:
            await context.abort(e.code, e.detail)

    def _check_keys(self, keys: list[bytes]) -> None:
        if len(keys) > self.limits.max_keys:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(keys)} keys in one request; the limit is {self.limits.max_keys}",
            )
        for key in keys:
            _check_key(key)

    # -- RPCs -------------------------------------------------------------------------------

    async def RegisterNamespace(
        self, request: pb.RegisterNamespaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNamespaceResponse:
        async def run() -> pb.RegisterNamespaceResponse:
            _well_formed(request)
            self._tenant(context)
            if not request.HasField("namespace"):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "namespace missing")
            try:
                ns = namespace_from_proto(request.namespace)
            except ValueError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad namespace: {e}") from None
            if ns.format_version != FORMAT_VERSION:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"block format version {ns.format_version}; this shard stores version "
                    f"{FORMAT_VERSION}",
                )
            if ns.id != request.namespace_id:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "namespace_id is not the namespace's digest"
                )
            if (
                ns.id not in self._namespaces
                and len(self._namespaces) >= self.limits.max_namespaces
            ):
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many namespaces")
            self._namespaces[ns.id] = ns
            return pb.RegisterNamespaceResponse()

        return await self._guard("RegisterNamespace", run(), context)

    async def Lookup(
        self, request: pb.LookupRequest, context: grpc.aio.ServicerContext
    ) -> pb.LookupResponse:
        async def run() -> pb.LookupResponse:
            _well_formed(request)
            tenant = self._tenant(context)
            self._namespace(request.namespace_id)
            self._check_keys(list(request.keys))
            keys = [scoped(tenant, k) for k in request.keys]
            n = self.store.leading(request.namespace_id, keys)
            if self.redis is not None and n < len(keys):
                n += await asyncio.to_thread(self.redis.leading, request.namespace_id, keys[n:])
            return pb.LookupResponse(present=n)

        return await self._guard("Lookup", run(), context)

    async def Put(
        self, request_iterator: AsyncIterator[pb.PutRequest], context: grpc.aio.ServicerContext
    ) -> pb.PutResponse:
        async def run() -> pb.PutResponse:
            tenant = self._tenant(context)
            first = await anext(aiter(request_iterator), None)
            if first is None or first is MALFORMED or first.WhichOneof("part") != "info":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a Put stream starts with info")
            info = first.info
            ns = self._namespace(info.namespace_id)
            _check_key(info.key)
            _check_key(info.chain, "chain")
            if info.size > self.limits.max_block_bytes or info.size > self.store.budget_bytes:
                raise _Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"block of {info.size} bytes over the limit of "
                    f"{min(self.limits.max_block_bytes, self.store.budget_bytes)}",
                )
            key, chain = scoped(tenant, info.key), scoped(tenant, info.chain)
            if key in self.store:
                self.store.stats.put_existing += 1
                return pb.PutResponse(stored=False)  # immutable: no work, the rest is not read
            buf = bytearray(info.size)
            filled = 0
            async for msg in request_iterator:
                _well_formed(msg)
                if msg.WhichOneof("part") != "chunk":
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "info sent twice in one Put")
                end = filled + len(msg.chunk)
                if end > info.size:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"more than the announced {info.size} bytes",
                    )
                buf[filled:end] = msg.chunk
                filled = end
            if filled != info.size:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"truncated stream: {filled} of {info.size} bytes",
                )
            try:
                header = verify(buf)
            except ChecksumError as e:
                raise _Abort(grpc.StatusCode.DATA_LOSS, f"upload corrupted: {e}") from None
            except UnsupportedVersionError as e:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            except BlockFormatError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a kvpool block: {e}") from None
            check_block(header, ns)
            try:
                data = bytes(buf)
                stored = self.store.put(info.namespace_id, key, chain, info.position, data)
            except BlockTooLargeError as e:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
            if stored and self.redis is not None and self.redis.mode == "all":
                self.redis.offer(info.namespace_id, key, chain, info.position, data)
            return pb.PutResponse(stored=stored)

        return await self._guard("Put", run(), context)

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GetResponse]:
        t0 = time.perf_counter()
        try:
            data = await self._read(request, self._tenant(context))
        except _Abort as e:
            self.store.stats.rejected += 1
            self._observe("Get", e.code.name, t0)
            await context.abort(e.code, e.detail)
            return
        code = "OK"
        try:
            if data is None:
                yield pb.GetResponse(found=False)
                return
            view = memoryview(data)
            yield pb.GetResponse(found=True, size=len(data), chunk=bytes(view[:CHUNK_BYTES]))
            for off in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
                yield pb.GetResponse(chunk=bytes(view[off : off + CHUNK_BYTES]))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            self._observe("Get", code, t0)

    async def _read(self, request: pb.GetRequest, tenant: str | None) -> bytes | None:
        """The requested block, verified; None on a miss. A corrupt block is dropped."""
        _well_formed(request)
        self._namespace(request.namespace_id)
        _check_key(request.key)
        key = scoped(tenant, request.key)
        data = self.store.get(request.namespace_id, key)
        if data is None:
            return await self._read_through(request.namespace_id, key)
        try:
            verify(data)
        except BlockFormatError as e:
            self.store.drop_corrupt(key)
            log.error(
                "shard %s dropped corrupt block %s: %s", self.shard_id, request.key.hex()[:16], e
            )
            raise _Abort(grpc.StatusCode.DATA_LOSS, f"stored block corrupted: {e}") from None
        return data

    async def _read_through(self, namespace_id: bytes, key: bytes) -> bytes | None:
        """A memory miss read from the Redis tier, verified and put back into memory."""
        if self.redis is None:
            return None
        found = await asyncio.to_thread(self.redis.get, namespace_id, key)
        if found is None:
            self.store.stats.redis_misses += 1
            return None
        chain, position, data = found
        try:
            verify(data)
        except BlockFormatError as e:
            self.store.stats.checksum_failures += 1
            log.error("shard %s: corrupt block in Redis %s: %s", self.shard_id, key.hex()[:16], e)
            return None
        self.store.stats.redis_hits += 1
        with contextlib.suppress(BlockTooLargeError):
            self.store.put(namespace_id, key, chain, position, data)
        return data

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        async def run() -> pb.DeleteResponse:
            _well_formed(request)
            tenant = self._tenant(context)
            self._namespace(request.namespace_id)
            self._check_keys(list(request.keys))
            keys = [scoped(tenant, k) for k in request.keys]
            deleted = self.store.delete(request.namespace_id, keys)
            if self.redis is not None:
                deleted |= await asyncio.to_thread(self.redis.delete, request.namespace_id, keys)
            return pb.DeleteResponse(deleted=len(deleted))

        return await self._guard("Delete", run(), context)

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        await self._authorize(context)
        s = self.store.stats
        return pb.StatsResponse(
            shard_id=self.shard_id, blocks=s.blocks, bytes=s.bytes, budget_bytes=s.budget_bytes,
            hits=s.hits, misses=s.misses, puts=s.puts, put_existing=s.put_existing,
            evictions=s.evictions, checksum_failures=s.checksum_failures, rejected=s.rejected,
        )  # fmt: skip

    async def Topology(
        self, request: pb.TopologyRequest, context: grpc.aio.ServicerContext
    ) -> pb.TopologyResponse:
        await self._authorize(context)
        try:
            return await self._topology()
        except Exception as e:  # the control plane is briefly away (e.g. restarting)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"topology unavailable: {e}")
            raise

    async def _guard(self, method: str, call: Awaitable[T], context: grpc.aio.ServicerContext) -> T:
        t0 = time.perf_counter()
        code = "OK"
        try:
            return await call
        except _Abort as e:
            code = e.code.name
            self.store.stats.rejected += 1
            await context.abort(e.code, e.detail)
            raise  # not reached: abort raises
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            self._observe(method, code, t0)

    def _observe(self, method: str, code: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(method, code, time.perf_counter() - t0)


def _handlers(s: KVPoolServicer) -> grpc.GenericRpcHandler:
    """kvpool.v1.KVPool's handlers, with request parsing that cannot fail (see `_parse`)."""
    u, us, su = (
        grpc.unary_unary_rpc_method_handler,
        grpc.unary_stream_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
    )
    handlers = {
        "RegisterNamespace": u(s.RegisterNamespace, _parse(pb.RegisterNamespaceRequest), pb.RegisterNamespaceResponse.SerializeToString),
        "Lookup": u(s.Lookup, _parse(pb.LookupRequest), pb.LookupResponse.SerializeToString),
        "Put": su(s.Put, _parse(pb.PutRequest), pb.PutResponse.SerializeToString),
        "Get": us(s.Get, _parse(pb.GetRequest), pb.GetResponse.SerializeToString),
        "Delete": u(s.Delete, _parse(pb.DeleteRequest), pb.DeleteResponse.SerializeToString),
        "Stats": u(s.Stats, _parse(pb.StatsRequest), pb.StatsResponse.SerializeToString),
        "Topology": u(s.Topology, _parse(pb.TopologyRequest), pb.TopologyResponse.SerializeToString),
    }  # fmt: skip
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


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
    ) -> None:
        """health_port: also serve grpc.health.v1 alone, in plaintext, on this port (0: any free
        port), for probes that cannot speak TLS (Kubernetes gRPC probes); None: no such port."""
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
        ]
        server = grpc.aio.server(options=opts)
        servicer = KVPoolServicer(
            self.store, self.shard_id, self._topology, self.limits, self.metrics, self.redis,
            self.security.tenants(),
        )  # fmt: skip
        server.add_generic_rpc_handlers((_handlers(servicer),))
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
