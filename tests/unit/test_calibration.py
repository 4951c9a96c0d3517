"""analysis.calibration: agreement statistics against scipy, series-wise folds, the series bootstrap,
and the monotone maps recovering a known score -> Likert function (synthetic data, known truth)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis import calibration as cal


def _known_map(x):
    """The truth of the recovery tests: a decreasing logistic (noise in HU -> Likert), 4 at 0 HU."""
    return 4.0 / (1.0 + np.exp((x - 30.0) / 6.0))


def _synthetic(n_series=30, per_series=10, noise=0.3, seed=1):
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"1.2.{i}" for i in range(n_series)], per_series)
    x = rng.uniform(5.0, 60.0, n_series * per_series)
    y = np.clip(_known_map(x) + rng.normal(0.0, noise, len(x)), 0.0, 4.0)
    return x, y, groups


def test_statistics_equal_scipy_on_known_data() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    y = np.array([0.0, 1.0, 1.0, 2.0, 4.0, 3.0, 3.0, 4.0])  # ties in y: Kendall tau-b
    c = cal.correlations(x, y)
    assert c["plcc"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert c["srocc"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert c["krocc"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert c["aggregate"] == pytest.approx(abs(c["plcc"]) + abs(c["srocc"]) + abs(c["krocc"]))
    # Spearman by hand: Pearson of the ranks (ties share the mean rank)
    ranks_y = np.array([1, 2.5, 2.5, 4, 7.5, 5.5, 5.5, 7.5])
    assert c["srocc"] == pytest.approx(np.corrcoef(np.arange(1, 9), ranks_y)[0, 1], abs=1e-12)
    # the fast path of the bootstrap gives the same numbers
    fast = cal._correlations_fast(x, y)
    for k in cal.STATS:
        assert fast[k] == pytest.approx(c[k], abs=1e-12)
    # a decreasing relation: negative correlations, positive aggregate
    d = cal.correlations(-x, y)
    assert d["srocc"] == pytest.approx(-c["srocc"]) and d["aggregate"] == pytest.approx(c["aggregate"])
    assert all(math.isnan(v) for v in cal.correlations(np.ones(5), np.arange(5.0)).values())


def test_folds_never_split_a_series() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 12, 23)
    groups = np.repeat([f"s{i}" for i in range(23)], sizes)
    folds = cal.group_kfold(list(groups), len(groups), k=5, seed=3)
    assert len(folds) == 5
    everything = np.concatenate(folds)
    assert sorted(everything.tolist()) == list(range(len(groups)))  # each pair in exactly one fold
    fold_of = {}
    for f, idx in enumerate(folds):
        for g in set(groups[idx]):
            assert g not in fold_of, f"series {g} in folds {fold_of[g]} and {f}"
            fold_of[g] = f
    assert len(fold_of) == 23
    # fewer series than folds: one fold per series; one series: no cross-validation
    assert len(cal.group_kfold(["a", "a", "b", "c"], 4, k=5)) == 3
    with pytest.raises(cal.CalibrationError, match="at least 2"):
        cal.group_kfold(["a"] * 5, 5)
    # unknown series (None): each pair on its own
    assert len(cal.group_kfold([None] * 7, 7, k=5)) == 5


def test_bootstrap_ci_contains_the_true_correlation_and_is_seeded() -> None:
    rho = 0.6  # bivariate normal: Spearman = 6/pi asin(rho/2), Kendall = 2/pi asin(rho)
    truth = {"plcc": rho, "srocc": 6 / math.pi * math.asin(rho / 2), "krocc": 2 / math.pi * math.asin(rho)}
    rng = np.random.default_rng(7)
    xy = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=400)
    groups = np.repeat(np.arange(80), 5)  # independent pairs in groups of 5: resampled as groups
    ci = cal.bootstrap_ci(xy[:, 0], xy[:, 1], groups, n_boot=300, seed=11)
    for k, v in truth.items():
        lo, hi = ci[k]
        assert lo < v < hi, f"{k}: {v:.3f} outside [{lo:.3f}, {hi:.3f}]"
        assert hi - lo < 0.25  # informative, not trivially wide
    assert cal.bootstrap_ci(xy[:, 0], xy[:, 1], groups, n_boot=300, seed=11) == ci
    assert cal.bootstrap_ci(xy[:, 0], xy[:, 1], groups, n_boot=300, seed=12) != ci


@pytest.mark.parametrize("method", ["isotonic", "logistic"])
def test_maps_recover_a_known_monotone_function(method) -> None:
    x, y, _ = _synthetic(noise=0.3)
    m = cal.FITTERS[method](x, y, cal.direction_of(x, y))
    assert m.direction == -1  # more noise, lower rating
    grid = np.linspace(10.0, 55.0, 46)
    err = np.abs(m.apply(grid) - _known_map(grid))
    # tolerance: noise SD 0.3 on 300 pairs; isotonic is a step function (coarser), logistic is the truth's family
    assert err.max() < (0.45 if method == "isotonic" else 0.15), err.max()
    assert np.all(np.diff(m.apply(grid)) <= 1e-12)  # monotone, in the fitted direction
    # clipped to [0, 4] far outside the data; nan stays nan
    out = m.apply([-1e6, 1e6, np.nan])
    assert 0.0 <= out[0] <= 4.0 and 0.0 <= out[1] <= 4.0 and math.isnan(out[2])
    # round trip through JSON-ready parameters
    again = cal.LikertMap.from_dict(m.to_dict())
    assert np.array_equal(again.apply(grid), m.apply(grid))


def test_increasing_score_and_clipping() -> None:
    x = np.linspace(0.0, 1.0, 50)
    y = 4.0 * x  # increasing, exactly linear
    m = cal.fit_isotonic(x, y, +1)
    assert m.apply_one(0.5) == pytest.approx(2.0, abs=1e-9)
    assert m.apply_one(2.0) == 4.0 and m.apply_one(-1.0) == 0.0
    lg = cal.fit_logistic(x, y, +1)
    assert lg.apply_one(0.5) == pytest.approx(2.0, abs=0.1)
    assert lg.apply_one(100.0) == 4.0  # the linear term would pass 4: clipped


def test_calibrate_cross_validated_and_chooses_by_cv_error() -> None:
    x, y, g = _synthetic(noise=0.3)
    r = cal.calibrate(x, y, list(g), n_boot=200, seed=5)
    assert r.n_pairs == 300 and r.n_groups == 30 and r.folds == 5
    assert r.method == min(r.cv_rmse, key=r.cv_rmse.get)
    assert r.cv_rmse[r.method] < 0.35  # near the rating noise (0.3)
    # out-of-fold Likert against the ratings: positive (calibrated), raw score: negative
    assert r.cv["srocc"] > 0.9 and r.raw["srocc"] < -0.9
    assert r.cv["aggregate"] == pytest.approx(abs(r.cv["plcc"]) + abs(r.cv["srocc"]) + abs(r.cv["krocc"]))
    lo, hi = r.cv_ci["aggregate"]
    assert lo < r.cv["aggregate"] < hi
    assert cal.calibrate(x, y, list(g), n_boot=200, seed=5).statistics() == r.statistics()
    # a nan score is dropped and counted
    x2 = x.copy()
    x2[:3] = np.nan
    assert cal.calibrate(x2, y, list(g), n_boot=20).n_dropped == 3


def test_calibrate_refuses_what_cannot_be_calibrated() -> None:
    with pytest.raises(cal.CalibrationError, match="at least 10"):
        cal.calibrate(np.arange(5.0), np.arange(5.0) % 4, None)
    with pytest.raises(cal.CalibrationError, match="same rating"):
        cal.calibrate(np.arange(20.0), np.full(20, 2.0), None)
    with pytest.raises(cal.CalibrationError, match="same on every"):
        cal.calibrate(np.ones(20), np.arange(20.0) % 5, None)
    with pytest.raises(ValueError, match="ratings"):
        cal.calibrate(np.arange(20.0), np.arange(20.0), None)  # ratings above 4


def test_cli_defaults_are_the_calibration_modules():
    """node/calibrate.py repeats the defaults so that building the parser does not import scipy."""
    import subprocess
    import sys

    from analysis import calibration
    from node import calibrate as cli_calibrate

    assert (cli_calibrate.DEFAULT_FOLDS, cli_calibrate.DEFAULT_BOOTSTRAP) == \
        (calibration.DEFAULT_FOLDS, calibration.DEFAULT_BOOTSTRAP)
    code = ("import sys; from node.cli import build_parser; build_parser(); "
            "print('scipy.stats' in sys.modules, 'analysis.calibration' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
