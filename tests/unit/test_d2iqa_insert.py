"""Virtual-object inserter: contrast, shapes, placement rules, seeding and noise texture."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from analysis.d2iqa_insert import (
    SHAPES,
    WINDOW_WIDTH_HU,
    InsertionConfig,
    VirtualObject,
    insert_objects,
    placement_mask,
    random_insertion,
    render_objects,
    sample_layout,
    shape_coverage,
    window01,
)

N = 384


def _ramp_noise(rng: np.random.Generator, n: int, sd: float) -> np.ndarray:
    """CT-like (ramp-shaped, band-limited) stationary noise of a known SD."""
    f = np.fft.fftfreq(n)
    fr = np.hypot(*np.meshgrid(f, f))
    filt = fr * np.exp(-((fr / 0.25) ** 2))
    noise = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * filt))
    return (noise * (sd / noise.std())).astype(np.float32)


def _phantom(rng: np.random.Generator, noise_sd: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Water-like disc (40 HU) with a 700 HU bone ring, in air; returns (hu, tissue_interior)."""
    yy, xx = np.mgrid[:N, :N]
    r = np.hypot(xx - N / 2, yy - N / 2)
    hu = np.full((N, N), -1000.0, np.float32)
    hu[r < 170] = 700.0
    hu[r < 155] = 40.0
    return hu + _ramp_noise(rng, N, noise_sd), r < 155


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contrast", [0.08, -0.10])
def test_measured_contrast_within_10_percent_of_nominal(shape: str, contrast: float) -> None:
    rng = np.random.default_rng(3)
    hu, _ = _phantom(rng, noise_sd=10.0)
    obj = VirtualObject(shape, N / 2 + 0.5, N / 2 + 0.5, 10.0, contrast, angle_rad=0.3)
    out = insert_objects(hu, [obj])
    prof = render_objects(hu.shape, [obj]) / obj.contrast_hu
    core = prof > 0.95  # pixels fully inside the soft-edged object
    ring = (prof == 0) & (np.hypot(*np.mgrid[:N, :N] - N / 2) < 40)  # background around it
    assert core.sum() >= 20
    measured = float(out[core].mean() - out[ring].mean())
    nominal = contrast * WINDOW_WIDTH_HU
    assert abs(measured - nominal) <= 0.10 * abs(nominal), (measured, nominal)


def test_soft_edges_and_bbox() -> None:
    for shape, ang in itertools.product(SHAPES, (0.0, 0.7, 2.0)):
        obj = VirtualObject(shape, 50.5, 60.5, 9.0, 0.1, ang)
        img = render_objects((120, 120), [obj], blur_sigma_px=1.0)
        vals = img[img > 0] / obj.contrast_hu
        assert vals.max() <= 1.0 + 1e-5
        assert ((vals > 0.05) & (vals < 0.95)).sum() > 10  # a soft transition, not a hard edge
        cov, r0, c0 = shape_coverage(obj, 14)
        rows, cols = np.nonzero(cov >= 0.5)
        x, y, w, h = obj.bbox_xywh
        # the box of the half-covered pixels agrees with the exact box to within 1.5 px (thin star tips)
        assert abs((c0 + cols.min()) - x) <= 1.5 and abs((c0 + cols.max() + 1) - (x + w)) <= 1.5
        assert abs((r0 + rows.min()) - y) <= 1.5 and abs((r0 + rows.max() + 1) - (y + h)) <= 1.5
        assert max(w, h) <= 2 * obj.radius + 1e-9


def test_shape_areas_match_geometry() -> None:
    r = 10.0
    expected = {
        "circle": math.pi * r * r,
        "square": 2 * r * r,
        "triangle": 3 * math.sqrt(3) / 4 * r * r,
        "star": 5 * r * (0.5 * r) * math.sin(math.pi / 5),  # 10 triangles of sides r and r/2 at 36 degrees
    }
    for shape, area in expected.items():
        cov, _, _ = shape_coverage(VirtualObject(shape, 30.5, 30.5, r, 0.1, 0.4), 14)
        assert cov.sum() == pytest.approx(area, rel=0.03), shape


def test_layout_rules_hold() -> None:
    rng = np.random.default_rng(0)
    hu, interior = _phantom(rng)
    allowed = placement_mask(hu, pixel_spacing_mm=0.5)
    cfg = InsertionConfig()
    counts = []
    for _ in range(200):
        objs = sample_layout(allowed, rng, cfg)
        counts.append(len(objs))
        assert 2 <= len(objs) <= 5
        for a, b in itertools.combinations(objs, 2):
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= 50.0
        for o in objs:
            assert allowed[int(o.cy), int(o.cx)]
            assert o.radius in cfg.radii and abs(o.contrast) in cfg.contrasts and o.shape in SHAPES
        # every object pixel lies in the soft-tissue interior (never in air or the bone ring)
        img = render_objects(hu.shape, objs)
        assert not (np.abs(img) > 0.01 * 140)[~interior].any()
    assert set(counts) == {2, 3, 4, 5}


