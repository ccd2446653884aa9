"""Builds the native pieces of kvpool: the CPU codec loop (kernels/_cpu_codec.c) and attention
over packed rows (kernels/_cpu_attention.c), which share their row helpers (kernels/_cpu_rows.h).

Everything else is declared in pyproject.toml. The C code uses only the CPython API and
gcc's function multi-versioning, so the same build runs on any x86-64 or Arm CPU and picks
AVX-512 / AVX2 code paths at load time where the CPU has them.
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            f"kvpool.kernels.{name}",
            sources=[f"kernels/{name}.c"],
            depends=["kernels/_cpu_rows.h"],
            extra_compile_args=FLAGS,
        )
        for name in ("_cpu_codec", "_cpu_attention")
    ]
)
