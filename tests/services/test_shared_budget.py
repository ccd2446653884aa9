"""Shards of one node sharing its budget (services/budget.py): budget moves to the store whose
evictions are youngest and away from the one holding the oldest blocks, budgets always sum to
the total, a restarted shard rejoins with a fair share, tenant quotas follow the moved budget,
and through a real tier a shard taking most of the traffic holds more than a fixed slice. No
test depends on timing: stores share a batch counter for a clock, and every move is driven by
the order of operations."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
import ray
import torch

from kvpool.client import namespace_for
from kvpool.kernels.codec import CodecConfig, encode
from kvpool.proto.blockformat import parse_header, seal
from kvpool.ring import Placement, Ring
from kvpool.services import budget
from kvpool.services.budget import SharedBudget
from kvpool.services.store import BlockStore
from kvpool.services.tier import TierConfig, start_tier
from kvpool.transport import BlockPut, ClientConfig, TierClient

BLOCK = 100  # bytes of a block in the in-process stores
EACH = 10 * BLOCK  # each store's fair share


def stores(tmp_path: Path, n: int, **kw: object) -> tuple[list[BlockStore], SharedBudget]:
    """n stores sharing n x EACH on one batch counter; and a view of the table."""
    path = str(tmp_path / "node.budget")
    budget.create(path, n, EACH)
    clock: Callable[[], int] = itertools.count(1).__next__
    made = [BlockStore(EACH, share=SharedBudget(path, i), clock=clock, **kw)  # type: ignore[arg-type]
            for i in range(n)]  # fmt: skip
    return made, SharedBudget(path, 0)


def key(store: int, i: int) -> bytes:
    return bytes([store]) + i.to_bytes(31, "big")


def put(store: BlockStore, s: int, i: int, tenant: str | None = None) -> None:
    store.put(key(s, i), key(s, i), 0, b"x" * BLOCK, None, tenant)


def total(view: SharedBudget) -> int:
    rows = view.rows()
    assert sum(r.budget for r in rows) == view.total  # budgets always sum to the total
    return view.total


def test_budget_moves_to_the_store_evicting_younger_blocks_and_never_exceeds_the_total(
    tmp_path: Path,
) -> None:
    (a, b), view = stores(tmp_path, 2)
    for i in range(10):  # both full: no spare room anywhere
        put(a, 0, i)
        put(b, 1, i)
    # b reads all its blocks after every put of a: its oldest block is always younger than the
    # block a evicts, so one LRU over both would evict a's; a keeps its own budget
    for i in range(10, 30):
        put(a, 0, i)
        b.get_many([key(1, j) for j in range(10)])
        assert total(view) == 2 * EACH
    assert a.budget_bytes == b.budget_bytes == EACH
    assert a.stats.evictions == 20 and b.stats.evictions == 0
    # b goes idle: its blocks age, a's new blocks are younger: a takes budget from b
    for i in range(30, 50):
        put(a, 0, i)
        assert total(view) == 2 * EACH
        b.snapshot()  # b's next call evicts down to what it was left
        assert b.stats.bytes <= b.budget_bytes
        assert a.stats.bytes + b.stats.bytes <= 2 * EACH + EACH // budget.DEBT
    assert a.budget_bytes > EACH and len(a) > 10
    assert b.budget_bytes == EACH // budget.FLOOR  # the floor: a hot store cannot starve it
    assert a.budget_bytes + b.budget_bytes == 2 * EACH


def test_unused_room_goes_first_and_each_step_is_bounded(tmp_path: Path) -> None:
    (a, b, c), view = stores(tmp_path, 3)
    put(b, 1, 0)  # b holds one block, c none
    for i in range(14):
        put(a, 0, i)
        budgets = [r.budget for r in view.rows()]
        assert sum(budgets) == 3 * EACH and min(budgets) >= EACH // budget.FLOOR
    assert a.budget_bytes == EACH + 4 * BLOCK and len(a) == 14  # no eviction: it took room
    assert a.stats.evictions == 0
    # taken from the store with the most room (c, empty) before b
    assert c.snapshot().budget_bytes < b.snapshot().budget_bytes


def test_a_restarted_shard_rejoins_with_a_fair_share(tmp_path: Path) -> None:
    (a, b, _c), view = stores(tmp_path, 3)
    for i in range(25):  # a takes the others' unused room, down to their floors
        put(a, 0, i)
    assert [r.budget for r in view.rows()] == [2 * EACH, EACH // 2, EACH // 2]
    path = str(tmp_path / "node.budget")
    assert SharedBudget(path, 0).join() == EACH  # a's new life: a fair share, the rest given back
    assert [r.budget for r in view.rows()] == [EACH, EACH, EACH]
    # memory pressure took 400 bytes from b (and from the total); b restarts: they come back
    b.snapshot()
    assert b.resize(b.budget_bytes - 400) == 0 and total(view) == 3 * EACH - 400
    assert b.yielded_bytes == 400
    assert SharedBudget(path, 1).join() == EACH and total(view) == 3 * EACH


def test_pressure_shrinks_the_total_and_rebalancing_never_hands_it_back(tmp_path: Path) -> None:
    (a, b), view = stores(tmp_path, 2)
    for i in range(10):
        put(b, 1, i)
    b.resize(EACH - 3 * BLOCK)  # pressure on b: the node's total shrinks with it
    assert total(view) == 2 * EACH - 3 * BLOCK and len(b) == 7 and b.yielded_bytes == 3 * BLOCK
    for i in range(40):  # a takes what b does not use, but never the bytes pressure took
        put(a, 0, i)
        assert total(view) == 2 * EACH - 3 * BLOCK
    b.resize(b.budget_bytes + b.yielded_bytes)  # the pressure passed
    assert total(view) == 2 * EACH and b.yielded_bytes == 0


def test_tenant_quotas_are_shares_of_the_budget_the_store_has_now(tmp_path: Path) -> None:
    (a, _b), view = stores(tmp_path, 2, tenant_quota=0.6)
    for i in range(40):  # tenants t and u on a: a fills, then takes b's unused room
        put(a, 0, i, tenant="tu"[i % 2])
        assert a.stats.bytes <= a.budget_bytes
    assert a.budget_bytes == EACH + EACH // 2  # b is at its floor
    for i in range(40, 60):  # t scans: its quota, a share of a's budget now, evicts its own
        put(a, 0, i, tenant="t")
    t = sum(key(0, i) in a for i in [*range(0, 40, 2), *range(40, 60)]) * BLOCK
    assert t > 0.6 * EACH  # more than its share of the budget a started with
    assert t == a.quota_bytes("t") == int(0.6 * a.budget_bytes)  # its share of what a has now
    u = sum(key(0, i) in a for i in range(1, 40, 2)) * BLOCK
    assert u == a.budget_bytes - t  # the rest is u's: t's scan stopped at its quota
    assert a.stats.quota_evictions > 0 and total(view) == 2 * EACH


def test_bad_tables_and_slots_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.budget"
    budget.create(str(path), 2, EACH)
    with pytest.raises(ValueError, match="slot 2 is not in the table's 2 slots"):
        SharedBudget(str(path), 2)
    (tmp_path / "junk").write_bytes(b"x" * 96)
    with pytest.raises(ValueError, match="not a kvpool budget table"):
        SharedBudget(str(tmp_path / "junk"), 0)
    with pytest.raises(ValueError, match="slots >= 1"):
        budget.create(str(path), 0, EACH)


# -- through a real tier ------------------------------------------------------------------------

CODEC = CodecConfig(2, 2, 32)
B = 64
NS = namespace_for("test/shared-budget", 1, 1, 32, torch.float16, CODEC, block_tokens=B)


def blob() -> bytes:
    g = torch.Generator().manual_seed(0)
    shape = (1, 1, B, 32)
    return encode(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half(),
                  CODEC)  # fmt: skip


def bound(data: bytes, k: bytes) -> bytes:
    header = parse_header(data)
    return seal(dataclasses.replace(header, namespace_id=NS.id, key=k, start_position=0),
                memoryview(data)[header.header_len :])  # fmt: skip


def test_a_tier_shard_taking_most_of_the_traffic_gets_more_than_a_slice(ray_session: None) -> None:
    data = blob()
    size = len(data)
    tier = start_tier(TierConfig(shards=3, budget_bytes=8 * size, shard_cpus=0.05,
                                 metrics_port=None, name="shared-budget"))  # fmt: skip
    try:
        ids = sorted(sid for sid, _, _ in tier.topology())
        place = Placement(Ring(ids))
        hot = ids[0]
        keys = [k for k in (i.to_bytes(8, "big") * 4 for i in range(2000))
                if place.owners(k)[0] == hot][:20]  # fmt: skip

        async def go() -> dict[str, tuple[int, int]]:
            client = TierClient(tier.endpoint, ClientConfig(timeout_s=30.0))
            try:
                for k in keys:  # one at a time: the order of operations decides every move
                    await client.put_many(NS, [BlockPut(k, k, 0, bound(data, k))], prefix=[k])
                return {s.shard_id: (s.budget_bytes, s.blocks) for s in await client.stats()}
            finally:
                await client.close()

        got = asyncio.run(go())
        assert sum(b for b, _ in got.values()) == 3 * 8 * size  # shares of one total
        assert got[hot][0] > 8 * size and got[hot][1] > 8  # more than a fixed slice holds
        assert all(b >= 8 * size // budget.FLOOR for b, _ in got.values())
        # the hot shard dies and Ray restarts it: empty, it rejoins with a fair share
        tier.kill_shard(hot)
        tier.wait_serving()
        stats = ray.get(tier.shards[hot].stats.remote())
        assert stats["budget_bytes"] == 8 * size and stats["blocks"] == 0
        rest = asyncio.run(go_stats(tier.endpoint))
        assert sum(rest.values()) == 3 * 8 * size
    finally:
        tier.shutdown()
    assert tier.budget_table is not None and not Path(tier.budget_table).exists()


async def go_stats(endpoint: str) -> dict[str, int]:
    client = TierClient(endpoint, ClientConfig(timeout_s=30.0))
    try:
        return {s.shard_id: s.budget_bytes for s in await client.stats()}
    finally:
        await client.close()


def test_kvpool_serve_shares_by_default_and_fixed_budgets_turns_it_off() -> None:
    from kvpool.cli import build_parser

    assert TierConfig().shared_budget
    assert not build_parser().parse_args(["serve"]).fixed_budgets
    assert build_parser().parse_args(["serve", "--fixed-budgets"]).fixed_budgets


def _write_budgets(path: str, rounds: int) -> None:
    """Another shard's process: give budget back and take it again, `rounds` times."""
    share = SharedBudget(path, 0)
    for _ in range(rounds):
        share.resize(-(1 << 16) - 1)
        share.resize((1 << 16) + 1)
    share.close()


