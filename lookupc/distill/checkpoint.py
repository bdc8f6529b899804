"""Training checkpoints that are written atomically and never silently mismatched.

A checkpoint is one file holding plain data: tensors, numbers, strings, lists and
dicts (optimizer and scheduler state dicts included). It is written to a temporary
file in the same directory and renamed over the old one (``os.replace``), so a kill
at any moment leaves either the previous checkpoint or the new one, never half of
one. It is read with ``torch.load(weights_only=True)``: no pickled code runs.

Every checkpoint carries a ``fingerprint`` (what run it belongs to: parameter names
and shapes, step budget, seed, learning rates...). :func:`load_checkpoint` refuses
a file whose fingerprint differs from the run that wants to resume, naming the
fields that differ, and reports an unreadable file as corrupt: a checkpoint is never
ignored.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import torch

from ..errors import LookupcInputError

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_bytes", "CheckpointError"]

_FORMAT = "lookupc-checkpoint-1"


class CheckpointError(LookupcInputError):
    """A checkpoint is unreadable, of another format, or from a different run."""


def save_checkpoint(path: str, fingerprint: dict, state: dict) -> None:
    """Write ``state`` (plain data) with its run ``fingerprint`` to ``path`` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _FORMAT, "fingerprint": fingerprint, "state": state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint_bytes(path: str) -> bytes | None:
    """The raw bytes of the checkpoint at ``path`` (None when there is no such file), for
    :func:`load_checkpoint`'s ``raw`` (rank 0 reads, the other processes get the bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def load_checkpoint(path: str, fingerprint: dict, raw: bytes | None = None) -> dict:
    """The state saved at ``path`` (or held in ``raw``, the bytes of that file);
    :class:`CheckpointError` if it is corrupt or its fingerprint differs from
    ``fingerprint``. ``raw`` is read with the same safe loader (no pickled code)."""
    try:
        source = io.BytesIO(raw) if raw is not None else path
        data = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - truncated, garbage, or not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a lookupc checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {_FORMAT} file")
    saved = data.get("fingerprint")
    if saved != fingerprint:
        saved = saved if isinstance(saved, dict) else {}
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        shown = "; ".join(f"{k}: checkpoint {_short(saved.get(k))} vs now {_short(fingerprint.get(k))}"
                          for k in diff[:4])
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({shown}); "
                              "use the same model, configuration and options, or another path")
    return data["state"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
