"""The tier end to end: a real local Ray cluster, shard actors serving real gRPC, the client.

One Ray instance and one two-shard tier serve the whole module (Ray takes seconds to start).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from kvpool.client import AsyncKVPool, KVPool, namespace_for
from kvpool.kernels.codec import CodecConfig, decode, encode
from kvpool.proto.errors import CodecError
from kvpool.proto.keys import block_keys
from kvpool.services.tier import Tier, TierConfig, start_tier
from kvpool.transport import ClientConfig

CODEC = CodecConfig(2, 2, 64)
B = 64  # block_tokens
NS = namespace_for("test/tier", 2, 2, 64, torch.float16, CODEC, block_tokens=B)
CONFIG = TierConfig(shards=2, budget_bytes=32 << 20, shard_cpus=0.1, name="test")
FAST = ClientConfig(timeout_s=3.0, topology_ttl_s=0.5)


def kv(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (NS.layers, NS.kv_heads, tokens, NS.head_dim)
    return torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()


def tokens(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50000, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def tier(ray_session: None) -> Iterator[Tier]:
    t = start_tier(CONFIG)
    yield t
    t.shutdown()


@pytest.fixture
def client(tier: Tier) -> Iterator[KVPool]:
    with KVPool(tier.endpoint, NS, CODEC, config=FAST) as c:
        yield c


def test_tensors_round_trip_through_the_tier(client) -> None:
    toks = tokens(4 * B + 10, seed=1)
    k, v = kv(len(toks), seed=1)
    assert client.lookup(toks) == 0 and client.get(toks) is None
    assert client.put(toks, (k, v)) == 4  # full blocks only; the 10-token tail is not stored
    assert client.lookup(toks) == 4 * B
    got = client.get(toks)
    assert (
        got is not None and got.tokens == 4 * B and got.keys is not None and got.values is not None
    )
    for i in range(4):  # exactly what the codec gives locally, block by block
        local = decode(
            encode(k[:, :, i * B : (i + 1) * B], v[:, :, i * B : (i + 1) * B], CODEC, i * B)
        )
        assert torch.equal(got.keys[:, :, i * B : (i + 1) * B], local.keys)
        assert torch.equal(got.values[:, :, i * B : (i + 1) * B], local.values)
    assert client.put(toks, (k, v)) == 0  # stored already: nothing is encoded or sent
    assert client.stats.put_failures == client.stats.get_failures == 0


def test_blocks_one_at_a_time_into_one_buffer(client) -> None:
    """get_blocks: the same blocks as get, decoded in turn into the caller's tensors; the
    blocks before first_block are never fetched; a buffer of the wrong shape is refused first."""
    toks = tokens(4 * B, seed=6)
    client.put(toks, kv(4 * B, seed=6))
    whole = client.get(toks)
    assert whole is not None and whole.keys is not None and whole.values is not None
    out = (torch.empty(NS.layers, NS.kv_heads, B, NS.head_dim, dtype=torch.float16),
           torch.empty(NS.layers, NS.kv_heads, B, NS.head_dim, dtype=torch.float16))  # fmt: skip
    fetched = client.stats.blocks_fetched
    seen = []
    for block in client.get_blocks(toks, present=4 * B, first_block=1, out=out):
        assert block.keys is out[0] and block.values is out[1]
        i = block.header.start_position // B
        assert torch.equal(out[0], whole.keys[:, :, i * B : (i + 1) * B])
        assert torch.equal(out[1], whole.values[:, :, i * B : (i + 1) * B])
        seen.append(i)
    assert seen == [1, 2, 3] and client.stats.blocks_fetched == fetched + 3
    longer = toks + tokens(B, seed=7)  # no present: a lookup; allocating when no out is given
    assert [b.header.start_position for b in client.get_blocks(longer)] == [0, B, 2 * B, 3 * B]
    with pytest.raises(CodecError):
        next(client.get_blocks(toks, out=(out[0][:, :, :8], out[1])))
    ints = tuple(torch.zeros(o.shape, dtype=torch.int32) for o in out)
    with pytest.raises(CodecError):  # not a dtype blocks decode to: refused, not a "bad block"
        next(client.get_blocks(toks, out=ints))
    assert client.stats.blocks_fetched == fetched + 7 and client.stats.rejected_blocks == 0
    assert client.lookup(toks) == 4 * B  # nothing was deleted


def test_get_into_the_callers_cache(client) -> None:
    """get(out=): the prefix is decoded into the caller's tensors (here fp32, a slice of a
    longer cache), capped by their length; a buffer get cannot use is refused before any fetch."""
    toks = tokens(4 * B, seed=8)
    client.put(toks, kv(4 * B, seed=8))
    whole = client.get(toks, dtype=torch.float32)
    assert whole is not None and whole.keys is not None and whole.values is not None
    cache = [torch.full((NS.layers, NS.kv_heads, 8 * B, NS.head_dim), -1.0) for _ in range(2)]
    got = client.get(toks, out=tuple(c[:, :, B:] for c in cache))
    assert got is not None and got.tokens == 4 * B and got.keys is not None
    assert got.keys.data_ptr() == cache[0][:, :, B].data_ptr()
    assert torch.equal(cache[0][:, :, B : 5 * B], whole.keys)
    assert torch.equal(cache[1][:, :, B : 5 * B], whole.values)
    assert bool((cache[0][:, :, :B] == -1).all())
    fetched = client.stats.blocks_fetched
    small = client.get(toks, out=tuple(c[:, :, : 2 * B] for c in cache))  # room for two blocks
    assert small is not None and small.tokens == 2 * B
    assert client.stats.blocks_fetched == fetched + 2
    assert torch.equal(cache[1][:, :, : 2 * B], whole.values[:, :, : 2 * B])
    for bad in (
        tuple(c[:, :, : B + 8] for c in cache),  # not a whole number of blocks
        tuple(c[:, :, : 2 * B].to(torch.int32) for c in cache),  # not a dtype blocks decode to
        (cache[0][:, :, :B],),  # keys without values
    ):
        with pytest.raises(CodecError):
            client.get(toks, out=bad)
    assert client.stats.blocks_fetched == fetched + 2 and client.stats.rejected_blocks == 0


def test_codec_v2_blocks_round_trip_with_the_namespaces_basis(tier: Tier) -> None:
    """A namespace whose keys are stored in a key basis: the client encodes and decodes with it
    (the shard stores the format-3 blocks like any others)."""
    from tests.kernels.test_basis import random_basis

    codec = CodecConfig(value_bits=2, group_size=64, key_basis=random_basis())
    ns = namespace_for("test/tier-v2", 2, 2, 64, torch.float16, codec, block_tokens=B)
    toks = tokens(2 * B, seed=9)
    k, v = kv(2 * B, seed=9)
    with KVPool(tier.endpoint, ns, codec, config=FAST) as pool:
        assert pool.put(toks, (k, v)) == 2
        got = pool.get(toks)
    assert got is not None and got.keys is not None and got.tokens == 2 * B
    local = decode(encode(k[:, :, :B], v[:, :, :B], codec), key_basis=codec.key_basis)
    assert torch.equal(got.keys[:, :, :B], local.keys)
    assert pool.stats.get_failures == 0


def test_partial_prefix_hits(client) -> None:
    toks = tokens(3 * B, seed=2)
    client.put(toks, kv(3 * B, seed=2))
    longer = toks + tokens(2 * B, seed=3)
    assert client.lookup(longer) == 3 * B
    got = client.get(longer)
    assert got is not None and got.tokens == 3 * B and got.keys is not None
    assert got.keys.shape == (2, 2, 3 * B, 64)
    diverged = list(toks)
    diverged[B + 5] += 1  # block 1 differs: only block 0 is shared
    assert client.lookup(diverged) == B
    assert client.lookup(toks[: 2 * B + 3]) == 2 * B


def test_the_async_client(tier) -> None:
    async def run() -> tuple[int, int, int]:
        c = AsyncKVPool(tier.endpoint, NS, CODEC, config=FAST)
        toks = tokens(2 * B, seed=4)
        stored = await c.put(toks, kv(2 * B, seed=4))
        got = await c.get(toks)
        await c.close()
        return stored, await_tokens(got), c.stats.blocks_fetched

    def await_tokens(got) -> int:
        return 0 if got is None else got.tokens

    assert asyncio.run(run()) == (2, 2 * B, 2)


def test_tenants_and_codecs_never_share_blocks(tier, client) -> None:
    toks = tokens(2 * B, seed=5)
    client.put(toks, kv(2 * B, seed=5))
    salted = namespace_for(
        "test/tier", 2, 2, 64, torch.float16, CODEC, block_tokens=B, salt=b"tenant-b"
    )
    other_codec = CodecConfig(4, 4, 64)
    other = namespace_for("test/tier", 2, 2, 64, torch.float16, other_codec, block_tokens=B)
    for ns, codec in ((salted, CODEC), (other, other_codec)):
        with KVPool(tier.endpoint, ns, codec, config=FAST) as c:
            assert c.lookup(toks) == 0 and c.get(toks) is None


def test_another_process_hits_the_same_prefix(tier, client) -> None:
    toks = tokens(3 * B, seed=6)
    client.put(toks, kv(3 * B, seed=6))
    code = (
        "import torch; from kvpool.client import KVPool, namespace_for;"
        "from kvpool.kernels.codec import CodecConfig;"
        f"codec = CodecConfig(2, 2, 64); ns = namespace_for('test/tier', 2, 2, 64, torch.float16, codec, block_tokens={B});"
        f"c = KVPool({tier.endpoint!r}, ns, codec); got = c.get({toks!r});"
        "print(got.tokens, float(got.keys.float().abs().sum())); c.close()"
    )
    env = {**os.environ, "PYTHONHASHSEED": "777"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    n, total = out.stdout.split()
    mine = client.get(toks)
    assert mine is not None and mine.keys is not None
    assert int(n) == 3 * B and float(total) == pytest.approx(float(mine.keys.float().abs().sum()))


def test_a_tier_that_is_down_gives_misses_and_dropped_saves() -> None:
    with KVPool("127.0.0.1:1", NS, CODEC, config=ClientConfig(timeout_s=1.0)) as c:
        toks = tokens(2 * B, seed=7)
        t0 = time.monotonic()
        assert c.lookup(toks) == 0
        assert c.put(toks, kv(2 * B, seed=7)) == 0
        assert c.get(toks) is None
        assert time.monotonic() - t0 < 30
        assert c.stats.lookup_failures >= 1


def test_bad_input_still_raises(client) -> None:
    with pytest.raises(ValueError):
        client.put(tokens(2 * B), kv(B))  # KV shorter than the full blocks
    with pytest.raises(ValueError):
        client.lookup([-1] * B)


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def test_a_killed_shard_gives_misses_then_serves_again(tier, client) -> None:
    toks = tokens(8 * B, seed=8)
    client.put(toks, kv(8 * B, seed=8))
    assert client.lookup(toks) == 8 * B
    keys = block_keys(NS, toks)
    owners = [client.tier.owners(k)[0] for k in keys]
    victim = owners[0]
    pid = ray.get(tier.shards[victim].pid.remote())
    tier.kill_shard(victim)  # Ray restarts it: same id, same port, empty store
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    assert client.lookup(toks) == 0  # block 0 lived there: a miss, not an error
    assert client.get(toks) is None
    tier.wait_serving()  # Ray restarted it
    assert client.lookup(toks) == 0  # restarted empty
    assert client.put(toks, kv(8 * B, seed=8)) == owners.count(victim)  # only its blocks again
    assert client.lookup(toks) == 8 * B


def test_the_printed_endpoint_outlives_every_shard(tier) -> None:
    """Issue 21: every restart came back on a new random port, so the endpoint `kvpool serve`
    printed went dead. Ports are picked up front; a restarted shard binds its own again."""
    endpoint = tier.endpoint  # what `kvpool serve` printed
    pids = {sid: ray.get(h.pid.remote()) for sid, h in tier.shards.items()}
    for sid in pids:
        tier.kill_shard(sid)  # Ray restarts each
    for pid in pids.values():
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"))
    tier.wait_serving()
    wait_for(lambda: len(tier.topology()) == len(pids))
    assert tier.endpoint == endpoint
    assert {sid: ray.get(h.pid.remote()) for sid, h in tier.shards.items()} != pids
    toks = tokens(6 * B, seed=12)
    with KVPool(endpoint, NS, CODEC, config=FAST) as fresh:  # a client configured with it
        assert fresh.put(toks, kv(6 * B, seed=12)) == 6
        assert fresh.lookup(toks) == 6 * B
        assert fresh.stats.put_failures == fresh.stats.lookup_failures == 0


def test_the_local_ray_does_not_kill_shards_for_memory_it_did_not_use(tier) -> None:
    """The raylet of the Ray that kvpool starts runs without its memory monitor, which killed
    the shards (the only Ray workers on the node) for a vLLM engine's memory (issue 21)."""
    node = ray._private.worker._global_node
    assert node is not None
    raylets = node.all_processes["raylet"]
    assert raylets
    for info in raylets:
        environ = Path(f"/proc/{info.process.pid}/environ").read_bytes().split(b"\0")
        assert b"RAY_memory_monitor_refresh_ms=0" in environ


