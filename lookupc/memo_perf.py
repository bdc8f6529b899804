"""Selective memoization: the per-layer performance model (AttMemo eq. 3) and threshold presets.

"Similar enough" is a threshold on the *predicted similarity score* of the nearest
stored record, ``1 - ||e_q - e_nn||``: the embedder is trained so that embedding
distance tracks the APM distance ``1 - SC`` of paper eq. 1 (``lookupc.memo_embed``),
so the threshold is in the paper's units (SC in [0, 1], 1 = identical APMs). A
record is used only when ``predicted > threshold`` (strict), so threshold 1.0 is the
strictest setting: nothing is ever memoized.

Presets (predicted SC must exceed):

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
``T_overhead`` is embedding + index search, paid on every call. ``alpha`` is the
hit rate at the threshold, estimated leave-one-out on the calibration set
(each record queries the index and its own entry is skipped), so it is not
inflated by records finding themselves, and with the same error margin the live
lookup applies (``LayerProfile.inflation``). All times are per sequence, measured at
build time on the build machine. A layer memoizes only when ``PB > 0``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from lookupc.errors import LookupcInputError

__all__ = ["PRESETS", "STRICTEST", "LayerTiming", "LayerProfile", "resolve_threshold", "measure_timing",
           "time_call"]

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
    """Timing and leave-one-out similarities of one (layer, length) bucket.

    ``loo_predicted[i]`` is the predicted similarity of record i to its nearest *other*
    record in embedding space, ``loo_true[i]`` the true eq. 1 similarity of that pair.
    Those are exactly the conditions of a live query, so they measure the embedder's
    error at query time, including the optimism of taking a nearest neighbour (the
    minimum of many noisy distances is biased low). The correction is multiplicative
    on the distance: ``inflation`` is the ``margin_quantile`` quantile of
    ``true_distance / predicted_distance`` (at least 1), and a hit needs
    ``1 - inflation * (1 - predicted) > threshold``, so about that fraction of hits
    really clear the threshold, while an exact repeat (distance 0) still hits.
    ``margin_quantile=None`` disables the correction.
    """

    layer: int
    seq_len: int
    timing: LayerTiming
    loo_predicted: np.ndarray
    loo_true: np.ndarray
    margin_quantile: float | None = 0.9

    @property
    def inflation(self) -> float:
        if self.margin_quantile is None or len(self.loo_predicted) == 0:
            return 1.0
        pred_d = np.maximum(1.0 - self.loo_predicted.astype(np.float64), 1e-6)
        ratio = (1.0 - self.loo_true.astype(np.float64)) / pred_d
        return max(1.0, float(np.quantile(ratio, self.margin_quantile)))

    def corrected(self, predicted: np.ndarray | float) -> np.ndarray | float:
        """Predicted similarity after the error correction: ``1 - inflation * (1 - predicted)``."""
        return 1.0 - self.inflation * (1.0 - predicted)

    def hit_rate(self, threshold: float) -> float:
        """alpha: fraction of calibration queries whose nearest other record clears ``threshold`` (corrected)."""
        if len(self.loo_predicted) == 0:
            return 0.0
        return float(np.mean(self.corrected(self.loo_predicted) > threshold))

    def benefit(self, threshold: float) -> float:
        """Paper eq. 3 in seconds per sequence: ``T_saved * alpha - T_overhead``."""
        return self.timing.t_saved * self.hit_rate(threshold) - self.timing.t_overhead

    def worth_it(self, threshold: float) -> bool:
        return self.benefit(threshold) > 0.0


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
    """Time the three paths on the same calibration batch of ``n_seqs`` sequences (per-sequence result)."""
    if n_seqs < 1:
        raise LookupcInputError(f"n_seqs must be >= 1, got {n_seqs}")
    return LayerTiming(t_attention=time_call(run_attention, repeats) / n_seqs,
                       t_hit=time_call(run_hit, repeats) / n_seqs,
                       t_overhead=time_call(run_overhead, repeats) / n_seqs)
