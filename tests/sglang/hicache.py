"""SGLang's real HiCache pieces for the tests: a CPU device pool and a host pool over it, the
storage config SGLang builds, and kvpool's backend made by SGLang's own factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvpool.kernels.codec import Binding, decode, encode
from kvpool.proto.keys import page_block_key, run_keys
from kvpool.sglang import KVPoolStorage, page_kv

LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
PAGE, LAYERS, HEADS, HEAD_DIM = 16, 4, 3, 64
BLOCK = 64  # kvpool block: 4 pages
MODEL = "test/smollm2-shaped"
# a Llama-style config.json (SmolLM2's RoPE), cut to the pool's 4 layers
CONFIG = {
    "num_hidden_layers": LAYERS, "num_attention_heads": 9, "num_key_value_heads": HEADS,
    "hidden_size": 9 * HEAD_DIM, "head_dim": HEAD_DIM, "rope_theta": 100000.0,
}  # fmt: skip


def model_dir(tmp: Path) -> str:
    (tmp / "config.json").write_text(json.dumps(CONFIG))
    return str(tmp)


def device_pool(tokens: int = 1024, dtype: torch.dtype = torch.float16) -> MHATokenToKVPool:
    return MHATokenToKVPool(
        size=tokens, page_size=PAGE, dtype=dtype, head_num=HEADS, head_dim=HEAD_DIM,
        layer_num=LAYERS, device="cpu", enable_memory_saver=False,
    )  # fmt: skip


def host_pool(layout: str, device: MHATokenToKVPool | None = None) -> MHATokenToKVPoolHost:
    device = device or device_pool()
    return MHATokenToKVPoolHost(
        device._mha_buffer_info(), host_to_device_ratio=2.0, host_size=0, page_size=PAGE,
        layout=layout, pin_memory=False, device="cpu", device_capacity_tokens=device.size,
        start_layer=0, end_layer=LAYERS,
    )  # fmt: skip


def storage_config(extra: dict[str, Any], **fields: Any) -> HiCacheStorageConfig:
    """As SGLang's cache controller builds it for a single-rank MHA model."""
    base: dict[str, Any] = {
        "tp_rank": 0, "tp_size": 1, "pp_rank": 0, "pp_size": 1, "attn_cp_rank": 0,
        "attn_cp_size": 1, "is_mla_model": False, "enable_storage_metrics": False,
        "is_page_first_layout": True, "model_name": MODEL,
    }  # fmt: skip
    return HiCacheStorageConfig(**{**base, **fields, "extra_config": extra})


def dynamic(endpoint: str, **settings: Any) -> dict[str, Any]:
    """The --hicache-storage-backend-extra-config of the README."""
    return {
        "backend_name": "kvpool", "module_path": "kvpool.sglang",
        "class_name": "KVPoolStorage", "interface_v1": 1, "endpoint": endpoint,
        "block_tokens": BLOCK, "group_size": 64, **settings,
    }  # fmt: skip


def backend(host: MHATokenToKVPoolHost, extra: dict[str, Any], **fields: Any) -> KVPoolStorage:
    """Built by SGLang's factory from the dynamic config, then given the host pool (as the
    cache controller does)."""
    made = StorageBackendFactory.create_backend("dynamic", storage_config(extra, **fields), host)
    assert isinstance(made, KVPoolStorage)
    made.register_mem_pool_host(host)
    return made


def fill(host: MHATokenToKVPoolHost, slots: torch.Tensor, seed: int) -> None:
    """Random KV (RoPE'd-key-like scale) into the pages at `slots`."""
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(slots), PAGE):
        page = page_kv(host, int(slots[i]))
        page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))


def pages(host: MHATokenToKVPoolHost, slots: torch.Tensor) -> torch.Tensor:
    """The KV of the pages at `slots` along tokens: [2, L, H, tokens, D] (a copy)."""
    return torch.cat([page_kv(host, int(slots[i])) for i in range(0, len(slots), PAGE)], 3)


def info(prefix: list[str]) -> HiCacheStorageExtraInfo:
    return HiCacheStorageExtraInfo(prefix_keys=list(prefix))


def round_trip(store: KVPoolStorage, kv: torch.Tensor, page_keys: list[str]) -> torch.Tensor:
    """What the codec gives back for the full blocks of `kv` [2, L, H, T, D], each encoded as
    the block of its position and key and decoded: what a hit must hold, bit for bit."""
    ns, codec = store.namespace, store.pool.codec
    assert ns is not None and store.pool is not None
    n = BLOCK // PAGE
    out = []
    for b in range(kv.shape[3] // BLOCK):
        key = run_keys([page_block_key(ns, bytes.fromhex(page_keys[(c + 1) * n - 1]))
                        for c in range(b + 1)])[b]  # fmt: skip
        x = kv[..., b * BLOCK : (b + 1) * BLOCK, :]
        blob = encode(x[0], x[1], codec, start_position=b * BLOCK, binding=Binding(ns.id, key))
        block = decode(blob, "cpu", kv.dtype, key_basis=codec.key_basis)
        out.append(torch.stack((block.keys, block.values)))
    return torch.cat(out, 3)
