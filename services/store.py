"""A shard's in-memory block store: immutable blobs under a byte budget.

Where it stands: behind the gRPC servicer of one shard (services/server.py). It stores opaque
bytes under store keys that already commit to (tenant, namespace, block key) (see
`services.security.store_key`), so no tenant or namespace can claim, shadow or evict-by-
collision another's blocks. It never imports torch or the kernels.

Eviction knows that stored prefixes form a tree. A block's parent is the block before it in its
prefix (`put(parent=...)`); real traffic starts almost every request with the same blocks, so
the root is shared by everything, and a block is worth nothing once an earlier block of its
prefix is gone (lookups stop at the first miss). The policy:

- Recency first, proven blocks protected by evidence (ARC's two sides, counted in bytes, with
  LRU as the rule between them). Blocks seen once live in `recent`, blocks seen again (read,
  or put again soon after their eviction) in `frequent`. The block that goes is the older of
  the two sides' least recent leaves, as in LRU, except that while `recent` holds more than
  its target (ARC's p) a newer recent block goes before an older proven one: so a scan of
  blocks read once only cycles `recent`'s target, and with the target at the whole budget the
  store is LRU over the prefix tree. Each side has a ghost list of the keys it evicted lately
  (keys, sizes and where in the side's eviction stream, no data; one budget's worth). The
  target moves only on evidence about choices it made, measured at its margin: an eviction
  is a choice when the older leaf was proven and the target lies within a window (`budget /
  _WINDOW`) of what `recent` holds, so that moving the target by less than the window would
  have evicted the other leaf; and a block so evicted that is put again within the last
  window of bytes its side evicted would have been kept had its side had that much more room.
  Such a recent ghost raises the target by its size, such a frequent ghost lowers it (with a
  node's shared budget the target is the node's, moved by every shard's ghosts); equal
  windows on both sides compare what the next bytes of each side are worth. (ARC counts every
  ghost hit, which compares how much traffic each side evicts, not what more room is worth:
  on chat traffic, where almost every block is read again and both sides are alike, its
  target sank while it decided nothing, and it lost to LRU.) Frequency belongs to a prefix,
  not to a block: a block put as the only child of a
  frequent block (the next turn of a conversation whose earlier turns were just read) starts
  frequent; a block that branches off a block with other children (a new prompt under a shared
  system prompt, a scan) starts recent and must prove itself.
- Leaves first. Touching a block (get or put) also refreshes its parent when the parent lives
  on this shard, and a batch read touches its blocks deepest first: an ancestor is never older
  than its descendants in its list, so the LRU end holds leaves. The shard counts each block's
  local children, and eviction passes over a block that still has some (it goes back to the
  MRU end: its descendants make it worth keeping). The root everyone shares is touched by every
  request and never reaches the end.
- Across shards each shard knows only its own part of a tree: a block whose parent lives
  elsewhere is a local root, one whose children live elsewhere a local leaf. Nothing is ever
  wrong: a block whose ancestor another shard evicted is unreachable until that ancestor is put
  again (then it is a hit again), and meanwhile it ages out like any block nobody reads.
  What one store knows from the parent, the class rule above, the client carries across
  shards as hints (`put_many(hints=)`, `branched`, `mark_branched`; they change eviction
  order only, never what is stored or found): EXTENDS on a block whose parent lives on another
  shard says that parent is proven and had no other child (it starts frequent, as under one
  store; with a parent on this shard the shard's own knowledge wins), and BRANCHED on a block
  (or `mark_branched` of a stored one) says a next block of its prefix lives on another shard,
  so a later block branching off it here starts recent. BRANCHED is sticky: a block that has
  been continued once is a branch point. `branched` reports it to the client, with local
  children, for the next request's hint.
- Tenant quotas (optional): a tenant over its share of the budget evicts its own least recent
  leaves first, so one tenant's scan cannot evict another's working set.
- A budget shared by the shards of a node (optional, `kvpool serve`'s default;
  services/budget.py): before evicting a block for room, the store asks the node's table for
  the bytes it needs, which a shard with unused room, or one whose next victim is older, gives
  up (and evicts on its next call). So the node's shards approximate one eviction order, as one
  store with their whole budget would, instead of each turning over its fixed slice. It does
  not ask when its policy evicts a recent block before an older proven one (scan resistance).
  Batches are stamped on a clock the shards share so that their victims' ages compare. Quotas
  are shares of the budget the store has at the time.

Every operation is O(log n) (a heap per queue, with lazy deletion; the ancestor walks and the
pass over inner blocks at the head of a queue are bounded). Memory per block beyond its bytes:
see `benchmarks/trace_replay.py` (measured with tracemalloc).
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from kvpool.proto.messages import BRANCHED, EXTENDS, HINTS
from kvpool.services.budget import SharedBudget

Blob = bytes | bytearray  # a stored block; never mutated once stored
PutItem = tuple[bytes, bytes, int, "Blob", "bytes | None", "str | None"]
# (key, chain, position, data, parent key or None, tenant or None)

_PASS_LIMIT = 64  # inner blocks passed over at the LRU end before a victim is taken anyway
_RAISE_LIMIT = 64  # ancestors one touch refreshes (keeps a put O(log n) however deep)
_WINDOW = 8  # a ghost judges the target when within the last budget / _WINDOW bytes evicted


class BlockTooLargeError(ValueError):
    """A block larger than the whole byte budget of the shard (or its tenant's quota)."""


class _Node:
    """One stored block. `parent` is the parent's node when it was on this shard at put time
    (a node object, so a parent evicted and put again is a new node: counts stay right).
    `tick` is the batch that last touched it; `stamp` tells its current heap entries from
    stale ones."""

    __slots__ = ("branched", "chain", "children", "data", "frequent", "key", "live", "parent",
                 "position", "size", "stamp", "tenant", "tick")  # fmt: skip

    def __init__(
        self, key: bytes, chain: bytes, position: int, data: Blob, parent: _Node | None,
        tenant: str | None,
    ) -> None:  # fmt: skip
        self.key, self.chain, self.position, self.data = key, chain, position, data
        self.size = len(data)
        self.parent, self.tenant = parent, tenant
        self.children = 0  # live children on this shard
        self.frequent = False  # in `frequent` (seen twice), else in `recent`
        self.branched = False  # a next block of its prefix lives on another shard (a hint)
        self.live = True
        self.tick = self.stamp = 0


class _Queue:
    """Blocks in eviction order: least recent batch first, and within one batch the deepest
    block first, so an ancestor touched with its descendants outlives them. A binary heap with
    lazy deletion: a touch pushes a new entry and stale ones are skipped when they surface;
    the heap is rebuilt when stale entries outnumber live ones. O(log n) per operation."""

    def __init__(self) -> None:
        self.heap: list[tuple[int, int, int, _Node]] = []
        self.nodes: dict[bytes, _Node] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def push(self, node: _Node) -> None:
        """(Re)place `node` at its current tick; older entries of it go stale."""
        if len(self.heap) > 2 * len(self.nodes) + 64:  # amortized O(1): n stale entries first
            self.heap = [(n.tick, -n.position, n.stamp, n) for n in self.nodes.values()]
            heapq.heapify(self.heap)
        heapq.heappush(self.heap, (node.tick, -node.position, node.stamp, node))

    def add(self, node: _Node) -> None:
        self.nodes[node.key] = node
        self.bytes += node.size
        self.push(node)

    def discard(self, node: _Node) -> None:
        if self.nodes.pop(node.key, None) is not None:
            self.bytes -= node.size

    def oldest(self) -> _Node:
        """The block that goes first (not removed)."""
        while True:
            _, _, stamp, node = self.heap[0]
            if self.nodes.get(node.key) is node and node.stamp == stamp:
                return node
            heapq.heappop(self.heap)


class _Ghosts:
    """The keys one side evicted lately, oldest first: for each, where in the side's stream of
    evicted bytes it left, and its size (negative when its eviction was not a choice of the
    target). No data."""

    def __init__(self) -> None:
        self.sizes: OrderedDict[bytes, tuple[int, int]] = OrderedDict()
        self.bytes = 0
        self.out = 0  # bytes ever evicted from this side

    def __contains__(self, key: bytes) -> bool:
        return key in self.sizes

    def add(self, key: bytes, size: int, chosen: bool) -> None:
        self.out += size
        self.sizes[key] = (self.out, size if chosen else -size)
        self.bytes += size

    def forget(self, key: bytes, window: int) -> bool:
        """Forget `key`; whether the target chose its eviction and it left within the last
        `window` bytes this side evicted."""
        out, size = self.sizes.pop(key)
        self.bytes -= abs(size)
        return size > 0 and self.out - out < window

    def trim(self, most_bytes: int, most_keys: int) -> None:
        """Forget the oldest until within both bounds."""
        while self.sizes and (self.bytes > most_bytes or len(self.sizes) > most_keys):
            self.bytes -= abs(self.sizes.popitem(last=False)[1][1])


@dataclass
class StoreStats:
    blocks: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_existing: int = 0
    evictions: int = 0
    checksum_failures: int = 0
    rejected: int = 0
    redis_hits: int = 0
    redis_misses: int = 0
    mismatched_blocks: int = 0
    bytes_served: int = 0  # bytes of the blocks that get / get_many returned
    quota_evictions: int = 0  # evictions of a tenant's own blocks to keep it within its quota


class BlockStore:
    """Blocks by store key, at most `budget_bytes` of payload. Thread-safe: every method and
    every counter change holds the lock."""

    def __init__(
        self,
        budget_bytes: int,
        on_evict: Callable[[bytes, bytes, int, Blob], None] | None = None,
        tenant_quota: float | None = None,
        quotas: Mapping[str, float] | None = None,
        share: SharedBudget | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """on_evict(key, chain, position, data): told of every evicted block (the Redis tier's
        "evicted" mode); called with the store's lock held: must not block.
        tenant_quota: the share of the budget (0, 1] each authenticated tenant may hold;
        quotas: per-tenant shares that override it. Blocks stored without a tenant (no
        authentication) have no quota.
        share: the node's budget table this store shares with the node's other shards
        (services/budget.py); its budget is then the table's row, not `budget_bytes`, and
        follows where the evictions are youngest. clock: stamps batches on a clock the sharing
        stores agree on (`time.monotonic_ns` across processes, one counter in a process), so
        that the ages of their evictions compare; without it each store counts its own."""
        if share is not None:
            budget_bytes = share.budget()
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        shares = dict(quotas or {})
        for name, part in [("tenant_quota", tenant_quota), *shares.items()]:
            if part is not None and not 0.0 < part <= 1.0:
                raise ValueError(f"quota of {name!r} must lie in (0, 1], got {part}")
        self._default_share, self._shares = tenant_quota, shares
        self._on_evict = on_evict
        self._blocks: dict[bytes, _Node] = {}
        self._recent, self._frequent = _Queue(), _Queue()
        self._ghost_recent, self._ghost_frequent = _Ghosts(), _Ghosts()
        # bytes `recent` may hold before newer recent blocks go before older proven ones
        # (ARC's p), moved by ghost hits; it starts at half the budget: a scan that comes
        # before any evidence cannot flush more than half of what was proven
        self._own_target = budget_bytes // 2  # without a shared budget (else the node's)
        self._by_tenant: dict[str, _Queue] = {}  # the blocks of each tenant with a quota
        self._tick = 0  # one per call: the blocks a batch touches share it
        self._clock, self._share = clock, share
        self._yielded = 0  # bytes `resize` gave back (without a share; with one, its row's)
        self._stamps = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = StoreStats(budget_bytes=budget_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.stats.budget_bytes

    def quota_bytes(self, tenant: str | None) -> int | None:
        """The bytes `tenant` may hold on this shard, or None when it has no quota."""
        share = None if tenant is None else self._shares.get(tenant, self._default_share)
        return None if share is None else max(1, int(share * self.stats.budget_bytes))

    # -- reads ------------------------------------------------------------------------------

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many of `keys`, in order, are present before the first missing one."""
        with self._lock:
            for i, key in enumerate(keys):
                if key not in self._blocks:
                    return i
            return len(keys)

    def get(self, key: bytes) -> Blob | None:
        """The block's bytes, or None on a miss. A hit makes the block frequent."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[Blob | None]:
        """`get` of each key, under one lock, as one batch: the blocks found share one tick."""
        with self._lock:
            self._next_tick()
            found = [self._read(key) for key in keys]
            if self._share is not None:
                self._share.publish(self.stats.bytes, self._oldest())
            return found

    def peek_many(self, keys: Sequence[bytes]) -> list[tuple[Blob, bool] | None]:
        """For each key: None on a miss, else its block and whether it branched (`branched`),
        changing nothing: no recency, frequency, hit or byte counts (a probe; `get_many` then
        touches what the caller used)."""
        with self._lock:
            nodes = [self._blocks.get(key) for key in keys]
            return [None if n is None else (n.data, n.children > 0 or n.branched) for n in nodes]

    def branched(self, keys: Sequence[bytes]) -> list[bool | None]:
        """For each key: None when absent, else whether a later block branching off it starts
        recent here (it has children on this shard, or was told of one elsewhere). Changes
        nothing (the client's hint for the put of a block after it on another shard)."""
        return [None if peek is None else peek[1] for peek in self.peek_many(keys)]

    def mark_branched(self, keys: Sequence[bytes]) -> int:
        """A next block of each key's prefix was put on another shard: a block branching off it
        here later starts recent. Changes no recency. Returns how many keys were present."""
        with self._lock:
            marked = 0
            for key in keys:
                node = self._blocks.get(key)
                if node is not None:
                    node.branched = True
                    marked += 1
            return marked

    def _read(self, key: bytes) -> Blob | None:
        node = self._blocks.get(key)
        if node is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_served += node.size
        if not node.frequent:
            self._recent.discard(node)
            node.frequent = True
            self._frequent.add(node)
        self._touch(node)
        return node.data

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    def snapshot(self) -> StoreStats:
        """A consistent copy of the counters."""
        with self._lock:
            self._follow_share()
            return replace(self.stats)

    def count(self, **deltas: int) -> None:
        """Add to counters kept by the layers above (rejected requests, Redis hits...)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- writes -----------------------------------------------------------------------------

    def put(
        self, key: bytes, chain: bytes, position: int, data: Blob, parent: bytes | None = None,
        tenant: str | None = None,
    ) -> bool:  # fmt: skip
        """Store a block; False (and no work but a touch) when the key is already present.
        `parent`: the store key of the nearest earlier block of its prefix on this shard (None
        at position 0 or when there is none); a block whose parent is absent is unreachable
        (lookups stop at the gap) and goes first. `tenant`: whose quota it counts against."""
        return self.put_many([(key, chain, position, data, parent, tenant)])[0]

    def put_many(self, items: Sequence[PutItem], hints: Sequence[int] | None = None) -> list[bool]:
        """`put` of each item in order (parents before children), under one lock, as one
        batch; a block too large for the budget or its tenant's quota raises
        BlockTooLargeError before anything is stored. `hints`: per item, EXTENDS and/or
        BRANCHED (see the module's docstring), or none; bad hints raise ValueError before
        anything is stored."""
        if hints is None:
            hints = [0] * len(items)
        else:
            if len(hints) != len(items):
                raise ValueError(f"{len(hints)} hints for {len(items)} blocks")
            for hint in hints:  # a negative int has bits outside HINTS too
                if isinstance(hint, bool) or not isinstance(hint, int) or hint & ~HINTS:
                    raise ValueError(f"hint {hint!r} is not a combination of EXTENDS and BRANCHED")
        for _, _, _, data, _, tenant in items:
            limit = self.quota_bytes(tenant) or self._largest()  # a quota <= budget
            if len(data) > limit:
                raise BlockTooLargeError(
                    f"block of {len(data)} bytes exceeds the {limit} bytes this shard can "
                    "hold for it"
                )
        with self._lock:
            self._next_tick()
            stored = [self._put(*item, hint) for item, hint in zip(items, hints, strict=True)]
            if self._share is not None:
                self._share.publish(self.stats.bytes, self._oldest())
            self.stats.blocks = len(self._blocks)
            return stored

    def _put(
        self, key: bytes, chain: bytes, position: int, data: Blob, parent: bytes | None,
        tenant: str | None, hint: int = 0,
    ) -> bool:  # fmt: skip
        old = self._blocks.get(key)
        if old is not None:
            old.branched = old.branched or bool(hint & BRANCHED)
            self.stats.put_existing += 1
            self._touch(old)
            return False
        size = len(data)
        if size > self.stats.budget_bytes and self._share is None:  # it shrank since the check
            self.stats.rejected += 1
            return False
        up = None if parent is None else self._blocks.get(parent)
        node = _Node(key, chain, position, data, up, tenant)
        node.branched = bool(hint & BRANCHED)
        # a proven block's only continuation (the next turn of a conversation that was read)
        # is proven too; a branch off a shared block (a new prompt under a system prompt, a
        # scan) is not. With no parent here, the client's hint says what the parent's shard
        # knew (a parent named but gone here: unreachable, the hint does not matter)
        if up is not None:
            extends = up.frequent and up.children == 0 and not up.branched
        else:
            extends = parent is None and position > 0 and bool(hint & EXTENDS)
        node.frequent = self._ghost_hit(key, size) or extends
        self._blocks[key] = node
        if up is not None:
            up.children += 1
        quota = self.quota_bytes(tenant)
        own = None if quota is None else self._by_tenant.setdefault(tenant or "", _Queue())
        if parent is not None and up is None:  # its ancestor here is gone: unreachable
            node.tick = 0  # until that ancestor is put again, so it goes first
            self._place(node)
        else:
            self._touch(node)
        self.stats.puts += 1
        self.stats.bytes += size
        if own is not None and quota is not None:
            while own.bytes > quota:
                self._evict(self._victim(own), False)
                self.stats.quota_evictions += 1
        while self.stats.bytes > self.stats.budget_bytes:
            victim, chosen = self._replacement()
            if not self._take_budget(victim):
                self._evict(victim, chosen)
        return True

    def _ghost_hit(self, key: bytes, size: int) -> bool:
        """A block evicted lately is put again: when the target chose its eviction and it left
        within the window, its side would have kept it with that much more room (a recent
        ghost raises the target by its size, a frequent one lowers it). Returns whether it
        was a ghost (it goes to the frequent side then)."""
        window = max(1, self.stats.budget_bytes // _WINDOW)
        if key in self._ghost_recent:
            if self._ghost_recent.forget(key, window):
                self._move_target(size)
            return True
        if key in self._ghost_frequent:
            if self._ghost_frequent.forget(key, window):
                self._move_target(-size)
            return True
        return False

    @property
    def _target(self) -> int:
        """Bytes `recent` may hold before newer recent blocks go before older proven ones."""
        if self._share is not None:
            return self._share.target(self.stats.budget_bytes)
        return self._own_target

    def _move_target(self, delta: int) -> None:
        if self._share is not None:
            self._share.move_target(delta, self.stats.budget_bytes)
        else:
            self._own_target = min(self.stats.budget_bytes, max(0, self._own_target + delta))

    def delete(self, keys: Sequence[bytes]) -> set[bytes]:
        """Remove the given blocks; returns the keys that were present."""
        with self._lock:
            deleted = set()
            for key in keys:
                node = self._blocks.get(key)
                if node is not None:
                    self._remove(node)
                    deleted.add(key)
            self.stats.blocks = len(self._blocks)
            return deleted

    def resize(self, budget_bytes: int) -> int:
        """Set a new budget (e.g. smaller under node memory pressure, back when it passes) and
        evict down to it; returns the bytes evicted."""
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        with self._lock:
            before = self.stats.bytes
            self._follow_share()
            delta = budget_bytes - self.stats.budget_bytes
            if self._share is not None:  # the node's total shrinks (grows) with it
                budget_bytes = self._share.resize(delta)
            else:
                self._yielded = max(0, self._yielded - delta)
            self._set_budget(budget_bytes)
            return before - self.stats.bytes

    @property
    def yielded_bytes(self) -> int:
        """Bytes `resize` took from the budget and has not given back (memory pressure)."""
        return self._share.yielded() if self._share is not None else self._yielded

    def _rescale(self, budget_bytes: int) -> None:
        """Take a new budget, `recent`'s target scaled with it (no eviction; a shared target
        is a share of the budget already)."""
        self._own_target = self._own_target * budget_bytes // self.stats.budget_bytes
        self.stats.budget_bytes = budget_bytes

    def _set_budget(self, budget_bytes: int) -> None:
        """Take the new budget and evict down to it."""
        self._rescale(budget_bytes)
        while self.stats.bytes > budget_bytes:
            self._evict(*self._replacement())
        self._trim_ghosts()
        self.stats.blocks = len(self._blocks)

    # -- the node's shared budget -------------------------------------------------------------

    def _next_tick(self) -> None:
        """A new batch: the next tick, on the shared clock when there is one; then the budget
        the table now gives (another shard may have taken a step of it)."""
        now = 0 if self._clock is None else self._clock()
        self._tick = max(self._tick + 1, now)
        self._follow_share()

    def _follow_share(self) -> None:
        if self._share is not None:
            budget = max(1, self._share.budget())  # never 0, whatever a table says
            if budget != self.stats.budget_bytes:
                self._set_budget(budget)
                self._share.publish(self.stats.bytes, self._oldest())

    def _largest(self) -> int:
        """The largest block this store takes: its budget, or with a shared one, at least a
        fair share of the node's (the shard takes budget for it, or evicts it)."""
        share = self._share
        fair = 0 if share is None else share.total // share.slots
        return max(self.stats.budget_bytes, fair)

    def _take_budget(self, victim: _Node) -> bool:
        """Before evicting `victim` for room: whether another shard of the node gave budget
        instead (one that has room it does not use, or whose next victim is older: one LRU
        over the node would evict that one; services/budget.py). It evicts on its next call."""
        if self._share is None:
            return False
        frequent = self._frequent
        if not victim.frequent and frequent and frequent.oldest().tick < victim.tick:
            return False  # scan resistance: a recent block over its target goes before an
            # older proven one; it is worth less than anything another shard holds
        need = self.stats.bytes - self.stats.budget_bytes
        budget = self._share.rebalance(victim.tick, need, self._tick)
        if budget <= self.stats.budget_bytes:
            return False
        self._rescale(budget)
        return True

    def _oldest(self) -> int:
        """The tick of the block that would go next (`_replacement`'s choice, without passing
        over inner blocks: nothing moves), 0 when empty."""
        recent, frequent = self._recent, self._frequent
        if not (recent and frequent):
            return (recent or frequent).oldest().tick if (recent or frequent) else 0
        return self._choose(recent.oldest(), frequent.oldest())[0].tick

    # -- recency ----------------------------------------------------------------------------

    def _queue(self, node: _Node) -> _Queue:
        return self._frequent if node.frequent else self._recent

    def _touch(self, node: _Node) -> None:
        """Give `node` this batch's tick, and its ancestors on this shard too (up to the first
        that has it already, at most `_RAISE_LIMIT`): an ancestor never goes before its
        descendants. A batch that reads or writes a prefix walks each ancestor once; beyond the
        limit, `_victim` passes over an ancestor that still has children."""
        tick = self._tick
        for _ in range(_RAISE_LIMIT):
            node.tick = tick
            self._place(node)
            up = node.parent
            if up is None or not up.live or up.tick >= tick:
                return
            node = up

    def _place(self, node: _Node) -> None:
        """(Re)queue `node` at its tick, in its side's queue and its tenant's."""
        node.stamp = next(self._stamps)
        own = None if node.tenant is None else self._by_tenant.get(node.tenant)
        for queue in (self._queue(node), own):
            if queue is None:
                continue
            if node.key in queue.nodes:
                queue.push(node)
            else:
                queue.add(node)

    # -- eviction ---------------------------------------------------------------------------

    def _replacement(self) -> tuple[_Node, bool]:
        """The older of the two sides' first leaves, unless the frequent one is older and
        `recent` holds more than its target: then the recent one. Also whether the target
        chose (the frequent leaf was the older: which side paid was the target's call)."""
        recent, frequent = self._recent, self._frequent
        if not (recent and frequent):
            return self._victim(recent or frequent), False
        return self._choose(self._victim(recent), self._victim(frequent))

    def _choose(self, new: _Node, proven: _Node) -> tuple[_Node, bool]:
        """Between the first of `recent` and the first of `frequent`: the older, unless the
        proven one is older and `recent` holds more than its target; and whether the target
        chose (a target within the window of what `recent` holds could have chosen the other
        way)."""
        if (new.tick, -new.position) <= (proven.tick, -proven.position):
            return new, False
        held, target = self._recent.bytes, self._target
        chosen = abs(held - target) < self.stats.budget_bytes // _WINDOW
        return (new if held > target else proven), chosen

    def _victim(self, queue: _Queue) -> _Node:
        """The first leaf of `queue` to go (a block with no children on this shard), passing
        over inner blocks (their descendants came later: they are refreshed). The block being
        stored is no exception: when it is the least valuable (the newest, deepest block of a
        prefix longer than the room, or one whose parent is gone), it goes. After
        `_PASS_LIMIT` passes the first inner block is taken anyway."""
        first = None
        for _ in range(min(_PASS_LIMIT, len(queue))):
            node = queue.oldest()
            if node.children == 0:
                return node
            first = first or node
            node.tick = self._tick
            self._place(node)
        assert first is not None
        return first

    def _evict(self, node: _Node, chosen: bool) -> None:
        """Evict to the ghost list of the node's side (`chosen`: the target decided it), and
        tell `on_evict`."""
        self._remove(node)
        ghosts = self._ghost_frequent if node.frequent else self._ghost_recent
        ghosts.add(node.key, node.size, chosen)
        self._trim_ghosts()
        self.stats.evictions += 1
        if self._on_evict is not None:
            self._on_evict(node.key, node.chain, node.position, node.data)

    def _remove(self, node: _Node) -> None:
        del self._blocks[node.key]
        self._queue(node).discard(node)
        node.live = False
        self.stats.bytes -= node.size
        if node.parent is not None:
            if node.parent.live:
                node.parent.children -= 1
            node.parent = None  # no chain of dead nodes is kept alive
        own = None if node.tenant is None else self._by_tenant.get(node.tenant)
        if own is not None:
            own.discard(node)

    def _trim_ghosts(self) -> None:
        """Each side's ghosts remember up to one budget of the bytes it evicted last, and no
        more keys than the store holds blocks (+1), so ghosts of tiny blocks cannot outgrow
        the blocks' own metadata. (ARC proper drops a recent block's ghost when recent blocks
        fill the cache; here a block comes back only by being put again after a miss, so
        that is exactly the reuse the recent side must be told about.)"""
        for ghosts in (self._ghost_recent, self._ghost_frequent):
            ghosts.trim(self.stats.budget_bytes, len(self._blocks) + 1)
