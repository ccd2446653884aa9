"""The same-host path of a shard: shared-memory arenas, handed to clients by file descriptor.

Where it stands: beside the gRPC servicer of one shard (services/server.py), which does every
check; this module only owns the memory and the socket.

    OpenShared (gRPC, authenticated) -> a memfd of the asked size, mapped by the shard, and a
                                        one-use ticket and the Unix socket path, for the caller
    ticket --> the Unix socket       -> the memfd's descriptor (SCM_RIGHTS); the ticket is spent;
                                        the connection stays open for the arena owner's requests
    GetShared (socket or gRPC)       -> the servicer reads the block as for Get, then copies it
                                        into the caller's arena at the offset the caller chose
    PutShared (socket or gRPC)       -> the servicer copies a block out of the caller's arena,
                                        then checks and stores it as a Put

An arena never has a name in any file system: a process gets one only with a ticket, and a
ticket only travels over the caller's own authenticated gRPC channel. Blocks are copied into an
arena only for calls of the tenant (and peer) that opened it, so no process can read through
this path what it could not Get. The memfd's size is sealed, so a client cannot shrink it under
the shard's mapping. A socket path that does not reach the shard (another host, another mount
namespace) simply fails to connect, and the client stays on TCP.

Requests on the claiming connection: lookups, gets and puts, as the messages of Lookup,
GetShared and PutShared in frames (proto/messages.py), answered in turn by the servicer exactly
as over gRPC for the arena's owner, and batches of gets and puts (BatchGetShared: the blocks
found copied back to back into the arena; BatchPutShared: blocks written back to back there,
each stored as a PutShared), probes (ProbeShared: a lookup and a read of the leading blocks in
one request, touching nothing) and touches (the probed blocks the caller used, also riding in a
probe or a BatchPutShared); anything malformed closes the connection. Requests may be
pipelined: a client sends several without waiting, the shard serves them one at a time in
order and answers in that order (the answers to what arrived together leave in one write). A
request costs a Unix socket round trip (tens of microseconds) instead of a gRPC call (about
0.6 ms here), which for a 4.5 MB block is as much as the copy itself. The gRPC twins stay for
clients that cannot keep the socket.

Memory is bounded: arenas count against `Limits.shared_bytes` per shard and
`Limits.peer_shared_bytes` per tenant (or peer host); sessions idle for `shared_idle_s` are
closed to make room, and a ticket not claimed within `TICKET_S` expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvpool.proto.messages import (
    REPLY_HEAD,
    REQUEST_BYTES,
    REQUEST_HEAD,
    SESSION_BYTES,
    SHARED_BATCH_BYTES,
    TICKET_BYTES,
)

log = logging.getLogger(__name__)
TICKET_S = 10.0  # a ticket not claimed by then is void
_READ_BYTES = 256 << 10  # the most one read of a connection takes
Owner = tuple[str | None, str]  # (tenant, peer key) of a caller
# (owner, arena, op, message) -> (0, response) or (status code, detail); ValueError: malformed
Serve = Callable[[Owner, "Arena", bytes, bytes], Awaitable[tuple[int, bytes]]]
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ArenaRefused(Exception):
    """A request the arenas cannot serve; `full` says it was for lack of room."""

    def __init__(self, detail: str, full: bool = False) -> None:
        super().__init__(detail)
        self.full = full


@dataclass(eq=False)
class Arena:
    session: bytes
    owner: Owner  # (tenant, peer key) of the caller that opened it
    size: int
    fd: int
    view: mmap.mmap
    ticket: bytes | None
    opened: float
    last_used: float = field(default_factory=time.monotonic)
    conn: socket.socket | None = None  # the claiming connection, serving requests

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)  # ends its requests
        with contextlib.suppress(BufferError, ValueError):
            self.view.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Arenas:
    """The arenas of one shard, and the Unix socket that hands them over."""

    def __init__(self, directory: str, shard_id: str, shared_bytes: int, peer_shared_bytes: int,
                 idle_s: float, serve: Serve, max_keys: int,
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        """serve: answers the requests of the socket, on `loop` (the shard's gRPC loop: a
        request wakes that loop, not another thread that would wait for the GIL)."""
        self.shared_bytes, self.peer_shared_bytes, self.idle_s = (
            shared_bytes, peer_shared_bytes, idle_s,
        )  # fmt: skip
        self._serve_one, self._loop = serve, loop
        # keys or a batch's infos, and the keys of a touch riding along (ProbeSharedRequest)
        self.max_request = REQUEST_BYTES + 34 * max_keys + max(34 * max_keys, SHARED_BATCH_BYTES)
        name = f"kvpool-{''.join(c if c.isalnum() else '-' for c in shard_id)}"
        self.path = str(Path(directory) / f"{name}-{secrets.token_hex(6)}.sock")
        self._sessions: dict[bytes, Arena] = {}
        self._tickets: dict[bytes, Arena] = {}
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o666)  # the ticket, not the file mode, admits a client
        self._listener.listen(64)
        self._listener.settimeout(0.5)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"arenas-{shard_id}", daemon=True)
        self._thread.start()

    # -- sessions (called from the servicer) -----------------------------------------------

    def open(self, owner: Owner, size: int) -> Arena:
        if not 0 < size <= self.peer_shared_bytes:
            raise ArenaRefused(f"arena of {size} bytes; at most {self.peer_shared_bytes}")
        with self._lock:
            self._make_room(owner, size)
            fd = os.memfd_create("kvpool-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, size)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
                view = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                raise
            now = time.monotonic()
            arena = Arena(secrets.token_bytes(SESSION_BYTES), owner, size, fd, view,
                          secrets.token_bytes(TICKET_BYTES), now)  # fmt: skip
            self._sessions[arena.session] = arena
            assert arena.ticket is not None
            self._tickets[arena.ticket] = arena
            return arena

    def _make_room(self, owner: Owner, size: int) -> None:
        """Close idle sessions (the longest idle first) until `size` more bytes fit."""
        now = time.monotonic()
        for arena in sorted(self._sessions.values(), key=lambda a: a.last_used):
            if self._fits(owner, size):
                return
            expired = arena.ticket is not None and now - arena.opened > TICKET_S
            if expired or now - arena.last_used > self.idle_s:
                self._drop(arena)
        if not self._fits(owner, size):
            raise ArenaRefused("no room for another arena on this shard", full=True)

    def _fits(self, owner: Owner, size: int) -> bool:
        total = sum(a.size for a in self._sessions.values())
        mine = sum(a.size for a in self._sessions.values() if a.owner[1] == owner[1])
        return total + size <= self.shared_bytes and mine + size <= self.peer_shared_bytes

    def session(self, session: bytes, owner: Owner) -> Arena:
        """The caller's arena `session`; ArenaRefused when it is not (or no longer) theirs."""
        with self._lock:
            arena = self._sessions.get(session)
            if arena is None or arena.owner != owner or arena.ticket is not None:
                raise ArenaRefused("no such shared-memory session for this caller")
            arena.last_used = time.monotonic()
            return arena

    def close(self, session: bytes, owner: Owner) -> None:
        with self._lock:
            arena = self._sessions.get(session)
            if arena is not None and arena.owner == owner:
                self._drop(arena)

    def _drop(self, arena: Arena) -> None:
        self._sessions.pop(arena.session, None)
        if arena.ticket is not None:
            self._tickets.pop(arena.ticket, None)
        arena.close()

    def _claim(self, ticket: bytes, conn: socket.socket) -> Arena | None:
        """The arena of a valid ticket (then spent), now served on `conn`; or None."""
        with self._lock:
            arena = self._tickets.pop(ticket, None)
            if arena is None:
                return None
            arena.ticket = None
            if time.monotonic() - arena.opened > TICKET_S:
                self._drop(arena)
                return None
            arena.last_used = time.monotonic()
            arena.conn = conn
            return arena

    @property
    def open_bytes(self) -> int:
        with self._lock:
            return sum(a.size for a in self._sessions.values())

    # -- the socket ------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            try:
                arena = self._hand_over(conn)
            except OSError as e:
                log.info("shared-memory handover failed: %s", e)
                arena = None
            if arena is None:
                conn.close()
                continue
            conn.setblocking(False)
            asyncio.run_coroutine_threadsafe(self._requests(conn, arena), self._loop)

    def _hand_over(self, conn: socket.socket) -> Arena | None:
        conn.settimeout(1.0)  # one slow client holds the socket at most this long
        ticket = _recv_exactly(conn, TICKET_BYTES)
        if ticket is None:
            return None
        arena = self._claim(ticket, conn)
        if arena is None:
            conn.sendall(b"\x00")
        else:
            socket.send_fds(conn, [b"\x01"], [arena.fd])
        return arena

    async def _requests(self, conn: socket.socket, arena: Arena) -> None:
        """The owner's requests on the connection that claimed `arena`, one at a time, until
        either closes, one is malformed, or it stays idle past `idle_s`. The connection is
        read as a stream (it stays registered with the loop: no poller change per request),
        whatever has arrived at once: the requests a client sent back to back are served in
        order without waiting between them, and their answers leave together, in that order.
        Nothing is buffered beyond one request of at most `max_request` bytes and one read."""
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except OSError:
            conn.close()
            return
        buf = bytearray()
        try:
            while True:
                replies: list[bytes] = []
                try:
                    while len(buf) >= REQUEST_HEAD.size:
                        op, length = REQUEST_HEAD.unpack_from(buf)
                        if length > self.max_request:
                            return  # malformed: the client falls back to gRPC
                        end = REQUEST_HEAD.size + length
                        if len(buf) < end:
                            break
                        body = bytes(buf[REQUEST_HEAD.size : end])
                        del buf[:end]
                        arena.last_used = time.monotonic()
                        status, reply = await self._serve_one(arena.owner, arena, op, body)
                        replies.append(REPLY_HEAD.pack(status, len(reply)) + reply)
                finally:  # the answers before a malformed request still leave
                    if replies:
                        writer.write(b"".join(replies))
                await writer.drain()  # a client that does not read its answers is not buffered
                # idle between requests; the rest of a request comes at once
                async with asyncio.timeout(1.0 if buf else self.idle_s):
                    data = await reader.read(_READ_BYTES)
                if not data:
                    return
                buf += data
        except (OSError, TimeoutError, ValueError):
            return
        finally:
            writer.close()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self._lock:
            for arena in list(self._sessions.values()):
                self._drop(arena)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    """n bytes from conn; None if it closes, times out or fails first."""
    data = bytearray()
    try:
        while len(data) < n:
            part = conn.recv(n - len(data))
            if not part:
                return None
            data += part
    except OSError:
        return None
    return bytes(data)
