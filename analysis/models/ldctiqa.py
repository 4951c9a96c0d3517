"""LDCTIQA (the MICCAI 2023 LDCTIQA challenge-winning Likert model, ldct-benchmark's multi-head
Swin-T) as a model of the platform. Network, preprocessing and weights loading are
``analysis.ldctiqa``. No weights ship with the node: ``[analysis.ldctiqa] weights`` names the
user's copy of ldct-benchmark's published ``ldct-iqa.pt`` (see the model card). Without it the
model's metrics are null with the reason, and the node warns once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from analysis.batching import validate_batch
from analysis.models.spec import NO_UNITS, MetricSpec, ModelSpec, TrainingDistribution, private

ALGORITHM = "LDCTIQA (ldct-benchmark multi-head Swin-T)"
VERSION = "1.0"
MODEL_CARD = "analysis/weights/LDCTIQA_MODEL_CARD.md"
DEFAULT_MAX_SLICES = 24  # = analysis.ldctiqa.DEFAULT_MAX_SLICES: a 300-slice series stays under the 60 s CPU budget


@dataclass(frozen=True)
class Options:
    """[analysis.ldctiqa]"""

    weights: str = ""  # path of ldct-benchmark's ldct-iqa.pt; "" = not installed
    max_slices: int = DEFAULT_MAX_SLICES  # evenly spaced slices scored per series; 0 = all
    # slices per forward pass; left out = the device's default (4 on the CPU, 32 on CUDA:
    # analysis.ldctiqa.DEFAULT_BATCH_CPU/CUDA), the same rule as [analysis.n2q] and [analysis.d2iqa] batch
    batch: int | None = None
    # keys of this table that were renamed: the old key is refused with one line naming the new one
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"batch_size": "batch"}

    def validate(self) -> None:
        if self.max_slices < 0:
            raise ValueError(f"key 'max_slices' must be >= 0, got {self.max_slices}")
        validate_batch(self.batch)


def not_installed(options: Options) -> str | None:
    """The start-up warning when the weights file is missing (None when it is there)."""
    from analysis.ldctiqa import not_installed_reason

    if not options.weights:
        return not_installed_reason(None) + "; set [analysis.ldctiqa] weights"
    if not Path(options.weights).expanduser().is_file():
        return not_installed_reason(options.weights)
    return None


def _loaded(ctx, opts):
    """(device, loaded weights, the output without scores yet)."""
    import torch

    from analysis import ldctiqa

    device = "cuda" if ctx.device == "cuda" and torch.cuda.is_available() else "cpu"
    loaded = ldctiqa.load_weights(opts.weights or None, device)  # WeightsNotInstalled -> null metrics
    return device, loaded


def _new_output(loaded):
    from analysis.results import ModelOutput

    out = ModelOutput(name="ldctiqa", algorithm=ALGORITHM, version=VERSION, weights_sha256=loaded.sha256)
    if loaded.labels not in (None, "site"):  # e.g. synthetic-label weights of `qa-node train ldctiqa --labels synthetic`
        out.parameters.append(f"labels={loaded.labels}")
        import logging

        logging.getLogger(__name__).warning(
            "ldctiqa: the weights %s were trained on %s labels, not on raters' Likert scores", loaded.path, loaded.labels)
    return out


def run(volume, ctx, options: Options | None = None):
    """Per-slice and series LDCTIQA scores (means over the scored, evenly spaced slices)."""
    from analysis import ldctiqa

    opts = options or Options()
    opts.validate()
    device, loaded = _loaded(ctx, opts)
    out = _new_output(loaded)
    n = volume.n_slices
    if n == 0:
        for key in ("ldctiqa_score", "ldctiqa_expected_score"):
            out.set_metric(key, None, "no slices")
        return out
    res = ldctiqa.score_series(loaded.net, volume.hu, device=device, max_slices=opts.max_slices,
                               batch_size=opts.batch)
    return _scored(out, res, n)


def run_many(volumes, ctx, options: Options | None = None):
    """Series batching: the scored slices of several series share passes of the full batch
    (``analysis.ldctiqa.score_many``); one output per series, with ``series_batch=on``."""
    from analysis import ldctiqa

    opts = options or Options()
    opts.validate()
    device, loaded = _loaded(ctx, opts)
    outs = [_new_output(loaded) for _ in volumes]
    scored = [i for i, v in enumerate(volumes) if v.n_slices > 0]
    for i, v in enumerate(volumes):
        if v.n_slices == 0:
            for key in ("ldctiqa_score", "ldctiqa_expected_score"):
                outs[i].set_metric(key, None, "no slices")
    if scored:
        res, _passes = ldctiqa.score_many(loaded.net, [volumes[i].hu for i in scored], device=device,
                                          max_slices=opts.max_slices, batch_size=opts.batch)
        for i, r in zip(scored, res):
            _scored(outs[i], r, volumes[i].n_slices)
    for out in outs:
        out.parameters.append("series_batch=on")
    return outs


def batch_of(options: Options, device: str) -> int:
    """Scored slices per pass on ``device`` (the fill target of series batching); 0 without weights."""
    from analysis import ldctiqa

    return ldctiqa.resolved_batch(options.batch, device) if options.weights else 0


def _scored(out, res, n: int):
    import numpy as np

    from analysis import ldctiqa

    out.slice_metrics["ldctiqa_score"] = np.asarray(res.slice_score, float)
    out.slice_metrics["ldctiqa_expected_score"] = np.asarray(res.slice_expected_score, float)
    out.set_metric("ldctiqa_score", res.series_score, "no slice scored")
    out.set_metric("ldctiqa_expected_score", res.series_expected_score, "no slice scored")
    out.parameters.append(f"scored_slices={len(res.indices)} of {n}")
    if res.resampled:
        rows, cols = res.matrix
        out.parameters.append(f"resampled={rows}x{cols} to {ldctiqa.INPUT_SIZE}x{ldctiqa.INPUT_SIZE}")
        out.info["ldctiqa_resampled"] = (f"slices resampled from {rows} x {cols} to {ldctiqa.INPUT_SIZE} x "
                                         f"{ldctiqa.INPUT_SIZE} (the model's input)")
    return out


SPEC = ModelSpec(
    name="ldctiqa",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    run_many=run_many,
    batch_of=batch_of,
    order=50,
    options=Options,
    requires=("torch",),
    uses_torch=True,
    learned=True,
    model_card=MODEL_CARD,
    trainer="analysis.training.ldctiqa_train",
    summary="learned radiologist-like Likert quality score 0-4 (ldct-benchmark's ldct-iqa.pt, user supplied)",
    startup_check=not_installed,
    metrics=(
        MetricSpec("ldctiqa_score", private("LDCTIQA_SCORE", "LDCTIQA Likert score"), NO_UNITS, "LDCTIQA score (0-4)",
                   trended=True, in_report=True,
                   meaning="learned radiologist-like quality score (0-4, steps of 0.2); higher is better"),
        MetricSpec("ldctiqa_expected_score", private("LDCTIQA_EXPECTED", "LDCTIQA expected Likert score"), NO_UNITS,
                   "LDCTIQA expected score (0-4)", trended=True, in_report=True,
                   meaning="probability-weighted LDCTIQA score (0-4, continuous); higher is better"),
    ),
    # model card, "Training distribution": abdominal CT only, four noise levels (not stated in HU),
    # slice thicknesses not stated: only the body region can be checked
    training=TrainingDistribution(body_regions=("ABDOMEN", "ABDOMENPELVIS", "PANCREAS", "LIVER"),
                                  source=MODEL_CARD),
)
