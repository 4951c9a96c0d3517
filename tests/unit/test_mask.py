"""analysis.mask.body_mask on synthetic slices with a known body and a known table, and on the
shared head phantom (the head holder must be excluded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from analysis.mask import body_mask, body_mask_volume, box_dilate, box_erode, volume_body_masks

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PHANTOM_1MM = SHARED / "ct" / "philips_head_phantom" / "S2020_1mm_std"

N = 512
SPACING = (0.7, 0.7)  # 358 mm field of view


def _grid(spacing=SPACING, n=N):
    """Coordinates in mm from the image centre."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    return (y - n / 2 + 0.5) * spacing[0], (x - n / 2 + 0.5) * spacing[1]  # mm from the centre


def _air(n=N, seed=0):
    return (-1000.0 + np.random.default_rng(seed).normal(0, 10, (n, n))).astype(np.float32)


def _add_couch(img, y, x, top_mm, shell_mm=2.0, thickness_mm=40.0):
    """A curved couch: two dense carbon skins (+300 HU) around a foam core (-900 HU)."""
    curve = top_mm + 0.002 * x**2
    inside = (y >= curve) & (y <= curve + thickness_mm) & (np.abs(x) < 230)
    img[inside] = -900.0
    skins = inside & ((y <= curve + shell_mm) | (y >= curve + thickness_mm - shell_mm))
    img[skins] = 300.0
    return skins


@pytest.mark.parametrize("spacing", [SPACING, (0.45, 0.45), (1.2, 1.2)])
def test_cylinder_on_couch_excludes_the_couch(spacing):
    """0.45 and 0.7 mm run the pooled path, 1.2 mm the full-resolution one."""
    y, x = _grid(spacing, 700 if spacing[0] < 0.5 else N)
    img = _air(y.shape[0])
    body = (y / 110.0) ** 2 + (x / 140.0) ** 2 <= 1.0  # 28 x 22 cm ellipse
    skins = _add_couch(img, y, x, top_mm=118.0)  # 8 mm mattress gap below the body
    img[(y > 110) & (y < 118) & (np.abs(x) < 200)] = -950.0  # foam mattress
    img[body] = 40.0 + np.random.default_rng(1).normal(0, 20, int(body.sum()))
    mask = body_mask(img, spacing)
    assert not (mask & skins).any(), "couch skins must not be in the body mask"
    assert (mask & body).sum() / body.sum() > 0.999
    assert (mask & ~body).sum() < 0.001 * body.sum()


def test_couch_touching_the_body_is_cut_off():
    y, x = _grid()
    img = _air()
    body = (y / 110.0) ** 2 + (x / 140.0) ** 2 <= 1.0
    skins = _add_couch(img, y, x, top_mm=108.0)  # the upper skin runs through the back of the body
    img[body] = 40.0
    mask = body_mask(img, SPACING)
    assert (mask & body).sum() / body.sum() > 0.999
    # at most a short stub of the skin within 10 mm of the body is kept, not the couch
    far = skins & ~ndimage.binary_dilation(body, iterations=int(15 / SPACING[0]))
    assert far.sum() > 1000
    assert not (mask & far).any()


@pytest.mark.parametrize("spacing", [SPACING, (0.45, 0.45), (1.2, 1.2)])
def test_lungs_and_closed_air_shell_are_filled(spacing):
    n = 700 if spacing[0] < 0.5 else N
    y, x = _grid(spacing, n)
    img = _air(n)
    r = np.hypot(y, x)
    img[r <= 120] = 30.0
    lungs = (np.hypot(y, x - 55) < 40) | (np.hypot(y, x + 55) < 40)
    img[lungs] = -850.0
    mask = body_mask(img, spacing)
    assert mask[lungs].all()
    # a 3.5 mm bone shell around air (the skull phantom) with a 1.5 mm gap in the wall
    img = _air(n)
    shell = (r >= 80) & (r <= 83.5) & ~((np.abs(y) < 0.75) & (x > 0))
    img[shell] = 800.0
    mask = body_mask(img, spacing)
    assert mask[r < 75].all(), "the air inside the shell belongs to the body"
    assert mask[shell].all()