def test_shards_added_to_a_running_tier_take_new_blocks(tier, client) -> None:
    before = client.tier.epoch
    gcs = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "serve", "--address", gcs, "--name", CONFIG.name,
         "--shards", "1", "--budget", "32MiB", "--shard-cpus", "0.1", "--detach"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(tier.topology()) == 3
    wait_for(lambda: (client.call(client.tier.refresh(force=True)), client.tier.epoch != before)[1])
    assert len(client.tier._addresses) == 3
    for seed in (9, 19, 29, 39):  # 16 runs of blocks (a prompt's run lives on one shard)
        toks = tokens(8 * B, seed=seed)
        assert client.put(toks, kv(8 * B, seed=seed)) == 8
        assert client.lookup(toks) == 8 * B
    per_shard = {s.shard_id: s.blocks for s in client.call(client.tier.stats())}
    assert len(per_shard) == 3 and all(n > 0 for n in per_shard.values())


def test_replicated_blocks_survive_a_dead_shard(ray_session: None) -> None:
    config = TierConfig(
        shards=2, budget_bytes=16 << 20, shard_cpus=0.1, replication=2, name="replicated"
    )
    tier = start_tier(config)
    try:
        with KVPool(tier.endpoint, NS, CODEC, config=FAST) as c:
            toks = tokens(4 * B, seed=10)
            assert c.put(toks, kv(4 * B, seed=10)) == 4
            stats = c.call(c.tier.stats())
            assert [s.blocks for s in stats] == [4, 4]  # every block on both shards
            tier.kill_shard("shard-0", restart=False)
            got = c.get(toks)
            assert got is not None and got.tokens == 4 * B
    finally:
        tier.shutdown()


