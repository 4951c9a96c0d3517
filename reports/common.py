"""Helpers shared by the output builders: source checks, UIDs, file meta."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pydicom import DataElement, Dataset
from pydicom.uid import generate_uid

if TYPE_CHECKING:
    from reports.inputs import DeviceInfo

logger = logging.getLogger(__name__)


def new_uid() -> str:
    """A fresh UID (pydicom's root, random suffix)."""
    return str(generate_uid())


def stable_uid(*parts: str) -> str:
    """A UID derived deterministically from ``parts`` (e.g. the device observer UID of our node)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def unique_sources(source_images: Sequence[Dataset]) -> list[Dataset]:
    """Source headers with repeated SOP instances removed, order kept.

    A ``CTVolume`` of a multi-frame image repeats the one header once per frame; the builders want
    each instance once.
    """
    if len(source_images) == 0:
        raise ValueError('Argument "source_images" must hold at least one source image header, got none')
    seen: set[str] = set()
    out: list[Dataset] = []
    for i, ds in enumerate(source_images):
        for kw in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if kw not in ds:
                raise ValueError(f'Argument "source_images[{i}]" has no {kw}: it is not a usable image header')
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            out.append(ds)
    study_uids = {str(ds.StudyInstanceUID) for ds in out}
    if len(study_uids) != 1:
        raise ValueError(
            f'Argument "source_images" must all belong to one study, got {len(study_uids)} StudyInstanceUIDs'
        )
    return out


def n_frames(ds: Dataset) -> int:
    """Number of frames of an image header (1 for a single-frame image)."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"NumberOfFrames of source image is not an integer: {ds.get('NumberOfFrames')!r}") from exc


def is_multiframe(ds: Dataset) -> bool:
    return "NumberOfFrames" in ds or "PerFrameFunctionalGroupsSequence" in ds


@contextlib.contextmanager
def no_person_name_warnings() -> Iterator[None]:
    """Silence highdicom's "unlikely to represent the intended person name" warning.

    It quotes the patient's name, and patient names must never reach logs. The name is copied
    from the source unchanged on purpose (PACS match on it), so the warning has nothing to fix.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name")
        yield


def new_instance_arguments(device: "DeviceInfo", *, series_instance_uid: str | None, series_number: int,
                           sop_instance_uid: str | None, instance_number: int) -> dict:
    """The keyword arguments every highdicom constructor of ours takes alike: the new series and
    instance (a fresh UID where none is given) and our equipment (General Equipment module)."""
    return {
        "series_instance_uid": series_instance_uid or new_uid(),
        "series_number": series_number,
        "sop_instance_uid": sop_instance_uid or new_uid(),
        "instance_number": instance_number,
        "manufacturer": device.manufacturer,
        "manufacturer_model_name": device.model_name,
        "software_versions": device.software_version,
        "device_serial_number": device.device_serial_number,
    }



def derived_uids(source_series_instance_uid: str, kind: str, generation: int = 1) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) for output ``kind`` ("sr", "pm:<name>", "pdf") of a
    source series, the same every time for the same inputs.

    Rebuilding the outputs of the same analysis (e.g. after a crash between analysis and writing
    the outbox) then gives the same UIDs, so PACS sees a resend rather than a second object. Bump
    ``generation`` when the series is re-analysed with new content (a late instance re-opened it).
    """
    if not source_series_instance_uid or not kind:
        raise ValueError(
            f'Arguments "source_series_instance_uid" and "kind" must be non-empty, got '
            f"{source_series_instance_uid!r}, {kind!r}"
        )
    if not isinstance(generation, int) or generation < 1:
        raise ValueError(f'Argument "generation" must be a positive int, got {generation!r}')
    base = ("ctqa-node-output", source_series_instance_uid, kind, str(generation))
    return stable_uid(*base, "series"), stable_uid(*base, "instance")


# --------------------------------------------------------------------------------------------
# Sources as the world sends them: the patient/study attributes every output copies, made valid.

#: Type 2 attributes of the Patient and General Study modules: always written, empty when the
#: source lacks them or holds an invalid value.
TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
#: Further source attributes that reach an output (equipment, series, geometry of the SR's image
#: library): validated too, an invalid one left out.
_OTHER_COPIED = (
    "Manufacturer", "ManufacturerModelName", "InstitutionName", "InstitutionAddress", "StationName",
    "InstitutionalDepartmentName", "DeviceSerialNumber", "SoftwareVersions", "Laterality",
    "BodyPartExamined", "SeriesDescription", "SeriesNumber", "ProtocolName", "SeriesDate", "SeriesTime",
    "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "SliceThickness",
    "SpacingBetweenSlices", "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
)
_PATIENT_STUDY_MODULES = ("patient", "general-study", "patient-study", "clinical-trial-subject", "clinical-trial-study")
# UIDs are checked on receipt (and an output never copies one it could not use): not here
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})


