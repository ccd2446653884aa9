"""The `kvpool` command line.

    kvpool demo      encode a Llama-3-8B-shaped KV block at several codec settings and report
                     encoded size, compression ratio, reconstruction error and throughput

The cache tier's `kvpool serve` joins this command when the tier exists (issue 3).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence


def demo(layers: int, heads: int, tokens: int, head_dim: int, seed: int) -> list[dict[str, object]]:
    """Encode one synthetic block at a few settings; one result row per setting."""
    import torch

    from kvpool.kernels.codec import CodecConfig, decode, encode

    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, tokens, head_dim)
    # keys with per-channel outliers (as real models have), values roughly Gaussian
    keys = torch.randn(shape, generator=g) * (
        1 + 4 * torch.rand(1, heads, 1, head_dim, generator=g)
    )
    values = torch.randn(shape, generator=g)
    keys, values = keys.half(), values.half()
    fp16_bytes = 2 * keys.numel() * 2
    rows: list[dict[str, object]] = []
    for name, cfg in [
        ("2-bit G=128", CodecConfig(2, 2, 128)),
        ("2-bit G=32", CodecConfig(2, 2, 32)),
        ("3-bit keys, 2-bit values G=64", CodecConfig(3, 2, 64)),
        ("4-bit G=128", CodecConfig(4, 4, 128)),
        ("8-bit G=128", CodecConfig(8, 8, 128)),
    ]:
        t0 = time.perf_counter()
        blob = encode(keys, values, cfg)
        t1 = time.perf_counter()
        out = decode(blob, dtype=torch.float32)
        t2 = time.perf_counter()
        assert out.keys is not None and out.values is not None
        rel = lambda x, y: float((x - y.float()).norm() / y.float().norm())  # noqa: E731
        rows.append({
            "config": name,
            "encoded_bytes": len(blob),
            "compression_ratio": round(fp16_bytes / len(blob), 2),
            "bits_per_value": round(len(blob) * 8 / (2 * keys.numel()), 3),
            "key_rel_error": round(rel(out.keys, keys), 4),
            "value_rel_error": round(rel(out.values, values), 4),
            "encode_gbps": round(fp16_bytes / (t1 - t0) / 1e9, 2),
            "decode_gbps": round(fp16_bytes / (t2 - t1) / 1e9, 2),
        })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kvpool", description="kvpool: a store for compressed KV caches"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="encode a KV block and report size and error")
    p_demo.add_argument("--layers", type=int, default=32)
    p_demo.add_argument("--heads", type=int, default=8)
    p_demo.add_argument("--tokens", type=int, default=256)
    p_demo.add_argument("--head-dim", type=int, default=128)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    if args.command == "demo":
        rows = demo(args.layers, args.heads, args.tokens, args.head_dim, args.seed)
        print(
            f"block: keys and values [{args.layers}, {args.heads}, {args.tokens}, {args.head_dim}] fp16"
        )
        for row in rows:
            if args.json:
                print(json.dumps(row))
            else:
                print("  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
