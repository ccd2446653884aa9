"""Block keys: chained, deterministic across processes and containers, isolated by namespace."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvpool.proto.blockformat import DType
from kvpool.proto.errors import NamespaceError, TokenError
from kvpool.proto.keys import (
    MAC_SCHEME,
    Namespace,
    block_keys,
    chain_block,
    chain_start,
    page_block_key,
    page_digests,
    placed,
    run_head,
    run_keys,
)
from kvpool.proto.messages import namespace_from_proto, namespace_to_proto

NS = Namespace(
    model="m", layers=2, kv_heads=2, head_dim=64, dtype=DType.FLOAT16, codec="c", block_tokens=16
)
TOKENS = [(7 * i + 3) % 50000 for i in range(100)]


def _page_chain(tokens: list[int], page: int) -> list[bytes]:
    """d_j = sha256(d_{j-1} || page j as little-endian uint32), d_0 without a prior."""
    out, prev = [], b""
    for j in range(len(tokens) // page):
        prev = hashlib.sha256(
            prev + np.asarray(tokens[page * j : page * (j + 1)], "<u4").tobytes()
        ).digest()
        out.append(prev)
    return out


def test_one_key_per_full_block_and_chained() -> None:
    keys = block_keys(NS, TOKENS)
    assert NS.page_tokens == 16  # gcd(64, 16): the page is the whole block here
    assert len(keys) == 100 // 16
    assert all(len(k) == 32 for k in keys) and len(set(keys)) == len(keys)
    digests = _page_chain(TOKENS, 16)
    own = [hashlib.sha256(b"kvpool/v2 block\x00" + NS.root + d).digest() for d in digests]
    assert [keys[b] for b in (0, 1, 2, 4)] == [own[b] for b in (0, 1, 2, 4)]  # run heads
    assert keys[3] == own[2][:8] + own[3][8:]
    assert keys[5] == own[4][:8] + own[5][8:]  # run {4..7}: placed with block 4


def test_pages_smaller_than_blocks_chain_over_pages() -> None:
    ns = Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, "page_tokens": 4})
    keys = block_keys(ns, TOKENS)
    digests = _page_chain(TOKENS, 4)
    assert digests == page_digests(TOKENS, 4) and len(digests) == 25
    # block b's key is the store key of its last page's digest
    assert keys == run_keys([page_block_key(ns, digests[4 * b + 3]) for b in range(6)])
    assert not set(keys) & set(block_keys(NS, TOKENS))  # another page size, other keys
    assert ns.id == NS.id and ns.root != NS.root  # the scheme is in the keys, not the id


def test_the_first_scheme_chains_whole_blocks_from_the_root() -> None:
    ns = Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, "page_tokens": 0})
    keys = block_keys(ns, TOKENS)
    prev = hashlib.sha256(b"kvpool/v1 root\x00" + NS.id + hashlib.sha256(b"").digest()).digest()
    assert ns.root == prev
    digests = []
    for i in range(len(keys)):
        block = np.asarray(TOKENS[16 * i : 16 * (i + 1)], dtype="<u4").tobytes()
        prev = hashlib.sha256(prev + block).digest()  # chained over digests, not stored keys
        digests.append(prev)
    assert keys == run_keys(digests) and keys[5] == digests[4][:8] + digests[5][8:]
    assert not set(keys) & set(block_keys(NS, TOKENS))
    with pytest.raises(NamespaceError):
        page_block_key(ns, b"\0" * 32)


def test_default_page_is_64_or_the_block_when_smaller() -> None:
    fields = {**NS.fields(), "dtype": NS.dtype, "layout": NS.layout}
    assert Namespace(**{**fields, "block_tokens": 256}).page_tokens == 64
    assert Namespace(**{**fields, "block_tokens": 512}).page_tokens == 64
    assert Namespace(**{**fields, "block_tokens": 32}).page_tokens == 32
    assert Namespace(**{**fields, "block_tokens": 96}).page_tokens == 32


def test_chain_block_steps_equal_block_keys() -> None:
    for ns in (
        NS,
        Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, "page_tokens": 0}),
    ):
        state, keys = chain_start(ns), []
        arr = np.asarray(TOKENS[:96], "<u4").tobytes()
        for b in range(6):
            state, key = chain_block(ns, state, arr[64 * b : 64 * (b + 1)])
            keys.append(key)
        assert keys == block_keys(ns, TOKENS)
        with pytest.raises(TokenError):
            chain_block(ns, state, arr[:60])
        with pytest.raises(TokenError):
            chain_block(ns, state[:-1], arr[:64])  # not a state


def test_runs_double_up_to_run_blocks_then_stay() -> None:
    heads = [run_head(b, 16) for b in range(50)]
    assert heads[:8] == [0, 1, 2, 2, 4, 4, 4, 4]
    assert heads[8:16] == [8] * 8 and heads[16:32] == [16] * 16 and heads[32:48] == [32] * 16
    assert [run_head(b, 1) for b in range(5)] == [0, 1, 2, 3, 4]  # one block a run
    assert [run_head(b, 4) for b in range(10)] == [0, 1, 2, 2, 4, 4, 4, 4, 8, 8]
    with pytest.raises(ValueError):
        run_head(-1)


def test_a_run_shares_its_placement_bytes_and_keeps_192_bits_of_its_own() -> None:
    tokens = list(range(16 * 40))
    keys = block_keys(NS, tokens)
    for b, key in enumerate(keys):
        assert key[:8] == keys[run_head(b)][:8]
    assert len({k[8:] for k in keys}) == len(keys)  # the rest is the block's own digest
    # a block after another run head gets other placement bytes, and a prefix's key does not
    # depend on what follows it
    assert keys[15][:8] != keys[16][:8] and block_keys(NS, tokens[: 16 * 20]) == keys[:20]
    assert placed(b"a" * 32, b"b" * 32) == b"a" * 8 + b"b" * 24


def test_bad_page_digests_and_page_sizes_are_refused() -> None:
    with pytest.raises(TokenError):
        page_block_key(NS, b"short")
    with pytest.raises(TokenError):
        page_digests(TOKENS, 0)


def test_a_key_commits_to_every_earlier_token() -> None:
    keys = block_keys(NS, TOKENS)
    changed = list(TOKENS)
    changed[5] += 1  # inside block 0
    other = block_keys(NS, changed)
    assert all(a != b for a, b in zip(keys, other, strict=True))
    changed = list(TOKENS)
    changed[40] += 1  # inside block 2
    other = block_keys(NS, changed)
    assert other[:2] == keys[:2] and all(a != b for a, b in zip(keys[2:], other[2:], strict=True))


@pytest.mark.parametrize(
    "container",
    [
        list,
        tuple,
        lambda t: np.asarray(t, dtype=np.int64),
        lambda t: np.asarray(t, dtype=np.int32),
        lambda t: np.asarray(t, dtype=np.uint32),
        lambda t: np.asarray(t, dtype=">i8"),  # big-endian input still hashes little-endian
        lambda t: torch.tensor(t, dtype=torch.int64),
        lambda t: torch.tensor(t, dtype=torch.int32),
    ],
)
def test_same_keys_whatever_the_container(container) -> None:
    assert block_keys(NS, container(TOKENS)) == block_keys(NS, TOKENS)


def test_keys_identical_across_processes_with_different_hash_seeds() -> None:
    code = (
        "from kvpool.proto.keys import Namespace, block_keys; from kvpool.proto.blockformat import DType;"
        "ns = Namespace(model='m', layers=2, kv_heads=2, head_dim=64, dtype=DType.FLOAT16,"
        " codec='c', block_tokens=16, salt=b'tenant');"
        f"print(','.join(k.hex() for k in block_keys(ns, {TOKENS!r})))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(out.stdout.strip())
    assert len(outs) == 1
    salted = Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, "salt": b"tenant"})
    assert outs.pop() == ",".join(k.hex() for k in block_keys(salted, TOKENS))


def test_tenant_salt_and_every_namespace_field_change_all_keys() -> None:
    base = block_keys(NS, TOKENS)
    variants = [
        {"salt": b"tenant-a"},
        {"model": "m2"},
        {"revision": "r1"},
        {"layers": 3},
        {"kv_heads": 4},
        {"head_dim": 128},
        {"dtype": DType.BFLOAT16},
        {"codec": "c2"},
        {"tp_rank": 1, "tp_size": 2},
        {"integrity": "hmac-sha256"},
    ]
    seen = {tuple(base)}
    for change in variants:
        fields = {**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, **change}
        keys = block_keys(Namespace(**fields), TOKENS)
        assert not set(keys) & set(base), change
        seen.add(tuple(keys))
    assert len(seen) == len(variants) + 1
    # the salt stays out of the namespace id the tier sees, but not out of the keys
    salted = Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, "salt": b"s"})
    assert salted.id == NS.id and salted.root != NS.root


@pytest.mark.parametrize(
    "tokens, error",
    [
        ([[1, 2], [3, 4]], TokenError),
        ([1.5, 2.0], TokenError),
        ([-1, 2], TokenError),
        ([2**32, 1], TokenError),
        (["a", "b"], TokenError),
    ],
)
def test_bad_tokens_are_refused(tokens, error) -> None:
    with pytest.raises(error):
        block_keys(NS, tokens)


def test_short_and_empty_inputs_have_no_keys() -> None:
    assert block_keys(NS, []) == []
    assert block_keys(NS, TOKENS[:15]) == []


@pytest.mark.parametrize(
    "change",
    [
        {"model": ""},
        {"layers": 0},
        {"block_tokens": -1},
        {"tp_rank": 2, "tp_size": 2},
        {"salt": "str"},
        {"mac_key": "str"},
        {"integrity": "md5"},
        {"page_tokens": 3},  # does not divide the block
        {"page_tokens": -1},
        {"page_tokens": 32},  # larger than the block
    ],
)
def test_bad_namespaces_are_refused(change) -> None:
    with pytest.raises(NamespaceError):
        Namespace(**{**NS.fields(), "dtype": NS.dtype, "layout": NS.layout, **change})


def test_a_mac_key_makes_a_namespace_of_its_own_and_never_leaves_the_client() -> None:
    fields = {**NS.fields(), "dtype": NS.dtype, "layout": NS.layout}
    a = Namespace(**fields, mac_key=b"secret a")
    b = Namespace(**fields, mac_key=b"secret b")
    assert a.integrity == b.integrity == MAC_SCHEME
    assert a.id == b.id != NS.id  # blocks with and without a MAC never share keys
    assert not set(block_keys(a, TOKENS)) & set(block_keys(NS, TOKENS))
    assert "mac_key" not in a.fields() and "salt" not in a.fields()
    wire = namespace_to_proto(a)
    assert wire.integrity == MAC_SCHEME and b"secret a" not in wire.SerializeToString()
    back = namespace_from_proto(wire)
    assert back.id == a.id and back.integrity == MAC_SCHEME and back.mac_key == b""
    assert namespace_from_proto(namespace_to_proto(NS)).id == NS.id
