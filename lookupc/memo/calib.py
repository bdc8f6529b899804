"""Calibrated mapping from predicted to true APM similarity (attention memoization).

The embedder (``lookupc.memo.embed``) predicts the similarity of two attention
probability matrices from the distance of their keys; its errors are not uniform
(a nearest neighbour's distance is biased low, and near and far pairs are off by
different factors). :class:`SimilarityCalibration` replaces a single inflation
factor by a monotone map fitted on held-out (predicted, true) pairs, the way the
live lookup sees them: a held-out query, its nearest stored record, and the two
APMs' true eq. 1 similarity. The map is an isotonic (non-decreasing) regression,
computed with pool-adjacent-violators (:func:`isotonic_fit`), so a higher
predicted similarity never maps to a lower calibrated one, and anchored at
``(1, 1)``: an exact repeat (key distance 0) is identical.

Between fitted knots the map interpolates linearly; beyond them it is constant.
Pure numpy; nothing here is pickled (``to_arrays`` / ``from_arrays``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookupc.errors import LookupcInputError

__all__ = ["pav", "isotonic_fit", "SimilarityCalibration", "calibration_table", "error_margin", "with_margin"]


def pav(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Pool adjacent violators: the weighted least-squares non-decreasing sequence closest to ``y``.

    Examples
    --------
    >>> pav(np.array([1.0, 3.0, 2.0, 4.0])).tolist()
    [1.0, 2.5, 2.5, 4.0]
    """
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    bw, by, bn = [], [], []  # blocks: total weight, weighted mean, number of points
    for wi, yi in zip(w.tolist(), y.tolist()):
        bw.append(wi), by.append(yi), bn.append(1)
        while len(by) > 1 and by[-2] > by[-1]:
            w2, y2, n2 = bw.pop(), by.pop(), bn.pop()
            bw[-1], by[-1], bn[-1] = bw[-1] + w2, (bw[-1] * by[-1] + w2 * y2) / (bw[-1] + w2), bn[-1] + n2
    return np.repeat(np.asarray(by), bn)


def isotonic_fit(x, y, w=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares non-decreasing fit of ``y`` on ``x`` (:func:`pav`), as knots.

    Parameters
    ----------
    x, y : array_like
        Points; ``x`` need not be sorted; equal ``x`` are pooled first.
    w : array_like, optional
        Positive weights (default 1).

    Returns
    -------
    (knots_x, knots_y)
        One knot per fitted block: the block's weighted mean ``x`` and its fitted value;
        ``knots_x`` strictly increasing, ``knots_y`` non-decreasing.

    Examples
    --------
    >>> isotonic_fit([0, 1, 2, 3], [1.0, 3.0, 2.0, 4.0])
    (array([0. , 1.5, 3. ]), array([1. , 2.5, 4. ]))
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64).ravel()
    if not (len(x) == len(y) == len(w)) or len(x) == 0:
        raise LookupcInputError(f"isotonic_fit needs equal, non-empty x/y/w, got {len(x)}/{len(y)}/{len(w)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (w > 0).all()):
        raise LookupcInputError("isotonic_fit needs finite x and y and positive weights")
    order = np.argsort(x, kind="stable")
    x, y, w = x[order], y[order], w[order]
    _, start = np.unique(x, return_index=True)  # pool equal x first
    ws = np.add.reduceat(w, start)
    ys = np.add.reduceat(w * y, start) / ws
    xs = np.add.reduceat(w * x, start)
    fitted = pav(ys, ws)
    block = np.concatenate([[0], np.cumsum(np.diff(fitted) != 0)])  # consecutive equal values: one block
    kw = np.bincount(block, weights=ws)
    return np.bincount(block, weights=xs) / kw, np.bincount(block, weights=fitted * ws) / kw


@dataclass(frozen=True)
class SimilarityCalibration:
    """Monotone map predicted -> true similarity: linear between knots, constant outside.

    ``identity()`` is the uncalibrated map (used when there were no held-out pairs).
    """

    knots_x: np.ndarray
    knots_y: np.ndarray

    def __post_init__(self) -> None:
        kx, ky = np.asarray(self.knots_x, np.float64), np.asarray(self.knots_y, np.float64)
        if kx.ndim != 1 or kx.shape != ky.shape or len(kx) == 0:
            raise LookupcInputError(f"calibration knots must be equal-length 1-d arrays, got {kx.shape}/{ky.shape}")
        if not (np.isfinite(kx).all() and np.isfinite(ky).all()):
            raise LookupcInputError("calibration knots must be finite")
        if (np.diff(kx) <= 0).any() or (np.diff(ky) < 0).any():
            raise LookupcInputError("calibration knots must have increasing x and non-decreasing y")
        object.__setattr__(self, "knots_x", kx)
        object.__setattr__(self, "knots_y", ky)

    @classmethod
    def identity(cls) -> "SimilarityCalibration":
        return cls(np.array([-1.0, 1.0]), np.array([-1.0, 1.0]))

    @classmethod
    def fit(cls, predicted: np.ndarray, true: np.ndarray, anchor_weight: float = 1.0) -> "SimilarityCalibration":
        """Isotonic fit of ``true`` on ``predicted``, plus the exact-repeat anchor ``(1, 1)``."""
        p = np.asarray(predicted, np.float64).ravel()
        t = np.minimum(np.asarray(true, np.float64).ravel(), 1.0)  # a similarity never exceeds 1
        if len(p) == 0:
            return cls.identity()
        kx, ky = isotonic_fit(np.append(p, 1.0), np.append(t, 1.0),
                              np.append(np.ones_like(p), anchor_weight))
        if kx[-1] < 1.0:  # the anchor was pooled with points below it: keep exact repeats exact
            kx, ky = np.append(kx, 1.0), np.append(ky, max(1.0, ky[-1]))
        return cls(kx, ky)

    def __call__(self, predicted):
        """Calibrated similarity of ``predicted`` (scalar or array)."""
        out = np.interp(np.asarray(predicted, np.float64), self.knots_x, self.knots_y)
        return float(out) if np.ndim(out) == 0 else out

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"calib_x": self.knots_x.copy(), "calib_y": self.knots_y.copy()}

    @classmethod
    def from_arrays(cls, arrays) -> "SimilarityCalibration":
        return cls(np.asarray(arrays["calib_x"]), np.asarray(arrays["calib_y"]))


