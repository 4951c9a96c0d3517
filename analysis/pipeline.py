"""The analysis pipeline: load series -> select/validate -> run models -> results.

A model is registered here by name as ``"module:function"`` and imported only when selected, so
that a run of the classical metrics never imports torch. Each model function has the signature
``run(volume: CTVolume, ctx: RunContext) -> ModelOutput`` (see ``analysis.results``).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from analysis.results import ModelOutput, RunContext, SeriesSkipped
from analysis.volume import CTVolume

log = logging.getLogger(__name__)

# name -> "module:function". Order is the order models run in and appear in outputs.
MODEL_REGISTRY: dict[str, str] = {
    "basic": "analysis.basic:run",
    "classical": "analysis.classical:run",
    "n2q": "analysis.n2q:run",
    "d2iqa": "analysis.d2iqa:run",
}
DEFAULT_MODELS: tuple[str, ...] = ("basic", "classical")


def available_models() -> list[str]:
    """Models whose module is importable in this installation."""
    names = []
    for name, target in MODEL_REGISTRY.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def resolve_model(name: str) -> Callable[[CTVolume, RunContext], ModelOutput]:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_REGISTRY)}")
    module_name, func_name = MODEL_REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"Model {name!r} is not available in this installation ({exc})") from exc
    return getattr(module, func_name)


def parse_models(spec: str | Sequence[str] | None) -> list[str]:
    """``"basic,classical"`` or a list -> validated list of model names (default when empty)."""
    if spec is None or spec == "" or spec == []:
        return list(DEFAULT_MODELS)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    for n in names:
        if n not in MODEL_REGISTRY:
            raise ValueError(f"Unknown model {n!r}; known models: {', '.join(MODEL_REGISTRY)}")
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


def analyse_series(
    paths: Sequence[str | Path],
    models: Sequence[str],
    ctx: RunContext,
    *,
    series_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
) -> SeriesResult:
    """Run the selected models on the files of one series. Never raises for bad data: the
    result's status says ``skipped`` or ``failed`` with the reason."""
    from analysis.volume import load_series

    n = len(paths)
    try:
        volume = load_series(paths)
    except SeriesSkipped as exc:
        return SeriesResult(series_instance_uid, study_instance_uid, n, "skipped", str(exc))
    except (ValueError, OSError) as exc:
        return SeriesResult(series_instance_uid, study_instance_uid, n, "failed", f"cannot load series: {exc}")
    hdr = volume.header
    series_uid = series_instance_uid or str(getattr(hdr, "SeriesInstanceUID", "") or "") or None
    study_uid = study_instance_uid or str(getattr(hdr, "StudyInstanceUID", "") or "") or None
    result = SeriesResult(series_uid, study_uid, n, "done", None, [], volume)
    for name in models:
        func = resolve_model(name)
        try:
            result.outputs.append(func(volume, ctx))
        except SeriesSkipped as exc:
            result.status, result.reason = "skipped", f"{name}: {exc}"
            return result
        except (ValueError, RuntimeError, FloatingPointError) as exc:
            log.exception("model %s failed on series", name)
            result.status, result.reason = "failed", f"{name}: {exc}"
            return result
    return result
