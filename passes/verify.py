"""The end-to-end check of a rewrite: :func:`verify_rewrite`.

After the rewrite passes, :func:`~lookupc.passes.api.convert` puts each replaced FFN's
dense original back into its LookupFFN slot (temporarily) and runs both models, in eval
mode (:func:`_eval_mode`, which restores every submodule's training flag afterwards), on
the example inputs; :func:`_compare` says how the outputs differ, if they do, and
:func:`verify_rewrite` raises :class:`~lookupc.errors.PassError` when they differ.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from lookupc.errors import PassError

from .match_ffn import normalize_inputs, tensor_leaves
from .replacement import Replacement

__all__ = ["verify_rewrite"]


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode and restore every submodule's flag afterwards."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _compare(expected: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if len(expected) != len(got):
        return f"the model returns {len(got)} tensors instead of {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, got)):
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if a.is_floating_point():
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
                return f"output {i} differs by up to {float((a - b).abs().max()):.3g}"
        elif not torch.equal(a, b):
            return f"output {i} differs"
    return None


def verify_rewrite(original: nn.Module, converted: nn.Module,
                   replacements: list[Replacement], example_inputs: Any) -> None:
    """Raise PassError unless ``converted`` with each LookupFFN slot holding the dense
    original computes what ``original`` computes on ``example_inputs``."""
    args, kwargs = normalize_inputs(example_inputs)
    with torch.no_grad(), _eval_mode(original, converted):
        expected = tensor_leaves(original(*args, **kwargs))
        for r in replacements:
            converted.set_submodule(r.slot, r.dense)
        try:
            got = tensor_leaves(converted(*args, **kwargs))
        finally:
            for r in replacements:
                converted.set_submodule(r.slot, r.lookup)
    problem = _compare(expected, got)
    if problem is not None:
        raise PassError("verify_rewrite", f"the rewritten model with its dense FFNs put back "
                        f"does not compute the original: {problem}")