def calibration_table(predicted: np.ndarray, true: np.ndarray, calibration: SimilarityCalibration,
                      edges=(0.8, 0.85, 0.9, 0.95, 0.98)) -> dict:
    """Predicted vs calibrated vs true similarity of pairs, overall and binned by calibrated value.

    Returns a JSON-ready dict: ``n``, ``mae_raw`` (|predicted - true|), ``mae`` (|calibrated - true|),
    ``bias`` (mean calibrated - true) and ``bins``: one row per non-empty bin of the calibrated
    similarity with ``n``, ``lo``, ``hi`` and the three means.
    """
    p = np.asarray(predicted, np.float64).ravel()
    t = np.asarray(true, np.float64).ravel()
    if len(p) == 0:
        return dict(n=0, mae_raw=None, mae=None, bias=None, bins=[])
    c = calibration(p)
    bounds = [-np.inf, *edges, np.inf]
    bins = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = (c > lo) & (c <= hi)
        if sel.any():
            bins.append(dict(lo=None if np.isinf(lo) else lo, hi=None if np.isinf(hi) else hi, n=int(sel.sum()),
                             predicted=float(p[sel].mean()), calibrated=float(c[sel].mean()),
                             true=float(t[sel].mean())))
    return dict(n=int(len(p)), mae_raw=float(np.abs(p - t).mean()), mae=float(np.abs(c - t).mean()),
                bias=float((c - t).mean()), bins=bins)


def error_margin(calibration: SimilarityCalibration, predicted, true, quantile: float | None) -> float:
    """How much the calibrated similarity overstates the true one at ``quantile`` of held-out pairs (>= 0).

    The map is a conditional mean, so about half of the pairs near a threshold truly lie below
    it; requiring ``calibrated - margin > threshold`` with ``quantile=0.9`` makes about 90% of
    hits truly clear it. ``None`` (or no pairs): 0.
    """
    p = np.asarray(predicted, np.float64).ravel()
    t = np.asarray(true, np.float64).ravel()
    ok = np.isfinite(p) & np.isfinite(t)
    if quantile is None or not ok.any():
        return 0.0
    if not 0.0 <= quantile <= 1.0:
        raise LookupcInputError(f"margin quantile must lie in [0, 1], got {quantile!r}")
    return max(0.0, float(np.quantile(np.asarray(calibration(p[ok])) - t[ok], quantile)))


def with_margin(calibrated, margin: float):
    """``calibrated - min(margin, 1 - calibrated)``: the margin, tapered so an exact repeat (1) stays 1."""
    c = np.asarray(calibrated, np.float64)
    out = c - np.minimum(margin, 1.0 - c)
    return float(out) if np.ndim(out) == 0 else out
