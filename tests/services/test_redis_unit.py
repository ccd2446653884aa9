"""RedisTier on its own, against a real Redis server: the store-key API, a delete that never
waits on the write queue and never lets a queued write bring a block back, a full queue that
drops and counts, counters that stay consistent under concurrent offers."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from kvpool.services.redis_server import free_port
from kvpool.services.redis_tier import PREFIX, RedisTier

DB = 3  # apart from the databases the shard-level tests use


def key(i: int, tag: bytes = b"k") -> bytes:
    return (tag + i.to_bytes(8, "little")).ljust(32, b"\x00")


def chain(i: int) -> bytes:
    return (b"c" + i.to_bytes(8, "little")).ljust(32, b"\x01")


@pytest.fixture
def r(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis(redis_server.host, redis_server.port, db=DB)
    client.flushdb()
    yield client
    client.client_unpause()
    client.flushdb()
    client.close()


@pytest.fixture
def make_tier(redis_server, r) -> Iterator:
    tiers: list[RedisTier] = []

    def make(**kwargs) -> RedisTier:
        kwargs.setdefault("ttl_s", 60)
        tier = RedisTier(f"redis://{redis_server.host}:{redis_server.port}/{DB}", **kwargs)
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.close()


def test_offer_get_leading_delete_round_trip(make_tier, r) -> None:
    tier = make_tier()
    blocks = {key(i): os.urandom(1000 + i) for i in range(3)}
    for i, (k, data) in enumerate(blocks.items()):
        tier.offer(k, chain(i), i, data if i % 2 else bytearray(data))  # bytes or bytearray
    assert tier.flush(10)
    assert tier.counters().written == 3 and tier.written == 3
    for i, (k, data) in enumerate(blocks.items()):
        assert tier.get(k) == (chain(i), i, data)
        assert r.exists(PREFIX + k.hex().encode()) and 0 < r.ttl(PREFIX + k.hex().encode()) <= 60
    assert sorted(r.keys("*")) == sorted(RedisTier.redis_key(k) for k in blocks)
    k0, k1, k2 = blocks
    missing = key(99)
    assert tier.get(missing) is None
    assert tier.leading([k0, k1, k2]) == 3
    assert tier.leading([k0, k1, missing, k2]) == 2
    assert tier.leading([missing, k0]) == 0 and tier.leading([]) == 0
    assert tier.delete([k1, missing]) == {k1}
    assert tier.get(k1) is None and tier.leading([k0, k1, k2]) == 1
    assert tier.delete([]) == set() and tier.delete([k1]) == set()
    c = tier.counters()
    assert c.errors == 0 and c.dropped == 0 and c.queued == 0 and c.offered == 3


def test_store_keys_are_32_bytes(make_tier) -> None:
    tier = make_tier()
    for bad in (b"", b"x" * 31, b"x" * 33):
        with pytest.raises(ValueError):
            tier.offer(bad, chain(0), 0, b"data")
        with pytest.raises(ValueError):
            tier.get(bad)
        with pytest.raises(ValueError):
            tier.leading([bad])
        with pytest.raises(ValueError):
            tier.delete([bad])


def test_the_last_offer_of_a_key_wins(make_tier, r) -> None:
    tier = make_tier()
    r.client_pause(1000, all=False)  # writes wait: both offers are queued at once
    tier.offer(key(1), chain(1), 1, b"old")
    tier.offer(key(1), chain(2), 2, b"new")
    r.client_unpause()
    assert tier.flush(10)
    assert tier.get(key(1)) == (chain(2), 2, b"new")
    c = tier.counters()
    assert c.written + c.skipped == 2 and c.written >= 1


def test_delete_during_steady_writes_is_prompt_and_final(make_tier, r) -> None:
    """The old delete waited for the write queue to empty (Queue.join), which never happens
    while writes keep coming; and a write queued before a delete must not land after it."""
    tier = make_tier(queue_blocks=20_000)
    stop = threading.Event()
    filler = os.urandom(4096)
    offered = [0]

    def writer() -> None:  # keeps about 5000 writes queued, for at most 30 s
        deadline = time.monotonic() + 30
        i = 0
        while not stop.is_set() and time.monotonic() < deadline:
            if tier.counters().queued < 5000:
                tier.offer(key(i % 2000, b"f"), chain(i), i, filler)
                i += 1
            else:
                time.sleep(0.001)
        offered[0] = i

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)
        deleted = []
        for n in range(20):
            target = key(n, b"t")
            while tier.counters().queued > 6000:  # room for what follows
                time.sleep(0.01)
            for i in range(500):  # queued well behind other writes
                tier.offer(key(10_000 + i, b"g"), chain(i), i, filler)
            tier.offer(target, chain(n), n, b"doomed")
            assert tier.counters().queued > 0 and tier.dropped == 0
            started = time.monotonic()
            assert tier.delete([target]) == {target}  # held: queued, so cancelled
            assert time.monotonic() - started < 5.0
            deleted.append(target)
        assert tier.counters().queued > 0  # the queue never went idle meanwhile
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive() and offered[0] > 0
    assert tier.flush(60)
    assert not any(r.exists(RedisTier.redis_key(k)) for k in deleted)  # nothing came back
    assert all(tier.get(k) is None for k in deleted)
    c = tier.counters()
    assert c.skipped >= len(deleted) and c.errors == 0 and c.queued == 0
    tier.offer(deleted[0], chain(0), 0, b"again")  # a delete does not stop later writes
    assert tier.flush(10) and tier.get(deleted[0]) == (chain(0), 0, b"again")


def test_a_full_queue_drops_writes_and_counts_them(make_tier, r) -> None:
    tier = make_tier(queue_blocks=4)
    n = 50
    r.client_pause(3000, all=False)  # Redis takes no writes: the drain thread stalls
    try:
        started = time.monotonic()
        for i in range(n):
            tier.offer(key(i), chain(i), i, b"x" * 100)
        assert time.monotonic() - started < 1.0  # offers never waited for Redis
        c = tier.counters()
        assert c.written == 0 and c.queued in (4, 5)  # the queue, and maybe one in flight
        assert c.dropped == n - c.queued and tier.dropped == c.dropped
    finally:
        r.client_unpause()
    assert tier.flush(10)
    c = tier.counters()
    assert c.written == n - c.dropped and c.offered == n and c.errors == 0
    assert r.dbsize() == c.written
    assert tier.leading([key(i) for i in range(n)]) == c.written  # the first ones were kept


def test_counters_stay_consistent_under_concurrent_offers(make_tier, r) -> None:
    tier = make_tier(queue_blocks=64)
    threads_n, per_thread = 8, 1500
    snapshots = []
    done = threading.Event()

    def offerer(t: int) -> None:
        for i in range(per_thread):
            tier.offer(key(t * per_thread + i), chain(i), i, b"v" * 64)

    def watcher() -> None:
        while not done.is_set():
            snapshots.append(tier.counters())

    threads = [threading.Thread(target=offerer, args=(t,)) for t in range(threads_n)]
    watch = threading.Thread(target=watcher)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert tier.flush(30)
    c = tier.counters()
    total = threads_n * per_thread
    assert c.offered == total and c.queued == 0 and c.errors == 0 and c.skipped == 0
    assert c.written + c.dropped == total
    assert c.written >= 64 and c.dropped > 0  # both paths taken
    assert r.dbsize() == c.written
    fields = ("written", "dropped", "offered")
    for a, b in itertools.pairwise(snapshots):  # each snapshot is a moment: none goes back
        assert all(getattr(a, f) <= getattr(b, f) for f in fields)
    assert all(s.offered <= total and s.queued <= 64 + 1 for s in snapshots)


def test_a_redis_that_is_down_counts_errors_and_misses() -> None:
    tier = RedisTier(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, socket_timeout_s=1.0)
    try:
        for i in range(3):
            tier.offer(key(i), chain(i), i, b"data")
        assert tier.flush(30)
        c = tier.counters()
        assert c.written == 0 and c.write_errors == 3 and c.errors == 3 and c.offered == 3
        assert tier.get(key(0)) is None and tier.leading([key(0)]) == 0
        assert tier.delete([key(0)]) == set()
        assert tier.errors == 6
    finally:
        started = time.monotonic()
        tier.close()
        assert time.monotonic() - started < 5.0
