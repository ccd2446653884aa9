"""tests/sglang runs in two virtual environments: SGLang's real classes in `.venv-sglang`
(SGLang must not share vLLM's venv), the vLLM side of the cross-engine checks in `.venv`. Each
venv collects the files it can import; the README's test command runs both."""

from __future__ import annotations

import importlib.util

_HAS_SGLANG = importlib.util.find_spec("sglang") is not None
_HAS_VLLM = importlib.util.find_spec("vllm") is not None

collect_ignore = [
    *([] if _HAS_SGLANG else ["test_storage.py", "test_controller.py", "test_sglang_keys.py"]),
    *([] if _HAS_VLLM else ["test_vllm_keys.py"]),
]
