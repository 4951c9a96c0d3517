"""Calibration of a score against raters' Likert scores (0-4): agreement statistics and a monotone
map score -> Likert. Pure numpy/scipy; no database, no DICOM.

Given paired arrays (score of an image, its rating) and, where known, the series each image comes
from:

- ``PLCC`` (Pearson), ``SROCC`` (Spearman), ``KROCC`` (Kendall tau-b) and the LDCTIQAC 2023
  aggregate ``|PLCC| + |SROCC| + |KROCC|`` (0-3), on the raw score (in sample: SROCC and KROCC do
  not depend on a monotone map, PLCC does) and cross-validated: a map fitted on k - 1 folds
  predicts the held-out fold, and the statistics are those of the out-of-fold predictions. Folds
  are split by series: no series has images on both sides of a split.
- 95 % confidence intervals by a seeded bootstrap that resamples whole series (a cluster
  bootstrap: slices of one series are not independent observations), percentile method.
- the map: isotonic regression (``scipy.optimize.isotonic_regression``, linear between its
  knots, constant beyond the fitted range) or the 5-parameter logistic of VQEG / Sheikh et al.
  2006, ``b1 (1/2 - 1/(1 + exp(b2 (s - b3)))) + b4 s + b5`` (``scipy.optimize.curve_fit``,
  ``b1, b2, b4 >= 0`` on the direction-signed, standardised score ``s``, so it is monotone),
  chosen by the lower cross-validated RMSE. The direction (a higher score is better or worse) is
  the sign of the Spearman correlation of the fitting data. ``LikertMap.apply`` clips to [0, 4].
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats
from scipy.special import expit

LIKERT_MIN = 0.0
LIKERT_MAX = 4.0
METHODS = ("isotonic", "logistic")
MIN_PAIRS = 10  # fewer rated images than this: no calibration
DEFAULT_FOLDS = 5
DEFAULT_BOOTSTRAP = 1000
STATS = ("plcc", "srocc", "krocc", "aggregate")


class CalibrationError(ValueError):
    """The data cannot be calibrated (too few pairs or series, a constant score or rating)."""


# ------------------------------------------------------------------------------------------ statistics
def correlations(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, float]:
    """PLCC, SROCC, KROCC (tau-b) and the aggregate |PLCC| + |SROCC| + |KROCC|; nan where undefined
    (fewer than 3 pairs, or x or y constant)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f'Arguments "x" and "y" must be 1-D of the same length, got {x.shape} and {y.shape}')
    nan = {k: math.nan for k in STATS}
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    plcc = float(stats.pearsonr(x, y).statistic)
    srocc = float(stats.spearmanr(x, y).statistic)
    krocc = float(stats.kendalltau(x, y).statistic)
    return {"plcc": plcc, "srocc": srocc, "krocc": krocc, "aggregate": abs(plcc) + abs(srocc) + abs(krocc)}


def _correlations_fast(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """``correlations`` without p-values (the bootstrap's inner loop): the same statistics."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {k: math.nan for k in STATS}
    plcc = float(np.corrcoef(x, y)[0, 1])
    srocc = float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])
    krocc = float(stats.kendalltau(x, y).statistic)
    return {"plcc": plcc, "srocc": srocc, "krocc": krocc, "aggregate": abs(plcc) + abs(srocc) + abs(krocc)}


def _group_index(groups: Sequence | None, n: int) -> tuple[np.ndarray, int]:
    """Integer group codes (0..G-1); an unknown series (None) is a group of its own."""
    if groups is None:
        return np.arange(n), n
    if len(groups) != n:
        raise ValueError(f'Argument "groups" must have one entry per pair ({n}), got {len(groups)}')
    codes: dict[Any, int] = {}
    out = np.empty(n, dtype=int)
    for i, g in enumerate(groups):
        key = ("__single__", i) if g is None else g
        out[i] = codes.setdefault(key, len(codes))
    return out, len(codes)


def bootstrap_ci(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, groups: Sequence | None = None,
                 *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of ``correlations(x, y)``, resampling whole groups (series) with
    replacement. Resamples where a statistic is undefined are left out of its interval; a statistic
    defined in fewer than half the resamples gets (nan, nan). Same seed, same intervals."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    codes, n_groups = _group_index(groups, len(x))
    members = [np.nonzero(codes == g)[0] for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in STATS}
    for _ in range(int(n_boot)):
        pick = rng.integers(0, n_groups, n_groups)
        idx = np.concatenate([members[g] for g in pick])
        c = _correlations_fast(x[idx], y[idx])
        for k in STATS:
            if math.isfinite(c[k]):
                draws[k].append(c[k])
    alpha = (1.0 - level) / 2
    out = {}
    for k in STATS:
        d = np.asarray(draws[k])
        if len(d) < max(1, n_boot // 2):
            out[k] = (math.nan, math.nan)
        else:
            out[k] = (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha)))
    return out


def group_kfold(groups: Sequence | None, n: int, k: int = DEFAULT_FOLDS, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of ``min(k, number of groups)`` folds; every group (series) lies in exactly one
    fold. Groups are dealt in a seeded random order, each to the fold holding the fewest pairs so far."""
    codes, n_groups = _group_index(groups, n)
    if n_groups < 2:
        raise CalibrationError(f"cross-validation by series needs images of at least 2 series, got {n_groups}")
    k = max(2, min(int(k), n_groups))
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=n_groups)
    folds: list[list[int]] = [[] for _ in range(k)]
    load = np.zeros(k, dtype=int)
    for g in rng.permutation(n_groups):
        f = int(np.argmin(load))
        folds[f].append(int(g))
        load[f] += sizes[g]
    return [np.nonzero(np.isin(codes, f))[0] for f in folds]


