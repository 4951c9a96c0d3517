"""Real source headers for the output-builder tests (reports/): read like the loader does, i.e.
with PixelData removed. Not a test module."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PHANTOM_5MM = DATA / "ct" / "philips_head_phantom" / "S2010_5mm"

PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def _strip(ds: pydicom.Dataset) -> pydicom.Dataset:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:
            delattr(ds, kw)
    return ds


def phantom_headers() -> list[pydicom.Dataset]:
    """The 28 slices of the shared 5 mm head-phantom series, sorted by z, without PixelData."""
    if not PHANTOM_5MM.is_dir():
        pytest.skip(f"shared CT data not found at {PHANTOM_5MM} (the shared/data folder next to the repo)")
    headers = [_strip(pydicom.dcmread(p)) for p in sorted(PHANTOM_5MM.iterdir()) if p.is_file()]
    headers.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return headers


def enhanced_ct_header() -> pydicom.Dataset:
    """pydicom-data's eCT_Supplemental.dcm (Enhanced CT, 2 frames), without PixelData."""
    data = pytest.importorskip("pydicom.data", reason="pydicom.data missing")
    path = data.get_testdata_file("eCT_Supplemental.dcm", download=False)
    if path is None:
        pytest.skip("eCT_Supplemental.dcm not available offline (pip install pydicom-data)")
    return _strip(pydicom.dcmread(path))


def assert_patient_study_copied(written: pydicom.Dataset, source: pydicom.Dataset) -> int:
    """Every patient/study attribute the source has is in ``written`` with the same value; returns the count."""
    n = 0
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in source:
            assert kw in written, f"{kw} not copied"
            got, want = written[kw].value, source[kw].value
            assert str(got) == str(want), f"{kw}: {got!r} != {want!r}"
            n += 1
    return n


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Write ``ds`` in DICOM file format and read it back, as a receiving PACS would."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)
