"""The same-host path: blocks through a shard's shared-memory arena, and everything a client
could try against it (spent or forged tickets, other tenants' sessions, offsets outside the
arena, resizing the arena under the shard, arenas beyond the shard's limits)."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import block_keys
from kvpool.proto.messages import REPLY_HEAD, REQUEST_HEAD, namespace_to_proto
from kvpool.services.security import ServerSecurity
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore
from kvpool.transport import BlockPut, ClientConfig, TierClient, channel_credentials
from tests.services.test_security import kv, pki  # noqa: F401  (pki: a fixture)

CODEC = CodecConfig(2, 2, 64)
B = 64
NS = namespace_for("test/shared", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
TOKENS = list(range(2 * B))
Code = grpc.StatusCode
LIMITS = Limits(shared_bytes=8 << 20, peer_shared_bytes=4 << 20)
SMALL = ClientConfig(timeout_s=3.0, shared_slots=2, shared_slot_bytes=1 << 20)


@pytest.fixture
def server() -> Iterator[ShardServer]:
    srv = ShardServer(BlockStore(16 << 20), "shared-test", limits=LIMITS)
    srv.start()
    yield srv
    srv.stop()


def tier_get(
    address: str, keys: list[bytes], config: ClientConfig
) -> tuple[list[bytes | None], int]:
    """The blocks of `keys` through a TierClient, and how many arena bytes it had open."""

    async def run() -> tuple[list[bytes | None], int]:
        tier = TierClient(address, config)
        try:
            got = [await tier.get(NS, k) for k in keys]
            return got, sum(s.view.size() for s in tier._shared.values() if hasattr(s, "view"))
        finally:
            await tier.close()

    return asyncio.run(run())


def test_blocks_come_through_the_arena_equal_to_tcp(server) -> None:
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        assert p.put(TOKENS, kv(1)) == 2
        tcp = p.get(TOKENS)
    keys = block_keys(NS, TOKENS)
    blobs, opened = tier_get(server.address, keys, ClientConfig(same_host=False))
    assert opened == 0 and server.arenas is not None and server.arenas.open_bytes == 0
    shared, opened = tier_get(server.address, keys, SMALL)
    assert opened == 2 << 20 and shared == blobs and all(blobs)
    assert server.arenas.open_bytes == 0  # closed with the client
    # blocks larger than a slot come over TCP, the same bytes
    tiny = ClientConfig(timeout_s=3.0, shared_slots=2, shared_slot_bytes=4096)
    assert tier_get(server.address, keys, tiny)[0] == blobs
    with KVPool(server.address, NS, CODEC, config=SMALL) as p:  # decoded: the same tensors
        got = p.get(TOKENS)
        assert got is not None and tcp is not None and torch.equal(got.keys, tcp.keys)  # type: ignore[arg-type]


def test_when_the_shard_ends_a_session_the_client_goes_on_over_tcp_then_reopens(server) -> None:
    """The shard closes the client's arena (idle, restarted): the next get comes over TCP, the
    same bytes, and a later one through a new arena."""
    keys = block_keys(NS, TOKENS)
    with KVPool(server.address, NS, CODEC, config=SMALL) as p:
        p.put(TOKENS, kv(2))
    calls = server.metrics.requests.labels

    async def run() -> list[bytes | None]:
        tier = TierClient(server.address, SMALL)
        try:
            first = await tier.get(NS, keys[0])
            assert server.arenas is not None and server.arenas.open_bytes > 0
            with server.arenas._lock:  # what the idle reclaim does
                for arena in list(server.arenas._sessions.values()):
                    server.arenas._drop(arena)
            shared = calls("GetShared", "OK")._value.get()
            again = await tier.get(NS, keys[0])  # the socket is gone: TCP
            assert calls("GetShared", "OK")._value.get() == shared
            later = await tier.get(NS, keys[0])  # a new arena
            assert calls("GetShared", "OK")._value.get() == shared + 1
            return [first, again, later]
        finally:
            await tier.close()

    first, again, later = asyncio.run(run())
    assert first is not None and first == again == later


def test_an_arena_closed_while_a_request_waits_is_not_written(server) -> None:
    """A session closed (idle, by its owner) between a request's checks and its copy: the
    request is refused FAILED_PRECONDITION, nothing is read from or written to the arena."""
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.put(TOKENS, kv(3))
    [key, _] = block_keys(NS, TOKENS)
    assert server.arenas is not None
    owner = (None, "127.0.0.1")
    arena = server.arenas.open(owner, 1 << 20)
    arena.close()  # what a reclaim does to an arena a request already holds
    serve = server.arenas._serve_one
    get = pb.GetSharedRequest(namespace_id=NS.id, key=key, capacity=1 << 20)
    status, detail = server.submit(serve(owner, arena, b"G", get.SerializeToString()))
    assert status == Code.FAILED_PRECONDITION.value[0] and b"ended" in detail
    info = pb.BlockInfo(namespace_id=NS.id, key=bytes(32), chain=bytes(32), position=0,
                        size=1024, namespace=namespace_to_proto(NS))  # fmt: skip
    put = pb.PutSharedRequest(info=info, offset=0)
    status, _ = server.submit(serve(owner, arena, b"P", put.SerializeToString()))
    assert status == Code.FAILED_PRECONDITION.value[0]


def test_lookups_go_over_the_arenas_socket_with_the_same_answers(server) -> None:
    keys = block_keys(NS, TOKENS)
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.put(TOKENS, kv(5))

    def lookups(config: ClientConfig) -> tuple[list[int], float, float]:
        calls = server.metrics.requests.labels

        async def run() -> list[int]:
            tier = TierClient(server.address, config)
            try:
                return [await tier.lookup(NS, ks) for ks in (keys, keys[:1], keys[1:], [])]
            finally:
                await tier.close()

        before = calls("Lookup", "OK")._value.get(), calls("LookupShared", "OK")._value.get()
        got = asyncio.run(run())
        after = calls("Lookup", "OK")._value.get(), calls("LookupShared", "OK")._value.get()
        return got, after[0] - before[0], after[1] - before[1]

    assert lookups(ClientConfig(same_host=False)) == ([2, 1, 1, 0], 3, 0)
    assert lookups(SMALL) == ([2, 1, 1, 0], 0, 3)


def test_malformed_socket_requests_end_the_connection_not_the_shard(server) -> None:
    frame = REQUEST_HEAD.pack
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        for junk in (
            frame(b"X", 3) + b"abc",  # no such op
            frame(b"L", 1 << 30),  # a length over the bound: closed before anything is read
            frame(b"G", 5) + b"\xff" * 5,  # not a GetSharedRequest
        ):
            with claimed(stub) as sock:
                sock.sendall(junk)
                assert sock.recv(4) == b""  # closed, nothing allocated for 2^30 bytes
        reply = open_arena(stub)  # the shard goes on
        assert claim(reply) is not None


def test_refused_socket_requests_get_their_status_and_the_connection_stays(server) -> None:
    """Requests the servicer refuses are answered with the gRPC status their gRPC twins get
    (too many keys, a slot outside the arena, a put of a size it cannot hold), and the next
    request on the connection is served."""

    def ask(sock: socket.socket, op: bytes, message: bytes) -> tuple[int, bytes]:
        sock.sendall(REQUEST_HEAD.pack(op, len(message)) + message)
        status, length = REPLY_HEAD.unpack(recv_exactly(sock, REPLY_HEAD.size))
        return status, recv_exactly(sock, length)

    too_many = pb.LookupRequest(namespace_id=NS.id, keys=[bytes(32)] * (LIMITS.max_keys + 1))
    outside = pb.GetSharedRequest(namespace_id=NS.id, key=bytes(32), offset=1 << 20, capacity=1)
    with (
        grpc.insecure_channel(server.address) as channel,
        claimed(pb_grpc.KVPoolStub(channel)) as sock,
    ):
        for op, message, code in (
            (b"L", too_many, Code.RESOURCE_EXHAUSTED),
            (b"G", outside, Code.OUT_OF_RANGE),
            (b"P", pb.PutSharedRequest(info=pb.BlockInfo(size=1 << 21)), Code.OUT_OF_RANGE),
            (b"L", pb.LookupRequest(namespace_id=b"short"), Code.INVALID_ARGUMENT),
            (b"p", pb.BatchPutSharedRequest(blocks=[pb.BlockInfo()] * (LIMITS.max_keys + 1)),
             Code.RESOURCE_EXHAUSTED),
            (b"g", pb.BatchGetSharedRequest(namespace_id=NS.id, keys=[bytes(32)],
                                            offset=1 << 20, capacity=1), Code.OUT_OF_RANGE),
        ):  # fmt: skip
            status, detail = ask(sock, op, message.SerializeToString())
            assert status == code.value[0] and detail
        status, body = ask(sock, b"L", pb.LookupRequest(namespace_id=NS.id,
                                                        keys=[bytes(32)]).SerializeToString())  # fmt: skip
        assert status == 0 and pb.LookupResponse.FromString(body).present == 0


@contextlib.contextmanager
def claimed(stub: pb_grpc.KVPoolStub) -> Iterator[socket.socket]:
    """A connection that claimed a new arena (the descriptor closed at once)."""
    reply = open_arena(stub)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(reply.socket_path)
        sock.sendall(reply.ticket)
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        os.close(fds[0])
        yield sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        assert part, "closed"
        data += part
    return data


def test_a_view_is_the_block_in_the_clients_own_slot(server) -> None:
    """TierClient.view: the same bytes as get, read-only, straight from the arena; the slot
    is held inside the `async with` only (one slot serves any number of views in turn)."""
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.put(TOKENS, kv(6))
    keys = block_keys(NS, TOKENS)
    one_slot = ClientConfig(timeout_s=3.0, shared_slots=1, shared_slot_bytes=1 << 20)

    async def run() -> None:
        tier = TierClient(server.address, one_slot)
        try:
            want = [await tier.get(NS, k) for k in keys]
            for k, blob in zip(keys * 2, want * 2, strict=True):
                async with tier.view(NS, k) as view:
                    assert isinstance(view, memoryview) and view.readonly and view == blob
                    with pytest.raises(TypeError):
                        view[0] = 0  # type: ignore[index]
            async with tier.view(NS, os.urandom(32)) as missing:
                assert missing is None
        finally:
            await tier.close()

    asyncio.run(run())


def test_puts_through_the_arena_are_checked_like_uploads(server) -> None:
    """A put through the caller's slot stores the same bytes a TCP put would; what the shard
    takes out of a slot is checked as an upload (a corrupt or misplaced block stores nothing),
    and offsets outside the arena are refused."""
    calls = server.metrics.requests.labels
    before = calls("BatchPutShared", "OK")._value.get()
    tokens = list(range(7000, 7000 + 2 * B))
    with KVPool(server.address, NS, CODEC, config=SMALL) as p:
        assert p.put(tokens, kv(7)) == 2
    assert calls("BatchPutShared", "OK")._value.get() - before == 1  # both in one request
    keys = block_keys(NS, tokens)
    via_tcp, _ = tier_get(server.address, keys, ClientConfig(same_host=False))
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.call(p.tier.delete(NS, keys))
        assert p.put(tokens, kv(7)) == 2  # the same tensors over TCP: the same bytes
        assert tier_get(server.address, keys, ClientConfig(same_host=False))[0] == via_tcp
        p.call(p.tier.delete(NS, keys))
    good = via_tcp[0]
    assert good is not None
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        reply = open_arena(stub)
        fd = claim(reply)
        assert fd is not None
        view = mmap.mmap(fd, reply.size)
        info = pb.BlockInfo(namespace_id=NS.id, key=keys[0], chain=keys[0], position=0,
                            size=len(good), namespace=namespace_to_proto(NS))  # fmt: skip

        def put(offset: int = 0) -> pb.PutResponse:
            req = pb.PutSharedRequest(info=info, session=reply.session, offset=offset)
            return stub.PutShared(req, timeout=5)

        view[: len(good)] = good[:100] + bytes([good[100] ^ 1]) + good[101:]  # a flipped bit
        assert code_of(put) == Code.DATA_LOSS
        assert code_of(lambda: put(reply.size - 10)) == Code.OUT_OF_RANGE
        view[: len(good)] = good
        info.key = info.chain = keys[1]  # block 0's bytes under block 1's key
        assert code_of(put) == Code.FAILED_PRECONDITION
        info.key = info.chain = keys[0]
        assert put().stored and not put().stored  # stored once; a second put is a no-op
        view.close()
        os.close(fd)


def open_arena(stub: pb_grpc.KVPoolStub, size: int = 1 << 20) -> pb.OpenSharedResponse:
    return stub.OpenShared(pb.OpenSharedRequest(size=size), timeout=5)


def claim(reply: pb.OpenSharedResponse, ticket: bytes | None = None) -> int | None:
    """The arena's descriptor for a ticket, or None when the shard refuses it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(reply.socket_path)
        sock.sendall(reply.ticket if ticket is None else ticket)
        msg, fds, _, _ = socket.recv_fds(sock, 1, 1)
    return fds[0] if msg == b"\x01" and fds else None


