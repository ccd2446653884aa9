"""The client metrics memo: one set per registry, and a fresh registry always gets its own
(the old memo, keyed by id(registry), handed a new registry a dead one's metrics whenever
CPython reused the id)."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpool import metrics
from kvpool.metrics import REJECT_REASONS, client_metrics


def test_fresh_registries_each_get_their_own_metrics() -> None:
    gc.collect()
    before = len(metrics._by_registry)
    for i in range(200):
        registry = CollectorRegistry()
        m = client_metrics(registry)
        assert client_metrics(registry) is m  # created once per registry
        m.lookups.inc(i + 1)
        m.failures.labels(operation="get").inc()
        assert registry.get_sample_value("kvpool_client_lookups_total") == i + 1
        assert registry.get_sample_value("kvpool_client_failures_total", {"operation": "get"}) == 1
        del registry, m  # dropped: its id is free for the next one
    gc.collect()
    assert len(metrics._by_registry) == before  # the memo does not keep registries alive


def test_the_default_registry_is_used_when_none_is_given() -> None:
    assert client_metrics() is client_metrics(REGISTRY)


def test_rejected_blocks_are_counted_by_reason() -> None:
    registry = CollectorRegistry()
    m = client_metrics(registry)
    for n, reason in enumerate(REJECT_REASONS, start=1):
        m.rejected_blocks.labels(reason=reason).inc(n)
    families = {
        f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
    }
    family = families["kvpool_client_rejected_blocks"]
    assert family.type == "counter"
    assert "tenant MAC" in family.documentation and "miss" in family.documentation
    totals = {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert totals == {"checksum": 1, "mismatch": 2, "mac": 3, "format": 4}
    assert set(REJECT_REASONS) == {"checksum", "mismatch", "mac", "format"}
