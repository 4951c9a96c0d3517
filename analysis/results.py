"""Result types every analysis stage returns.

The pipeline (``analysis.pipeline``) runs a list of *models* over one loaded series. A model is
declared by its spec (``analysis.models``); its ``run(volume: CTVolume, ctx: RunContext, options)``
returns a ``ModelOutput``. That output is what the
node stores in the database, prints in ``qa-node analyze --json`` and hands to the SR and
Parametric Map builders:

- ``series_metrics``: flat ``name -> float | None``; a ``None`` value must have an entry in
  ``reasons`` saying why it is absent (never a made-up 0).
- ``slice_metrics``: ``name -> float array (n_slices,)``, ``nan`` where a slice has no value.
- ``maps``: pixel-wise maps (one float32 frame per slice) to be sent as Parametric Maps.
- ``info``: text context that is not a number (kernel, which SSDE phantom was used, ...).
- ``algorithm``/``version``/``weights_sha256``/``parameters``: provenance that goes into every SR and map.
- ``out_of_distribution``: reasons the series lies outside a learned model's training distribution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MapOutput:
    """A pixel-wise map over the series: ``values`` is float32 (n_slices, rows, cols)."""

    name: str  # short identifier, e.g. "local_noise_sd" or "n2q_quality"
    label: str  # human-readable, e.g. "Local noise SD"
    values: np.ndarray
    unit_code: str  # UCUM code, e.g. "[hnsf'U]" or "1"
    unit_meaning: str  # e.g. "Hounsfield unit" or "no units"

    def __post_init__(self) -> None:
        if self.values.ndim != 3:
            raise ValueError(f'Argument "values" must be (n_slices, rows, cols), got shape {self.values.shape}')


@dataclass
class ModelOutput:
    name: str  # model key, e.g. "basic", "classical", "n2q", "d2iqa"
    algorithm: str  # algorithm name written into the SR (TID 4019)
    version: str
    weights_sha256: str | None = None
    series_metrics: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    slice_metrics: dict[str, np.ndarray] = field(default_factory=dict)
    maps: list[MapOutput] = field(default_factory=list)
    # text context that is not a metric, e.g. {"ssde_phantom": "16 cm", "kernel": "UB"}
    info: dict[str, str] = field(default_factory=dict)
    # provenance beside the checksum, written as TID 4019 Algorithm Parameters ("name=value"),
    # e.g. "resampled=256x256 to 512x512"
    parameters: list[str] = field(default_factory=list)
    # why the series lies outside the model's training distribution (empty: inside, or not checkable)
    out_of_distribution: list[str] = field(default_factory=list)

    def set_metric(self, name: str, value: float | None, reason: str | None = None) -> None:
        """Record a series metric; a missing value must come with the reason it is missing."""
        if value is None or not np.isfinite(value):
            if not reason:
                raise ValueError(f'Metric "{name}" is absent: a reason is required')
            self.series_metrics[name] = None
            self.reasons[name] = reason
        else:
            self.series_metrics[name] = float(value)
            self.reasons.pop(name, None)


@dataclass(frozen=True)
class RunContext:
    """What a model needs besides the volume: the torch device, the torch CPU threads, and each
    model's options (model name -> its options dataclass, the table ``[analysis.<name>]``; a model
    missing here runs with its defaults)."""

    device: str = "cpu"  # resolved: "cpu" or "cuda"
    options: Mapping[str, Any] = field(default_factory=dict)
    torch_threads: int = 0  # 0 = torch's default (the cores available to the process)
    # series batching ([analysis] series_batch resolved): the learned models with ``run_many`` run
    # every pass at their batch's full shape (a last partial pass padded with zero images), so that
    # several series can share a pass and a series' results never depend on the pass it was in
    series_batch: bool = False

    def options_for(self, name: str):
        """The options of model ``name`` (its defaults when not configured)."""
        if name in self.options:
            return self.options[name]
        from analysis.models import default_options

        return default_options(name)


class SeriesSkipped(Exception):
    """The series is not something we analyse (localizer, non-axial, non-CT, ...). ``str()`` is the reason."""
