"""SSIM map: equal to scikit-image's Gaussian SSIM (full=True) within 1e-4; torch version agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from analysis.training.phantoms import make_phantom
from analysis.ssim import ssim_map, ssim_map_torch, window_hu, window_size


def _skimage_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return structural_similarity(a, b, full=True, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)[1]


def _pair() -> tuple[np.ndarray, np.ndarray]:
    hu, _ = make_phantom("head", 96, 4)
    rng = np.random.default_rng(0)
    a = window_hu(hu + rng.normal(0, 5, hu.shape))
    b = window_hu(hu + rng.normal(0, 25, hu.shape))
    return a, b


def test_matches_skimage_on_windowed_ct() -> None:
    a, b = _pair()
    ref = _skimage_map(a.astype(np.float64), b.astype(np.float64))
    ours = ssim_map(a, b)
    assert ours.shape == a.shape
    assert np.abs(ours - ref).max() < 1e-4
    assert ref.min() < 0.5  # the noisy pair is far from identical: the check is not trivial


def test_torch_matches_numpy_and_is_differentiable() -> None:
    a, b = _pair()
    ta = torch.tensor(np.stack([a, b]))
    tb = torch.tensor(np.stack([b, a]), requires_grad=True)
    m = ssim_map_torch(ta, tb)
    assert m.shape == (2,) + a.shape
    np.testing.assert_allclose(m[0].detach().numpy(), _skimage_map(a.astype(np.float64), b.astype(np.float64)), atol=1e-4)
    m.mean().backward()
    assert tb.grad is not None and torch.isfinite(tb.grad).all()


def test_identical_images_give_one_and_window() -> None:
    a, _ = _pair()
    assert np.allclose(ssim_map(a, a), 1.0, atol=1e-6)
    assert window_size() == 11
    np.testing.assert_allclose(window_hu(np.array([-110.0, 40.0, 190.0, -1000.0, 3000.0])), [0, 0.5, 1, 0, 1], atol=1e-6)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ssim_map(np.zeros((8, 8)), np.zeros((8, 9)))
