"""Metric catalogue: metric key -> coded concept (DCM/SCT where one exists) and UCUM unit.

Where no standard concept exists the node uses ONE private coding scheme, designator ``99CTQA``
(the "99" prefix marks a private scheme, PS3.16 section 8.2). Every SR that uses it declares it in
its Coding Scheme Identification Sequence (``private_coding_scheme()``). The full table is in
docs/outputs.md; ``tests/unit/test_sr.py`` checks that the two agree.

Unknown metric keys are an error (``ValueError`` naming the key and the known keys): a code cannot
be made up at run time, because a code's meaning must never change once PACS archives hold it.
Add a new metric here (with a new, never reused private code value) and in docs/outputs.md.
"""

from __future__ import annotations

from collections.abc import Mapping
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
#: TID 1500 row 12 container holding those TEXT items and the "not computed" reasons.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")


@dataclass(frozen=True)
class MetricCode:
    """How one metric key is coded in DICOM: concept, UCUM unit, a short display unit and a label."""

    key: str
    concept: Code
    unit: Code
    unit_display: str  # short unit for humans, e.g. "HU", "mGy"
    label: str  # human-readable label for the readable report

    @property
    def is_private(self) -> bool:
        return self.concept.scheme_designator == PRIVATE_SCHEME


def _m(key: str, concept: Code, unit: Code, unit_display: str, label: str) -> MetricCode:
    return MetricCode(key, concept, unit, unit_display, label)


_CATALOGUE: dict[str, MetricCode] = {
    m.key: m
    for m in (
        # classical, patient-based metrics
        _m("global_noise_hu", private("GLOBAL_NOISE", "Global noise"), HU, "HU", "Global noise"),
        _m("wed_cm", dcm("113980", "Water Equivalent Diameter"), CM, "cm", "Water-equivalent diameter"),
        _m("ssde_mgy", dcm("113930", "Size Specific Dose Estimate"), MGY, "mGy", "SSDE"),
        _m("ctdivol_mgy", dcm("113830", "Mean CTDIvol"), MGY, "mGy", "CTDIvol"),
        _m("nps_f_peak_per_mm", private("NPS_F_PEAK", "NPS peak frequency"), PER_MM, "1/mm", "NPS peak frequency"),
        _m("nps_f_avg_per_mm", private("NPS_F_AVG", "NPS average frequency"), PER_MM, "1/mm", "NPS mean frequency"),
        _m("nps_noise_hu", private("NPS_NOISE", "Noise from NPS integral"), HU, "HU", "Noise (NPS integral)"),
        _m("mean_hu_tissue", private("TISSUE_MEAN", "Mean CT number in soft tissue"), HU, "HU",
           "Soft-tissue mean CT number"),
        _m("sd_hu_tissue", private("TISSUE_SD", "CT number SD in soft tissue"), HU, "HU", "Soft-tissue CT number SD"),
        _m("body_mean_hu", dcm("112181", "Mean Attenuation Coefficient"), HU, "HU", "Body mean CT number"),
        _m("body_sd_hu", dcm("112183", "Standard Deviation of Attenuation Coefficient"), HU, "HU",
           "Body CT number SD"),
        # acquisition and series facts
        _m("n_slices", private("N_SLICES", "Number of slices analysed"), SLICES, "", "Slices analysed"),
        _m("scan_length_mm", dcm("113825", "Scanning Length"), MM, "mm", "Scan length"),
        _m("kvp", dcm("113733", "KVP"), KV, "kV", "Tube voltage"),
        _m("slice_thickness_mm", dcm("112225", "Slice Thickness"), MM, "mm", "Slice thickness"),
        # learned image-quality models
        _m("n2q_mean_quality", private("N2Q_MEAN", "N2Q mean quality"), NO_UNITS, "", "N2Q mean quality"),
        _m("n2q_p05_quality", private("N2Q_P05", "N2Q 5th percentile quality"), NO_UNITS, "",
           "N2Q 5th-percentile quality"),
        _m("n2q_low_fraction", private("N2Q_LOW_FRAC", "N2Q low-quality fraction"), NO_UNITS, "",
           "N2Q low-quality fraction"),
        _m("d2iqa_score", private("D2IQA_SCORE", "D2IQA detectability score"), NO_UNITS, "", "D2IQA score (mAP)"),
        _m("ldctiqa_score", private("LDCTIQA_SCORE", "LDCTIQA Likert score"), NO_UNITS, "", "LDCTIQA score (0-4)"),
    )
}

#: key -> MetricCode, read-only.
CATALOGUE: Mapping[str, MetricCode] = MappingProxyType(_CATALOGUE)


@dataclass(frozen=True)
class MapCode:
    """How one pixel-wise map is coded: the quantity (Real World Value Mapping) and its unit."""

    name: str
    quantity: Code
    unit: Code


_MAPS: dict[str, MapCode] = {
    m.name: m
    for m in (
        MapCode("local_noise_sd", private("LOCAL_NOISE_SD", "Local noise standard deviation"), HU),
        MapCode("n2q_quality", private("N2Q_QUALITY", "N2Q pixel-wise quality"), NO_UNITS),
    )
}
MAPS: Mapping[str, MapCode] = MappingProxyType(_MAPS)

#: Every private concept the node writes (metrics, maps, evaluation values): value -> meaning.
PRIVATE_CODES: Mapping[str, str] = MappingProxyType(
    {
        c.value: c.meaning
        for c in (
            *(m.concept for m in _CATALOGUE.values()),
            *(m.quantity for m in _MAPS.values()),
            WITHIN_CONTROL_LIMITS,
            OUTSIDE_CONTROL_LIMITS,
            OUTPUT_NOT_PRODUCED,
        )
        if c.scheme_designator == PRIVATE_SCHEME
    }
)


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
            "Add it to reports/codes.py and docs/outputs.md."
        ) from None


def map_code(name: str) -> MapCode:
    """The quantity code of map ``name``; ``ValueError`` for an unknown map."""
    try:
        return _MAPS[name]
    except KeyError:
        raise ValueError(
            f'Unknown map name {name!r}: it has no DICOM quantity code. Known maps: {", ".join(sorted(_MAPS))}. '
            "Add it to reports/codes.py and docs/outputs.md."
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


def _check_unique() -> None:
    seen: dict[tuple[str, str], str] = {}
    for m in _CATALOGUE.values():
        k = (m.concept.scheme_designator, m.concept.value)
        if k in seen:
            raise RuntimeError(f"Metric catalogue: {m.key} and {seen[k]} share the concept {k}")
        seen[k] = m.key


_check_unique()
