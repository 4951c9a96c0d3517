"""Patient (body) mask: the body without the table, head holder and surrounding air.

Method (per axial slice, after AAPM TG-220 section 2):

1. Threshold at ``BODY_THRESHOLD_HU`` = -260 HU (TG-220's patient-contour threshold): air, foam
   mattress and the low-density core of the couch top fall below it.
2. Closing with a square of ``CLOSING_MM`` = 3 mm, then hole filling: lungs, bowel gas and the
   air inside a skull phantom are part of the patient for TG-220, and the closing lets a shell with
   small gaps (thin bone that reads below -260 HU in places) still enclose its inside. The closing
   is kept small on purpose: a larger one bridges the gap between a head and a curved head holder
   a few mm below it. Wider gaps leave the inside unfilled, which does not change the
   water-equivalent diameter (air counts ~0) and only drops air from the mask. Filling comes
   *before* the opening so that a thin closed shell becomes a solid region and survives step 3,
   while an open shell (a U-shaped head holder, a curved couch top) stays thin.
3. Opening with a square of ``OPENING_MM`` = 5 mm gives the *core*: thin dense structures such as
   couch skins, a head-holder shell or a cable vanish from it.
4. Connected components (4-connectivity) of the filled mask. A component of which less than
   ``MIN_CORE_FRACTION`` (20 %) survives the opening is a thin shell (table, holder) and is
   dropped. Of the rest, the largest is the body; others are kept when they are at least
   ``SECONDARY_FRACTION`` (2 %) of the largest and at least ``MIN_COMPONENT_MM2`` (50 mm^2):
   the arms beside a chest or separate parts of a phantom, which attenuate the beam and belong in
   the water-equivalent diameter; small debris is dropped. Inside a kept component only pixels
   within ``REACH_MM`` = 10 mm of its core are kept, which cuts off a holder or couch shell that
   touches the body while keeping thin parts of the body itself (a thin skull wall).
5. The final mask is, inside the selection, every pixel above the threshold plus every pixel
   enclosed by the body (filled holes). Pixels that only the closing added next to the outside air
   (air in a concavity of the body outline, a gap in a shell) are left out.

Steps 2-4 run on a 2x2 OR-pooled grid when the pixel spacing is at most 1 mm (0.9-2 mm grid),
the final step at full resolution, and box morphology is done with a few vectorised
boolean operations (log2 of the box size per axis), so one 512x512 slice costs about 1-2 ms on one
core. The outline at full resolution is exactly the thresholded one: pooling only decides which
structures belong to the body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from analysis.volume import CTVolume

log = logging.getLogger(__name__)

BODY_THRESHOLD_HU = -260.0
CLOSING_MM = 3.0
OPENING_MM = 5.0
SECONDARY_FRACTION = 0.02
MIN_COMPONENT_MM2 = 50.0
MIN_CORE_FRACTION = 0.2
REACH_MM = 10.0
MAX_POOLED_SPACING_MM = 2.0  # pool 2x2 while the pooled grid stays at or below 2 mm

_FOUR = ndimage.generate_binary_structure(2, 1)


def _check(hu2d: np.ndarray, pixel_spacing_mm) -> tuple[float, float]:
    if not isinstance(hu2d, np.ndarray) or hu2d.ndim != 2:
        raise ValueError(f'Argument "hu2d" must be a 2D array, got {type(hu2d).__name__} '
                         f'of shape {getattr(hu2d, "shape", None)}')
    try:
        sr, sc = (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise ValueError(f'Argument "pixel_spacing_mm" must be (row, col) in mm, got {pixel_spacing_mm!r}') from exc
    if not (sr > 0 and sc > 0 and np.isfinite(sr) and np.isfinite(sc)):
        raise ValueError(f'Argument "pixel_spacing_mm" must be positive, got {pixel_spacing_mm!r}')
    return sr, sc


def _odd(n_px: float) -> int:
    """Nearest odd integer >= 1."""
    return max(1, 2 * int(round((n_px - 1) / 2)) + 1)


def _run_1d(mask: np.ndarray, size: int, axis: int, erode: bool) -> np.ndarray:
    """Box dilation (OR) or erosion (AND) of a bool array along one axis, centred, odd ``size``.

    Doubling trick: after each step ``b[i]`` combines ``mask[i : i + covered]``, so a window of
    ``size`` costs about log2(size) vectorised boolean operations. Outside the image counts as
    background for dilation and as foreground for erosion (a body cut by the field of view is not
    eroded from the border)."""
    if size <= 1:
        return mask
    m = np.moveaxis(mask, axis, 0)
    op = np.logical_and if erode else np.logical_or
    b = m.copy()
    covered = 1
    while covered < size:
        step = min(covered, size - covered, b.shape[0] - 1)
        if step <= 0:
            break
        op(b[:-step], b[step:], out=b[:-step])
        covered += step
    # now b[i] = combine(m[i : i + size]) (truncated at the end); centre: out[i] = b[i - r]
    r = size // 2
    out = np.empty_like(b)
    n = b.shape[0]
    if r < n:
        out[r:] = b[: n - r]
    head = op.accumulate(m[: min(2 * r, n)], axis=0)  # windows that start before the image
    k = min(r, n)
    out[:k] = head[np.minimum(np.arange(k) + r, len(head) - 1)]
    return np.moveaxis(out, 0, axis)


def _box(mask: np.ndarray, size: tuple[int, int], erode: bool) -> np.ndarray:
    out = _run_1d(mask, size[0], 0, erode)
    return _run_1d(out, size[1], 1, erode)


def box_dilate(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary dilation of a 2D bool array with an odd (rows x cols) box; outside = background."""
    return _box(mask, size, erode=False)