def _copied_keywords() -> tuple[str, ...]:
    from highdicom._standard_utils import get_module_attribute_map

    modules = get_module_attribute_map()
    out: list[str] = []
    for key in _PATIENT_STUDY_MODULES:
        out.extend(str(i["keyword"]) for i in modules.get(key, []) if len(i["path"]) == 0)
    out.extend(_OTHER_COPIED)
    return tuple(dict.fromkeys(out))


_COPIED: tuple[str, ...] | None = None


def _max_vm(tag) -> int | None:
    """The most values the data dictionary allows the attribute ("1" -> 1, "1-3" -> 3), None when
    unbounded ("1-n", "2-2n") or unknown."""
    from pydicom.datadict import dictionary_VM

    try:
        vm = dictionary_VM(tag)
    except KeyError:
        return None
    top = vm.split("-")[-1]
    return int(top) if top.isdigit() else None


def _invalid_reason(elem) -> str | None:
    """Why a (non-sequence) element's value may not be written, or None when it is valid."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    vr = elem.VR
    if vr not in _TEXT_VRS or elem.value is None or elem.value == "":
        return None
    allowed = _max_vm(elem.tag)
    if allowed is not None and elem.VM > allowed:
        return f"{elem.VM} values where the standard allows {allowed}"
    values = elem.value if isinstance(elem.value, (list, tuple)) or elem.VM > 1 else [elem.value]
    for v in values:
        if v is None or v == "":
            continue
        s = str(v)
        try:
            validate_value(vr, s if vr in ("DA", "TM", "DT", "AS", "CS", "DS", "IS") else v, config.RAISE)
        except (ValueError, TypeError, OverflowError) as exc:
            # the value itself may be patient data: say what rule it breaks, never the value
            m = re.search(r"maximum length of (\d+)", str(exc))
            return f"longer than the {m.group(1)} characters {vr} allows" if m else f"not a valid {vr} value"
        if vr == "DA":
            import datetime

            t = s.strip()
            try:
                datetime.date(int(t[:4]), int(t[4:6]), int(t[6:8]))
            except (ValueError, IndexError):
                return "not a valid DA value (no such date)"
    return None


def _single_byte(term: str) -> str | None:
    """A single "ISO 2022 IR nnn" value -> the equivalent term without code extensions."""
    t = term.strip().upper().replace("_", " ")
    if t == "ISO 2022 IR 6":
        return ""
    if t.startswith("ISO 2022 IR "):
        cand = "ISO_IR " + t[len("ISO 2022 IR "):]
        return cand
    return None


def _charset(ds: Dataset, text_is_ascii: bool) -> tuple[str | list[str] | None, str | None]:
    """(the Specific Character Set to write, a warning or None); None = leave it out (default)."""
    from highdicom.valuerep import _check_specific_character_set

    raw = ds.get("SpecificCharacterSet")
    if raw is None:
        return (None if text_is_ascii else "ISO_IR 192"), None
    values = [str(v).strip() for v in (raw if isinstance(raw, (list, tuple)) or not isinstance(raw, str) else [raw])]
    values = [v for v in values if v] if len(values) == 1 else values
    if not values:
        return (None if text_is_ascii else "ISO_IR 192"), "empty SpecificCharacterSet: default repertoire" + (
            "" if text_is_ascii else " not enough, written as ISO_IR 192 (UTF-8)")
    if len(values) == 1:
        single = _single_byte(values[0])
        if single is not None:
            values = [single] if single else []
            if not values:
                return (None if text_is_ascii else "ISO_IR 192"), None
    value: str | list[str] = values[0] if len(values) == 1 else values
    try:
        _check_specific_character_set(value)
    except (ValueError, TypeError):
        return "ISO_IR 192", "SpecificCharacterSet not usable in an output: written as ISO_IR 192 (UTF-8)"
    return value, None


def _text_is_ascii(ds: Dataset, keywords: Sequence[str]) -> bool:
    for kw in keywords:
        if kw in ds:
            v = ds[kw].value
            try:
                s = str(v) if not isinstance(v, (list, tuple)) else "\\".join(str(x) for x in v)
            except Exception:  # noqa: BLE001 - an undecodable value is not ASCII
                return False
            if any(ord(c) > 127 for c in s):
                return False
    return True


def _shallow_copy(ds: Dataset) -> Dataset:
    """A new Dataset holding the same elements: replacing or deleting one leaves ``ds`` as it is."""
    new = Dataset()
    for elem in ds:
        new.add(elem)
    if hasattr(ds, "file_meta"):
        new.file_meta = ds.file_meta
    return new


def clean_source(ds: Dataset, problems: dict[str, str] | None = None) -> Dataset:
    """A copy of a source header whose patient/study (and other copied) attributes are valid:

    an absent or invalid Type 2 attribute is empty, an invalid Type 3 one is left out, a negative
    or zero SpacingBetweenSlices is left out, PatientIdentityRemoved YES without a
    de-identification method is left out with the method attributes, and SpecificCharacterSet is
    one the standard (and highdicom) allows. ``problems`` (attribute -> what was done, no values)
    collects what was changed.
    """
    global _COPIED
    if _COPIED is None:
        _COPIED = _copied_keywords()
    problems = problems if problems is not None else {}
    out = _shallow_copy(ds)
    for kw in _COPIED:
        if kw not in out:
            continue
        elem = out[kw]
        if elem.VR == "SQ":
            continue
        why = _invalid_reason(elem)
        if why is None and kw == "PatientSex" and elem.value not in (None, "") and str(elem.value).strip() not in ("M", "F", "O"):
            why = "not one of M, F, O"
        if why is None:
            continue
        if kw in TYPE2_PATIENT_STUDY or kw == "SliceThickness":
            out[kw] = DataElement(elem.tag, elem.VR, None)  # a new element: the source keeps its own
            problems[kw] = f"{why}: written empty"
        else:
            del out[kw]
            problems[kw] = f"{why}: left out"
    for kw in TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, None)
    sbs = out.get("SpacingBetweenSlices")
    if sbs not in (None, ""):
        try:
            bad = not float(sbs) > 0
        except (TypeError, ValueError):
            bad = True
        if bad:
            del out.SpacingBetweenSlices
            problems["SpacingBetweenSlices"] = "not positive (the standard forbids it): left out"
    pir = str(out.get("PatientIdentityRemoved", "") or "").strip().upper()
    has_method = bool(str(out.get("DeidentificationMethod", "") or "").strip()) or bool(
        out.get("DeidentificationMethodCodeSequence"))
    if pir == "YES" and not has_method:
        for kw in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
            if kw in out:
                del out[kw]
        problems["PatientIdentityRemoved"] = "YES without DeidentificationMethod: left out"
    charset, warning = _charset(out, _text_is_ascii(out, _COPIED))
    if charset is None:
        if "SpecificCharacterSet" in out:
            del out.SpecificCharacterSet
    else:
        out.SpecificCharacterSet = charset
    if warning:
        problems["SpecificCharacterSet"] = warning
    out._ctqa_prepared = True  # a plain Python attribute, not a DICOM element: see prepare_sources
    return out


def prepare_sources(source_images: Sequence[Dataset], *, log_problems: bool = True) -> list[Dataset]:
    """``unique_sources`` made fit to copy from (``clean_source`` of each header).

    Each change is logged once as a WARNING naming the attribute, never its value. Idempotent:
    preparing prepared sources changes nothing more.
    """
    sources = unique_sources(source_images)
    if all(getattr(ds, "_ctqa_prepared", False) for ds in sources):
        # already prepared (node.outputs prepares once, then each builder is handed the result):
        # preparing again would change nothing and costs ~4 ms per header of a 400-slice series
        return sources
    problems: dict[str, str] = {}
    cleaned = [clean_source(ds, problems) for ds in sources]
    if log_problems and problems:
        logger.warning("source series %s: %s", str(sources[0].get("SeriesInstanceUID", "?"))[:64],
                       "; ".join(f"{k} {v}" for k, v in sorted(problems.items())))
    return cleaned


def source_series_label(src: Dataset) -> str:
    """"series <number> <description>" of a (prepared) source header, for output series
    descriptions: two analysed series of one study get outputs one can tell apart."""
    number = str(src.get("SeriesNumber", "") or "").strip()
    raw = src.get("SeriesDescription", "") or ""
    # a backslash (the value separator) in a source's description reads as several values
    text = " / ".join(str(v).strip() for v in raw) if not isinstance(raw, str) else raw.replace("\\", "/")
    desc = " ".join(text.split())
    label = f"series {number}" if number else "series"
    return f"{label} {desc}".strip() if desc else (label if number else "series without number")
