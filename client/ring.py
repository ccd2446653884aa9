"""Placement: which shards own a block key.

Where it stands: the client routes every block straight to its owner (one hop, as Redis
Cluster and memcached clients do). Placement is rendezvous hashing (highest random weight):
each shard scores a key by a 64-bit mix of the key and the shard's seed (sha256 of its id), and
the highest scores own it. Every shard's share of keys is 1/N up to sampling noise (a ring of
128 points per shard left one of 16 shards 16% over the mean: it evicted younger blocks, and a
prefix spread over many shards lives only as long as the shortest horizon among them); adding
a shard moves about 1/N of the keys, all to it, and removing one moves only its own. Block keys
are sha256 digests already: their first 8 bytes are the key's number.

Runs. A block key's first 8 bytes are those of the first block of its run (`kvpool.proto.keys`),
so a prefix's run of blocks has one owner and a request talks to one shard per run. A run whose
head is read by many requests (a shared system prompt) would pull the different blocks that
follow it in each request onto that one shard; so `Placement` places the keys of a run that a
shard has called hot by their own bytes 8..16 instead (as if each block were a run of its
own), and looks for them also where the run's owners hold those stored before it turned hot.
The runs a client has seen hot are remembered (sticky, the most recent `hot_runs`): every
client learns them from the same shard's hints, on its first read through the run.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from kvpool.proto.keys import PLACE_BYTES

_MASK = (1 << 64) - 1
_OWNERS_KEPT = 1 << 16  # keys whose owners a Placement remembers


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijective scramble of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class Ring:
    """The placement over `shard_ids`; `owners(key, r)` gives r distinct shards, primary first."""

    def __init__(self, shard_ids: Sequence[str]) -> None:
        if len(set(shard_ids)) != len(shard_ids):
            raise ValueError("shard ids must be distinct")
        self.shard_ids = tuple(sorted(shard_ids))
        self._seeds = [
            (int.from_bytes(hashlib.sha256(sid.encode()).digest()[:8], "big"), sid)
            for sid in self.shard_ids
        ]

    def owners(self, key: bytes, replicas: int = 1) -> list[str]:
        """The `replicas` shards (fewer if there are fewer) that score `key` highest."""
        k = int.from_bytes(key[:8], "big")
        if replicas == 1 and self._seeds:
            return [max(self._seeds, key=lambda s: _mix(k ^ s[0]))[1]]
        scored = sorted(((_mix(k ^ seed), sid) for seed, sid in self._seeds), reverse=True)
        return [sid for _, sid in scored[:replicas]]


class Placement:
    """Where block keys live on a `Ring` with `replicas` owners each: by their run, or by their
    own bytes in a run seen hot (`mark_hot`). Remembers owners per placement for the current
    ring."""

    def __init__(self, ring: Ring, replicas: int = 1, hot_runs: int = 4096) -> None:
        if replicas < 1 or hot_runs < 0:
            raise ValueError("need replicas >= 1 and hot_runs >= 0")
        self.ring, self.replicas, self.hot_runs = ring, replicas, hot_runs
        self._hot: OrderedDict[bytes, None] = OrderedDict()  # run placement bytes, seen hot
        self._owners: dict[bytes, tuple[str, ...]] = {}
        self._ranked: dict[bytes, tuple[str, ...]] = {}

    def reset(self, ring: Ring, replicas: int) -> None:
        """Another ring or replication: every key placed anew (the hot runs stay known)."""
        self.ring, self.replicas = ring, max(1, replicas)
        self._forget()

    def _forget(self) -> None:
        self._owners.clear()
        self._ranked.clear()

    def _by(self, key: bytes) -> bytes:
        """The bytes `key` is placed by: its run's, or its own in a hot run."""
        run = key[:PLACE_BYTES]
        return key[PLACE_BYTES : 2 * PLACE_BYTES] if run in self._hot else run

    def owners(self, key: bytes) -> tuple[str, ...]:
        """The shards that store `key`, primary first (remembered per placement bytes, so the
        blocks of a run cost one ring lookup)."""
        by = self._by(key)
        owners = self._owners.get(by)
        if owners is None:
            if len(self._owners) >= _OWNERS_KEPT:
                self._owners.clear()
            owners = self._owners[by] = tuple(self.ring.owners(by, self.replicas))
        return owners

    def fallback(self, key: bytes) -> tuple[str, ...]:
        """For a key of a hot run, its run's owners that `owners` does not name (where it was
        stored before the run turned hot); else none."""
        if key[:PLACE_BYTES] not in self._hot:
            return ()
        mine = self.owners(key)
        return tuple(s for s in self.ring.owners(key, self.replicas) if s not in mine)

    def ranked(self, key: bytes, limit: int = 4096) -> tuple[str, ...]:
        """Every shard in the order the ring ranks them for `key` (a hot block's replicas are
        its first ones); remembered for at most `limit` keys."""
        ranked = self._ranked.get(key)
        if ranked is None:
            if len(self._ranked) >= limit:
                self._ranked.clear()
            ranked = tuple(self.ring.owners(self._by(key), len(self.ring.shard_ids)))
            self._ranked[key] = ranked
        return ranked

    def mark_hot(self, key: bytes) -> bool:
        """A shard called `key` hot: its run is placed by its keys' own bytes from now on.
        True when the run was not known hot (the owners of its keys changed)."""
        run = key[:PLACE_BYTES]
        if run in self._hot:
            self._hot.move_to_end(run)
            return False
        if not self.hot_runs:
            return False
        self._hot[run] = None
        if len(self._hot) > self.hot_runs:
            self._hot.popitem(last=False)
        self._forget()
        return True

    def is_hot(self, key: bytes) -> bool:
        return key[:PLACE_BYTES] in self._hot
