"""The cost check that decides whether a cached prefix is worth fetching, and the CLI's sizes."""

from __future__ import annotations

import argparse

import pytest

from kvpool.cli import parse_bytes
from kvpool.hf import CostModel


def test_fetching_is_skipped_when_recomputing_is_cheaper() -> None:
    cost = CostModel(fetch_bytes_per_s=100e6, fetch_overhead_s=0.003)
    assert cost.worth_fetching(256, 1_000_000)  # nothing learned yet: fetch
    cost.saw_prefill(1000, 0.01)  # a fast prefill: 10 us per token
    assert not cost.worth_fetching(256, 1_000_000)  # 13 ms to fetch vs 2.6 ms to recompute
    assert cost.worth_fetching(100_000, 1_000_000)  # a long prefix still pays
    assert not CostModel(min_tokens=512).worth_fetching(256, 1)


def test_learning_moves_the_rates_towards_what_was_seen() -> None:
    cost = CostModel(fetch_bytes_per_s=100e6, alpha=0.5)
    cost.saw_fetch(10_000_000, 1.0)  # 10 MB/s
    assert cost.fetch_bytes_per_s == pytest.approx(55e6)
    cost.saw_prefill(100, 1.0)
    cost.saw_prefill(100, 3.0)
    assert cost.prefill_s_per_token == pytest.approx(0.02)


@pytest.mark.parametrize(
    "text, value", [("1GiB", 1 << 30), ("512M", 512 << 20), ("1048576", 1 << 20), ("1.5k", 1536)]
)
def test_sizes(text, value) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "1 GB extra", "-5M"])
def test_bad_sizes_are_refused(text) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bytes(text)
