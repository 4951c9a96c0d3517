"""N2Q model: architecture contract, shipped weights, node run() outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.training import dose_sim
from analysis.n2q import (
    DEFAULT_WEIGHTS,
    DOSE_CLASSES,
    N2QNet,
    build_from_config,
    high_pass,
    load_model,
    make_input,
    predict_quality,
    resize_to_model,
    save_weights,
)
from analysis.models.n2q import Options as N2QOptions
from analysis.models.n2q import run
from analysis.training.phantoms import make_phantom
from analysis.results import RunContext
from analysis.volume import CTVolume


def test_architecture_shapes_and_parameter_count() -> None:
    net = N2QNet().eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 1_963_766  # U-Net 16-32-64-128-256 + Linear(256, 5): about 1.97 M
    assert net.enc[0][0].in_channels == 2
    assert net.dose_head is not None and net.dose_head.out_features == 5
    x = make_input(torch.rand(3, 64, 64) * 40 - 20)  # values far outside [0, 1]: tanh must still bound
    assert x.shape == (3, 2, 64, 64)
    with torch.no_grad():
        m, logits = net(x)
    assert m.shape == (3, 1, 64, 64) and logits.shape == (3, 5)
    assert float(m.abs().max()) <= 1.0
    ablation = N2QNet(in_channels=1, dose_head=False)
    assert ablation.dose_head is None
    with torch.no_grad():
        m1, l1 = ablation(make_input(torch.rand(1, 32, 32), 1))
    assert m1.shape == (1, 1, 32, 32) and l1 is None


def test_high_pass_removes_flat_regions_keeps_edges() -> None:
    x = torch.zeros(1, 1, 32, 32)
    x[..., 16:] = 1.0
    hp = high_pass(x)
    assert float(hp[..., 2:30, 2:8].abs().max()) < 1e-5  # flat, away from the edge: nothing
    assert float(hp[..., 14:18].abs().max()) > 0.1  # the edge survives


def test_save_load_roundtrip(tmp_path: Path) -> None:
    net = N2QNet(dropout=0.0).eval()
    path = tmp_path / "w.pt"
    sha = save_weights(net, path, {"in_channels": 2, "dropout": 0.0}, {"note": np.float64(1.5)})
    loaded = load_model(path)
    assert loaded.sha256 == sha and len(sha) == 64
    x = make_input(torch.rand(1, 32, 32))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.net(x)[0].numpy(), net(x)[0].numpy(), atol=5e-3)  # fp16 storage
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_old_weight_files_are_instance_norm_and_batch_norm_roundtrips(tmp_path: Path) -> None:
    assert build_from_config({}).norm == "instance"  # files written before v1.1 carry no "norm"
    assert isinstance(build_from_config({}).enc[0][1], torch.nn.InstanceNorm2d)
    net = N2QNet(dropout=0.0, norm="batch")
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(make_input(torch.rand(4, 32, 32) * 0.5 + 0.2))
    net.eval()
    path = tmp_path / "bn.pt"
    save_weights(net, path, {"norm": "batch", "dropout": 0.0})
    blob = torch.load(path, weights_only=True)
    assert blob["state_dict"]["enc.0.1.running_var"].dtype == torch.float32  # not squeezed into fp16
    loaded = load_model(path)
    assert isinstance(loaded.net.enc[0][1], torch.nn.BatchNorm2d)
    x = make_input(torch.rand(2, 32, 32))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.net(x)[0].numpy(), net(x)[0].numpy(), atol=5e-3)


def test_instance_norm_cannot_see_the_noise_amplitude_batch_norm_can() -> None:
    """The cause of the v1.0 defects: InstanceNorm divides each feature map by its own SD, so the
    network is blind to the amplitude of its input (conv is linear, the norm removes the scale):
    noise of SD s and 2 s give the SAME map (exactly for zero-mean input; a flat level, the zero
    padding at the borders and the norm's eps leak only a little of the amplitude).
    It can learn the noise amplitude only by smuggling it past the normalisation with a localised
    spike: the v1.0 ellipses. A BatchNorm network at inference is a fixed affine map per channel
    and does see the amplitude."""
    torch.manual_seed(0)
    noise = torch.randn(1, 64, 64) * 0.2  # amplitudes well above the norm's eps (1e-5 on the variance)
    flat = [make_input(k * noise) for k in (1.0, 2.0)]
    inst = N2QNet(dropout=0.0, norm="instance").eval()
    with torch.no_grad():
        a, b = (inst(x)[0] for x in flat)
    assert float((a - b).abs().max()) < 1e-2
    bn = N2QNet(dropout=0.0, norm="batch")
    for mod in bn.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # running statistics = the plain average of the batches below
    bn.train()
    with torch.no_grad():
        for _ in range(3):
            bn(make_input(torch.randn(4, 64, 64) * 0.3))
    bn.eval()
    with torch.no_grad():
        a, b = (bn(x)[0] for x in flat)
    assert float((a - b).abs().mean()) > 0.1, float((a - b).abs().mean())


def test_training_noise_has_the_amplitude_the_node_sees() -> None:
    """Regression (v1.0 bug): the pool resized a slice to the model matrix first and simulated its
    noise there with the I0 calibrated at the native matrix: 1.6x the SD (and a whiter spectrum)
    of what a real lower-dose scan shows after the node's resize. Truth here = noise simulated at
    the native matrix and resized with ``resize_to_model`` (the node path). Matrices halved for speed."""
    from analysis.training.n2q_train import _noise_like_node

    native, ps = make_phantom("body", 256, np.random.default_rng([4242, 7]))
    i0, dose, size = 1.0e6, 0.25, 128
    small, nz = _noise_like_node(native, ps, size, np.random.default_rng(1))
    assert small.shape == (size, size) and nz.shape == (2, size, size)
    pool_added = nz / np.sqrt(dose_sim.added_i0(i0, dose))
    low = dose_sim.simulate_low_dose(native, [dose], i0, pixel_spacing_mm=ps, rng=2)[0]
    node_added = resize_to_model(low[None], size)[0][0].numpy() - resize_to_model(native[None], size)[0][0].numpy()
    tissue = (small > -300) & (small < 300)
    ratio = float(pool_added[:, tissue].std() / node_added[tissue].std())
    assert 0.9 < ratio < 1.1, ratio
    legacy = dose_sim.unit_noise(small, pixel_spacing_mm=ps * 256 / size, rng=3)[0] / np.sqrt(dose_sim.added_i0(i0, dose))
    assert float(legacy[tissue].std() / node_added[tissue].std()) > 1.3


def _held_out_phantom() -> tuple[np.ndarray, float, float]:
    hu, ps = make_phantom("body", 256, np.random.default_rng([4242, 1]))  # seed never used in training
    un = dose_sim.unit_noise(hu, pixel_spacing_mm=ps, rng=5, n_realisations=1)[0]
    i0 = (float(un[(hu > -300) & (hu < 300)].std()) / 6.0) ** 2  # full-dose noise 6 HU
    return hu + un / np.sqrt(i0), ps, i0


def test_shipped_weights_quality_falls_with_dose() -> None:
    assert DEFAULT_WEIGHTS.is_file(), f"shipped weights missing at {DEFAULT_WEIGHTS}"
    torch.set_num_threads(1)
    full, ps, i0 = _held_out_phantom()
    sims = dose_sim.simulate_low_dose(full, DOSE_CLASSES, i0, pixel_spacing_mm=ps, rng=3)
    stack = np.concatenate([sims, full[None]])
    q, probs, sha = predict_quality(stack)
    assert q.shape == stack.shape and probs.shape == (6, 5) and len(sha) == 64
    body = full > -300
    means = [float(m[body].mean()) for m in q]
    assert all(a < b for a, b in zip(means, means[1:])), means  # 5 % < 10 % < 25 % < 50 % < 75 % < full
    assert means[0] < 0.8 < means[-1]


def test_shipped_weights_paint_no_spurious_low_quality_spots() -> None:
    """v1.0 defect: blobs of about 300 px (at 256) with quality near 0 on every real slice, at full
    dose too, and even on a slice of pure air (its true map is 1 everywhere: both images lie below
    the window). At full dose the true map is 1 everywhere, so no sizeable region may fall to 0.4."""
    from scipy import ndimage

    torch.set_num_threads(1)
    air, _, _ = predict_quality(np.full((256, 256), -1000.0, np.float32))
    assert float(air.min()) > 0.9
    full, _, _ = _held_out_phantom()
    q, _, _ = predict_quality(full)
    lab, n = ndimage.label(q < 0.4)
    largest = int(np.bincount(lab.ravel())[1:].max()) if n else 0
    assert largest < 20, largest


def test_run_gives_node_metrics_and_native_maps() -> None:
    full, ps, _ = _held_out_phantom()
    hu = np.stack([full[:, 8:248], full[:, 8:248]]).astype(np.float32)  # non-square native matrix
    vol = CTVolume(
        hu=hu, pixel_spacing_mm=(ps, ps), slice_positions_mm=np.array([0.0, 5.0]),
        sop_instance_uids=["1.2.3.1", "1.2.3.2"], frame_numbers=[None, None], sop_class_uids=["1.2.840.10008.5.1.4.1.1.2"] * 2,
        ctdivol_mgy=np.array([10.0, 10.0]), headers=[None, None],
    )
    out = run(vol, RunContext(device="cpu"), N2QOptions(batch=2))
    assert set(out.series_metrics) == {"n2q_mean_quality", "n2q_p05_quality", "n2q_low_fraction"}
    assert 0.0 < out.series_metrics["n2q_p05_quality"] <= out.series_metrics["n2q_mean_quality"] <= 1.0
    assert 0.0 <= out.series_metrics["n2q_low_fraction"] <= 1.0
    assert out.weights_sha256 and len(out.weights_sha256) == 64
    (m,) = out.maps
    assert m.name == "n2q_quality" and m.unit_code == "1" and m.values.shape == hu.shape and m.values.dtype == np.float32
    with pytest.raises(ValueError, match="low_threshold"):
        run(vol, RunContext(), N2QOptions(low_threshold=2.0))


def _train_args(tmp_path: Path, name: str, extra: list[str] | None = None):
    import argparse

    from analysis.training import n2q_train

    parser = argparse.ArgumentParser()
    n2q_train.add_arguments(parser)
    return parser.parse_args(
        ["--out", str(tmp_path / f"{name}.pt"), "--epochs", "2", "--samples-per-epoch", "4", "--batch", "2",
         "--size", "64", "--phantoms", "2", "--threads", "1", "--seed", "3", "--device", "cpu",
         "--sim-matrix", "128", "--pool-cache", str(tmp_path / "pool.npz")] + (extra or [])
    )


def test_training_is_deterministic_and_resumable(tmp_path: Path) -> None:
    from analysis.training import n2q_train

    assert n2q_train.run(_train_args(tmp_path, "a")) == 0
    assert n2q_train.run(_train_args(tmp_path, "b")) == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["meta"]["samples_seen"] == 8 and len(a["meta"]["history"]) == 2
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # stop after epoch 1 (checkpoint), resume for epoch 2: same weights as the uninterrupted run
    assert n2q_train.run(_train_args(tmp_path, "c", ["--epochs", "2", "--max-minutes", "1e-9"])) == 0
    assert n2q_train.run(_train_args(tmp_path, "d", ["--resume", str(tmp_path / "c.pt.ckpt")])) == 0
    d = torch.load(tmp_path / "d.pt", weights_only=True)
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k].float(), d["state_dict"][k].float(), atol=1e-3), k


def test_time_schedule_and_init_from_instance_norm_weights(tmp_path: Path) -> None:
    from analysis.training import n2q_train

    lr = n2q_train._one_cycle_lr
    assert lr(1e-3, 0.0) == pytest.approx(4e-5) and lr(1e-3, 0.05) == pytest.approx(1e-3)
    assert lr(1e-3, 0.5) < lr(1e-3, 0.2) < 1e-3 and lr(1e-3, 1.0) == pytest.approx(4e-9)
    # v1.0-style InstanceNorm weights initialise a BatchNorm net: the convolutions carry over
    old = N2QNet(dropout=0.1, norm="instance")
    save_weights(old, tmp_path / "old.pt", {"in_channels": 2, "dropout": 0.1}, fp16=False)
    args = _train_args(tmp_path, "bn", ["--init", str(tmp_path / "old.pt"), "--epochs", "1", "--samples-per-epoch", "2",
                                        "--lr", "1e-12"])
    assert n2q_train.run(args) == 0
    new = torch.load(tmp_path / "bn.pt", weights_only=True)
    assert new["config"]["norm"] == "batch" and "enc.0.1.running_var" in new["state_dict"]
    torch.testing.assert_close(new["state_dict"]["enc.0.0.weight"].float(), old.enc[0][0].weight.detach().half().float(),
                               atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="--max-minutes"):
        n2q_train.run(_train_args(tmp_path, "t", ["--schedule", "time"]))
