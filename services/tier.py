"""Start, join and grow a kvpool tier on Ray.

Where it stands: `kvpool serve` calls `start_tier`. On its embedded default it starts a local
Ray instance on this machine; given a Ray address it joins that cluster, and if a tier already
runs there it adds shards to it. Shard actors are detached and named, so they outlive the
process that created them; `Tier.shutdown` removes the ones it created.

`check_exposure` is the safe default `kvpool serve` applies before anything starts: a tier that
listens beyond loopback must have TLS and tenant tokens, unless the operator says --insecure.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool.services.budget import create as create_budget
from kvpool.services.redis_server import free_port
from kvpool.services.redis_tier import Mode
from kvpool.services.security import ServerSecurity
from kvpool.services.shard import (
    RAY_NAMESPACE,
    STALE_AFTER_S,
    Directory,
    Shard,
    directory_name,
    shard_name,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierConfig:
    shards: int = 2
    budget_bytes: int = 1 << 30  # per shard
    host: str = "127.0.0.1"  # "0.0.0.0" on a cluster: shards advertise their node's IP
    port: int = 0  # the first shard's port (the next ones count up); 0: any free port
    replication: int = 1
    shard_cpus: float = 0.5  # Ray's logical CPUs reserved per shard
    metrics_port: int | None = (
        0  # first shard's /metrics port (next ones count up); 0: any; None: off
    )
    name: str = "default"  # tiers on one Ray cluster are told apart by name
    redis_url: str | None = None  # the optional second tier, e.g. redis://host:6379/0
    redis_ttl_s: int = 3600
    redis_mode: Mode = "all"  # "all": every block also goes to Redis; "evicted": only evictions
    security: ServerSecurity = field(default_factory=ServerSecurity)  # TLS, mTLS, tenant tokens
    per_node_ports: bool = False  # every shard binds port / metrics_port (one shard per node)
    # first shard's plaintext grpc.health.v1-only port (next ones count up); 0: any; None: off
    health_port: int | None = None
    stale_after_s: float = STALE_AFTER_S  # a shard silent this long leaves the topology
    # shards give memory back while their node has less than this available (None: 10% of
    # the node's memory; 0: never); see services/shard.py yield_memory
    memory_reserve_bytes: int | None = None
    pressure_period_s: float = 1.0  # how often shards check the node's memory
    # each tenant's default share (0, 1] of every shard's budget (None: no quota); the tokens
    # file may give a tenant its own (services/security.py). Needs tenant tokens.
    tenant_quota: float | None = None
    # the shards start_tier starts on its own local Ray share the node's budget (shards x
    # budget_bytes; services/budget.py): budgets follow where the evictions are youngest.
    # Shards added to a cluster joined by address keep fixed budgets.
    shared_budget: bool = True

    def __post_init__(self) -> None:
        if self.shards < 0 or self.budget_bytes <= 0 or self.replication < 1:
            raise ValueError("shards >= 0, budget_bytes > 0 and replication >= 1 are required")
        if self.stale_after_s <= 0:
            raise ValueError("stale_after_s must be > 0")
        if self.tenant_quota is not None:
            if not 0.0 < self.tenant_quota <= 1.0:
                raise ValueError(f"tenant_quota must lie in (0, 1], got {self.tenant_quota}")
            if self.security.tokens_file is None:
                raise ValueError("tenant_quota needs tenant tokens (security.tokens_file)")

    def shard_ports(self, index: int) -> tuple[int, int | None, int | None]:
        """(gRPC, /metrics, health) ports of shard `index`: each fixed port counts up by the
        index, unless per_node_ports; 0 stays "any free port" and None stays "off"."""
        step = 0 if self.per_node_ports else index

        def nth(first: int | None) -> int | None:
            return first + step if first else first

        return nth(self.port) or 0, nth(self.metrics_port), nth(self.health_port)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a listener on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve to anything
        return False


def check_exposure(config: TierConfig, insecure: bool = False) -> None:
    """Refuse a tier that listens beyond loopback without TLS and tenant tokens: anyone who
    reaches the port could otherwise read, fill or poison the cache. `insecure` is the explicit
    opt-out (a trusted, isolated network). Raises ValueError saying what is missing."""
    if insecure or is_loopback(config.host):
        return
    missing = [
        flag
        for flag, present in (
            ("--tls-cert/--tls-key", config.security.tls),
            ("--auth-tokens", config.security.tokens_file is not None),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            f"refusing to serve on {config.host} without {' and '.join(missing)}: clients "
            "beyond this machine could read and overwrite every block. Give TLS and tenant "
            "tokens, bind a loopback address (--host 127.0.0.1), or pass --insecure on a "
            "network you trust."
        )


@dataclass
class Tier:
    """Handles to a running tier: its Directory and the shards this process created."""

    name: str
    directory: Any
    shards: dict[str, Any] = field(default_factory=dict)
    started_ray: bool = False
    temp_dir: str | None = None  # Ray's session files, when this process started Ray
    budget_table: str | None = None  # the node's shared budget table (services/budget.py)
    tls: bool = False  # the shards serve TLS only

    def topology(self) -> list[tuple[str, str, str]]:
        """[(shard id, gRPC address, metrics address)]"""
        _, _, shards = ray.get(self.directory.topology.remote())
        return list(shards)

    @property
    def endpoint(self) -> str:
        """Comma-separated shard addresses: any of them bootstraps a client."""
        return ",".join(address for _, address, _ in self.topology())

    def write_file_sd(self, path: str | Path) -> None:
        """Write the shards' /metrics targets as a Prometheus file_sd JSON file (atomically)."""
        targets = [m for _, _, m in self.topology() if m]
        groups = [{"targets": targets, "labels": {"job": "kvpool-shards", "tier": self.name}}]
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(groups, indent=2) + "\n")
        tmp.replace(path)

    def add_shards(
        self, config: TierConfig, count: int, budget_table: str | None = None
    ) -> list[str]:
        """Create `count` more shards and wait until each serves gRPC health; with a
        `budget_table` of `count` rows, shard i of them takes row i."""
        ids = ray.get(self.directory.reserve_ids.remote(count))
        actor = ray.remote(Shard)
        handles = {}
        for row, sid in enumerate(ids):
            port, metrics, health = config.shard_ports(int(sid.rsplit("-", 1)[-1]))
            # picked here when none is configured: Ray restarts a shard with the arguments it
            # was created with, so with port 0 each restart listened somewhere new and the
            # endpoint `kvpool serve` had printed went dead
            picked = port == 0
            port = port or free_port(config.host)
            handles[sid] = actor.options(
                name=shard_name(config.name, sid), namespace=RAY_NAMESPACE, lifetime="detached",
                max_restarts=-1, max_task_retries=0, num_cpus=config.shard_cpus,
            ).remote(
                config.name, sid, config.budget_bytes, config.host, port, None, metrics,
                config.redis_url, config.redis_ttl_s, config.redis_mode, config.security, health,
                picked_port=picked, reserve_bytes=config.memory_reserve_bytes,
                pressure_period_s=config.pressure_period_s, tenant_quota=config.tenant_quota,
                budget_table=None if budget_table is None else (budget_table, row),
            )  # fmt: skip
        self.shards.update(handles)
        self.tls = config.security.tls
        self.wait_serving(handles)
        return ids

    def wait_serving(self, handles: dict[str, Any] | None = None, timeout: float = 120.0) -> None:
        """Block until each shard (all this process created, by default) serves again, e.g.
        after Ray restarted it: its endpoint() answers once its __init__ serves gRPC, and it
        also passes the health check from outside, on its plaintext health port if it has one
        (with TLS and no health port that check would need a certificate: skipped)."""
        deadline = time.monotonic() + timeout
        for handle in (self.shards if handles is None else handles).values():
            while True:
                try:
                    address = ray.get(handle.endpoint.remote(), timeout=60)
                    health = ray.get(handle.health_endpoint.remote(), timeout=60)
                    if health or not self.tls:
                        wait_serving(health or address, timeout=30)
                    break
                except (ray.exceptions.RayError, grpc.FutureTimeoutError, grpc.RpcError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # restarting

    def kill_shard(self, shard_id: str, restart: bool = True) -> None:
        """Kill a shard's process (fault injection); Ray restarts it when `restart`."""
        handle = self.shards.get(shard_id) or ray.get_actor(
            shard_name(self.name, shard_id), namespace=RAY_NAMESPACE
        )
        ray.kill(handle, no_restart=not restart)
        if not restart:
            ray.get(self.directory.remove.remote(shard_id))

    def shutdown(self) -> None:
        """Remove the shards this process created; stop Ray if this process started it."""
        for sid, handle in self.shards.items():
            ray.kill(handle, no_restart=True)  # first, so that no heartbeat follows the remove
            ray.get(self.directory.remove.remote(sid))
        self.shards.clear()
        if self.started_ray:
            ray.shutdown()
            if self.temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.budget_table:
            Path(self.budget_table).unlink(missing_ok=True)


def wait_serving(address: str, timeout: float = 60.0) -> None:
    """Block until the gRPC health service at `address` (plaintext) reports SERVING."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
        )
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"shard at {address} is not serving: {reply.status}")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str | None:
    """Connect to the Ray cluster at `address`, or start a local one. Returns the temp dir of
    a Ray started here, None when joining one that runs already."""
    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's memory monitor kills Ray workers when the node nears full, whoever holds the
    # memory; on a tier started here the shards and the Directory are the only Ray workers, so
    # a vLLM engine beside them had the cache killed and restarted empty, again and again.
    # The shards give memory back themselves (services/shard.py yield_memory), and the
    # kernel's OOM killer, should it come to that, picks the process holding the most memory.
    # (A cluster joined with --address keeps its own setting.)
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    common: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address:
        ray.init(address=address, **common)
        return None
    temp_dir = os.environ.get("KVPOOL_RAY_TEMP_DIR") or tempfile.mkdtemp(prefix="kvpool-ray-")
    ray.init(
        num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp_dir, **common
    )
    return temp_dir


def start_tier(config: TierConfig, address: str | None = None) -> Tier:
    """Start a tier (or join the one running on the cluster at `address`) and add shards."""
    started = init_ray(address)
    directory = ray.remote(Directory).options(
        name=directory_name(config.name), namespace=RAY_NAMESPACE, lifetime="detached", max_restarts=-1,
        get_if_exists=True, num_cpus=0,
    ).remote(config.replication, config.stale_after_s)  # fmt: skip
    tier = Tier(
        name=config.name, directory=directory, started_ray=started is not None, temp_dir=started
    )
    table = None
    if config.shared_budget and address is None and config.shards > 0:  # all on this node
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        table = os.path.join(folder, f"kvpool-{config.name}-{os.getpid()}-{time.time_ns()}.budget")
        create_budget(table, config.shards, config.budget_bytes)
        tier.budget_table = table
    tier.add_shards(config, config.shards, table)
    return tier
