"""Parametric Map: built from real CT headers (single-frame series and an Enhanced CT), written, read
back field by field; the float32 pixels must round-trip exactly and each frame must sit on its
source slice."""

from __future__ import annotations


import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage

from reports.codes import map_code
from reports.inputs import AlgorithmId
from reports.pmap import build_parametric_map
from tests.unit.report_sources import assert_patient_study_copied, enhanced_ct_header, roundtrip

ALGO = AlgorithmId("ctqa-classical", "1.2.0")
N2Q = AlgorithmId("n2q", "0.3.1", "4d7596a1638ebb1ccb8945f079b08b30791a1241965f1541dc842d48a0341bc2")
HU = ("[hnsf'U]", "Hounsfield unit")


@pytest.fixture(scope="module")
def values(headers) -> np.ndarray:
    rng = np.random.default_rng(7)
    v = rng.gamma(3.0, 2.5, (len(headers), headers[0].Rows, headers[0].Columns)).astype(np.float32)
    v[0, 0, 0] = np.float32(1e-7)  # values that do not survive any integer or DS rounding
    v[-1, -1, -1] = np.float32(123456.789)
    return v


def _frame_source(frame: pydicom.Dataset) -> tuple[str, list[int] | None]:
    src = frame.DerivationImageSequence[0].SourceImageSequence[0]
    fr = src.get("ReferencedFrameNumber")
    frames = None if fr is None else [int(x) for x in (fr if isinstance(fr, pydicom.multival.MultiValue) else [fr])]
    return str(src.ReferencedSOPInstanceUID), frames


def _frames_by_source(ds: pydicom.Dataset) -> dict[tuple[str, int | None], int]:
    """(source SOP instance UID, source frame) -> index of the map frame derived from it."""
    out = {}
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, frames = _frame_source(frame)
        out[(uid, frames[0] if frames else None)] = k
    return out


def _processing_equipment(ds: pydicom.Dataset) -> pydicom.Dataset:
    items = [
        e
        for e in ds.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # DCM Processing Equipment
        and e.Manufacturer == "CT QA Node project"
    ]
    assert len(items) == 1
    return items[0]


def test_single_frame_series(headers, values) -> None:
    pm = build_parametric_map(
        headers,
        values,
        name="local_noise_sd",
        label="Local noise SD",
        unit_code=HU[0],
        unit_meaning=HU[1],
        algorithm=ALGO,
        series_number=9002,
        instance_number=2,
    )
    ds = roundtrip(pm)
    src = headers[0]
    assert ds.SOPClassUID == ParametricMapStorage
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9002, 2)
    assert assert_patient_study_copied(ds, src) >= 10
    assert int(ds.NumberOfFrames) == len(headers)
    assert (ds.Rows, ds.Columns) == (src.Rows, src.Columns)
    assert ds.BitsAllocated == 32 and "FloatPixelData" in ds

    # the pixels round-trip exactly as float32; each frame holds the values given for its source slice
    pixels = ds.pixel_array
    assert pixels.dtype == np.float32
    index = _frames_by_source(ds)
    assert set(index) == {(h.SOPInstanceUID, None) for h in headers}
    for i, h in enumerate(headers):
        np.testing.assert_array_equal(pixels[index[(h.SOPInstanceUID, None)]], values[i])

    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing], [float(x) for x in src.PixelSpacing]
    )
    np.testing.assert_allclose(
        [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(x) for x in src.ImageOrientationPatient],
    )
    for h in headers:
        frame = ds.PerFrameFunctionalGroupsSequence[index[(h.SOPInstanceUID, None)]]
        np.testing.assert_allclose(
            [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(x) for x in h.ImagePositionPatient],
        )
    # every source referenced (series-level Referenced Series / Source Image Sequence)
    refs = {
        inst.ReferencedSOPInstanceUID
        for series in ds.ReferencedSeriesSequence
        for inst in series.ReferencedInstanceSequence
    }
    assert refs == {h.SOPInstanceUID for h in headers}

    # Real World Value Mapping: identity, units, quantity
    rwvm = shared.RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("[hnsf'U]", "UCUM", "Hounsfield unit")
    assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
    assert rwvm.DoubleFloatRealWorldValueFirstValueMapped == pytest.approx(float(values.min()))
    assert rwvm.DoubleFloatRealWorldValueLastValueMapped == pytest.approx(float(values.max()))
    quantity = [
        item.ConceptCodeSequence[0]
        for item in rwvm.QuantityDefinitionSequence
        if item.ValueType == "CODE"
    ]
    assert quantity and quantity[0].CodeValue == map_code("local_noise_sd").quantity.value
    assert rwvm.LUTExplanation == "Local noise SD"

    # provenance
    eq = _processing_equipment(ds)
    assert eq.ManufacturerModelName == "ctqa-classical" and eq.SoftwareVersions == "1.2.0"
    assert "ctqa-classical 1.2.0" in ds.ContentDescription
    # Frame Anatomy from Body Part Examined (BRAIN), no empty series Laterality
    anatomy = shared.FrameAnatomySequence[0]
    assert anatomy.AnatomicRegionSequence[0].CodeValue == "12738006" and anatomy.FrameLaterality == "U"
    assert "Laterality" not in ds

    # highdicom can read it back as a Parametric Map
    hd_pm = hd.pm.ParametricMap.from_dataset(ds)
    assert hd_pm.SOPInstanceUID == pm.SOPInstanceUID


