"""Lower-dose CT simulation from a routine-dose slice (projection-domain Poisson noise insertion).

Physics (../shared/REFERENCE.md section 3)
------------------------------------------
A routine-dose slice in HU is turned into linear attenuation ``mu = mu_water * (1 + HU/1000)``
(clipped at 0), forward projected with a 2D parallel-beam projector (``n_views`` views over 180
degrees, detector bin = pixel size) into line integrals ``p``. A scan at ``I0`` incident photons
per ray gives counts ``I ~ Poisson(I0 exp(-p))`` and measured line integrals ``p' = -ln(I / I0)``.
Only the *noise-only* sinogram ``p' - p`` is reconstructed (filtered back projection, ramp filter
with a Hann window whose cut-off is set in mm^-1 so the noise texture resembles a standard body
kernel, not a sharp Ram-Lak one) and added to the image in HU.

The slice already carries its own full-dose noise (at ``I0_full``). Variances add, so reaching the
dose fraction ``d`` needs ADDED noise at ``I0_add = I0_full * d / (1 - d)``:
``1/(d I0_full) = 1/I0_full + 1/I0_add``. The added noise SD is therefore proportional to
``sqrt((1 - d) / d)``. ``I0_full`` is calibrated per series with :func:`calibrate_i0` so that noise
simulated at ``I0_full`` matches the noise measured in the series (:func:`estimate_noise_hu`).

Speed: the projector and the FBP are batched torch ``grid_sample`` calls (one for all views of a
batch of slices); the sampling grids are cached per geometry. In the default ``"gaussian"`` mode the
Poisson noise is replaced by its Gaussian approximation (variance ``exp(p) / I0``; the two agree
within a few per cent at CT count levels), so a single unit-``I0`` noise realisation can be
rescaled to any dose (:func:`unit_noise`); ``"poisson"`` draws real Poisson counts per dose.

Limitations (say so wherever results are reported): parallel-beam re-projection of a reconstructed
image approximates the scanner's fan/helical geometry, bowtie filter and tube-current modulation;
electronic noise is optional and off by default; the reconstruction kernel is approximated by one
Hann-windowed ramp.

Public API
----------
``simulate_low_dose(hu, doses, i0_full, pixel_spacing_mm=..., rng=..., ...) -> (len(doses), [B,] H, W)``
``simulate_noise(hu, i0, pixel_spacing_mm=..., rng=..., ...) -> noise HU, same shape as hu``
``unit_noise(hu, pixel_spacing_mm=..., rng=..., n_realisations=1, ...) -> noise HU at I0 = 1``
``added_i0(i0_full, dose) -> float``
``calibrate_i0(hu_slices, measured_noise_hu, pixel_spacing_mm=..., rng=...) -> float``
``estimate_noise_hu(hu, pixel_spacing_mm) -> float`` (global noise, Christianson-style mode)
``DOSE_LEVELS = (0.05, 0.10, 0.25, 0.50, 0.75)``
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

log = logging.getLogger(__name__)

DOSE_LEVELS: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50, 0.75)
MU_WATER_PER_MM = 0.019  # linear attenuation of water at about 70 keV, 1/mm
DEFAULT_N_VIEWS = 360
DEFAULT_CUTOFF_PER_MM = 1.0  # Hann window cut-off of the ramp filter; NPS peaks near 0.3 * cut-off
DEFAULT_I0_FULL = 2.0e6  # a head/body routine-dose order of magnitude in this geometry (see module doc)


@dataclass(frozen=True)
class Geometry:
    """Parallel-beam geometry for a square ``size`` x ``size`` image."""

    size: int
    pixel_mm: float
    n_views: int = DEFAULT_N_VIEWS
    cutoff_per_mm: float = DEFAULT_CUTOFF_PER_MM

    @property
    def n_det(self) -> int:
        n = int(math.ceil(self.size * math.sqrt(2.0)))
        return n + (n % 2 != self.size % 2)  # same parity as size keeps the centres aligned


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_spacing(pixel_spacing_mm: float | Sequence[float]) -> float:
    if isinstance(pixel_spacing_mm, (int, float, np.floating)):
        ps = float(pixel_spacing_mm)
    else:
        vals = [float(v) for v in pixel_spacing_mm]
        if len(vals) != 2 or abs(vals[0] - vals[1]) > 1e-3 * max(vals):
            raise ValueError(
                f'Argument "pixel_spacing_mm" must be one value or two equal values (square pixels), got {vals}'
            )
        ps = vals[0]
    if not (ps > 0 and math.isfinite(ps)):
        raise ValueError(f'Argument "pixel_spacing_mm" must be > 0, got {pixel_spacing_mm}')
    return ps


@functools.lru_cache(maxsize=16)
def _projection_grid(size: int, n_det: int, n_views: int) -> torch.Tensor:
    """(n_views, n_det, n_det, 2) grid_sample coordinates: for view k, row = ray (detector bin),
    column = position along the ray, in the normalised coordinates of the padded image."""
    theta = torch.arange(n_views, dtype=torch.float64) * (math.pi / n_views)
    # detector coordinate t and along-ray coordinate s in pixel units, centred
    c = (torch.arange(n_det, dtype=torch.float64) - (n_det - 1) / 2.0)
    t = c.view(1, n_det, 1)
    s = c.view(1, 1, n_det)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    x = t * cos - s * sin
    y = t * sin + s * cos
    half = size / 2.0  # align_corners=False: pixel centres at (i + 0.5) / size * 2 - 1
    grid = torch.stack((x / half, y / half), dim=-1)
    return grid.to(torch.float32)


@functools.lru_cache(maxsize=16)
def _backprojection_grid(size: int, n_det: int, n_views: int) -> torch.Tensor:
    """(1, n_views, size*size, 2) coordinates into a (n_views, n_det) sinogram image."""
    theta = torch.arange(n_views, dtype=torch.float64) * (math.pi / n_views)
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    t = xx.reshape(1, -1) * torch.cos(theta).view(-1, 1) + yy.reshape(1, -1) * torch.sin(theta).view(-1, 1)
    det_norm = t / ((n_det - 1) / 2.0)  # align_corners=True over detector bins
    view_norm = (torch.arange(n_views, dtype=torch.float64) / max(n_views - 1, 1) * 2 - 1).view(-1, 1)
    view_norm = view_norm.expand_as(det_norm)
    grid = torch.stack((det_norm, view_norm), dim=-1).unsqueeze(0)
    return grid.to(torch.float32)


@functools.lru_cache(maxsize=16)
def _filter(n_det: int, pixel_mm: float, cutoff_per_mm: float) -> tuple[torch.Tensor, int]:
    n_fft = 1 << int(math.ceil(math.log2(2 * n_det)))
    f = torch.fft.rfftfreq(n_fft, d=pixel_mm).to(torch.float64)  # cycles/mm
    window = torch.where(f < cutoff_per_mm, 0.5 * (1 + torch.cos(math.pi * f / cutoff_per_mm)), 0.0)
    return (f.abs() * window).to(torch.float32), n_fft


def forward_project(mu: torch.Tensor, geom: Geometry, view_chunk: int = 60) -> torch.Tensor:
    """Line integrals of ``mu`` (B, H, W) in 1/mm -> sinogram (B, n_views, n_det), dimensionless."""
    b = mu.shape[0]
    grid = _projection_grid(geom.size, geom.n_det, geom.n_views)
    out = torch.empty(b, geom.n_views, geom.n_det, dtype=torch.float32)
    img = mu.unsqueeze(1).to(torch.float32)
    for v0 in range(0, geom.n_views, view_chunk):
        g = grid[v0 : v0 + view_chunk]
        nv = g.shape[0]
        g = g.reshape(1, nv * geom.n_det, geom.n_det, 2).expand(b, -1, -1, -1)
        samp = F.grid_sample(img, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        out[:, v0 : v0 + nv] = samp.view(b, nv, geom.n_det, geom.n_det).sum(-1) * geom.pixel_mm
    return out


def filtered_back_projection(sino: torch.Tensor, geom: Geometry, view_chunk: int = 90) -> torch.Tensor:
    """Sinogram (B, n_views, n_det) -> image (B, size, size) in the units of ``sino`` per mm."""
    b = sino.shape[0]
    filt, n_fft = _filter(geom.n_det, geom.pixel_mm, geom.cutoff_per_mm)
    q = torch.fft.irfft(torch.fft.rfft(sino.to(torch.float32), n=n_fft, dim=-1) * filt, n=n_fft, dim=-1)
    q = q[..., : geom.n_det].contiguous()
    grid = _backprojection_grid(geom.size, geom.n_det, geom.n_views)
    acc = torch.zeros(b, geom.size * geom.size, dtype=torch.float32)
    for v0 in range(0, geom.n_views, view_chunk):
        v1 = min(v0 + view_chunk, geom.n_views)
        sub = q[:, v0:v1].unsqueeze(1)  # (b, 1, nv, n_det)
        g = grid[:, v0:v1]
        nv = v1 - v0
        # renormalise the view coordinate to this chunk's rows
        g = g.clone()
        g[..., 1] = (torch.arange(nv, dtype=torch.float32) / max(nv - 1, 1) * 2 - 1).view(1, nv, 1)
        samp = F.grid_sample(sub, g.expand(b, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=True)
        acc += samp.view(b, nv, -1).sum(1)
    return (acc * (math.pi / geom.n_views)).view(b, geom.size, geom.size)


def _as_batch(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    arr = np.asarray(hu, dtype=np.float32)
    if arr.ndim == 2:
        return arr[None], True
    if arr.ndim == 3:
        return arr, False
    raise ValueError(f'Argument "hu" must be (H, W) or (B, H, W), got shape {arr.shape}')


def _pad_square(hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    b, h, w = hu.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    if h == w:
        return hu, (0, 0, h, w)
    out = np.full((b, n, n), -1000.0, dtype=np.float32)
    out[:, top : top + h, left : left + w] = hu
    return out, (top, left, h, w)


def _sinogram(hu_sq: np.ndarray, geom: Geometry) -> torch.Tensor:
    mu = torch.from_numpy(np.clip(hu_sq / 1000.0 + 1.0, 0.0, None) * MU_WATER_PER_MM).to(torch.float32)
    return forward_project(mu, geom)


def unit_noise(
    hu: np.ndarray,
    *,
    pixel_spacing_mm: float | Sequence[float],
    rng: np.random.Generator | int | None = None,
    n_realisations: int = 1,
    n_views: int = DEFAULT_N_VIEWS,
    cutoff_per_mm: float = DEFAULT_CUTOFF_PER_MM,
) -> np.ndarray:
    """Gaussian-approximation projection noise at ``I0 = 1`` in HU: (n_realisations, [B,] H, W).

    Noise at any ``I0`` is ``unit_noise / sqrt(I0)``; this is what makes a per-slice cache of noise
    realisations reusable across doses."""
    if n_realisations < 1:
        raise ValueError(f'Argument "n_realisations" must be >= 1, got {n_realisations}')
    ps = _check_spacing(pixel_spacing_mm)
    gen = _rng(rng)
    batch, single = _as_batch(hu)
    sq, (top, left, h, w) = _pad_square(batch)
    geom = Geometry(sq.shape[-1], ps, n_views, cutoff_per_mm)
    p = _sinogram(sq, geom)  # (B, V, D)
    sd = torch.exp(0.5 * p)  # per-ray SD of p' at I0 = 1 (variance exp(p) / I0)
    z = torch.from_numpy(gen.standard_normal((n_realisations,) + tuple(sd.shape), dtype=np.float32))
    noise_sino = (z * sd.unsqueeze(0)).reshape(-1, geom.n_views, geom.n_det)
    rec = filtered_back_projection(noise_sino, geom)  # 1/mm
    rec_hu = (rec * (1000.0 / MU_WATER_PER_MM)).numpy().reshape(n_realisations, batch.shape[0], geom.size, geom.size)
    rec_hu = rec_hu[..., top : top + h, left : left + w]
    return rec_hu[:, 0] if single else rec_hu


def simulate_noise(
    hu: np.ndarray,
    i0: float,
    *,
    pixel_spacing_mm: float | Sequence[float],
    rng: np.random.Generator | int | None = None,
    method: str = "gaussian",
    electronic_noise: float = 0.0,
    n_views: int = DEFAULT_N_VIEWS,
    cutoff_per_mm: float = DEFAULT_CUTOFF_PER_MM,
) -> np.ndarray:
    """Noise image (HU, same shape as ``hu``) of a scan at ``i0`` photons per ray.

    ``method="gaussian"``: variance ``exp(p)/i0`` per ray; ``"poisson"``: real Poisson counts
    (plus Gaussian electronic noise of SD ``electronic_noise`` counts), ``-ln(I/i0) - p``."""
    if not (i0 > 0 and math.isfinite(i0)):
        raise ValueError(f'Argument "i0" must be a finite value > 0, got {i0}')
    if method == "gaussian" and electronic_noise == 0.0:
        return unit_noise(
            hu, pixel_spacing_mm=pixel_spacing_mm, rng=rng, n_views=n_views, cutoff_per_mm=cutoff_per_mm
        )[0] / math.sqrt(i0)
    if method not in ("gaussian", "poisson"):
        raise ValueError(f'Argument "method" must be "gaussian" or "poisson", got {method!r}')
    ps = _check_spacing(pixel_spacing_mm)
    gen = _rng(rng)
    batch, single = _as_batch(hu)
    sq, (top, left, h, w) = _pad_square(batch)
    geom = Geometry(sq.shape[-1], ps, n_views, cutoff_per_mm)
    p = _sinogram(sq, geom).numpy().astype(np.float64)
    mean = i0 * np.exp(-p)
    if method == "poisson":
        counts = gen.poisson(mean).astype(np.float64)
    else:
        counts = mean + np.sqrt(mean) * gen.standard_normal(mean.shape)
    if electronic_noise > 0:
        counts = counts + electronic_noise * gen.standard_normal(mean.shape)
    counts = np.maximum(counts, 0.5)  # photon starvation floor: avoids log(0)
    noise_sino = torch.from_numpy((-np.log(counts / i0) - p).astype(np.float32))
    rec = filtered_back_projection(noise_sino, geom).numpy() * (1000.0 / MU_WATER_PER_MM)
    rec = rec[:, top : top + h, left : left + w]
    return rec[0] if single else rec


def added_i0(i0_full: float, dose: float) -> float:
    """Incident counts of the noise to ADD to a full-dose image to reach dose fraction ``dose``."""
    if not (0.0 < dose <= 1.0):
        raise ValueError(f'Argument "dose" must be in (0, 1], got {dose}')
    if not (i0_full > 0 and math.isfinite(i0_full)):
        raise ValueError(f'Argument "i0_full" must be a finite value > 0, got {i0_full}')
    return math.inf if dose == 1.0 else i0_full * dose / (1.0 - dose)


def simulate_low_dose(
    hu: np.ndarray,
    doses: Sequence[float] = DOSE_LEVELS,
    i0_full: float = DEFAULT_I0_FULL,
    *,
    pixel_spacing_mm: float | Sequence[float],
    rng: np.random.Generator | int | None = None,
    method: str = "gaussian",
    shared_realisation: bool = False,
    n_views: int = DEFAULT_N_VIEWS,
    cutoff_per_mm: float = DEFAULT_CUTOFF_PER_MM,
) -> np.ndarray:
    """Simulated lower-dose versions of a routine-dose slice or batch, in HU.

    hu: (H, W) or (B, H, W) full-dose HU. doses: fractions in (0, 1]; 1 returns the input.
    Returns float32 (len(doses), H, W) or (len(doses), B, H, W).

    ``shared_realisation=True`` (gaussian only) scales ONE noise realisation to every dose (cheap,
    and the doses of one slice then differ only in noise amplitude); otherwise each dose gets an
    independent realisation."""
    doses = [float(d) for d in doses]
    if not doses:
        raise ValueError('Argument "doses" must not be empty')
    scale = []
    for d in doses:
        i0a = added_i0(i0_full, d)
        scale.append(0.0 if math.isinf(i0a) else 1.0 / math.sqrt(i0a))
    base = np.asarray(hu, dtype=np.float32)
    _as_batch(base)
    out = np.empty((len(doses),) + base.shape, dtype=np.float32)
    needs = [k for k, s in enumerate(scale) if s > 0]
    if method == "gaussian":
        n_real = 1 if shared_realisation else len(needs)
        if needs:
            un = unit_noise(
                base, pixel_spacing_mm=pixel_spacing_mm, rng=rng, n_realisations=n_real,
                n_views=n_views, cutoff_per_mm=cutoff_per_mm,
            )
        for k in range(len(doses)):
            if scale[k] == 0.0:
                out[k] = base
            else:
                j = 0 if shared_realisation else needs.index(k)
                out[k] = base + un[j] * scale[k]
        return out
    if method != "poisson":
        raise ValueError(f'Argument "method" must be "gaussian" or "poisson", got {method!r}')
    gen = _rng(rng)
    for k, d in enumerate(doses):
        if scale[k] == 0.0:
            out[k] = base
        else:
            out[k] = base + simulate_noise(
                base, added_i0(i0_full, d), pixel_spacing_mm=pixel_spacing_mm, rng=gen, method="poisson",
                n_views=n_views, cutoff_per_mm=cutoff_per_mm,
            )
    return out


def _local_sd(img: np.ndarray, k: int) -> np.ndarray:
    m = ndimage.uniform_filter(img.astype(np.float64), k)
    m2 = ndimage.uniform_filter(img.astype(np.float64) ** 2, k)
    return np.sqrt(np.maximum(m2 - m * m, 0.0))


def estimate_noise_hu(
    hu: np.ndarray, pixel_spacing_mm: float | Sequence[float], *, tissue_range_hu: tuple[float, float] = (0.0, 150.0)
) -> float:
    """Global noise (Christianson et al. 2015 style): mode of the local-SD histogram over soft-tissue
    pixels, kernel ``1 + round(6 mm / pixel)``. Returns nan when there is too little soft tissue."""
    ps = _check_spacing(pixel_spacing_mm)
    batch, _ = _as_batch(hu)
    k = 1 + int(round(6.0 / ps))
    vals = []
    for img in batch:
        sd = _local_sd(img, k)
        tissue = (img >= tissue_range_hu[0]) & (img <= tissue_range_hu[1])
        tissue = ndimage.binary_erosion(tissue, iterations=max(1, k // 2))
        vals.append(sd[tissue])
    allv = np.concatenate(vals) if vals else np.empty(0)
    if allv.size < 200:
        return float("nan")
    hi = float(np.percentile(allv, 99))
    hist, edges = np.histogram(allv, bins=np.arange(0.0, hi + 0.25, 0.25))
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def calibrate_i0(
    hu_slices: np.ndarray,
    measured_noise_hu: float | None = None,
    *,
    pixel_spacing_mm: float | Sequence[float],
    rng: np.random.Generator | int | None = 0,
    n_views: int = DEFAULT_N_VIEWS,
    cutoff_per_mm: float = DEFAULT_CUTOFF_PER_MM,
    max_slices: int = 4,
) -> float:
    """I0_full such that noise simulated at I0_full has the global noise measured in the series.

    hu_slices: (H, W) or (B, H, W) routine-dose HU (a few representative slices are enough; at most
    ``max_slices`` evenly spaced ones are used). measured_noise_hu: the series' global noise; when
    None it is estimated with :func:`estimate_noise_hu`. The simulated noise is measured the same
    way (mode of local SD over the same soft-tissue pixels) so the two are comparable."""
    batch, _ = _as_batch(hu_slices)
    if batch.shape[0] > max_slices:
        idx = np.linspace(0, batch.shape[0] - 1, max_slices).round().astype(int)
        batch = batch[idx]
    ps = _check_spacing(pixel_spacing_mm)
    if measured_noise_hu is None:
        measured_noise_hu = estimate_noise_hu(batch, ps)
    if not (measured_noise_hu is not None and math.isfinite(measured_noise_hu) and measured_noise_hu > 0):
        raise ValueError(
            f'Argument "measured_noise_hu" must be > 0 (or estimable from soft tissue), got {measured_noise_hu}; '
            "pass the series noise explicitly"
        )
    un = unit_noise(batch, pixel_spacing_mm=ps, rng=rng, n_views=n_views, cutoff_per_mm=cutoff_per_mm)[0]
    k = 1 + int(round(6.0 / ps))
    vals = []
    for img, nz in zip(batch, un):
        tissue = (img >= 0.0) & (img <= 150.0)
        tissue = ndimage.binary_erosion(tissue, iterations=max(1, k // 2))
        if tissue.sum() < 100:
            tissue = img > -500.0
        vals.append(_local_sd(nz, k)[tissue])
    unit_sd = float(np.median(np.concatenate(vals)))
    i0 = (unit_sd / float(measured_noise_hu)) ** 2
    log.debug("calibrate_i0: unit SD %.4g HU, measured %.3g HU -> I0 %.3g", unit_sd, measured_noise_hu, i0)
    return i0