def code_of(fn) -> Code:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def test_tickets_are_spent_once_and_cannot_be_guessed(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        reply = open_arena(stub)
        assert claim(reply, os.urandom(32)) is None
        near = reply.ticket[:31] + bytes([reply.ticket[31] ^ 1])
        assert claim(reply, near) is None  # a near miss is a miss
        fd = claim(reply)
        assert fd is not None and os.fstat(fd).st_size == 1 << 20
        assert claim(reply) is None  # spent
        # the shard's mapping cannot be pulled from under it: the size is sealed
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 4096)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")  # no path to open
        os.close(fd)


def test_sessions_offsets_and_sizes_are_checked(server) -> None:
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.put(TOKENS, kv(2))
    key = block_keys(NS, TOKENS)[0]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.KVPoolStub(channel)
        reply = open_arena(stub)

        def get(session: bytes, offset: int = 0, capacity: int = 1 << 19) -> pb.GetSharedResponse:
            req = pb.GetSharedRequest(namespace_id=NS.id, key=key, session=session,
                                      offset=offset, capacity=capacity)  # fmt: skip
            return stub.GetShared(req, timeout=5)

        assert code_of(lambda: get(reply.session)) == Code.FAILED_PRECONDITION  # unclaimed
        fd = claim(reply)
        assert fd is not None
        assert get(reply.session).fits
        assert code_of(lambda: get(os.urandom(16))) == Code.FAILED_PRECONDITION
        assert code_of(lambda: get(reply.session, offset=1 << 20)) == Code.OUT_OF_RANGE
        assert code_of(lambda: get(reply.session, capacity=2 << 20)) == Code.OUT_OF_RANGE
        assert code_of(lambda: get(reply.session, offset=2**63, capacity=2**63)) == (
            Code.OUT_OF_RANGE
        )
        assert not get(reply.session, capacity=100).fits  # found, too large: nothing written
        # arenas are bounded per caller and per shard
        assert code_of(lambda: open_arena(stub, 0)) == Code.OUT_OF_RANGE
        assert code_of(lambda: open_arena(stub, 5 << 20)) == Code.OUT_OF_RANGE
        held = [open_arena(stub, 1 << 20) for _ in range(3)]  # 4 MiB: this peer's share
        assert code_of(lambda: open_arena(stub, 1 << 20)) == Code.RESOURCE_EXHAUSTED
        for r in [reply, *held]:
            stub.CloseShared(pb.CloseSharedRequest(session=r.session), timeout=5)
        assert server.arenas is not None and server.arenas.open_bytes == 0
        assert code_of(lambda: get(reply.session)) == Code.FAILED_PRECONDITION  # closed
        os.close(fd)


