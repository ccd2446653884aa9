"""A shard's Prometheus metrics, served on its own `/metrics` port.

Where it stands: beside the gRPC servicer of each shard. Request counts and durations are
observed by the servicer per method and status code; the store's figures (bytes used and
capacity, blocks, evictions (and those that kept a tenant within its quota), checksum failures,
hits and misses, bytes served, Redis tier hits and misses) are read from the store at scrape
time, so there is one source of truth and no double count.

Names follow `kvpool_<subsystem>_<name>_<unit>`, counters end in `_total`, base units
(seconds, bytes); labels are bounded: `method` (the RPC names) and `code` (gRPC status names).
Each shard has its own CollectorRegistry (tests and several shards in one process never clash).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvpool.services.store import BlockStore

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class _StoreCollector(Collector):
    def __init__(self, store: BlockStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store.snapshot()
        gauges = {
            "used_bytes": ("payload bytes of the blocks held", s.bytes),
            "capacity_bytes": ("byte budget of the shard", s.budget_bytes),
            "blocks": ("blocks held", s.blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"kvpool_shard_{name}", doc, value=value)
        counters = {
            "evictions": ("blocks evicted to stay within the budget", s.evictions),
            "quota_evictions": (
                "blocks of a tenant evicted to keep it within its quota (also in evictions)",
                s.quota_evictions,
            ),
            "checksum_failures": (
                "stored blocks dropped because their crc32 failed",
                s.checksum_failures,
            ),
            "hits": ("Get requests that found their block", s.hits),
            "served_bytes": ("bytes of the blocks reads returned from memory", s.bytes_served),
            "misses": ("Get requests that did not find their block", s.misses),
            "puts": ("blocks stored", s.puts),
            "redis_hits": ("blocks read through from the Redis tier", s.redis_hits),
            "redis_misses": ("memory misses the Redis tier did not hold either", s.redis_misses),
            "mismatched_blocks": (
                "intact blocks in Redis refused on read-through: not bound to their namespace, key or position",
                s.mismatched_blocks,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"kvpool_shard_{name}", doc, value=value)


class ShardMetrics:
    """The metrics of one shard; `serve(host, port)` exposes them over HTTP."""

    def __init__(self, store: BlockStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.requests = Counter(
            "kvpool_shard_requests", "RPCs handled, by method and gRPC status code",
            ["method", "code"], registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "kvpool_shard_request_duration_seconds", "time to handle an RPC, by method and status",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.port = 0

    def observe(self, method: str, code: str, seconds: float) -> None:
        children = self._children.get((method, code))
        if children is None:  # a few dozen (method, code) pairs: labels() once each
            children = self._children[method, code] = (
                self.requests.labels(method, code), self.duration.labels(method, code),
            )  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)

    def serve(self, host: str, port: int = 0) -> int:
        """Start the `/metrics` HTTP server in a daemon thread; returns its port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(server.server_port)
        return self.port
