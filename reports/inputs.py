"""Small, frozen input types of the DICOM output builders (SR, Parametric Map, readable report).

``reports`` must not import ``analysis``: the node converts analysis results into these types
(see ``slice_metrics_from_array`` for the per-slice arrays of a ``CTVolume``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from enum import StrEnum

import numpy as np

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _package_version() -> str:
    try:
        return metadata.version("ctqa-node")
    except metadata.PackageNotFoundError:
        return "0.1.0"


def _check_uid(argument: str, value: str) -> None:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ValueError(f'Argument "{argument}" must be a DICOM UID (digits and dots, <= 64 chars), got {value!r}')


@dataclass(frozen=True)
class AlgorithmId:
    """Provenance of a measurement or map (TID 4019 Algorithm Identification).

    ``weights_sha256`` is the lower-case hex SHA-256 of the model weights file, or None for an
    algorithm without learned weights (classical metrics).
    """

    name: str
    version: str
    weights_sha256: str | None = None
    # further TID 4019 Algorithm Parameters ("name=value"), e.g. "resampled=256x256 to 512x512" or
    # "out_of_distribution=yes: ..."
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64:
            raise ValueError(f'Argument "name" must be 1-64 characters, got {self.name!r}')
        if not self.version or len(self.version) > 64:
            raise ValueError(f'Argument "version" must be 1-64 characters, got {self.version!r}')
        if self.weights_sha256 is not None and not _SHA256.match(self.weights_sha256):
            raise ValueError(
                'Argument "weights_sha256" must be 64 lower-case hex digits (hashlib.sha256().hexdigest()), '
                f"got {self.weights_sha256!r}"
            )

    @property
    def parameters(self) -> list[str]:
        """TID 4019 "Algorithm Parameters" text items: the weights checksum, then the notes."""
        return ([f"weights_sha256={self.weights_sha256}"] if self.weights_sha256 else []) + list(self.notes)


class Evaluation(StrEnum):
    """Qualitative evaluation of a series metric against its trend control limits."""

    WITHIN = "within"
    OUTSIDE = "outside"


@dataclass(frozen=True)
class ControlLimits:
    """Trend control limits of a metric (either bound may be open), in the metric's unit."""

    lower: float | None
    upper: float | None
    description: str = "Trend control limits of this scanner and protocol"

    def __post_init__(self) -> None:
        for name in ("lower", "upper"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v)):
                raise ValueError(f'Argument "{name}" must be a finite number or None, got {v!r}')
        if self.lower is None and self.upper is None:
            raise ValueError('Arguments "lower" and "upper" are both None: no control limit to record')
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f'Argument "lower" ({self.lower}) must not exceed "upper" ({self.upper})')
        if not self.description or len(self.description) > 1024:
            raise ValueError(f'Argument "description" must be 1-1024 characters, got {self.description!r}')

    def evaluate(self, value: float) -> Evaluation:
        """WITHIN when ``lower <= value <= upper`` (open bounds always pass), else OUTSIDE."""
        ok = (self.lower is None or value >= self.lower) and (self.upper is None or value <= self.upper)
        return Evaluation.WITHIN if ok else Evaluation.OUTSIDE


@dataclass(frozen=True)
class MetricValue:
    """One series-level measurement: catalogue ``key`` (see ``reports.codes``), finite ``value``.

    ``evaluation``: within/outside the trend control limits, as the trends module decided;
    ``control_limits``: the limits themselves, written as the measurement's normal range (TID 312).
    """

    key: str
    value: float
    algorithm: AlgorithmId
    evaluation: Evaluation | None = None
    control_limits: ControlLimits | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float, np.floating, np.integer)) or not math.isfinite(self.value):
            raise ValueError(
                f'Argument "value" of metric "{self.key}" must be a finite number, got {self.value!r}; '
                "leave an absent metric out of the report instead"
            )
        if self.evaluation is not None and not isinstance(self.evaluation, Evaluation):
            raise ValueError(f'Argument "evaluation" must be an Evaluation or None, got {self.evaluation!r}')
        if self.control_limits is not None and not isinstance(self.control_limits, ControlLimits):
            raise ValueError(f'Argument "control_limits" must be ControlLimits or None, got {self.control_limits!r}')


