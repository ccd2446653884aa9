"""The client's Prometheus metrics, registered into the worker process's registry.

Where it stands: inside the inference worker, next to the KVPool client. No port of its own:
inference servers (vLLM and others) already serve their process's default registry, and these
metrics join it. One set per registry, shared by every client in the process.

Names follow `kvpool_client_<name>_<unit>`, counters end in `_total`, base units. Labels are
bounded: `operation` in {lookup, put, get}; `status` in {ok, hit, miss, error}; `reason` in
REJECT_REASONS.

The memo is keyed by the registry object itself, held weakly: a registry's metrics go with it,
and a new registry (even one that reuses a dead one's id()) always gets its own.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CODEC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Why a fetched block was refused before decoding (the `reason` of rejected_blocks):
# checksum: corrupt; mismatch: not the block asked for; mac: failing the tenant MAC;
# format: not a well-formed kvpool block.
REJECT_REASONS = ("checksum", "mismatch", "mac", "format")


@dataclass(frozen=True)
class ClientMetrics:
    lookups: Counter
    hit_blocks: Counter
    hit_tokens: Counter
    sent_bytes: Counter
    received_bytes: Counter
    encode_seconds: Histogram
    decode_seconds: Histogram
    request_duration: Histogram
    failures: Counter
    rejected_blocks: Counter

    @staticmethod
    def create(registry: CollectorRegistry) -> ClientMetrics:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"kvpool_client_{name}", doc, labels, registry=registry)

        return ClientMetrics(
            lookups=counter("lookups", "prefix lookups against the tier"),
            hit_blocks=counter("hit_blocks", "blocks fetched and decoded for a cached prefix"),
            hit_tokens=counter("hit_tokens", "prompt tokens served from the tier instead of prefill"),
            sent_bytes=counter("sent_bytes", "encoded block bytes the tier took"),
            received_bytes=counter("received_bytes", "encoded block bytes fetched from the tier"),
            encode_seconds=Histogram(
                "kvpool_client_encode_seconds", "time to encode one block",
                buckets=CODEC_BUCKETS, registry=registry,
            ),
            decode_seconds=Histogram(
                "kvpool_client_decode_seconds", "time to verify and decode one block",
                buckets=CODEC_BUCKETS, registry=registry,
            ),
            request_duration=Histogram(
                "kvpool_client_request_duration_seconds",
                "time of a lookup, put or get call, by operation and outcome",
                ["operation", "status"], buckets=LATENCY_BUCKETS, registry=registry,
            ),
            failures=counter(
                "failures", "tier failures turned into misses or dropped saves", ("operation",)
            ),
            rejected_blocks=counter(
                "rejected_blocks",
                "fetched blocks refused before decoding (corrupt, not the block asked for, "
                "or failing the tenant MAC); each is a miss",
                ("reason",),
            ),
        )  # fmt: skip


_lock = threading.Lock()
# Weak keys: an entry lives as long as its registry (the metrics hold no reference back to it).
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, ClientMetrics] = (
    weakref.WeakKeyDictionary()
)


def client_metrics(registry: CollectorRegistry | None = None) -> ClientMetrics:
    """The client metrics of `registry` (the process default when None), created once."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = ClientMetrics.create(registry)
        return metrics
