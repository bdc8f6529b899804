"""Identify an elementwise subgraph by what it computes (GELU, tanh GELU or something else).

The subgraph between fc1 and fc2 is evaluated numerically on a probe range and
compared with the exact GELU and the tanh approximation, so every way of writing
them (``nn.GELU``, ``F.gelu``, Hugging Face ``GELUActivation`` / ``NewGELUActivation``
/ ``FastGELUActivation`` / ``GELUTanh``, written-out mul/pow/tanh) is recognised,
and QuickGELU, ReLU, SiLU are told apart by their deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from lookupc.errors import LookupcInputError

__all__ = ["Classification", "evaluate_nodes", "classify", "PROBE", "GELU_TOLERANCE"]

# Probe range: GELU and its tanh form differ by up to 4.7e-4 on it, QuickGELU by 2e-2.
PROBE = (-8.0, 8.0, 4001)
# Max absolute deviation accepted as "the same function" (10x below gelu vs gelu_tanh).
GELU_TOLERANCE = 5e-5

_REFERENCES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class Classification:
    """Result of :func:`classify`.

    ``kind`` is ``'gelu'``, ``'gelu_tanh'``, ``'affine'`` (no activation at all) or
    ``'other'``; ``deviation`` is the max abs difference from the closest GELU form.
    """

    kind: str
    deviation: float
    closest: str


def probe(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    lo, hi, n = PROBE
    return torch.linspace(lo, hi, n, dtype=dtype)


def _run_node(node: fx.Node, env: dict, root: nn.Module | None,
              constant: Callable[[fx.Node], object]) -> object:
    def value(a):
        if isinstance(a, fx.Node):
            return env[a] if a in env else constant(a)
        return a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module" and root is not None:
        mod = root.get_submodule(node.target)
        was = mod.training
        mod.eval()
        try:
            return mod(*args, **kwargs)
        finally:
            mod.train(was)
    raise LookupcInputError(f"cannot evaluate node {node.name} ({node.op})")


def evaluate_nodes(start: fx.Node, nodes: Sequence[fx.Node], x: torch.Tensor,
                   constant: Callable[[fx.Node], object],
                   root: nn.Module | None = None) -> dict[fx.Node, object]:
    """Evaluate ``nodes`` (topological order) with ``start`` bound to ``x``.

    ``constant(node)`` gives the value of any other input node (scalar constants).
    Returns the environment of computed values.
    """
    env: dict[fx.Node, object] = {start: x}
    with torch.no_grad():
        for n in nodes:
            env[n] = _run_node(n, env, root, constant)
    return env


def _is_affine(x: torch.Tensor, y: torch.Tensor) -> bool:
    a = torch.stack([x, torch.ones_like(x)], dim=1)
    coef = torch.linalg.lstsq(a, y.unsqueeze(1)).solution
    resid = (a @ coef).squeeze(1) - y
    return float(resid.abs().max()) <= 1e-6 * max(1.0, float(y.abs().max()))


def classify(x: torch.Tensor, y: torch.Tensor) -> Classification:
    """Classify ``y = f(x)`` on the probe ``x``: GELU, tanh GELU, affine or other."""
    y = y.to(torch.float64).reshape(-1)
    x = x.to(torch.float64)
    if y.numel() != x.numel() or not torch.isfinite(y).all():
        return Classification("other", math.inf, "gelu")
    devs = {k: float((f(x) - y).abs().max()) for k, f in _REFERENCES.items()}
    closest = min(devs, key=devs.get)
    if devs[closest] <= GELU_TOLERANCE:
        return Classification(closest, devs[closest], closest)
    if _is_affine(x, y):
        return Classification("affine", devs[closest], closest)
    return Classification("other", devs[closest], closest)
