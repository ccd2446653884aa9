"""The environment variables the kernels read, read here and only here, once at import.

- TRITON_INTERPRET=1: Triton's interpreter runs the Triton kernels on the CPU (the tests do);
  the Triton paths then accept CPU tensors.
- KVPOOL_CPU_ISA=x86-64-v3 (or x86-64-v4, x86-64): the highest instruction set the C attention
  loop (_cpu_attention.c) may use; unset, the best the CPU has. x86-64-v3 runs the code an
  AVX2/FMA/F16C machine without AVX-512 runs, on any newer CPU (to measure it there, with
  ATEN_CPU_CAPABILITY=avx2 for torch's own kernels). `cpu_attention.use_isa` changes it later.
"""

from __future__ import annotations

import os

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_ISA = os.environ.get("KVPOOL_CPU_ISA") or None
