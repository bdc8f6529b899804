"""Attention memoization pass (AttMemo, Feng et al. 2023) for BERT/RoBERTa-style self-attention.

:class:`MemoizeAttention` is the graph pass: it matches the memoizable self-attention
modules of a model (:func:`~lookupc.memo.attention.find_self_attention`: ``query``/``key``/
``value`` ``nn.Linear`` children and head attributes, not cross-attention, not causal;
``BertSelfAttention``, ``RobertaSelfAttention``, ``ElectraSelfAttention`` ...), refuses a
database built for another model (fingerprint of the Q/K weights), decides which (layer,
length) buckets to memoize with the eq. 3 plan (:func:`~lookupc.memo.plan.memo_plan`) and
replaces each chosen module, in place, by a :class:`~lookupc.memo.attention.MemoSelfAttention`
(an already wrapped module that is not chosen gets its original back). Its
:class:`MemoReport` says what was wrapped and what was skipped, and why.
:func:`apply_memo` runs it on a copy of a model.

The runtime lives in ``lookupc.memo``: ``build`` (:func:`build_memo_db`, with ``capture``),
``attention`` (the wrapper, its hit path and :func:`memo_stats`), ``apm`` (the APM math),
``plan`` (layer selection), ``store``, ``embed``, ``calib``, ``perf`` and ``data``. The names
this module exported before that split are re-exported here.

Order with the LookupFFN pass: either. ``apply_memo(lookupc.convert(m, ...).module, db)``
and ``lookupc.convert(apply_memo(m, db), ...)`` both work; the database fingerprint
covers only the Q/K weights, which the FFN pass does not touch, and a wrapped layer runs
the original attention under export/compile tracing.

Examples
--------
>>> db = build_memo_db(model, [{"input_ids": ids}], "/tmp/db", alpha_inputs=[{"input_ids": q}])  # doctest: +SKIP
>>> fast = apply_memo(model, "/tmp/db", preset="moderate", log=print)   # prints the per-layer plan  # doctest: +SKIP
>>> fast(input_ids=ids); memo_stats(fast)                              # doctest: +SKIP
>>> memo = MemoizeAttention("/tmp/db", preset="moderate")              # doctest: +SKIP
>>> result = memo(model); print(memo.report)                           # in place  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lookupc.errors import LookupcInputError, PassError
from lookupc.memo.apm import apm_times_value, compute_apm
from lookupc.memo.attention import (
    PASS_NAME,
    LayerStats,
    MemoSelfAttention,
    find_self_attention,
    memo_stats,
    model_fingerprint,
    rejected_attention,
    reset_memo_stats,
    unwrap,
)
from lookupc.memo.build import build_memo_db
from lookupc.memo.perf import format_plan, resolve_threshold
from lookupc.memo.plan import layer_profiles, memo_plan
from lookupc.memo.store import BucketData, MemoStore

from .infra import Pass, PassResult
from .match_ffn import Skipped

__all__ = ["find_self_attention", "model_fingerprint", "build_memo_db", "apply_memo", "memo_plan", "memo_stats",
           "reset_memo_stats", "MemoSelfAttention", "LayerStats", "layer_profiles", "compute_apm",
           "apm_times_value", "MemoizeAttention", "MemoReport", "MemoizedLayer"]


@dataclass
class MemoizedLayer:
    """One wrapped self-attention: where it is, its database layer, the padded lengths it serves."""

    name: str
    layer: int
    seq_lens: list[int]
    margins: dict[int, float]  # padded length -> error margin

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "seq_lens": list(self.seq_lens),
                "margins": {str(k): v for k, v in self.margins.items()}}


@dataclass
class MemoReport:
    """What :class:`MemoizeAttention` did: wrapped layers, skipped ones with a reason, and the plan.

    ``skipped`` holds matched self-attentions the plan left out and attention-like modules
    the matcher rejects (cross-attention, causal); ``plan`` is the :func:`memo_plan` rows.
    """

    threshold: float
    memoized: list[MemoizedLayer] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "memoized": [m.to_dict() for m in self.memoized],
                "skipped": [{"location": s.location, "reason": s.reason} for s in self.skipped],
                "plan": [dict(r) for r in self.plan]}

    def __str__(self) -> str:
        lines = [f"attention memoization at similarity threshold {self.threshold:g}: "
                 f"{len(self.memoized)} self-attention layer(s) memoized, {len(self.skipped)} skipped"]
        lines += [f"memoized {m.name or '<root>'} (layer {m.layer}, lengths {m.seq_lens})" for m in self.memoized]
        lines += [f"skipped {s.location or '<root>'}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class MemoizeAttention(Pass):
    """Wrap the self-attention layers a database's plan enables in ``MemoSelfAttention`` (in place).

    Takes the arguments of :func:`apply_memo` but the model. ``requires`` checks the
    model against the database fingerprint (``MemoDatabaseError``); :meth:`plan` makes the
    eq. 3 plan once and hands it to ``log``; ``call`` rewrites and sets :attr:`report`;
    ``ensures`` checks that exactly the planned layers are wrapped.
    """

    name = PASS_NAME

    def __init__(self, db: MemoStore | str | os.PathLike, preset: str | float = "moderate", *,
                 layers: str | Iterable[int] = "auto", threshold: float | None = None,
                 margin_quantile: float | None = 0.9, other_lengths: str = "error",
                 adaptive: bool = True, log: Callable[[str], None] | None = None):
        if other_lengths not in ("error", "original"):
            raise LookupcInputError(f"other_lengths must be 'error' or 'original', got {other_lengths!r}")
        self.store = db if isinstance(db, MemoStore) else MemoStore.open(db)
        self.preset, self.threshold, self.layers = preset, threshold, layers
        self.margin_quantile, self.other_lengths, self.log = margin_quantile, other_lengths, log
        self.adaptive = adaptive
        self._rows: list[dict] | None = None
        self._thr: float | None = None
        self.report: MemoReport | None = None

    def requires(self, module: nn.Module) -> None:
        self.store.check(model_fingerprint(module))

    def plan(self) -> list[dict]:
        """The :func:`memo_plan` rows at this pass's threshold (made, and logged, on the first call)."""
        if self._rows is None:
            thr = resolve_threshold(self.preset if self.threshold is None else self.threshold)
            rows = memo_plan(self.store, threshold=thr, layers=self.layers, margin_quantile=self.margin_quantile)
            if self.log is not None:
                self.log(format_plan(rows, thr))
            self._rows, self._thr = rows, thr
        return self._rows

    def _why_not(self, layer: int, rows: list[dict]) -> str:
        mine = [r for r in rows if r["layer"] == layer]
        if not mine:
            return "the database has no bucket for this layer"
        if self.layers == "auto":
            savings = ", ".join(f"L={r['seq_len']}: {1e3 * r['saving']:.3f} ms" for r in mine)
            return f"eq. 3 saving per sequence <= 0 at threshold {self._thr:g} ({savings})"
        chosen = sorted({r["layer"] for r in rows if r["enabled"]})
        return f"not among the chosen layers {chosen}"

    def call(self, module: nn.Module) -> PassResult:
        rows = self.plan()
        thr = self._thr
        enabled: dict[int, dict[int, BucketData]] = {}
        margins: dict[int, dict[int, float]] = {}
        break_even: dict[int, dict[int, float]] = {}
        for r in rows:
            if r["enabled"]:
                enabled.setdefault(r["layer"], {})[r["seq_len"]] = self.store.bucket(r["layer"], r["seq_len"])
                margins.setdefault(r["layer"], {})[r["seq_len"]] = r["margin"]
                if self.adaptive and r.get("auto", True):  # layers the user forces always look up
                    saved = r["t_attention"] - r["t_hit"]
                    break_even.setdefault(r["layer"], {})[r["seq_len"]] = (
                        r["t_overhead"] / saved if saved > 0 else 1.0)
        report = MemoReport(thr, plan=rows)
        modified = False
        for layer, (name, mod) in enumerate(find_self_attention(module)):
            if layer not in enabled:
                if isinstance(mod, MemoSelfAttention):
                    _set_submodule(module, name, mod.inner)
                    modified = True
                report.skipped.append(Skipped(name, self._why_not(layer, rows)))
                continue
            _set_submodule(module, name, MemoSelfAttention(unwrap(mod), layer, self.store, thr, enabled[layer],
                                                           self.other_lengths, margins[layer],
                                                           break_even.get(layer)))
            report.memoized.append(MemoizedLayer(name, layer, sorted(enabled[layer]), margins[layer]))
            modified = True
        report.skipped += [Skipped(name, reason) for name, reason in rejected_attention(module)]
        self.report = report
        return PassResult(module, modified)

    def ensures(self, module: nn.Module) -> None:
        wrapped = sorted(m.layer for m in module.modules() if isinstance(m, MemoSelfAttention))
        planned = sorted(m.layer for m in self.report.memoized) if self.report is not None else []
        if wrapped != planned:
            raise PassError(self.name, f"wrapped layers {wrapped}, the plan enables {planned}")


