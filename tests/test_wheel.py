"""lookupc as a user gets it: a wheel in a fresh virtual environment, no checkout on the path.

Slow (it installs torch and TVM into a new venv: minutes), so only under ``-m slow``.
The venv gets the core dependencies and the ``plot`` extra (for ``compare --plot``);
everything runs from a temporary directory, so nothing of the source tree is importable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=1800):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_wheel_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(ROOT)], ROOT)
    wheel = next(dist.glob("lookupc-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path)  # the local CPU build
    _run([py, "-m", "pip", "install", "-q", f"{wheel}[plot]"], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    lookupc = str(venv / "bin" / "lookupc")
    assert "compile" in _run([lookupc, "--help"], work)
    out = _run([lookupc, "inspect", "examples.tiny_bert:factory"], work)
    assert "2 FFN(s) replaced" in out and "fidelity vs the original model" in out
    out = _run([lookupc, "compare", "--config", "tiny", "--schedules", "hand", "--tokens", "64",
                "--repeats", "3", "--no-torch-compile", "--plot", "c.png"], work)
    assert "tvm-hand" in out and (work / "c.png").stat().st_size > 1000
    # nothing came from the checkout
    where = _run([py, "-c", "import lookupc, lookupc.passes; print(lookupc.__file__, "
                  "lookupc.passes.__file__)"], work)
    assert str(ROOT) not in where, where
