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


@dataclass
class PreparedSeries:
    """A series after ``prepare_series``: its result so far and the models still to run on it.
    ``error``: an unexpected exception a model raised on it (not one of the data errors a result
    records), for the caller to report as today's single-series run would have raised it."""

    result: SeriesResult
    run_models: list[str] = field(default_factory=list)
    error: Exception | None = None
    stopped: bool = False  # a model skipped or failed the series: no further model runs on it


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
    database, see ``storage.repo.claim_reconstruction``).

    The one-series case of ``prepare_series`` -> ``run_prepared`` -> ``finish_series``."""
    prepared = prepare_series(paths, models, ctx, series_instance_uid=series_instance_uid,
                              study_instance_uid=study_instance_uid, selection=selection, scanner=scanner,
                              duplicate_of=duplicate_of)
    run_prepared([prepared], ctx)
    if prepared.error is not None:
        raise prepared.error
    return finish_series(prepared)


def prepare_series(
    paths: Sequence[str | Path],
    models: Sequence[str],
    ctx: RunContext,
    *,
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    selection=None,
    scanner: str | None = None,
    duplicate_of: Callable[[object], str | None] | None = None,
) -> PreparedSeries:
    """Step 1 of ``analyse_series``, per series: load, selection, the duplicate claim. A series that
    cannot be loaded, or that selection skips, comes back with its final status and no model to run."""
    from analysis.volume import load_series

    n = len(paths)
    try:
        volume = load_series(paths)
    except SeriesSkipped as exc:
        skipped = SeriesResult(series_instance_uid, study_instance_uid, n, "skipped", str(exc))
        if selection is not None:
            from analysis.selection import load_skip_decisions

            skipped.selection = load_skip_decisions(str(exc), list(models))
        return PreparedSeries(skipped)
    except (ValueError, OSError) as exc:
        return PreparedSeries(SeriesResult(series_instance_uid, study_instance_uid, n, "failed",
                                           f"cannot load series: {exc}"))
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
    return PreparedSeries(result, run_models)


def _record_error(p: PreparedSeries, name: str, exc: BaseException) -> None:
    """What ``analyse_series`` has always done when a model raises on a series."""
    if isinstance(exc, SeriesSkipped):
        p.result.status, p.result.reason = "skipped", f"{name}: {exc}"
    elif isinstance(exc, (ValueError, RuntimeError, FloatingPointError)):
        log.error("model %s failed on series", name, exc_info=exc)
        p.result.status, p.result.reason = "failed", f"{name}: {exc}"
    else:
        p.error = exc


def _run_one(name: str, p: PreparedSeries, ctx: RunContext, many: bool) -> None:
    """Model ``name`` on one series (``many``: through its ``run_many``, the padded passes of series
    batching); its output appended, or the series stopped with the reason."""
    try:
        if many:
            out = run_model_many(name, [p.result.volume], ctx)[0]
        else:
            out = run_model(name, p.result.volume, ctx)
    except Exception as exc:  # noqa: BLE001 - recorded per series as analyse_series always did, or kept in p.error
        _record_error(p, name, exc)
        p.stopped = True
        return
    p.result.outputs.append(out)


def run_model_many(name: str, volumes: Sequence[CTVolume], ctx: RunContext) -> list[ModelOutput]:
    """One model's ``run_many`` on several loaded series (series batching), with its options; a
    missing weights file gives every series its metrics null with the reason."""
    from analysis.weights import WeightsNotInstalled, set_torch_threads

    spec = resolve_model(name)
    if spec.uses_torch:
        set_torch_threads(ctx.torch_threads)
    try:
        outs = spec.run_many(list(volumes), ctx, ctx.options_for(name))
    except WeightsNotInstalled as exc:
        return [not_installed_output(spec, str(exc)) for _ in volumes]
    if len(outs) != len(volumes):
        raise RuntimeError(f"model {name}: run_many returned {len(outs)} outputs for {len(volumes)} series")
    return outs


def run_prepared(prepared: Sequence[PreparedSeries], ctx: RunContext) -> None:
    """Step 2: the models on prepared series, each model in turn. With ``ctx.series_batch`` a model
    whose spec has ``run_many`` runs once over every series that selected it (their slices sharing
    passes); when that joint run raises, it runs again one series at a time, so that only the series
    whose data caused it fails. Other models, and every model without series batching, run one series
    at a time as ``analyse_series`` always did. A series stops at its first model that skips or fails
    it (the models after it do not run on it)."""
    order: list[str] = []
    for p in prepared:
        for name in p.run_models:
            if name not in order:
                order.append(name)
    progressed = True
    while progressed:  # one sweep when every series lists its models in the same order
        progressed = False
        for name in order:
            todo = [i for i, p in enumerate(prepared) if not p.stopped and p.error is None and _next_model(p) == name]
            if not todo:
                continue
            progressed = True
            many = ctx.series_batch and _has_run_many(name)
            if many and len(todo) > 1:
                try:
                    outs = run_model_many(name, [prepared[i].result.volume for i in todo], ctx)
                except Exception as exc:  # noqa: BLE001 - isolated below, series by series
                    log.warning("model %s failed on %d series run together (%s: %s); running them one at a time",
                                name, len(todo), type(exc).__name__, exc)
                else:
                    for i, out in zip(todo, outs):
                        prepared[i].result.outputs.append(out)
                    continue
            for i in todo:
                _run_one(name, prepared[i], ctx, many)


def _next_model(p: PreparedSeries) -> str | None:
    """The model this series runs next, in its own order (the one after its last output)."""
    k = len(p.result.outputs)
    return p.run_models[k] if k < len(p.run_models) else None


def _has_run_many(name: str) -> bool:
    spec = registry.specs().get(name)
    return spec is not None and spec.run_many is not None


def finish_series(p: PreparedSeries) -> SeriesResult:
    """Step 3, per series: the out-of-distribution flags of a loaded series whose models all ran."""
    if p.result.volume is not None and not p.stopped and p.error is None:
        flag_out_of_distribution(p.result)
    return p.result


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
