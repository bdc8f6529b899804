#!/usr/bin/env bash
# Sets up .venv and runs the default test suite (no slow or GPU tests).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- -m "not slow and not gpu"; fi
exec .venv/bin/python -m pytest -q "$@"
