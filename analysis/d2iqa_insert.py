"""D2IQA virtual-object inserter: lesion-like low-contrast objects with known labels.

The objects follow the D2IQA paper (Lee et al., see ``../shared/REFERENCE.md`` section 1):

- four shape classes: circle, square, triangle, star (class ids 0..3 in that order);
- radius 7, 8, 9 or 10 px. For every shape the radius is the *circumradius*: the shape fits exactly in
  a circle of that radius (square: half-diagonal; triangle: equilateral, vertices on the circle;
  star: five points on the circle, inner vertices at 0.5 x radius);
- additive contrast of +/-8, 9 or 10 % of the display window [-1000, 400] HU, i.e. +/-112, 126 or
  140 HU, added to the HU image (the detector sees the image windowed to that range);
- a random rotation; anti-aliased rasterisation (4 x 4 supersampling) then a Gaussian blur with
  sigma 1 px to soften the edges (as in the public code; the paper says a 5 x 5 kernel);
- 2 to 5 objects per image, centres at least 50 px apart, all inside the patient.

Placement ("inside the patient"). The paper thresholds a saliency map (Perazzi et al.) at 0.4 and
intersects it with a body mask. We use a cheaper, deterministic texture criterion instead: a centre is
allowed where the whole object footprint (a (2 * r_max + 7)-px square: the object and its soft edge) lies inside the body
mask (``analysis.mask.body_mask``, the node's shared patient mask: table and head holder excluded, holes
filled) *and* the 5 x 5 box-smoothed HU over that footprint stays within [-300, 350] HU. That keeps
objects on soft-tissue-like background (brain, muscle, organs, a phantom's plastic) and away from air,
lung, and bone edges, where an additive +/-140 HU object would be clipped by the window or hidden by
structure. Smoothing before the test makes the allowed region almost independent of the noise level,
so the same layout can be used for every dose of a slice.

Everything is vectorised numpy and driven by a ``numpy.random.Generator`` so a fixed seed gives a
fixed layout.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from analysis.mask import body_mask

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
WINDOW_HU: tuple[float, float] = (-1000.0, 400.0)
WINDOW_WIDTH_HU: float = WINDOW_HU[1] - WINDOW_HU[0]
STAR_INNER_RATIO = 0.5
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class InsertionConfig:
    """What a random insertion may draw from (defaults: the paper's configuration)."""

    n_min: int = 2
    n_max: int = 5
    radii: tuple[float, ...] = (7.0, 8.0, 9.0, 10.0)
    contrasts: tuple[float, ...] = (0.08, 0.09, 0.10)  # fraction of the window width; sign is random
    signs: tuple[int, ...] = (-1, 1)
    shapes: tuple[str, ...] = SHAPES
    min_distance_px: float = 50.0
    blur_sigma_px: float = 1.0
    background_hu: tuple[float, float] = (-300.0, 350.0)

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f'Arguments "n_min"/"n_max" must satisfy 1 <= n_min <= n_max, got {self.n_min}, {self.n_max}')
        if not self.radii or min(self.radii) <= 0:
            raise ValueError(f'Argument "radii" must be positive, got {self.radii}')
        if not self.contrasts or min(self.contrasts) <= 0:
            raise ValueError(f'Argument "contrasts" must be positive fractions of the window, got {self.contrasts}')
        unknown = set(self.shapes) - set(SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f'Argument "shapes" must be a non-empty subset of {SHAPES}, got {self.shapes}')
        if self.min_distance_px < 0 or self.blur_sigma_px < 0:
            raise ValueError(
                f'Arguments "min_distance_px" and "blur_sigma_px" must be >= 0, got {self.min_distance_px}, {self.blur_sigma_px}'
            )

    @property
    def max_radius(self) -> float:
        return float(max(self.radii))