# -- membership with liveness ---------------------------------------------------------------


def test_the_directory_drops_silent_shards_and_takes_them_back() -> None:
    from kvpool.services.shard import Directory

    now = [100.0]
    d = Directory(replication=1, stale_after_s=10.0, clock=lambda: now[0])
    assert d.heartbeat_s <= 10.0 / 4
    d.register("shard-0", "a:1", "a:9")
    d.register("shard-1", "b:1", "b:9")
    e0, _, shards = d.topology()
    assert [s for s, _, _ in shards] == ["shard-0", "shard-1"]
    assert d.topology()[0] == e0, "no change, same epoch"
    now[0] += 6.0
    d.register("shard-0", "a:1", "a:9")  # a heartbeat: shard-1 stays silent
    now[0] += 4.0  # shard-1 last seen exactly 10 s ago: still in
    assert [s for s, _, _ in d.topology()[2]] == ["shard-0", "shard-1"]
    assert d.topology()[0] == e0, "heartbeats do not change the epoch"
    now[0] += 0.5
    e1, _, shards = d.topology()
    assert shards == [("shard-0", "a:1", "a:9")] and e1 != e0, "shard-1 went stale"
    assert d.reserve_ids(1) == ["shard-2"], "a stale shard keeps its id"
    d.register("shard-1", "b:2", "b:9")  # it comes back (at a new port)
    e2, _, shards = d.topology()
    assert shards == [("shard-0", "a:1", "a:9"), ("shard-1", "b:2", "b:9")]
    assert e2 not in (e0, e1)
    now[0] += 11.0  # everyone silent
    e3, _, shards = d.topology()
    assert shards == [] and e3 != e2
    d.register("shard-0", "a:1", "a:9")
    d.remove("shard-0")
    assert d.topology()[2] == []
    with pytest.raises(ValueError):
        Directory(1, stale_after_s=0)


