"""D2IQA detector, decoding, score and the model entry point."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import d2iqa
from analysis.coco_map import coco_map
from analysis.d2iqa import (
    N_CLASSES,
    STRIDE,
    WEIGHTS_PATH,
    D2IQANet,
    decode,
    detection_loss,
    load_model,
    make_targets,
    score_slice,
    select_slices,
    trial_layouts,
)
from analysis.d2iqa_insert import InsertionConfig, placement_mask, sample_layout
from analysis.models import d2iqa as d2iqa_model
from analysis.results import RunContext
from analysis.weights import file_sha256
from analysis.volume import CTVolume

HAVE_WEIGHTS = WEIGHTS_PATH.is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"shipped weights {WEIGHTS_PATH} are absent")


def _head_like(rng: np.random.Generator, n: int = 256, noise_sd: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like disc (35 HU) in a 800 HU skull ring, CT-like noise of SD ``noise_sd``; (hu, unit noise)."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(xx - n / 2, yy - n / 2)
    hu = np.full((n, n), -1000.0, np.float32)
    hu[r < 0.46 * n] = 800.0
    hu[r < 0.42 * n] = 35.0
    f = np.fft.fftfreq(n)
    fr = np.hypot(*np.meshgrid(f, f))
    filt = fr * np.exp(-((fr / 0.3) ** 2))
    unit = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((n, n))) * filt)).astype(np.float32)
    unit /= unit.std()
    return hu + noise_sd * unit, unit


def _perfect_outputs(objs_per_image, hw):
    t = make_targets(objs_per_image, (hw[0] // STRIDE, hw[1] // STRIDE))
    heat = t["heat"].clamp(1e-6, 1 - 1e-6)
    return torch.log(heat / (1 - heat)), t["size"], t["offset"]


def test_targets_decode_back_to_the_boxes() -> None:
    rng = np.random.default_rng(0)
    allowed = np.zeros((256, 256), bool)
    allowed[30:226, 30:226] = True
    layouts = [sample_layout(allowed, rng) for _ in range(6)]
    outs = _perfect_outputs(layouts, (256, 256))
    dets = decode(outs)
    from analysis.coco_map import ImageBoxes

    gts = [ImageBoxes(np.array([o.bbox_xywh for o in lay]), np.array([o.cls for o in lay])) for lay in layouts]
    assert coco_map(gts, dets, N_CLASSES).map == pytest.approx(1.0)


def test_network_shapes_and_loss_decreases_on_one_batch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = D2IQANet(width=8)
    rng = np.random.default_rng(1)
    hu, _ = _head_like(rng, 128)
    allowed = placement_mask(hu, pixel_spacing_mm=0.5)
    layouts = [sample_layout(allowed, rng) for _ in range(2)]
    from analysis.d2iqa_insert import insert_objects, window01

    x = torch.from_numpy(np.stack([window01(insert_objects(hu, lay)) for lay in layouts])[:, None])
    heat, size, off = net(x)
    assert heat.shape == (2, N_CLASSES, 32, 32) and size.shape == (2, 2, 32, 32) and off.shape == (2, 2, 32, 32)
    targets = make_targets(layouts, (32, 32))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss, _ = detection_loss(net(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_select_slices() -> None:
    assert select_slices(5, 0).tolist() == [0, 1, 2, 3, 4]
    s = select_slices(300, 16)
    assert len(s) == 16 and s[0] == 0 and s[-1] == 299
    assert np.all(np.diff(s) > 0)


def test_run_without_weights_reports_the_reason(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu, _ = _head_like(rng, 128)
    vol = _volume(np.stack([hu, hu]))
    out = d2iqa_model.run(vol, RunContext(), d2iqa_model.Options(weights=str(tmp_path / "none.pt")))
    assert out.series_metrics["d2iqa_score"] is None
    assert "weights" in out.reasons["d2iqa_score"]
    assert np.isnan(out.slice_metrics["d2iqa_score"]).all()


def test_run_rejects_bad_options() -> None:
    vol = _volume(np.full((1, 64, 64), -1000.0, np.float32))
    with pytest.raises(ValueError, match="key 'trials' must be >= 1"):
        d2iqa_model.run(vol, RunContext(), d2iqa_model.Options(trials=0))


def _volume(hu: np.ndarray) -> CTVolume:
    n = hu.shape[0]
    return CTVolume(
        hu=hu.astype(np.float32), pixel_spacing_mm=(0.5, 0.5), slice_positions_mm=np.arange(n, dtype=float),
        sop_instance_uids=[f"1.2.3.{i}" for i in range(n)], frame_numbers=[None] * n,
        sop_class_uids=["1.2.840.10008.5.1.4.1.1.2"] * n, ctdivol_mgy=np.full(n, np.nan), headers=[None] * n,
    )


@needs_weights
def test_run_with_shipped_weights() -> None:
    rng = np.random.default_rng(5)
    slices = [_head_like(rng, 256)[0] for _ in range(3)]
    vol = _volume(np.stack(slices + [np.full((256, 256), -1000.0, np.float32)]))
    out = d2iqa_model.run(vol, RunContext(), d2iqa_model.Options(trials=8, max_slices=0))
    s = out.slice_metrics["d2iqa_score"]
    assert s.shape == (4,)
    assert np.all((s[:3] >= 0) & (s[:3] <= 1)) and np.isnan(s[3])  # the air-only slice has no room
    assert out.series_metrics["d2iqa_score"] == pytest.approx(float(np.nanmean(s)))
    assert out.weights_sha256 == file_sha256(WEIGHTS_PATH)
    # subset: only the evenly spaced slices are scored, the same seed gives the same scores
    out2 = d2iqa_model.run(vol, RunContext(), d2iqa_model.Options(trials=8, max_slices=2))
    s2 = out2.slice_metrics["d2iqa_score"]
    assert np.isfinite(s2[0]) and np.isnan(s2[1]) and np.isnan(s2[2])
    assert s2[0] == pytest.approx(s[0])


@needs_weights
def test_score_falls_with_noise_and_table3_trends() -> None:
    """Same layouts at three noise levels: the score falls with noise; smaller and fainter objects
    (paper Table 3) score lower than large bright ones."""
    torch.set_num_threads(1)
    model = load_model(WEIGHTS_PATH, "cpu")
    rng = np.random.default_rng(11)
    clean, unit = _head_like(rng, 256, noise_sd=0.0)
    allowed = placement_mask(clean, pixel_spacing_mm=0.5)
    layouts = trial_layouts(allowed, 24, seed=3)
    scores = [score_slice(model, clean + sd * unit, layouts).score for sd in (5.0, 40.0, 120.0)]
    assert scores[0] > scores[1] > scores[2], scores
    img = clean + 30.0 * unit
    small_faint = InsertionConfig(radii=(7.0,), contrasts=(0.08,))
    large_bright = InsertionConfig(radii=(10.0,), contrasts=(0.10,))
    s_sf = score_slice(model, img, trial_layouts(allowed, 24, 4, small_faint), config=small_faint).score
    s_lb = score_slice(model, img, trial_layouts(allowed, 24, 4, large_bright), config=large_bright).score
    assert s_lb > s_sf, (s_lb, s_sf)
    assert math.isfinite(s_sf)
