#!/usr/bin/env bash
# Sets up .venv, then compiles the bundled example model into an artifact and runs it:
#   lookupc compile examples.tiny_bert:factory -o build/tiny_bert.lookupc --force
#   lookupc run build/tiny_bert.lookupc
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
