"""Parametric Map: built from real CT headers (single-frame series and an Enhanced CT), written, read
back field by field; the values read back through the Real World Value Mapping must equal the input
within half a quantisation step, and each frame must sit on its source slice (also when the map is
stored at a reduced resolution)."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage

from reports.codes import map_code
from reports.inputs import AlgorithmId
from reports.pmap import MapNotPossible, block_mean, build_parametric_map, map_values
from tests.unit.report_sources import assert_patient_study_copied, enhanced_ct_header, roundtrip

ALGO = AlgorithmId("ctqa-classical", "1.2.0")
N2Q = AlgorithmId("n2q", "0.3.1", "4d7596a1638ebb1ccb8945f079b08b30791a1241965f1541dc842d48a0341bc2")
HU = ("[hnsf'U]", "Hounsfield unit")


@pytest.fixture(scope="module")
def values(headers) -> np.ndarray:
    rng = np.random.default_rng(7)
    v = rng.gamma(3.0, 2.5, (len(headers), headers[0].Rows, headers[0].Columns)).astype(np.float32)
    v[0, 0, 0] = np.float32(0.0)
    v[-1, -1, -1] = np.float32(80.0)  # range 0..80 HU: quantisation step 80 / 65535
    return v


def _step(v: np.ndarray) -> float:
    return float(v.max() - v.min()) / 65535.0


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
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0) and "PixelData" in ds

    # through the RWVM each frame holds the values given for its source slice, within half a step
    pixels = map_values(ds)
    index = _frames_by_source(ds)
    assert set(index) == {(h.SOPInstanceUID, None) for h in headers}
    for i, h in enumerate(headers):
        np.testing.assert_allclose(pixels[index[(h.SOPInstanceUID, None)]], values[i], rtol=0,
                                   atol=0.5 * _step(values) * 1.001)
    assert ds.pixel_array.max() == 65535 and ds.pixel_array.min() == 0  # the full 16 bits are used

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

    # Real World Value Mapping: slope/intercept over min..max, units, quantity
    rwvm = shared.RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning) == ("[hnsf'U]", "UCUM", "Hounsfield unit")
    assert float(rwvm.RealWorldValueSlope) == pytest.approx(80.0 / 65535, rel=1e-9)
    assert float(rwvm.RealWorldValueIntercept) == 0.0
    assert (rwvm.RealWorldValueFirstValueMapped, rwvm.RealWorldValueLastValueMapped) == (0, 65535)
    # window: the 1st-99th percentile of the map, in stored values
    voi = shared.FrameVOILUTSequence[0]
    p1, p99 = np.percentile(values, [1, 99])
    slope = float(rwvm.RealWorldValueSlope)
    assert float(voi.WindowCenter) * slope == pytest.approx((p1 + p99) / 2, abs=0.01)
    assert float(voi.WindowWidth) * slope == pytest.approx(p99 - p1, abs=0.01)
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
    pixels = map_values(ds)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, _ = _frame_source(frame)
        np.testing.assert_allclose(pixels[k], by_uid[uid], rtol=0, atol=0.5 * _step(values) * 1.001)


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
    pixels = map_values(ds)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, frames = _frame_source(frame)
        assert uid == ect.SOPInstanceUID
        assert frames == [k + 1]
        expected = 0.75 if k + 1 == 1 else 0.25
        np.testing.assert_allclose(pixels[k], expected, rtol=0, atol=0.5 / 65535 * 1.001)
        src_pos = ect.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient], [float(x) for x in src_pos]
        )
    # a unit-less map in [0, 1]: the window (stored values) still spans at least one stored step
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert float(voi.WindowWidth) >= 1
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
    px = map_values(ds)
    index = _frames_by_source(ds)
    k3, k4 = index[(headers[3].SOPInstanceUID, None)], index[(headers[4].SOPInstanceUID, None)]
    assert np.all(px[k3, 10:20, 10:20] == -1.0)  # the fill value is the minimum: stored 0, exact
    assert np.count_nonzero(px[k3] == -1.0) == 100
    np.testing.assert_allclose(px[k4], values[4], rtol=0, atol=0.5 * 81.0 / 65535 * 1.001)


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


def test_reduced_resolution_keeps_geometry(headers, values) -> None:
    """downsample=4: each stored pixel is the mean of a 4 x 4 block, Pixel Spacing x4, and each frame's
    Image Position is the centre of its first block (1.5 source pixels along row and column)."""
    pm = build_parametric_map(headers, values, name="local_noise_sd", label="Local noise SD", unit_code=HU[0],
                              unit_meaning=HU[1], algorithm=ALGO, series_number=9002, downsample=4,
                              resolution_note="stored at 128 x 128")
    ds = roundtrip(pm)
    src = headers[0]
    assert (ds.Rows, ds.Columns) == (src.Rows // 4, src.Columns // 4)
    assert ds.ImageComments == "stored at 128 x 128"
    shared = ds.SharedFunctionalGroupsSequence[0]
    ps = [float(x) for x in src.PixelSpacing]
    np.testing.assert_allclose([float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing],
                               [4 * ps[0], 4 * ps[1]])
    iop = np.array([float(x) for x in src.ImageOrientationPatient])
    expected_means = block_mean(values, 4)
    pixels = map_values(ds)
    index = _frames_by_source(ds)
    for i, h in enumerate(headers):
        k = index[(h.SOPInstanceUID, None)]
        pos = np.array([float(x) for x in ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0]
                        .ImagePositionPatient])
        want = np.array([float(x) for x in h.ImagePositionPatient]) + 1.5 * (ps[1] * iop[:3] + ps[0] * iop[3:])
        np.testing.assert_allclose(pos, want, atol=1e-4)
        # a known block: the mean of source pixels [0:4, 4:8] of this slice
        assert pixels[k, 0, 1] == pytest.approx(float(values[i, 0:4, 4:8].mean()), abs=0.5 * _step(expected_means) * 1.01)
        np.testing.assert_allclose(pixels[k], expected_means[i], rtol=0, atol=0.5 * _step(expected_means) * 1.001)
    # the map is 16 x smaller than the float32 map at the source matrix would have been
    assert len(ds.PixelData) == len(headers) * (src.Rows // 4) * (src.Columns // 4) * 2


def test_source_without_frame_of_reference_is_refused_with_the_reason(headers, values) -> None:
    no_for = []
    for h in headers:
        c = pydicom.dcmread(io.BytesIO(_bytes(h)))
        del c.FrameOfReferenceUID
        no_for.append(c)
    with pytest.raises(MapNotPossible, match="no FrameOfReferenceUID: a Parametric Map needs a Frame of Reference"):
        build_parametric_map(no_for, values, name="local_noise_sd", label="L", unit_code=HU[0],
                             unit_meaning=HU[1], algorithm=ALGO, series_number=1)


@pytest.mark.parametrize("how", ["removed", "empty"])
def test_source_without_slice_thickness_gives_a_map_without_it(headers, values, how) -> None:
    """Some writers leave Slice Thickness out (or empty, Type 2): the map is built, with the source's
    Pixel Spacing and no thickness, its frames on their source slices."""
    thin = []
    for h in headers:
        c = pydicom.dcmread(io.BytesIO(_bytes(h)))
        if how == "removed":
            del c.SliceThickness
        else:
            c.SliceThickness = None
        thin.append(c)
    for downsample in (1, 2):
        ds = roundtrip(build_parametric_map(thin, values, name="local_noise_sd", label="Local noise SD",
                                            unit_code=HU[0], unit_meaning=HU[1], algorithm=ALGO, series_number=1,
                                            downsample=downsample))
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        np.testing.assert_allclose([float(x) for x in measures.PixelSpacing],
                                   [downsample * float(x) for x in headers[0].PixelSpacing])
        assert "SliceThickness" not in measures
        assert ("SliceThickness" in thin[0]) == (how == "empty")  # the caller's headers untouched
        assert int(ds.NumberOfFrames) == len(headers)
        index = _frames_by_source(ds)
        assert set(index) == {(h.SOPInstanceUID, None) for h in headers}
        if downsample == 1:
            pixels = map_values(ds)
            for i, h in enumerate(headers):
                np.testing.assert_allclose(pixels[index[(h.SOPInstanceUID, None)]], values[i], rtol=0,
                                           atol=0.5 * _step(values) * 1.001)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_reduced_resolution_multiframe_source_positions_per_frame() -> None:
    """Enhanced CT (positions in functional groups), map slices given in reverse frame order."""
    ect = enhanced_ct_header()
    v = np.stack([np.full((ect.Rows, ect.Columns), x, np.float32) for x in (0.25, 0.75)])
    ds = roundtrip(build_parametric_map([ect, ect], v, name="n2q_quality", label="N2Q quality", unit_code="1",
                                        unit_meaning="no units", algorithm=N2Q, series_number=7,
                                        frame_numbers=[2, 1], downsample=2))
    assert (ds.Rows, ds.Columns) == (ect.Rows // 2, ect.Columns // 2)
    shared = ect.SharedFunctionalGroupsSequence[0]
    ps = [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing]
    iop = np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    pixels = map_values(ds)
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid, frames = _frame_source(frame)
        src_pos = np.array([float(x) for x in
                            ect.PerFrameFunctionalGroupsSequence[frames[0] - 1].PlanePositionSequence[0].ImagePositionPatient])
        want = src_pos + 0.5 * (ps[1] * iop[:3] + ps[0] * iop[3:])
        np.testing.assert_allclose([float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient], want,
                                   atol=1e-4)
        np.testing.assert_allclose(pixels[k], 0.75 if frames == [1] else 0.25, atol=0.5 / 65535 * 1.001)
