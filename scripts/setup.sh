#!/usr/bin/env bash
# Create ./.venv and install GrootL with its test tools.
# TORCH_SPEC picks the torch build (default torch==2.14.1, a CUDA 13 build that can also compile the
# CUDA kernels; TORCH_SPEC=torch==2.13.0 is a small CPU-only build on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "${TORCH_SPEC:-torch==2.14.1}"
.venv/bin/pip install -q -e ".[dev]"
echo "GrootL installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
