"""Metric catalogue: metric key -> coded concept (DCM/SCT where one exists) and UCUM unit.

Where no standard concept exists the node uses ONE private coding scheme, designator ``99CTQA``
(the "99" prefix marks a private scheme, PS3.16 section 8.2). Every SR that uses it declares it in
its Coding Scheme Identification Sequence (``private_coding_scheme()``). The full table is in
docs/outputs.md; ``tests/unit/test_sr.py`` checks that the two agree.

The metric and map entries are declared by the model specs (``analysis/models/<name>.py``) and
installed here by ``node.catalogue`` (this package does not import ``analysis``). Unknown metric
keys are an error (``ValueError`` naming the key and the known keys): a code cannot be made up at
run time, because a code's meaning must never change once PACS archives hold it. A new metric gets
a new, never reused private code value in its model's spec, and a row in docs/outputs.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99CTQA"
PRIVATE_SCHEME_NAME = "CT QA Node private codes"
PRIVATE_SCHEME_VERSION = "1"
PRIVATE_SCHEME_ORGANIZATION = "CT QA Node project"


def private(value: str, meaning: str) -> Code:
    """A concept of the node's private coding scheme ``99CTQA``."""
    if not value or len(value) > 16:
        raise ValueError(f'Argument "value" must be a code value of 1-16 characters, got {value!r}')
    return Code(value, PRIVATE_SCHEME, meaning)


def dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


def ucum(value: str, meaning: str) -> Code:
    return Code(value, "UCUM", meaning)


# --- units (UCUM) ------------------------------------------------------------------------------
HU = ucum("[hnsf'U]", "Hounsfield unit")
CM = ucum("cm", "centimeter")
MM = ucum("mm", "millimeter")
MGY = ucum("mGy", "milligray")
KV = ucum("kV", "kilovolt")
PER_MM = ucum("/mm", "per millimeter")
NO_UNITS = ucum("1", "no units")
SLICES = ucum("{slices}", "slices")

# --- non-metric concepts -----------------------------------------------------------------------
#: SNOMED CT "Image quality analysis": the procedure reported in every Measurement Report.
PROCEDURE_IMAGE_QUALITY_ANALYSIS = Code("133887000", "SCT", "Image quality analysis")
#: Values of the qualitative evaluation "metric vs. its trend control limits".
WITHIN_CONTROL_LIMITS = private("WITHIN_CL", "Within control limits")
OUTSIDE_CONTROL_LIMITS = private("OUTSIDE_CL", "Outside control limits")
#: Concept name of that qualitative evaluation is the metric's own concept (see sr.py).
#: TEXT item of the SR's Qualitative Evaluations: an output (a Parametric Map) left out, and why.
OUTPUT_NOT_PRODUCED = private("OUTPUT_OMITTED", "Output not produced")
#: TEXT item of the same container: how complete and regular the source series is (a slice gap).
SERIES_NOTE = private("SERIES_NOTE", "Source series note")
#: TID 1500 row 12 container holding those TEXT items and the "not computed" reasons.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


@dataclass(frozen=True)
class MetricCode:
    """How one metric key is coded in DICOM: concept, UCUM unit, a short display unit and a label,
    and how it is shown (trended by default, a row of the readable report, acquisition context,
    one line of meaning)."""

    key: str
    concept: Code
    unit: Code
    unit_display: str  # short unit for humans, e.g. "HU", "mGy"
    label: str  # human-readable label for the readable report
    trended: bool = False
    in_report: bool = False
    context: bool = False  # describes the acquisition rather than scores it
    meaning: str = ""

    @property
    def is_private(self) -> bool:
        return self.concept.scheme_designator == PRIVATE_SCHEME


@dataclass(frozen=True)
class MapCode:
    """How one pixel-wise map is coded: the quantity (Real World Value Mapping) and its unit."""

    name: str
    quantity: Code
    unit: Code
    model_matrix: int = 0  # the square matrix the model predicts at; 0 = not reduced for that
    detail_mm: float = 0.0  # the finest detail the map has; 0 = not reduced for that
    why: str = ""  # why the map is stored at reduced resolution


# The entries come from the model specs: ``node.catalogue`` assembles them (reports does not import
# analysis) and calls ``install`` before any report is built. Order = the models' run order.
_CATALOGUE: dict[str, MetricCode] = {}
_MAPS: dict[str, MapCode] = {}
_PRIVATE: dict[str, str] = {}

