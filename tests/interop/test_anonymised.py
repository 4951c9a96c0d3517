"""A series anonymised per DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile), in
both forms a de-identifier may write (attributes removed / attributes emptied), pushed through
``qa-node serve`` to a real Orthanc: SR, Parametric Map and PDF arrive in the source study, dciodvfy
reports no Error on any, Orthanc renders a preview of a map frame, and the maps are smaller than
the images."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.orthanc import LocalOrthanc
from tests.helpers import PHANTOM_5MM, require, require_tool, storescu
from tests.interop.test_orthanc import PDF_CLASS, PM_CLASS, SR_CLASS, node_with_destination, outbox_when

pytestmark = pytest.mark.interop

# PS3.15 Table E.1-1, the attributes of this kind the phantom series holds, with the Basic Profile
# action (X remove, Z zero-length or dummy, D dummy, U replace UID consistently; where the table
# allows X/Z or X/Z/D the two forms below pick X resp. Z).
BASIC_PROFILE: dict[str, str] = {
    "PatientName": "Z", "PatientID": "Z", "PatientBirthDate": "Z", "PatientSex": "Z",
    "PatientAge": "X", "PatientSize": "X", "PatientWeight": "X", "OtherPatientIDs": "X",
    "StudyDate": "Z", "StudyTime": "Z", "AccessionNumber": "Z", "ReferringPhysicianName": "Z", "StudyID": "Z",
    "StudyDescription": "X", "SeriesDescription": "X", "InstitutionName": "X/Z/D", "InstitutionAddress": "X",
    "StationName": "X/Z/D", "OperatorsName": "X/Z/D", "PerformingPhysicianName": "X",
    "PhysiciansOfRecord": "X", "RequestingPhysician": "X", "DeviceSerialNumber": "X/Z/D",
    "ContentDate": "Z/D", "ContentTime": "Z/D", "AcquisitionDate": "X/Z", "AcquisitionTime": "X/Z",
    "SeriesDate": "X/D", "SeriesTime": "X/D", "AcquisitionDateTime": "X/D", "ProtocolName": "X/D",
    "RequestAttributesSequence": "X", "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepStartDate": "X", "PerformedProcedureStepStartTime": "X",
    "PerformedProcedureStepID": "X", "ImageComments": "X",
    "StudyInstanceUID": "U", "SeriesInstanceUID": "U", "SOPInstanceUID": "U", "FrameOfReferenceUID": "U",
}


def anonymise(src_dir: Path, out_dir: Path, form: str, n: int = 6) -> Path:
    """Apply the Basic Profile to the first ``n`` slices: form "removed" removes every X and Z
    attribute (an absent Type 2 attribute, as many de-identifiers write it), "emptied" keeps Z (and
    X/Z) attributes with an empty value; private attributes go; UIDs are replaced consistently."""
    out_dir.mkdir(parents=True)
    new_uids: dict[str, str] = {}
    files = sorted(p for p in src_dir.iterdir() if p.is_file())[:n]
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.remove_private_tags()
        for kw, action in BASIC_PROFILE.items():
            if kw not in ds:
                continue
            if action == "U":
                old = str(ds.data_element(kw).value)
                ds.data_element(kw).value = new_uids.setdefault(old, str(generate_uid()))
            elif form == "removed" or action in ("X", "X/D"):
                delattr(ds, kw)
            else:
                ds.data_element(kw).value = None if ds.data_element(kw).VR != "SQ" else []
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        if form == "removed":
            item = pydicom.Dataset()
            item.CodeValue, item.CodingSchemeDesignator = "113100", "DCM"
            item.CodeMeaning = "Basic Application Confidentiality Profile"
            ds.DeidentificationMethodCodeSequence = [item]
        else:
            ds.DeidentificationMethod = "PS3.15 Annex E Basic Application Level Confidentiality Profile"
        ds.save_as(out_dir / f"{i:03d}.dcm", enforce_file_format=True)
    return out_dir


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([shutil.which("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    return [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip().startswith("Error")]


def _fetch(pacs: LocalOrthanc, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(pacs.url + path, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


@pytest.mark.parametrize("form", ["removed", "emptied"])
def test_anonymised_series_gets_all_outputs_in_pacs(tmp_path, form):
    require_tool("Orthanc")
    require_tool("dciodvfy")
    series = anonymise(require(PHANTOM_5MM), tmp_path / "anon", form)
    first = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert ("PatientName" in first) == (form == "emptied") and not first.get("PatientName")
    study = str(first.StudyInstanceUID)
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        node = node_with_destination(tmp_path, pacs)
        node.start()
        try:
            assert storescu(node.port, series).returncode == 0
            rows = outbox_when(node, "sent", timeout=240)  # delivered to Orthanc
        finally:
            node.stop()
        assert sorted(r["kind"] for r in rows) == ["pdf", "pmap", "sr"]
        found = [i for i in pacs.instances_in_study(study) if i["sop_class_uid"] != first.SOPClassUID]
        assert sorted(i["sop_class_uid"] for i in found) == sorted([SR_CLASS, PM_CLASS, PDF_CLASS])
        image_bytes = sum(p.stat().st_size for p in series.iterdir())
        for inst in found:
            status, _, data = _fetch(pacs, f"/instances/{inst['id']}/file")
            assert status == 200
            path = tmp_path / f"{inst['id']}.dcm"
            path.write_bytes(data)
            assert _dciodvfy_errors(path) == [], f"{inst['sop_class_uid']}: dciodvfy errors"
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == study
            # the de-identification flag travels with its method, as the source has them
            assert ds.PatientIdentityRemoved == "YES"
            assert ("DeidentificationMethodCodeSequence" in ds) == (form == "removed")
            assert ("DeidentificationMethod" in ds) == (form == "emptied")
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "AccessionNumber"):
                assert kw in ds and not ds.get(kw), f"{kw}: Type 2, written empty"
            if inst["sop_class_uid"] == PM_CLASS:
                # Orthanc renders a map frame, and the map is smaller than the images it was made from
                status, ctype, png = _fetch(pacs, f"/instances/{inst['id']}/frames/0/preview")
                assert status == 200 and ctype == "image/png" and png.startswith(b"\x89PNG")
                assert len(data) < image_bytes
