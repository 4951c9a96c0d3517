"""Outputs from the world's data: real corpus files with absent Type 2 attributes, an empty or
single-code-extension character set, an invalid date, no Frame of Reference, PatientIdentityRemoved
without a method, and a crafted negative SpacingBetweenSlices. Each goes through the node's
``build_outputs`` (basic + classical on the real pixels) and every object is written and read back."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from analysis.pipeline import analyse_series
from analysis.results import RunContext
from analysis.volume import check_plausible_hu
from node.outputs import build_outputs
from reports.common import TYPE2_PATIENT_STUDY, clean_source
from reports.sr import read_notes
from tests.unit.report_sources import DATA

CORPUS = DATA / "corpus"


def _files(folder: str) -> list[Path]:
    d = CORPUS / folder
    if not d.is_dir():
        pytest.skip(f"corpus folder {d} not found")
    return sorted(p for p in d.iterdir() if p.is_file())


def _build(folder: str):
    result = analyse_series(_files(folder), ["basic", "classical"], RunContext(device="cpu"))
    assert result.status == "done", result.reason
    built = build_outputs(result, "CT1", uid_seed=f"test:{folder}")
    back = {}
    for kind, ds in built.objects:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        back[kind] = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    return built, back


def test_absent_type2_written_empty_and_nothing_lost() -> None:
    """GE 693: no PatientSex/BirthDate values, empty StudyDate/Time, no FrameOfReferenceUID."""
    src = pydicom.dcmread(_files("pylibjpeg-data/GE_coreload_693_J2K_lossy")[0], stop_before_pixels=True)
    assert "FrameOfReferenceUID" not in src
    built, back = _build("pylibjpeg-data/GE_coreload_693_J2K_lossy")
    assert sorted(back) == ["pdf", "sr"]
    assert built.failures == [("pmap:local_noise_sd",
                               "the source has no FrameOfReferenceUID: a Parametric Map needs a Frame of Reference")]
    for kind, ds in back.items():
        for kw in TYPE2_PATIENT_STUDY:
            assert kw in ds, f"{kind}: Type 2 {kw} missing"
        assert ds.StudyDate == "" and ds.PatientSex == ""
        assert ds.StudyInstanceUID == src.StudyInstanceUID
    notes = read_notes(back["sr"])
    assert notes["output"] == ("Parametric Map local_noise_sd not produced: the source has no FrameOfReferenceUID: "
                               "a Parametric Map needs a Frame of Reference")
    # PatientIdentityRemoved YES without DeidentificationMethod is not copied into any output
    assert src.PatientIdentityRemoved == "YES" and "DeidentificationMethod" not in src
    for ds in back.values():
        assert "PatientIdentityRemoved" not in ds and "DeidentificationMethod" not in ds


def test_absent_slice_thickness_and_patient_sex() -> None:
    """dicom2nifti GE LightSpeed16: no SliceThickness, PatientSex, AccessionNumber, FrameOfReferenceUID."""
    built, back = _build("dicom2nifti/GE_LightSpeed16_sliceincrement")
    assert sorted(back) == ["pdf", "sr"] and [k for k, _ in built.failures] == ["pmap:local_noise_sd"]
    sr = back["sr"]
    assert sr.PatientSex == "" and sr.AccessionNumber == ""
    assert sr.SeriesDescription.startswith("CT QA measurements, series ")
    # the metric that needs SliceThickness says why it is missing
    assert read_notes(sr)["slice_thickness_mm"] == "not computed: no SliceThickness (0018,0050) in the series"


def test_empty_character_set_and_empty_slice_thickness() -> None:
    built, back = _build("dcmqi/GE_LightSpeedUltra_3slice")
    assert not built.failures and sorted(back) == ["pdf", "pmap", "sr"]
    for ds in back.values():
        assert "SpecificCharacterSet" not in ds  # empty -> default repertoire (the names are ASCII)
    built, back = _build("pydicom-data/Anon_pancreas_explicitVR_UN")
    assert not built.failures and sorted(back) == ["pdf", "pmap", "sr"]


def test_single_iso2022_ir100_becomes_iso_ir100() -> None:
    src = pydicom.dcmread(_files("pylibjpeg-data/Toshiba_Aquilion_J2K_lossy")[0], stop_before_pixels=True)
    assert src.SpecificCharacterSet == "ISO 2022 IR 100"
    built, back = _build("pylibjpeg-data/Toshiba_Aquilion_J2K_lossy")
    assert not built.failures and sorted(back) == ["pdf", "pmap", "sr"]
    for ds in back.values():
        assert ds.SpecificCharacterSet == "ISO_IR 100"
        assert str(ds.PatientName) == str(src.PatientName)


def test_invalid_date_dropped_with_one_warning_without_values(caplog) -> None:
    src = pydicom.dcmread(_files("pylibjpeg-data/Anon_JPEGLossless_bad")[0], stop_before_pixels=True)
    assert src.StudyDate == "00000000" and src.PatientBirthDate == "00000000"
    problems: dict[str, str] = {}
    out = clean_source(src, problems)
    assert "StudyDate" in out and "PatientBirthDate" in out  # Type 2: present ...
    assert not out.StudyDate and not out.PatientBirthDate  # ... and empty
    assert "SeriesDate" not in out and "AcquisitionDate" not in out  # Type 3: left out
    assert src.StudyDate == "00000000"  # the source header is not touched
    assert problems["StudyDate"] == "not a valid DA value: written empty"
    from reports.common import prepare_sources

    with caplog.at_level(logging.WARNING, logger="reports.common"):
        prepare_sources([src])
    lines = [r.getMessage() for r in caplog.records if r.name == "reports.common"]
    assert len(lines) == 1 and "StudyDate not a valid DA value" in lines[0] and "00000000" not in lines[0]


def test_an_invalid_value_in_every_slice_is_said_once(caplog, monkeypatch, tmp_path) -> None:
    """An over-long Accession Number in each of 5 slices: with the node's process settings pydicom
    says nothing while the slices are read; preparing the outputs' sources says it once, without
    the value."""
    from pydicom import config

    from node.cli import quiet_pydicom_reads
    from reports.common import prepare_sources

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.settings.reading_validation_mode)
    files = []
    for i, f in enumerate(_files("pylibjpeg-data/GE_coreload_693_J2K_lossy")[:1] * 5):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ds.AccessionNumber = "ACC" + "7" * 27  # SH: 16 at most
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1])
    quiet_pydicom_reads()
    caplog.clear()  # (pydicom warned when the test wrote the value)
    with caplog.at_level(logging.WARNING):
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert all(len(str(h.AccessionNumber)) == 30 for h in headers)  # read (and converted) as sent
        prepare_sources(headers)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "AccessionNumber longer than the 16 characters SH allows" in lines[0], lines
    assert "7777" not in lines[0]


def test_too_long_string_and_bad_sex_dropped() -> None:
    src = pydicom.dcmread(_files("pylibjpeg-data/GE_coreload_693_J2K_lossy")[0], stop_before_pixels=True)
    src.PatientID = "X" * 65  # LO: 64 at most
    src.PatientSex = "Q"
    src.PatientWeight = "70.0"
    problems: dict[str, str] = {}
    out = clean_source(src, problems)
    assert "PatientID" in out and not out.PatientID and "PatientSex" in out and not out.PatientSex
    assert float(out.PatientWeight) == 70.0  # a valid Type 3 value stays
    assert problems["PatientID"] == "longer than the 64 characters LO allows: written empty"


def test_more_values_than_the_standard_allows_are_not_copied() -> None:
    """Two referring physicians in a VM 1 attribute (seen from a RIS), a two-valued Institution Name:
    the Type 2 one written empty, the Type 3 one left out; a multi-valued attribute within its VM
    (Image Type, 2-n) and a one-valued one stay."""
    src = pydicom.dcmread(_files("pylibjpeg-data/GE_coreload_693_J2K_lossy")[0], stop_before_pixels=True)
    src.ReferringPhysicianName = ["Who^Doctor", "Watson^John"]
    src.InstitutionName = ["Hospital A", "Hospital B"]
    src.StationName = "CT01"
    problems: dict[str, str] = {}
    out = clean_source(src, problems)
    assert "ReferringPhysicianName" in out and out.ReferringPhysicianName in (None, "")
    assert "InstitutionName" not in out and out.StationName == "CT01"
    assert problems["ReferringPhysicianName"] == "2 values where the standard allows 1: written empty"
    assert problems["InstitutionName"] == "2 values where the standard allows 1: left out"
    assert "StationName" not in problems and "ImageType" not in problems
    assert list(src.ReferringPhysicianName) == ["Who^Doctor", "Watson^John"]  # the source untouched


def test_negative_spacing_between_slices_is_not_copied() -> None:
    """A real series with SpacingBetweenSlices made negative (some scanners write the signed step)."""
    files = _files("dcmqi/GE_LightSpeedUltra_3slice")
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    src.SpacingBetweenSlices = "-2.5"
    problems: dict[str, str] = {}
    out = clean_source(src, problems)
    assert "SpacingBetweenSlices" not in out
    assert problems["SpacingBetweenSlices"] == "not positive (the standard forbids it): left out"


def test_patient_identity_removed_kept_with_its_method() -> None:
    src = pydicom.dcmread(_files("pylibjpeg-data/GE_coreload_693_J2K_lossy")[0], stop_before_pixels=True)
    src.DeidentificationMethod = "PS3.15 Basic Profile"
    out = clean_source(src, {})
    assert out.PatientIdentityRemoved == "YES" and out.DeidentificationMethod == "PS3.15 Basic Profile"


def test_corrupt_jpeg_stream_fails_the_series() -> None:
    result = analyse_series(_files("pylibjpeg-data/Anon_JPEGLossless_bad"), ["basic"], RunContext(device="cpu"))
    assert result.status == "failed"
    assert "pixels do not decode to plausible CT numbers" in result.reason
    assert "above 4000 HU (up to 31743)" in result.reason


def test_metal_is_plausible_scattered_spikes_are_not() -> None:
    hu = np.full((2, 512, 512), -1000.0, np.float32)
    yy, xx = np.mgrid[:512, :512]
    hu[:, (yy - 256) ** 2 + (xx - 300) ** 2 < 30**2] = 20000.0  # a compact implant: 1.1 % of the pixels
    check_plausible_hu(hu)
    spikes = np.random.default_rng(0).random((512, 512)) < 0.005
    hu[1][spikes] = 31000.0
    with pytest.raises(ValueError, match=r"slice 2 of 2 has 0\.\d+% scattered pixels above 4000 HU"):
        check_plausible_hu(hu)


def test_output_series_descriptions_name_the_source_series() -> None:
    """Two analysed series of one study: their outputs are told apart by the source series."""
    from reports.common import source_series_label

    src = pydicom.dcmread(_files("dcmqi/GE_LightSpeedUltra_3slice")[0], stop_before_pixels=True)
    assert (src.SeriesNumber, src.get("SeriesDescription", "")) == (2, "")  # no description: the number says it
    label = "series 2"
    built, back = _build("dcmqi/GE_LightSpeedUltra_3slice")
    assert back["sr"].SeriesDescription == f"CT QA measurements, {label}"[:64]
    assert back["pmap"].SeriesDescription == f"QA map: Local noise SD, {label}"[:64]
    assert back["pdf"].SeriesDescription == f"QA report (PDF), {label}"[:64]
    other = pydicom.Dataset()
    other.SeriesNumber, other.SeriesDescription = 7, "Thorax  1.0 \\ B30f " + "x" * 80
    assert source_series_label(other).startswith("series 7 Thorax 1.0 / B30f xxx")
    assert source_series_label(pydicom.Dataset()) == "series without number"
    back5 = pydicom.dcmread(next(p for p in sorted((DATA / "ct" / "philips_head_phantom" / "S2010_5mm").iterdir())
                                 if p.is_file()), stop_before_pixels=True)
    assert source_series_label(back5) == "series 201 STD BRAIN 5MM"
    long = f"CT QA measurements, {source_series_label(other)}"[:64]
    assert len(long) == 64 and "\\" not in long


def test_a_slice_gap_is_said_in_the_sr_the_pdf_and_the_json() -> None:
    """The 5 mm phantom series with 3 of its 28 slices missing in the middle (a transfer cut short,
    a deleted slice): analysed from the 25 present, and the SR, the PDF and ``analyze --json`` say
    so; the complete series has no such note."""
    from node.cli import result_to_json
    from tests.helpers import PHANTOM_5MM, require

    files = sorted((p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I")),
                   key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    assert len(files) == 28
    ctx = RunContext(device="cpu")
    full = analyse_series(files, ["basic", "classical"], ctx)
    assert full.status == "done" and result_to_json(full)["series_notes"] == []
    built = build_outputs(full, "CT1", uid_seed="test:full")
    assert "series" not in read_notes(dict(built.objects)["sr"])

    gap = analyse_series(files[:12] + files[15:], ["basic", "classical"], ctx)
    assert gap.status == "done"
    expected = ("slice gap: about 3 slice(s) missing at 1 place(s) (a step of up to 20.0 mm where the series' "
                "spacing is 5.0 mm); the metrics are from the 25 slices present")
    assert result_to_json(gap)["series_notes"] == [expected]
    built = build_outputs(gap, "CT1", uid_seed="test:gap")
    objects = dict(built.objects)
    buf = io.BytesIO()
    objects["sr"].save_as(buf, enforce_file_format=True)
    assert read_notes(pydicom.dcmread(io.BytesIO(buf.getvalue())))["series"] == expected
    import subprocess

    out = subprocess.run(["gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite", "-sOutputFile=-", "-"],
                         input=bytes(objects["pdf"].EncapsulatedDocument), capture_output=True, check=True,
                         timeout=60).stdout.decode("utf-8", "replace")
    text = " ".join(out.split())
    assert "Source series: slice gap: about 3 slice(s) missing" in text
