"""Mooncake-format traces: parsing (and refusing), the keys a worker would compute for the
synthesized prompts, and a slice of the shared production trace replayed through sharded
stores (the full replay is benchmarks/trace_replay.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.proto.keys import block_keys
from kvpool.ring import Ring
from kvpool.services.store import BlockStore
from kvpool.trace import (
    TRACE_BLOCK_TOKENS,
    TraceError,
    TraceKeys,
    TraceRequest,
    block_tokens,
    read_trace,
)

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake-conversation.jsonl"
NS = namespace_for("trace/test", 2, 1, 64, torch.float16, CodecConfig(2, 2, 64),
                   block_tokens=TRACE_BLOCK_TOKENS)  # fmt: skip


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def request(**fields: object) -> str:
    base = {"timestamp": 0, "input_length": 1100, "output_length": 10, "hash_ids": [0, 1, 2]}
    return json.dumps({**base, **fields})


def test_a_trace_reads_in_order_and_counts_full_blocks(tmp_path: Path) -> None:
    path = write(tmp_path, [request(), "", request(timestamp=5, hash_ids=[0, 3])])
    first, second = read_trace(path)
    assert first == TraceRequest(0, 1100, 10, (0, 1, 2))
    assert first.full_blocks() == 2  # 1100 tokens: two full blocks of 512, a partial third
    assert second.full_blocks() == 2 and second.hit_tokens(2) == 1024
    assert first.hit_tokens(5) == 1100  # never more than the prompt
    assert read_trace(path, limit=1) == [first]


@pytest.mark.parametrize(
    "line",
    [
        "{not json",
        "[1, 2]",
        request(input_length=-1),
        request(timestamp="0"),
        request(output_length=True),
        request(hash_ids=[0, -1]),
        request(hash_ids="0,1"),
        request(hash_ids=[0, 1.5]),
        json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1}),
    ],
)
def test_malformed_lines_are_refused_with_their_place(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, [request(), line])
    with pytest.raises(TraceError, match=r"t\.jsonl:2"):
        read_trace(path)


def test_an_overlong_line_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"[" + b" " * (1 << 20) + b"]\n")
    with pytest.raises(TraceError, match="longer than"):
        read_trace(path)


def test_keys_are_the_chain_a_worker_computes_for_the_synthesized_prompt() -> None:
    tk = TraceKeys(NS)
    req = TraceRequest(0, 3 * TRACE_BLOCK_TOKENS + 7, 1, (4, 9, 2, 11))
    tokens = np.concatenate([block_tokens(b) for b in req.hash_ids])
    assert tk(req) == block_keys(NS, tokens[: req.input_length])
    other = TraceRequest(0, 3 * TRACE_BLOCK_TOKENS, 1, (4, 9, 5))
    a, b = tk(req), tk(other)
    assert a[:2] == b[:2] and a[2] != b[2]  # the trace's sharing, exactly
    assert len({block_tokens(i).tobytes() for i in range(50)}) == 50
    with pytest.raises(ValueError, match="512"):
        TraceKeys(namespace_for("x", 2, 1, 64, torch.float16, CodecConfig(2, 2, 64)))


@pytest.mark.skipif(not TRACE.exists(), reason="the shared trace is not beside this checkout")
def test_a_slice_of_the_production_trace_keeps_its_shared_root_and_whole_prefixes() -> None:
    """800 requests through three stores holding a tenth of what they ask for: the first
    block, which every request starts with, is never evicted, budgets hold, and every leading
    run a lookup finds is readable in full."""
    requests = read_trace(TRACE, limit=800)
    tk = TraceKeys(NS)
    keys = [tk(r) for r in requests]
    assert len({k[0] for k in keys if k}) == 1  # one shared first block in this trace
    blocks = len({k for ks in keys for k in ks})
    ring = Ring(["a", "b", "c"])
    stores = {s: BlockStore(blocks // 30 * 100) for s in ring.shard_ids}
    root = keys[0][0]
    for ks in keys:
        owner = [stores[ring.owners(k)[0]] for k in ks]
        n = 0
        while n < len(ks) and ks[n] in owner[n]:
            n += 1
        assert all(owner[i].get(ks[i]) is not None for i in range(n))
        last: dict[int, bytes] = {}
        for i in range(n, len(ks)):
            parent = last.get(id(owner[i]))
            owner[i].put(ks[i], ks[0], i, b"x" * 100, parent=parent)
            last[id(owner[i])] = ks[i]
        assert root in stores[ring.owners(root)[0]]
    for store in stores.values():
        assert store.stats.bytes <= store.budget_bytes and store.stats.evictions > 0
