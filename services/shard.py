"""The tier on Ray: a Directory actor (the control plane) and Shard actors (the data plane).

Where it stands: `kvpool serve` (services/tier.py) creates these actors. Each Shard owns a
BlockStore with a byte budget and serves kvpool.v1 over gRPC itself, so block bytes go from a
client straight to the owning shard and never ride a Ray call. The Directory holds the list of
shards and their addresses; shards serve it to clients through the Topology RPC.

Ray restarts a Shard that dies (max_restarts=-1): `__init__` runs again with the same id and
port (services/tier.py picks a port up front when none is configured, so the endpoint
`kvpool serve` printed stays valid), the store starts empty (its blocks become misses), and it
registers again. Shards
re-register every few seconds (a heartbeat), so a restarted Directory rebuilds its list by
itself, and the Directory leaves out of the topology any shard it has not heard from for
`stale_after_s` (a shard Ray could not restart, a node gone): clients move its keys to the
other shards. A shard that comes back registers again and is back in the topology.

A cache on a shared node gives memory back before anything dies: each Shard watches the memory
its node (or its cgroup) has available and, while that is under `reserve_bytes`, shrinks its
store's budget by the shortfall (evicting down to it); once the pressure is gone the budget
grows back to the configured one (`yield_memory`).

The shards `kvpool serve` starts on its own node share that node's budget
(services/budget.py): each is given the path of the node's budget table and its row, takes a
fair share when it starts (again after a restart), and its store's budget then follows where the
evictions are youngest, so that the node's shards approximate one eviction order. Memory
pressure shrinks a shard's budget and the node's total together, and grows both back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray

from kvpool.proto import kvpool_pb2 as pb
from kvpool.services.budget import SharedBudget
from kvpool.services.redis_tier import Mode, RedisTier
from kvpool.services.security import ServerSecurity
from kvpool.services.server import Limits, ShardServer
from kvpool.services.store import BlockStore

log = logging.getLogger(__name__)
RAY_NAMESPACE = "kvpool"


def directory_name(tier: str) -> str:
    """The Ray actor name of a tier's Directory; several tiers can share one Ray cluster."""
    return f"kvpool-{tier}-directory"


def shard_name(tier: str, shard_id: str) -> str:
    return f"kvpool-{tier}-{shard_id}"


HEARTBEAT_S = 2.0  # shards re-register this often (more often when stale_after_s is short)
STALE_AFTER_S = 10.0  # a shard not heard from for this long leaves the topology
TOPOLOGY_CACHE_S = 0.5


