#!/usr/bin/env bash
# The GPU evidence suite, unattended (see benchmarks/gpu_suite.py): about 8 minutes on one H100.
# Fashion-MNIST (for the Table 6 section) travels with the working tree in an ignored folder:
#   mkdir -p .devdata && cp /usr/share/datasets/fashion-mnist/*.gz .devdata/ && echo /.devdata/ >> .git/info/exclude
# then, on the GPU machine, from the repository root (carrying .devdata):
#   bash benchmarks/gpu_suite.sh --output "$OUT" --fashion-dir .devdata
# It needs torch, torchvision, timm, safetensors and onnx, and takes the package from src/ (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
