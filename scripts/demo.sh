#!/usr/bin/env bash
# Sets up .venv and runs the main job on the bundled example model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
