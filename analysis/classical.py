"""Classical patient-based CT image-quality metrics: global noise, WED, SSDE, NPS, tissue HU.

These are the measurements medical physicists already use for patient-based CT QA; every learned
model is compared with them. One call of :func:`run` measures a loaded series (``CTVolume``).

Global noise (Christianson et al., AJR 2015;205:W93-W99; "Duke" variant, as in REFERENCE.md 2)
    1. Local SD map: the sample SD of the HU values in a square kernel of ``1 + round(6 mm /
       pixel spacing)`` pixels per axis (14 px at 0.45 mm, 10 px at 0.66 mm), computed with running
       means (``scipy.ndimage.uniform_filter``). Even kernels are centred half a pixel off, which
       does not matter for a histogram.
    2. Soft-tissue pixels: inside the body mask (``analysis.mask``) with 0 <= HU <= 150.
    3. Histogram of their local SD (on a regular 2x2 subsample of the pixels when a slice has more
       than 50000 of them: the SD field is smooth over the kernel) with fine bins (0.05 HU, or
       0.5 % of the median local SD when that is larger), smoothed with a Gaussian of 1.5 % of
       the median local SD, at least 0.1 HU and at least a quarter of the spread of the lower half
       of the values (the width of the noise peak itself, so that the mode of a broad peak is not
       histogram noise); the mode is the centre of the highest bin. This plain Christianson value
       is kept per slice as ``slice_metrics["global_noise_mode_hu"]``.
    4. Peak correction: the local SD of a uniform region is (close to) chi-distributed, and the
       mode of a chi distribution with nu degrees of freedom lies below its RMS by sqrt(1 - 1/nu).
       For white noise in a 6 mm kernel nu is about the pixel count (a 0.5 % effect), but CT noise
       is correlated and nu falls to about 10-20: the plain mode then reads 3-6 % low. nu is read
       from the peak itself: its left half width at half maximum r (relative to the mode; the right
       side carries edges and anatomy; the smoothing is removed in quadrature) fixes nu through
       ln t - (t^2 - 1)/2 = -ln 2 / (nu - 1) with t = 1 - r, and the slice value is
       ``global_noise_hu = mode * sqrt(nu / (nu - 1))`` (capped at x1.1). On white noise this
       changes the mode by < 0.5 %. Not corrected: a local 6 mm mean also absorbs part of very
       low-frequency ("blotchy") noise; for noise smoothed by a Gaussian of 0.8 px this leaves the
       value about 4 % (up to 6 %) low. For CT-like (ramp-filtered) noise it is about 1 %.
    5. Series global noise = median of the slice values (the issue's definition; Christianson's
       Wisconsin variant pools all slices in one histogram instead).
    Not measurable in a slice (``nan`` there; never a number from too few pixels) when fewer than
    ``MIN_TISSUE_AREA_MM2`` (1000 mm^2, i.e. about 28 kernels of 6 mm x 6 mm: 4900 pixels at
    0.45 mm, 2290 at 0.66 mm) of its soft-tissue pixels have their whole kernel in soft tissue
    (local mean in 0-150 HU and no pixel of the kernel outside -300..400 HU, i.e. no air, lung or
    bone in it). Partial-volume edges of bone and air fall in 0-150 HU too; a slice made only of
    such edges (the air-filled skull phantom) would otherwise give a confident mode of several
    hundred HU, or a mode inflated by edges from a few hundred pixels of insert. Also not
    measurable when the mode is not a real peak (fewer than ``MIN_MODE_SUPPORT``,
    10 %, of the soft-tissue pixels within +/-15 % of it). The series value is absent, with the
    reason, when no slice is measurable.

Water-equivalent diameter (AAPM TG-220)
    A_w = sum over body-mask pixels of max(HU/1000 + 1, 0) * pixel area; D_w = 2 sqrt(A_w / pi),
    per slice, in cm. Series value: mean over slices with a body. The clip at 0 only affects
    interior air below -1000 HU (no negative attenuation).

SSDE (AAPM TG-204 / TG-220)
    SSDE = f(D_w) * CTDIvol with f = a exp(-b D_w[cm]); 32 cm phantom a = 3.704369, b = 0.03671937;
    16 cm phantom a = 1.874799, b = 0.03871313. CTDIvol is (0018,9345) per slice. The phantom is
    taken from CTDIPhantomTypeCodeSequence (DCM 113691 IEC Body -> 32 cm, 113690 IEC Head -> 16 cm),
    else from BodyPartExamined (HEAD, BRAIN, SKULL -> 16 cm), else 32 cm; ``info["ssde_phantom"]``
    and ``info["ssde_phantom_source"]`` say which. No CTDIvol means no SSDE (``None`` with a reason).
    Series values: means over the slices that have them.

Noise power spectrum (AAPM TG-233)
    Square ROIs of 64 px (pixel spacing below 0.6 mm) or 32 px, on a half-overlapping grid, chosen
    automatically: fully inside the body, every pixel within -300..400 HU, the local mean (6 mm
    kernel) within -100..200 HU everywhere (soft tissue), and flat: the local mean varies across
    the ROI by at most 10 HU + 1 x the ROI's mean local SD (no edge or organ boundary). Candidates
    are ranked by that flatness (never by their noise, which would bias the NPS low) and the
    flattest non-overlapping ones are kept: at most ``NPS_MAX_ROIS_PER_SLICE`` per slice, on at
    most ``NPS_MAX_SLICES`` evenly spread slices. Fewer than ``NPS_MIN_ROIS`` (4) ROIs in the
    series: no NPS (absent with the reason; one ROI of a patient mostly measures anatomy). Each
    ROI minus its 2nd-order 2D polynomial fit;
    NPS(u, v) = dx dy / (Nx Ny) <|FFT2(ROI - fit)|^2>; radial average in bins of 1/(N dx);
    f_peak = argmax (refined by a parabola through the three bins around it), f_avg =
    sum(f NPS) / sum(NPS), in mm^-1; noise magnitude = sqrt(integral of the 2D NPS) in HU.

Tissue HU
    ``mean_hu_tissue`` / ``sd_hu_tissue``: mean and SD of body pixels within -150..300 HU (fat,
    water, soft tissue, blood; not air, lung or bone), pooled over the series.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from analysis.mask import box_erode, volume_body_masks
from analysis.results import MapOutput, ModelOutput, RunContext
from analysis.volume import CTVolume

log = logging.getLogger(__name__)

ALGORITHM = "CTQA classical patient-based metrics (global noise, WED, SSDE, NPS)"
VERSION = "1.0"

NOISE_KERNEL_MM = 6.0
TISSUE_NOISE_RANGE_HU = (0.0, 150.0)
MIN_TISSUE_AREA_MM2 = 1000.0
MIN_MODE_SUPPORT = 0.10
SOFT_WINDOW_RANGE_HU = (-300.0, 400.0)
MAX_MODE_CORRECTION = 1.1
HISTOGRAM_SUBSAMPLE_ABOVE = 50_000  # soft-tissue pixels in a slice
MODE_SUPPORT_WINDOW = 0.15
TISSUE_STATS_RANGE_HU = (-150.0, 300.0)

SSDE_COEFFS: dict[int, tuple[float, float]] = {32: (3.704369, 0.03671937), 16: (1.874799, 0.03871313)}
HEAD_BODY_PARTS = frozenset({"HEAD", "BRAIN", "SKULL"})
PHANTOM_CODE_CM: dict[str, int] = {"113691": 32, "113690": 16}

NPS_PIXEL_RANGE_HU = (-300.0, 400.0)
NPS_MEAN_RANGE_HU = (-100.0, 200.0)
NPS_FLAT_BASE_HU = 10.0
NPS_FLAT_PER_SD = 1.0
NPS_MAX_ROIS_PER_SLICE = 4
NPS_MAX_SLICES = 40
NPS_MIN_ROIS = 4

SERIES_METRIC_KEYS = (
    "global_noise_hu", "wed_cm", "ssde_mgy", "ctdivol_mgy", "nps_f_peak_per_mm", "nps_f_avg_per_mm",
    "nps_noise_hu", "mean_hu_tissue", "sd_hu_tissue", "scan_length_mm", "kvp", "slice_thickness_mm",
)


# ------------------------------------------------------------------------------------------------
# small pure functions (tested one by one)


def noise_kernel_px(pixel_spacing_mm: tuple[float, float]) -> tuple[int, int]:
    """Christianson kernel: 1 + round(6 mm / spacing) pixels per axis."""
    return tuple(1 + int(round(NOISE_KERNEL_MM / float(s))) for s in pixel_spacing_mm)  # type: ignore[return-value]


def local_mean_sd(hu2d: np.ndarray, kernel: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and local sample SD (ddof=1) over a ``kernel`` box, float32, via running means
    (``scipy.ndimage.uniform_filter``, reflected edges)."""
    x = hu2d.astype(np.float32, copy=False)
    m1 = ndimage.uniform_filter(x, size=kernel, mode="reflect")
    m2 = ndimage.uniform_filter(x * x, size=kernel, mode="reflect")
    n = kernel[0] * kernel[1]
    var = m2 - m1 * m1
    np.maximum(var, 0.0, out=var)
    var *= np.float32(n / (n - 1)) if n > 1 else np.float32(1.0)
    return m1, np.sqrt(var, out=var)