def test_a_shard_that_stays_dead_leaves_the_topology(ray_session: None) -> None:
    stale = 4.0  # shards beat every 1 s
    config = TierConfig(
        shards=3, budget_bytes=16 << 20, shard_cpus=0.1, name="stale", stale_after_s=stale
    )
    tier = start_tier(config)
    try:
        with KVPool(tier.endpoint, NS, CODEC, config=FAST) as c:
            toks = tokens(12 * B, seed=11)
            assert c.put(toks, kv(12 * B, seed=11)) == 12
            owners = {c.tier.owners(k)[0] for k in block_keys(NS, toks)}
            victim = sorted(owners)[0]
            epoch = c.tier.epoch
            ray.kill(tier.shards.pop(victim), no_restart=True)  # gone for good, not removed
            t0 = time.monotonic()
            wait_for(lambda: victim not in {s for s, _, _ in tier.topology()}, timeout=20)
            # stale after `stale` seconds, seen by the next topology call (polled every 0.2 s)
            assert time.monotonic() - t0 < stale + 2.0
            assert len(tier.topology()) == 2
            wait_for(lambda: (c.call(c.tier.refresh(force=True)), c.tier.epoch != epoch)[1])
            assert victim not in c.tier._addresses and len(c.tier._addresses) == 2
            failures = c.stats.get_failures
            more = tokens(12 * B, seed=12)
            assert c.put(more, kv(12 * B, seed=12)) == 12, "its keys go to the other shards"
            assert {c.tier.owners(k)[0] for k in block_keys(NS, more)} <= set(c.tier._addresses)
            got = c.get(more)
            assert got is not None and got.tokens == 12 * B
            assert c.stats.get_failures == failures and c.stats.put_failures == 0
            # blocks that lived on the dead shard are misses now, never errors
            assert c.lookup(toks) < 12 * B
    finally:
        tier.shutdown()


def test_shards_register_again_with_a_directory_that_restarted_empty(ray_session: None) -> None:
    """Ray restarts a killed Directory with nothing registered; the shards' heartbeats (which
    keep their handle, and look the actor up again after a failed beat) register them again."""
    config = TierConfig(shards=2, budget_bytes=16 << 20, shard_cpus=0.1, name="redirectory",
                        stale_after_s=4.0)  # fmt: skip
    tier = start_tier(config)
    try:
        first, _, before = ray.get(tier.directory.topology.remote())
        assert len(before) == 2
        ray.kill(tier.directory, no_restart=False)

        def registered_again() -> bool:
            try:
                epoch, _, shards = ray.get(tier.directory.topology.remote())
            except ray.exceptions.RayError:  # the Directory is restarting
                return False
            # its epoch starts at the clock in ns: a restarted one is far past the first's
            return epoch > first + 10**6 and sorted(shards) == sorted(before)

        wait_for(registered_again, timeout=60)
    finally:
        tier.shutdown()


# -- safe defaults ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"])
def test_loopback_tiers_need_no_tls(host: str) -> None:
    from kvpool.services.tier import check_exposure

    check_exposure(TierConfig(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "kvpool-0.example.com"])
def test_exposed_tiers_need_tls_and_tokens_or_insecure(host: str) -> None:
    from kvpool.services.security import ServerSecurity
    from kvpool.services.tier import check_exposure

    tls = ServerSecurity("s.crt", "s.key")
    full = ServerSecurity("s.crt", "s.key", tokens_file="tokens.json")
    with pytest.raises(ValueError, match=r"--tls-cert/--tls-key and --auth-tokens.*--insecure"):
        check_exposure(TierConfig(host=host))
    with pytest.raises(ValueError, match="without --auth-tokens"):
        check_exposure(TierConfig(host=host, security=tls))  # TLS alone: anyone may write
    check_exposure(TierConfig(host=host, security=full))
    check_exposure(TierConfig(host=host), insecure=True)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--host", "0.0.0.0"], "refusing to serve on 0.0.0.0 without --tls-cert/--tls-key and"),
        (["--host", "10.0.0.7", "--tls-cert", "c", "--tls-key", "k"], "without --auth-tokens"),
        (["--tls-cert", "nowhere.crt", "--tls-key", "nowhere.key"], "No such file"),
    ],
)
def test_kvpool_serve_refuses_before_starting_ray(tmp_path, flags, message) -> None:
    env = {**os.environ, "KVPOOL_RAY_TEMP_DIR": str(tmp_path / "ray")}
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "kvpool.cli", "serve", "--shards", "1", *flags],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    if "refusing" in message:
        assert "--insecure" in out.stderr, "say how to opt out"
    assert not (tmp_path / "ray").exists(), "Ray must not start"
    assert time.monotonic() - t0 < 30


def test_shard_ports_count_up_unless_per_node() -> None:
    config = TierConfig(port=50051, metrics_port=9400, health_port=8081)
    assert config.shard_ports(0) == (50051, 9400, 8081)
    assert config.shard_ports(2) == (50053, 9402, 8083)
    per_node = TierConfig(port=50051, metrics_port=9400, health_port=8081, per_node_ports=True)
    assert per_node.shard_ports(2) == (50051, 9400, 8081)
    assert TierConfig(metrics_port=None).shard_ports(3) == (0, None, None)  # any, off, off
    assert TierConfig(health_port=0).shard_ports(3)[2] == 0


def self_signed(directory) -> tuple[str, str]:
    """(certificate, key) files of a self-signed certificate for 127.0.0.1."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shard")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(san, critical=False).sign(key, hashes.SHA256())
    )  # fmt: skip
    crt, pem = directory / "shard.crt", directory / "shard.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))  # fmt: skip
    return str(crt), str(pem)


def test_tls_shards_answer_probes_on_their_plaintext_health_port(ray_session, tmp_path) -> None:
    """What a Kubernetes gRPC probe does: plaintext health checks, against shards that serve
    kvpool.v1 over TLS only. The health port answers them, and serves nothing else."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvpool.services.security import ServerSecurity
    from kvpool.services.server import SERVICE_NAME

    cert, key = self_signed(tmp_path)
    config = TierConfig(
        shards=2, budget_bytes=16 << 20, shard_cpus=0.1, name="health", health_port=0,
        security=ServerSecurity(cert, key),
    )  # fmt: skip
    tier = start_tier(config)  # its wait_serving checks each shard on its health port
    try:
        addresses = {s: a for s, a, _ in tier.topology()}
        for sid, handle in tier.shards.items():
            health = ray.get(handle.health_endpoint.remote())
            assert health and health != addresses[sid]
            check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            # a plaintext probe of the TLS port fails
            with grpc.insecure_channel(addresses[sid]) as tls_only, pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(tls_only).Check(check, timeout=2)
            with grpc.insecure_channel(health) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", SERVICE_NAME):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                topology = channel.unary_unary(f"/{SERVICE_NAME}/Topology")
                with pytest.raises(grpc.RpcError) as e:  # and nothing else
                    topology(b"", timeout=10)
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        tier.shutdown()
