"""The client's hints across shards (services/store.py): what one store knows of a block's
parent, carried to the shard of a block whose parent lives elsewhere. Hints change eviction
order only; bad ones are refused before anything is stored."""

from __future__ import annotations

import hashlib

import pytest

from kvpool.services.store import BRANCHED, EXTENDS, BlockStore


def k(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def scan(store: BlockStore, blocks: int) -> None:
    """One-time prompts nobody reads: two blocks each, never read."""
    for i in range(blocks // 2):
        head = k(f"scan/{i}/0")
        store.put(head, head, 0, b"s" * 100)
        store.put(k(f"scan/{i}/1"), head, 1, b"s" * 100, parent=head)


def test_extends_makes_a_block_with_a_remote_parent_start_frequent() -> None:
    """A block whose parent lives on another shard (no parent here) starts frequent with
    EXTENDS, as the only child of a proven block does in one store, and a scan does not flush
    it; without the hint it starts recent and goes with the scan."""
    kept = {}
    for hint in (EXTENDS, 0):
        store = BlockStore(1000)  # ten blocks
        turn = k(f"turn/{hint}")
        store.put_many([(turn, k("chain"), 8, b"t" * 100, None, None)], [hint])
        scan(store, 60)
        kept[hint] = turn in store
    assert kept == {EXTENDS: True, 0: False}


def test_a_local_parent_wins_over_the_hint() -> None:
    """With its parent on this shard, the shard's own knowledge decides: a second branch off a
    read block starts recent whatever the client says; EXTENDS at position 0, or naming a
    parent that is gone here (unreachable), changes nothing."""
    store = BlockStore(1000)
    parent = k("p")
    store.put(parent, parent, 0, b"p" * 100)
    assert store.get(parent) is not None
    first, second, orphan, root = k("c1"), k("c2"), k("orphan"), k("root")
    store.put_many([(first, parent, 1, b"1" * 100, parent, None),
                    (second, parent, 1, b"2" * 100, parent, None),
                    (orphan, parent, 2, b"o" * 100, k("gone"), None),
                    (root, root, 0, b"r" * 100, None, None)],
                   [0, EXTENDS, EXTENDS, EXTENDS])  # fmt: skip
    scan(store, 60)
    assert parent in store and first in store  # the proven prefix and its only continuation
    assert second not in store and orphan not in store and root not in store


def test_a_block_continued_elsewhere_is_a_branch_point() -> None:
    """BRANCHED (at put, or `mark_branched` later) says a next block lives on another shard:
    a block then branching off it here starts recent, as a second child does in one store.
    `branched` reports it, and local children, for the client's next hint."""
    outcome = {}
    for how in ("none", "put", "mark"):
        store = BlockStore(1000)
        parent = k(f"p/{how}")
        store.put_many([(parent, parent, 7, b"p" * 100, None, None)],
                       [BRANCHED if how == "put" else 0])  # fmt: skip
        assert store.get(parent) is not None
        assert store.branched([parent, k("absent")]) == [how == "put", None]
        if how == "mark":
            assert store.mark_branched([parent, k("absent")]) == 1
        assert store.branched([parent]) == [how != "none"]
        child = k(f"c/{how}")
        store.put(child, parent, 8, b"c" * 100, parent=parent)
        assert store.branched([parent]) == [True]  # a local child counts too
        scan(store, 60)
        outcome[how] = child in store
    assert outcome == {"none": True, "put": False, "mark": False}


def test_branched_and_mark_change_no_recency() -> None:
    """Reporting and marking touch nothing: the oldest block still goes first."""
    store = BlockStore(300)
    keys = [k(f"b{i}") for i in range(3)]
    for i, key in enumerate(keys):
        store.put(key, key, 0, bytes([i]) * 100)
    store.branched(keys[:1])
    store.mark_branched(keys[:1])
    store.put(k("new"), k("new"), 0, b"n" * 100)
    assert [key in store for key in keys] == [False, True, True]


def test_bad_hints_are_refused_before_anything_is_stored() -> None:
    store = BlockStore(1000)
    item = (k("a"), k("a"), 1, b"a" * 100, None, None)
    for hints, match in [([4], "not a combination"), ([-1], "not a combination"),
                         ([EXTENDS, 0], "2 hints for 1 blocks"),
                         ([True], "not a combination")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            store.put_many([item], hints)
    assert len(store) == 0
    assert store.put_many([item], [EXTENDS | BRANCHED]) == [True]