def test_placement_mask_excludes_air_bone_and_is_stable_across_noise() -> None:
    rng = np.random.default_rng(1)
    hu_lo, interior = _phantom(rng, noise_sd=5.0)
    hu_hi, _ = _phantom(rng, noise_sd=60.0)  # about a 5 % dose version
    a_lo, a_hi = placement_mask(hu_lo, pixel_spacing_mm=0.5), placement_mask(hu_hi, pixel_spacing_mm=0.5)
    assert a_lo.any() and not a_lo[~interior].any()
    assert np.mean(a_lo == a_hi) > 0.99


def test_placement_uses_the_shared_body_mask() -> None:
    """The body comes from analysis.mask.body_mask (given or made from the spacing); a slice without a
    body has no room; without a mask or a spacing the call says what is missing."""
    from analysis.mask import body_mask

    rng = np.random.default_rng(3)
    hu, interior = _phantom(rng)
    body = body_mask(hu, (0.5, 0.5))
    np.testing.assert_array_equal(placement_mask(hu, body=body), placement_mask(hu, pixel_spacing_mm=0.5))
    # an empty body mask leaves no room even on tissue-valued pixels
    assert not placement_mask(hu, body=np.zeros_like(body)).any()
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        placement_mask(hu)
    with pytest.raises(ValueError, match='"body"'):
        placement_mask(hu, body=body[:-1])


def test_seeded_and_reproducible() -> None:
    hu, _ = _phantom(np.random.default_rng(2))
    a = random_insertion(hu, np.random.default_rng(7), pixel_spacing_mm=0.5)
    b = random_insertion(hu, np.random.default_rng(7), pixel_spacing_mm=0.5)
    c = random_insertion(hu, np.random.default_rng(8), pixel_spacing_mm=0.5)
    assert a.objects == b.objects and np.array_equal(a.image_hu, b.image_hu)
    assert a.objects != c.objects


def test_no_room_gives_no_objects() -> None:
    hu = np.full((128, 128), -1000.0, np.float32)
    assert random_insertion(hu, np.random.default_rng(0), pixel_spacing_mm=0.5).objects == ()


def _nps2d(img: np.ndarray, tiles: list[tuple[int, int]], n: int = 64) -> np.ndarray:
    acc = np.zeros((n, n))
    for r, c in tiles:
        roi = img[r : r + n, c : c + n].astype(np.float64)
        acc += np.abs(np.fft.fft2(roi - roi.mean())) ** 2
    return acc / len(tiles)


def test_noise_texture_unchanged_outside_and_inside_objects() -> None:
    rng = np.random.default_rng(4)
    hu, interior = _phantom(rng, noise_sd=20.0)
    objs = sample_layout(placement_mask(hu, pixel_spacing_mm=0.5), rng, InsertionConfig(n_min=5, n_max=5))
    assert len(objs) == 5
    out = insert_objects(hu, objs)
    support = np.abs(out - hu) > 0
    # 2D NPS over 64 x 64 tiles of the body that no object touches: correlation >= 0.99 (paper Table 1)
    tiles = [
        (r, c)
        for r in range(0, N - 64, 32)
        for c in range(0, N - 64, 32)
        if interior[r : r + 64, c : c + 64].all() and not support[r : r + 64, c : c + 64].any()
    ]
    assert len(tiles) >= 8
    a, b = _nps2d(hu, tiles), _nps2d(out, tiles)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99
    # inside the objects the noise is the original noise: the object is purely additive
    prof = render_objects(hu.shape, objs)
    core = np.abs(prof) >= 0.999 * np.abs(prof).max()
    np.testing.assert_allclose((out - prof)[core], hu[core], atol=1e-3)
    # the object support is compact: nothing beyond radius + 4 sigma + 2 px of each centre
    yy, xx = np.mgrid[:N, :N]
    near = np.zeros_like(support)
    for o in objs:
        near |= np.hypot(xx + 0.5 - o.cx, yy + 0.5 - o.cy) <= o.radius + 6.5
    assert not (support & ~near).any()


def test_window01() -> None:
    w = window01(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0]))
    np.testing.assert_allclose(w, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_config_validation_names_the_argument() -> None:
    with pytest.raises(ValueError, match="shapes"):
        InsertionConfig(shapes=("hexagon",))
    with pytest.raises(ValueError, match="n_min"):
        InsertionConfig(n_min=4, n_max=2)