@dataclass(frozen=True)
class SliceMetricValue:
    """One per-slice measurement with the image it was measured on.

    ``frame_number`` (1-based) is required for a multi-frame source and must be None otherwise.
    """

    key: str
    value: float
    sop_class_uid: str
    sop_instance_uid: str
    algorithm: AlgorithmId
    frame_number: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.value, (int, float, np.floating, np.integer)) or not math.isfinite(self.value):
            raise ValueError(
                f'Argument "value" of slice metric "{self.key}" must be a finite number, got {self.value!r}'
            )
        _check_uid("sop_class_uid", self.sop_class_uid)
        _check_uid("sop_instance_uid", self.sop_instance_uid)
        if self.frame_number is not None and (not isinstance(self.frame_number, int) or self.frame_number < 1):
            raise ValueError(f'Argument "frame_number" must be a positive int or None, got {self.frame_number!r}')


@dataclass(frozen=True)
class ReportMetric:
    """One row of the human-readable report: ``value`` None is printed as "n/a" with ``note``."""

    key: str
    value: float | None
    unit: str
    label: str
    evaluation: Evaluation | None = None
    note: str = ""
    control_limits: ControlLimits | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """Our own equipment (General Equipment module of every object we write)."""

    manufacturer: str = "CT QA Node project"
    model_name: str = "CT QA Node"
    software_version: str = field(default_factory=lambda: _package_version())
    device_serial_number: str = "ctqa-node"
    institution_name: str | None = None
    institutional_department_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model_name", "software_version", "device_serial_number"):
            value = getattr(self, name)
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(f'Argument "{name}" must be 1-64 characters without backslash, got {value!r}')


def slice_metrics_from_array(
    key: str,
    values: Sequence[float] | np.ndarray,
    sop_class_uids: Sequence[str],
    sop_instance_uids: Sequence[str],
    frame_numbers: Sequence[int | None],
    algorithm: AlgorithmId,
) -> list[SliceMetricValue]:
    """Per-slice array (``nan`` = no value for that slice) -> SliceMetricValue list.

    The sequences are those of a ``CTVolume`` (one entry per slice, same order). Slices whose value
    is not finite are left out on purpose: ``nan`` means "not measured on this slice".
    """
    arr = np.asarray(values, dtype=float)
    n = arr.shape[0] if arr.ndim == 1 else -1
    if n < 0 or not (len(sop_class_uids) == len(sop_instance_uids) == len(frame_numbers) == n):
        raise ValueError(
            f'Argument "values" of "{key}" must be 1-D with one value per slice: got shape {arr.shape}, '
            f"{len(sop_instance_uids)} SOP instance UIDs, {len(sop_class_uids)} SOP class UIDs, "
            f"{len(frame_numbers)} frame numbers"
        )
    return [
        SliceMetricValue(key, float(v), cls, inst, algorithm, fr)
        for v, cls, inst, fr in zip(arr, sop_class_uids, sop_instance_uids, frame_numbers)
        if math.isfinite(v)
    ]


def metrics_from_mapping(
    values: Mapping[str, float | None],
    algorithm: AlgorithmId,
    evaluations: Mapping[str, Evaluation] | None = None,
    control_limits: Mapping[str, ControlLimits] | None = None,
) -> list[MetricValue]:
    """``ModelOutput.series_metrics``-style dict -> MetricValue list, in the dict's order.

    ``None`` (a metric that could not be measured; its reason lives elsewhere) is left out: the SR
    only holds measured values. ``evaluations`` and ``control_limits`` add, by key, the
    within/outside evaluation and the limits themselves.
    """
    evaluations = evaluations or {}
    control_limits = control_limits or {}
    return [
        MetricValue(key, float(value), algorithm, evaluations.get(key), control_limits.get(key))
        for key, value in values.items()
        if value is not None
    ]
