# Type stub for the C extension kernels/_cpu_codec.c: its functions take raw pointers, sizes and
# codes, and only kernels/cpu_codec.py calls them, typing its own arguments.
from typing import Any

def __getattr__(name: str) -> Any: ...
