"""A client facing a shard that lies: a real gRPC server speaking kvpool.v1 whose batch replies
do not match what was asked (more blocks, stray bytes, a block cut short, a count of results
that is off). Each is a DATA_LOSS TierError (a miss or a dropped save to the KVPool above),
never a block handed on; and the same checks on what a shard says it copied into an arena."""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.errors import TierError
from kvpool.transport import BlockPut, ClientConfig, TierClient, _copy_out

NS = namespace_for("test/liar", 1, 1, 64, torch.float16, CodecConfig(2, 2, 64), block_tokens=64)
KEYS = [bytes([i]) * 32 for i in range(2)]
Replies = Callable[[pb.BatchGetRequest], list[pb.BatchGetResponse]]

BATCH_GETS: dict[str, Replies] = {  # what the client says of each
    "more blocks than asked": lambda r: [
        pb.BatchGetResponse(blocks=[pb.BlockFound(found=False)] * (len(r.keys) + 1))
    ],
    "bytes beyond its blocks": lambda r: [
        pb.BatchGetResponse(blocks=[pb.BlockFound(found=False)] * len(r.keys), data=b"stray")
    ],
    "truncated batch stream": lambda r: [  # a block cut short
        pb.BatchGetResponse(
            blocks=[pb.BlockFound(found=True, size=10)] * len(r.keys), data=b"12345"
        )
    ],
}


class Liar:
    """A one-shard tier whose BatchGet answers `replies(request)` and whose BatchPut answers
    one result fewer than the blocks it was sent."""

    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self.address = ""

    async def topology(self, request: pb.TopologyRequest, context: Any) -> pb.TopologyResponse:
        return pb.TopologyResponse(epoch=1, replication=1,
                                   shards=[pb.Shard(shard_id="liar", address=self.address)])  # fmt: skip

    async def batch_get(
        self, request: pb.BatchGetRequest, context: Any
    ) -> AsyncIterator[pb.BatchGetResponse]:
        for reply in self.replies(request):
            yield reply

    async def batch_put(
        self, requests: AsyncIterator[pb.BatchPutRequest], context: Any
    ) -> pb.BatchPutResponse:
        blocks = [info async for msg in requests for info in msg.blocks]
        return pb.BatchPutResponse(blocks=[pb.BlockStored(stored=True)] * (len(blocks) - 1))


@contextlib.contextmanager
def serve(liar: Liar) -> Iterator[None]:
    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        handlers = {
            "Topology": grpc.unary_unary_rpc_method_handler(
                liar.topology, pb.TopologyRequest.FromString, pb.TopologyResponse.SerializeToString
            ),
            "BatchGet": grpc.unary_stream_rpc_method_handler(
                liar.batch_get, pb.BatchGetRequest.FromString, pb.BatchGetResponse.SerializeToString
            ),
            "BatchPut": grpc.stream_unary_rpc_method_handler(
                liar.batch_put, pb.BatchPutRequest.FromString, pb.BatchPutResponse.SerializeToString
            ),
        }  # fmt: skip
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("kvpool.v1.KVPool", handlers),)
        )
        liar.address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        return server

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def call(liar: Liar, what: str) -> TierError:
    async def go() -> None:
        tier = TierClient(liar.address, ClientConfig(timeout_s=5.0, same_host=False))
        try:
            if what == "get":
                await tier.get_many(NS, KEYS)
            else:
                await tier.put_many(NS, [BlockPut(k, KEYS[0], i, b"x" * 8, KEYS[0] if i else b"")
                                         for i, k in enumerate(KEYS)])  # fmt: skip
        finally:
            await tier.close()

    with pytest.raises(TierError) as e:
        asyncio.run(go())
    return e.value


@pytest.mark.parametrize("case", list(BATCH_GETS))
def test_a_batch_get_that_does_not_match_the_request_is_data_loss(case: str) -> None:
    liar = Liar(BATCH_GETS[case])
    with serve(liar):
        error = call(liar, "get")
    assert error.code == "DATA_LOSS" and case in str(error)


def test_a_batch_put_answered_for_fewer_blocks_is_data_loss() -> None:
    liar = Liar(BATCH_GETS["more blocks than asked"])
    with serve(liar):
        error = call(liar, "put")
    assert error.code == "DATA_LOSS" and "answered 1 of 2" in str(error)


def reply(*heads: tuple[bool, int], copied: int) -> pb.BatchGetSharedResponse:
    return pb.BatchGetSharedResponse(
        blocks=[pb.BlockFound(found=f, size=s) for f, s in heads], copied=copied
    )


@pytest.mark.parametrize(
    "shared, match",
    [
        (reply((True, 4), copied=1), "answered 1 of 2"),
        (reply((True, 4), (True, 8), copied=2), "past its slot"),
        (reply((True, 4), (False, 0), copied=2), "found fewer"),
    ],
)
def test_what_a_shard_says_it_copied_into_an_arena_is_checked(shared, match) -> None:
    view = mmap.mmap(-1, 64)
    found: list[tuple[bytes | None, int, bool]] = [(None, 0, False)] * 2
    with pytest.raises(TierError, match=match) as e:
        _copy_out(shared, view, offset=0, capacity=10, found=found)
    assert e.value.code == "DATA_LOSS"
    view.close()


def test_blocks_a_shard_copied_come_out_and_the_rest_are_fetched_another_way() -> None:
    view = mmap.mmap(-1, 64)
    view[0:4] = b"abcd"
    found: list[tuple[bytes | None, int, bool]] = [(None, 0, False)] * 3
    answer = reply((True, 4), (False, 0), (True, 8), copied=1)
    answer.blocks[0].branched = True  # carried with the block (the client's next put's hints)
    rest = _copy_out(answer, view, 0, 10, found)
    assert bytes(found[0][0] or b"") == b"abcd" and found[0][2] is True
    assert found[1] == (None, 0, False) and rest == [2]
    view.close()
