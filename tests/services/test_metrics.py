"""Prometheus metrics: scrape every shard's /metrics and the client's registry around a
workload, and check that the numbers move as they should."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import Binding, CodecConfig, encode
from kvpool.proto import kvpool_pb2 as pb
from kvpool.proto import kvpool_pb2_grpc as pb_grpc
from kvpool.proto.keys import block_keys
from kvpool.proto.messages import namespace_to_proto
from kvpool.services.tier import Tier, TierConfig, start_tier

CODEC = CodecConfig(2, 2, 64)
NS = namespace_for("test/metrics", 2, 2, 64, torch.float16, CODEC, block_tokens=64)


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=32 << 20, shard_cpus=0.1, name="metrics"))
    yield t
    t.shutdown()


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(tier: Tier) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every shard's samples, summed over shards."""
    total: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for _, _, metrics in tier.topology():
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            for key, value in parse(r.read().decode()).items():
                total[key] = total.get(key, 0.0) + value
    return total


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_shard_and_client_metrics_follow_a_workload(tier) -> None:
    registry = CollectorRegistry()
    before = scrape(tier)
    tokens = list(range(4 * 64 + 5))
    g = torch.Generator().manual_seed(0)
    kv = tuple(torch.randn(2, 2, len(tokens), 64, generator=g).half() for _ in range(2))
    with KVPool(tier.endpoint, NS, CODEC, registry=registry) as pool:
        assert pool.put(tokens, kv) == 4
        assert pool.get(tokens) is not None
        assert pool.get([7] * 64) is None  # a miss
        sent, received = pool.stats.bytes_put, pool.stats.bytes_fetched
        address = tier.topology()[0][1]
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.KVPoolStub(ch)
            with pytest.raises(grpc.RpcError):
                stub.Lookup(pb.LookupRequest(namespace_id=b"x"), timeout=5)  # bad
            # a block bound to another key than the one it is put under: refused
            key, elsewhere = block_keys(NS, [9] * 128)
            block = encode(
                kv[0][:, :, :64], kv[1][:, :, :64], CODEC, binding=Binding(NS.id, elsewhere)
            )
            info = pb.BlockInfo(
                namespace_id=NS.id, key=key, chain=key, position=0, size=len(block),
                namespace=namespace_to_proto(NS),
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as refused:
                stub.Put(iter([pb.PutRequest(info=info), pb.PutRequest(chunk=block)]), timeout=5)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    after = scrape(tier)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # the client is on the shards' host: its puts and gets go through their arenas, the puts
    # as one batch per shard
    batches = delta("kvpool_shard_requests_total", method="BatchPutShared", code="OK")
    assert 1 <= batches <= len(tier.topology())
    assert (
        delta("kvpool_shard_request_duration_seconds_count", method="BatchPutShared", code="OK")
        == batches
    )
    assert delta("kvpool_shard_requests_total", method="PutShared", code="OK") == 0
    assert delta("kvpool_shard_requests_total", method="GetShared", code="OK") == 4
    assert delta("kvpool_shard_requests_total", method="Put", code="OK") == 0
    assert delta("kvpool_shard_requests_total", method="Get", code="OK") == 0
    assert delta("kvpool_shard_requests_total", method="Lookup", code="INVALID_ARGUMENT") == 1
    assert delta("kvpool_shard_requests_total", method="Put", code="FAILED_PRECONDITION") == 1
    assert delta("kvpool_shard_blocks") == 4
    assert delta("kvpool_shard_used_bytes") == sent == received
    assert delta("kvpool_shard_puts_total") == 4 and delta("kvpool_shard_hits_total") == 4
    assert delta("kvpool_shard_served_bytes_total") == received
    assert value(after, "kvpool_shard_capacity_bytes") == 2 * (32 << 20)
    assert value(after, "kvpool_shard_evictions_total") == 0
    assert ("kvpool_shard_quota_evictions_total", ()) in after  # exported; no quotas here
    assert value(after, "kvpool_shard_quota_evictions_total") == 0
    assert ("kvpool_shard_mismatched_blocks_total", ()) in after  # exported; no Redis here
    assert value(after, "kvpool_shard_mismatched_blocks_total") == 0

    c = parse(generate_latest(registry).decode())
    assert value(c, "kvpool_client_sent_bytes_total") == sent
    assert value(c, "kvpool_client_received_bytes_total") == received
    assert value(c, "kvpool_client_hit_blocks_total") == 4
    assert value(c, "kvpool_client_hit_tokens_total") == 256
    assert (
        value(c, "kvpool_client_request_duration_seconds_count", operation="get", status="hit") == 1
    )
    assert (
        value(c, "kvpool_client_request_duration_seconds_count", operation="get", status="miss")
        == 1
    )
    assert (
        value(c, "kvpool_client_request_duration_seconds_count", operation="put", status="ok") == 1
    )
    assert value(c, "kvpool_client_encode_seconds_count") == 4
    assert value(c, "kvpool_client_decode_seconds_count") == 4
    assert value(c, "kvpool_client_failures_total", operation="get") == 0
    assert pool.stats.rejected_blocks == 0
    assert not [k for k in c if k[0] == "kvpool_client_rejected_blocks_total"]  # none refused


def test_failures_turned_into_misses_are_counted() -> None:
    registry = CollectorRegistry()
    with KVPool("127.0.0.1:1", NS, CODEC, registry=registry) as pool:
        assert pool.lookup(list(range(128))) == 0
    c = parse(generate_latest(registry).decode())
    assert value(c, "kvpool_client_failures_total", operation="lookup") == 1
    assert (
        value(c, "kvpool_client_request_duration_seconds_count", operation="lookup", status="error")
        == 1
    )


def test_names_follow_the_conventions(tier) -> None:
    registry = CollectorRegistry()
    KVPool(tier.endpoint, NS, CODEC, registry=registry).close()
    texts = [generate_latest(registry).decode()]
    for _, _, metrics in tier.topology():
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            texts.append(r.read().decode())
    families = [
        f
        for text in texts
        for f in text_string_to_metric_families(text)
        if f.name.startswith("kvpool")
    ]
    assert len(families) >= 20
    for f in families:
        assert ":" not in f.name and f.name.split("_")[1] in ("client", "shard")
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples)
        assert not f.name.endswith(("_ms", "_milliseconds", "_kb", "_mb"))
        for s in f.samples:
            assert set(s.labels) <= {"method", "code", "operation", "status", "reason", "le"}


def test_the_tier_writes_a_prometheus_file_sd(tier, tmp_path: Path) -> None:
    path = tmp_path / "kvpool.json"
    tier.write_file_sd(path)
    groups = json.loads(path.read_text())
    assert groups[0]["labels"]["job"] == "kvpool-shards"
    assert sorted(groups[0]["targets"]) == sorted(m for _, _, m in tier.topology())
