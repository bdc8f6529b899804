"""Selective memoization: the per-layer performance model (AttMemo eq. 3) and threshold presets.

"Similar enough" is a threshold on the *calibrated similarity* of the nearest stored
record of the same real length: the embedder's predicted similarity (key distance,
``lookupc.memo.embed``) mapped through the isotonic calibration fitted at build time
on held-out pairs (``lookupc.memo.calib``), which estimates the true similarity score
``SC`` of paper eq. 1 (in [0, 1], 1 = identical APMs). A record is used only when the
calibrated similarity is ``> threshold`` (strict), so threshold 1.0 is the strictest
setting: nothing is ever memoized.

Presets (calibrated SC must exceed):

============  =====  ======================================================
conservative  0.95   rows of the reused APM differ by < 5% TV on average
moderate      0.90
aggressive    0.85
============  =====  ======================================================

The paper's table 2 uses 0.98 / 0.97 / 0.96 for BERT with a 575 GB database built
from 8K sequences of 512 tokens; with the small databases this project can build
(hundreds of sequences) almost nothing clears 0.96, so the presets are shifted
down; the bench reports the quality cost (embedding cosine vs the original model).

Performance model, per layer i and length bucket (paper eq. 3)::

    PB_i = T_saved_i * alpha_i(threshold) - T_overhead_i

``T_saved`` is what a hit saves: the layer's attention time minus the hit path
(V projection, APM fetch, ``APM @ V``); the paper's ``T_Atn`` assumes the hit path
is free, which is not true on a CPU where ``APM @ V`` costs as much as ``Q K^T``.
``T_overhead`` is embedding + index search, paid on every call. All times are per
sequence, measured at build time on the build machine with the batched hit path.

``alpha`` is the hit rate at the threshold on *representative queries*: the
``alpha_inputs`` given to ``build_memo_db`` (the traffic the database is made for),
or, without them, the held-out token-edited copies of database sequences made at
build time (near-duplicate traffic at ``EmbedConfig.edit_rates``). Each query's
nearest record of its real length is looked up as live and counts as a hit when its
*calibrated* similarity (``lookupc.memo.calib``), less the error margin, clears the
threshold. (Estimating it
leave-one-out among the database records, as before, gives alpha = 0 whenever the
records are distinct documents, and then no layer is ever enabled.) A layer
memoizes only when ``PB > 0``; :func:`format_plan` prints the decision with its figures.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from lookupc.errors import LookupcInputError
from lookupc.memo.calib import SimilarityCalibration, with_margin

__all__ = ["PRESETS", "STRICTEST", "LayerTiming", "LayerProfile", "format_plan", "resolve_threshold",
           "measure_timing", "time_call"]

PRESETS: dict[str, float] = {"conservative": 0.95, "moderate": 0.90, "aggressive": 0.85}
STRICTEST = 1.0


def resolve_threshold(preset: str | float) -> float:
    """A preset name or a number in ``[-inf, 1]`` -> similarity threshold."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise LookupcInputError(f"preset must be one of {sorted(PRESETS)} or a number, got {preset!r}")
        return PRESETS[preset]
    value = float(preset)
    if not value <= STRICTEST:
        raise LookupcInputError(f"similarity threshold must be <= {STRICTEST}, got {preset!r}")
    return value


