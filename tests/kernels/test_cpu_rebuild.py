"""The CPU's predicted decode: the C loop's threads split a block's tokens, each running torch on
one thread of its own (cpu_codec._one_torch_thread), and decode what the torch reference does."""

import threading

import pytest
import torch
from torch import Tensor

from kvpool.kernels import _cpu_codec, cpu_codec
from kvpool.kernels.transforms import RopeParams


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


# a gap in layer 0 (components 8..16 not stored between stored ones), tails not stored
GAPPED = (*(8, 0, 3, 3, 2, 2, 2, 0), *(4, 4, 3, 3, 3, 2, 0, 0))


@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("tokens", [128, 160])  # runs of 64 and of 80 tokens (off the groups)
def test_the_c_loop_decodes_each_layers_residuals_when_the_rebuild_reaches_it(
    rank: int, symmetric: bool, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A predicted block decoded on the CPU (each layer's residuals decoded for each run of tokens
    as the rebuild reaches them, cpu_codec.residuals) is bit for bit the block rebuilt from its
    residuals decoded whole first (the C loop's decode_tensor), and within rounding of the torch
    reference's: RoPE, Hadamard values, a sink token, a gap between stored components, into a
    slice of a longer cache."""
    from kvpool.kernels.codec import decode, encode
    from tests.kernels.helpers import kv
    from tests.kernels.test_backends import _close
    from tests.kernels.test_basis import DIM, HEADS, LAYERS, config, low_rank_twin
    from tests.kernels.test_basis import predicting_basis as basis_of

    basis = basis_of(seed=6, widths=GAPPED)
    basis = low_rank_twin(basis, rank) if rank else basis
    assert basis.gaps == ((0, 8, 16),)
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=tokens, dim=DIM, seed=4)
    cfg = config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True, sink_tokens=1,
                 symmetric_values=symmetric)  # fmt: skip
    blob = encode(k, v, cfg)

    def into_a_cache() -> tuple[Tensor, Tensor]:
        cache = [torch.zeros(LAYERS, HEADS, tokens + 64, DIM, dtype=torch.float16) for _ in "kv"]
        decode(blob, key_basis=basis, backend="cpu", out=(cache[0][:, :, 32:-32],
                                                          cache[1][:, :, 32:-32]))  # fmt: skip
        return cache[0], cache[1]

    got = into_a_cache()
    with monkeypatch.context() as m:
        m.delattr(cpu_codec, "residuals")  # the residuals decoded whole, then the same rebuild
        whole = into_a_cache()
    assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    ref = decode(blob, key_basis=basis, backend="reference", dtype=torch.float16)
    assert ref.keys is not None and ref.values is not None
    _close(got[0][:, :, 32:-32], ref.keys)
    _close(got[1][:, :, 32:-32], ref.values)
    assert not got[0][:, :, :32].any() and not got[1][:, :, -32:].any()


def test_a_run_of_a_sections_tokens_decodes_as_the_whole_section_does() -> None:
    """decode_section's tokens [t0, t0 + T) of a section: the rows the whole section's decode
    writes there, into rows laid out head-major or token-major (the heads of a token side by
    side); tokens beyond the section, or rows that would overlap, are refused."""
    from kvpool.kernels.codec import CodecConfig, encode
    from kvpool.proto.blockformat import parse_header, payload_bytes

    heads, tokens, dim = 3, 96, 64
    k, v = (x.float() for x in torch.randn(2, 1, heads, tokens, dim).unbind(0))
    blob = encode(k, v, CodecConfig(3, 2, 32, hadamard_values=True))
    header = parse_header(blob)
    payload = torch.frombuffer(bytearray(payload_bytes(blob, header)), dtype=torch.uint8)
    for i in (0, 1):
        sections = header.tensor_sections(i)
        whole = torch.empty(1, heads, tokens, dim)
        cpu_codec.decode_tensor(payload, sections, header, whole, hadamard=i == 1)
        for first, end in ((0, 96), (16, 80), (40, 41), (32, 96)):
            head_major = torch.full((heads, end - first, dim), float("nan"))
            cpu_codec.decode_rows(payload, sections, header, head_major, first, i == 1)
            assert torch.equal(head_major, whole[0, :, first:end])
            token_major = torch.full((end - first, heads, dim), float("nan"))
            cpu_codec.decode_rows(payload, sections, header, token_major.transpose(0, 1), first,
                                  i == 1)  # fmt: skip
            assert torch.equal(token_major.transpose(0, 1), whole[0, :, first:end])
    s = header.tensor_sections(0)[0]
    out = torch.empty(heads, tokens, dim)
    base = payload.data_ptr()

    def call(t: int, hs: int, rs: int, t0: int, src: int) -> None:
        _cpu_codec.decode_section(base + s.codes, base + s.scales, base + s.mins, heads, t, dim,
                                  1, 32, s.bits, out.data_ptr(), hs, rs, 3, 0, 0, 0, 0, 0, t0,
                                  src)  # fmt: skip

    for bad in ((32, tokens * dim, dim, 80, tokens), (32, tokens * dim, dim, -1, tokens),
                (32, dim, dim, 0, tokens), (32, 32 * dim, dim // 2, 0, tokens)):  # fmt: skip
        with pytest.raises(ValueError):
            call(*bad)
    call(32, dim, heads * dim, 64, tokens)  # token-major: fine


@pytest.mark.parametrize("tokens", [128, 160])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keys_in_a_basis_are_rebuilt_run_by_run_as_they_were_whole(
    tokens: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KEY_BASIS block's keys decoded on the CPU run by run of tokens (the C loop's components
    of each layer, turned back and stored with RoPE by the C loop: basis.keys_from_components)
    are the keys decoded whole first (from_components_, RoPE redone in torch) within float32
    rounding: a gap between stored components, a layer with none stored, a sink token, into a
    slice of a longer cache."""
    from kvpool.kernels.codec import decode, encode
    from tests.kernels.helpers import kv
    from tests.kernels.test_basis import DIM, HEADS, LAYERS, config, random_basis

    basis = random_basis(widths=(*GAPPED[:8], *(0,) * 8))  # layer 1: no component stored
    assert basis.gaps == ((0, 8, 16),) and basis.extent == (56, 0)
    k, v = kv(layers=LAYERS, heads=HEADS, tokens=tokens, dim=DIM, seed=5)
    blob = encode(k, v, config(basis, rope=RopeParams(10000.0, DIM), hadamard_values=True,
                               sink_tokens=1), start_position=0)  # fmt: skip

    def into_a_cache() -> tuple[Tensor, Tensor]:
        cache = [torch.zeros(LAYERS, HEADS, tokens + 64, DIM, dtype=dtype) for _ in "kv"]
        decode(blob, key_basis=basis, backend="cpu", out=(cache[0][:, :, 32:-32],
                                                          cache[1][:, :, 32:-32]))  # fmt: skip
        return cache[0], cache[1]

    got = into_a_cache()
    with monkeypatch.context() as m:
        m.delattr(cpu_codec, "components")  # components decoded whole, keys rebuilt in torch
        from kvpool.kernels import codec

        codec._plan.cache_clear()
        whole = into_a_cache()
    codec._plan.cache_clear()
    assert torch.equal(got[1], whole[1])
    if dtype == torch.float32:
        torch.testing.assert_close(got[0], whole[0], atol=1e-6, rtol=1e-6)
    else:  # rounded to fp16 from float32 keys that differ by float rounding: an ulp at most
        torch.testing.assert_close(got[0], whole[0], atol=0, rtol=2**-10)
    assert not got[0][:, :, :32].any() and not got[0][:, :, -32:].any()


def test_callers_asking_at_once_how_many_workers_split_the_tokens_all_get_an_answer() -> None:
    """The first rebuild_workers() asks every pool thread at a barrier; callers that ask at once
    take turns (two barriers at once could each hold one of the threads: a deadlock)."""
    from concurrent.futures import ThreadPoolExecutor

    cpu_codec._ask_workers.cache_clear()
    with ThreadPoolExecutor(4) as callers:
        got = list(callers.map(lambda _: cpu_codec.rebuild_workers(), range(8)))
    assert len(set(got)) == 1 and 1 <= got[0] <= cpu_codec.WORKERS
