"""Sweep launch parameters of the Triton codec kernels on a Llama-3-8B-shaped block (CUDA).

Prints one line per setting: encode/decode time of keys and values alone, as a fraction of a
device copy of the same tensor. Used to choose the defaults in kernels/triton_codec.py.
"""

from __future__ import annotations

import json

import torch
from triton.testing import do_bench

from kvpool.kernels import triton_codec
from kvpool.kernels.codec import CodecConfig, block_header
from kvpool.proto.blockformat import Layout

SHAPE = (32, 8, 256, 128)


def main() -> None:
    dev = torch.device("cuda")
    x = torch.randn(SHAPE, device=dev).half()
    y = torch.empty_like(x)
    t_copy = do_bench(lambda: y.copy_(x), rep=100)
    rows = []
    for group in (128, 64, 32):
        header = block_header(Layout.KV, x.dtype, SHAPE, CodecConfig(2, 2, group), 0)
        payload = torch.zeros(header.payload_len, dtype=torch.uint8, device=dev)
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        for kw in (4, 8, 16):
            for vw, vr in ((2, 8), (4, 16), (4, 32), (8, 32), (8, 64)):
                tc = triton_codec
                tc._KEY_WARPS, tc._VALUE_WARPS, tc._VALUE_ROWS = kw, vw, vr
                ks, vs = header.tensor_sections(0), header.tensor_sections(1)
                r = {"G": group, "key_warps": kw, "value_warps": vw, "value_rows": vr}
                r["enc_k"] = t_copy / do_bench(
                    lambda: triton_codec.quantize_into(x, ks, header, payload, flag), rep=50
                )
                r["enc_v"] = t_copy / do_bench(
                    lambda: triton_codec.quantize_into(x, vs, header, payload, flag), rep=50
                )
                r["dec_k"] = t_copy / do_bench(
                    lambda: triton_codec.decode_tensor(payload, ks, header, y), rep=50
                )
                r["dec_v"] = t_copy / do_bench(
                    lambda: triton_codec.decode_tensor(payload, vs, header, y), rep=50
                )
                rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
                print(rows[-1], flush=True)
    print(json.dumps({"copy_ms": t_copy, "rows": rows}))


if __name__ == "__main__":
    main()
