"""Tensor files: a model's inputs and outputs on disk (``lookupc run --input/--output``, artifacts).

:func:`load_inputs` reads positional inputs from ``.pt`` (tensors only: no pickle code
runs), ``.safetensors``, ``.npy`` or ``.npz``; :func:`save_inputs` writes tensors (an
artifact's example inputs, ``lookupc run``'s outputs) as ``.safetensors`` keys ``input_0``,
``input_1``... or a ``.pt``; :func:`describe_tensor` gives one's shape and dtype (and
optionally its mean and std) for messages.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LookupcInputError

__all__ = ["load_inputs", "save_inputs", "describe_tensor"]


def _fail(msg: str) -> None:
    raise LookupcInputError(msg)


def load_inputs(path: str) -> tuple:
    """Positional inputs from a file: ``.pt`` (tensors only, no pickle code runs),
    ``.safetensors`` (keys ``input_0``, ``input_1``... or any keys, in sorted order),
    ``.npy`` or ``.npz`` (arrays in order ``arr_0``...)."""
    import torch

    p = Path(path)
    if not p.is_file():
        _fail(f"--input {path}: no such file")
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001
            _fail(f"--input {path}: not a tensor file ({str(err).splitlines()[0]})")
        if isinstance(obj, dict):
            obj = [obj[k] for k in sorted(obj, key=_natural)]
        if isinstance(obj, torch.Tensor):
            obj = [obj]
        if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
            _fail(f"--input {path}: must hold a tensor, a tuple/list or dict of tensors")
        return tuple(obj)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            d = load_file(str(p))
        except Exception as err:  # noqa: BLE001 - SafetensorError does not name the file
            _fail(f"--input {path}: not a readable safetensors file "
                  f"({' '.join(str(err).split())[:200]})")
        return tuple(d[k] for k in sorted(d, key=_natural))
    if p.suffix in (".npy", ".npz"):
        import numpy as np

        arr = np.load(p, allow_pickle=False)
        arrays = [arr] if p.suffix == ".npy" else [arr[k] for k in sorted(arr.files, key=_natural)]
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).clone() for a in arrays)
    _fail(f"--input {path}: unknown input file type {p.suffix!r} "
          f"(use .pt, .safetensors, .npy or .npz)")
    raise AssertionError  # unreachable


def save_inputs(inputs: tuple, path: str) -> None:
    """Write positional inputs (or outputs) as ``.safetensors`` keys ``input_0``... or a ``.pt``."""
    import torch

    tensors = {f"input_{i}": t.contiguous() for i, t in enumerate(inputs)}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def describe_tensor(t, stats: bool = False) -> str:
    """``(2, 32) int64``: shape and dtype of a tensor, with ``stats`` its mean and std."""
    text = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    if stats:
        text += f" mean {t.float().mean().item():+.5f} std {t.float().std().item():.5f}"
    return text


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
