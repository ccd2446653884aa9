"""Ingest workers: Ray actors that precompute the KV of documents and put it to the tier.

Where it stands: the bulk producers of the data path. Each actor loads a model (on a GPU when
its node has one, `num_gpus=1`; on the CPU otherwise), takes documents or token sequences,
runs their prefill in batches, encodes the KV with the kernels on its own device and puts the
blocks to the tier over gRPC, exactly as an inference worker would store its prompt. Workers
that later see the same tokens hit those blocks.

    texts --tokenize--> ids --cut to full blocks, skip what the tier holds--> batches (right-
    padded: a causal model's KV of the real tokens does not see the padding) --prefill-->
    DynamicCache --per sequence [L, H, T, D]--> KVPool.put (encode on device, stream to shards)

`kvpool ingest` (run_ingest) spreads documents over N such actors and shows progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from kvpool.transport import ClientConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class IngestConfig:
    model: str  # a local folder, or kvpool.models.SMOLLM2
    endpoint: str  # the tier, "host:port[,host:port...]"
    # the codec: the key basis published for the model in the tier (codec v2) when `basis`
    # and there is one; else these options (K3V2 by default)
    basis: bool = True
    key_bits: int | tuple[int, ...] = 3
    value_bits: int | tuple[int, ...] = 2
    group_size: int = 128
    pre_rope: bool = True
    hadamard_values: bool = True
    sink_tokens: int = 4
    block_tokens: int = 256
    batch_tokens: int = 8192  # tokens per prefill batch (padding included)
    salt: bytes = b""
    mac_key: bytes = b""  # the tenant's secret: blocks carry its MAC
    client: ClientConfig = field(default_factory=ClientConfig)  # TLS and the tenant's token


@dataclass
class IngestStats:
    documents: int = 0
    tokens: int = 0  # tokens of full blocks, all documents
    blocks_stored: int = 0
    blocks_cached: int = 0  # already in the tier: not recomputed
    skipped_short: int = 0  # documents shorter than one block
    prefill_s: float = 0.0
    seconds: float = 0.0

    def add(self, other: IngestStats) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that each batch's padded size
    (count x longest) stays within `batch_tokens` (a longer sequence goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[out[-1][0]] <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class IngestWorker:
    """One model replica that prefills token sequences and stores their full blocks."""

    def __init__(self, config: IngestConfig) -> None:
        import torch

        from kvpool.basis import published_codec
        from kvpool.client import KVPool
        from kvpool.hf import namespace_for_model
        from kvpool.kernels.codec import CodecConfig
        from kvpool.model_facts import codec_for
        from kvpool.models import load

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model, self.tokenizer = load(config.model, dtype=dtype, device=self.device)

        def options() -> CodecConfig:
            return codec_for(
                self.model, config.key_bits, config.value_bits, config.group_size,
                pre_rope=config.pre_rope, hadamard_values=config.hadamard_values,
                sink_tokens=config.sink_tokens,
            )  # fmt: skip

        codec = options()
        if config.basis:  # BasisUnavailable (published, but not to be had): this worker stops
            codec, _ = published_codec(self.model, config.endpoint, salt=config.salt,
                                       mac_key=config.mac_key, config=config.client,
                                       fallback=options)  # fmt: skip
        namespace = namespace_for_model(
            self.model, codec, block_tokens=config.block_tokens, salt=config.salt,
            mac_key=config.mac_key,
        )  # fmt: skip
        self.pool = KVPool(config.endpoint, namespace, codec, self.device, config.client)
        self.config = config

    def namespace_id(self) -> bytes:
        return self.pool.namespace.id

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.tokenizer(t).input_ids for t in texts]

    def ingest_texts(self, texts: Sequence[str]) -> IngestStats:
        return self.ingest_tokens(self.tokenize(texts))

    def ingest_tokens(self, sequences: Sequence[Sequence[int]]) -> IngestStats:
        """Prefill and store every full block of every sequence that the tier lacks."""
        import torch

        from kvpool.hf import kv_from_cache

        t0 = time.perf_counter()
        b = self.config.block_tokens
        stats = IngestStats(documents=len(sequences))
        todo: list[list[int]] = []
        for seq in sequences:
            full = len(seq) - len(seq) % b
            if full == 0:
                stats.skipped_short += 1
                continue
            stats.tokens += full
            cached = self.pool.lookup(seq[:full])
            stats.blocks_cached += cached // b
            if cached < full:
                todo.append(list(seq[:full]))
        for group in batches([len(s) for s in todo], self.config.batch_tokens):
            longest = len(todo[group[0]])
            ids = torch.zeros(len(group), longest, dtype=torch.long)
            mask = torch.zeros(len(group), longest, dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(todo[i])] = torch.tensor(todo[i])
                mask[row, : len(todo[i])] = 1
            p0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model(
                    ids.to(self.device), attention_mask=mask.to(self.device), use_cache=True
                )
            stats.prefill_s += time.perf_counter() - p0
            for row, i in enumerate(group):
                keys, values = kv_from_cache(out.past_key_values, len(todo[i]), row)
                stats.blocks_stored += self.pool.put(todo[i], (keys, values))
        stats.seconds = time.perf_counter() - t0
        return stats


def read_documents(paths: Iterable[str | Path]) -> list[str]:
    """The texts of the given files, and of the text files under the given folders (sorted)."""
    docs: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            files = [p]
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
        docs.extend(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return docs


def run_ingest(
    texts: Sequence[str],
    config: IngestConfig,
    workers: int = 1,
    chunk: int = 8,
    progress: Callable[[int], None] | None = None,
) -> IngestStats:
    """Spread `texts` over `workers` IngestWorker actors (Ray must be initialized); calls
    `progress(n)` as each chunk of n documents is done. Returns the summed stats."""
    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    actor: Any = ray.remote(IngestWorker)
    workers_: list[Any] = [
        actor.options(**resources).remote(config) for _ in range(max(1, workers))
    ]
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    pending: dict[Any, tuple[Any, int]] = {}
    total = IngestStats()
    try:
        free = list(workers_)
        while chunks or pending:
            while free and chunks:
                part = chunks.pop(0)
                w = free.pop()
                pending[w.ingest_texts.remote(part)] = (w, len(part))
            done, _ = ray.wait(list(pending), num_returns=1)
            w, n = pending.pop(done[0])
            total.add(ray.get(done[0]))
            free.append(w)
            if progress:
                progress(n)
    finally:
        for w in workers_:
            ray.kill(w)
    return total
