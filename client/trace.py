"""Request traces in Mooncake's format, turned into kvpool block keys.

Where it stands: a tool beside the data path. `benchmarks/trace_replay.py` replays a trace
through a tier, the tests replay slices of one through a store. A trace line is one request:

    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [int, ...]}

`hash_ids` cut the prompt into blocks of `TRACE_BLOCK_TOKENS` (512) tokens; equal ids at the
same place mean the same prefix up to there (an id names a block and everything before it), and
the last block may be partial (`input_length` is the truth). The prompt's token ids are
synthesized per block id (`block_tokens`), so kvpool's chained keys, computed from those tokens
exactly as a worker computes them (`kvpool.proto.keys`), share exactly what the trace shares.
Only full blocks have keys, as in every engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvpool.proto.keys import BlockHash, Namespace, chain_block, chain_start

TRACE_BLOCK_TOKENS = 512
MAX_LINE_BYTES = 1 << 20  # a request line longer than this is refused, not parsed
MAX_BLOCKS = 1 << 16  # hash ids per request


class TraceError(ValueError):
    """A trace line that is not a request in Mooncake's format (file and line in the message)."""


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def full_blocks(self, block_tokens: int = TRACE_BLOCK_TOKENS) -> int:
        """How many of its blocks hold `block_tokens` tokens (only those are cached)."""
        return min(len(self.hash_ids), self.input_length // block_tokens)

    def hit_tokens(self, leading: int, block_tokens: int = TRACE_BLOCK_TOKENS) -> int:
        """Prompt tokens served by `leading` cached blocks."""
        return min(leading * block_tokens, self.input_length)


def _request(obj: object, where: str) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a request is a JSON object")
    fields = {}
    for name in ("timestamp", "input_length", "output_length"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TraceError(f"{where}: {name} must be a non-negative integer, got {value!r}")
        fields[name] = value
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or len(ids) > MAX_BLOCKS:
        raise TraceError(f"{where}: hash_ids must be a list of at most {MAX_BLOCKS} ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**53 for i in ids):
        raise TraceError(f"{where}: hash_ids must be non-negative integers")
    return TraceRequest(fields["timestamp"], fields["input_length"], fields["output_length"],
                        tuple(ids))  # fmt: skip


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """The first `limit` requests (all by default) of a JSONL trace, in file order; raises
    TraceError naming the line for anything malformed."""
    return list(iter_trace(path, limit))


def iter_trace(path: str | Path, limit: int | None = None) -> Iterator[TraceRequest]:
    with open(path, "rb") as f:
        for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if limit is not None and n > limit:
                return
            where = f"{path}:{n}"
            if len(line) > MAX_LINE_BYTES:
                raise TraceError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON: {e}") from None
            yield _request(obj, where)


def block_tokens(block_id: int, n: int = TRACE_BLOCK_TOKENS) -> np.ndarray:
    """The synthesized token ids of trace block `block_id`: n ids no other block has."""
    start = (block_id * n) % (2**32 - n)
    return np.arange(start, start + n, dtype="<u4")


class TraceKeys:
    """kvpool's block keys for trace requests in one namespace: the chain every worker computes
    (`kvpool.proto.keys.block_keys`) for the synthesized prompt, one block at a time
    (`chain_block`); each (chain state, block id) is hashed once."""

    def __init__(self, namespace: Namespace) -> None:
        if namespace.block_tokens != TRACE_BLOCK_TOKENS:
            raise ValueError(
                f"trace blocks hold {TRACE_BLOCK_TOKENS} tokens; the namespace's blocks "
                f"{namespace.block_tokens}"
            )
        self.namespace = namespace
        # (chain state before, block id) -> (chain state after, key)
        self._keys: dict[tuple[bytes, int], tuple[bytes, BlockHash]] = {}

    def __call__(self, request: TraceRequest) -> list[BlockHash]:
        """The keys of the request's full blocks, in prefix order."""
        keys: list[BlockHash] = []
        state = chain_start(self.namespace)
        for block_id in request.hash_ids[: request.full_blocks()]:
            hit = self._keys.get((state, block_id))
            if hit is None:
                hit = chain_block(self.namespace, state, block_tokens(block_id).tobytes())
                self._keys[state, block_id] = hit
            state, key = hit
            keys.append(key)
        return keys
