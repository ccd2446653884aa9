"""kvpool's backend driven by SGLang's real HiCacheController on the CPU: its backup thread
writes pages through batch_set_v1, its prefetch threads query with batch_exists (page keys
from SGLang's own hash of the tokens) and load with batch_get_v1. The one scheduler step of a
prefetch (take the hit, allocate host slots, hand it to the I/O thread) is done here as
SGLang's radix cache does it; everything else runs in the controller's own threads."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from sglang.srt.managers.cache_controller import HiCacheController
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.utils import get_hash_str
from sglang.srt.runtime_context import get_parallel

from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.sglang import KVPoolStorage
from tests.sglang.hicache import (
    MODEL,
    PAGE,
    device_pool,
    dynamic,
    fill,
    host_pool,
    model_dir,
    pages,
    round_trip,
)

TOKENS = [(17 * i + 5) % 49152 for i in range(10 * PAGE)]
WAIT_S = 120  # generous: a shared 2-core CI box


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=128 << 20, shard_cpus=0.1, name="sglctl"))
    yield t
    t.shutdown()


@pytest.fixture(scope="module")
def one_rank() -> None:
    """A single-rank process group and SGLang's parallel facts for it, as its launcher sets."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    get_parallel().override_permanently(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1, attn_dcp_rank=0
    )


def controller(host: Any, extra: dict[str, Any]) -> HiCacheController:
    device = host_device[id(host)]
    alloc = PagedTokenToKVPoolAllocator(
        device.size, PAGE, device.dtype, "cpu", device, need_sort=False
    )
    return HiCacheController(
        alloc, host, PAGE, dist.group.WORLD, threading.Event(), storage_backend="dynamic",
        model_name=MODEL, storage_backend_extra_config=extra, prefetch_threshold=PAGE,
    )  # fmt: skip


host_device: dict[int, Any] = {}


def pool() -> Any:
    device = device_pool()
    host = host_pool("page_first", device)
    host_device[id(host)] = device
    return host


def prefetch(ctl: HiCacheController, host: Any, rid: str) -> tuple[Any, int]:
    """Query, then (as the radix cache's scheduler step) allocate the hit's host slots and
    hand the operation to the I/O thread; returns it and the tokens it loaded."""
    op = ctl.prefetch(rid, TOKENS, None, [])
    hit = ctl.prefetch_hit_queue.get(timeout=WAIT_S)
    assert hit is op
    loaded = 0
    if op.storage_hit_count:
        op.host_indices = host.alloc(op.storage_hit_count)
        ctl.prefetch_buffer.put(op)
        while True:
            ack = ctl.ack_prefetch_queue.get(timeout=WAIT_S)
            assert ack.rid == rid
            if ack.completed_req:
                break
            loaded = max(loaded, ack.completed_tokens)
    return op, loaded


def test_the_controllers_backup_and_prefetch_threads_round_trip(
    tier: Tier, one_rank: None, tmp_path: Path
) -> None:
    host = pool()
    ctl = controller(host, dynamic(tier.endpoint, model_path=model_dir(tmp_path), salt="ctl"))
    store = ctl.storage_backend
    assert isinstance(store, KVPoolStorage)
    try:
        slots = host.alloc(len(TOKENS))
        fill(host, slots, seed=11)
        written = pages(host, slots)
        keys = get_hash_str(TOKENS, None, page_size=PAGE)
        ctl.write_storage(slots, TOKENS, hash_value=keys, prefix_keys=[])
        done = ctl.ack_backup_queue.get(timeout=WAIT_S)
        assert done.completed_tokens == len(TOKENS)
        assert store.pool.stats.blocks_put == 2
        host.kv_buffer.zero_()
        op, loaded = prefetch(ctl, host, "r1")
        assert op.storage_hit_count == loaded == 8 * PAGE  # the two whole blocks
        assert torch.equal(pages(host, op.host_indices), round_trip(store, written, keys))
    finally:
        ctl.detach_storage_backend()


def test_with_the_tier_down_backups_fail_and_the_prefetch_threads_live_on(
    one_rank: None, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    host = pool()
    # basis "none": the backend starts without asking the tier, so every call meets it down
    extra = dynamic(
        dead, model_path=model_dir(tmp_path), rpc_timeout_s=0.5, call_timeout_s=2.0, basis="none"
    )
    ctl = controller(host, extra)
    try:
        slots = host.alloc(len(TOKENS))
        fill(host, slots, seed=5)
        keys = get_hash_str(TOKENS, None, page_size=PAGE)
        ctl.write_storage(slots, TOKENS, hash_value=keys, prefix_keys=[])
        assert ctl.ack_backup_queue.get(timeout=WAIT_S).completed_tokens == 0
        op, loaded = prefetch(ctl, host, "r2")
        assert op.storage_hit_count == loaded == 0
        # a load whose blocks cannot be fetched: the I/O thread reports nothing loaded
        load = ctl.prefetch(rid := "r3", TOKENS, None, [])
        assert ctl.prefetch_hit_queue.get(timeout=WAIT_S) is load
        load.hash_value, load.host_indices = keys[:4], host.alloc(4 * PAGE)
        ctl.prefetch_buffer.put(load)
        acks = []
        while not (ack := ctl.ack_prefetch_queue.get(timeout=WAIT_S)).completed_req:
            assert ack.rid == rid
            acks.append(ack.completed_tokens)
        assert acks == [0]
        for thread in (ctl.prefetch_thread, ctl.prefetch_io_aux_thread, ctl.backup_thread):
            assert thread.is_alive()
        # and they still serve: a second query is answered (a miss)
        assert prefetch(ctl, host, "r4")[0].storage_hit_count == 0
    finally:
        ctl.detach_storage_backend()
