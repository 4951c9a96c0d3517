"""The analysis pipeline: load series -> select/validate -> run models -> results.

The models are the specs of ``analysis.models`` (one module per model); a model's code is imported
only when it runs, so that a run of the classical metrics never imports torch. Each model's
``run(volume, ctx, options) -> ModelOutput`` (see ``analysis.results``) gets its own options
(``ctx.options_for(name)``, the table ``[analysis.<name>]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis import models as registry
from analysis.models.spec import ModelSpec
from analysis.results import ModelOutput, RunContext, SeriesSkipped
from analysis.volume import CTVolume

log = logging.getLogger(__name__)


class _Registry(Mapping):
    """name -> ModelSpec, in run order (read from ``analysis.models`` on first use)."""

    def __getitem__(self, name: str) -> ModelSpec:
        return registry.specs()[name]

    def __iter__(self):
        return iter(registry.specs())

    def __len__(self) -> int:
        return len(registry.specs())


MODEL_REGISTRY: Mapping[str, ModelSpec] = _Registry()


def default_models() -> list[str]:
    return list(registry.default_models())


def available_models() -> list[str]:
    """Models whose requirements are importable in this installation."""
    return [name for name, spec in registry.specs().items() if registry.is_available(spec)]


def resolve_model(name: str) -> ModelSpec:
    spec = registry.get(name)
    if not registry.is_available(spec):
        raise ValueError(f"Model {name!r} is not available in this installation (needs {', '.join(spec.requires)})")
    return spec


def parse_models(spec: str | Sequence[str] | None) -> list[str]:
    """``"basic,classical"`` or a list -> validated list of model names (default when empty)."""
    if spec is None or spec == "" or spec == []:
        return default_models()
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    for n in names:
        registry.get(n)  # ValueError naming the known models
    return names


@dataclass
class SeriesResult:
    series_instance_uid: str | None
    study_instance_uid: str | None
    n_instances: int
    status: str  # "done" | "skipped" | "failed"
    reason: str | None = None
    outputs: list[ModelOutput] = field(default_factory=list)
    volume: CTVolume | None = None
    # per requested model: selected or skipped, by which rule, why (analysis.selection.Decision);
    # empty when no selection policy was applied or the series could not be loaded
    selection: list = field(default_factory=list)
    facts: object | None = None  # analysis.selection.SeriesFacts of the loaded series

    @property
    def metrics(self) -> dict[str, float | None]:
        merged: dict[str, float | None] = {}
        for out in self.outputs:
            merged.update(out.series_metrics)
        return merged

    @property
    def info(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for out in self.outputs:
            merged.update(out.info)
        return merged

    @property
    def reasons(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for out in self.outputs:
            merged.update(out.reasons)
        return merged


def not_installed_output(spec: ModelSpec, reason: str) -> ModelOutput:
    """The output of a model whose weights are not installed: every metric null with the reason."""
    out = ModelOutput(name=spec.name, algorithm=spec.algorithm, version=spec.version)
    for m in spec.metrics:
        out.set_metric(m.key, None, reason)
    return out


def run_model(name: str, volume: CTVolume, ctx: RunContext) -> ModelOutput:
    """One model on a loaded series, with its configured options. A model whose weights file is
    missing returns its metrics null with the reason (the series is still analysed)."""
    from analysis.weights import WeightsNotInstalled, set_torch_threads

    spec = resolve_model(name)
    if spec.uses_torch:
        set_torch_threads(ctx.torch_threads)
    try:
        return spec.run(volume, ctx, ctx.options_for(name))
    except WeightsNotInstalled as exc:
        return not_installed_output(spec, str(exc))


def analyse_series(
    paths: Sequence[str | Path],
    models: Sequence[str],
    ctx: RunContext,
    *,
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    selection=None,
    scanner: str | None = None,
    duplicate_of: Callable[[object], str | None] | None = None,
) -> SeriesResult:
    """Run the selected models on the files of one series. Never raises for bad data: the
    result's status says ``skipped`` or ``failed`` with the reason.

    ``selection`` (an ``analysis.selection.SelectionPolicy``; None: every model runs, no decisions)
    decides per model from the loaded series (``scanner`` is its [[scanners]] name);
    ``duplicate_of(facts, claim=...)`` returns the UID of another series of the same study that
    analyses (or analysed) the same reconstruction, or None; ``claim`` is True when selection would
    analyse this series, which then claims the reconstruction (the node does so atomically in its
    database, see ``storage.repo.claim_reconstruction``)."""
    from analysis.volume import load_series

    n = len(paths)
    try:
        volume = load_series(paths)
    except SeriesSkipped as exc:
        skipped = SeriesResult(series_instance_uid, study_instance_uid, n, "skipped", str(exc))
        if selection is not None:
            from analysis.selection import load_skip_decisions

            skipped.selection = load_skip_decisions(str(exc), list(models))
        return skipped
    except (ValueError, OSError) as exc:
        return SeriesResult(series_instance_uid, study_instance_uid, n, "failed", f"cannot load series: {exc}")
    hdr = volume.header
    series_uid = series_instance_uid or str(getattr(hdr, "SeriesInstanceUID", "") or "") or None
    study_uid = study_instance_uid or str(getattr(hdr, "StudyInstanceUID", "") or "") or None
    result = SeriesResult(series_uid, study_uid, n, "done", None, [], volume)
    run_models = list(models)
    skip_reason = None
    if selection is not None:
        from analysis.selection import facts_from_volume, summarise

        facts = facts_from_volume(volume, scanner=scanner, series_instance_uid=series_uid,
                                  study_instance_uid=study_uid)
        result.facts = facts
        result.selection = selection.decide(facts, list(models))
        if duplicate_of is not None:
            # asked only now: a series that selection analyses claims its reconstruction (claim=True)
            would_skip, _ = summarise(result.selection, list(models))
            dup = duplicate_of(facts, claim=not would_skip)
            if dup:
                result.selection = selection.decide(facts, list(models), duplicate_of=dup)
        run_models = [d.model for d in result.selection if d.selected]
        series_skipped, skip_reason = summarise(result.selection, list(models))
        if series_skipped:
            result.status, result.reason = "skipped", skip_reason
        else:
            result.reason = skip_reason
    for name in run_models:
        try:
            result.outputs.append(run_model(name, volume, ctx))
        except SeriesSkipped as exc:
            result.status, result.reason = "skipped", f"{name}: {exc}"
            return result
        except (ValueError, RuntimeError, FloatingPointError) as exc:
            log.exception("model %s failed on series", name)
            result.status, result.reason = "failed", f"{name}: {exc}"
            return result
    flag_out_of_distribution(result)
    return result


def flag_out_of_distribution(result: SeriesResult) -> None:
    """For each learned model with a stated training distribution (its spec's ``training``), record
    in its output why the series lies outside it (body part, the classical global noise, slice
    thickness). Outputs without scores (weights not installed) are not flagged."""
    vol = result.volume
    meta = vol.meta if vol is not None else {}
    metrics = result.metrics
    thickness = metrics.get("slice_thickness_mm")
    if thickness is None:
        thickness = meta.get("slice_thickness_mm")
    for out in result.outputs:
        spec = registry.specs().get(out.name)
        if spec is None or spec.training is None or not any(v is not None for v in out.series_metrics.values()):
            continue
        out.out_of_distribution = spec.training.outside(
            body_part=meta.get("body_part"), global_noise_hu=metrics.get("global_noise_hu"),
            slice_thickness_mm=float(thickness) if thickness is not None else None)