def direction_of(x: np.ndarray, y: np.ndarray) -> int:
    """+1 when a higher score goes with a higher rating (Spearman >= 0 or undefined), else -1."""
    r = correlations(x, y)["srocc"] if len(x) >= 3 else math.nan
    return -1 if math.isfinite(r) and r < 0 else 1


# ------------------------------------------------------------------------------------------ the maps
def logistic5(s: np.ndarray, b1: float, b2: float, b3: float, b4: float, b5: float) -> np.ndarray:
    """The VQEG 5-parameter logistic ``b1 (1/2 - 1/(1 + exp(b2 (s - b3)))) + b4 s + b5``."""
    return b1 * (0.5 - expit(-b2 * (s - b3))) + b4 * s + b5


@dataclass(frozen=True)
class LikertMap:
    """A monotone map score -> Likert 0-4. ``params``: isotonic ``{"x": knots, "y": values}``;
    logistic ``{"b": [b1..b5], "centre": c, "scale": d}`` with ``s = direction (x - c) / d``."""

    method: str
    direction: int
    params: dict[str, Any]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f'Argument "method" must be one of {", ".join(METHODS)}, got {self.method!r}')
        if self.direction not in (1, -1):
            raise ValueError(f'Argument "direction" must be +1 or -1, got {self.direction!r}')

    def apply(self, x: float | Sequence[float] | np.ndarray) -> np.ndarray:
        """Likert values of scores ``x`` in [0, 4] (nan stays nan)."""
        x = np.asarray(x, float)
        if self.method == "isotonic":
            y = np.interp(x, np.asarray(self.params["x"], float), np.asarray(self.params["y"], float))
        else:
            s = self.direction * (x - float(self.params["centre"])) / float(self.params["scale"])
            y = logistic5(s, *[float(b) for b in self.params["b"]])
        y = np.where(np.isfinite(x), np.clip(y, LIKERT_MIN, LIKERT_MAX), np.nan)
        return y

    def apply_one(self, x: float) -> float:
        return float(self.apply(np.array([x]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "direction": self.direction, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LikertMap:
        return cls(str(d["method"]), int(d["direction"]), dict(d["params"]))


def fit_isotonic(x: np.ndarray, y: np.ndarray, direction: int) -> LikertMap:
    """Isotonic regression of ``y`` on ``x`` (non-decreasing for direction +1, non-increasing for
    -1); tied scores are pooled first. Knots: the first and last score of each constant block."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ux, inv = np.unique(x, return_inverse=True)
    w = np.bincount(inv).astype(float)
    my = np.bincount(inv, weights=y) / w
    fitted = optimize.isotonic_regression(my, weights=w, increasing=direction > 0).x
    keep = np.ones(len(ux), dtype=bool)
    if len(ux) > 2:  # inner points of a constant run add nothing to the linear interpolation
        same_prev = np.r_[False, fitted[1:] == fitted[:-1]]
        same_next = np.r_[fitted[:-1] == fitted[1:], False]
        keep = ~(same_prev & same_next)
    return LikertMap("isotonic", int(direction), {"x": [float(v) for v in ux[keep]],
                                                   "y": [float(v) for v in fitted[keep]]})


def fit_logistic(x: np.ndarray, y: np.ndarray, direction: int) -> LikertMap:
    """The 5-parameter logistic, monotone in ``direction``; ``CalibrationError`` when it does not fit."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    centre = float(np.median(x))
    scale = float(np.std(x)) or 1.0
    s = direction * (x - centre) / scale
    p0 = [max(float(np.ptp(y)), 0.5), 1.0, float(np.median(s)), 0.0, float(np.mean(y))]
    lo = [0.0, 0.0, float(s.min()) - 1.0, 0.0, -20.0]
    hi = [20.0, 50.0, float(s.max()) + 1.0, 10.0, 20.0]
    p0 = [min(max(v, a + 1e-9), b - 1e-9) for v, a, b in zip(p0, lo, hi)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)  # no covariance: not used here
            b, _ = optimize.curve_fit(logistic5, s, y, p0=p0, bounds=(lo, hi), maxfev=20000)
    except (RuntimeError, ValueError) as exc:
        raise CalibrationError(f"the logistic did not fit: {exc}") from None
    return LikertMap("logistic", int(direction), {"b": [float(v) for v in b], "centre": centre, "scale": scale})


FITTERS = {"isotonic": fit_isotonic, "logistic": fit_logistic}


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """The result of ``calibrate``: statistics (with CIs), the CV errors and the chosen map."""

    n_pairs: int
    n_groups: int
    n_dropped: int  # pairs without a finite score
    folds: int
    seed: int
    n_boot: int
    raw: dict[str, float]
    raw_ci: dict[str, tuple[float, float]]
    cv: dict[str, float]
    cv_ci: dict[str, tuple[float, float]]
    cv_rmse: dict[str, float]  # method -> out-of-fold RMSE (nan: the method failed in a fold)
    map: LikertMap
    oof: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))  # out-of-fold Likert of the chosen method

    @property
    def method(self) -> str:
        return self.map.method

    def statistics(self) -> dict[str, Any]:
        """JSON-ready statistics (nan -> None)."""

        def num(v):
            return None if v is None or not math.isfinite(v) else round(float(v), 6)

        def block(vals, ci):
            return {k: {"value": num(vals[k]), "ci95": [num(ci[k][0]), num(ci[k][1])]} for k in STATS}

        return {"raw": block(self.raw, self.raw_ci), "cross_validated": block(self.cv, self.cv_ci),
                "cv_rmse": {k: num(v) for k, v in self.cv_rmse.items()}, "folds": self.folds,
                "bootstrap": {"resamples": self.n_boot, "seed": self.seed, "unit": "series"},
                "n_pairs": self.n_pairs, "n_series": self.n_groups, "n_dropped": self.n_dropped}


def calibrate(scores: Sequence[float] | np.ndarray, ratings: Sequence[float] | np.ndarray,
              groups: Sequence | None = None, *, folds: int = DEFAULT_FOLDS, n_boot: int = DEFAULT_BOOTSTRAP,
              seed: int = 0, methods: Sequence[str] = METHODS) -> Calibration:
    """Statistics and the monotone map of ``scores`` against ``ratings`` (0-4); ``groups`` = the
    series of each pair (None: every pair independent). Pairs whose score is not finite are dropped
    (counted in ``n_dropped``). ``CalibrationError`` when the data cannot be calibrated."""
    x = np.asarray(scores, float)
    y = np.asarray(ratings, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f'Arguments "scores" and "ratings" must be 1-D of the same length, got {x.shape} and {y.shape}')
    for m in methods:
        if m not in FITTERS:
            raise ValueError(f'Argument "methods" must name {", ".join(METHODS)}, got {m!r}')
    if np.any(~np.isfinite(y)) or np.any((y < LIKERT_MIN) | (y > LIKERT_MAX)):
        raise ValueError('Argument "ratings" must be finite Likert scores in [0, 4]')
    ok = np.isfinite(x)
    n_dropped = int((~ok).sum())
    g = None if groups is None else [grp for grp, k in zip(groups, ok) if k]
    x, y = x[ok], y[ok]
    if len(x) < MIN_PAIRS:
        raise CalibrationError(f"{len(x)} rated image(s) with a score: at least {MIN_PAIRS} are needed")
    if np.ptp(x) == 0:
        raise CalibrationError("the score is the same on every rated image")
    if np.ptp(y) == 0:
        raise CalibrationError("every rated image has the same rating")
    fold_idx = group_kfold(g, len(x), folds, seed)
    codes, n_groups = _group_index(g, len(x))
    oof = {m: np.full(len(x), np.nan) for m in methods}
    for test in fold_idx:
        train = np.setdiff1d(np.arange(len(x)), test)
        d = direction_of(x[train], y[train])
        for m in methods:
            if np.ptp(x[train]) == 0:
                continue
            try:
                oof[m][test] = FITTERS[m](x[train], y[train], d).apply(x[test])
            except CalibrationError:
                pass  # this method's error is then nan: it cannot be chosen
    rmse = {m: (float(np.sqrt(np.mean((oof[m] - y) ** 2))) if np.all(np.isfinite(oof[m])) else math.nan)
            for m in methods}
    finite = [m for m in methods if math.isfinite(rmse[m])]
    if not finite:
        raise CalibrationError("no map could be fitted in every cross-validation fold")
    chosen = min(finite, key=lambda m: (rmse[m], methods.index(m)))
    final = FITTERS[chosen](x, y, direction_of(x, y))
    return Calibration(
        n_pairs=len(x), n_groups=n_groups, n_dropped=n_dropped, folds=len(fold_idx), seed=seed, n_boot=n_boot,
        raw=correlations(x, y), raw_ci=bootstrap_ci(x, y, g, n_boot=n_boot, seed=seed),
        cv=correlations(oof[chosen], y), cv_ci=bootstrap_ci(oof[chosen], y, g, n_boot=n_boot, seed=seed),
        cv_rmse=rmse, map=final, oof=oof[chosen])