def test_frames_follow_source_order_not_z(headers, values) -> None:
    """Map slice i belongs to source_images[i], whatever order the caller used."""
    perm = np.random.default_rng(3).permutation(len(headers))
    shuffled = [headers[i] for i in perm]
    ds = roundtrip(
        build_parametric_map(
            shuffled,
            values[perm],
            name="local_noise_sd",
            label="Local noise SD",
            unit_code=HU[0],
            unit_meaning=HU[1],
            algorithm=ALGO,
            series_number=9002,
        )
    )
    by_uid = {h.SOPInstanceUID: values[i] for i, h in enumerate(headers)}
    pixels = ds.pixel_array
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, _ = _frame_source(frame)
        np.testing.assert_array_equal(pixels[k], by_uid[uid])


def test_enhanced_ct_source_with_frame_numbers() -> None:
    ect = enhanced_ct_header()
    n = int(ect.NumberOfFrames)
    assert n == 2
    v = np.stack([np.full((ect.Rows, ect.Columns), x, np.float32) for x in (0.25, 0.75)])
    # map slice 0 is frame 2, map slice 1 is frame 1 (a volume sorted along z may do that)
    pm = build_parametric_map(
        [ect, ect],
        v,
        name="n2q_quality",
        label="N2Q quality",
        unit_code="1",
        unit_meaning="no units",
        algorithm=N2Q,
        series_number=7,
        frame_numbers=[2, 1],
    )
    ds = roundtrip(pm)
    assert ds.FrameOfReferenceUID == ect.FrameOfReferenceUID
    assert ds.StudyInstanceUID == ect.StudyInstanceUID
    assert_patient_study_copied(ds, ect)
    pixels = ds.pixel_array
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, frames = _frame_source(frame)
        assert uid == ect.SOPInstanceUID
        assert frames == [k + 1]
        expected = 0.75 if k + 1 == 1 else 0.25
        assert np.all(pixels[k] == np.float32(expected))
        src_pos = ect.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient], [float(x) for x in src_pos]
        )
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert float(voi.WindowWidth) < 1 and voi.VOILUTFunction == "LINEAR_EXACT"
    assert N2Q.weights_sha256 in _processing_equipment(ds).ContributionDescription


def test_non_finite_pixels_need_an_explicit_fill_value(headers, values) -> None:
    v = values.copy()
    v[3, 10:20, 10:20] = np.nan
    kwargs = dict(
        name="local_noise_sd", label="L", unit_code=HU[0], unit_meaning=HU[1], algorithm=ALGO, series_number=1
    )
    with pytest.raises(ValueError, match="100 non-finite pixels"):
        build_parametric_map(headers, v, **kwargs)
    ds = roundtrip(build_parametric_map(headers, v, fill_value=-1.0, **kwargs))
    px = ds.pixel_array
    index = _frames_by_source(ds)
    k3, k4 = index[(headers[3].SOPInstanceUID, None)], index[(headers[4].SOPInstanceUID, None)]
    assert np.all(px[k3, 10:20, 10:20] == -1.0)
    assert np.count_nonzero(px[k3] == -1.0) == 100
    np.testing.assert_array_equal(px[k4], values[4])


def test_bad_arguments_are_named(headers, values) -> None:
    kwargs = dict(
        name="local_noise_sd", label="L", unit_code=HU[0], unit_meaning=HU[1], algorithm=ALGO, series_number=1
    )
    with pytest.raises(ValueError, match='"values" must be a float32'):
        build_parametric_map(headers, values.astype(np.float64), **kwargs)
    with pytest.raises(ValueError, match="27 slices, the source has 28 images"):
        build_parametric_map(headers, values[:-1], **kwargs)
    with pytest.raises(ValueError, match="slices are"):
        build_parametric_map(headers, values[:, :100, :100].copy(), **kwargs)
    with pytest.raises(ValueError, match="Unknown map name"):
        build_parametric_map(headers, values, **{**kwargs, "name": "bogus"})
    with pytest.raises(ValueError, match="frame_numbers"):
        build_parametric_map(headers, values, frame_numbers=list(range(1, 29)), **kwargs)
    with pytest.raises(ValueError, match="series_number"):
        build_parametric_map(headers, values, **{**kwargs, "series_number": 0})
