"""One node's block budget shared by the shards on it: a small table in a file every shard maps.

Where it stands: under each shard's BlockStore (services/store.py). Without it every shard has a
fixed slice of the node's DRAM, while the bytes and the reuse do not fall evenly on shards (a
shared run head puts many prompts' continuations on one shard): a hot shard evicts blocks
younger than those a cold one keeps. With it the shards of a node approximate one eviction
order over all of them, as one store would.

The table: a header (magic, slots, the current total, the node's ARC target) and one row per
shard slot: its budget,
the age of its next victim (the batch stamp of the block its policy would evict next, on a
clock every shard of the node shares: `time.monotonic_ns`, or one counter in a process), the
bytes it holds, and the bytes it gave back under memory pressure. A shard writes its own age
and bytes after each call, without a lock (no one else writes them); budgets and the total
change only under an exclusive `flock` of the file, so they always sum to the total. flock is
released when its holder dies, so a killed shard never blocks the others. Every field is one
aligned native 8-byte word, read and written whole (a memoryview of words: one load or store
each), so a reader without the lock sees the old value or the new one, never a mix: `struct`'s
pack_into zeroes a field before it writes its bytes, and a shard that read its budget then
saw 0, evicted everything and failed every later call.

The target (services/store.py: how much of a budget blocks seen once may hold before newer
ones go before older proven ones) is one share for the whole node: every shard's ghost hits
move it (by the ghost's size over that shard's budget, under the lock), and every shard reads
it. Per shard, each target learned from a sixteenth of the evidence, and the shards of one
node, which approximate one store, disagreed about what the next bytes of each side are worth
(chosen on synthetic traces only, at a real node's per-shard size: +0.66 points mean over 20
cells of 5 mixes, none lower; benchmarks/results/2026-12-07-policy-sweep-cpu.log).

Rebalancing (`rebalance`) is driven by evictions, not by time, so a given order of operations
always gives the same budgets: a shard about to evict a block for room first asks the table
for the bytes it needs, from the shard with the most room it does not use, else from the shard
whose next victim is older than its own (one LRU over the node would evict that one). A donor
evicts what it gave on its next call, so its published age is discounted by what it already
owes: taken as read, the oldest shard would keep giving until it owed the most it may, then
evict blocks younger than other shards' next victims. The
store does not ask when its policy evicts a recent block because recent blocks are over their
target (its scan resistance: that block is worth less than anything another shard holds).
Every step is bounded: at least 1/STEPS and at most 1/CAP of a fair share (the total over the
slots), no shard is taken below 1/FLOOR of a fair share, and none that would then hold more
than 1/DEBT of a fair share over its budget. A donor evicts down to its new budget on its next
call (or stats call), so the node holds at most a step per donor over the total.

Memory pressure (services/shard.py yield_memory) shrinks a shard's budget and the total by the
same bytes, and grows both back (`resize`); the bytes given back are kept in the shard's row,
so a shard restarted meanwhile (`join`) returns them to the total and takes a fair share.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_MAGIC = b"kvpbudg2"
_HEADER = struct.Struct("=8sqqq")  # magic, slots, total, target (native words: the docstring)
_ROW = struct.Struct("=qqqq")  # budget, age, held, yielded
_HEADER_BYTES = 32
_HEADER_WORDS, _ROW_WORDS, _TOTAL, _TARGET = _HEADER_BYTES // 8, _ROW.size // 8, 2, 3
TARGET_ONE = 1 << 30  # the target's unit: the whole budget
# In fair shares (the total over the slots), chosen on synthetic traces only
# (benchmarks/policy_sweep.py; results/2026-12-07-policy-sweep-cpu.log):
FLOOR = 2  # no shard is taken below 1/FLOOR of a fair share
STEPS = 256  # a step of budget is what the taker must evict, at least 1/STEPS of a fair share
CAP = 8  # and at most 1/CAP of one
DEBT = 4  # a donor may hold at most 1/DEBT of a fair share over its budget


@dataclass
class Row:
    budget: int
    age: int  # the clock stamp of the block the shard would evict next (0: none)
    held: int
    yielded: int  # bytes given back under memory pressure, not yet taken again


def create(path: str, slots: int, budget_bytes: int) -> None:
    """Write a table of `slots` shards of `budget_bytes` each (replacing any old one)."""
    if slots < 1 or budget_bytes < slots:
        raise ValueError(f"need slots >= 1 and a budget of at least 1 byte each, got {slots}")
    data = bytearray(_HEADER_BYTES + slots * _ROW.size)
    _HEADER.pack_into(data, 0, _MAGIC, slots, slots * budget_bytes, TARGET_ONE // 2)
    for i in range(slots):
        _ROW.pack_into(data, _HEADER_BYTES + i * _ROW.size, budget_bytes, 0, 0, 0)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class SharedBudget:
    """Shard `slot`'s view of the table at `path` (made by `create`)."""

    def __init__(self, path: str, slot: int) -> None:
        self._fd = os.open(path, os.O_RDWR)  # an open file of its own: flock excludes threads too
        try:
            self._map = mmap.mmap(self._fd, 0)
            magic, slots, _, _ = _HEADER.unpack_from(self._map, 0)
            if magic != _MAGIC or len(self._map) != _HEADER_BYTES + slots * _ROW.size:
                raise ValueError(f"{path} is not a kvpool budget table")
        except Exception:
            os.close(self._fd)
            raise
        if not 0 <= slot < slots:
            raise ValueError(f"slot {slot} is not in the table's {slots} slots")
        self.slot, self.slots = slot, slots
        self._words = memoryview(self._map).cast("q")  # whole 8-byte loads and stores
        self._own = _HEADER_WORDS + slot * _ROW_WORDS

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)

    # -- reads (no lock: each field is one aligned 8-byte word) ------------------------------

    @property
    def total(self) -> int:
        return int(self._words[_TOTAL])

    def budget(self) -> int:
        """This shard's budget now (lowered by takers since it last looked, maybe)."""
        return int(self._words[self._own])

    def target(self, budget: int) -> int:
        """The node's target for the bytes of blocks seen once (the store's ARC target, one
        for all the node's shards, as a share of their budgets), in bytes of `budget`."""
        return (budget * int(self._words[_TARGET]) + TARGET_ONE // 2) // TARGET_ONE

    def yielded(self) -> int:
        return int(self._words[self._own + 3])

    def rows(self) -> list[Row]:
        with self._locked():
            return self._rows()

    # -- writes ------------------------------------------------------------------------------

    def publish(self, held: int, age: int) -> None:
        """This shard's bytes held and the stamp of its next victim (its own fields: no lock)."""
        self._words[self._own + 1] = age
        self._words[self._own + 2] = held

    def move_target(self, delta: int, budget: int) -> None:
        """A ghost hit on this shard: the node's target moves by `delta` bytes of this shard's
        `budget` (the evidence of every shard moves one target; within [0, the budget])."""
        with self._locked():
            share = int(self._words[_TARGET]) + delta * TARGET_ONE // max(1, budget)
            self._words[_TARGET] = min(TARGET_ONE, max(0, share))

    def join(self) -> int:
        """A (re)started shard: what its earlier life gave back under pressure returns to the
        total, and it takes a fair share, the difference spread over the others (taken from
        them in proportion to what they hold above the floor). Returns its budget."""
        with self._locked():
            rows = self._rows()
            own = rows[self.slot]
            total = self.total + own.yielded
            fair, floor = total // self.slots, total // self.slots // FLOOR
            others = [i for i in range(self.slots) if i != self.slot]
            budget = own.budget + own.yielded
            if budget > fair and others:  # give the excess away, evenly
                each, rest = divmod(budget - fair, len(others))
                for n, i in enumerate(others):
                    rows[i].budget += each + (n < rest)
                budget = fair
            elif budget < fair:
                room = {i: max(0, rows[i].budget - floor) for i in others}
                need, have = fair - budget, sum(room.values())
                for i, r in room.items():
                    take = r if have <= need else need * r // have
                    rows[i].budget -= take
                    budget += take
            rows[self.slot] = Row(budget, 0, 0, 0)
            self._write(rows, total)
            return budget

    def rebalance(self, victim: int, need: int, now: int) -> int:
        """This shard must evict `need` bytes, its next victim stamped `victim`: take a step
        of budget (`need`, at least 1/STEPS and at most 1/CAP of a fair share) from the shard
        with the most unused room (at least a step), else from the one whose next victim is
        the oldest when older than `victim` (one LRU over the node would evict that one),
        never below the floor nor past what a donor may owe (see the module's docstring).
        A donor's next victim is the one it will reach after evicting what it owes, with
        this step: its published age moved toward `now` (the clock at this call) in proportion
        to those bytes over the bytes it holds, as if its blocks' stamps were spread evenly (it
        publishes only its first victim's age, and until its next call takers would see that
        age however much it already gave). Returns this shard's budget."""
        with self._locked():
            rows = self._rows()
            total = self.total
            fair = total // self.slots
            floor, step = fair // FLOOR, max(1, fair // STEPS, min(need, fair // CAP))
            owe = fair // DEBT  # what a donor may owe (hold over its budget) after this step
            donors = [i for i, r in enumerate(rows)
                      if i != self.slot and r.held - r.budget + step <= owe
                      and r.budget - step >= floor]  # fmt: skip
            spare = [(rows[i].budget - rows[i].held, i) for i in donors]
            room, donor = max(spare, default=(0, -1))
            if room < step:

                def next_victim(r: Row) -> int:
                    owed = max(0, r.held - r.budget) + step
                    return r.age + (max(now, r.age) - r.age) * owed // max(1, r.held)

                oldest, donor = min(((next_victim(rows[i]), i) for i in donors),
                                    default=(victim, -1))  # fmt: skip
                if oldest >= victim:
                    donor = -1
            if donor >= 0:
                rows[donor].budget -= step
                rows[self.slot].budget += step
                self._write(rows, total)
            return rows[self.slot].budget

    def resize(self, delta: int) -> int:
        """Memory pressure: this shard's budget and the total change by `delta` bytes (negative:
        given back); returns its budget."""
        with self._locked():
            rows = self._rows()
            own = rows[self.slot]
            delta = max(delta, 1 - own.budget)
            own.budget += delta
            own.yielded = max(0, own.yielded - delta)
            self._write(rows, self.total + delta)
            return own.budget

    # -- the table ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _rows(self) -> list[Row]:
        w, first = self._words, _HEADER_WORDS
        return [Row(*w[first + i * _ROW_WORDS : first + (i + 1) * _ROW_WORDS])
                for i in range(self.slots)]  # fmt: skip

    def _write(self, rows: list[Row], total: int) -> None:
        """Budgets (and the own row's yielded bytes) and the total; the others' age and held
        are theirs and left alone."""
        assert sum(r.budget for r in rows) == total, "budgets must sum to the total"
        assert all(r.budget > 0 for r in rows), "every budget stays positive"
        w = self._words
        for i, r in enumerate(rows):
            at = _HEADER_WORDS + i * _ROW_WORDS
            w[at] = r.budget
            if i == self.slot:
                w[at + 1], w[at + 2], w[at + 3] = r.age, r.held, r.yielded
        w[_TOTAL] = total
