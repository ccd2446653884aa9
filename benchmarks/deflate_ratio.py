"""Deflate ratio: what codec v2's blocks weigh with and without DEFLATED, by key budget.

    python benchmarks/deflate_ratio.py 2.0 --symmetric 1.7 1.6 1.5

Ratio only, no scoring: this chooses budgets for benchmarks/fidelity.py's deflated rows
(DEFLATED_KEY_BITS) without reading a perplexity. The development texts of benchmarks/levers.py
(prose, docs, code), 2 windows of 1024 tokens per text, SmolLM2-135M's prefix KV in fp16, cut
into 256-token blocks (the first of each window holds the sink) and encoded with predicted v2
(basis from .cache/profiles, calibrated first when missing, as fidelity.py's rows), values
2-bit per token after the Hadamard rotation, min/max or symmetric groups. ratio = fp16 bytes /
encoded bytes (headers, sinks and padding included), pooled and per text: the plain ratio is
fixed by the shapes, the deflated one depends on the text. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import fidelity
import levers
import torch

from kvpool import models
from kvpool.hf import codec_for
from kvpool.kernels.codec import encode

BLOCK, WINDOW = 256, 1024


def kv_windows(model: Any, tokenizer: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out = []
    for name, text in levers.eval_texts().items():
        ids = tokenizer(text, return_tensors="pt").input_ids
        for i in range(2):
            start = int((i + 0.5) / 2 * (ids.shape[1] - WINDOW))
            with torch.inference_mode():
                layers = model(
                    ids[:, start : start + WINDOW], use_cache=True
                ).past_key_values.layers
            keys = torch.stack([layer.keys[0] for layer in layers]).half()
            values = torch.stack([layer.values[0] for layer in layers]).half()
            out.append((name, keys, values))
    return out


def main(minmax: list[float], symmetric: list[float]) -> dict[str, Any]:
    model, tokenizer = models.load()
    data = kv_windows(model, tokenizer)
    v2 = codec_for(model, 2, 2, sink_tokens=1)
    result: dict[str, Any] = {}
    for bits, sym in [(b, False) for b in minmax] + [(b, True) for b in symmetric]:
        basis = fidelity.load_basis(model, tokenizer, bits, predict=True, symmetric=sym)
        config = replace(v2, key_basis=basis, symmetric_values=sym)
        for deflate in (False, True):
            per_text: dict[str, list[int]] = {}
            for name, keys, values in data:
                acc = per_text.setdefault(name, [0, 0])
                for t in range(0, WINDOW, BLOCK):
                    k, v = keys[:, :, t : t + BLOCK], values[:, :, t : t + BLOCK]
                    blob = encode(k, v, replace(config, deflate=deflate), start_position=t)
                    acc[0] += 4 * k.numel()
                    acc[1] += len(blob)
            fp16, encoded = (sum(a[i] for a in per_text.values()) for i in (0, 1))
            row = {"ratio": round(fp16 / encoded, 3),
                   "by_text": {n: round(a / b, 3) for n, (a, b) in per_text.items()}}  # fmt: skip
            name = f"{'symmetric' if sym else 'min/max'} K{bits}{' deflated' if deflate else ''}"
            result[name] = row
            print(f"{name:28s} {row['ratio']:7.3f}  {row['by_text']}", flush=True)
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("minmax", nargs="*", type=float, help="key budgets, min/max value groups")
    p.add_argument("--symmetric", nargs="*", type=float, default=[],
                   help="key budgets, symmetric value groups")  # fmt: skip
    args = p.parse_args()
    print(json.dumps(main(args.minmax, args.symmetric)))
