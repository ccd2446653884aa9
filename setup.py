"""Builds the one native piece of kvpool: the CPU codec loop (kernels/_cpu_codec.c).

Everything else is declared in pyproject.toml. The C code uses only the CPython API and
gcc's function multi-versioning, so the same build runs on any x86-64 or Arm CPU and picks
AVX-512 / AVX2 code paths at load time where the CPU has them.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvpool.kernels._cpu_codec",
            sources=["kernels/_cpu_codec.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-fno-trapping-math"],
        )
    ]
)
