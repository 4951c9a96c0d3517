"""Batched inference of N2Q and D2IQA (issue 15, item 4): the batch changes speed, never results.

On the CPU (fp32) a slice's N2Q map and a trial image's D2IQA detections are the same whether it
runs alone or with others, at batch 1, 3 and a batch that does not divide the count (and with
``channels_last``, within float rounding); the ``batch`` and ``amp`` keys are validated; a CUDA out-of-memory error halves the batch instead of failing.
The CUDA tests (skipped without a GPU) compare the GPU under autocast with the CPU in fp32 within
the tolerances stated there; they have not run on a GPU yet (no device was lent when they were
written)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from analysis import batching, d2iqa, n2q
from analysis.d2iqa_insert import placement_mask
from analysis.mask import body_mask
from analysis.models import d2iqa as d2iqa_model
from analysis.models import n2q as n2q_model
from analysis.results import RunContext
from analysis.volume import load_series
from node.config import ConfigError, settings_from_dict
from tests.helpers import PHANTOM_5MM, require

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
# tolerances of the GPU (autocast) against the CPU (fp32), set before any GPU run: the N2Q map is
# in SSIM units (0-1); a D2IQA score is a pooled mAP (0-1) over the trials of a slice
N2Q_AMP_MAX_ABS = 0.02  # any pixel of the map
N2Q_AMP_MEAN_ABS = 2e-3  # mean over the pixels
D2IQA_AMP_SLICE = 0.05  # any slice's pooled mAP
D2IQA_AMP_SERIES = 0.02  # the series score (mean of the slices)


@pytest.fixture(scope="module")
def phantom():
    """Six real 512 x 512 slices (the shared 5 mm head phantom series)."""
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:6]
    vol = load_series(files)
    assert vol.hu.shape == (6, 512, 512)
    return vol


def _n2q_or_skip():
    try:
        n2q.load_model()
    except Exception as exc:  # WeightsNotInstalled
        pytest.skip(f"N2Q weights: {exc}")


def _d2iqa_or_skip(device: str = "cpu") -> d2iqa.LoadedModel:
    if not d2iqa.WEIGHTS_PATH.is_file():
        pytest.skip("D2IQA weights are not installed")
    return d2iqa.load_model(d2iqa.WEIGHTS_PATH, device)


# ------------------------------------------------------------------------------------ CPU, fp32
def test_n2q_map_does_not_depend_on_the_batch(phantom) -> None:
    _n2q_or_skip()
    torch.set_num_threads(1)
    hu = phantom.hu[:5].copy()  # three slices as they are (quality ~0.99), two with 80 HU of added noise
    hu[3:] += np.random.default_rng(0).normal(0.0, 80.0, hu[3:].shape).astype(np.float32)
    ref, ref_p, _ = n2q.predict_quality(hu, batch=1)
    assert ref.shape == (5, 512, 512) and ref.dtype == np.float32
    body = body_mask(hu[0], phantom.pixel_spacing_mm), body_mask(phantom.hu[3], phantom.pixel_spacing_mm)
    assert ref[0][body[0]].mean() > 0.99 and ref[3][body[1]].mean() < 0.95  # a real map, not a constant
    q, p, _ = n2q.predict_quality(hu, batch=3)  # 3 does not divide the 5 slices: a batch of 3, one of 2
    assert np.abs(q - ref).max() <= 1e-5
    assert np.abs(p - ref_p).max() <= 1e-5
    # the device default on the CPU is 1 (the fastest on this CPU, bench/models.py); 8 (the node's
    # batch before) gives the same map: one batch of 5 here
    assert batching.resolve_batch(None, "cpu", cpu_default=n2q.DEFAULT_BATCH_CPU,
                                  cuda_default=n2q.DEFAULT_BATCH_CUDA, item_bytes=n2q.ITEM_BYTES) == 1
    q, _, _ = n2q.predict_quality(hu, batch=8)
    assert np.abs(q - ref).max() <= 1e-5
    # [analysis.n2q] channels_last = true (off by default): NHWC convolutions, float rounding only
    q, _, _ = n2q.predict_quality(hu, channels_last=True)
    assert np.abs(q - ref).max() <= 1e-5


def test_d2iqa_detections_and_map_do_not_depend_on_the_batch(phantom) -> None:
    model = _d2iqa_or_skip()
    torch.set_num_threads(1)
    hu = phantom.hu[3]
    allowed = placement_mask(hu, body=body_mask(hu, phantom.pixel_spacing_mm))
    layouts = d2iqa.trial_layouts(allowed, 7, seed=5)  # 7 trials: neither 3 nor 4 divides them
    ref_g, ref_d = d2iqa.detect_trials(model, hu, layouts, batch_size=1)
    assert len(ref_d) == 7 and sum(len(d.scores) for d in ref_d) > 0
    ref_map = d2iqa.pooled_map(ref_g, ref_d)
    assert 0.0 < ref_map <= 1.0
    for b in (3, 4, None):  # None: the CPU default (8, one batch)
        g, d = d2iqa.detect_trials(model, hu, layouts, batch_size=b)
        for a, r in zip(d, ref_d, strict=True):
            assert np.array_equal(a.classes, r.classes), b
            np.testing.assert_allclose(a.scores, r.scores, rtol=0, atol=1e-5)
            np.testing.assert_allclose(a.boxes, r.boxes, rtol=0, atol=1e-3)
        assert d2iqa.pooled_map(g, d) == ref_map, b
    s = d2iqa.score_slice(model, hu, layouts, batch_size=3)
    assert s.score == ref_map and s.n_trials == 7


def test_batch_and_amp_keys_are_validated_naming_the_key() -> None:
    cases = {
        ("n2q", "batch", 0): "key 'analysis.n2q.batch' must be >= 1 (or left out for the device's default), got 0",
        ("n2q", "batch", -3): "key 'analysis.n2q.batch' must be >= 1 (or left out for the device's default), got -3",
        ("n2q", "batch", "8"): "key 'analysis.n2q.batch' must be an integer, got '8'",
        ("d2iqa", "batch", 0): "key 'analysis.d2iqa.batch' must be >= 1 (or left out for the device's default), got 0",
        ("d2iqa", "batch", -1): "key 'analysis.d2iqa.batch' must be >= 1 (or left out for the device's default), got -1",
        ("d2iqa", "batch", "big"): "key 'analysis.d2iqa.batch' must be an integer, got 'big'",
        ("d2iqa", "batch", 2.5): "key 'analysis.d2iqa.batch' must be an integer, got 2.5",
        ("n2q", "amp", "fp8"): "key 'analysis.n2q.amp' must be one of fp16, bf16, off, got 'fp8'",
        ("d2iqa", "batch_size", 8): ("key 'analysis.d2iqa.batch_size' was renamed: write it as [analysis.d2iqa] "
                                     "batch = ... (see config.toml), or leave it out for the default"),
        ("ldctiqa", "batch", 0): "key 'analysis.ldctiqa.batch' must be >= 1 (or left out for the device's default), got 0",
        ("ldctiqa", "batch_size", 4): ("key 'analysis.ldctiqa.batch_size' was renamed: write it as [analysis.ldctiqa] "
                                       "batch = ... (see config.toml), or leave it out for the default"),
    }
    for (model, key, value), message in cases.items():
        with pytest.raises(ConfigError) as err:
            settings_from_dict({"node": {}, "analysis": {model: {key: value}}}, "c.toml")
        assert str(err.value) == f"c.toml: {message}", (model, key, value)
    s = settings_from_dict({"node": {}, "analysis": {"n2q": {"batch": 5}, "d2iqa": {"amp": "off"}}}, "c.toml")
    assert s.analysis.model_options["n2q"] == n2q_model.Options(batch=5)
    assert s.analysis.model_options["d2iqa"] == d2iqa_model.Options(amp="off")  # batch left out: None
    assert d2iqa_model.Options().batch is None and n2q_model.Options().batch is None


def test_cuda_default_batch_is_bounded_by_free_memory(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))  # 1 GiB free
    # half of 1 GiB over 64 MiB per N2Q slice = 8; over a 512 x 512 D2IQA crop (64 MiB) also 8
    assert batching.resolve_batch(None, "cuda", cpu_default=8, cuda_default=64, item_bytes=n2q.ITEM_BYTES) == 8
    assert d2iqa.batch_for("cuda", None, (512, 512)) == 8
    assert d2iqa.batch_for("cuda", None, (128, 128)) == 64  # small crops: the CUDA default
    assert d2iqa.batch_for("cuda", 3, (512, 512)) == 3  # explicit: as given
    assert d2iqa.batch_for("cpu", None, (512, 512)) == 8
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 20, 80 << 30))  # 10 MiB free
    assert d2iqa.batch_for("cuda", None, (512, 512)) == 1


def test_cuda_out_of_memory_halves_the_batch_and_loses_nothing(caplog) -> None:
    calls = []

    def fn(i, j):
        calls.append((i, j))
        if j - i > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(i, j))

    with caplog.at_level(logging.WARNING, logger="analysis.batching"):
        parts = batching.run_batches(fn, 7, 8, "cuda", "N2Q")
    assert [x for p in parts for x in p] == list(range(7))
    assert calls == [(0, 7), (0, 4), (0, 2), (2, 4), (4, 6), (6, 7)]
    assert [r.getMessage() for r in caplog.records] == ["N2Q: CUDA out of memory, batch reduced to 4"]
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU, or at batch 1, it propagates
        batching.run_batches(fn, 7, 8, "cpu")
    assert batching.autocast("cpu", "fp16").__class__.__name__ == "nullcontext"  # the CPU stays fp32
    assert batching.amp_dtype("cpu", "bf16") is None and batching.amp_dtype("cuda", "off") is None
    assert batching.amp_dtype("cuda:0", "bf16") is torch.bfloat16


# ---------------------------------------------------------------------------------- CUDA, autocast
@needs_cuda
def test_cuda_n2q_autocast_agrees_with_the_cpu(phantom) -> None:
    _n2q_or_skip()
    cpu, cpu_p, _ = n2q.predict_quality(phantom.hu, batch=4)
    for amp in ("fp16", "bf16"):
        gpu, gpu_p, _ = n2q.predict_quality(phantom.hu, device="cuda", amp=amp)
        assert np.abs(gpu - cpu).max() < N2Q_AMP_MAX_ABS, amp
        assert np.abs(gpu - cpu).mean() < N2Q_AMP_MEAN_ABS, amp
        assert np.array_equal(gpu_p.argmax(1), cpu_p.argmax(1)), amp
    one, _, _ = n2q.predict_quality(phantom.hu, device="cuda", batch=1)
    full, _, _ = n2q.predict_quality(phantom.hu, device="cuda", batch=6)
    assert np.abs(one - full).max() < 1e-3  # batching on the GPU (fp16 kernels may differ by batch)
    off, _, _ = n2q.predict_quality(phantom.hu, device="cuda", amp="off")
    assert np.abs(off - cpu).max() < 1e-3  # fp32 on the GPU


@needs_cuda
def test_cuda_d2iqa_autocast_agrees_with_the_cpu(phantom) -> None:
    cpu_model, gpu_model = _d2iqa_or_skip("cpu"), _d2iqa_or_skip("cuda")
    masks = np.stack([body_mask(s, phantom.pixel_spacing_mm) for s in phantom.hu])
    for amp in ("fp16", "off"):
        cpu_s, gpu_s = [], []
        for i in range(phantom.n_slices):
            kw = dict(trials=20, seed=int(i), body=masks[i])
            cpu_s.append(d2iqa.score_slice(cpu_model, phantom.hu[i], **kw).score)
            gpu_s.append(d2iqa.score_slice(gpu_model, phantom.hu[i], batch_size=None, amp=amp, **kw).score)
        cpu_a, gpu_a = np.array(cpu_s), np.array(gpu_s)
        assert np.array_equal(np.isfinite(cpu_a), np.isfinite(gpu_a))
        assert np.nanmax(np.abs(gpu_a - cpu_a)) <= D2IQA_AMP_SLICE, (amp, cpu_a, gpu_a)
        assert abs(np.nanmean(gpu_a) - np.nanmean(cpu_a)) <= D2IQA_AMP_SERIES, (amp, cpu_a, gpu_a)


@needs_cuda
def test_cuda_runs_record_their_precision(phantom) -> None:
    _n2q_or_skip()
    _d2iqa_or_skip("cuda")
    ctx = RunContext(device="cuda")
    assert "cuda_amp=fp16" in n2q_model.run(phantom, ctx).parameters
    out = d2iqa_model.run(phantom, ctx, d2iqa_model.Options(trials=4, max_slices=1, amp="off"))
    assert "cuda_amp=off" in out.parameters
