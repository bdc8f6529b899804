"""The whole-model distillation objective and the output comparisons it is built from.

:class:`_Objective` is the loss :func:`lookupc.distill.model.finetune_model` trains on (the
``output``, ``layers`` and ``cosine`` terms described in :mod:`lookupc.distill.model`), as
ratios of sums so that data-parallel ranks can combine it; :func:`output_tensors` picks the
floating tensors out of a model output, and :func:`output_error` is the mean relative output
error of a student against its teacher.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LookupcInputError
from .calibration import run_item, token_mask

__all__ = ["output_tensors", "output_error"]


def output_tensors(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output (tensor, tuple/list, dict or HF ModelOutput)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _masked(t: Tensor, item: Any) -> Tensor:
    """Rows of t [B, L, ...] at real tokens when the item's attention_mask matches [B, L]."""
    if t.dim() >= 2:
        mask = token_mask(item, t.shape[:2])
        if mask is not None:
            return t.reshape(-1, *t.shape[2:])[mask.to(t.device)]
    return t


def _sums(s: Tensor, t: Tensor, item: Any) -> tuple[Tensor, Tensor]:
    """``sum ||s - t||^2`` and ``sum ||t||^2`` over the real tokens (t: no gradient)."""
    s, t = _masked(s, item).float(), _masked(t, item).detach().float()
    return (s - t).pow(2).sum(), t.pow(2).sum()


def _rel(s: Tensor, t: Tensor, item: Any) -> Tensor:
    num, den = _sums(s, t, item)
    return num / den.clamp_min(1e-30)


def _pooled(t: Tensor, item: Any) -> Tensor | None:
    """Mean over real tokens of t [B, L, d] (the attention mask's ones), or None."""
    if t.dim() != 3:
        return None
    mask = token_mask(item, t.shape[:2])
    if mask is None:
        return t.float().mean(1)
    m = mask.reshape(t.shape[:2]).to(t.device, torch.float32).unsqueeze(-1)
    return (t.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def _hidden_states(out: Any) -> tuple:
    hs = getattr(out, "hidden_states", None)
    if hs is None and isinstance(out, Mapping):
        hs = out.get("hidden_states")
    return tuple(hs) if hs else ()


def _outputs_only(out: Any) -> list[Tensor]:
    """The output tensors without the hidden states asked for by the layer loss."""
    if isinstance(out, Mapping) and "hidden_states" in out:
        return [t for k, v in out.items() if k != "hidden_states" for t in output_tensors(v)]
    return output_tensors(out)


class _Objective:
    """The distillation loss of one item (see :mod:`lookupc.distill.model`) and its parts.

    Every term is a ratio of sums over the item's rows: ``sum ||s - t||^2 / sum ||t||^2``
    per tensor, and the pooled cosine as ``sum cos / rows``. The denominators carry no
    gradient, so with the rows split across processes (:mod:`lookupc.distill.distributed`) the
    sum over ranks of ``local numerator / global denominator`` has the gradient of the
    whole item's loss: the denominators (and, for the reported parts, the numerators)
    are summed across ranks before the ratios are taken.
    """

    def __init__(self, student: nn.Module, cosine_weight: float, layers: bool):
        self.cosine_weight = float(cosine_weight)
        takes = _forward_params(student)
        self.layers = bool(layers) and "output_hidden_states" in takes

    def run(self, model: nn.Module, item: Any, index: int) -> Any:
        if not self.layers:
            return run_item(model, item, index)
        if isinstance(item, Mapping):
            return run_item(model, {**item, "output_hidden_states": True}, index)
        return run_item(functools.partial(model, output_hidden_states=True), item, index)

    def _pieces(self, s_out: Any, t_out: Any, item: Any) -> tuple[list, list, dict]:
        """Numerators (with gradient), denominators (without) and which term each is."""
        s_t, t_t = _outputs_only(s_out), _outputs_only(t_out)
        if len(s_t) != len(t_t) or not s_t:
            raise LookupcInputError(f"student and teacher outputs differ in structure ({len(s_t)} vs "
                             f"{len(t_t)} floating tensors)")
        nums, dens, layout = [], [], {}

        def add(term: str, num: Tensor, den: Tensor) -> None:
            layout.setdefault(term, []).append(len(nums))
            nums.append(num)
            dens.append(den)

        for s, t in zip(s_t, t_t):
            add("output", *_sums(s, t, item))
        if self.layers:
            s_h, t_h = _hidden_states(s_out)[1:], _hidden_states(t_out)[1:]
            if s_h and len(s_h) == len(t_h):
                for s, t in zip(s_h, t_h):
                    add("layers", *_sums(s, t, item))
        ps, pt = _pooled(s_t[0], item), _pooled(t_t[0], item)
        if ps is not None and pt is not None:
            cos = nn.functional.cosine_similarity(ps, pt.detach(), dim=-1)
            add("cosine", cos.sum(), torch.tensor(float(cos.shape[0]), device=cos.device))
        return nums, dens, layout

    def _combine(self, nums: list, dens: list, layout: dict) -> tuple[Tensor, dict]:
        def mean_ratio(term: str) -> Tensor:
            idx = layout[term]
            return sum(nums[i] / dens[i].clamp_min(1e-30) for i in idx) / len(idx)

        loss = mean_ratio("output")
        parts = {"output": float(loss.detach())}
        if "layers" in layout:
            lay = mean_ratio("layers")
            parts["layers"] = float(lay.detach())
            loss = loss + lay
        if "cosine" in layout:
            cos = mean_ratio("cosine")
            parts["cosine"] = float(cos.detach())
            if self.cosine_weight:
                loss = loss + self.cosine_weight * (1.0 - cos)
        parts["loss"] = float(loss.detach())
        return loss, parts

    def __call__(self, s_out: Any, t_out: Any, item: Any, comm: Any = None
                 ) -> tuple[Tensor, dict]:
        """The loss to back-propagate and the loss parts (of the whole item: with ``comm``
        summed over the ranks, whose loss shares then add up to the item's loss)."""
        nums, dens, layout = self._pieces(s_out, t_out, item)
        if comm is None:
            return self._combine(nums, dens, layout)
        sums = torch.stack([n.detach().float() for n in nums] + [d.float() for d in dens])
        comm.all_reduce_([sums])
        total_n, total_d = list(sums[:len(nums)]), list(sums[len(nums):])
        loss, _ = self._combine(nums, total_d, layout)
        _, parts = self._combine(total_n, total_d, layout)
        return loss, parts


def _forward_params(model: nn.Module) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def output_error(student: nn.Module, teacher: nn.Module, items: list) -> float:
    """Mean over items of the relative output error (sqrt of the output loss), no grad."""
    errs = []
    with torch.no_grad():
        for i, item in enumerate(items):
            s_t = output_tensors(run_item(student, item, i))
            t_t = output_tensors(run_item(teacher, item, i))
            if len(s_t) != len(t_t) or not s_t:
                raise LookupcInputError("student and teacher outputs differ in structure")
            loss = sum(_rel(s, t, item) for s, t in zip(s_t, t_t)) / len(s_t)
            errs.append(math.sqrt(float(loss)))
    return sum(errs) / max(1, len(errs))
