"""D2IQA as a model of the platform: ``[analysis.d2iqa]`` options, the score, the training
distribution of the shipped detector, and ``run``. Detector, insertion and scoring are
``analysis.d2iqa`` (torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from analysis.batching import validate_amp, validate_batch
from analysis.models.spec import NO_UNITS, MetricSpec, ModelSpec, TrainingDistribution, private

ALGORITHM = "D2IQA (virtual-object detection mAP)"
VERSION = "1.0"
MODEL_CARD = "analysis/weights/D2IQA_MODEL_CARD.md"
DEFAULT_TRIALS = 50  # = analysis.d2iqa.DEFAULT_TRIALS (T=50: score SD ~0.023 vs 0.038 at T=20, model card)
DEFAULT_MAX_SLICES = 16  # = analysis.d2iqa.DEFAULT_MAX_SLICES


@dataclass(frozen=True)
class Options:
    """[analysis.d2iqa]"""

    weights: str = ""  # "" = the shipped analysis/weights/d2iqa.pt
    trials: int = DEFAULT_TRIALS  # insertion trials per slice
    max_slices: int = DEFAULT_MAX_SLICES  # evenly spaced slices scored per series; 0 = all
    seed: int = 0
    # trial images per forward pass; left out = the device's default (8 on the CPU, up to 64 on CUDA
    # within the free GPU memory: analysis.d2iqa.DEFAULT_BATCH_CPU/CUDA)
    batch: int | None = None
    amp: str = "fp16"  # CUDA: autocast after the fp32 stem: fp16, bf16 or off (fp32); the CPU always runs fp32
    # NHWC memory layout for the convolutions (see [analysis.n2q] channels_last); off by default
    channels_last: bool = False
    # keys of this table that were renamed: the old key is refused with one line naming the new one
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"batch_size": "batch"}

    def validate(self) -> None:
        for key, minimum in (("trials", 1), ("max_slices", 0), ("seed", 0)):
            if getattr(self, key) < minimum:
                raise ValueError(f"key '{key}' must be >= {minimum}, got {getattr(self, key)}")
        validate_batch(self.batch)
        validate_amp(self.amp)


def run(volume, ctx, options: Options | None = None):
    """Per-slice and series D2IQA score (metric ``d2iqa_score``; slices outside the subset are nan)."""
    import logging
    import time
    from pathlib import Path

    import numpy as np
    import torch

    from analysis import d2iqa
    from analysis.mask import volume_body_masks
    from analysis.results import ModelOutput
    from analysis.weights import WeightsNotInstalled

    opts = options or Options()
    opts.validate()
    device = "cuda" if ctx.device == "cuda" and torch.cuda.is_available() else "cpu"
    weights = Path(opts.weights or d2iqa.WEIGHTS_PATH)
    out = ModelOutput(name="d2iqa", algorithm=ALGORITHM, version=VERSION)
    n = volume.n_slices
    slice_scores = np.full(n, np.nan)
    out.slice_metrics["d2iqa_score"] = slice_scores
    try:
        model = d2iqa.load_model(weights, device)
    except WeightsNotInstalled as exc:
        out.set_metric("d2iqa_score", None, str(exc))
        return out
    out.weights_sha256 = model.sha256
    if device == "cuda":  # the precision is part of the result's provenance (the CPU is always fp32)
        out.parameters.append(f"cuda_amp={opts.amp}")
    t0 = time.perf_counter()
    idx = d2iqa.select_slices(n, opts.max_slices)
    masks = volume_body_masks(volume)  # shared with the other models of the run (cached on the volume)
    for i in idx:
        s = d2iqa.score_slice(model, volume.hu[i], trials=opts.trials, seed=opts.seed + int(i),
                              batch_size=opts.batch, body=masks[i], amp=opts.amp,
                              channels_last=opts.channels_last)
        slice_scores[i] = s.score
    n_ok = int(np.isfinite(slice_scores).sum())
    logging.getLogger(__name__).info("d2iqa: %d/%d slices scored (T=%d) in %.1f s on %s", n_ok, len(idx),
                                     opts.trials, time.perf_counter() - t0, device)
    if n_ok == 0:
        out.set_metric("d2iqa_score", None, "no slice of the subset has room for virtual objects (no soft-tissue region)")
    else:
        out.set_metric("d2iqa_score", float(np.nanmean(slice_scores)))
    return out


SPEC = ModelSpec(
    name="d2iqa",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    order=40,
    options=Options,
    requires=("torch",),
    uses_torch=True,
    learned=True,
    model_card=MODEL_CARD,
    trainer="analysis.training.d2iqa_train",
    summary="learned lesion detectability: detector mAP on virtual objects inserted into the slices",
    metrics=(
        MetricSpec("d2iqa_score", private("D2IQA_SCORE", "D2IQA detectability score"), NO_UNITS, "D2IQA score (mAP)",
                   trended=True, in_report=True, meaning="learned lesion detectability (mAP, 0-1); higher is better"),
    ),
    # model card, "Training distribution": head and body phantoms, a skull phantom, a neck slice;
    # soft-tissue noise from routine dose (2.5-25 HU) down to 4 % dose (x 5): 2.5-125 HU; the real
    # training slices (S2020, bad_sequence) are 1 mm thick (the phantoms have no thickness)
    training=TrainingDistribution(
        body_regions=("HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "CHEST", "THORAX", "ABDOMEN"),
        global_noise_hu=(2.5, 125.0), slice_thickness_mm=(1.0, 1.0), source=MODEL_CARD),
    moved_keys={"d2iqa_trials": "trials", "d2iqa_max_slices": "max_slices", "d2iqa_weights": "weights",
                "d2iqa_seed": "seed", "d2iqa_batch_size": "batch"},
)
