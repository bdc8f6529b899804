#!/usr/bin/env bash
# Creates .venv (Python 3.11) with lookupc installed in editable mode and its test extras.
# torch 2.13.0 goes in first and alone: the CPU build sits on local disk, while any other
# torch spec (or a package depending on torch, installed first) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel >/dev/null
"$VPY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || "$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q -e ".[test]"