def box_erode(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Binary erosion of a 2D bool array with an odd (rows x cols) box; outside = foreground."""
    return _box(mask, size, erode=True)


_dilate = box_dilate
_erode = box_erode


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes: background components that do not touch the image border become foreground."""
    bg_labels, n = ndimage.label(~mask, structure=_FOUR)
    if n == 0:
        return mask
    border = np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]])
    outside = np.zeros(n + 1, dtype=bool)
    outside[border] = True
    outside[0] = False
    return ~outside[bg_labels]


def _pool2(mask: np.ndarray) -> np.ndarray:
    r, c = (mask.shape[0] // 2) * 2, (mask.shape[1] // 2) * 2
    m = mask[:r, :c]
    return m[0::2, 0::2] | m[1::2, 0::2] | m[0::2, 1::2] | m[1::2, 1::2]


def body_mask(hu2d: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> np.ndarray:
    """Boolean mask of the patient body in one axial HU slice (see the module docstring).

    Returns an all-False mask when nothing of body size is present (e.g. a slice through the
    table or head holder only)."""
    sr, sc = _check(hu2d, pixel_spacing_mm)
    thr = hu2d > BODY_THRESHOLD_HU
    if not thr.any():
        return thr
    pooled = 2 * max(sr, sc) <= MAX_POOLED_SPACING_MM and min(hu2d.shape) >= 64
    work = _pool2(thr) if pooled else thr
    wr, wc = (sr * 2, sc * 2) if pooled else (sr, sc)
    csize = (_odd(CLOSING_MM / wr), _odd(CLOSING_MM / wc))
    closed = _erode(_dilate(work, csize), csize)
    filled = _fill_holes(closed)
    osize = (_odd(OPENING_MM / wr), _odd(OPENING_MM / wc))
    core = _dilate(_erode(filled, osize), osize) & filled
    labels, n = ndimage.label(filled, structure=_FOUR)
    if n == 0:
        return np.zeros_like(thr)
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    core_area = np.bincount(labels[core], minlength=n + 1).astype(np.float64)
    area[0] = 0.0
    # thin shells (table skins, head holder, cables): almost nothing survives the opening
    solid = core_area >= MIN_CORE_FRACTION * area
    solid[0] = False
    if not solid.any():
        return np.zeros_like(thr)
    cand = np.where(solid, area, 0.0)
    largest = float(cand.max())
    min_px = max(SECONDARY_FRACTION * largest, MIN_COMPONENT_MM2 / (wr * wc))
    keep = solid & (cand >= min_px)
    keep[int(np.argmax(cand))] = True
    kept = keep[labels]
    # strip thin appendages (a holder or couch touching the body) further than REACH_MM from the core
    rsize = (_odd(2 * REACH_MM / wr + 1), _odd(2 * REACH_MM / wc + 1))
    selected = kept & _dilate(core & kept, rsize)
    # holes inside the body: below the threshold but filled; not the pixels the closing added in an
    # outer concavity (next to the outside air)
    outer = closed & ~work & _dilate(~filled, csize)
    enclosed = filled & ~work & ~outer
    if pooled:
        # back to full resolution in one upsampling: bit 0 = selected, bit 1 = selected and enclosed
        # (grown by one pooled pixel: a pooled pixel on the edge of a lung also holds lung pixels)
        code = selected.view(np.uint8) | ((selected & _dilate(enclosed, (3, 3))).view(np.uint8) << 1)
        up = np.repeat(np.repeat(code, 2, axis=0), 2, axis=1)
        if up.shape != thr.shape:  # odd size: the last row/column follows its neighbour
            up = np.pad(up, ((0, thr.shape[0] - up.shape[0]), (0, thr.shape[1] - up.shape[1])), mode="edge")
        return (up == 3) | ((up == 1) & thr)
    return selected & (thr | enclosed)


def body_mask_volume(hu3d: np.ndarray, pixel_spacing_mm: tuple[float, float]) -> np.ndarray:
    """``body_mask`` applied to every slice of a (n_slices, rows, cols) volume."""
    if not isinstance(hu3d, np.ndarray) or hu3d.ndim != 3:
        raise ValueError(f'Argument "hu3d" must be a (n_slices, rows, cols) array, got shape '
                         f'{getattr(hu3d, "shape", None)}')
    out = np.zeros(hu3d.shape, dtype=bool)
    for i in range(hu3d.shape[0]):
        out[i] = body_mask(hu3d[i], pixel_spacing_mm)
    return out


def volume_body_masks(volume: CTVolume) -> np.ndarray:
    """Body masks of every slice of ``volume``, computed once and cached on it
    (``volume.body_masks``), so that every model of a pipeline run shares them."""
    masks = volume.body_masks
    if masks is None or masks.shape != volume.hu.shape:
        masks = body_mask_volume(volume.hu, volume.pixel_spacing_mm)
        volume.body_masks = masks
    return masks