@dataclass(frozen=True)
class VirtualObject:
    """One inserted object. Coordinates are continuous pixel coordinates: pixel (row i, col j) covers
    x in [j, j + 1), y in [i, i + 1), so its centre is (j + 0.5, i + 0.5)."""

    shape: str
    cx: float
    cy: float
    radius: float
    contrast: float  # signed fraction of the [-1000, 400] HU window
    angle_rad: float

    @property
    def cls(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def contrast_hu(self) -> float:
        return self.contrast * WINDOW_WIDTH_HU

    def vertices(self) -> np.ndarray:
        """Polygon vertices (k, 2) as (x, y) offsets from the centre; circle -> empty."""
        return _shape_vertices(self.shape, self.radius, self.angle_rad)

    @property
    def bbox_xywh(self) -> tuple[float, float, float, float]:
        """Axis-aligned box of the exact (unblurred) shape, COCO [x, y, w, h]."""
        if self.shape == "circle":
            r = self.radius
            return (self.cx - r, self.cy - r, 2 * r, 2 * r)
        v = self.vertices()
        x0, y0 = v.min(axis=0)
        x1, y1 = v.max(axis=0)
        return (self.cx + float(x0), self.cy + float(y0), float(x1 - x0), float(y1 - y0))


@dataclass(frozen=True)
class Insertion:
    image_hu: np.ndarray  # float32 (rows, cols): the input plus the objects
    objects: tuple[VirtualObject, ...]


def _shape_vertices(shape: str, radius: float, angle: float) -> np.ndarray:
    if shape == "circle":
        return np.zeros((0, 2))
    if shape == "square":
        t = angle + math.pi / 4 + np.arange(4) * (math.pi / 2)
        r = np.full(4, radius)
    elif shape == "triangle":
        t = angle - math.pi / 2 + np.arange(3) * (2 * math.pi / 3)
        r = np.full(3, radius)
    elif shape == "star":
        t = angle - math.pi / 2 + np.arange(10) * (math.pi / 5)
        r = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER_RATIO)
    else:
        raise ValueError(f'Argument "shape" must be one of {SHAPES}, got {shape!r}')
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points; verts (k, 2)."""
    inside = np.zeros(x.shape, dtype=bool)
    xv, yv = verts[:, 0], verts[:, 1]
    xv2, yv2 = np.roll(xv, -1), np.roll(yv, -1)
    for xa, ya, xb, yb in zip(xv, yv, xv2, yv2):
        cond = (ya > y) != (yb > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = xa + (y - ya) * (xb - xa) / (yb - ya)
        inside ^= cond & (x < xint)
    return inside


def shape_coverage(obj: VirtualObject, half: int) -> tuple[np.ndarray, int, int]:
    """Fractional coverage (2*half+1)^2 of ``obj`` on the pixel grid around its centre pixel.
    Returns (coverage, row0, col0) where (row0, col0) is the patch's top-left pixel."""
    ci, cj = int(math.floor(obj.cy)), int(math.floor(obj.cx))
    n = 2 * half + 1
    s = _SUPERSAMPLE
    sub = (np.arange(n * s) + 0.5) / s  # continuous offsets inside the patch
    row0, col0 = ci - half, cj - half
    ys = row0 + sub - obj.cy
    xs = col0 + sub - obj.cx
    x, y = np.meshgrid(xs, ys)
    if obj.shape == "circle":
        inside = x * x + y * y <= obj.radius * obj.radius
    else:
        inside = _inside_polygon(x, y, obj.vertices())
    cov = inside.reshape(n, s, n, s).mean(axis=(1, 3))
    return cov.astype(np.float32), row0, col0


def render_objects(shape_hw: tuple[int, int], objects: tuple[VirtualObject, ...] | list[VirtualObject], blur_sigma_px: float = 1.0) -> np.ndarray:
    """The additive HU image of ``objects`` (soft edges), float32 ``shape_hw``."""
    out = np.zeros(shape_hw, dtype=np.float32)
    rows, cols = shape_hw
    for obj in objects:
        half = int(math.ceil(obj.radius + 4 * blur_sigma_px)) + 2
        cov, r0, c0 = shape_coverage(obj, half)
        if blur_sigma_px > 0:
            cov = ndimage.gaussian_filter(cov, blur_sigma_px, mode="constant")
        patch = cov * np.float32(obj.contrast_hu)
        # clip the patch to the image
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + patch.shape[0], rows), min(c0 + patch.shape[1], cols)
        if rr1 <= rr0 or cc1 <= cc0:
            continue
        out[rr0:rr1, cc0:cc1] += patch[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]
    return out


