"""What a model declares about itself: the ``ModelSpec`` every module of ``analysis.models`` exports.

This module is plain Python (no numpy, no torch): the registry, the configuration loader and the
node's code catalogue read every spec without loading any model. A spec names:

- the model (``name``: the key in ``[analysis] models`` and the config table ``[analysis.<name>]``),
  the algorithm name and version written into every SR and map (TID 4019);
- its ``options``: a frozen dataclass whose fields (str, int, float, bool) are the keys of
  ``[analysis.<name>]``; an optional ``validate(self)`` method raises ``ValueError`` naming the key;
- its ``metrics`` (key, coded concept, UCUM unit, label, trended by default, shown in the PDF) and
  ``maps`` (pixel-wise maps sent as Parametric Maps);
- its ``run`` function ``run(volume, ctx, options) -> ModelOutput``: heavy imports (torch) happen
  inside it, never at module import;
- optionally ``run_many(volumes, ctx, options) -> [ModelOutput]`` and ``batch_of(options, device)``:
  several series in shared passes of the model's batch (series batching, ``analysis.batching.run_across``);
- for a learned model, its ``training`` distribution (from its model card) for the
  out-of-distribution flag, and ``startup_check(options)`` (e.g. "weights not installed").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRIVATE_SCHEME = "99CTQA"  # the node's private coding scheme (reports.codes declares it in every SR)


@dataclass(frozen=True)
class Concept:
    """A coded concept: (value, scheme designator, meaning), e.g. ("113930", "DCM", "Size Specific Dose Estimate")."""

    value: str
    scheme: str
    meaning: str


def private(value: str, meaning: str) -> Concept:
    return Concept(value, PRIVATE_SCHEME, meaning)


def dcm(value: str, meaning: str) -> Concept:
    return Concept(value, "DCM", meaning)


@dataclass(frozen=True)
class Unit:
    """A UCUM unit and its short display form."""

    code: str  # UCUM, e.g. "[hnsf'U]"
    meaning: str  # e.g. "Hounsfield unit"
    display: str  # e.g. "HU"; "" for counts and scores


HU = Unit("[hnsf'U]", "Hounsfield unit", "HU")
CM = Unit("cm", "centimeter", "cm")
MM = Unit("mm", "millimeter", "mm")
MGY = Unit("mGy", "milligray", "mGy")
KV = Unit("kV", "kilovolt", "kV")
PER_MM = Unit("/mm", "per millimeter", "1/mm")
NO_UNITS = Unit("1", "no units", "")
SLICES = Unit("{slices}", "slices", "")


@dataclass(frozen=True)
class MetricSpec:
    """One series metric: how it is coded in DICOM and shown to people.

    ``trended``: charted and judged by default ([trends] metrics). ``in_report``: a row of the
    readable report (PDF). ``context``: it describes the acquisition rather than scores it (listed
    after the scores, no baseline column). ``meaning``: one line for the report ("higher is better")."""

    key: str
    concept: Concept
    unit: Unit
    label: str
    trended: bool = False
    in_report: bool = False
    context: bool = False
    meaning: str = ""


@dataclass(frozen=True)
class MapSpec:
    """One pixel-wise map: its name, the quantity it holds (Real World Value Mapping) and its unit."""

    name: str
    concept: Concept
    unit: Unit
    label: str
    # the resolution the map really has, so the Parametric Map is stored no finer than that:
    # model_matrix = the square matrix the model predicts at (the slice padded to a square), or
    # detail_mm = the finest detail in mm; 0 = stored at the source matrix. why = one line for the map.
    model_matrix: int = 0
    detail_mm: float = 0.0
    why: str = ""


@dataclass(frozen=True)
class TrainingDistribution:
    """What a learned model has seen in training (from its model card). ``None``/empty = not stated
    by the source, so not checked. Ranges are inclusive."""

    body_regions: tuple[str, ...] = ()  # BodyPartExamined defined terms, e.g. ("ABDOMEN",)
    global_noise_hu: tuple[float, float] | None = None  # classical global noise of the series
    slice_thickness_mm: tuple[float, float] | None = None
    source: str = ""  # where the numbers come from (the model card)

    def outside(self, *, body_part: str | None, global_noise_hu: float | None,
                slice_thickness_mm: float | None) -> list[str]:
        """Why a series lies outside this distribution (one phrase each; empty: inside, or only
        unknown values). A value the series does not carry (no BodyPartExamined, no global noise
        because the classical model did not run or could not measure it) is not judged."""
        why: list[str] = []
        part = (body_part or "").strip().upper()
        if self.body_regions and part and part not in self.body_regions:
            why.append(f"body part {part} is not among the training regions ({', '.join(self.body_regions)})")
        for label, value, rng, unit in (("global noise", global_noise_hu, self.global_noise_hu, "HU"),
                                        ("slice thickness", slice_thickness_mm, self.slice_thickness_mm, "mm")):
            if rng is None or value is None or value != value:  # nan: not measured
                continue
            lo, hi = rng
            if value < lo or value > hi:
                side = "below" if value < lo else "above"
                why.append(f"{label} {value:.3g} {unit} is {side} the training range {lo:g}-{hi:g} {unit}")
        return why


@dataclass(frozen=True)
class NoOptions:
    """A model without options: ``[analysis.<name>]`` accepts no key."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    algorithm: str  # TID 4019 Algorithm Name (the SR keeps the first 64 characters)
    version: str
    run: Callable[..., Any]  # run(volume, ctx, options) -> ModelOutput
    order: int  # models run, and appear in outputs, in increasing order
    options: type = NoOptions
    metrics: tuple[MetricSpec, ...] = ()
    maps: tuple[MapSpec, ...] = ()
    default: bool = False  # in the default [analysis] models
    requires: tuple[str, ...] = ()  # importable modules the model needs (e.g. "torch")
    uses_torch: bool = False
    learned: bool = False
    training: TrainingDistribution | None = None
    model_card: str | None = None  # path in the project, e.g. analysis/weights/N2Q_MODEL_CARD.md
    trainer: str | None = None  # module behind `qa-node train <name>` (add_arguments/run), in analysis.training
    summary: str = ""  # one line for --help and README
    # (options) -> None or one line to log once at start-up (e.g. weights not installed)
    startup_check: Callable[[Any], str | None] | None = None
    # old flat [analysis] keys of this model -> the key of [analysis.<name>] they became
    moved_keys: dict[str, str] = field(default_factory=dict)
    # series batching (docs/series_batching.md): run_many(volumes, ctx, options) -> [ModelOutput],
    # one per volume, their slices sharing passes of the full batch; batch_of(options, device) -> the
    # slices per pass on that device (the fill target). None: the model runs one series at a time.
    run_many: Callable[..., Any] | None = None
    batch_of: Callable[[Any, str], int] | None = None

    def __post_init__(self) -> None:
        if not self.algorithm or not self.version:
            raise ValueError(f"model {self.name}: algorithm name and version are required")
        keys = [m.key for m in self.metrics]
        if len(keys) != len(set(keys)):
            raise ValueError(f"model {self.name}: a metric key is declared twice")
