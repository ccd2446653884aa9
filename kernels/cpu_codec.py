"""The CPU codec: the C loop in _cpu_codec.c, one section per call, sections in parallel.

Where it stands: kvpool.kernels.codec uses it for tensors on the CPU. Each call releases the
GIL, so a small thread pool (shared with cpu_attention.py) spreads the layers of a block over
the machine's cores. The same threads split a predicted block's tokens (basis.rebuild_rows):
each runs torch's products on one thread of its own, so they never fight torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from kvpool.kernels import _cpu_codec
from kvpool.proto.blockformat import BlockHeader, Section
from kvpool.proto.errors import NonFiniteError

if not hasattr(_cpu_codec, "store_rows"):  # a build from before this checkout's C loop
    raise ImportError(
        f"{_cpu_codec.__file__} is older than this checkout's kernels/_cpu_codec.c: rebuild it "
        "(pip install -e . in the checkout)"
    )
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
WORKERS = max(1, os.cpu_count() or 1)


@functools.cache  # looked up once, not by every thread of POOL
def _runtime(prefixes: tuple[str, ...]) -> ctypes.CDLL | None:
    """The first shared library loaded in this process whose file name starts with one of
    `prefixes` (torch's own OpenMP runtime and libtorch_cpu), or None (not Linux, not found)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for path in (line.split(None, 5)[-1] for line in maps if "/" in line):
        if Path(path).name.startswith(prefixes):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _one_torch_thread() -> None:
    """Run this thread's torch products on one thread: what torch.set_num_threads(1) does to
    the calling thread (its OpenMP count and MKL's thread-local count), without the process-wide
    count that torch.set_num_threads also sets (the caller's threads and later ones keep theirs).
    Where the runtimes are not found, the thread keeps torch's count (`rebuild_workers` checks)."""
    torch.get_num_threads()  # torch sets a thread's counts on its first use: before ours
    omp, mkl = _runtime(("libgomp", "libiomp", "libomp")), _runtime(("libtorch_cpu",))
    if omp is not None and hasattr(omp, "omp_set_num_threads"):
        omp.omp_set_num_threads(1)
    if mkl is not None and hasattr(mkl, "MKL_Set_Num_Threads_Local"):  # MKL's C name (mkl.h
        mkl.MKL_Set_Num_Threads_Local(1)  # defines mkl_set_num_threads_local as it: the lower-
        # case symbol is the Fortran one, which takes a pointer)


POOL = ThreadPoolExecutor(
    max_workers=WORKERS, thread_name_prefix="kvcodec", initializer=_one_torch_thread
)


@functools.cache
def _ask_workers() -> bool:
    barrier = threading.Barrier(WORKERS)  # holds each task on a thread of its own

    def ask(_: int) -> int:
        barrier.wait()
        return torch.get_num_threads()

    return all(n == 1 for n in POOL.map(ask, range(WORKERS)))


_ASKING = threading.Lock()


def _single_threaded_workers() -> bool:
    """Whether every thread of POOL runs torch on one thread (each started and asked once). One
    caller asks at a time: two asking at once could each hold a thread at their barrier."""
    with _ASKING:
        return _ask_workers()


def rebuild_workers() -> int:
    """How many of POOL's threads a predicted block's rebuild splits its tokens over
    (basis.rebuild_rows): all of them where each runs torch on one thread; otherwise as many as
    the cores torch's own threads leave idle (torch.set_num_threads(1): one per core; the
    default, all cores to torch: one, and torch's threads share each product)."""
    if _single_threaded_workers():
        return WORKERS
    return max(1, min(WORKERS, (os.cpu_count() or 1) // torch.get_num_threads()))


def _spread(fn: Callable[[int], object], n: int) -> list[object]:
    """fn(i) for i in range(n) (the sections of a tensor), in one task per worker thread (each
    a contiguous run), so a block costs a few task hand-offs rather than one per section."""
    runs = [range(w * n // WORKERS, (w + 1) * n // WORKERS) for w in range(WORKERS)]
    return [r for rs in POOL.map(lambda run: [fn(i) for i in run], runs) for r in rs]


def encode_tensor(x: Tensor, sections: list[Section], header: BlockHeader, payload: Tensor) -> None:
    """Quantize and pack x: [L, H, T, D] (contiguous, CPU) into the payload's sections."""
    _, h, t, d = x.shape
    base, code = payload.data_ptr(), DTYPE_CODES[x.dtype]

    def one(i: int) -> bool:
        s = sections[i]
        group = header.group_size if s.is_key else header.value_group
        part = x[s.layer] if s.channels == d else x[s.layer, :, :, s.first : s.first + s.channels]
        part = part.contiguous()  # a copy only for a run of key components (KEY_BASIS)
        return bool(
            _cpu_codec.encode_section(
                part.data_ptr(), code, h, t, s.channels, int(s.is_key), group, s.bits,
                base + s.codes, base + s.scales, base + s.mins, int(s.symmetric),
            )
        )  # fmt: skip

    if not all(_spread(one, len(sections))):
        raise NonFiniteError("block holds NaN, inf or a magnitude beyond fp16 (65504)")


FUSES_TRANSFORMS = True  # decode_tensor undoes the Hadamard rotation and redoes RoPE itself


def decode_tensor(
    payload: Tensor, sections: list[Section], header: BlockHeader, out: Tensor,
    hadamard: bool = False, rope: tuple[Tensor, Tensor] | None = None,
) -> None:  # fmt: skip
    """Unpack and dequantize the payload's sections into out: [L, H, T, D] (CPU; each head's
    rows contiguous, see `check_out`; a section of some channels writes only those); then, row
    by row, undo the values' Hadamard rotation, or redo RoPE with rope = (cos, sin) float32
    [T, rotary_dim] (transforms.py's tables)."""
    _, h, t, _ = out.shape
    base, code = payload.data_ptr(), DTYPE_CODES[out.dtype]
    tables = (0, 0, 0)  # no RoPE
    if rope is not None:
        cos, sin = (x.contiguous() for x in rope)  # alive until the sections are decoded
        tables = (cos.data_ptr(), sin.data_ptr(), cos.shape[1])

    def one(i: int) -> None:
        s = sections[i]
        group = header.group_size if s.is_key else header.value_group
        _cpu_codec.decode_section(
            base + s.codes, base + s.scales, base + s.mins, h, t, s.channels, int(s.is_key),
            group, s.bits, out[s.layer, :, :, s.first:].data_ptr(), out.stride(1), out.stride(2),
            code, int(hadamard), *tables, int(s.symmetric),
        )  # fmt: skip

    _spread(one, len(sections))


def decode_rows(
    payload: Tensor, sections: list[Section], header: BlockHeader, out: Tensor, first: int,
    hadamard: bool = False,
) -> None:  # fmt: skip
    """`decode_tensor` of tokens [first, first + n) of one layer's sections into out [H, n, D]
    (float32, rows of D contiguous: each head's rows in a run, or the heads of a token side by
    side), in the caller's thread: how a predicted block's rebuild decodes each layer's
    residuals as it reaches them, while they are in cache (basis.Residuals)."""
    h, n, d = out.shape
    assert out.dtype == torch.float32 and out.stride(-1) == 1
    assert (h, d) == (header.heads, header.head_dim) and first >= 0 and first + n <= header.tokens
    base = payload.data_ptr()
    for s in sections:
        group = header.group_size if s.is_key else header.value_group
        _cpu_codec.decode_section(
            base + s.codes, base + s.scales, base + s.mins, h, n, s.channels, int(s.is_key),
            group, s.bits, out[:, :, s.first :].data_ptr(), out.stride(0), out.stride(1),
            DTYPE_CODES[out.dtype], int(hadamard), 0, 0, 0, int(s.symmetric), first,
            header.tokens,
        )  # fmt: skip


def _by_layer(header: BlockHeader, tensor: int) -> list[list[Section]]:
    """Tensor `tensor`'s sections (0: keys, 1: values), layer by layer."""
    layers: list[list[Section]] = [[] for _ in range(header.layers)]
    for s in header.tensor_sections(tensor):
        layers[s.layer].append(s)
    return layers


def components(
    payload: Tensor, header: BlockHeader, gaps: tuple[tuple[int, int, int], ...]
) -> Callable[[int, int, int, Tensor], Tensor]:
    """The basis.Components of a KEY_BASIS block's payload: a layer's key components for a run
    of tokens, decoded by `decode_rows` into the buffer given; the components in `gaps` (the
    basis's: between stored ones) are zeroed, those past the layer's stored ones left as they
    are."""
    keys = _by_layer(header, 0)
    gaps_of: list[list[tuple[int, int]]] = [[] for _ in range(header.layers)]
    for layer, a, b in gaps:
        gaps_of[layer].append((a, b))

    def decode(layer: int, first: int, end: int, buffer: Tensor) -> Tensor:
        for a, b in gaps_of[layer]:
            buffer[:, :, a:b] = 0
        decode_rows(payload, keys[layer], header, buffer, first)
        return buffer

    return decode


def residuals(
    payload: Tensor, header: BlockHeader, gaps: tuple[tuple[int, int, int], ...], hadamard: bool
) -> Callable[[int, int, int, Tensor, Tensor], Tensor]:
    """The basis.Residuals of a predicted block's payload: a layer's key components for a run of
    tokens as `components` decodes them, and its value residuals by `decode_rows`, the Hadamard
    rotation undone under `hadamard`."""
    key_components = components(payload, header, gaps)
    values = _by_layer(header, 1)

    def decode(layer: int, first: int, end: int, buffer: Tensor, value_rows: Tensor) -> Tensor:
        decode_rows(payload, values[layer], header, value_rows, first, hadamard)
        return key_components(layer, first, end, buffer)

    return decode


def store_rows(rows: Tensor, target: Tensor, rope: tuple[Tensor, Tensor] | None) -> None:
    """A layer's rows [H, T, D] float32 (rows contiguous) into target [H, T, D] (CPU, rows
    contiguous) in its dtype, RoPE redone with rope = (cos, sin) float32 [T, rotary]: one pass
    of the C loop in the caller's thread (basis.Store)."""
    h, t, d = rows.shape
    assert rows.dtype == torch.float32 and rows.stride(-1) == 1 and target.stride(-1) == 1
    tables: tuple[int, ...] = ()
    if rope is not None:
        cos, sin = (x.contiguous() for x in rope)
        tables = (cos.data_ptr(), sin.data_ptr(), cos.shape[1])
    _cpu_codec.store_rows(
        rows.data_ptr(), h, t, d, rows.stride(0), rows.stride(1), target.data_ptr(),
        target.stride(0), target.stride(1), DTYPE_CODES[target.dtype], *tables,
    )  # fmt: skip