def test_two_arms_kept_small_debris_dropped():
    y, x = _grid()
    img = _air()
    trunk = (y / 100.0) ** 2 + (x / 120.0) ** 2 <= 1.0
    arm_l = np.hypot(y, x - 150) < 30
    arm_r = np.hypot(y, x + 150) < 30
    debris = np.hypot(y - 150, x) < 3  # 28 mm^2 cable
    for region in (trunk, arm_l, arm_r, debris):
        img[region] = 50.0
    mask = body_mask(img, SPACING)
    assert mask[trunk].all() and mask[arm_l].all() and mask[arm_r].all()
    assert not mask[debris].any()


def test_empty_and_table_only_slices():
    y, x = _grid()
    img = _air()
    assert not body_mask(img, SPACING).any()
    _add_couch(img, y, x, top_mm=100.0)
    assert not body_mask(img, SPACING).any()


def test_body_cut_by_the_field_of_view_keeps_its_border():
    img = np.full((128, 128), 40.0, dtype=np.float32)
    img[:10, :] = -1000.0
    mask = body_mask(img, (0.66, 0.66))
    assert mask[10:, :].all() and not mask[:10, :].any()


def test_volume_masks_are_computed_once_and_shared():
    from analysis.volume import CTVolume

    y, x = _grid()
    img = _air()
    img[np.hypot(y, x) < 100] = 40.0
    hu = np.stack([img, _air(seed=1)]).astype(np.float32)
    vol = CTVolume(hu=hu, pixel_spacing_mm=SPACING, slice_positions_mm=np.arange(2.0), sop_instance_uids=["a", "b"],
                   frame_numbers=[None, None], sop_class_uids=["x", "x"], ctdivol_mgy=np.full(2, np.nan),
                   headers=[None, None])
    first = volume_body_masks(vol)
    assert volume_body_masks(vol) is first and vol.body_masks is first
    np.testing.assert_array_equal(first[0], body_mask(hu[0], SPACING))
    assert not first[1].any()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="hu2d"):
        body_mask(np.zeros((2, 4, 4)), SPACING)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        body_mask(np.zeros((4, 4)), (0.0, 1.0))
    with pytest.raises(ValueError, match="hu3d"):
        body_mask_volume(np.zeros((4, 4)), SPACING)


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 9), (15, 15), (23, 7)])
def test_box_morphology_matches_scipy(size):
    rng = np.random.default_rng(5)
    m = ndimage.binary_opening(rng.random((97, 131)) > 0.45)
    struct = np.ones(size, dtype=bool)
    np.testing.assert_array_equal(box_dilate(m, size), ndimage.binary_dilation(m, struct))
    # erosion with the outside counting as foreground
    np.testing.assert_array_equal(box_erode(m, size), ndimage.binary_erosion(m, struct, border_value=1))


@pytest.mark.skipif(not PHANTOM_1MM.is_dir(), reason=f"shared phantom data not found at {PHANTOM_1MM}")
def test_shared_phantom_mask_excludes_head_holder():
    from analysis.volume import load_series

    vol = load_series(sorted(PHANTOM_1MM.iterdir()))
    masks = body_mask_volume(vol.hu, vol.pixel_spacing_mm)
    # the last slice lies beyond the skull: everything above -260 HU there is the U-shaped holder,
    # which runs unchanged through the whole series
    top = int(np.argmax(vol.slice_positions_mm))
    holder = ndimage.binary_dilation(vol.hu[top] > -260, iterations=3)
    assert holder.sum() > 3000
    assert not masks[top].any()
    assert not (masks & holder[None]).any(), "head holder pixels in the body mask"
    # the phantom itself is found: a body in every slice that has anything besides the holder
    has_phantom = ((vol.hu > -260) & ~holder[None]).sum(axis=(1, 2)) > 500
    has_body = masks.sum(axis=(1, 2)) > 500
    np.testing.assert_array_equal(has_body, has_phantom)
    assert has_phantom.sum() >= 130
    # where the skull is a closed ring (slice 90) the air inside it is part of the body
    assert masks[90].sum() > 80000
