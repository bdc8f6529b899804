"""Calibration inputs: validation, running a model on them, capturing a layer's activations.

A calibration set is an iterable of example inputs in the form ``convert`` takes
``example_inputs``: a tuple (or list) of positional arguments, a dict of keyword
arguments, or a single tensor. :func:`calibration_items` checks and materialises
it; :func:`run_item` runs a model on one item and turns the model's own exception
into a :class:`~lookupc.errors.LookupcInputError` that says which item failed and why;
:class:`ActivationCapture` collects the inputs of one submodule, token by token,
up to a cap (so memory stays bounded however large the calibration set is), and
:func:`capture_inputs` runs the calibration items to capture several at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LookupcInputError

__all__ = ["calibration_items", "run_item", "token_mask", "ActivationCapture", "StopForward",
           "capture_inputs"]


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass once it has what it needs."""


def calibration_items(calibration: Any) -> list:
    """Check a calibration set and return its items as a list.

    Raises
    ------
    LookupcInputError
        If ``calibration`` is None, not iterable, empty, or has an item that is not a
        tuple/list, dict or tensor.
    """
    if calibration is None:
        raise LookupcInputError("init='distill' needs calibration=<iterable of example inputs>, "
                                "got None")
    if isinstance(calibration, (Tensor, Mapping, str, bytes)) or not isinstance(calibration,
                                                                               Iterable):
        raise LookupcInputError(
            f"calibration must be an iterable of example inputs (tuples of positional args or "
            f"dicts of keyword args), got {type(calibration).__name__}")
    items = list(calibration)
    if not items:
        raise LookupcInputError("calibration is empty: give at least one example input")
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list, Mapping, Tensor)):
            raise LookupcInputError(
                f"calibration item {i} must be a tuple of positional args, a dict of keyword "
                f"args or a Tensor, got {type(item).__name__}")
    return items


def _describe(item: Any) -> str:
    def one(v: Any) -> str:
        return f"Tensor{tuple(v.shape)}:{v.dtype}" if isinstance(v, Tensor) else type(v).__name__
    if isinstance(item, Mapping):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in item.items()) + "}"
    if isinstance(item, Tensor):
        return one(item)
    return "(" + ", ".join(one(v) for v in item) + ")"


def run_item(model: nn.Module, item: Any, index: int) -> Any:
    """Run ``model`` on calibration item ``index``; wrap the model's errors.

    :class:`StopForward` passes through (it is how captures end a pass early).
    """
    try:
        if isinstance(item, Mapping):
            return model(**item)
        if isinstance(item, Tensor):
            return model(item)
        return model(*item)
    except StopForward:
        raise
    except Exception as exc:  # the model's own error, whatever its type
        raise LookupcInputError(
            f"calibration item {index} {_describe(item)} does not fit the model: "
            f"{type(exc).__name__}: {exc}") from exc


def token_mask(item: Any, lead_shape: torch.Size) -> Tensor | None:
    """Boolean mask of real (non-padding) tokens, from an ``attention_mask`` kwarg if present."""
    if not isinstance(item, Mapping):
        return None
    mask = item.get("attention_mask")
    if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(lead_shape):
        return mask.reshape(-1) != 0
    return None


class ActivationCapture:
    """Forward hook collecting the first positional input of ``module`` as [tokens, d].

    Parameters
    ----------
    module : nn.Module
        The submodule whose input is captured.
    max_tokens : int
        Stop collecting after this many tokens (the rest of each batch is dropped).
    stop : bool
        Raise :class:`StopForward` after each capture so the model does not run the
        layers after ``module`` (the caller catches it).
    """

    def __init__(self, module: nn.Module, max_tokens: int, stop: bool = False):
        self.module, self.max_tokens, self.stop = module, max_tokens, stop
        self.chunks: list[Tensor] = []
        self.tokens = 0
        self.calls = 0
        self.item: Any = None
        self._handle = None

    def __enter__(self) -> "ActivationCapture":
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    @property
    def full(self) -> bool:
        return self.tokens >= self.max_tokens

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        mask = token_mask(self.item, x.shape[:-1])
        if mask is not None:
            flat = flat[mask.to(flat.device)]
        room = self.max_tokens - self.tokens
        if room > 0:
            take = flat[:room].to(torch.float32).cpu().clone()
            self.chunks.append(take)
            self.tokens += take.shape[0]
        if self.stop:
            raise StopForward

    def result(self) -> Tensor:
        """The captured activations, [tokens, d]."""
        return torch.cat(self.chunks) if self.chunks else torch.empty(0)


def capture_inputs(model: nn.Module, modules: list[nn.Module], items: list, max_tokens: int,
                   stop: bool = False) -> list[Tensor]:
    """Inputs of each of ``modules`` over the calibration items (each capped at max_tokens)."""
    caps = [ActivationCapture(m, max_tokens, stop=stop) for m in modules]
    for c in caps:
        c.__enter__()
    try:
        with torch.no_grad():
            for index, item in enumerate(items):
                if all(c.full for c in caps):
                    break
                for c in caps:
                    c.item = item
                try:
                    run_item(model, item, index)
                except StopForward:
                    pass
    finally:
        for c in caps:
            c.__exit__(None, None, None)
    return [c.result() for c in caps]