#: key -> MetricCode, read-only.
CATALOGUE: Mapping[str, MetricCode] = MappingProxyType(_CATALOGUE)
MAPS: Mapping[str, MapCode] = MappingProxyType(_MAPS)
#: Every private concept the node writes (metrics, maps, evaluation values): value -> meaning.
PRIVATE_CODES: Mapping[str, str] = MappingProxyType(_PRIVATE)


def install(metrics: Iterable[MetricCode], maps: Iterable[MapCode]) -> None:
    """Replace the catalogue with these entries (``node.catalogue`` does, from the model specs)."""
    metrics, maps = list(metrics), list(maps)
    _check_unique(metrics)
    _CATALOGUE.clear()
    _CATALOGUE.update({m.key: m for m in metrics})
    _MAPS.clear()
    _MAPS.update({m.name: m for m in maps})
    _PRIVATE.clear()
    _PRIVATE.update({
        c.value: c.meaning
        for c in (
            *(m.concept for m in metrics),
            *(m.quantity for m in maps),
            WITHIN_CONTROL_LIMITS,
            OUTSIDE_CONTROL_LIMITS,
            OUTPUT_NOT_PRODUCED,
        )
        if c.scheme_designator == PRIVATE_SCHEME
    })


def trended_keys() -> tuple[str, ...]:
    """The metrics charted and judged by default."""
    return tuple(k for k, m in _CATALOGUE.items() if m.trended)


# --- anatomy (Frame Anatomy of Parametric Maps) ----------------------------------------------
def _sct(name: str) -> Code:
    c = getattr(codes.SCT, name)
    return Code(c.value, c.scheme_designator, c.meaning)


#: Body Part Examined (0018,0015) defined terms -> (SCT anatomic region, paired structure?).
BODY_PARTS: Mapping[str, tuple[Code, bool]] = MappingProxyType(
    {
        term: (_sct(name), paired)
        for term, name, paired in (
            ("HEAD", "Head", False),
            ("BRAIN", "Brain", False),
            ("SKULL", "Skull", False),
            ("FACE", "Face", False),
            ("NECK", "Neck", False),
            ("HEADNECK", "HeadAndNeck", False),
            ("CHEST", "Chest", False),
            ("THORAX", "Thorax", False),
            ("ABDOMEN", "Abdomen", False),
            ("PELVIS", "Pelvis", False),
            ("ABDOMENPELVIS", "AbdomenAndPelvis", False),
            ("CHESTABDOMEN", "ChestAndAbdomen", False),
            ("CHESTABDPELVIS", "ChestAbdomenAndPelvis", False),
            ("WHOLEBODY", "EntireBody", False),
            ("HEART", "Heart", False),
            ("LIVER", "Liver", False),
            ("SPINE", "Spine", False),
            ("CSPINE", "CervicalSpine", False),
            ("TSPINE", "ThoracicSpine", False),
            ("LSPINE", "LumbarSpine", False),
            ("LUNG", "Lung", True),
            ("KIDNEY", "Kidney", True),
            ("KNEE", "Knee", True),
            ("SHOULDER", "Shoulder", True),
            ("EXTREMITY", "Extremity", True),
        )
    }
)


def metric_code(key: str) -> MetricCode:
    """The catalogue entry of ``key``; ``ValueError`` for an unknown key."""
    try:
        return _CATALOGUE[key]
    except KeyError:
        raise ValueError(
            f'Unknown metric key {key!r}: it has no DICOM code. Known keys: {", ".join(sorted(_CATALOGUE))}. '
            "Declare it in its model's spec (analysis/models/) and docs/outputs.md."
        ) from None


def map_code(name: str) -> MapCode:
    """The quantity code of map ``name``; ``ValueError`` for an unknown map."""
    try:
        return _MAPS[name]
    except KeyError:
        raise ValueError(
            f'Unknown map name {name!r}: it has no DICOM quantity code. Known maps: {", ".join(sorted(_MAPS))}. '
            "Declare it in its model's spec (analysis/models/) and docs/outputs.md."
        ) from None


def evaluation_code(within: bool) -> Code:
    return WITHIN_CONTROL_LIMITS if within else OUTSIDE_CONTROL_LIMITS


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification Sequence item that declares ``99CTQA``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        version=PRIVATE_SCHEME_VERSION,
        responsible_organization=PRIVATE_SCHEME_ORGANIZATION,
    )


def _check_unique(metrics: Iterable[MetricCode]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for m in metrics:
        k = (m.concept.scheme_designator, m.concept.value)
        if k in seen:
            raise RuntimeError(f"Metric catalogue: {m.key} and {seen[k]} share the concept {k}")
        seen[k] = m.key
