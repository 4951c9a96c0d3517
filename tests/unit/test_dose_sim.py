"""Projection-domain low-dose simulation: noise amplitude vs dose, noise texture, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.training import dose_sim
from analysis.training.phantoms import make_phantom

N = 128
PS = 1.5  # mm: a 19 cm field of view
VIEWS = 180


def _water(radius_px: float = 50.0) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2.0
    return np.where(xx**2 + yy**2 <= radius_px**2, 0.0, -1000.0).astype(np.float32)


def _central(r: float = 30.0) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N] - (N - 1) / 2.0
    return xx**2 + yy**2 <= r**2


def test_added_noise_sd_follows_sqrt_1_minus_d_over_d_poisson() -> None:
    water = _water()
    out = dose_sim.simulate_low_dose(
        water, dose_sim.DOSE_LEVELS, 1.0e6, pixel_spacing_mm=PS, rng=1, method="poisson", n_views=VIEWS
    )
    assert out.shape == (5, N, N)
    m = _central()
    sd = np.array([(o - water)[m].std() for o in out])
    expect = np.sqrt([(1 - d) / d for d in dose_sim.DOSE_LEVELS])
    ratio = sd / expect
    # the proportionality constant is the full-dose noise: same for every dose within 10 %
    assert np.all(np.abs(ratio / np.median(ratio) - 1.0) < 0.10), ratio
    # and it is the noise a scan at I0_full gives (independent simulation, Gaussian approximation)
    full = dose_sim.simulate_noise(water, 1.0e6, pixel_spacing_mm=PS, rng=2, n_views=VIEWS)
    assert abs(np.median(ratio) / full[m].std() - 1.0) < 0.10


def test_full_dose_returns_input_and_batch_shape() -> None:
    water = _water()
    batch = np.stack([water, water + 10])
    out = dose_sim.simulate_low_dose(batch, (0.25, 1.0), 1.0e6, pixel_spacing_mm=PS, rng=0, n_views=VIEWS)
    assert out.shape == (2, 2, N, N)
    np.testing.assert_array_equal(out[1], batch)
    assert (out[0] - batch).std() > 1.0


def test_noise_power_spectrum_is_ramp_like_not_white() -> None:
    water = _water(60.0)
    noise = dose_sim.unit_noise(water, pixel_spacing_mm=PS, rng=3, n_realisations=8, n_views=VIEWS)
    roi = noise[:, 40:88, 40:88].astype(np.float64)
    roi = roi - roi.mean(axis=(1, 2), keepdims=True)
    nps = (np.abs(np.fft.fftshift(np.fft.fft2(roi), axes=(1, 2))) ** 2).mean(0)
    n = roi.shape[-1]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.sqrt(xx**2 + yy**2).round().astype(int)
    radial = np.bincount(r.ravel(), nps.ravel()) / np.bincount(r.ravel())
    radial = radial[: n // 2]
    peak = radial.max()
    assert radial[0] < 0.1 * peak  # ~0 at f = 0 (white noise would be ~peak there)
    assert radial[1] < 0.35 * peak
    assert radial[1] < radial[3] < radial[6]  # rising from the origin
    assert int(np.argmax(radial)) >= 5


def test_calibrate_i0_recovers_the_i0_of_known_noise() -> None:
    hu, ps = make_phantom("body", N, np.random.default_rng(5))
    i0_true = 5.0e5
    noisy = hu + dose_sim.simulate_noise(hu, i0_true, pixel_spacing_mm=ps, rng=6, n_views=VIEWS)
    sd = float(np.median([dose_sim.simulate_noise(hu, i0_true, pixel_spacing_mm=ps, rng=s, n_views=VIEWS)[(hu > 0) & (hu < 150)].std() for s in (7, 8)]))
    i0 = dose_sim.calibrate_i0(noisy, sd, pixel_spacing_mm=ps, rng=9, n_views=VIEWS)
    assert 0.6 * i0_true < i0 < 1.6 * i0_true


def test_fbp_recovers_attenuation_of_water() -> None:
    import torch

    water = _water()
    geom = dose_sim.Geometry(N, PS, VIEWS, cutoff_per_mm=100.0)
    mu = torch.from_numpy(np.clip(water / 1000 + 1, 0, None) * dose_sim.MU_WATER_PER_MM)[None].float()
    rec = dose_sim.filtered_back_projection(dose_sim.forward_project(mu, geom), geom)[0].numpy()
    assert abs(rec[_central(25.0)].mean() / dose_sim.MU_WATER_PER_MM - 1.0) < 0.04
    assert abs(rec[:8, :8].mean()) < 0.002


@pytest.mark.parametrize("dose", [0.0, -0.1, 1.5])
def test_rejects_bad_dose(dose: float) -> None:
    with pytest.raises(ValueError, match="dose"):
        dose_sim.simulate_low_dose(_water(), (dose,), 1e6, pixel_spacing_mm=PS)


def test_rejects_bad_spacing_and_shape() -> None:
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        dose_sim.unit_noise(_water(), pixel_spacing_mm=-1.0)
    with pytest.raises(ValueError, match="hu"):
        dose_sim.unit_noise(np.zeros(5, np.float32), pixel_spacing_mm=1.0)


def test_phantoms_have_tissue_classes_and_spacing() -> None:
    for kind in ("body", "head"):
        hu, ps = make_phantom(kind, 128, 3)
        assert hu.dtype == np.float32 and hu.shape == (128, 128)
        assert 0.3 < ps < 4.0
        assert (hu < -900).mean() > 0.1  # air around the patient
        assert ((hu > 0) & (hu < 100)).mean() > 0.05  # soft tissue / brain
        assert (hu > 400).any()  # bone
    with pytest.raises(ValueError, match="kind"):
        make_phantom("leg", 128, 0)