def placement_mask(
    hu: np.ndarray,
    config: InsertionConfig = InsertionConfig(),
    body: np.ndarray | None = None,
    *,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
) -> np.ndarray:
    """Boolean (rows, cols): pixels where an object of ``config.max_radius`` may be centred.

    ``body``: the patient mask (``analysis.mask.body_mask``; pass the cached one of a volume). When it
    is None it is computed here with ``analysis.mask.body_mask``, which needs ``pixel_spacing_mm``.
    The footprint test is described in the module docstring."""
    if hu.ndim != 2:
        raise ValueError(f'Argument "hu" must be a 2-D slice, got shape {hu.shape}')
    if body is None:
        if pixel_spacing_mm is None:
            raise ValueError('Argument "pixel_spacing_mm" is needed when no "body" mask is given (the body mask is made in mm)')
        ps = (float(pixel_spacing_mm), float(pixel_spacing_mm)) if np.isscalar(pixel_spacing_mm) else tuple(map(float, pixel_spacing_mm))
        body = body_mask(hu, ps)
    elif body.shape != hu.shape:
        raise ValueError(f'Argument "body" must have the shape of "hu" {hu.shape}, got {body.shape}')
    half = int(math.ceil(config.max_radius)) + 3
    size = 2 * half + 1
    smooth = ndimage.uniform_filter(hu.astype(np.float32), size=5, mode="nearest")
    lo = ndimage.minimum_filter(smooth, size=size, mode="nearest")
    hi = ndimage.maximum_filter(smooth, size=size, mode="nearest")
    inside = ndimage.binary_erosion(body, structure=np.ones((size, size), bool), border_value=0)
    return inside & (lo >= config.background_hu[0]) & (hi <= config.background_hu[1])


def sample_layout(allowed: np.ndarray, rng: np.random.Generator, config: InsertionConfig = InsertionConfig()) -> tuple[VirtualObject, ...]:
    """Draw 2-5 objects (fewer only if the allowed region cannot hold them) at allowed centres,
    at least ``config.min_distance_px`` apart. Returns an empty tuple when nothing fits."""
    n_target = int(rng.integers(config.n_min, config.n_max + 1))
    cand_r, cand_c = np.nonzero(allowed)
    if cand_r.size == 0:
        return ()
    objects: list[VirtualObject] = []
    alive = np.ones(cand_r.size, dtype=bool)
    d2 = config.min_distance_px**2
    for _ in range(n_target):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        k = int(idx[rng.integers(idx.size)])
        i, j = int(cand_r[k]), int(cand_c[k])
        alive &= (cand_r - i) ** 2 + (cand_c - j) ** 2 >= d2
        objects.append(
            VirtualObject(
                shape=config.shapes[int(rng.integers(len(config.shapes)))],
                cx=j + 0.5,
                cy=i + 0.5,
                radius=float(config.radii[int(rng.integers(len(config.radii)))]),
                contrast=float(config.signs[int(rng.integers(len(config.signs)))])
                * float(config.contrasts[int(rng.integers(len(config.contrasts)))]),
                angle_rad=float(rng.uniform(0.0, 2 * math.pi)),
            )
        )
    return tuple(objects)


def insert_objects(hu: np.ndarray, objects: tuple[VirtualObject, ...] | list[VirtualObject], blur_sigma_px: float = 1.0) -> np.ndarray:
    """``hu`` plus the rendered objects (float32); the input is not modified."""
    return hu.astype(np.float32) + render_objects(hu.shape, objects, blur_sigma_px)


def random_insertion(
    hu: np.ndarray,
    rng: np.random.Generator,
    config: InsertionConfig = InsertionConfig(),
    allowed: np.ndarray | None = None,
    *,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
) -> Insertion:
    """One random trial: sample a layout in ``allowed`` (computed from ``hu`` when None) and insert it."""
    if allowed is None:
        allowed = placement_mask(hu, config, pixel_spacing_mm=pixel_spacing_mm)
    objects = sample_layout(allowed, rng, config)
    return Insertion(insert_objects(hu, objects, config.blur_sigma_px), objects)


def window01(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] over the D2IQA display window [-1000, 400] HU, clipped (float32)."""
    return np.clip((np.asarray(hu, dtype=np.float32) - WINDOW_HU[0]) / WINDOW_WIDTH_HU, 0.0, 1.0)
