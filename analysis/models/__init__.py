"""The model registry: every module of this package (except ``spec``) exports ``SPEC``, a
``ModelSpec`` (see ``analysis.models.spec``). Everything model-specific elsewhere (the config
tables ``[analysis.<name>]``, the SR code catalogue, the default trended metrics, the report rows)
is derived from these specs. Importing the registry imports no model code (torch stays unloaded
until a learned model runs)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Mapping
from types import MappingProxyType

from analysis.models.spec import MapSpec, MetricSpec, ModelSpec

_NOT_MODELS = {"spec"}
_SPECS: dict[str, ModelSpec] | None = None


def _discover() -> dict[str, ModelSpec]:
    found: list[ModelSpec] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in _NOT_MODELS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, ModelSpec):
            raise RuntimeError(f"analysis/models/{info.name}.py exports no SPEC (a ModelSpec)")
        if spec.name != info.name:
            raise RuntimeError(f"analysis/models/{info.name}.py declares the model {spec.name!r}: name and module must agree")
        found.append(spec)
    found.sort(key=lambda s: (s.order, s.name))
    seen: dict[str, str] = {}
    for s in found:
        for m in s.metrics:
            if m.key in seen:
                raise RuntimeError(f"metric {m.key!r} is declared by the models {seen[m.key]} and {s.name}")
            seen[m.key] = s.name
    return {s.name: s for s in found}


def specs() -> Mapping[str, ModelSpec]:
    """name -> spec, in run order."""
    global _SPECS
    if _SPECS is None:
        _SPECS = _discover()
    return MappingProxyType(_SPECS)


def get(name: str) -> ModelSpec:
    try:
        return specs()[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(specs())}") from None


def default_models() -> tuple[str, ...]:
    return tuple(s.name for s in specs().values() if s.default)


def is_available(spec: ModelSpec) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in spec.requires)


def metrics() -> list[tuple[ModelSpec, MetricSpec]]:
    """Every declared metric with its model, in run order."""
    return [(s, m) for s in specs().values() for m in s.metrics]


def maps() -> list[tuple[ModelSpec, MapSpec]]:
    return [(s, m) for s in specs().values() for m in s.maps]


def trended_metrics() -> tuple[str, ...]:
    """The metrics charted and judged by default."""
    return tuple(m.key for _, m in metrics() if m.trended)


def report_keys() -> tuple[str, ...]:
    """Rows of the readable report, in order: the scores, then the acquisition context."""
    rows = [m for _, m in metrics() if m.in_report]
    return tuple(m.key for m in rows if not m.context) + tuple(m.key for m in rows if m.context)


def default_options(name: str):
    return get(name).options()