def test_no_tenant_can_use_another_tenants_arena(pki: Path) -> None:  # noqa: F811
    security = ServerSecurity(str(pki / "server.crt"), str(pki / "server.key"),
                              tokens_file=str(pki / "tokens.json"))  # fmt: skip
    srv = ShardServer(BlockStore(16 << 20), "shared-tls", security=security)
    srv.start()
    try:
        ca = str(pki / "ca.crt")
        a = ClientConfig(timeout_s=3.0, tls_ca_file=ca, token="token-a", shared_slots=2,
                         shared_slot_bytes=1 << 20)  # fmt: skip
        with KVPool(srv.address, NS, CODEC, config=a) as p:
            p.put(TOKENS, kv(3))
            assert p.get(TOKENS) is not None
        key = block_keys(NS, TOKENS)[0]

        def stub_of(token: str) -> tuple[grpc.Channel, pb_grpc.KVPoolStub]:
            channel = grpc.secure_channel(srv.address, channel_credentials(ca, token=token))
            return channel, pb_grpc.KVPoolStub(channel)

        ca_channel, stub_a = stub_of("token-a")
        cb_channel, stub_b = stub_of("token-b")
        with ca_channel, cb_channel:
            reply = open_arena(stub_a)
            fd = claim(reply)
            assert fd is not None
            req = pb.GetSharedRequest(namespace_id=NS.id, key=key, session=reply.session,
                                      capacity=1 << 20)  # fmt: skip
            assert stub_a.GetShared(req, timeout=5).fits
            # tenant B, knowing A's session and key, gets neither A's block nor A's arena
            assert code_of(lambda: stub_b.GetShared(req, timeout=5)) == Code.FAILED_PRECONDITION
            reply_b = open_arena(stub_b)
            assert claim(reply_b) is not None
            req_b = pb.GetSharedRequest(namespace_id=NS.id, key=key, session=reply_b.session,
                                        capacity=1 << 20)  # fmt: skip
            assert not stub_b.GetShared(req_b, timeout=5).found
            os.close(fd)
        for token, present in (("token-a", 2), ("token-b", 0)):  # lookups: the tenant's own
            config = ClientConfig(timeout_s=3.0, tls_ca_file=ca, token=token, shared_slots=1,
                                  shared_slot_bytes=1 << 20)  # fmt: skip

            async def look(config: ClientConfig = config) -> tuple[int, int]:
                tier = TierClient(srv.address, config)
                try:
                    n = await tier.lookup(NS, block_keys(NS, TOKENS))
                    return n, len([s for s in tier._shared.values() if hasattr(s, "view")])
                finally:
                    await tier.close()

            assert asyncio.run(look()) == (present, 1)
    finally:
        srv.stop()