def apply_memo(model: nn.Module, db: MemoStore | str | os.PathLike, preset: str | float = "moderate", *,
               layers: str | Iterable[int] = "auto", threshold: float | None = None,
               margin_quantile: float | None = 0.9, other_lengths: str = "error",
               adaptive: bool = True, log: Callable[[str], None] | None = None) -> nn.Module:
    """A memoizing copy of ``model`` (``model`` itself is never modified).

    Parameters
    ----------
    model : nn.Module
        Model with BERT-style self-attention; may already be LookupFFN-converted, or memoized
        (its wrappers are replaced).
    db : MemoStore or path
        A database from ``build_memo_db`` for this model; a mismatched or damaged one raises
        ``MemoDatabaseError`` naming the problem.
    preset : {"conservative", "moderate", "aggressive"} or float
        Threshold on the calibrated similarity (``lookupc.memo.perf.PRESETS``); ``1.0`` disables
        every hit.
    layers : "auto", "all" or iterable of int
        "auto": only (layer, length) buckets whose eq. 3 saving at the threshold is positive,
        with alpha measured on the database's representative queries; "all": every layer;
        or explicit layer indices.
    threshold : float, optional
        Overrides ``preset``.
    margin_quantile : float or None
        A record is used when its calibrated similarity minus an error margin clears the
        threshold; the margin is this quantile of (calibrated - true) similarity on the
        build's held-out near pairs, so about this fraction of hits truly clear it
        (``lookupc.memo.calib.error_margin``). ``None``: no margin.
    other_lengths : {"error", "original"}
        What a wrapped layer does with an input whose padded length the database was not
        built for: raise ``MemoDatabaseError`` (default) or run the original attention.
    adaptive : bool
        Layers chosen by "auto" stop looking up while their recent hit rate is below the
        break-even ``T_overhead / (T_attn - T_hit)`` and probe again with exponential
        backoff (``lookupc.memo.attention.Backoff``); skipped sequences are counted in
        ``memo_stats(...)[layer].skipped``. Forced layers always look up.
    log : callable, optional
        Receives the plan: per layer T_attn, T_hit, T_overhead, alpha, expected saving, decision.

    Returns
    -------
    nn.Module
        The copy; ``memo_stats(copy)`` gives per-layer hits and misses. :class:`MemoizeAttention`
        is the same rewrite in place, with a :class:`MemoReport`.
    """
    memo = MemoizeAttention(db, preset, layers=layers, threshold=threshold, margin_quantile=margin_quantile,
                            other_lengths=other_lengths, adaptive=adaptive, log=log)
    memo.requires(model)  # a mismatched database, a bad threshold or bad layers fail before the copy
    memo.plan()
    result = memo.call(copy.deepcopy(model))
    memo.ensures(result.module)
    return result.module
