"""Synthetic request traces in Mooncake's format, for tuning and testing eviction policies
without reading the production trace.

    python benchmarks/synth_trace.py --mix chat --seed 1 --requests 4000 -o chat-1.jsonl
    python benchmarks/synth_trace.py --mix mixed --seed 2          # JSONL on stdout

Each line is one request, as in `../shared/traces/mooncake-conversation.jsonl` (read by
`kvpool.trace`): `timestamp` (ms), `input_length`, `output_length` (tokens) and `hash_ids`,
the prompt as 512-token blocks where an id names a block *and* everything before it (equal ids
at the same place mean a shared prefix). The last block may be partial.

What a request is made of (every length and popularity below is drawn from the seed):
- a system prompt: one of `--system-prompts`, Zipf-popular, 1-6 blocks; every system prompt
  starts with one global block that all requests share (a preamble such as tool definitions);
- then one of:
  - chat: a turn of a multi-turn session. A session's next turn is its previous prompt (full
    blocks only: the partial last block changes once the turn grows), the previous answer and
    a new message. Sessions are opened at random, the next turn of an open session comes after
    a heavy-tailed number of other requests (most soon, some very late), and a session ends
    after a geometric number of turns;
  - rag: one-off question over retrieved documents. The first document (Zipf-popular from a
    corpus) follows the system prompt, so popular documents are shared prefixes; the rest and
    the question are the request's own;
  - scan: a burst of one-off long prompts (batch summarization, an offline job) that nobody
    reads again, `--scan-length` requests in a row.
`--mix` picks the shares: chat (sessions only), rag, mixed (half sessions, a third RAG, the
rest one-off prompts), scan (chat with scans through it), bursty (mixed, with sessions that
come back after long idle times), long (the production conversation trace's published shape:
half chat, half one-offs, messages 2.8x longer: about 23 blocks a prompt). Prints nothing but
the JSONL (to `-o` or stdout) and a summary line on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

BLOCK = 512

MIXES: dict[str, dict[str, float]] = {
    # shares of new requests: a chat turn (new session or next turn), a RAG prompt, a one-off
    "chat": {"chat": 1.0, "rag": 0.0, "oneoff": 0.0, "scan_every": 0, "idle": 1.0},
    "rag": {"chat": 0.1, "rag": 0.8, "oneoff": 0.1, "scan_every": 0, "idle": 1.0},
    "mixed": {"chat": 0.5, "rag": 0.3, "oneoff": 0.2, "scan_every": 0, "idle": 1.0},
    "scan": {"chat": 0.9, "rag": 0.0, "oneoff": 0.1, "scan_every": 1500, "idle": 1.0},
    "bursty": {"chat": 0.6, "rag": 0.2, "oneoff": 0.2, "scan_every": 2500, "idle": 4.0},
    # the conversation trace's published shape (../shared/traces/README): long prompts (about
    # 23 blocks each), one block every request shares, a bound near 40%; messages 2.8x longer
    "long": {"chat": 0.5, "rag": 0.0, "oneoff": 0.5, "scan_every": 0, "idle": 1.0, "length": 2.8},
}


@dataclass
class Session:
    ids: list[int]  # the full blocks of its last prompt plus its answer's blocks
    due: int  # the request index of its next turn
    turns_left: int


@dataclass
class Generator:
    rng: random.Random
    mix: dict[str, float]
    system_prompts: int
    corpus: int
    scan_length: int
    next_id: int = 0
    systems: list[list[int]] = field(default_factory=list)
    docs: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    sessions: list[Session] = field(default_factory=list)

    def __post_init__(self) -> None:
        root = self.fresh(1)
        self.systems = [root + self.fresh(self.rng.randint(0, 5))
                        for _ in range(self.system_prompts)]  # fmt: skip

    def fresh(self, n: int) -> list[int]:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids

    def zipf(self, n: int, s: float = 1.1) -> int:
        """An index in [0, n), index i drawn with weight 1 / (i + 1)^s."""
        weights = [1.0 / (i + 1) ** s for i in range(n)]
        return self.rng.choices(range(n), weights)[0]

    def tokens(self, mean_blocks: float) -> int:
        """A message length in tokens, lognormal around `mean_blocks` blocks (times the mix's
        `length`)."""
        scale = mean_blocks * self.mix.get("length", 1.0) * BLOCK
        return max(1, int(self.rng.lognormvariate(0.0, 0.8) * scale))

    def request(self, prefix: list[int], extra_tokens: int) -> tuple[list[int], int]:
        """hash_ids and input_length of `prefix` (full blocks) followed by `extra_tokens`."""
        n = extra_tokens + len(prefix) * BLOCK
        return prefix + self.fresh(-(-extra_tokens // BLOCK)), n

    def gap(self) -> int:
        """Requests until a session's next turn: most soon, a heavy tail very late."""
        return int(self.rng.paretovariate(1.2) * 20 * self.mix["idle"])

    def chat(self, index: int) -> tuple[list[int], int, int]:
        due = [s for s in self.sessions if s.due <= index]
        out_tokens = self.tokens(0.6)
        if due and self.rng.random() < 0.85:
            session = min(due, key=lambda s: s.due)
            ids, n = self.request(session.ids, self.tokens(0.5))
        else:
            system = self.systems[self.zipf(len(self.systems))]
            session = Session([], 0, 1 + int(self.rng.expovariate(1 / 4)))
            self.sessions.append(session)
            ids, n = self.request(system, self.tokens(2.0))
        # the next turn reads this prompt's full blocks, then the answer (its own blocks)
        full = ids[: n // BLOCK]
        session.ids = full + self.fresh((out_tokens + n % BLOCK) // BLOCK)
        session.turns_left -= 1
        session.due = index + 1 + self.gap()
        if session.turns_left <= 0:
            self.sessions.remove(session)
        return ids, n, out_tokens

    def rag(self) -> tuple[list[int], int, int]:
        which = self.zipf(len(self.systems))
        doc = self.zipf(self.corpus, 0.9)
        # ids are prefix-dependent: a document after another system prompt is another block
        if (which, doc) not in self.docs:
            self.docs[which, doc] = self.fresh(self.rng.randint(2, 8))
        ids, n = self.request(self.systems[which] + self.docs[which, doc], self.tokens(4.0))
        return ids, n, self.tokens(0.3)

    def oneoff(self) -> tuple[list[int], int, int]:
        system = self.systems[self.zipf(len(self.systems))]
        ids, n = self.request(system, self.tokens(6.0))
        return ids, n, self.tokens(0.5)

    def scan(self) -> tuple[list[int], int, int]:
        ids, n = self.request(self.systems[0][:1], self.tokens(12.0))
        return ids, n, 1


def generate(mix: str, seed: int, requests: int, system_prompts: int = 8, corpus: int = 400,
             scan_length: int = 150, idle_scale: float = 1.0) -> Iterator[dict[str, object]]:  # fmt: skip
    """The requests of a synthetic trace, in order, as Mooncake-format dicts. `idle_scale`
    multiplies the gaps before a session's next turn: a trace k times longer with gaps k times
    longer has the same reuse at k times the capacity (so per-shard budgets of a real node's
    size, not a few dozen blocks)."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; one of {sorted(MIXES)}")
    if requests < 0 or system_prompts < 1 or corpus < 1 or scan_length < 0 or idle_scale <= 0:
        raise ValueError("requests >= 0, system_prompts >= 1, corpus >= 1, scan_length >= 0, "
                         "idle_scale > 0")  # fmt: skip
    shares = {**MIXES[mix], "idle": MIXES[mix]["idle"] * idle_scale}
    g = Generator(random.Random(seed), shares, system_prompts, corpus, scan_length)
    kinds = ["chat", "rag", "oneoff"]
    weights = [shares[k] for k in kinds]
    every = int(shares["scan_every"])
    t = 0.0
    scanning = 0
    for i in range(requests):
        if every and i % every == every // 2:
            scanning = scan_length
        if scanning:
            scanning -= 1
            ids, n, out = g.scan()
        else:
            kind = g.rng.choices(kinds, weights)[0]
            ids, n, out = g.chat(i) if kind == "chat" else g.rag() if kind == "rag" else g.oneoff()
        t += g.rng.expovariate(1 / 300)  # ms between arrivals
        yield {"timestamp": int(t), "input_length": n, "output_length": out, "hash_ids": ids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mix", choices=sorted(MIXES), default="mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--system-prompts", type=int, default=8)
    p.add_argument("--corpus", type=int, default=400, help="RAG documents")
    p.add_argument("--scan-length", type=int, default=150, help="requests in a row per scan")
    p.add_argument("--idle-scale", type=float, default=1.0,
                   help="gaps before a session's next turn times this")  # fmt: skip
    p.add_argument("-o", "--output", default="-", help="JSONL file (default stdout)")
    args = p.parse_args()
    out = sys.stdout if args.output == "-" else open(args.output, "w")  # noqa: SIM115
    blocks = tokens = 0
    try:
        for r in generate(args.mix, args.seed, args.requests, args.system_prompts, args.corpus,
                          args.scan_length, args.idle_scale):  # fmt: skip
            out.write(json.dumps(r) + "\n")
            blocks += len(r["hash_ids"])  # type: ignore[arg-type]
            tokens += r["input_length"]  # type: ignore[operator]
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{args.requests} requests, {tokens / max(1, args.requests):.0f} prompt tokens and "
          f"{blocks / max(1, args.requests):.1f} blocks each", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
