"""Delta-IQA (analysis/delta_iqa.py, analysis/models/delta_iqa.py): the published architecture's layer
sizes and spatial sizes (512 -> 126 -> 62 -> 30 -> 14), fuzzy labels, the probability-weighted score,
the augmentation's geometry, the split by series, and the platform model: null with a reason without
weights, the network's own numbers with weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis import delta_iqa as dq
from analysis.models import delta_iqa as spec_mod
from analysis.training import delta_iqa as tr


def test_published_architecture_and_spatial_sizes():
    net = dq.build_network()
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (96, (11, 11), (4, 4)), (256, (5, 5), (1, 1)), (384, (3, 3), (1, 1)), (384, (3, 3), (1, 1)),
        (256, (3, 3), (1, 1))]
    assert convs[0].padding == (0, 0)  # "valid"
    dense = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(256, 1024), (1024, 512), (512, 5)]
    assert [m.p for m in net if isinstance(m, torch.nn.Dropout)] == [0.5, 0.3]
    sizes = []
    h = torch.zeros(1, 1, 512, 512)
    with torch.no_grad():
        for i, m in enumerate(net):
            h = m(h)
            if isinstance(m, (torch.nn.MaxPool2d,)) or i == 0:
                sizes.append(h.shape[-1])
            if isinstance(m, torch.nn.AdaptiveAvgPool2d):
                break
    assert sizes == [126, 62, 30, 14]
    assert net(torch.zeros(2, 1, 512, 512)).shape == (2, 5)


def test_fuzzy_labels_and_expected_score():
    lab = dq.fuzzy_labels([0, 2.25, 4, 3.5, 1])
    assert np.allclose(lab, [[1, 0, 0, 0, 0], [0, 0, 0.75, 0.25, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0.5, 0.5],
                             [0, 1, 0, 0, 0]])
    assert np.allclose(dq.expected_score(lab), [0, 2.25, 4, 3.5, 1])  # the mean of the fuzzy label is the score
    assert dq.expected_score([[0.2] * 5])[0] == pytest.approx(2.0)


def test_prepare_window_and_resample():
    hu = np.full((512, 512), -160.0, dtype=np.float32)
    hu[0, 0], hu[0, 1], hu[0, 2] = 40.0, 240.0, 3000.0
    x = dq.prepare(hu)
    assert x.shape == (1, 1, 512, 512) and x[0, 0, 0, 0] == pytest.approx(0.5) and x[0, 0, 0, 1] == 1.0
    assert x[0, 0, 0, 2] == 1.0 and x[0, 0, 5, 5] == 0.0
    assert dq.prepare(np.full((256, 300), 40.0)).shape == (1, 1, 512, 512)


def test_augmentation_rotates_and_shifts_within_the_published_ranges():
    x = torch.zeros(64, 1, 512, 512)
    x[:, :, 250:262, 250:262] = 1.0  # a centred square
    gen = torch.Generator().manual_seed(0)
    y = tr.augment(x, gen)
    yy, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    m = y[:, 0].sum(dim=(1, 2))
    cy = (y[:, 0] * yy).sum(dim=(1, 2)) / m - 255.5
    cx = (y[:, 0] * xx).sum(dim=(1, 2)) / m - 255.5
    shift = torch.maximum(cy.abs(), cx.abs())
    assert float(shift.max()) <= 10.5 and float(shift.max()) > 5  # +/-10 px, and really used
    assert float(m.min()) > 100  # the square stays in the image


def test_augmentation_flips_and_keeps_the_pixel_noise():
    # nearest-neighbour resampling: every output pixel is an input pixel (or air), so the noise the
    # ratings are about keeps its SD (bilinear resampling lowered white noise SD by about a third)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 512, 512, generator=gen)
    y = tr.augment(x, gen)
    inner = y[:, :, 156:356, 156:356]
    assert set(torch.unique(inner[0]).tolist()) <= set(torch.unique(x[0]).tolist())
    assert float(inner.std()) == pytest.approx(float(x.std()), rel=0.02)
    # flips are used: a left-half bar ends on the right in some images, never both halves
    bar = torch.zeros(64, 1, 512, 512)
    bar[:, :, :, 100:140] = 1.0
    yb = tr.augment(bar, torch.Generator().manual_seed(2))[:, 0]
    left, right = yb[:, :, :256].sum(dim=(1, 2)), yb[:, :, 256:].sum(dim=(1, 2))
    assert int((right > left).sum()) > 10 and int((left > right).sum()) > 10


def test_input_standardisation_folds_exactly_into_the_first_convolution():
    torch.manual_seed(0)
    net = dq.build_network(0.125).eval()
    x = torch.rand(2, 1, 512, 512)
    with torch.no_grad():
        trained_view = net((x - 0.3) / 0.2)
        tr.fold_input_normalisation(net, 0.3, 0.2)
        assert torch.allclose(net(x), trained_view, atol=1e-4)


def test_learning_rate_warm_up_then_cosine():
    f = [tr.lr_factor(i, 100, 0.1) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01 and f[55] == pytest.approx(0.5, abs=0.02)


def test_projection_noise_mixing_keeps_the_covariance():
    rng = np.random.default_rng(0)
    bases = rng.standard_normal((3, 200, 200)).astype(np.float32) * np.linspace(1, 3, 200)[None, None, :]
    mixed = np.stack([tr.mix_bases(bases, rng) for _ in range(40)])
    # the same per-column SD as each basis (non-stationarity kept), fresh values
    assert np.allclose(mixed.std(axis=(0, 1)), bases.std(axis=(0, 1)), rtol=0.06)
    assert abs(np.corrcoef(mixed[0].ravel(), mixed[1].ravel())[0, 1]) < 0.99


def test_split_is_by_series():
    groups = ["a"] * 10 + ["b"] * 10 + ["c"] * 10 + ["d"] * 10
    train, held = tr.split_by_series(groups, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert not {groups[i] for i in train} & {groups[i] for i in held}
    with pytest.raises(ValueError, match="at least 2"):
        tr.split_by_series(["a"] * 5, 0.2, 0)


def test_correlations():
    c = dq.correlations([1, 2, 3, 4], [2, 4, 6, 9])
    assert c["srocc"] == pytest.approx(1.0) and c["krocc"] == pytest.approx(1.0) and 0.98 < c["plcc"] < 1.0
    assert math.isnan(dq.correlations([1, 1, 1], [1, 2, 3])["srocc"])


class _Vol:
    def __init__(self, hu):
        self.hu = hu

    @property
    def n_slices(self):
        return self.hu.shape[0]


class _Ctx:
    device = "cpu"


def test_model_without_weights_is_null_with_reason(tmp_path):
    vol = _Vol(np.zeros((3, 512, 512), dtype=np.float32))
    out = spec_mod.run(vol, _Ctx(), spec_mod.Options())
    assert out.series_metrics["delta_iqa_score"] is None
    assert "publishes none" in out.reasons["delta_iqa_score"] and "[analysis.delta_iqa] weights" in out.reasons["delta_iqa_score"]
    out = spec_mod.run(vol, _Ctx(), spec_mod.Options(weights=str(tmp_path / "absent.pt")))
    assert out.series_metrics["delta_iqa_score"] is None and "not found" in out.reasons["delta_iqa_score"]


def test_model_with_weights_scores_the_subset(tmp_path):
    torch.manual_seed(1)
    net = dq.build_network(0.125)
    path = tmp_path / "w.pt"
    dq.save_weights(path, net, width=0.125, labels="synthetic")
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 30, size=(5, 512, 512)).astype(np.float32)
    out = spec_mod.run(_Vol(hu), _Ctx(), spec_mod.Options(weights=str(path), max_slices=3))
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(torch.from_numpy(dq.prepare(hu[[0, 2, 4]]))), 1).numpy()
    expect = p @ np.arange(5)
    per = out.slice_metrics["delta_iqa_score"]
    assert np.allclose(per[[0, 2, 4]], expect, atol=1e-5) and np.isnan(per[[1, 3]]).all()
    assert out.series_metrics["delta_iqa_score"] == pytest.approx(float(expect.mean()), abs=1e-5)
    assert 0.0 <= out.series_metrics["delta_iqa_score"] <= 4.0
    assert "labels=synthetic" in out.parameters and len(out.weights_sha256) == 64
    bad = tmp_path / "bad.pt"
    torch.save({"model_state_dict": {}}, bad)
    with pytest.raises(ValueError, match="not a Delta-IQA weights file"):
        dq.load_model(bad)


def _slice_volume(base_sd: float, seed: int):
    """A 512 x 512 water ellipse (40 HU) in air at 0.7 mm with CT-like noise of SD ``base_sd``."""
    from analysis.volume import CTVolume

    yy, xx = np.mgrid[0:512, 0:512]
    body = ((yy - 256) / 200.0) ** 2 + ((xx - 256) / 230.0) ** 2 <= 1.0
    hu = np.where(body, 40.0 + tr.ct_like_noise((512, 512), base_sd, np.random.default_rng(seed)), -1000.0)
    return CTVolume(hu=hu[None].astype(np.float32), pixel_spacing_mm=(0.7, 0.7), slice_positions_mm=np.zeros(1),
                    sop_instance_uids=["1.2.3"], frame_numbers=[None], sop_class_uids=["1.2.840.10008.5.1.4.1.1.2"],
                    ctdivol_mgy=np.array([10.0]), headers=[None], meta={"kvp": 120.0, "body_part": "ABDOMEN"}), body


def test_absolute_levels_make_the_level_a_property_of_the_image():
    # a quiet (5 HU) and a noisy (30 HU) series: at an absolute level both end at the level's total
    # noise (as the node's global noise measures it); a fixed added SD leaves them apart
    from analysis.volume import CTVolume

    measured = {}
    for base in (5.0, 30.0):
        vol, body = _slice_volume(base, seed=int(base))
        b, how = tr.base_noise_hu(vol, body)
        assert how == "global noise" and b == pytest.approx(base, rel=0.1)
        for definition in ("absolute", "relative"):
            img = tr.degrade(vol.hu[0], 2, np.random.default_rng(7), body,
                             noise_sd=tr.added_noise_sd(2, b, definition))
            v2 = CTVolume(**{**vol.__dict__, "hu": img[None], "body_masks": None})
            measured[base, definition] = tr.base_noise_hu(v2, body)[0]
    target = tr.ABSOLUTE_NOISE_HU[2]
    assert measured[5.0, "absolute"] == pytest.approx(target, rel=0.1)
    assert measured[30.0, "absolute"] == pytest.approx(target, rel=0.1)
    assert abs(measured[5.0, "absolute"] - measured[30.0, "absolute"]) < 0.06 * target
    assert measured[30.0, "relative"] - measured[5.0, "relative"] > 5.0  # 45 HU on top of 5 vs 30 HU
    assert tr.added_noise_sd(0, 30.0) == 0.0 and tr.added_noise_sd(1, 30.0) == pytest.approx(40.0)
    with pytest.raises(ValueError, match="not below"):
        tr.added_noise_sd(1, 60.0)
