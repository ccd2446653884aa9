"""The environment variables the kernels read, read here and only here, once at import.

- TRITON_INTERPRET=1: Triton's interpreter runs the Triton kernels on the CPU (the tests do);
  the Triton paths then accept CPU tensors.
"""

from __future__ import annotations

import os

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
