"""The client's gRPC layer: route block keys to shards and move bytes (no tensors here).

Where it stands: between the KVPool client (client.py, which hashes and encodes) and the
shards. It fetches the tier's topology from any known address, places keys on a consistent-
hash ring, keeps one channel per shard (closing those of shards that left or moved), bounds
the transfers in flight, and puts a deadline on every call. Errors surface as TierError with
the gRPC status name; the KVPool client turns them into misses and dropped saves. A shard's
failure that a call absorbs (a lookup that counts its keys as absent, a get that falls back to
a replica) is reported to `on_failure`, so nothing is swallowed uncounted. Retries go by status
code only: UNAVAILABLE sends a call once more to the shard's new address, if it moved.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import mmap
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.blockformat import parse_header
from kvpool.proto.errors import BlockFormatError, TierError
from kvpool.proto.keys import Namespace
from kvpool.proto.messages import (
    BRANCHED,
    EXTENDS,
    REPLY_HEAD,
    REQUEST_HEAD,
    SESSION_BYTES,
    SHARED_BATCH_BYTES,
    TICKET_BYTES,
    namespace_to_proto,
    pack,
)
from kvpool.ring import Placement, Ring

log = logging.getLogger(__name__)
T = TypeVar("T")
Got = tuple[bytes | None, int, bool]  # a block read (or None), its replicas, branched
M = TypeVar("M", bound=Message)
_STATUS = {code.value[0]: code.name for code in grpc.StatusCode}
_MAX_REPLY = 1 << 16  # the answers on the same-host socket are small messages
# what a same-host socket request fails with when the socket itself is unusable: use gRPC / TCP
_SOCKET_ERRORS = (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError, DecodeError)


class BlockPut(NamedTuple):
    """One block of a `TierClient.put_many`: as the arguments of `put`."""

    key: bytes
    chain: bytes
    position: int
    data: bytes
    parent: bytes = b""  # the key at position - 1; b"" at position 0 (see put_many's prefix)


@dataclass(frozen=True)
class ClientConfig:
    timeout_s: float = 10.0  # deadline of every RPC
    call_timeout_s: float = 30.0  # deadline of a whole lookup, put or get (then a miss / drop)
    max_inflight: int = 16  # block transfers in flight per client
    chunk_bytes: int = 1 << 20
    topology_ttl_s: float = 10.0  # refresh the topology at least this often
    max_lookup_keys: int = 4096
    tls_ca_file: str | None = None  # set: TLS, trusting this CA
    tls_cert_file: str | None = None  # with tls_key_file: a client certificate (mutual TLS)
    tls_key_file: str | None = None
    tls_server_name: str | None = None  # when the certificate names another host
    token: str | None = None  # the tenant's token (needs TLS)
    same_host: bool = True  # fetch through a shard's shared-memory arena when it is on this host
    shared_slots: int = 4  # blocks in flight through one shard's arena
    shared_slot_bytes: int = 8 << 20  # the largest block the arena takes (larger ones: TCP)
    hot_keys: int = 4096  # hot blocks remembered (their reads are spread over replicas)
    max_hot_replicas: int = 32  # the most shards one hot block's reads are spread over
    batch_bytes: int = 64 << 20  # at most this many block bytes per BatchPut (and one block)
    touch_delay_s: float = 0.02  # the most a probed block's touch waits for a request to ride in
    seen_keys: int = 1 << 16  # keys remembered as stored or read here (where probes start)

    def __post_init__(self) -> None:
        if self.token and not self.tls_ca_file:
            raise ValueError("a token is only sent over TLS: set tls_ca_file")


class TierClient:
    """Async, bytes-level access to a tier; create it inside the event loop that uses it."""

    def __init__(
        self, endpoints: str | Sequence[str], config: ClientConfig = ClientConfig(),
        on_failure: Callable[[str, TierError], None] | None = None,
    ) -> None:  # fmt: skip
        """on_failure(operation, error): told of each shard failure a call absorbed."""
        seeds = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
        self.seeds = [s.strip() for s in seeds if s.strip()]
        if not self.seeds:
            raise ValueError("at least one tier endpoint (host:port) is needed")
        self.config = config
        self.replication = 1
        self.epoch = -1
        self._addresses: dict[str, str] = {}  # shard id -> host:port
        self._place = Placement(Ring([]), 1, config.hot_keys)  # where keys live, remembered
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._on_failure = on_failure
        self._refreshed_at = 0.0
        self._refresh_lock = asyncio.Lock()
        self._inflight = asyncio.Semaphore(config.max_inflight)
        self._shared: dict[str, _Shared | float] = {}  # address -> arena, or when to try again
        self._shared_lock = asyncio.Lock()
        self._hot: collections.OrderedDict[bytes, list[int]] = collections.OrderedDict()
        # blocks probed and used, not yet touched: shard id -> (namespace id, keys, those of
        # them to mark branched)
        self._touches: dict[str, tuple[bytes, list[bytes], list[bytes]]] = {}
        # the last block a read (a probe or a get) found before a prefix's first miss ->
        # (whether its shard said it branched, that shard): what put_many's hints say of the
        # blocks put after it
        self._forks: collections.OrderedDict[bytes, tuple[bool, str]] = collections.OrderedDict()
        self._touch_timer: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    # -- topology and channels -------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.KVPoolStub:
        """A stub on the channel to `address`. A channel that failed to connect fails every
        call until its reconnect backoff (a second or more, growing) runs out, even once the
        shard is back (Ray restarts a shard on its own port): such a channel is replaced by a
        fresh one, which connects at once."""
        channel = self._channels.get(address)
        if (
            channel is not None
            and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ):
            self._drop_channel(address)
            channel = None
        if channel is None:
            opts: list[tuple[str, object]] = [
                ("grpc.max_receive_message_length", 8 << 20),
                ("grpc.max_send_message_length", 8 << 20),
                # its own subchannels: a fresh channel must not inherit another's backoff
                ("grpc.use_local_subchannel_pool", 1),
            ]
            c = self.config
            if c.tls_ca_file:
                creds = channel_credentials(c.tls_ca_file, c.tls_cert_file, c.tls_key_file, c.token)
                if c.tls_server_name:
                    opts.append(("grpc.ssl_target_name_override", c.tls_server_name))
                channel = grpc.aio.secure_channel(address, creds, options=opts)
            else:
                channel = grpc.aio.insecure_channel(address, options=opts)
            self._channels[address] = channel
        return pb_grpc.KVPoolStub(channel)

    async def refresh(self, force: bool = False) -> None:
        """Fetch the topology from the first shard (known or seed) that answers."""
        async with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed_at < self.config.topology_ttl_s:
                return
            candidates = list(dict.fromkeys([*self._addresses.values(), *self.seeds]))
            errors = []
            for address in candidates:
                try:
                    topo = await self._stub(address).Topology(
                        pb.TopologyRequest(), timeout=self.config.timeout_s
                    )
                except grpc.aio.AioRpcError as e:
                    errors.append(f"{address}: {e.code().name}")
                    continue
                self._apply(topo)
                return
            self._refreshed_at = time.monotonic()  # do not hammer a tier that is down
            raise TierError(
                f"no shard answered for the topology ({'; '.join(errors)})", "UNAVAILABLE"
            )

    def _apply(self, topo: pb.TopologyResponse) -> None:
        self._refreshed_at = time.monotonic()
        if topo.epoch == self.epoch:
            return
        addresses = {s.shard_id: s.address for s in topo.shards}
        if addresses != self._addresses:
            self._addresses = addresses
            keep = {*addresses.values(), *self.seeds}
            for address in [a for a in self._shared if a not in keep]:
                shared = self._shared.pop(address)  # its shard left or moved: so did the arena
                if isinstance(shared, _Shared):
                    shared.close()
            for address in [a for a in self._channels if a not in keep]:
                self._drop_channel(address)
        self.replication = max(1, topo.replication)
        self.epoch = topo.epoch
        self._place.reset(Ring(list(self._addresses)), self.replication)

    def _drop_channel(self, address: str) -> None:
        """Forget the channel to `address`; it closes in the background (in-flight calls finish)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            task = asyncio.ensure_future(channel.close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _ensure_topology(self) -> None:
        if (
            time.monotonic() - self._refreshed_at >= self.config.topology_ttl_s
            or not self._addresses
        ):
            await self.refresh()
        if not self._addresses:
            raise TierError("the tier has no shards", "UNAVAILABLE")

    def owners(self, key: bytes) -> list[str]:
        return list(self._owners_of(key))

    def _owners_of(self, key: bytes) -> tuple[str, ...]:
        """`owners(key)`, remembered (a request asks for a key's owners several times): by its
        run, or by its own bytes in a run a shard called hot (`kvpool.ring.Placement`)."""
        return self._place.owners(key)

    async def _call(self, shard_id: str, rpc: Callable[[pb_grpc.KVPoolStub], Awaitable[T]]) -> T:
        """Run one RPC against a shard and map failures to TierError. UNAVAILABLE: once more,
        where the topology now places the shard: elsewhere (Ray restarted it on a new port) or
        where it was (restarted on its own port; see `_stub` for the channel)."""
        address = self._addresses.get(shard_id)
        if address is None:  # it left the topology while this call waited
            raise TierError(f"{shard_id} is no longer in the tier", "UNAVAILABLE")
        for attempt in (0, 1):
            try:
                return await rpc(self._stub(address))
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt == 0:
                    moved = await self._moved(shard_id, address)
                    if moved is not None or self._addresses.get(shard_id) == address:
                        address = moved or address
                        continue
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._refreshed_at = 0.0  # look again at the topology on the next call
                raise TierError(
                    f"{shard_id} ({address}): {code.name}: {e.details()}", code.name
                ) from None
        raise AssertionError("unreachable")

    def _absorbed(self, operation: str, error: TierError) -> None:
        if self._on_failure is not None:
            self._on_failure(operation, error)  # counts and logs it
        else:
            log.warning("%s: %s", operation, error)

    async def _moved(self, shard_id: str, address: str) -> str | None:
        """The shard's new address if the topology now places it elsewhere, else None."""
        try:
            await self.refresh(force=True)
        except TierError:
            return None
        new = self._addresses.get(shard_id)
        return new if new is not None and new != address else None

    # -- data calls ------------------------------------------------------------------------

    async def lookup(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """How many leading keys are present on the tier (on any of their owners, or of their
        replicas for hot keys). A shard
        that cannot be reached counts as holding none of its keys (reported to on_failure);
        raises TierError when no shard answered."""
        if len(keys) > self.config.max_lookup_keys:
            raise ValueError(f"at most {self.config.max_lookup_keys} keys per lookup")
        if not keys:
            return 0
        await self._ensure_topology()
        # (shard, -1 or the key asked alone): a hot block's replica, or any shard of a hot run
        # (its blocks may not have moved yet), is asked for that key alone, so that a block it
        # lacks hides no other (a shard counts the leading keys it holds)
        per_shard: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(keys):
            owners = self._owners_of(key)
            hot_run = self._place.is_hot(key)
            for sid in self._holders(key):
                per_shard.setdefault((sid, i if hot_run or sid not in owners else -1), []).append(i)

        async def ask(sid: str, idx: list[int]) -> tuple[list[int], int | TierError]:
            req = pb.LookupRequest(namespace_id=ns.id, keys=[keys[i] for i in idx])
            shared = await self._arena(sid)
            if shared is not None:  # the same-host socket; gRPC if it fails
                try:
                    reply = await self._local(shared, b"L", req, pb.LookupResponse)
                    if reply.present > len(idx):
                        raise ValueError(f"shard counted {reply.present} of {len(idx)} keys")
                    return idx, reply.present
                except _SOCKET_ERRORS:
                    pass
                except TierError as e:
                    return idx, e
            try:
                reply = await self._call(
                    sid, lambda s: s.Lookup(req, timeout=self.config.timeout_s)
                )
            except TierError as e:
                return idx, e
            return idx, reply.present

        replies = await asyncio.gather(*(ask(s, idx) for (s, _), idx in per_shard.items()))
        errors = [n for _, n in replies if isinstance(n, TierError)]
        if len(errors) == len(replies):
            raise errors[0]
        for e in errors:
            self._absorbed("lookup", e)
        present = [False] * len(keys)
        for idx, n in replies:
            for i in idx[: 0 if isinstance(n, TierError) else n]:
                present[i] = True
        return present.index(False) if False in present else len(keys)

    async def put(
        self, ns: Namespace, key: bytes, chain: bytes, position: int, data: bytes,
        parent: bytes = b"",
    ) -> bool:  # fmt: skip
        """Store one block on each of its owners; True if any owner newly stored it. `parent`:
        the key of the block at position - 1 (b"" at position 0), told to the owners that own
        it too (see put_many). Raises TierError when no owner took it."""
        await self._ensure_topology()
        nsp = namespace_to_proto(ns)
        step = self.config.chunk_bytes

        async def messages(info: pb.BlockInfo) -> AsyncIterator[pb.PutRequest]:
            yield pb.PutRequest(info=info)
            view = memoryview(data)
            for off in range(0, len(data), step):
                yield pb.PutRequest(chunk=bytes(view[off : off + step]))

        async def put_one(sid: str) -> bool | TierError:
            info = pb.BlockInfo(
                namespace_id=ns.id, key=key, chain=chain, position=position, size=len(data),
                namespace=nsp, parent=self._here(parent, sid),
            )  # fmt: skip
            try:
                shared = await self._arena(sid)
                if shared is not None and len(data) <= shared.slot_bytes:
                    async with shared.slot() as offset:  # the block written there, then taken
                        request = pb.PutSharedRequest(info=info, offset=offset)
                        with contextlib.suppress(*_SOCKET_ERRORS):  # else TCP
                            shared.view[offset : offset + len(data)] = data  # closed: ValueError
                            return (await self._local(shared, b"P", request, pb.PutResponse)).stored
                reply = await self._call(
                    sid, lambda s: s.Put(messages(info), timeout=self.config.timeout_s)
                )
            except TierError as e:
                return e
            return reply.stored

        async with self._inflight:
            results = await asyncio.gather(*(put_one(sid) for sid in self._owners_of(key)))
        errors = [r for r in results if isinstance(r, TierError)]
        if len(errors) == len(results):
            raise errors[0]
        for e in errors:
            self._absorbed("put", e)
        return any(r is True for r in results)

    async def get(self, ns: Namespace, key: bytes) -> bytes | None:
        """The block's bytes from the first owner that has it; None on a miss. Raises TierError
        when no owner answered."""
        async with self.view(ns, key) as data:
            return None if data is None else bytes(data)

    @contextlib.asynccontextmanager
    async def view(self, ns: Namespace, key: bytes) -> AsyncIterator[bytes | memoryview | None]:
        """`get` without the copy out of a same-host arena: the block's bytes as a read-only
        view of this client's arena slot, valid only inside the `async with` (the slot is
        held until then; bytes when it came over TCP). A compromised shard could rewrite a
        slot while it is read: readers that verify a MAC must copy first (`get`)."""
        await self._ensure_topology()
        errors: list[TierError] = []
        asked = (*self._owners_of(key), *self._place.fallback(key))
        async with self._inflight:
            for sid in asked:
                async with contextlib.AsyncExitStack() as stack:
                    try:
                        found = await stack.enter_async_context(self._fetch_any(sid, ns, key))
                    except TierError as error:
                        errors.append(error)
                        continue
                    if found is not None:
                        for absorbed in errors:
                            self._absorbed("get", absorbed)
                        yield found  # outside the try: the caller's errors are its own
                        return
        if errors and len(errors) == len(asked):
            raise errors[0]
        for absorbed in errors:
            self._absorbed("get", absorbed)
        yield None

    @contextlib.asynccontextmanager
    async def _fetch_any(
        self, sid: str, ns: Namespace, key: bytes
    ) -> AsyncIterator[bytes | memoryview | None]:
        """One owner's copy of a block: through its arena when it is on this host, else TCP."""
        shared = await self._arena(sid)
        if shared is not None:
            async with shared.slot() as offset:
                served, view = await self._fetch_shared(shared, ns, key, offset)
                if served:
                    try:
                        yield view
                    finally:
                        if view is not None:
                            with contextlib.suppress(BufferError):  # a reader still holds it
                                view.release()
                    return
        yield await self._call(sid, lambda s: self._fetch(s, ns, key))

    async def _fetch_shared(
        self, shared: _Shared, ns: Namespace, key: bytes, offset: int
    ) -> tuple[bool, memoryview | None]:
        """Have the shard copy the block into the slot at `offset`: (True, a read-only view of
        it), (True, None) on a miss, (False, None) when the arena cannot serve it (unusable, or
        the block is larger than a slot): then TCP."""
        request = pb.GetSharedRequest(namespace_id=ns.id, key=key, offset=offset,
                                      capacity=shared.slot_bytes)  # fmt: skip
        try:
            reply = await self._local(shared, b"G", request, pb.GetSharedResponse)
            if not reply.found:
                return True, None
            if not reply.fits:
                return False, None
            if reply.size > shared.slot_bytes:
                raise TierError("shard wrote past its slot", "DATA_LOSS")
            return True, memoryview(shared.view)[offset : offset + reply.size].toreadonly()
        except _SOCKET_ERRORS:  # ValueError too: the arena was dropped meanwhile
            return False, None

    async def _arena(self, sid: str) -> _Shared | None:
        """The shard's arena for this client, opened on first use; None when the shard has no
        same-host path reachable from here (then asked again after a minute)."""
        if not self.config.same_host:
            return None
        address = self._addresses.get(sid)
        if address is None:
            return None
        known = self._shared.get(address)
        if isinstance(known, _Shared) or (known is not None and time.monotonic() < known):
            return known if isinstance(known, _Shared) else None
        async with self._shared_lock:
            known = self._shared.get(address)
            if isinstance(known, _Shared):
                return known
            c = self.config
            request = pb.OpenSharedRequest(size=c.shared_slots * c.shared_slot_bytes)
            try:
                reply = await self._call(
                    sid, lambda s: s.OpenShared(request, timeout=self.config.timeout_s)
                )
            except TierError as e:
                self._no_arena(address, e)
                return None
            try:
                shared = await asyncio.to_thread(_Shared.attach, address, reply, c)
                await shared.connect()
            except (OSError, ValueError) as e:
                close = pb.CloseSharedRequest(session=reply.session)
                with contextlib.suppress(TierError):
                    await self._call(sid, lambda s: s.CloseShared(close, timeout=c.timeout_s))
                self._no_arena(address, e)
                return None
            self._shared[address] = shared
            return shared

    def _no_arena(self, address: str, reason: Exception) -> None:
        log.info("no same-host path to %s (%s): TCP", address, reason)
        self._shared[address] = time.monotonic() + 60.0  # ask again in a minute

    async def _local(self, shared: _Shared, op: bytes, request: Message, reply: type[M]) -> M:
        """One request on a shard's same-host socket, within the call timeout. Raises one of
        _SOCKET_ERRORS when the socket is unusable (the arena is then dropped: the caller goes
        over gRPC or TCP, and a new arena is opened on a later call; also when the shard says
        the session is over), TierError when the shard refused the request."""
        try:
            async with asyncio.timeout(self.config.timeout_s):  # no task, unlike wait_for
                status, body = await shared.request(op, request.SerializeToString())
            if status == 0:
                return reply.FromString(body)
        except _SOCKET_ERRORS as e:
            log.info("same-host request on %s failed (%s): gRPC", shared.address, e)
            self._drop_arena(shared)
            raise
        code, detail = _STATUS.get(status, "UNKNOWN"), body.decode(errors="replace")
        if code == "FAILED_PRECONDITION":  # the shard closed the session (idle, restarted)
            self._drop_arena(shared)
            raise ConnectionResetError(f"{shared.address}: {detail}")
        raise TierError(f"{shared.address}: {code}: {detail}", code)

    def _drop_arena(self, shared: _Shared) -> None:
        if self._shared.get(shared.address) is shared:
            del self._shared[shared.address]
        shared.close()

    async def _fetch(self, stub: pb_grpc.KVPoolStub, ns: Namespace, key: bytes) -> bytes | None:
        call = stub.Get(pb.GetRequest(namespace_id=ns.id, key=key), timeout=self.config.timeout_s)
        size: int | None = None
        chunks: list[bytes] = []
        received = 0
        async for msg in call:
            if size is None:
                if not msg.found:
                    return None
                size = msg.size
            chunks.append(msg.chunk)
            received += len(msg.chunk)
            if received > size:
                raise TierError(f"shard sent more than the announced {size} bytes", "DATA_LOSS")
        if size is None or received != size:
            raise TierError("truncated block stream", "DATA_LOSS")
        return b"".join(chunks)  # the one copy of the block on this side

    # -- batches ---------------------------------------------------------------------------

    async def get_many(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes | None]:
        """The blocks of `keys` (None for each miss), one BatchGet per shard at a time, all
        shards at once; a key missing on its owner is asked of the next owner (replicas). A
        shard that fails turns its keys into misses (reported to on_failure); raises TierError
        when no shard answered.

        Hot blocks (a shard said so in its reply): their reads rotate over the first
        `replicas` owners on the ring; one that misses is filled from the owner that had the
        block (read repair), so replicas fill as they are read."""
        return (await self._get_many(ns, keys))[0]

    async def _get_many(
        self, ns: Namespace, keys: Sequence[bytes]
    ) -> tuple[list[bytes | None], list[tuple[bool, str] | None]]:
        """`get_many`, and for each block found, whether the shard that had it said it
        branched, and that shard."""
        found: list[bytes | None] = [None] * len(keys)
        forks: list[tuple[bool, str] | None] = [None] * len(keys)
        if not keys:
            return found, forks
        await self._ensure_topology()
        orders = [self._read_order(key) for key in keys]
        pending = list(range(len(keys)))
        errors: list[TierError] = []
        answered = False
        missed: dict[int, str] = {}  # key index -> the hot replica that did not have it
        for turn in range(max(len(o) for o in orders)):
            per_shard: dict[str, list[int]] = {}
            for i in pending:
                if turn < len(orders[i]):
                    per_shard.setdefault(orders[i][turn], []).append(i)
            batches = [(sid, idx[j : j + self.config.max_lookup_keys])
                       for sid, idx in per_shard.items()
                       for j in range(0, len(idx), self.config.max_lookup_keys)]  # fmt: skip

            async def ask(sid: str, idx: list[int]) -> list[Got] | TierError:
                async with self._inflight:
                    try:
                        return await self._get_batch(sid, ns, [keys[i] for i in idx])
                    except TierError as e:
                        return e

            replies = await asyncio.gather(*(ask(sid, idx) for sid, idx in batches))
            for (sid, idx), reply in zip(batches, replies, strict=True):
                if isinstance(reply, TierError):
                    errors.append(reply)
                    continue
                answered = True
                for i, (data, replicas, fork) in zip(idx, reply, strict=True):
                    found[i] = data
                    forks[i] = (fork, sid)
                    self._note_hot(keys[i], replicas, primary=sid == self._owners_of(keys[i])[0])
                    if data is None and turn == 0 and self._repairs(keys[i], sid):
                        missed[i] = sid
            pending = [i for i in pending if found[i] is None]
            if not pending:
                break
        if errors and not answered:
            raise errors[0]
        for e in errors:
            self._absorbed("get", e)
        await self._repair(ns, keys, found, {i: s for i, s in missed.items() if found[i]})
        return found, forks

    def _holders(self, key: bytes) -> Sequence[str]:
        """The shards that may hold `key`: its owners, and its replicas when it is hot (its
        reads went there, so its owners may have let it go), and in a hot run its run's
        owners (`Placement.fallback`). A replica is asked apart from the keys it owns: one it
        has not filled yet must not hide those."""
        hot = self._hot.get(key)
        where = self._owners_of(key)
        if hot is not None:
            where = self._ranked(key)[: max(hot[0], self.replication)]
        fallback = self._place.fallback(key)
        return (*where, *(s for s in fallback if s not in where)) if fallback else where

    def _repairs(self, key: bytes, sid: str) -> bool:
        """Whether a first-turn miss of `key` on `sid` is filled once the block is found
        elsewhere: a hot replica's, or any in a hot run (its blocks move to their own owners
        as they are read)."""
        return sid not in self._owners_of(key) or self._place.is_hot(key)

    def _read_order(self, key: bytes) -> Sequence[str]:
        """The shards to read `key` from, in turn: its owners; for a hot key first the next of
        its first `replicas` owners in rotation, then its owners."""
        owners = self._owners_of(key)
        hot = self._hot.get(key)
        fallback = self._place.fallback(key)
        if hot is None:
            return (*owners, *fallback) if fallback else owners
        replicas, turn = hot
        hot[1] = turn + 1
        spread = self._ranked(key)[: max(replicas, len(owners))]
        first = spread[turn % min(replicas, len(spread))]
        rest = (sid for sid in (*owners, *fallback) if sid != first)
        return [first, *rest]

    def _ranked(self, key: bytes) -> tuple[str, ...]:
        """Every shard, in the order the ring ranks them for a hot `key` (remembered for the
        current ring, as many keys as are remembered hot)."""
        return self._place.ranked(key, self.config.hot_keys)

    def _note_hot(self, key: bytes, replicas: int, primary: bool) -> None:
        """Remember what a shard said of `key`: hot, with how many replicas (bounded by
        ClientConfig.max_hot_replicas and the shards there are); not hot any more, when its
        primary owner says so (a replica sees only its share of the reads)."""
        replicas = min(replicas, self.config.max_hot_replicas, len(self._addresses))
        hot = self._hot.get(key)
        if replicas <= 1:
            if primary and hot is not None:
                del self._hot[key]
            return
        if hot is None:
            self._place.mark_hot(key)  # its run: placed by each key's own bytes from now on
            self._hot[key] = [replicas, 0]
            if len(self._hot) > self.config.hot_keys:
                self._hot.popitem(last=False)
        else:
            hot[0] = max(hot[0], replicas)
            self._hot.move_to_end(key)

    async def _repair(
        self, ns: Namespace, keys: Sequence[bytes], found: list[bytes | None],
        missed: dict[int, str],
    ) -> None:  # fmt: skip
        """Put each block a hot replica missed to that replica (best effort), with its place
        in its prefix: the position its header gives, the parent and chain the keys beside it
        in `keys` give (blocks whose parent is not among them are left alone)."""
        per_shard: dict[str, list[int]] = {}
        infos: dict[int, pb.BlockInfo] = {}
        nsp = namespace_to_proto(ns)
        for i, sid in missed.items():
            data = found[i]
            assert data is not None
            try:
                header = parse_header(data)
            except BlockFormatError:
                continue
            position = header.start_position // max(1, header.tokens)
            if position and not (i >= position and found[i - 1] is not None):
                continue
            infos[i] = pb.BlockInfo(
                namespace_id=ns.id, key=keys[i], chain=keys[i - position] if position else keys[i],
                position=position, size=len(data), namespace=nsp,
                parent=self._here(keys[i - 1], sid) if position else b"",
            )  # fmt: skip
            per_shard.setdefault(sid, []).append(i)

        async def fill(sid: str, idx: list[int]) -> None:
            async with self._inflight:
                try:
                    await self._put_batch(sid, [infos[i] for i in idx],
                                          [found[i] or b"" for i in idx])  # fmt: skip
                except TierError as e:
                    self._absorbed("put", e)

        await asyncio.gather(*(fill(sid, idx) for sid, idx in per_shard.items()))

    async def _get_batch(self, sid: str, ns: Namespace, keys: list[bytes]) -> list[Got]:
        """One shard's blocks of `keys`, replica hints and branch flags: through its arena
        when it is on this host (the blocks that did not fit in a slot, and all of them if the
        socket fails, then over gRPC)."""
        found: list[Got] = [(None, 0, False)] * len(keys)
        rest = list(range(len(keys)))
        shared = await self._arena(sid)
        if shared is not None:
            with contextlib.suppress(*_SOCKET_ERRORS):
                async with shared.slot() as offset:
                    request = pb.BatchGetSharedRequest(namespace_id=ns.id, keys=keys,
                                                       offset=offset, capacity=shared.slot_bytes)  # fmt: skip
                    reply = await self._local(shared, b"g", request, pb.BatchGetSharedResponse)
                    rest = _copy_out(reply, shared.view, offset, shared.slot_bytes, found)
        if rest:
            req = pb.BatchGetRequest(namespace_id=ns.id, keys=[keys[i] for i in rest])
            got = await self._call(sid, lambda s: self._fetch_many(s, req))
            for i, item in zip(rest, got, strict=True):
                found[i] = item
        return found

    async def _fetch_many(self, stub: pb_grpc.KVPoolStub, request: pb.BatchGetRequest) -> list[Got]:
        """One BatchGet's blocks, replica hints and branch flags, checked against what the
        shard announced."""
        call = stub.BatchGet(request, timeout=self.config.timeout_s)
        want = len(request.keys)
        found: list[bytes | None] = []
        hints: list[int] = []
        forks: list[bool] = []
        arriving: collections.deque[tuple[int, int]] = collections.deque()  # (index, size)
        part = bytearray()  # the block that runs over several messages
        async for msg in call:
            for head in msg.blocks:
                if len(found) == want:
                    raise TierError("shard answered more blocks than asked", "DATA_LOSS")
                found.append(b"" if head.found else None)
                hints.append(head.replicas)
                forks.append(head.found and head.branched)
                if head.found and head.size:
                    arriving.append((len(found) - 1, head.size))
            data = memoryview(msg.data)
            while data:
                if not arriving:
                    raise TierError("shard sent bytes beyond its blocks", "DATA_LOSS")
                i, size = arriving[0]
                take = data[: size - len(part)]
                data = data[len(take) :]
                if not part and len(take) == size:  # the whole block in this message
                    found[i] = msg.data if size == len(msg.data) else bytes(take)
                else:
                    part += take
                    if len(part) < size:
                        continue
                    found[i], part = bytes(part), bytearray()
                arriving.popleft()
        if len(found) != want or arriving:
            raise TierError("truncated batch stream", "DATA_LOSS")
        return list(zip(found, hints, forks, strict=True))

    async def get_prefix(self, ns: Namespace, keys: Sequence[bytes]) -> list[bytes]:
        """The blocks of the longest leading run of `keys` the tier holds: `lookup` and
        `get_many` of that run in one round of requests, one probe per shard (ProbeShared, on
        the same-host socket), each answering which of its keys it holds and copying the
        leading run of them into this client's arena, touching nothing. Only the blocks
        returned are then touched (recency, hits, bytes served, hot counts), riding in this
        client's next request to their shard or sent after `touch_delay_s`: a gap on one shard
        never makes another count a read nobody used.

        Each key is asked of one shard: its primary owner, or for a hot key the next replica
        in rotation (`get_many`); a key not found there is asked of its next owner while it
        is the first one missing. A shard that fails counts as holding none of its keys
        (reported to on_failure); raises TierError when no shard answered. Without the
        same-host path to every shard asked: `lookup`, then `get_many`."""
        if len(keys) > self.config.max_lookup_keys:
            raise ValueError(f"at most {self.config.max_lookup_keys} keys per lookup")
        if not keys:
            return []
        await self._ensure_topology()
        orders = [self._read_order(key) for key in keys]
        arenas: dict[str, _Shared | None] = {}
        for sid in dict.fromkeys(o[0] for o in orders):
            arenas[sid] = await self._arena(sid)
        if None not in arenas.values():
            with contextlib.suppress(*_SOCKET_ERRORS):
                return await self._probed(ns, keys, orders)
        n = await self.lookup(ns, keys)
        got, forks = await self._get_many(ns, keys[:n])
        n = next((i for i, b in enumerate(got) if b is None), len(got))
        if 0 < n < len(keys) and (fork := forks[n - 1]) is not None:
            self._fork(keys[n - 1], fork)
        return [b for b in got[:n] if b is not None]

    def _fork(self, key: bytes, fork: tuple[bool, str]) -> None:
        """Remember what the shard holding `key`, the last block a read found before a prefix's
        first miss, said of it (branched, that shard): the hints of the blocks put after it."""
        self._forks[key] = fork
        self._forks.move_to_end(key)
        while len(self._forks) > self.config.max_lookup_keys:
            self._forks.popitem(last=False)

    async def _probed(
        self, ns: Namespace, keys: Sequence[bytes], orders: list[Sequence[str]]
    ) -> list[bytes]:
        """`get_prefix` by probes; one of _SOCKET_ERRORS when a shard's socket failed. First the
        keys up to the first one this client has not stored or read lately (where the prefix
        likely ends), then, only if all of those are held, the rest: a prefix that ends early
        costs the probes of its own shards, not of every shard its keys map to."""
        data: list[bytes | None] = [None] * len(keys)
        present = [False] * len(keys)  # held where asked, not copied (a slot too small, Redis)
        holder: list[str] = [o[0] for o in orders]
        forks = [False] * len(keys)  # whether the shard that found the block says it branched
        probed: set[int] = set()  # the blocks copied by a probe: touched if used
        missed: dict[int, str] = {}  # key index -> the hot replica that did not have it
        errors: list[TierError] = []
        answered = False

        def leading() -> int:
            return next((i for i in range(len(keys)) if data[i] is None and not present[i]),
                        len(keys))  # fmt: skip

        seen = next((i for i, k in enumerate(keys) if k not in self._seen), len(keys))
        start, end = 0, min(len(keys), seen + 1)
        while True:
            pending = list(range(start, end))
            for turn in range(max(len(orders[i]) for i in pending)):
                per_shard: dict[str, list[int]] = {}
                for i in pending:
                    per_shard.setdefault(orders[i][turn], []).append(i)
                replies = await asyncio.gather(*(
                    self._probe(sid, ns, [keys[i] for i in idx]) for sid, idx in per_shard.items()
                ))  # fmt: skip
                for (sid, idx), reply in zip(per_shard.items(), replies, strict=True):
                    if isinstance(reply, TierError):
                        errors.append(reply)
                        continue
                    answered = True
                    for i, (block, found, replicas, fork) in zip(idx, reply, strict=True):
                        primary = sid == self._owners_of(keys[i])[0]
                        self._note_hot(keys[i], replicas, primary=primary)
                        if found:
                            data[i], present[i], holder[i] = block, block is None, sid
                            forks[i] = fork
                            if block is not None:
                                probed.add(i)
                        elif turn == 0 and self._repairs(keys[i], sid):
                            missed[i] = sid
                n = leading()
                pending = [i for i in range(n, end)
                           if data[i] is None and not present[i] and turn + 1 < len(orders[i])]  # fmt: skip
                if n >= end or n not in pending:
                    break
            if leading() < end or end == len(keys):
                break
            start, end = end, len(keys)
        if errors and not answered:
            raise errors[0]
        for e in errors:
            self._absorbed("get", e)
        n = leading()
        fetch = [i for i in range(n) if present[i]]
        if fetch:  # read as a get reads them (touched there)
            per_shard = {}
            for i in fetch:
                per_shard.setdefault(holder[i], []).append(i)
            batches = list(per_shard.items())
            fetched = await asyncio.gather(
                *(self._get_batch(sid, ns, [keys[i] for i in idx]) for sid, idx in batches),
                return_exceptions=True,
            )
            for (_, idx), answer in zip(batches, fetched, strict=True):
                if isinstance(answer, TierError):
                    self._absorbed("get", answer)
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                for i, (block, _, _) in zip(idx, answer, strict=True):
                    data[i] = None if block is None else bytes(block)
            n = next((i for i in range(n) if data[i] is None), n)
        for i in range(n):
            if i in probed:
                self._touch_later(holder[i], ns.id, keys[i])
        self._saw(keys[:n])
        if 0 < n < len(keys):
            self._fork(keys[n - 1], (forks[n - 1], holder[n - 1]))
        used: list[bytes | None] = [*data[:n], *([None] * (len(keys) - n))]
        await self._repair(ns, keys, used, {i: s for i, s in missed.items() if i < n})
        return [b for b in data[:n] if b is not None]

    def _saw(self, keys: Iterable[bytes]) -> None:
        """Remember keys this client stored or read (at most ClientConfig.seen_keys)."""
        seen = self._seen
        for key in keys:
            seen[key] = None
            seen.move_to_end(key)
        while len(seen) > self.config.seen_keys:
            seen.popitem(last=False)

    async def _probe(
        self, sid: str, ns: Namespace, keys: list[bytes]
    ) -> list[tuple[bytes | None, bool, int, bool]] | TierError:
        """One shard's ProbeShared: (the block if copied, whether found, its replica hint,
        whether it branched) per key; TierError when the shard refused; one of _SOCKET_ERRORS
        when its socket failed."""
        shared = await self._arena(sid)
        if shared is None:
            raise ConnectionResetError(f"{sid}: the same-host path closed")
        async with self._inflight, shared.slot() as offset:
            request = pb.ProbeSharedRequest(namespace_id=ns.id, keys=keys, offset=offset,
                                            capacity=shared.slot_bytes)  # fmt: skip
            self._ride(sid, ns.id, request.touch)
            found: list[Got] = [(None, 0, False)] * len(keys)
            try:
                reply = await self._local(shared, b"r", request, pb.BatchGetSharedResponse)
                _copy_out(reply, shared.view, offset, shared.slot_bytes, found)
            except TierError as e:
                return e
        return [(block, head.found, head.replicas, head.branched)
                for (block, _, _), head in zip(found, reply.blocks, strict=True)]  # fmt: skip

    def _touch_later(self, sid: str, namespace_id: bytes, key: bytes, branched: bool = False
                     ) -> None:  # fmt: skip
        """Queue a touch of a probed block this client used (`branched`: only a mark that a
        next block of its prefix was put on another shard): it rides in the next probe or
        BatchPutShared to `sid`, or leaves alone after `touch_delay_s`."""
        pending = self._touches.get(sid)
        if pending is not None and pending[0] != namespace_id:
            self._send_touches(sid)
            pending = None
        if pending is None:
            pending = self._touches[sid] = (namespace_id, [], [])
        (pending[2] if branched else pending[1]).append(key)
        if max(len(pending[1]), len(pending[2])) >= self.config.max_lookup_keys:
            self._send_touches(sid)
        if self._touch_timer is None and self._touches:
            loop = asyncio.get_running_loop()
            self._touch_timer = loop.call_later(self.config.touch_delay_s, self._flush_touches)

    def _ride(self, sid: str, namespace_id: bytes, touch: pb.TouchRequest) -> None:
        """Move the touches queued for `sid` in `namespace_id` into a request to it."""
        pending = self._touches.get(sid)
        if pending is not None and pending[0] == namespace_id:
            del self._touches[sid]
            touch.namespace_id = namespace_id
            touch.keys.extend(pending[1])
            touch.branched.extend(pending[2])

    def _flush_touches(self) -> None:
        self._touch_timer = None
        for sid in list(self._touches):
            self._send_touches(sid)

    def _send_touches(self, sid: str) -> None:
        namespace_id, keys, branched = self._touches.pop(sid)
        task = asyncio.ensure_future(self._touch(sid, namespace_id, keys, branched))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _touch(self, sid: str, namespace_id: bytes, keys: list[bytes],
                     branched: list[bytes]) -> None:  # fmt: skip
        """Touch on its own: over the socket, else over gRPC."""
        request = pb.TouchRequest(namespace_id=namespace_id, keys=keys, branched=branched)
        try:
            shared = await self._arena(sid)
            if shared is not None:
                with contextlib.suppress(*_SOCKET_ERRORS):
                    await self._local(shared, b"t", request, pb.TouchResponse)
                    return
            await self._call(sid, lambda s: s.Touch(request, timeout=self.config.timeout_s))
        except TierError as e:
            self._absorbed("touch", e)

    async def put_many(
        self, ns: Namespace, blocks: Sequence[BlockPut], prefix: Sequence[bytes] | None = None
    ) -> list[bool]:
        """Store blocks on each of their owners, one BatchPut per shard at a time, all shards at
        once; True for each block some owner newly stored. A shard that fails, or refuses a
        block, is reported to on_failure; raises TierError when no shard answered.

        A shard is told as a block's parent the nearest earlier block of its prefix that the
        shard owns too (its edge of the prefix tree, restricted to what it holds; a parent the
        shard then lacks marks the block unreachable there). prefix: the keys of the whole
        prefix (block.position indexes it); without it, `block.parent` where its owners
        include the shard, else none."""
        stored = [False] * len(blocks)
        if not blocks:
            return stored
        await self._ensure_topology()
        nsp = namespace_to_proto(ns)
        per_shard: dict[str, list[int]] = {}
        for i, b in enumerate(blocks):
            for sid in self._owners_of(b.key):
                per_shard.setdefault(sid, []).append(i)
        parents = self._local_parents(blocks, prefix)
        hints, mark = self._hints(blocks, prefix)
        infos = {(sid, i): pb.BlockInfo(namespace_id=ns.id, key=b.key, chain=b.chain,
                                        position=b.position, size=len(b.data), namespace=nsp,
                                        parent=parents.get((sid, i), self._here(b.parent, sid)),
                                        hints=hints.get((sid, i), 0))
                 for sid, idx in per_shard.items() for i in idx
                 for b in (blocks[i],)}  # fmt: skip
        batches = [(sid, batch) for sid, idx in per_shard.items()
                   for batch in _cut(idx, [len(b.data) for b in blocks],
                                     self.config.max_lookup_keys, self.config.batch_bytes)]  # fmt: skip

        async def send(sid: str, idx: list[int]) -> list[pb.BlockStored] | TierError:
            async with self._inflight:
                try:
                    return await self._put_batch(sid, [infos[sid, i] for i in idx],
                                                 [blocks[i].data for i in idx])  # fmt: skip
                except TierError as e:
                    return e

        replies = await asyncio.gather(*(send(sid, idx) for sid, idx in batches))
        if mark is not None:
            await self._mark_branched(ns, *mark)
        errors = [r for r in replies if isinstance(r, TierError)]
        if len(errors) == len(replies):
            raise errors[0]
        for (sid, idx), reply in zip(batches, replies, strict=True):
            if isinstance(reply, TierError):
                continue
            for i, result in zip(idx, reply, strict=True):
                stored[i] = stored[i] or result.stored
                if result.code:
                    code = _STATUS.get(result.code, "UNKNOWN")
                    errors.append(TierError(f"{sid}: {code}: {result.detail}", code))
                else:
                    self._saw((blocks[i].key,))
        for e in errors:
            self._absorbed("put", e)
        return stored

    def _here(self, parent: bytes, sid: str) -> bytes:
        """`parent` when shard `sid` owns it too, else b"" (the shard's tree has no edge)."""
        return parent if parent and sid in self._owners_of(parent) else b""

    def _hints(
        self, blocks: Sequence[BlockPut], prefix: Sequence[bytes] | None
    ) -> tuple[dict[tuple[str, int], int], tuple[str, bytes] | None]:
        """(owner, block index) -> the hints its put carries (BlockInfo.hints), from what one
        store would know: BRANCHED when the next block of the prefix is not on that owner;
        EXTENDS on every block when the block before the first one put was found by this
        client's last read of the prefix on a shard that said it had not branched. Also that
        shard and block when the first block put is not on it: it must be told the block has
        branched now (`_mark_branched`). None without a prefix (checked by
        `_local_parents`)."""
        if prefix is None or not blocks:
            return {}, None
        first = min(b.position for b in blocks)
        fork = self._forks.pop(prefix[first - 1], None) if first else None
        extends = EXTENDS if fork is not None and not fork[0] else 0
        hints: dict[tuple[str, int], int] = {}
        for i, b in enumerate(blocks):
            after = self._owners_of(prefix[b.position + 1]) if b.position + 1 < len(prefix) else ()
            for sid in self._owners_of(b.key):
                hints[sid, i] = extends | (BRANCHED if after and sid not in after else 0)
        if fork is not None and extends and fork[1] not in self._owners_of(prefix[first]):
            return hints, (fork[1], prefix[first - 1])
        return hints, None

    async def _mark_branched(self, ns: Namespace, sid: str, key: bytes) -> None:
        """Tell `sid` that a next block of `key`'s prefix now lives elsewhere: riding in this
        client's next request on its socket (ahead of that request's probe), else at once over
        gRPC (a Touch)."""
        if await self._arena(sid) is not None:
            self._touch_later(sid, ns.id, key, branched=True)
        else:
            await self._touch(sid, ns.id, [], [key])

    def _local_parents(
        self, blocks: Sequence[BlockPut], prefix: Sequence[bytes] | None
    ) -> dict[tuple[str, int], bytes]:
        """(owner, block index) -> the key of the nearest earlier block of `prefix` that the
        owner owns too (b"" when none does); empty without a prefix."""
        if prefix is None:
            return {}
        for b in blocks:
            if not 0 <= b.position < len(prefix) or prefix[b.position] != b.key:
                raise ValueError(f"block at position {b.position} is not that key of the prefix")
        at = {b.position: i for i, b in enumerate(blocks)}
        last: dict[str, bytes] = {}
        parents: dict[tuple[str, int], bytes] = {}
        for position in range(max(at) + 1):
            owners = self._owners_of(prefix[position])
            i = at.get(position)
            if i is not None:
                for sid in owners:
                    parents[sid, i] = last.get(sid, b"")
            for sid in owners:
                last[sid] = prefix[position]
        return parents

    async def _put_batch(
        self, sid: str, infos: list[pb.BlockInfo], datas: list[bytes]
    ) -> list[pb.BlockStored]:
        """One shard's BatchPut: through its arena, a slot's worth at a time, when it is on
        this host (blocks larger than a slot, and all the rest if the socket fails, over gRPC)."""
        results: list[pb.BlockStored | None] = [None] * len(infos)
        shared = await self._arena(sid)
        if shared is not None:
            fits = [i for i, d in enumerate(datas) if len(d) <= shared.slot_bytes]
            sizes = [len(d) for d in datas]
            with contextlib.suppress(*_SOCKET_ERRORS):
                for part in _cut(fits, sizes, 1 << 30, shared.slot_bytes,
                                 [i.ByteSize() + 8 for i in infos], SHARED_BATCH_BYTES):  # fmt: skip
                    async with shared.slot() as offset:
                        at = offset
                        for i in part:  # closed meanwhile: ValueError
                            shared.view[at : at + sizes[i]] = datas[i]
                            at += sizes[i]
                        request = pb.BatchPutSharedRequest(blocks=[infos[i] for i in part],
                                                           offset=offset)  # fmt: skip
                        self._ride(sid, infos[part[0]].namespace_id, request.touch)
                        reply = await self._local(shared, b"p", request, pb.BatchPutResponse)
                    if len(reply.blocks) != len(part):
                        raise TierError(f"{sid} answered {len(reply.blocks)} of {len(part)}",
                                        "DATA_LOSS")  # fmt: skip
                    for i, result in zip(part, reply.blocks, strict=True):
                        results[i] = result
        rest = [i for i, r in enumerate(results) if r is None]
        if rest:
            step = self.config.chunk_bytes

            def messages() -> Iterator[pb.BatchPutRequest]:
                for heads, data in pack([(infos[i], datas[i]) for i in rest], step):
                    yield pb.BatchPutRequest(blocks=heads, data=data)

            reply = await self._call(
                sid, lambda s: s.BatchPut(messages(), timeout=self.config.timeout_s)
            )
            if len(reply.blocks) != len(rest):
                raise TierError(f"{sid} answered {len(reply.blocks)} of {len(rest)}", "DATA_LOSS")
            for i, result in zip(rest, reply.blocks, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    async def delete(self, ns: Namespace, keys: Sequence[bytes]) -> int:
        """Remove blocks from all their owners; returns how many copies were removed."""
        await self._ensure_topology()
        per_shard: dict[str, list[bytes]] = {}
        for key in keys:
            for sid in (*self._owners_of(key), *self._place.fallback(key)):
                per_shard.setdefault(sid, []).append(key)

        async def delete_on(sid: str, ks: list[bytes]) -> int:
            req = pb.DeleteRequest(namespace_id=ns.id, keys=ks)
            reply = await self._call(sid, lambda s: s.Delete(req, timeout=self.config.timeout_s))
            return reply.deleted

        return sum(await asyncio.gather(*(delete_on(s, ks) for s, ks in per_shard.items())))

    async def stats(self) -> list[pb.StatsResponse]:
        """One StatsResponse per shard that answers."""
        await self._ensure_topology()
        replies = await asyncio.gather(
            *(
                self._stub(a).Stats(pb.StatsRequest(), timeout=self.config.timeout_s)
                for a in self._addresses.values()
            ),
            return_exceptions=True,
        )
        return [r for r in replies if isinstance(r, pb.StatsResponse)]

    async def close(self) -> None:
        self._flush_touches()
        await asyncio.gather(*self._background, return_exceptions=True)
        for address, shared in list(self._shared.items()):
            channel = self._channels.get(address)
            if isinstance(shared, _Shared) and channel is not None:
                stub = pb_grpc.KVPoolStub(channel)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.CloseShared(pb.CloseSharedRequest(session=shared.session),
                                           timeout=1.0)  # fmt: skip
            if isinstance(shared, _Shared):
                self._drop_arena(shared)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)


class _Shared:
    """This client's arena on one shard (see services/shared.py): a mapping of the memfd the
    shard handed over, cut into slots, one per block in flight (the shard writes gets into a
    slot, the client writes puts), and the connection that claimed it, serving this client's
    lookups, gets and puts."""

    def __init__(self, address: str, session: bytes, view: mmap.mmap, config: ClientConfig,
                 sock: socket.socket) -> None:  # fmt: skip
        self.address, self.session, self.view, self._sock = address, session, view, sock
        self._broken = False
        self._turn: asyncio.Future[bool] | None = None  # read when the answers before are read
        self._outgoing: list[bytes] = []  # requests of this loop iteration, sent together
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.slot_bytes = config.shared_slot_bytes
        self._free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(config.shared_slots):
            self._free.put_nowait(i * self.slot_bytes)

    @classmethod
    def attach(cls, address: str, reply: pb.OpenSharedResponse, config: ClientConfig) -> _Shared:
        """Claim the arena with the ticket on the shard's Unix socket (blocking: run it in a
        thread). OSError when the socket is not reachable from here."""
        want = config.shared_slots * config.shared_slot_bytes
        if (reply.size, len(reply.session), len(reply.ticket)) != (
            want,
            SESSION_BYTES,
            TICKET_BYTES,
        ):
            raise ValueError("the shard answered an arena unlike the one asked for")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(config.timeout_s)
            sock.connect(reply.socket_path)
            sock.sendall(reply.ticket)
            msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if msg != b"\x01" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ValueError("the shard refused the ticket")
            try:
                if os.fstat(fds[0]).st_size != want:
                    raise ValueError("the arena's size is not the one announced")
                view = mmap.mmap(fds[0], want)  # written by puts, read by gets
            finally:
                os.close(fds[0])
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return cls(address, reply.session, view, config, sock)

    async def connect(self) -> None:
        """Streams over the claiming connection, which now serves this client's requests."""
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._turn = asyncio.get_running_loop().create_future()
        self._turn.set_result(True)

    async def request(self, op: bytes, message: bytes) -> tuple[int, bytes]:
        """One request on the claiming connection (frames: proto/messages.py): (0, the
        response) or (a gRPC status code, its detail). Requests are pipelined: those made in one
        turn of the event loop leave in one write, the shard serves them in order, and each
        caller reads its answer after the answers before it were read. A request that fails or is cancelled midway leaves the
        connection unusable, for it and every request behind it (an answer may still be on its
        way, and the shard may still write the slot it named: the arena is dropped)."""
        reader, writer, previous = self._reader, self._writer, self._turn
        if reader is None or writer is None or previous is None or self._broken:
            raise OSError("the same-host connection is not usable")
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._turn = mine
        try:
            self._outgoing.append(REQUEST_HEAD.pack(op, len(message)) + message)
            if len(self._outgoing) == 1:  # the first of this iteration: send them all after it
                asyncio.get_running_loop().call_soon(self._flush, writer)
            if not await previous:
                raise OSError("the same-host connection broke")
            status, length = REPLY_HEAD.unpack(await reader.readexactly(REPLY_HEAD.size))
            if length > _MAX_REPLY:
                raise ValueError(f"a {length}-byte answer on the same-host socket")
            body = await reader.readexactly(length)
        except BaseException:
            self._broken = True
            if not mine.done():
                mine.set_result(False)
            raise
        if not mine.done():  # the one behind may have been cancelled while it waited
            mine.set_result(True)
        return status, body

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        """Send the requests made since the last flush, in one write."""
        frames, self._outgoing = self._outgoing, []
        if not writer.is_closing():
            writer.write(b"".join(frames))

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[int]:
        """The offset of a free slot, held until the block is done with."""
        offset = await self._free.get()
        try:
            yield offset
        finally:
            self._free.put_nowait(offset)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
        with contextlib.suppress(BufferError):
            self.view.close()


def _cut(
    idx: list[int], sizes: list[int], most: int, most_bytes: int,
    extra: list[int] | None = None, most_extra: int = 0,
) -> list[list[int]]:  # fmt: skip
    """`idx` in order, cut into runs of at most `most` items and `most_bytes` of `sizes` (and
    `most_extra` of `extra`); a run holds at least one item."""
    runs: list[list[int]] = []
    run: list[int] = []
    total = more = 0
    for i in idx:
        over = total + sizes[i] > most_bytes
        if extra is not None:
            over = over or more + extra[i] > most_extra
        if run and (len(run) == most or over):
            runs.append(run)
            run, total, more = [], 0, 0
        run.append(i)
        total += sizes[i]
        more += 0 if extra is None else extra[i]
    if run:
        runs.append(run)
    return runs


def _copy_out(
    reply: pb.BatchGetSharedResponse, view: mmap.mmap, offset: int, capacity: int,
    found: list[Got],
) -> list[int]:  # fmt: skip
    """Fill `found` with the blocks a BatchGetShared copied into the slot at `offset`, their
    replica hints and branch flags; the indices found but not copied (fetch them another way)."""
    if len(reply.blocks) != len(found):
        raise TierError(f"shard answered {len(reply.blocks)} of {len(found)} keys", "DATA_LOSS")
    at, left, rest = offset, reply.copied, []
    for i, head in enumerate(reply.blocks):
        if not head.found:
            found[i] = (None, head.replicas, False)
            continue
        if not left:
            rest.append(i)
            continue
        if at + head.size > offset + capacity:
            raise TierError("shard wrote past its slot", "DATA_LOSS")
        found[i] = (view[at : at + head.size], head.replicas, head.branched)
        at += head.size
        left -= 1
    if left:
        raise TierError(f"shard counted {reply.copied} blocks copied, found fewer", "DATA_LOSS")
    return rest


def channel_credentials(
    ca_file: str,
    cert_file: str | None = None,
    key_file: str | None = None,
    token: str | None = None,
) -> grpc.ChannelCredentials:
    """Client credentials: trust `ca_file`; present a certificate for mutual TLS; send a token."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds
