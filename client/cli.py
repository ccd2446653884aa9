"""The `kvpool` command line.

kvpool serve     start the cache tier: local Ray (or join a cluster with --address), shard
                 actors serving gRPC; prints the endpoint and runs until interrupted. Beyond
                 loopback it needs TLS and tenant tokens, or an explicit --insecure
kvpool demo      encode a Llama-3-8B-shaped KV block at several codec settings and report
                 encoded size, compression ratio, reconstruction error and throughput
kvpool calibrate measure each layer's sensitivity to KV quantization on sample text and pick
                 per-layer key and value bits for a target average; writes a profile JSON.
                 With --basis (codec v2): the principal components of the model's keys and a
                 width per 8 components; writes a key basis
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvpool.kernels.codec import KeyBasis
    from kvpool.transport import ClientConfig

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'512MiB', '2G', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def parse_share(text: str) -> float:
    """'0.25' -> 0.25: a share of a budget, in (0, 1]."""
    try:
        share = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 0.25)") from None
    if not 0.0 < share <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return share


def serve(args: argparse.Namespace) -> None:
    """Start (or grow) a tier and keep it up until SIGINT/SIGTERM."""
    import logging

    from kvpool.services.security import ServerSecurity
    from kvpool.services.tier import TierConfig, check_exposure, start_tier

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        security = ServerSecurity(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_tokens)
        config = TierConfig(
            shards=args.shards, budget_bytes=args.budget, host=args.host, port=args.port,
            replication=args.replication, shard_cpus=args.shard_cpus, name=args.name,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            redis_url=args.redis, redis_ttl_s=args.redis_ttl, redis_mode=args.redis_mode,
            security=security, per_node_ports=args.per_node_ports, health_port=args.health_port,
            memory_reserve_bytes=args.memory_reserve, tenant_quota=args.tenant_quota,
            shared_budget=not args.fixed_budgets,
        )  # fmt: skip
        check_exposure(config, insecure=args.insecure)  # before Ray starts
        if args.address is None and security.tls:  # the shards run here: read their files now
            security.credentials()
            security.tenants()
    except (OSError, ValueError) as e:
        raise SystemExit(f"kvpool serve: {e}") from None
    if args.insecure and not security.tls:
        logging.getLogger("kvpool").warning(
            "--insecure: shards on %s accept any client, in plaintext", args.host
        )
    tier = start_tier(config, address=args.address)
    print(f"endpoint: {tier.endpoint}", flush=True)
    print(
        f"kvpool tier: {len(tier.topology())} shards ({len(tier.shards)} started here), "
        f"{args.budget / 2**20:.0f} MiB each, replication {args.replication}"
        + ("" if tier.started_ray else f", Ray cluster {args.address}"),
        flush=True,
    )
    if args.metrics_sd:
        tier.write_file_sd(args.metrics_sd)
    if args.address and not tier.started_ray and args.detach:
        return  # the shards are detached actors: they stay on the cluster
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(10.0):
        if args.metrics_sd:  # keep Prometheus's view current as shards restart or join
            tier.write_file_sd(args.metrics_sd)
    tier.shutdown()


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


def ingest(args: argparse.Namespace) -> None:
    """Prefill the documents under args.paths with worker actors and store their blocks."""
    import logging

    from tqdm import tqdm

    from kvpool.ingest import IngestConfig, read_documents, run_ingest
    from kvpool.models import SMOLLM2
    from kvpool.services.tier import init_ray

    logging.basicConfig(level=logging.WARNING)
    texts = read_documents(args.paths)
    if not texts:
        raise SystemExit(f"no documents under {' '.join(args.paths)}")
    from kvpool.transport import ClientConfig

    read = lambda path: Path(path).read_bytes().strip() if path else b""  # noqa: E731
    client = ClientConfig(tls_ca_file=args.tls_ca, token=read(args.token_file).decode() or None)
    config = IngestConfig(
        model=args.model or SMOLLM2, endpoint=args.endpoint, block_tokens=args.block_tokens,
        batch_tokens=args.batch_tokens, salt=args.salt.encode() if args.salt else b"",
        mac_key=read(args.mac_key_file), client=client, basis=not args.no_basis,
        key_bits=args.key_bits, value_bits=args.value_bits, group_size=args.group_size,
        sink_tokens=args.sink_tokens,
    )  # fmt: skip
    if args.profile:  # a calibrated per-layer profile (kvpool calibrate) fixes the codec
        from dataclasses import replace

        from kvpool.calibrate import Profile

        p = Profile.load(args.profile)
        config = replace(
            config, key_bits=tuple(p.key_bits), value_bits=tuple(p.value_bits),
            group_size=p.group_size, sink_tokens=p.sink_tokens, pre_rope=p.rope is not None,
            hadamard_values=p.hadamard_values, basis=False,
        )  # fmt: skip
    init_ray(args.address)
    with tqdm(total=len(texts), unit="doc", desc="ingest") as bar:
        stats = run_ingest(texts, config, workers=args.workers, progress=bar.update)
    print(json.dumps({"endpoint": args.endpoint, **vars(stats)}))


def calibrate(args: argparse.Namespace) -> None:
    """Calibrate a per-layer bit profile and write it (see kvpool.calibrate)."""
    if args.samples is None:  # the library's defaults: calibrate (4), calibrate_basis (6)
        args.samples = 6 if args.basis else 4
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from kvpool import calibrate as cal
    from kvpool.models import SMOLLM2, load

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the sample's prefill, on a GPU
    model, tokenizer = load(args.model or SMOLLM2, device=device)
    t0 = time.perf_counter()

    def step(bar: tqdm) -> Callable[[str], None]:  # a progress callback: one step per message
        def say(msg: str) -> None:
            bar.set_postfix_str(msg)
            bar.update(1)

        return say

    if args.basis:  # codec v2: a key basis (transform coding of keys)
        if args.text:
            sample = list(tokenizer(Path(args.text).read_text()).input_ids)
        else:
            sample = cal.basis_sample(tokenizer)
        with tqdm(total=args.samples + 1, desc="key basis", unit="step") as bar:
            basis = cal.calibrate_basis(
                model, sample, key_bits=args.key_bits, group_size=args.group_size,
                windows=args.samples, pre_rope=not args.no_pre_rope,
                query_weighted=not args.no_query_weights, predict=args.predict,
                value_bits=args.value_bits, per_head_maps=args.per_head_maps,
                symmetric_values=args.symmetric_values, map_rank=args.map_rank,
                bf16_maps=args.bf16_maps, progress=step(bar),
            )  # fmt: skip
        path = basis.save(args.out or cal.basis_path(model.config._name_or_path, args))
        print(f"key basis {basis.id.hex()}: {basis.bits_per_key:.3f} code bits per key value")
        print(f"calibrated in {time.perf_counter() - t0:.0f} s; basis written to {path}")
        if args.publish:
            publish(args, basis, args.name or model.config._name_or_path)
        return
    if args.text:
        sample = list(tokenizer(Path(args.text).read_text()).input_ids)
    else:
        sample = cal.default_sample(tokenizer)
    with tqdm(desc="profile", unit="step") as bar:
        profile = cal.calibrate(
            model, sample, target_bits=args.target_bits, group_size=args.group_size,
            sink_tokens=args.sink_tokens, pre_rope=not args.no_pre_rope, samples=args.samples,
            progress=step(bar),
        )  # fmt: skip
    path = profile.save(args.out or cal.default_path(profile))
    print(cal.summary(profile))
    print(f"calibrated in {time.perf_counter() - t0:.0f} s; profile written to {path}")


def publish(args: argparse.Namespace, basis: KeyBasis, name: str) -> None:
    """Store a calibrated basis in the tier as the current one of model `name`."""
    from kvpool.basis import publish_basis

    options = {
        "value_bits": args.value_bits, "group_size": args.group_size,
        "sink_tokens": args.sink_tokens, "hadamard_values": True, "pre_rope": not args.no_pre_rope,
        "symmetric_values": args.symmetric_values,
    }  # fmt: skip
    try:
        artifact = publish_basis(
            args.publish, name, basis, options, salt=args.salt.encode() if args.salt else b"",
            mac_key=_read(args.mac_key_file), config=_client_config(args),
        )  # fmt: skip
    except Exception as e:  # the basis is saved: say why the tier did not take it
        raise SystemExit(f"kvpool calibrate: publishing to {args.publish} failed: {e}") from None
    print(f"published as the key basis of {name!r} in {args.publish} (artifact {artifact.hex()})")


def _read(path: str | None) -> bytes:
    return Path(path).read_bytes().strip() if path else b""


def _client_config(args: argparse.Namespace) -> ClientConfig:
    from kvpool.transport import ClientConfig

    token = _read(args.token_file).decode() or None
    return ClientConfig(tls_ca_file=args.tls_ca, token=token)


def build_parser() -> argparse.ArgumentParser:
    """The `kvpool` command line (also used by the tests that check deploy/'s commands)."""
    parser = argparse.ArgumentParser(
        prog="kvpool", description="kvpool: a store for compressed KV caches"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="start the cache tier and print its endpoint")
    p_serve.add_argument("--shards", type=int, default=2, help="shards to start (default 2)")
    p_serve.add_argument(
        "--budget",
        type=parse_bytes,
        default=parse_bytes("1GiB"),
        help="bytes per shard (default 1GiB)",
    )
    p_serve.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 on a cluster")
    p_serve.add_argument(
        "--port",
        type=int,
        default=0,
        help="first shard's port, the next count up (default: any free)",
    )
    p_serve.add_argument("--replication", type=int, default=1)
    p_serve.add_argument(
        "--per-node-ports", action="store_true",
        help="every shard binds --port and --metrics-port themselves (one shard per node, e.g. per pod)",
    )  # fmt: skip
    p_serve.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="first shard's /metrics port, the next count up (0: any free, -1: off)",
    )
    p_serve.add_argument(
        "--metrics-sd",
        default=None,
        help="write the shards' /metrics targets to this Prometheus file_sd JSON file",
    )
    p_serve.add_argument("--redis", default=None, help="second tier, e.g. redis://host:6379/0")
    p_serve.add_argument(
        "--redis-ttl", type=int, default=3600, help="seconds a block lives in Redis"
    )
    p_serve.add_argument(
        "--redis-mode",
        choices=["all", "evicted"],
        default="all",
        help="write every block to Redis, or only evicted ones",
    )
    p_serve.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS)")
    p_serve.add_argument("--tls-key", default=None, help="its PEM private key")
    p_serve.add_argument(
        "--tls-client-ca",
        default=None,
        help="require client certificates signed by this CA (mutual TLS)",
    )
    p_serve.add_argument(
        "--auth-tokens",
        default=None,
        help='JSON file {"token": "tenant"} or {"token": {"tenant": "name", "quota": 0.25}}: '
        "per-tenant token authentication (needs TLS), per-tenant quotas",
    )
    p_serve.add_argument(
        "--tenant-quota", type=parse_share, default=None, metavar="FRACTION",
        help="each tenant's share (0, 1] of every shard's budget: a tenant over it evicts its "
        "own blocks first (needs --auth-tokens; the tokens file may give a tenant its own)",
    )  # fmt: skip
    p_serve.add_argument(
        "--insecure", action="store_true",
        help="allow a non-loopback --host without TLS and --auth-tokens (trusted networks only)",
    )  # fmt: skip
    p_serve.add_argument(
        "--health-port", type=int, default=None,
        help="first shard's plaintext port serving only grpc.health.v1, the next count up (with "
        "--per-node-ports every shard binds it); for probes that cannot speak TLS (0: any free)",
    )  # fmt: skip
    p_serve.add_argument(
        "--memory-reserve", type=parse_bytes, default=None,
        help="shards give memory back (shrink and evict) while their node has less than this "
        "available, and take it again after (default: 10%% of the node's memory; 0: never)",
    )  # fmt: skip
    p_serve.add_argument(
        "--fixed-budgets", action="store_true",
        help="give each shard a fixed --budget; by default the shards started on this node share "
        "shards x --budget, each budget following where evictions are youngest",
    )  # fmt: skip
    p_serve.add_argument("--shard-cpus", type=float, default=0.5, help="Ray CPUs per shard")
    p_serve.add_argument(
        "--address",
        default=None,
        help="join this Ray cluster (e.g. auto, host:6379) and add shards to its tier",
    )
    p_serve.add_argument(
        "--name", default="default", help="tier name (several tiers can share one Ray cluster)"
    )
    p_serve.add_argument(
        "--detach", action="store_true", help="with --address: exit once the shards serve"
    )
    p_ingest = sub.add_parser("ingest", help="precompute and store the KV of documents")
    p_ingest.add_argument("paths", nargs="+", help="text files, or folders of .txt/.md/.rst files")
    p_ingest.add_argument("--endpoint", required=True, help="the tier (what kvpool serve printed)")
    p_ingest.add_argument(
        "--model", default=None, help="local model folder (default: SmolLM2-135M)"
    )
    p_ingest.add_argument("--workers", type=int, default=1, help="worker actors (default 1)")
    p_ingest.add_argument(
        "--address", default=None, help="Ray cluster to run workers on (default: a local one)"
    )
    p_ingest.add_argument(
        "--no-basis", action="store_true",
        help="use the bit widths even when the tier holds a published key basis for the model "
        "(by default its codec v2 is used; the widths only when none is published)",
    )  # fmt: skip
    p_ingest.add_argument("--key-bits", type=int, default=3)
    p_ingest.add_argument("--value-bits", type=int, default=2)
    p_ingest.add_argument("--group-size", type=int, default=128)
    p_ingest.add_argument("--sink-tokens", type=int, default=4)
    p_ingest.add_argument("--block-tokens", type=int, default=256)
    p_ingest.add_argument("--batch-tokens", type=int, default=8192)
    p_ingest.add_argument("--salt", default=None, help="tenant salt")
    p_ingest.add_argument("--tls-ca", default=None, help="CA certificate of a TLS tier (PEM)")
    p_ingest.add_argument("--token-file", default=None, help="file holding the tenant's token")
    p_ingest.add_argument(
        "--mac-key-file", default=None, help="file holding the tenant's MAC secret"
    )
    p_ingest.add_argument(
        "--profile", default=None, help="a per-layer bit profile from kvpool calibrate (JSON)"
    )
    p_demo = sub.add_parser("demo", help="encode a KV block and report size and error")
    p_demo.add_argument("--layers", type=int, default=32)
    p_demo.add_argument("--heads", type=int, default=8)
    p_demo.add_argument("--tokens", type=int, default=256)
    p_demo.add_argument("--head-dim", type=int, default=128)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    p_cal = sub.add_parser(
        "calibrate", help="pick per-layer key/value bits for a target average bits per value"
    )
    p_cal.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2)")
    p_cal.add_argument("--target-bits", type=float, default=2.5, help="bits per value (2.5)")
    p_cal.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    p_cal.add_argument("--sink-tokens", type=int, default=1, help="fp16 sink tokens (1)")
    p_cal.add_argument("--no-pre-rope", action="store_true", help="quantize keys after RoPE")
    p_cal.add_argument(
        "--text", default=None, help="sample text file (default: Python's own reference manual)"
    )
    p_cal.add_argument(
        "--samples", type=int, default=None,
        help="sample windows (default 4; with --basis 6, of 1024 tokens)",
    )  # fmt: skip
    p_cal.add_argument(
        "--basis", action="store_true",
        help="codec v2: calibrate a key basis (transform coding of keys) instead of a profile",
    )  # fmt: skip
    p_cal.add_argument(
        "--key-bits", type=float, default=2.0,
        help="--basis: bits per key value, scales and minimums included (2.0)",
    )  # fmt: skip
    p_cal.add_argument(
        "--no-query-weights", action="store_true",
        help="--basis: allocate widths by key variance alone, not weighed by the queries' energy",
    )  # fmt: skip
    p_cal.add_argument(
        "--predict", action="store_true",
        help="--basis: also fit maps that predict each layer's KV from the layer before "
        "(blocks then hold only what the prediction misses)",
    )  # fmt: skip
    p_cal.add_argument(
        "--per-head-maps", action="store_true",
        help="--predict: each kv head predicted from its own head of the layer before "
        "(block-diagonal maps: H times fewer products on decode and floats to ship)",
    )  # fmt: skip
    p_cal.add_argument(
        "--map-rank", type=int, default=0, metavar="R",
        help="--predict: maps of rank R < H D, stored as two factors (for 8 heads of 128 and "
        "R = 64, 11x fewer products on decode and floats to ship; 0: full maps)",
    )  # fmt: skip
    p_cal.add_argument(
        "--bf16-maps", action="store_true",
        help="--predict: bfloat16 maps (half the bytes to ship; their products in bfloat16, "
        "about twice as fast to decode on CPUs with AVX-512 BF16)",
    )  # fmt: skip
    p_cal.add_argument(
        "--value-bits", type=int, default=2, choices=(2, 3, 4, 8),
        help="--basis: value bits of the blocks the basis codes (2)",
    )  # fmt: skip
    p_cal.add_argument(
        "--symmetric-values", action="store_true",
        help="--predict: fit the maps for blocks whose value groups are symmetric (one fp16 "
        "scale, no minimum: CodecConfig(symmetric_values=True)); with --publish, workers "
        "then store such blocks (another namespace; with --key-bits 1.6 about 10x, deflated)",
    )  # fmt: skip
    p_cal.add_argument(
        "--publish", default=None, metavar="ENDPOINT",
        help="--basis: store the basis in this tier as the model's current one; every worker "
        "of the model then finds it there (the vLLM connector, CachedModel.connect, ingest)",
    )  # fmt: skip
    p_cal.add_argument(
        "--name", default=None,
        help="--publish: the model's name in the tier (default: --model, or SmolLM2's id); "
        "workers use their served model name",
    )  # fmt: skip
    p_cal.add_argument("--salt", default=None, help="--publish: the tenant's salt")
    p_cal.add_argument("--tls-ca", default=None, help="--publish: CA of a TLS tier (PEM)")
    p_cal.add_argument("--token-file", default=None, help="--publish: the tenant's token")
    p_cal.add_argument(
        "--mac-key-file", default=None, help="--publish: the tenant's MAC secret (file)"
    )
    p_cal.add_argument("--out", default=None, help="profile file (default .cache/profiles/...)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if args.tenant_quota is not None and args.auth_tokens is None:
            build_parser().error("--tenant-quota needs --auth-tokens: quotas are per tenant")
        serve(args)
    elif args.command == "ingest":
        ingest(args)
    elif args.command == "demo":
        rows = demo(args.layers, args.heads, args.tokens, args.head_dim, args.seed)
        print(
            f"block: keys and values [{args.layers}, {args.heads}, {args.tokens}, {args.head_dim}] fp16"
        )
        for row in rows:
            if args.json:
                print(json.dumps(row))
            else:
                print("  ".join(f"{k}={v}" for k, v in row.items()))
    elif args.command == "calibrate":
        if (args.predict or args.no_query_weights or args.publish) and not args.basis:
            build_parser().error("--predict, --no-query-weights and --publish go with --basis")
        if args.per_head_maps and not args.predict:
            build_parser().error("--per-head-maps goes with --predict")
        if args.map_rank and (not args.predict or args.per_head_maps or args.map_rank < 0):
            build_parser().error("--map-rank R (R > 0) goes with --predict, not --per-head-maps")
        if args.bf16_maps and not args.predict:
            build_parser().error("--bf16-maps goes with --basis --predict")
        if args.symmetric_values and not args.predict:
            build_parser().error("--symmetric-values goes with --basis --predict")
        calibrate(args)


if __name__ == "__main__":
    main()
