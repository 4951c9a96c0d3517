"""N2Q (Noise2Quality) as a model of the platform: ``[analysis.n2q]`` options, metrics, the quality
map, the training distribution of the shipped weights, and ``run``. The network, the weights
format and the inference are ``analysis.n2q`` (torch)."""

from __future__ import annotations

from dataclasses import dataclass

from analysis.batching import validate_amp, validate_batch
from analysis.models.spec import NO_UNITS, MapSpec, MetricSpec, ModelSpec, TrainingDistribution, private

ALGORITHM = "N2Q Noise2Quality SSIM-map U-Net"
VERSION = "1.1"
MODEL_CARD = "analysis/weights/N2Q_MODEL_CARD.md"
MAP_NAME = "n2q_quality"
MAP_LABEL = "N2Q SSIM quality"


@dataclass(frozen=True)
class Options:
    """[analysis.n2q]"""

    weights: str = ""  # "" = the shipped analysis/weights/n2q.pt
    # slices per forward pass; left out = the device's default (1 on the CPU, up to 64 on CUDA
    # within the free GPU memory: analysis.n2q.DEFAULT_BATCH_CPU/CUDA)
    batch: int | None = None
    amp: str = "fp16"  # CUDA autocast: fp16, bf16 or off (fp32); the CPU always runs fp32
    # NHWC memory layout for the convolutions: faster on this CPU (bench/models.py), maps differ by
    # float rounding (up to ~1e-5) from the default layout, so off by default (no step in a trend)
    channels_last: bool = False
    low_threshold: float = 0.8  # quality below this counts as low in n2q_low_fraction

    def validate(self) -> None:
        if not 0.0 < self.low_threshold <= 1.0:
            raise ValueError(f"key 'low_threshold' must be in (0, 1], got {self.low_threshold}")
        validate_batch(self.batch)
        validate_amp(self.amp)


def _device(ctx) -> str:
    import logging

    import torch

    device = "cuda" if ctx.device == "cuda" and torch.cuda.is_available() else "cpu"
    if ctx.device == "cuda" and device == "cpu":
        logging.getLogger(__name__).warning("CUDA requested but not available: N2Q runs on the CPU")
    return device


def run(volume, ctx, options: Options | None = None):
    """N2Q over one series: a quality map per slice and the body summary (see ``analysis.n2q``)."""
    from analysis import n2q
    from analysis.results import SeriesSkipped

    opts = options or Options()
    opts.validate()
    device = _device(ctx)
    if volume.n_slices == 0:
        raise SeriesSkipped("no slices")
    quality, probs, sha = n2q.predict_quality(volume.hu, weights=opts.weights or None, device=device,
                                              batch=opts.batch, amp=opts.amp, channels_last=opts.channels_last)
    return _output(volume, quality, probs, sha, device, opts)


def run_many(volumes, ctx, options: Options | None = None):
    """Series batching: N2Q over several series at once, their slices sharing passes of the full
    batch (``analysis.n2q.predict_quality_many``); one output per series, as ``run`` gives it but
    for the float rounding of the fixed pass shape (the parameter ``series_batch=on`` says so)."""
    from analysis import n2q
    from analysis.results import SeriesSkipped

    opts = options or Options()
    opts.validate()
    device = _device(ctx)
    if any(v.n_slices == 0 for v in volumes):
        raise SeriesSkipped("no slices")
    qs, probs, sha, _passes = n2q.predict_quality_many([v.hu for v in volumes], weights=opts.weights or None,
                                                       device=device, batch=opts.batch, amp=opts.amp,
                                                       channels_last=opts.channels_last)
    outs = [_output(v, q, p, sha, device, opts) for v, q, p in zip(volumes, qs, probs)]
    for out in outs:
        out.parameters.append("series_batch=on")
    return outs


def batch_of(options: Options, device: str) -> int:
    """Slices per pass on ``device`` (the fill target of series batching)."""
    from analysis import n2q

    return n2q.resolved_batch(options.batch, device)


def _output(volume, quality, probs, sha, device, opts):
    import numpy as np

    from analysis import n2q
    from analysis.mask import volume_body_masks
    from analysis.results import MapOutput, ModelOutput

    body = volume_body_masks(volume)  # = body_mask per slice, computed once per volume for all models
    out = ModelOutput(name="n2q", algorithm=ALGORITHM, version=VERSION, weights_sha256=sha)
    if device == "cuda":  # the precision is part of the result's provenance (the CPU is always fp32)
        out.parameters.append(f"cuda_amp={opts.amp}")
    mean, p05, low = n2q.summarise(quality, body, opts.low_threshold)
    reason = "no body pixels found in any slice"
    out.set_metric("n2q_mean_quality", mean, reason)
    out.set_metric("n2q_p05_quality", p05, reason)
    out.set_metric("n2q_low_fraction", low, reason)
    per_slice = np.full(volume.n_slices, np.nan)
    for i in range(volume.n_slices):
        if body[i].any():
            per_slice[i] = float(quality[i][body[i]].mean())
    out.slice_metrics["n2q_mean_quality"] = per_slice
    dose_idx = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1)
    expected = np.array([n2q.DOSE_CLASSES[k] for k in dose_idx], dtype=float)
    if not np.isnan(probs).all():
        out.slice_metrics["n2q_dose_class"] = expected
    out.maps.append(MapOutput(name=MAP_NAME, label=MAP_LABEL, values=quality.astype(np.float32), unit_code="1",
                              unit_meaning="no units"))
    return out


SPEC = ModelSpec(
    name="n2q",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    run_many=run_many,
    batch_of=batch_of,
    order=30,
    options=Options,
    requires=("torch",),
    uses_torch=True,
    learned=True,
    model_card=MODEL_CARD,
    trainer="analysis.training.n2q_train",
    summary="learned pixel-wise SSIM quality map (no reference)",
    metrics=(
        MetricSpec("n2q_mean_quality", private("N2Q_MEAN", "N2Q mean quality"), NO_UNITS, "N2Q mean quality",
                   trended=True, in_report=True,
                   meaning="learned image quality (SSIM units, 0-1) over the body; higher is better"),
        MetricSpec("n2q_p05_quality", private("N2Q_P05", "N2Q 5th percentile quality"), NO_UNITS,
                   "N2Q 5th-percentile quality", trended=True, in_report=True,
                   meaning="5th percentile of the learned quality over the body; higher is better"),
        MetricSpec("n2q_low_fraction", private("N2Q_LOW_FRAC", "N2Q low-quality fraction"), NO_UNITS,
                   "N2Q low-quality fraction", trended=True, in_report=True,
                   meaning="fraction of the body below the low-quality threshold; lower is better"),
    ),
    maps=(MapSpec(MAP_NAME, private("N2Q_QUALITY", "N2Q pixel-wise quality"), NO_UNITS, MAP_LABEL,
                  model_matrix=256, why="N2Q predicts at 256 x 256 (the slice padded to a square)"),),
    # model card, "Training distribution": head and body (neck, chest, abdomen) slices; global noise
    # of the training samples from routine dose (1-12 HU) down to 5 % dose (x 4.5): 1-60 HU;
    # real training slices 1 mm and 5 mm thick
    training=TrainingDistribution(
        body_regions=("HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "CHEST", "THORAX", "ABDOMEN", "PANCREAS"),
        global_noise_hu=(1.0, 60.0), slice_thickness_mm=(1.0, 5.0), source=MODEL_CARD),
    moved_keys={"n2q_low_threshold": "low_threshold", "n2q_weights": "weights", "n2q_batch": "batch"},
)