@dataclass(frozen=True)
class LayerTiming:
    """Seconds per sequence: full attention, the hit path, and the per-call memo overhead."""

    t_attention: float
    t_hit: float
    t_overhead: float

    @property
    def t_saved(self) -> float:
        return self.t_attention - self.t_hit

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerProfile:
    """Timing, calibration and representative-query similarities of one (layer, length) bucket.

    ``alpha_predicted[i]`` is the embedder's predicted similarity of query i to its nearest
    record (``-inf`` when the database has no record of its real length), ``alpha_true[i]``
    the true eq. 1 similarity of that pair (``nan`` when none). A query hits when its calibrated
    similarity less ``margin`` (``memo_calib.error_margin``, ``memo_calib.with_margin``) clears
    the threshold, as live.
    """

    layer: int
    seq_len: int
    timing: LayerTiming
    calibration: SimilarityCalibration
    alpha_predicted: np.ndarray
    alpha_true: np.ndarray
    alpha_source: str = ""
    margin: float = 0.0

    def _hits(self, threshold: float) -> np.ndarray:
        p = np.asarray(self.alpha_predicted, np.float64)
        ok = np.isfinite(p)
        out = np.zeros(len(p), dtype=bool)
        out[ok] = with_margin(self.calibration(p[ok]), self.margin) > threshold
        return out

    def hit_rate(self, threshold: float) -> float:
        """alpha: fraction of the representative queries whose calibrated similarity clears ``threshold``."""
        return float(self._hits(threshold).mean()) if len(self.alpha_predicted) else 0.0

    def true_hit_rate(self, threshold: float) -> float:
        """Fraction of the queries whose nearest record's *true* similarity clears ``threshold``."""
        t = np.nan_to_num(np.asarray(self.alpha_true, np.float64), nan=-np.inf)
        return float((t > threshold).mean()) if len(t) else 0.0

    def precision(self, threshold: float) -> float:
        """Of the queries that would hit, the fraction whose true similarity clears ``threshold``."""
        hits = self._hits(threshold)
        if not hits.any():
            return float("nan")
        return float((np.asarray(self.alpha_true)[hits] > threshold).mean())

    def benefit(self, threshold: float) -> float:
        """Paper eq. 3 in seconds per sequence: ``T_saved * alpha - T_overhead``."""
        return self.timing.t_saved * self.hit_rate(threshold) - self.timing.t_overhead

    def worth_it(self, threshold: float) -> bool:
        return self.benefit(threshold) > 0.0

    def decision(self, threshold: float) -> dict:
        """The eq. 3 figures and verdict at ``threshold`` (seconds per sequence)."""
        return dict(layer=self.layer, seq_len=self.seq_len, t_attention=self.timing.t_attention,
                    t_hit=self.timing.t_hit, t_overhead=self.timing.t_overhead,
                    alpha=self.hit_rate(threshold), true_alpha=self.true_hit_rate(threshold),
                    precision=self.precision(threshold), saving=self.benefit(threshold),
                    enabled=self.worth_it(threshold), margin=self.margin, alpha_source=self.alpha_source,
                    n_queries=int(len(self.alpha_predicted)))


def format_plan(rows: list[dict], threshold: float) -> str:
    """A table of :meth:`LayerProfile.decision` rows (times in ms per sequence)."""
    lines = [f"memo plan at similarity threshold {threshold:g} (eq. 3: saving = (T_attn - T_hit) * alpha "
             f"- T_overhead, ms per sequence)",
             f"{'layer':>5} {'L':>5} {'T_attn':>7} {'T_hit':>7} {'T_ovh':>7} {'margin':>6} {'alpha':>6} "
             f"{'true':>6} {'saving':>8}  decision"]
    for r in rows:
        why = "memoize" if r["enabled"] else ("off: saving <= 0" if r.get("auto", True) else "off")
        if r.get("forced"):
            why = "memoize (forced)"
        lines.append(f"{r['layer']:>5} {r['seq_len']:>5} {1e3 * r['t_attention']:7.2f} {1e3 * r['t_hit']:7.2f} "
                     f"{1e3 * r['t_overhead']:7.2f} {r.get('margin', 0.0):6.3f} {r['alpha']:6.2f} "
                     f"{r['true_alpha']:6.2f} "
                     f"{1e3 * r['saving']:+8.2f}  {why}")
    sources = sorted({f"{r['alpha_source']} ({r['n_queries']} queries)" for r in rows})
    if sources:
        lines.append("alpha from " + "; ".join(sources) + "; 'true' = share whose nearest record truly clears "
                     "the threshold")
    return "\n".join(lines)


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_timing(run_attention: Callable[[], object], run_hit: Callable[[], object],
                   run_overhead: Callable[[], object], n_seqs: int, repeats: int = 5) -> LayerTiming:
    """Time the three paths on the same calibration batch of ``n_seqs`` sequences (per-sequence result).

    The three are timed in turn within each repeat, in a rotating order, and each result is
    the median over repeats: on a shared machine whose load drifts, timing one path after
    the other would compare different loads.
    """
    if n_seqs < 1:
        raise LookupcInputError(f"n_seqs must be >= 1, got {n_seqs}")
    fns = [run_attention, run_hit, run_overhead]
    for fn in fns:  # warm-up
        fn()
    times: list[list[float]] = [[], [], []]
    for r in range(max(1, repeats)):
        for k in range(3):
            i = (k + r) % 3
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    med = [statistics.median(t) / n_seqs for t in times]
    return LayerTiming(t_attention=med[0], t_hit=med[1], t_overhead=med[2])
