"""How close a converted model is to the original: measured, never assumed.

:func:`measure` runs both models on the same inputs (the converted one on the PyTorch
reference ops) and returns ``rel_error`` (``||y' - y|| / ||y||`` over every output
tensor) and, for outputs shaped ``[batch, seq, hidden]`` (encoders), the cosine
similarity of mean-pooled outputs per batch item (``cosine_mean``, ``cosine_min``;
pooled over the real tokens when an ``attention_mask`` keyword input marks padding).
For other outputs the cosine is taken per row of the first output.

``lookupc.convert`` stores it in ``report.fidelity`` and prints it; the artifact manifest
carries it; ``min_fidelity`` / ``--min-fidelity`` refuse a conversion below a cosine.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["measure", "FidelityWarning", "RANDOM_INIT_WARN_BELOW"]

#: a random-init conversion whose pooled cosine falls below this gets a warning
RANDOM_INIT_WARN_BELOW = 0.95


class FidelityWarning(UserWarning):
    """The converted model's outputs are far from the original's."""


def _tensors(out) -> list:
    from .artifact.export import flatten_outputs

    return [t for t in flatten_outputs(out)[0] if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def measure(original: torch.nn.Module, converted: torch.nn.Module, inputs: tuple,
            kwargs: dict | None = None, what: str = "example inputs") -> dict:
    """Fidelity of ``converted`` against ``original`` on ``inputs`` (see module docstring)."""
    from . import dispatch

    with torch.no_grad():
        want = _tensors(original(*inputs, **(kwargs or {})))
        with dispatch.set_schedule("reference"):
            got = _tensors(converted(*inputs, **(kwargs or {})))
    if not want or len(want) != len(got):
        return {"inputs": what, "rel_error": None, "cosine_mean": None, "cosine_min": None}
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(got, want))
    den = sum(float(b.double().pow(2).sum()) for b in want)
    a, b = got[0].double(), want[0].double()
    if a.dim() == 3:  # [batch, seq, hidden]: mean-pool over the (real, unpadded) tokens
        mask = (kwargs or {}).get("attention_mask")
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(a.shape[:2]):
            m = (mask != 0).to(a.dtype).unsqueeze(-1)
            a, b = (a * m).sum(1) / m.sum(1).clamp_min(1), (b * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            a, b = a.mean(1), b.mean(1)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"inputs": what, "rel_error": (num / den) ** 0.5 if den else None,
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "pooled": got[0].dim() == 3}


def describe(f: dict | None) -> str:
    """One line for reports."""
    if not f or f.get("cosine_mean") is None:
        return "fidelity vs the original model: not measured (no floating-point outputs)"
    kind = "mean-pooled outputs" if f.get("pooled") else "output rows"
    return (f"fidelity vs the original model on the {f['inputs']}: output rel. error "
            f"{f['rel_error']:.4f}, cosine of {kind} mean {f['cosine_mean']:.4f} "
            f"(min {f['cosine_min']:.4f})")


def warn_if_random_init_lost_quality(f: dict | None, init: str) -> None:
    if init != "random" or not f or f.get("cosine_mean") is None:
        return
    if f["cosine_mean"] < RANDOM_INIT_WARN_BELOW:
        warnings.warn(FidelityWarning(
            f"the converted model's outputs have cosine {f['cosine_mean']:.3f} with the "
            f"original's: randomly initialised LookupFFNs do not reproduce trained FFNs; "
            f"convert with init='distill' (CLI: --init distill) to keep a pretrained model's "
            f"quality"), stacklevel=3)
