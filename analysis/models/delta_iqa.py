"""Delta-IQA as a model of the platform: ``[analysis.delta_iqa]`` options, the score and ``run``.
The network, its input and inference are ``analysis.delta_iqa`` (torch); training on a site's
ratings is ``analysis.training.delta_iqa`` (``qa-node train delta_iqa``).

Delta-IQA publishes no weights, and its authors say it must not be used on "different patient groups
without prior local validation": the model is enabled only by ``[analysis.delta_iqa] weights = PATH``
(weights the site trained on its own raters' scores). Without them ``delta_iqa_score`` is null with
the reason. Score = the probability-weighted mean Likert class (continuous, 0-4), averaged over an
evenly spaced subset of the slices.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.models.spec import NO_UNITS, MetricSpec, ModelSpec, private

ALGORITHM = "Delta-IQA Likert CNN (site-trained)"
VERSION = "1.0"
MODEL_CARD = "analysis/weights/DELTA_IQA_MODEL_CARD.md"
DEFAULT_MAX_SLICES = 32
NO_WEIGHTS = ("Delta-IQA has no weights: it publishes none and must be trained on the site's own ratings "
              "(qa-node rate, qa-node train delta_iqa), then enabled with [analysis.delta_iqa] weights = PATH")


@dataclass(frozen=True)
class Options:
    """[analysis.delta_iqa]"""

    weights: str = ""  # the file `qa-node train delta_iqa --out` wrote; "" = not installed (null score)
    max_slices: int = DEFAULT_MAX_SLICES  # evenly spaced slices scored per series; 0 = all
    batch: int = 8  # slices per forward pass

    def validate(self) -> None:
        if self.max_slices < 0:
            raise ValueError(f"key 'max_slices' must be >= 0, got {self.max_slices}")
        if self.batch < 1:
            raise ValueError(f"key 'batch' must be >= 1, got {self.batch}")


def run(volume, ctx, options: Options | None = None):
    """Per-slice and series Delta-IQA score (metric ``delta_iqa_score``; slices outside the subset are nan)."""
    from analysis import delta_iqa

    opts = options or Options()
    opts.validate()
    out, model, device, idx = _start(volume, ctx, opts)
    if model is None:
        return out
    probs = delta_iqa.predict_probs(model.net, volume.hu[idx], device=device, batch=opts.batch)
    return _scored(out, idx, probs)


def run_many(volumes, ctx, options: Options | None = None):
    """Series batching: the scored slices of several series share passes of the full batch
    (``analysis.delta_iqa.predict_probs_many``); one output per series, with ``series_batch=on``."""
    from analysis import delta_iqa

    opts = options or Options()
    opts.validate()
    started = [_start(v, ctx, opts) for v in volumes]
    todo = [(i, s) for i, s in enumerate(started) if s[1] is not None]
    if todo:
        model, device = todo[0][1][1], todo[0][1][2]
        probs, _passes = delta_iqa.predict_probs_many(model.net, [volumes[i].hu[s[3]] for i, s in todo],
                                                      device=device, batch=opts.batch)
        for (i, s), p in zip(todo, probs):
            _scored(s[0], s[3], p)
    outs = [s[0] for s in started]
    for out, s in zip(outs, started):
        if s[1] is not None:
            out.parameters.append("series_batch=on")
    return outs


def batch_of(options: Options, device: str) -> int:
    """Scored slices per pass (the fill target of series batching): ``batch`` on every device; 0
    without weights (nothing is scored)."""
    return options.batch if options.weights else 0


def _start(volume, ctx, opts):
    """(output, loaded model or None when there is nothing to score, device, scored slice indices)."""
    import logging

    import numpy as np
    import torch

    from analysis import delta_iqa
    from analysis.d2iqa import select_slices
    from analysis.results import ModelOutput
    from analysis.weights import WeightsNotInstalled

    out = ModelOutput(name="delta_iqa", algorithm=ALGORITHM, version=VERSION)
    n = volume.n_slices
    per_slice = np.full(n, np.nan)
    out.slice_metrics["delta_iqa_score"] = per_slice
    if not opts.weights:
        out.set_metric("delta_iqa_score", None, NO_WEIGHTS)
        return out, None, None, None
    device = "cuda" if ctx.device == "cuda" and torch.cuda.is_available() else "cpu"
    try:
        model = delta_iqa.load_model(opts.weights, device)
    except WeightsNotInstalled as exc:
        out.set_metric("delta_iqa_score", None, str(exc))
        return out, None, device, None
    out.weights_sha256 = model.sha256
    if model.labels != "site":
        out.parameters.append(f"labels={model.labels}")
        logging.getLogger(__name__).warning(
            "delta_iqa: the weights %s were trained on %s labels, not on raters' Likert scores", model.path, model.labels)
    if volume.hu.shape[1:] != (delta_iqa.INPUT_SIZE, delta_iqa.INPUT_SIZE):
        out.parameters.append(f"resampled={volume.hu.shape[2]}x{volume.hu.shape[1]} to 512x512")
    idx = select_slices(n, opts.max_slices)
    if len(idx) == 0:
        out.set_metric("delta_iqa_score", None, "no slices")
        return out, None, device, None
    return out, model, device, idx


def _scored(out, idx, probs):
    import numpy as np

    from analysis import delta_iqa

    per_slice = out.slice_metrics["delta_iqa_score"]
    per_slice[idx] = delta_iqa.expected_score(probs)
    out.set_metric("delta_iqa_score", float(np.mean(per_slice[idx])))
    return out


SPEC = ModelSpec(
    name="delta_iqa",
    algorithm=ALGORITHM,
    version=VERSION,
    run=run,
    run_many=run_many,
    batch_of=batch_of,
    order=60,
    options=Options,
    requires=("torch",),
    uses_torch=True,
    learned=True,
    model_card=MODEL_CARD,
    trainer="analysis.training.delta_iqa",
    summary="Likert 0-4 image quality CNN (Delta-IQA), trained on the site's own ratings",
    metrics=(
        MetricSpec("delta_iqa_score", private("DELTA_IQA_SCORE", "Delta-IQA Likert score"), NO_UNITS,
                   "Delta-IQA score (Likert 0-4)", trended=False, in_report=True,
                   meaning="expected Likert class (0 bad - 4 excellent) from site-trained weights; higher is better"),
    ),
)
