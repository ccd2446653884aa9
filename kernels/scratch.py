"""Reused float32 buffers for decoding: a fresh tensor of tens of MB costs a page fault per 4 KB
the first time it is written (about 15 ms for the 33.5 MB of an 8B-shaped block's key
components on this project's CPU), more than the work that fills it.

Where it stands: DecodePlan.decode takes the float32 residuals of predicted blocks from here.
A buffer is lent to one decode at a time; buffers freed are kept for the next decode of the same
shape (at most `KEEP` per shape and device), so memory held is bounded by the decodes that ran
at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

KEEP = 4  # buffers kept per (shape, device)
_FREE: dict[tuple[tuple[int, ...], torch.device], list[Tensor]] = {}
_LOCK = threading.Lock()


@contextmanager
def lent(shape: tuple[int, ...], device: torch.device, count: int) -> Iterator[list[Tensor]]:
    """`count` float32 tensors of `shape` on `device`, contents undefined, for the with block."""
    key = (tuple(shape), torch.device(device))
    with _LOCK:
        free = _FREE.setdefault(key, [])
        got = [free.pop() for _ in range(min(count, len(free)))]
    got += [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(count - len(got))]
    try:
        yield got
    finally:
        with _LOCK:
            free = _FREE.setdefault(key, [])
            free.extend(got[: max(0, KEEP - len(free))])