class Directory:
    """Which shards exist, where they listen, and when each last registered. The topology
    holds the shards heard from within `stale_after_s`; its epoch changes whenever that
    visible list changes (a shard joins, moves, goes stale, comes back, is removed)."""

    def __init__(
        self,
        replication: int,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        self.replication, self.stale_after_s, self._clock = replication, stale_after_s, clock
        self._shards: dict[str, tuple[str, str]] = {}  # id -> (gRPC address, metrics address)
        self._seen: dict[str, float] = {}  # id -> clock() at its last register
        self._next = 0
        self._epoch = time.time_ns()  # distinct across Directory restarts
        self._visible: list[tuple[str, str, str]] = []  # what the epoch stands for

    @property
    def heartbeat_s(self) -> float:
        """How often a shard should re-register: several beats fit in the stale time."""
        return min(HEARTBEAT_S, self.stale_after_s / 4)

    def reserve_ids(self, n: int) -> list[str]:
        """n fresh shard ids ("shard-<i>"); ids of stale shards are never handed out again."""
        ids: list[str] = []
        while len(ids) < n:
            sid = f"shard-{self._next}"
            self._next += 1
            if sid not in self._shards:
                ids.append(sid)
        return ids

    def register(self, shard_id: str, address: str, metrics_address: str = "") -> float:
        """A shard says where it listens (at start, then every heartbeat); returns the
        heartbeat period it should keep."""
        self._shards[shard_id] = (address, metrics_address)
        self._seen[shard_id] = self._clock()
        self._next = max(self._next, int(shard_id.rsplit("-", 1)[-1]) + 1)
        return self.heartbeat_s

    def remove(self, shard_id: str) -> None:
        self._shards.pop(shard_id, None)
        self._seen.pop(shard_id, None)

    def topology(self) -> tuple[int, int, list[tuple[str, str, str]]]:
        """(epoch, replication, [(shard_id, address, metrics_address)]) of the live shards."""
        oldest = self._clock() - self.stale_after_s
        visible = sorted((s, *a) for s, a in self._shards.items() if self._seen[s] >= oldest)
        if visible != self._visible:
            self._visible = visible
            self._epoch += 1
        return self._epoch, self.replication, visible


def fixed_mmap_threshold(threshold: int = 128 << 10) -> bool:
    """Have glibc serve every allocation over `threshold` bytes with its own mmap, returned to
    the OS when freed. By default glibc raises that threshold as large blocks are freed and then
    carves multi-MiB blocks out of its heap, which fragments: over a 10-minute soak RSS drifted
    +1.3 MiB/min and sat 47 MiB over the budget; at 128 KiB it stayed flat at 15 MiB over.
    The price is throughput: every 1 MiB chunk is then a fresh mmap (benchmarks/store.py, one
    run each: get 262 MB/s at 128 KiB, 377 at 2 MiB, 478 with glibc's default). The
    environment variable KVPOOL_MMAP_THRESHOLD overrides it (bytes; 0 keeps glibc's default);
    see benchmarks/results/README.md."""
    threshold = int(os.environ.get("KVPOOL_MMAP_THRESHOLD", threshold))  # 0: glibc's default
    if threshold <= 0:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD


def available_bytes() -> int:
    """Memory that can still be allocated here without swapping or the OOM killer: the node's
    MemAvailable, or less where this process's cgroup (v2) has a lower limit."""
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) << 10
    try:
        cg = "/sys/fs/cgroup"
        with open(f"{cg}/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open(f"{cg}/memory.current") as f:
                current = int(f.read())
            with open(f"{cg}/memory.stat") as f:  # page cache the kernel can reclaim
                stat = dict(line.split() for line in f)
            available = min(available, int(limit) - current + int(stat.get("inactive_file", 0)))
    except (OSError, ValueError):  # no cgroup v2 memory controller here
        pass
    return max(0, available)


def default_reserve() -> int:
    """10% of the node's memory: shards yield before Ray's memory monitor (0.95 by default) or
    the kernel would act."""
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemTotal:"))
    return total // 10


def next_budget(budget: int, configured: int, held: int, available: int, reserve: int) -> int:
    """The store budget for the next period: under pressure (available < reserve) the bytes
    held minus the shortfall; without it, half the headroom back, up to the configured one."""
    floor = 1 << 20
    if available < reserve:
        return max(floor, min(budget, held - (reserve - available)))
    if budget < configured:
        return min(configured, budget + max(floor, (available - reserve) // 2))
    return budget


def yield_memory(store: BlockStore, reserve: int, period_s: float, stop: threading.Event) -> None:
    """Until `stop`: every `period_s`, resize the store to `next_budget` (a thread per shard).
    What it may grow back to is its budget plus what pressure took (`store.yielded_bytes`): a
    budget that a shared table moved elsewhere is not pressure's to take back."""
    while not stop.wait(period_s):
        try:
            held, current = store.snapshot().bytes, store.budget_bytes
            ceiling = current + store.yielded_bytes
            budget = next_budget(current, ceiling, held, available_bytes(), reserve)
            if budget != current:
                evicted = store.resize(budget)
                log.warning(
                    "memory pressure: store budget %d MiB (up to %d), %d MiB evicted",
                    budget >> 20, ceiling >> 20, evicted >> 20,
                )  # fmt: skip
        except Exception as e:  # never let the watch die: the next period tries again
            log.error("memory pressure watch: %s", e)


def port_free(host: str, port: int, wait_s: float = 10.0) -> bool:
    """Whether (host, port) can be bound, waiting up to `wait_s` for the previous holder (a
    shard Ray is restarting) to let go of it."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
        time.sleep(0.2)


class Shard:
    """One shard: a BlockStore behind a gRPC server on (host, port); with a health_port, also
    a plaintext listener that serves only grpc.health.v1 (for Kubernetes probes, which cannot
    speak TLS)."""

    def __init__(
        self,
        tier: str,
        shard_id: str,
        budget_bytes: int,
        host: str,
        port: int,
        advertise_host: str | None = None,
        metrics_port: int | None = 0,
        redis_url: str | None = None,
        redis_ttl_s: int = 3600,
        redis_mode: Mode = "all",
        security: ServerSecurity | None = None,
        health_port: int | None = None,
        picked_port: bool = False,
        reserve_bytes: int | None = None,
        pressure_period_s: float = 1.0,
        tenant_quota: float | None = None,
        budget_table: tuple[str, int] | None = None,
    ) -> None:
        """picked_port: `port` was picked by the tier, not the operator: another free port is
        taken if it cannot be had. reserve_bytes: the available memory below which the shard
        gives memory back (None: `default_reserve()`; 0: never). tenant_quota: each tenant's
        default share of the budget; the tokens file's per-tenant quotas override it.
        budget_table: (path, row) of the node's shared budget table (services/budget.py); the
        shard then joins it (a fair share of the node's total) instead of a fixed budget."""
        logging.basicConfig(level=logging.INFO)
        fixed_mmap_threshold()
        if picked_port and port and not port_free(host, port):
            log.warning("shard %s: port %d is taken; serving on another", shard_id, port)
            port = 0
        self.tier, self.shard_id = tier, shard_id
        if advertise_host is None:
            advertise_host = ray.util.get_node_ip_address() if host == "0.0.0.0" else host
        self._directory = ray.get_actor(directory_name(tier), namespace=RAY_NAMESPACE)
        self._cached: tuple[float, pb.TopologyResponse] | None = None
        redis = RedisTier(redis_url, redis_ttl_s, redis_mode) if redis_url else None
        spill = redis.offer if redis is not None and redis.mode == "evicted" else None
        quotas = security.quotas() if security is not None else {}
        share, clock = None, None
        if budget_table is not None:
            share, clock = SharedBudget(*budget_table), time.monotonic_ns
            share.join()  # a fair share of the node's total: the store takes its row's budget
        store = BlockStore(
            budget_bytes, on_evict=spill, tenant_quota=tenant_quota, quotas=quotas, share=share,
            clock=clock,
        )  # fmt: skip
        self.server = ShardServer(
            store, shard_id, topology=self._topology,
            host=host, port=port, advertise_host=advertise_host, limits=Limits(),
            metrics_port=metrics_port, redis=redis, security=security, health_port=health_port,
        )  # fmt: skip
        self.address = self.server.start()
        self.metrics_address = self.server.metrics_address
        self.health_address = self.server.health_address
        ref: Any = self._directory.register.remote(shard_id, self.address, self.metrics_address)
        period = ray.get(ref) or HEARTBEAT_S  # the Directory says how often to beat
        threading.Thread(target=self._heartbeat, args=(period,), daemon=True).start()
        reserve = default_reserve() if reserve_bytes is None else reserve_bytes
        self._stop = threading.Event()
        if reserve > 0:
            args = (store, reserve, pressure_period_s, self._stop)
            threading.Thread(target=yield_memory, args=args, daemon=True).start()

    def _heartbeat(self, period: float) -> None:
        directory: Any = self._directory  # looked up again (a GCS call) only after a failure
        while True:
            time.sleep(period)
            try:
                if directory is None:
                    directory = ray.get_actor(directory_name(self.tier), namespace=RAY_NAMESPACE)
                ref: Any = directory.register.remote(
                    self.shard_id, self.address, self.metrics_address
                )
                period = ray.get(ref, timeout=10) or HEARTBEAT_S
            except Exception as e:  # the Directory is restarting: try again next beat
                directory = None
                log.warning("shard %s could not re-register: %s", self.shard_id, e)

    async def _topology(self) -> pb.TopologyResponse:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < TOPOLOGY_CACHE_S:
            return self._cached[1]
        epoch, replication, shards = await self._directory.topology.remote()
        msg = pb.TopologyResponse(
            epoch=epoch, replication=replication,
            shards=[pb.Shard(shard_id=s, address=a, metrics_address=m) for s, a, m in shards],
        )  # fmt: skip
        self._cached = (now, msg)
        return msg

    def endpoint(self) -> str:
        return self.address

    def health_endpoint(self) -> str:
        """host:port of the plaintext health-only listener, or ""."""
        return self.health_address

    def stats(self) -> dict[str, int]:
        return dict(vars(self.server.store.stats))

    def pid(self) -> int:
        import os

        return os.getpid()
