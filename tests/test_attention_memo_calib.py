"""Calibrated predicted -> true similarity map of attention memoization (isotonic, PAV)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lookupc.errors import LookupcInputError
from lookupc.memo.calib import (
    SimilarityCalibration,
    calibration_table,
    error_margin,
    isotonic_fit,
    pav,
    with_margin,
)


def _brute_isotonic(y, w):
    """Least-squares non-decreasing fit by trying every partition into blocks (tiny n only)."""
    n, best = len(y), (np.inf, None)
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        vals = [np.average(y[a:b], weights=w[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if any(v2 < v1 for v1, v2 in zip(vals, vals[1:])):
            continue
        fit = np.concatenate([[v] * (b - a) for v, a, b in zip(vals, bounds[:-1], bounds[1:])])
        err = float((w * (fit - y) ** 2).sum())
        if err < best[0] - 1e-12:
            best = (err, fit)
    return best[1]


def test_pav_is_the_least_squares_monotone_fit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = np.linspace(0, 1, 7) + 0.3 * rng.standard_normal(7)
        w = rng.uniform(0.5, 2.0, 7)
        fitted = pav(y, w)
        assert (np.diff(fitted) >= 0).all()
        np.testing.assert_allclose(fitted, _brute_isotonic(y, w), atol=1e-9)
        kx, ky = isotonic_fit(np.arange(7.0), y, w)
        assert (np.diff(kx) > 0).all() and (np.diff(ky) >= 0).all()
        np.testing.assert_allclose(np.unique(np.round(fitted, 9)), np.round(ky, 9))


def test_isotonic_fit_pools_ties_and_sorts():
    kx, ky = isotonic_fit([3, 1, 2, 2], [4.0, 1.0, 3.0, 2.0])
    np.testing.assert_allclose(kx, [1, 2, 3]) and np.testing.assert_allclose(ky, [1.0, 2.5, 4.0])
    with pytest.raises(LookupcInputError):
        isotonic_fit([], [])
    with pytest.raises(LookupcInputError):
        isotonic_fit([0.1, np.nan], [1, 2])


def test_calibration_is_monotone_anchored_and_corrects_a_biased_embedder():
    rng = np.random.default_rng(1)
    pred = rng.uniform(0.5, 1.0, 400)
    true = 1 - 2.5 * (1 - pred) + 0.01 * rng.standard_normal(400)  # distances understated 2.5x, noisy
    cal = SimilarityCalibration.fit(pred[:200], true[:200])
    grid = np.linspace(-1, 1.2, 500)
    assert (np.diff(cal(grid)) >= 0).all()  # monotone everywhere, constant outside the knots
    assert cal(1.0) == 1.0  # an exact repeat stays exact
    held = calibration_table(pred[200:], true[200:], cal)
    assert held["mae"] < 0.03 < held["mae_raw"] and abs(held["bias"]) < 0.01
    assert sum(b["n"] for b in held["bins"]) == 200
    again = SimilarityCalibration.from_arrays(cal.to_arrays())
    np.testing.assert_array_equal(again(grid), cal(grid))
    assert SimilarityCalibration.identity()(0.73) == pytest.approx(0.73)
    assert SimilarityCalibration.fit([], []).knots_x.tolist() == [-1.0, 1.0]


def test_bad_knots_are_refused():
    with pytest.raises(LookupcInputError, match="increasing"):
        SimilarityCalibration(np.array([0.5, 0.4]), np.array([0.1, 0.2]))
    with pytest.raises(LookupcInputError, match="increasing"):
        SimilarityCalibration(np.array([0.4, 0.5]), np.array([0.3, 0.2]))
    with pytest.raises(LookupcInputError, match="finite"):
        SimilarityCalibration(np.array([0.4, np.inf]), np.array([0.3, 0.4]))


def test_error_margin_is_a_held_out_quantile_and_keeps_exact_repeats():
    cal = SimilarityCalibration.identity()
    pred = np.linspace(0.9, 0.99, 11)
    true = pred - np.linspace(0.0, 0.01, 11)  # overstated by 0 .. 0.01
    assert error_margin(cal, pred, true, 0.9) == pytest.approx(0.009)
    assert error_margin(cal, pred, true + 0.05, 0.9) == 0.0  # never negative
    assert error_margin(cal, pred, true, None) == 0.0 and error_margin(cal, [], [], 0.9) == 0.0
    assert with_margin(0.95, 0.01) == pytest.approx(0.94)
    assert with_margin(1.0, 0.01) == 1.0 and with_margin(0.999, 0.01) == pytest.approx(0.998)
    assert (np.diff(with_margin(np.linspace(0.5, 1, 50), 0.02)) > 0).all()
    with pytest.raises(LookupcInputError):
        error_margin(cal, pred, true, 1.5)
