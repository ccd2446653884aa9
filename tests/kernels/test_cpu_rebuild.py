"""The CPU's predicted decode: the C loop's threads split a block's tokens, each running torch on
one thread of its own (cpu_codec._one_torch_thread), and decode what the torch reference does."""

import threading

import pytest
import torch

from kvpool.kernels import cpu_codec


def _threads_of_a_new_thread() -> int:
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(torch.get_num_threads()))
    t.start()
    t.join()
    return got[0]


def test_the_c_loops_threads_run_torch_on_one_thread_and_no_one_elses_do() -> None:
    """Every thread of the pool runs torch on one thread; the caller's count, and that of a
    thread started afterwards, are what they were (torch.set_num_threads(1) would have changed
    the count of every later thread)."""
    if cpu_codec._runtime(("libgomp", "libiomp", "libomp")) is None:
        pytest.skip("torch's OpenMP runtime is not a library this process can name")
    mine, fresh = torch.get_num_threads(), _threads_of_a_new_thread()
    barrier = threading.Barrier(cpu_codec.WORKERS)

    def ask(_: int) -> int:
        barrier.wait()  # one task on each thread
        return torch.get_num_threads()

    assert list(cpu_codec.POOL.map(ask, range(cpu_codec.WORKERS))) == [1] * cpu_codec.WORKERS
    assert cpu_codec.rebuild_workers() == cpu_codec.WORKERS
    assert torch.get_num_threads() == mine
    assert _threads_of_a_new_thread() == fresh


def test_where_the_pool_runs_torchs_count_the_rebuild_takes_only_idle_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the runtimes (threads on torch's own count), the rebuild splits its tokens only
    over the cores torch's threads leave idle."""
    monkeypatch.setattr(cpu_codec, "_single_threaded_workers", lambda: False)
    monkeypatch.setattr(cpu_codec, "WORKERS", 4)
    monkeypatch.setattr(cpu_codec.os, "cpu_count", lambda: 4)
    threads = torch.get_num_threads()
    try:
        for n, want in ((1, 4), (2, 2), (3, 1), (4, 1)):
            torch.set_num_threads(n)
            assert cpu_codec.rebuild_workers() == want
    finally:
        torch.set_num_threads(threads)
