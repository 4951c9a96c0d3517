"""D2IQA trainer data: textured training phantoms (seeds apart from the held-out ones) and the
full-dose noise they get per sample."""

from __future__ import annotations

import numpy as np

from analysis.d2iqa_insert import WINDOW_HU, WINDOW_WIDTH_HU, InsertionConfig, render_objects
from analysis.training.d2iqa_train import (
    HELDOUT_PHANTOM_SEED0,
    MAX_PHANTOMS,
    PHANTOM_FULL_NOISE_HU,
    TRAIN_PHANTOM_SEED0,
    TrainSlice,
    make_sample,
    make_training_phantoms,
)


def test_training_phantoms_are_deterministic_and_never_the_heldout_seeds() -> None:
    a = make_training_phantoms(4, size=96)
    b = make_training_phantoms(4, size=96)
    assert [s.kind for s in a] == ["body", "head", "body", "head"]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.hu, y.hu)
        assert x.spacing_mm == y.spacing_mm and x.key == y.key
    assert not np.array_equal(a[0].hu, a[2].hu)
    # every seed a training run can use lies below the first held-out seed of bench/d2iqa_eval.py
    assert TRAIN_PHANTOM_SEED0 + MAX_PHANTOMS <= HELDOUT_PHANTOM_SEED0
    seeds = {int(s.key.split(":")[1]) for s in a}
    assert seeds == {TRAIN_PHANTOM_SEED0 + k for k in range(4)}


def _flat_head(n: int = 128, value: float = 40.0) -> TrainSlice:
    yy, xx = np.mgrid[:n, :n]
    hu = np.where(np.hypot(xx - n / 2, yy - n / 2) < 0.47 * n, value, -1000.0).astype(np.float32)
    s = TrainSlice(hu, 0.5, float("nan"), "flat", "flat:0", kind="head")
    s._noise = np.random.default_rng(0).standard_normal(hu.shape).astype(np.float32) * 1000.0  # unit SD 1000 HU
    return s


def _noise_sd(img01: np.ndarray, objects, value: float = 40.0) -> float:
    hu = img01 * WINDOW_WIDTH_HU + WINDOW_HU[0] - render_objects(img01.shape, objects)
    tissue = np.abs(hu - value) < 200  # inside the disc (the noise is a few tens of HU at most)
    return float((hu[tissue] - value).std())


def test_phantom_full_dose_noise_follows_the_prior() -> None:
    s = _flat_head()
    rng = np.random.default_rng(1)
    lo, hi = PHANTOM_FULL_NOISE_HU["head"]
    # min_dose = 1: every sample is at full dose, so its noise SD is the drawn full-dose SD
    sds = [_noise_sd(*make_sample(s, rng, 64, InsertionConfig(), 0.0, 1.0)) for _ in range(40)]
    assert min(sds) >= 0.95 * lo and max(sds) <= 1.05 * hi, (min(sds), max(sds))
    assert max(sds) / min(sds) > 1.8  # log-uniform over the range, not one fixed level
    # lower doses add noise: the SD reaches past the full-dose range but never below it
    sds_low = [_noise_sd(*make_sample(s, rng, 64, InsertionConfig(), 0.0, 0.04)) for _ in range(40)]
    assert min(sds_low) >= 0.95 * lo and max(sds_low) > hi
    assert max(sds_low) <= 1.05 * hi / np.sqrt(0.04)