@dataclass(frozen=True)
class NoiseMode:
    """Result of :func:`histogram_mode`."""

    mode: float  # mode of the local-SD histogram (plain Christianson value)
    support: float  # fraction of values within +/- MODE_SUPPORT_WINDOW of the mode
    rel_width: float  # left half width at half maximum / 1.1774 (a SD), relative to the mode
    corrected: float  # mode * sqrt(nu / (nu - 1)): the RMS noise the chi peak implies


def histogram_mode(values: np.ndarray) -> NoiseMode:
    """Mode of a fine, lightly smoothed histogram of local SD values, with the chi-distribution
    correction described in the module docstring."""
    v = np.asarray(values).ravel()
    if not np.isfinite(v[:: max(1, v.size // 20000)]).all() or not np.isfinite(v.sum()):
        v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError('Argument "values" has no finite value')
    # percentiles only set up the bins and the smoothing: a regular subsample of 20000 is plenty
    sub = v[:: max(1, v.size // 20000)]
    p10, med, hi = (float(q) for q in np.percentile(sub, [10.0, 50.0, 99.5]))
    width = max(0.05, 0.005 * med)
    nbins = max(8, int(math.ceil(hi / width)) + 1)
    scaled = v * np.float32(1.0 / width)
    np.minimum(scaled, np.float32(nbins), out=scaled)  # bin nbins = overflow
    counts = np.bincount(scaled.astype(np.int32), minlength=nbins + 1)[:nbins]
    edges = np.arange(nbins + 1) * width
    # kernel-density smoothing: at least 1.5 % of the median, and a quarter of the spread of the
    # lower half (the noise peak's own width) so the mode of a broad peak is not histogram noise
    sigma_smooth = max(0.1, 0.015 * med, 0.25 * (med - p10) / 1.2816)
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), sigma_smooth / width, mode="constant")
    k = int(np.argmax(smooth))
    centres = 0.5 * (edges[:-1] + edges[1:])
    mode = float(centres[k])
    lo_b = int(np.ceil(mode * (1.0 - MODE_SUPPORT_WINDOW) / width))
    hi_b = int(np.floor(mode * (1.0 + MODE_SUPPORT_WINDOW) / width))
    support = float(counts[max(lo_b, 0):hi_b + 1].sum()) / v.size  # to within one bin (0.5 %)
    # left half width at half maximum (the right side carries edges and anatomy)
    half = smooth[k] / 2.0
    below = np.flatnonzero(smooth[:k] < half)
    if below.size and mode > 0:
        j = int(below[-1])
        x_half = centres[j] + (half - smooth[j]) / (smooth[j + 1] - smooth[j]) * width
        sd_obs = (mode - x_half) / 1.1774
        sd_true = math.sqrt(max(sd_obs**2 - sigma_smooth**2 - width**2 / 12.0, 0.0))
        rel = sd_true / mode
    else:
        rel = float("nan")
    if np.isfinite(rel) and 0.0 < rel < 0.9:
        # chi peak: ln t - (t^2 - 1)/2 = -ln 2 / (nu - 1) at the half-maximum point t = 1 - r
        # (r = relative left half width); RMS / mode = sqrt(nu / (nu - 1)) = sqrt(1 - phi / ln 2)
        t = 1.0 - rel * 1.1774
        phi = math.log(t) - (t * t - 1.0) / 2.0
        corr = math.sqrt(1.0 - phi / math.log(2.0))
    else:
        corr = 1.0
    corrected = mode * min(corr, MAX_MODE_CORRECTION)
    return NoiseMode(mode=mode, support=support, rel_width=rel, corrected=corrected)


def water_equivalent_diameter_cm(hu2d: np.ndarray, mask: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> float:
    """TG-220 D_w in cm; nan for an empty mask."""
    if not mask.any():
        return float("nan")
    vals = hu2d[mask]
    a_w_px = float(np.maximum(vals, np.float32(-1000.0)).sum(dtype=np.float64)) / 1000.0 + vals.size
    area_mm2 = a_w_px * float(pixel_spacing_mm[0]) * float(pixel_spacing_mm[1])
    return 2.0 * math.sqrt(area_mm2 / math.pi) / 10.0


def ssde_factor(wed_cm: float | np.ndarray, phantom_cm: int) -> float | np.ndarray:
    """TG-204 conversion factor f(D_w) for the 16 or 32 cm CTDI phantom."""
    if phantom_cm not in SSDE_COEFFS:
        raise ValueError(f'Argument "phantom_cm" must be 16 or 32, got {phantom_cm!r}')
    a, b = SSDE_COEFFS[phantom_cm]
    return a * np.exp(-b * np.asarray(wed_cm, dtype=np.float64)) if isinstance(wed_cm, np.ndarray) \
        else a * math.exp(-b * float(wed_cm))


def choose_ssde_phantom(meta: dict) -> tuple[int, str]:
    """(diameter in cm, how it was chosen) from the CTDI phantom code, else the body part, else 32."""
    code = meta.get("ctdi_phantom")
    if code in PHANTOM_CODE_CM:
        return PHANTOM_CODE_CM[code], f"CTDIPhantomTypeCodeSequence {code}"
    body_part = (meta.get("body_part") or "").strip().upper()
    if body_part in HEAD_BODY_PARTS:
        return 16, f"BodyPartExamined {body_part}"
    if body_part:
        return 32, f"BodyPartExamined {body_part} (not a head)"
    return 32, "default (no CTDI phantom code and no body part)"


def radial_nps(nps2d: np.ndarray, spacing_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Radially average a centred (fftshift-ed) 2D NPS; bins of the frequency step 1/(N dx)."""
    ny, nx = nps2d.shape
    fy = np.fft.fftshift(np.fft.fftfreq(ny, d=spacing_mm[0]))
    fx = np.fft.fftshift(np.fft.fftfreq(nx, d=spacing_mm[1]))
    fr = np.hypot(fy[:, None], fx[None, :])
    df = max(1.0 / (ny * spacing_mm[0]), 1.0 / (nx * spacing_mm[1]))
    nyquist = min(0.5 / spacing_mm[0], 0.5 / spacing_mm[1])
    idx = np.rint(fr / df).astype(int)
    nbins = int(np.floor(nyquist / df)) + 1
    sel = idx < nbins
    sums = np.bincount(idx[sel], weights=nps2d[sel], minlength=nbins)
    cnt = np.bincount(idx[sel], minlength=nbins)
    prof = np.where(cnt > 0, sums / np.maximum(cnt, 1), 0.0)
    return np.arange(nbins) * df, prof


def nps_peak_and_mean(freqs: np.ndarray, prof: np.ndarray) -> tuple[float, float]:
    """f_peak (parabola through the maximum and its neighbours) and f_avg = sum(f NPS)/sum(NPS)."""
    if prof.sum() <= 0:
        raise ValueError("NPS profile is all zero")
    k = int(np.argmax(prof))
    f_peak = float(freqs[k])
    if 0 < k < len(prof) - 1:
        y0, y1, y2 = prof[k - 1], prof[k], prof[k + 1]
        denom = y0 - 2 * y1 + y2
        if denom < 0:
            f_peak += float(0.5 * (y0 - y2) / denom) * float(freqs[1] - freqs[0])
    f_avg = float((freqs * prof).sum() / prof.sum())
    return f_peak, f_avg


def _poly2_basis(n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    y = (y - (n - 1) / 2) / n
    x = (x - (n - 1) / 2) / n
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1).reshape(n * n, 6)


def nps_from_rois(rois: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """TG-233 2D NPS (centred) from a stack of square ROIs (m, n, n), each detrended with a 2nd
    order 2D polynomial."""
    if rois.ndim != 3 or rois.shape[1] != rois.shape[2] or rois.shape[0] == 0:
        raise ValueError(f'Argument "rois" must be (m, n, n) with m >= 1, got shape {rois.shape}')
    m, n, _ = rois.shape
    basis = _poly2_basis(n)
    flat = rois.reshape(m, n * n).astype(np.float64)
    coef = flat @ np.linalg.pinv(basis).T  # (m, 6) least-squares coefficients
    resid = (flat - coef @ basis.T).reshape(m, n, n)
    spec = np.abs(np.fft.fft2(resid)) ** 2
    nps = spec.mean(axis=0) * (spacing_mm[0] * spacing_mm[1]) / (n * n)
    return np.fft.fftshift(nps)


def nps_roi_size(pixel_spacing_mm: tuple[float, float]) -> int:
    return 64 if max(pixel_spacing_mm) < 0.6 else 32


def select_nps_rois(hu2d: np.ndarray, mask: np.ndarray, local_mean: np.ndarray, local_sd: np.ndarray,
                    size: int, max_rois: int = NPS_MAX_ROIS_PER_SLICE) -> list[tuple[int, int]]:
    """Top-left corners of uniform soft-tissue ROIs (see the module docstring)."""
    rows, cols = hu2d.shape
    half = size // 2
    if rows < size or cols < size:
        return []
    nr, nc = rows // half, cols // half
    r_used, c_used = nr * half, nc * half

    def blocks_all(b: np.ndarray) -> np.ndarray:
        return b[:r_used, :c_used].reshape(nr, half, nc, half).all(axis=(1, 3))

    ok = blocks_all(mask & (hu2d >= NPS_PIXEL_RANGE_HU[0]) & (hu2d <= NPS_PIXEL_RANGE_HU[1])
                    & (local_mean >= NPS_MEAN_RANGE_HU[0]) & (local_mean <= NPS_MEAN_RANGE_HU[1]))
    roi_ok = ok[:-1, :-1] & ok[1:, :-1] & ok[:-1, 1:] & ok[1:, 1:]  # 2x2 blocks = one ROI
    if not roi_ok.any():
        return []
    def blocks(b: np.ndarray) -> np.ndarray:
        return b[:r_used, :c_used].reshape(nr, half, nc, half)

    def two_by_two(b: np.ndarray, fn) -> np.ndarray:
        return fn(fn(b[:-1, :-1], b[1:, :-1]), fn(b[:-1, 1:], b[1:, 1:]))

    lm = blocks(local_mean)
    roi_range = two_by_two(lm.max(axis=(1, 3)), np.maximum) - two_by_two(lm.min(axis=(1, 3)), np.minimum)
    roi_sd = two_by_two(blocks(local_sd).mean(axis=(1, 3)), np.add) / 4.0
    # uniform: the local mean varies little across the ROI compared with the noise (no edge, no
    # organ boundary); ranked by that flatness, never by the noise itself (that would bias the
    # NPS magnitude low)
    flat = roi_ok & (roi_range <= NPS_FLAT_BASE_HU + NPS_FLAT_PER_SD * roi_sd)
    if not flat.any():
        return []
    cand = np.argwhere(flat)
    order = np.argsort(roi_range[flat], kind="stable")
    chosen: list[tuple[int, int]] = []
    taken = np.zeros_like(roi_ok)
    for j in order:
        if len(chosen) >= max_rois:
            break
        br, bc = cand[j]
        if taken[max(0, br - 1):br + 2, max(0, bc - 1):bc + 2].any():  # chosen ROIs do not overlap
            continue
        taken[br, bc] = True
        chosen.append((int(br * half), int(bc * half)))
    return chosen


# ------------------------------------------------------------------------------------------------
# per-slice measurement


def _slice_noise(hu: np.ndarray, local_mean: np.ndarray, local_sd: np.ndarray, tissue: np.ndarray,
                 kernel: tuple[int, int], min_pixels: int) -> tuple[NoiseMode | None, str | None]:
    n = int(np.count_nonzero(tissue))
    if n < min_pixels:
        return None, f"{n} soft-tissue pixels (0-150 HU) in the body, fewer than the minimum {min_pixels}"
    # the whole kernel in soft tissue: no air, lung or bone pixel within it
    soft_window = box_erode((hu > SOFT_WINDOW_RANGE_HU[0]) & (hu < SOFT_WINDOW_RANGE_HU[1]), kernel)
    core = int(np.count_nonzero(tissue & (local_mean >= TISSUE_NOISE_RANGE_HU[0])
                                & (local_mean <= TISSUE_NOISE_RANGE_HU[1]) & soft_window))
    if core < min_pixels:
        return None, (f"only {core} of {n} soft-tissue pixels (0-150 HU) have their whole noise kernel in "
                              f"soft tissue, fewer than the minimum {min_pixels}; the rest are near edges")
    if n > HISTOGRAM_SUBSAMPLE_ABOVE:
        # the local-SD field is smooth over the 6 mm kernel: a regular 2x2 subsample (still more
        # than 12000 values) gives the same histogram at a quarter of the cost
        est = histogram_mode(local_sd[::2, ::2][tissue[::2, ::2]])
    else:
        est = histogram_mode(local_sd[tissue])
    support = est.support
    if support < MIN_MODE_SUPPORT:
        return None, (f"no noise peak: only {support:.0%} of {n} soft-tissue pixels have a local SD "
                              f"within {MODE_SUPPORT_WINDOW:.0%} of the histogram mode")
    return est, None


def run(volume: CTVolume, ctx: RunContext) -> ModelOutput:
    """Measure the classical metrics of one series (see the module docstring)."""
    out = ModelOutput(name="classical", algorithm=ALGORITHM, version=VERSION)
    n = volume.n_slices
    spacing = volume.pixel_spacing_mm
    px_area = spacing[0] * spacing[1]
    kernel = noise_kernel_px(spacing)
    odd_kernel = (kernel[0] | 1, kernel[1] | 1)
    min_tissue_px = int(math.ceil(MIN_TISSUE_AREA_MM2 / px_area))
    roi = nps_roi_size(spacing)
    nps_slices = set(np.unique(np.linspace(0, n - 1, min(n, NPS_MAX_SLICES)).round().astype(int)).tolist())

    noise = np.full(n, np.nan)
    noise_mode = np.full(n, np.nan)
    wed = np.full(n, np.nan)
    tissue_mean = np.full(n, np.nan)
    n_tissue = np.zeros(n)
    sd_map = np.zeros(volume.hu.shape, dtype=np.float32)
    noise_reasons: list[str] = []
    acc_n = 0
    acc_sum = 0.0
    acc_sq = 0.0
    rois: list[np.ndarray] = []
    margin = max(kernel) + 1
    masks = volume_body_masks(volume)
    for i in range(n):
        hu = volume.hu[i]
        mask = masks[i]
        if not mask.any():
            noise_reasons.append("no body")
            continue
        wed[i] = water_equivalent_diameter_cm(hu, mask, spacing)
        # local SD only over the body's bounding box (plus the kernel) to save time
        rr = np.flatnonzero(mask.any(axis=1))
        cc = np.flatnonzero(mask.any(axis=0))
        r0, r1 = max(0, rr[0] - margin), min(hu.shape[0], rr[-1] + 1 + margin)
        c0, c1 = max(0, cc[0] - margin), min(hu.shape[1], cc[-1] + 1 + margin)
        hu_c = hu[r0:r1, c0:c1]
        m_c = mask[r0:r1, c0:c1]
        lmean, lsd = local_mean_sd(hu_c, kernel)
        np.multiply(lsd, m_c, out=sd_map[i, r0:r1, c0:c1])  # 0 outside the body
        tissue = m_c & (hu_c >= TISSUE_NOISE_RANGE_HU[0]) & (hu_c <= TISSUE_NOISE_RANGE_HU[1])
        n_tissue[i] = np.count_nonzero(tissue)
        est, why = _slice_noise(hu_c, lmean, lsd, tissue, odd_kernel, min_tissue_px)
        if est is None:
            noise_reasons.append(str(why))
        else:
            noise[i] = est.corrected
            noise_mode[i] = est.mode
        stats = m_c & (hu_c >= TISSUE_STATS_RANGE_HU[0]) & (hu_c <= TISSUE_STATS_RANGE_HU[1])
        k = int(np.count_nonzero(stats))
        if k:
            vals = hu_c[stats]
            s = float(vals.sum(dtype=np.float64))
            tissue_mean[i] = s / k
            acc_n += k
            acc_sum += s
            acc_sq += float(np.square(vals, dtype=np.float64).sum())
        if i in nps_slices:
            for (r, c) in select_nps_rois(hu_c, m_c, lmean, lsd, roi):
                rois.append(hu_c[r:r + roi, c:c + roi])

    out.slice_metrics["global_noise_hu"] = noise
    out.slice_metrics["global_noise_mode_hu"] = noise_mode
    out.slice_metrics["wed_cm"] = wed
    out.slice_metrics["mean_hu_tissue"] = tissue_mean
    out.slice_metrics["tissue_pixels"] = n_tissue

    # global noise
    measured = np.isfinite(noise)
    out.info["global_noise_slices"] = f"{int(measured.sum())} of {n}"
    if measured.any():
        out.set_metric("global_noise_hu", float(np.median(noise[measured])))
    else:
        out.set_metric("global_noise_hu", None,
                       "not measurable in any slice: " + _summarise(noise_reasons, min_tissue_px))

    # WED
    has_body = np.isfinite(wed)
    if has_body.any():
        out.set_metric("wed_cm", float(wed[has_body].mean()))
    else:
        out.set_metric("wed_cm", None, "no body found in any slice")

    # CTDIvol and SSDE
    ctdi = volume.ctdivol_mgy.astype(np.float64)
    n_nonpositive = int(np.count_nonzero(ctdi <= 0))
    if n_nonpositive:  # 0 is what some scanners write for "unknown": never turn it into an SSDE of 0
        log.warning("%d slice(s) with CTDIvol <= 0 treated as having no CTDIvol", n_nonpositive)
        ctdi = np.where(ctdi > 0, ctdi, np.nan)
    phantom_cm, source = choose_ssde_phantom(volume.meta)
    out.info["ssde_phantom"] = f"{phantom_cm} cm"
    out.info["ssde_phantom_source"] = source
    ssde = ssde_factor(wed, phantom_cm) * ctdi
    out.slice_metrics["ctdivol_mgy"] = ctdi
    out.slice_metrics["ssde_mgy"] = ssde
    no_ctdi = "no CTDIvol (0018,9345) in the series" + (" (only values <= 0)" if n_nonpositive else "")
    if np.isfinite(ctdi).any():
        out.set_metric("ctdivol_mgy", float(np.nanmean(ctdi)))
    else:
        out.set_metric("ctdivol_mgy", None, no_ctdi)
    if np.isfinite(ssde).any():
        out.set_metric("ssde_mgy", float(np.nanmean(ssde)))
    elif not np.isfinite(ctdi).any():
        out.set_metric("ssde_mgy", None, no_ctdi)
    else:
        out.set_metric("ssde_mgy", None, "no slice has both a body (WED) and a CTDIvol")

    # NPS
    if len(rois) >= NPS_MIN_ROIS:
        nps2d = nps_from_rois(np.stack(rois), spacing)
        freqs, prof = radial_nps(nps2d, spacing)
        f_peak, f_avg = nps_peak_and_mean(freqs, prof)
        df_area = 1.0 / (roi * spacing[0]) * 1.0 / (roi * spacing[1])
        out.set_metric("nps_f_peak_per_mm", f_peak)
        out.set_metric("nps_f_avg_per_mm", f_avg)
        out.set_metric("nps_noise_hu", math.sqrt(float(nps2d.sum()) * df_area))
        out.info["nps_rois"] = f"{len(rois)} ROIs of {roi}x{roi} px"
    else:
        found = "no" if not rois else f"only {len(rois)}"
        why = (f"{found} uniform soft-tissue ROI(s) of {roi}x{roi} px ({roi * spacing[1]:.0f} mm) inside the body "
               f"in {len(nps_slices)} checked slices; at least {NPS_MIN_ROIS} are needed")
        for key in ("nps_f_peak_per_mm", "nps_f_avg_per_mm", "nps_noise_hu"):
            out.set_metric(key, None, why)

    # tissue HU
    if acc_n:
        mean = acc_sum / acc_n
        out.set_metric("mean_hu_tissue", mean)
        out.set_metric("sd_hu_tissue", math.sqrt(max(acc_sq / acc_n - mean * mean, 0.0)))
    else:
        for key in ("mean_hu_tissue", "sd_hu_tissue"):
            out.set_metric(key, None, "no body pixels within -150..300 HU")

    # context
    meta = volume.meta
    for key, label in (("scan_length_mm", "scan length"), ("kvp", "KVP (0018,0060)"),
                       ("slice_thickness_mm", "SliceThickness (0018,0050)")):
        value = meta.get(key)
        if value is None:
            out.set_metric(key, None, f"no {label} in the series")
        else:
            out.set_metric(key, float(value))
    if meta.get("kernel"):
        out.info["kernel"] = str(meta["kernel"])
    out.info["noise_kernel_px"] = f"{kernel[0]}x{kernel[1]}"
    out.maps.append(MapOutput(name="local_noise_sd", label="Local noise SD", values=sd_map,
                              unit_code="[hnsf'U]", unit_meaning="Hounsfield unit"))
    return out


def _summarise(reasons: list[str], min_px: int) -> str:
    if not reasons:
        return "no slice"
    no_body = sum(r == "no body" for r in reasons)
    others = [r for r in reasons if r != "no body"]
    parts = []
    if others:
        parts.append(f"{len(others)} slice(s) with too few soft-tissue pixels or no noise peak "
                     f"(minimum {min_px} pixels; e.g. {others[0]})")
    if no_body:
        parts.append(f"{no_body} slice(s) without a body")
    return "; ".join(parts)
