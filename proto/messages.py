"""Conversions between kvpool's Python types and the kvpool.v1 messages (both directions), and
the frames of the same-host Unix socket (services/shared.py serves it, client/transport.py uses
it)."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import TypeVar, cast

from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto.blockformat import DType, Layout
from kvpool.proto.keys import Namespace

# BlockInfo.hints: what one store would know of a block's neighbours on other shards (eviction
# order only; services/store.py)
EXTENDS = 1  # its parent, on another shard, is proven and had no other child
BRANCHED = 2  # a next block of its prefix lives on another shard
HINTS = EXTENDS | BRANCHED  # every hint bit a put may carry


def namespace_to_proto(ns: Namespace) -> pb.Namespace:
    return pb.Namespace(
        model=ns.model, revision=ns.revision, layout=cast(pb.Layout, int(ns.layout)), layers=ns.layers,
        kv_heads=ns.kv_heads, head_dim=ns.head_dim, dtype=cast(pb.DType, int(ns.dtype)),
        block_tokens=ns.block_tokens, codec=ns.codec, format_version=ns.format_version,
        tp_rank=ns.tp_rank, tp_size=ns.tp_size, integrity=ns.integrity,
    )  # fmt: skip


def namespace_from_proto(msg: pb.Namespace) -> Namespace:
    """Raises ValueError (NamespaceError) for missing or out-of-range fields."""
    return Namespace(
        model=msg.model, revision=msg.revision, layout=Layout(msg.layout), layers=msg.layers,
        kv_heads=msg.kv_heads, head_dim=msg.head_dim, dtype=DType(msg.dtype),
        block_tokens=msg.block_tokens, codec=msg.codec, format_version=msg.format_version,
        tp_rank=msg.tp_rank, tp_size=msg.tp_size, integrity=msg.integrity,
    )  # fmt: skip


# -- the same-host socket (see OpenShared in kvpool.proto) -------------------------------------

TICKET_BYTES = 32  # the one-use ticket a client sends first; the answer carries the arena's fd
SESSION_BYTES = 16
# Then requests, each answered in turn: an op (b"L" LookupRequest, b"G" GetSharedRequest, b"P"
# PutSharedRequest, b"g" BatchGetSharedRequest, b"p" BatchPutSharedRequest; their session is the
# connection's own arena) and the message's length, then the message; the answer: 0 and the
# response's length, then the response (LookupResponse, GetSharedResponse, PutResponse,
# BatchGetSharedResponse, BatchPutResponse), or a gRPC status code and the length of its detail.
REQUEST_HEAD = struct.Struct("<cI")
REPLY_HEAD = struct.Struct("<BI")
REQUEST_BYTES = 4096  # the most any request needs besides its keys (34 bytes each, encoded)
SHARED_BATCH_BYTES = 128 << 10  # the most a BatchPutSharedRequest takes (its infos)


# -- batches (BatchGet, BatchPut) ----------------------------------------------------------------

H = TypeVar("H")


def pack(
    blocks: Sequence[tuple[H, bytes | bytearray | memoryview | None]], step: int
) -> Iterator[tuple[list[H], bytes]]:
    """The messages of a batch stream: (the heads of the blocks whose bytes start in it, the
    next bytes of all blocks concatenated, at most `step`). A block of None has no bytes; a
    block larger than `step` runs over several messages. A message holds `step` bytes unless
    it is the last one."""
    heads: list[H] = []
    parts: list[bytes | bytearray | memoryview] = []
    room = step
    for head, data in blocks:
        heads.append(head)
        if not data:
            continue
        view, off = memoryview(data), 0
        while off < len(view):
            take = min(room, len(view) - off)
            parts.append(view[off : off + take] if take < len(view) else data)
            off += take
            room -= take
            if room == 0:
                yield heads, b"".join(parts)
                heads, parts, room = [], [], step
    if heads or parts:
        yield heads, b"".join(parts)
