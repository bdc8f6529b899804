"""Demo: compile the bundled example model into an artifact, run it, load it from Python.

``bash scripts/demo.sh`` runs this after setting up ``.venv``. The two commands it runs
are the README's quick start::

    lookupc compile examples.tiny_bert:factory -o build/tiny_bert.lookupc --force
    lookupc run build/tiny_bert.lookupc
"""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACT = os.path.join("build", "tiny_bert.lookupc")


def lookupc(*args: str) -> None:
    """Run the ``lookupc`` command next to this Python (the venv's), else ``-m lookupc.cli``."""
    exe = shutil.which("lookupc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "lookupc.cli"]
    print("$ lookupc " + " ".join(args), flush=True)
    subprocess.run(cmd + list(args), cwd=ROOT, check=True)


def main() -> None:
    lookupc("compile", "examples.tiny_bert:factory", "-o", ARTIFACT, "--force")
    lookupc("run", ARTIFACT)

    import torch

    import lookupc as lc
    from lookupc.examples.tiny_bert import factory  # examples/ ships in the package

    model = lc.load(os.path.join(ROOT, ARTIFACT))  # verifies hashes, versions, the CPU
    _, (ids,) = factory(batch=1, seq_len=50)       # another token count than compiled
    (y,) = model(ids)
    print(f"lookupc.load: {model!r}\n  input {tuple(ids.shape)} -> output {tuple(y.shape)}, "
          f"finite: {bool(torch.isfinite(y).all())}")


if __name__ == "__main__":
    main()
