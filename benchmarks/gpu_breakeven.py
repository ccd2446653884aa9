"""A kvpool hit against recomputing on a GPU: the prefill of a Llama-3-8B-shaped model against
fetching the same prefix's 2-bit KV from a shard on the same machine and decoding it into GPU
memory, in one run.

    python benchmarks/gpu_breakeven.py                        # on a CUDA machine
    python benchmarks/gpu_breakeven.py --tiny --device cpu    # a small smoke run anywhere

Model: `LlamaForCausalLM` from a transformers config shaped like Llama-3-8B (32 layers, hidden
4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256), random weights (nothing is
downloaded), bf16, SDPA attention. Prompt: `--tokens` random ids (2,048).

  prefill      one forward pass over the prompt with a KV cache (best of `--repeat`, after a
               warm-up), the time a worker spends recomputing the prefix
  kvpool get   `KVPool.get` of the prompt from a shard server in its own process on this host
               (the same-host shared-memory path, or TCP with --tcp): fetch, verify and decode
               every 256-token block on the device, concatenated into the prefix's tensors
  kvpool out   `KVPool.get(out=)`: every block decoded straight into its slice of a device
               cache the caller allocated once (no concatenation, no copy after the decode)
  kvpool blocks `KVPool.get_blocks` into one device block reused (what the vLLM connector does:
               each block decoded and handed over, nothing concatenated)

Each for every codec of `--codecs`: "k2v2" (2-bit keys and values, G = 128, what store.py
measures; its fields unsuffixed) and "v2_predicted" (codec v2 with inter-layer prediction and
every option, its basis and maps on the device; fields suffixed _v2_predicted; a random basis and
random maps of the model's shapes: speed only), one shard and one prefill for all.

The shard server runs without Ray (`ShardServer` in a child process), as on a machine with no
Ray. Tokens/s of each and `hit_speedup` = prefill seconds / get seconds; the last line is one
JSON object.
key_relative_error checks that the keys came back (random weights give keys with none of the
channel structure the codec relies on: it is not a quality figure; see fidelity.py for those).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import torch

from kvpool.client import KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig
from kvpool.kernels.transforms import RopeParams
from kvpool.transport import ClientConfig

LLAMA3_8B: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
TINY: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096, rope_theta=500000.0,
)  # fmt: skip
CODEC = CodecConfig(2, 2, 128)


def shard(budget: int, ready: Any) -> None:
    """A shard server without Ray, in this child process, until it is terminated."""
    from kvpool.services.server import ShardServer
    from kvpool.services.store import BlockStore

    server = ShardServer(BlockStore(budget), "breakeven")
    ready.put(server.start())
    while True:
        time.sleep(3600)


def best_seconds(fn: Callable[[], Any], repeat: int, device: torch.device) -> float:
    """The best of `repeat` timed calls, after one untimed warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def prefill(args: argparse.Namespace, device: torch.device) -> tuple[float, Any, list[int], Any]:
    """(best prefill seconds, the config, the prompt, (keys, values) [L, H, T, D])."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:
        model: Any = LlamaForCausalLM(config)
        model = model.to(torch.bfloat16).eval()
    prompt = torch.randint(config.vocab_size, (1, args.tokens), device=device)
    with torch.inference_mode():
        seconds = best_seconds(lambda: model(prompt, use_cache=True), args.repeat, device)
        cache = model(prompt, use_cache=True).past_key_values
    layers = [cache.layers[i] for i in range(config.num_hidden_layers)]
    keys = torch.stack([layer.keys[0] for layer in layers])
    values = torch.stack([layer.values[0] for layer in layers])
    return seconds, config, prompt[0].tolist(), (keys, values)


def codecs(names: list[str], shape: tuple[int, int, int, int]) -> dict[str, CodecConfig]:
    """The codecs to measure, by name: "k2v2" (2-bit keys and values, G = 128) and
    "v2_predicted" (codec v2 with inter-layer prediction and every option: a random basis and
    random maps of the model's shapes, speed only; the reader's KeyBasis copies them to the
    device once)."""
    from codec import synthetic_predicting_basis  # benchmarks/, on sys.path as the script's folder

    known = {"k2v2": lambda: CODEC, "v2_predicted": lambda: CodecConfig(
        2, 2, 128, rope=RopeParams(500000.0, shape[3]), hadamard_values=True,
        key_basis=synthetic_predicting_basis(shape))}  # fmt: skip
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"unknown codec(s) {unknown}; known: {sorted(known)}")
    return {name: known[name]() for name in names}


def measure(
    args: argparse.Namespace, device: torch.device, address: str, name: str, codec: CodecConfig,
    config: Any, tokens: list[int], keys: torch.Tensor, values: torch.Tensor,
) -> dict[str, Any]:  # fmt: skip
    """One codec's get paths against the shard at `address`, its fields named for the codec
    (K2V2's with no suffix)."""
    dtype = keys.dtype
    heads, head_dim = keys.shape[1], keys.shape[3]
    ns = namespace_for(f"bench/llama-3-8b-shape-random/{name}", config.num_hidden_layers, heads,
                       head_dim, dtype, codec)  # fmt: skip
    client = ClientConfig(timeout_s=60.0, same_host=not args.tcp)
    with KVPool(address, ns, codec, device=device, config=client) as pool:
        stored = pool.put(tokens, (keys, values))
        blocks = args.tokens // ns.block_tokens
        if stored != blocks:
            raise RuntimeError(f"{name}: stored {stored} of {blocks} blocks")
        stored_bytes = pool.stats.bytes_put

        def get() -> None:
            hit = pool.get(tokens)
            if hit is None or hit.tokens != blocks * ns.block_tokens:
                raise RuntimeError("kvpool: the prefix did not come back whole")

        shape = (ns.layers, ns.kv_heads, ns.block_tokens, ns.head_dim)
        scratch = (torch.empty(shape, dtype=dtype, device=device),
                   torch.empty(shape, dtype=dtype, device=device))  # fmt: skip

        whole = (keys.shape[0], keys.shape[1], blocks * ns.block_tokens, keys.shape[3])
        cache = (torch.empty(whole, dtype=dtype, device=device),
                 torch.empty(whole, dtype=dtype, device=device))  # fmt: skip

        def get_out() -> None:
            hit = pool.get(tokens, out=cache)
            if hit is None or hit.tokens != blocks * ns.block_tokens:
                raise RuntimeError("kvpool: the prefix did not come back whole")

        def get_blocks() -> None:
            got = sum(1 for _ in pool.get_blocks(tokens, present=len(tokens), out=scratch))
            if got != blocks:
                raise RuntimeError(f"kvpool: {got} of {blocks} blocks")

        get_s = best_seconds(get, args.repeat, device)
        out_s = best_seconds(get_out, args.repeat, device)
        blocks_s = best_seconds(get_blocks, args.repeat, device)
        hit = pool.get(tokens)
        assert hit is not None and hit.keys is not None
        want = keys[:, :, : hit.tokens].float()
        rel_err = float((hit.keys.float() - want).norm() / want.norm())
    loaded = blocks * ns.block_tokens
    suffix = "" if name == "k2v2" else f"_{name}"
    fields = {
        "codec": codec.describe(),
        "kvpool_get_s": round(get_s, 4),
        "kvpool_get_tokens_per_s": round(loaded / get_s),
        "kvpool_out_s": round(out_s, 4),
        "kvpool_out_tokens_per_s": round(loaded / out_s),
        "kvpool_blocks_s": round(blocks_s, 4),
        "kvpool_blocks_tokens_per_s": round(loaded / blocks_s),
        "stored_bytes": stored_bytes,
        "key_relative_error": round(rel_err, 4),
    }
    return {f"{key}{suffix}": value for key, value in fields.items()}


def main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    prefill_s, config, tokens, (keys, values) = prefill(args, device)
    shape = (keys.shape[0], keys.shape[1], 256, keys.shape[3])
    chosen = codecs(args.codecs, shape)  # before the shard starts: a bad name costs nothing
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    # far more than 2-bit blocks of every codec need
    budget = len(chosen) * 2 * keys.numel() * keys.element_size() + (256 << 20)
    server = ctx.Process(target=shard, args=(budget, ready), daemon=True)
    server.start()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": "Llama-3-8B-shaped, random weights" if not args.tiny else "tiny Llama",
        "dtype": "bfloat16", "prompt_tokens": args.tokens,
        "path": "tcp" if args.tcp else "same-host",
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(args.tokens / prefill_s),
        "fp16_bytes": 2 * keys.numel() * 2,
    }  # fmt: skip
    try:
        address = ready.get(timeout=120)
        for name, codec in chosen.items():
            fields = measure(args, device, address, name, codec, config, tokens, keys, values)
            suffix = "" if name == "k2v2" else f"_{name}"
            result.update(fields)
            for path, key in (("", "get"), ("_out", "out"), ("_blocks", "blocks")):
                seconds = fields[f"kvpool_{key}_s{suffix}"]
                result[f"hit_speedup{path}{suffix}"] = round(prefill_s / seconds, 2)
    finally:
        server.terminate()
        server.join(timeout=10)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke run")
    p.add_argument("--tcp", action="store_true", help="the same-host path off")
    p.add_argument(
        "--codecs",
        nargs="+",
        default=["k2v2", "v2_predicted"],
        help="k2v2 (its fields unsuffixed) and/or v2_predicted (fields _v2_predicted)",
    )
    result = main(p.parse_args())
    for key, value in result.items():
        print(f"{key:28s} {value}")
    print(json.dumps(result))