def test_a_shard_without_the_path_refuses_it_and_clients_use_tcp() -> None:
    srv = ShardServer(BlockStore(16 << 20), "no-shared", shared_dir=None)
    srv.start()
    try:
        assert srv.arenas is None
        with KVPool(srv.address, NS, CODEC, config=SMALL) as p:  # tries, then stays on TCP
            assert p.put(TOKENS, kv(8)) == 2 and p.get(TOKENS) is not None
            assert p.lookup(TOKENS) == 2 * B
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.KVPoolStub(channel)
            session = os.urandom(16)
            for call in (
                lambda: open_arena(stub),
                lambda: stub.GetShared(pb.GetSharedRequest(session=session), timeout=5),
                lambda: stub.PutShared(pb.PutSharedRequest(session=session), timeout=5),
            ):
                assert code_of(call) == Code.FAILED_PRECONDITION
            stub.CloseShared(pb.CloseSharedRequest(session=session), timeout=5)  # a no-op
    finally:
        srv.stop()


def test_without_a_reachable_socket_the_client_stays_on_tcp(tmp_path: Path) -> None:
    srv = ShardServer(BlockStore(16 << 20), "shared-elsewhere", shared_dir=str(tmp_path))
    srv.start()
    try:
        with KVPool(srv.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
            p.put(TOKENS, kv(4))
        assert srv.arenas is not None
        os.unlink(srv.arenas.path)  # as if the shard were on another host
        keys = block_keys(NS, TOKENS)
        got, opened = tier_get(srv.address, keys, SMALL)
        assert opened == 0 and all(got)
        assert srv.arenas.open_bytes == 0  # the arena it could not claim is closed again
    finally:
        srv.stop()


def test_requests_sent_back_to_back_are_answered_in_order(server) -> None:
    """Frames written in one go (split anywhere, even inside a header) are served in order:
    one answer each, in the order asked; a malformed frame among them ends the connection
    after the answers before it."""
    keys = block_keys(NS, TOKENS)
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        p.put(TOKENS, kv(6))

    def frame(op: bytes, message: bytes) -> bytes:
        return REQUEST_HEAD.pack(op, len(message)) + message

    def lookup(ks: list[bytes]) -> bytes:
        return frame(b"L", pb.LookupRequest(namespace_id=NS.id, keys=ks).SerializeToString())

    asked = [keys, keys[:1], [bytes(32)], keys[1:], [keys[0], bytes(32), keys[1]], []]
    frames = b"".join(lookup(ks) for ks in asked)
    outside = pb.GetSharedRequest(namespace_id=NS.id, key=keys[0], offset=1 << 20, capacity=1)
    frames += frame(b"G", outside.SerializeToString()) + lookup(keys)
    with (
        grpc.insecure_channel(server.address) as channel,
        claimed(pb_grpc.KVPoolStub(channel)) as sock,
    ):
        sock.sendall(frames[:3])  # a header split across writes
        sock.sendall(frames[3:])
        answers = []
        for _ in range(len(asked) + 2):
            status, length = REPLY_HEAD.unpack(recv_exactly(sock, REPLY_HEAD.size))
            answers.append((status, recv_exactly(sock, length)))
        sock.sendall(lookup(keys) + REQUEST_HEAD.pack(b"X", 1) + b"x" + lookup(keys))
        status, length = REPLY_HEAD.unpack(recv_exactly(sock, REPLY_HEAD.size))
        last = pb.LookupResponse.FromString(recv_exactly(sock, length)).present
        assert sock.recv(1) == b""  # closed at the malformed frame; the lookup after it unread
    present = [pb.LookupResponse.FromString(body).present for _, body in answers[: len(asked)]]
    assert [status for status, _ in answers] == [0] * len(asked) + [Code.OUT_OF_RANGE.value[0], 0]
    assert present == [2, 1, 0, 1, 1, 0] and last == 2
    assert pb.LookupResponse.FromString(answers[-1][1]).present == 2


def test_concurrent_calls_share_the_socket_and_each_gets_its_own_answer(server) -> None:
    """Many lookups and gets of one client in flight at once on one shard's socket (more than
    its slots): each answer is its own; a call cancelled among them costs the others nothing
    but the arena (they go on over gRPC or a new arena, with the same answers)."""
    tokens = list(range(7000, 7000 + 8 * B))
    keys = block_keys(NS, tokens)
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        assert p.put(tokens, kv_of(7, 8 * B)) == 8
    blobs, _ = tier_get(server.address, keys, ClientConfig(same_host=False))
    calls = server.metrics.requests.labels

    async def run(cancel: bool) -> tuple[list[int], list[list[bytes | None]]]:
        tier = TierClient(server.address, SMALL)
        try:
            await tier.lookup(NS, keys[:1])  # the arena, opened
            other = [os.urandom(32)]
            lookups = [tier.lookup(NS, keys[:n] + other) for n in range(8, -1, -1)]
            gets = [tier.get_many(NS, [keys[i], keys[(i + 3) % 8]]) for i in range(8)]
            tasks = [asyncio.ensure_future(c) for c in (*lookups, *gets)]
            if cancel:
                await asyncio.sleep(0)  # all of them sent, none answered yet
                victim = asyncio.ensure_future(tier.lookup(NS, keys))
                await asyncio.sleep(0)
                victim.cancel()
            got = await asyncio.gather(*tasks)
            return list(got[: len(lookups)]), list(got[len(lookups) :])  # type: ignore[arg-type]
        finally:
            await tier.close()

    shared = calls("LookupShared", "OK")._value.get()
    for cancel in (False, True):
        present, got = asyncio.run(run(cancel))
        assert present == list(range(8, -1, -1))
        assert got == [[blobs[i], blobs[(i + 3) % 8]] for i in range(8)]
    assert calls("LookupShared", "OK")._value.get() - shared >= 10  # the socket served them


def kv_of(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(2, 2, tokens, 64, generator=g).half() for _ in range(2))
    return k, v


def test_batches_go_through_the_arena_and_what_does_not_fit_over_grpc(server) -> None:
    """get_many / put_many on the same host: one socket request per slot's worth of blocks;
    blocks that do not fit in the slot come (or go) over gRPC, the same bytes."""
    tokens = list(range(9000, 9000 + 6 * B))
    keys = block_keys(NS, tokens)
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        assert p.put(tokens, kv_of(9, 6 * B)) == 6
        p.call(p.tier.delete(NS, keys[3:]))
    tcp, _ = tier_get(server.address, keys[:3], ClientConfig(same_host=False))
    size = len(tcp[0] or b"")
    calls = server.metrics.requests.labels
    seen = {
        m: calls(m, "OK")._value.get()
        for m in ("BatchGetShared", "BatchGet", "BatchPutShared", "BatchPut")
    }

    async def run(config: ClientConfig) -> tuple[list[bytes | None], list[bool]]:
        tier = TierClient(server.address, config)
        try:
            got = await tier.get_many(NS, [*keys[:3], os.urandom(32)])
            puts = [BlockPut(keys[i], keys[0], i, tcp[i] or b"", keys[i - 1] if i else b"")
                    for i in range(3)]  # fmt: skip
            await tier.delete(NS, keys[:2])
            stored = await tier.put_many(NS, puts)
            return got, stored
        finally:
            await tier.close()

    got, stored = asyncio.run(run(SMALL))  # everything fits a slot
    assert got == [*tcp, None] and stored == [True, True, False]
    # two blocks fit a slot: the third block of the get, and nothing of the put, over gRPC
    two = ClientConfig(timeout_s=3.0, shared_slots=2, shared_slot_bytes=2 * size + 100)
    got, stored = asyncio.run(run(two))
    assert got == [*tcp, None] and stored == [True, True, False]
    now = {m: calls(m, "OK")._value.get() - seen[m] for m in seen}
    assert now == {"BatchGetShared": 2, "BatchGet": 1, "BatchPutShared": 3, "BatchPut": 0}


def test_a_batch_through_the_arena_refuses_each_bad_block_alone(server) -> None:
    tokens = list(range(9500, 9500 + 3 * B))
    keys = block_keys(NS, tokens)
    with KVPool(server.address, NS, CODEC, config=ClientConfig(same_host=False)) as p:
        assert p.put(tokens, kv_of(10, 3 * B)) == 3
    blobs, _ = tier_get(server.address, keys, ClientConfig(same_host=False))
    failures: list[str] = []

    async def run() -> list[bool]:
        tier = TierClient(server.address, SMALL, on_failure=lambda op, e: failures.append(e.code))
        try:
            await tier.delete(NS, keys)
            bad = bytearray(blobs[1] or b"")
            bad[-5] ^= 1
            puts = [BlockPut(keys[0], keys[0], 0, blobs[0] or b""),
                    BlockPut(keys[1], keys[0], 1, bytes(bad), keys[0]),
                    BlockPut(keys[2], keys[0], 2, blobs[2] or b"", keys[1])]  # fmt: skip
            return await tier.put_many(NS, puts)
        finally:
            await tier.close()

    assert asyncio.run(run()) == [True, False, True]
    assert failures == ["DATA_LOSS"]
    got, _ = tier_get(server.address, keys, ClientConfig(same_host=False))
    assert got == [blobs[0], None, blobs[2]]