def test_a_reader_without_the_lock_never_sees_a_budget_half_written(tmp_path: Path) -> None:
    """Shards read their own budget on every call without the lock while other processes write
    it (a taker, or memory pressure). A field is read and written whole: a reader sees the old
    value or the new one, never 0 or a mix (struct's pack_into zeroed the field first; a shard
    that read the 0 evicted everything and failed every later call)."""
    import multiprocessing

    path = str(tmp_path / "t.budget")
    budget.create(path, 2, (1 << 24) + 12345)  # the values written cross byte boundaries
    allowed = {(1 << 24) + 12345, (1 << 24) + 12345 - (1 << 16) - 1}
    reader = SharedBudget(path, 0)
    writer = multiprocessing.get_context("spawn").Process(
        target=_write_budgets, args=(path, 20_000)
    )
    writer.start()
    seen: set[int] = set()
    try:
        while writer.is_alive() or not seen:
            for _ in range(1000):
                seen.add(reader.budget())
                seen.add(reader.total - (1 << 24) - 12345)  # the other row's budget is fixed
    finally:
        writer.join(timeout=120)
        reader.close()
    assert writer.exitcode == 0
    assert seen <= allowed, sorted(seen - allowed)[:5]


def test_a_block_over_a_shards_budget_but_within_a_fair_share_is_taken_or_evicted(
    tmp_path: Path,
) -> None:
    """With a shared budget a store takes any block up to a fair share of the node's, even
    when its own budget is smaller: it takes budget for it, or evicts (never over its budget,
    never the node over its total); a block over a fair share is refused before anything."""
    from kvpool.services.store import BlockTooLargeError

    (a, b, _c), view = stores(tmp_path, 3)
    for i in range(25):  # a takes the others' unused room, down to their floors
        put(a, 0, i)
    b.snapshot()  # b follows the table on its next call
    assert b.budget_bytes == EACH // 2
    big = b"y" * (EACH * 8 // 10)  # over b's budget, within a fair share
    b.put(key(1, 0), key(1, 0), 0, big, None, None)
    assert total(view) == 3 * EACH
    assert b.snapshot().bytes <= b.budget_bytes and a.snapshot().bytes <= a.budget_bytes
    assert b.budget_bytes > EACH // 2  # it took budget for the block (from a, whose are older)
    with pytest.raises(BlockTooLargeError):
        b.put(key(1, 1), key(1, 1), 0, b"z" * (EACH + 1), None, None)
    assert key(1, 1) not in b


def test_a_donor_that_already_owes_counts_as_younger_by_what_it_owes(tmp_path: Path) -> None:
    """Shard 1 published the oldest next victim but already gave away 150 bytes it has not
    evicted yet; shard 2's victim is a little younger and it owes nothing. Evicting what it
    owes takes shard 1 past shard 2's age, so the step comes from shard 2 (one LRU over the
    node would evict shard 2's block next). Taken as published, shard 1 would give again."""
    path = str(tmp_path / "node.budget")
    budget.create(path, 3, 1000)
    v0, v1, v2 = (SharedBudget(path, i) for i in range(3))
    with v0._locked():
        rows = v0._rows()
        rows[0].budget, rows[1].budget = 1150, 850
        v0._write(rows, 3000)
    v1.publish(1000, 10)  # holds 1,000 bytes against a budget of 850: owes 150
    v2.publish(1000, 12)
    assert v0.rebalance(30, 100, now=110) == 1250
    assert [r.budget for r in v0.rows()] == [1250, 850, 900]


def test_the_node_has_one_target_that_every_shards_ghosts_move(tmp_path: Path) -> None:
    """ARC's target is one share of the budget for the node's shards: a ghost hit on one shard
    moves it by the ghost's size over that shard's budget, every shard reads it as a share of
    its own budget, and it stays within [0, the whole budget]."""
    (a, b), view = stores(tmp_path, 2)
    assert a._target == b._target == EACH // 2  # it starts at half
    a._move_target(BLOCK)  # a recent ghost on a: a tenth of a's budget
    assert a._target == b._target == EACH // 2 + BLOCK
    b._move_target(-3 * BLOCK)
    assert a._target == b._target == EACH // 2 - 2 * BLOCK
    view.move_target(10 * EACH, EACH)
    assert b._target == EACH
    view.move_target(-10 * EACH, EACH)
    assert a._target == 0
    alone = BlockStore(EACH)  # without a shared budget: its own
    alone._move_target(BLOCK)
    assert alone._target == EACH // 2 + BLOCK and a._target == 0
