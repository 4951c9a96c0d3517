"""analysis.volume.load_series against files with known geometry and pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from analysis.results import SeriesSkipped
from analysis.volume import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    load_series,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WG04 = SHARED / "dicom" / "wg04"
PHANTOM_1MM = SHARED / "ct" / "philips_head_phantom" / "S2020_1mm_std"
LOSSLESS = ("RLE", "JPLL", "JLSL", "J2KR")


def _testdata(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
    return str(path)


def _ct_slice(
    path: Path,
    stored: np.ndarray,
    *,
    position=(0.0, 0.0, 0.0),
    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    instance: int = 1,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    slope: float = 1.0,
    intercept: float = -1024.0,
    spacing=(0.5, 0.5),
    modality: str = "CT",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    padding: int | None = None,
    ctdivol: float | None = 12.5,
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.BodyPartExamined = "ABDOMEN"
    ds.ConvolutionKernel = "B30f"
    if ctdivol is not None:
        ds.CTDIvol = ctdivol
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if padding is not None:
        ds.PixelPaddingValue = padding
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_sorts_along_normal_not_by_instance_number(tmp_path):
    rng = np.random.default_rng(3)
    zs = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]
    instance_numbers = rng.permutation(len(zs)) + 1
    paths = []
    for z, inst in zip(zs, instance_numbers):
        stored = np.full((16, 16), 1024 + int(z), dtype=np.int16)  # HU = z
        paths.append(_ct_slice(tmp_path / f"s{inst}.dcm", stored, position=(0, 0, z), instance=int(inst)))
    order = rng.permutation(len(paths))
    vol = load_series([paths[i] for i in order])
    assert vol.hu.shape == (6, 16, 16)
    np.testing.assert_allclose(vol.slice_positions_mm, zs)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], np.asarray(zs, dtype=np.float32))
    assert vol.meta["uneven_spacing"] is False
    assert vol.meta["slice_spacing_mm"] == pytest.approx(1.0)
    assert vol.meta["scan_length_mm"] == pytest.approx(5.0 + 1.0)
    np.testing.assert_allclose(vol.ctdivol_mgy, 12.5)
    assert vol.frame_numbers == [None] * 6
    assert all("PixelData" not in h for h in vol.headers)
    assert vol.meta["kvp"] == 120.0 and vol.meta["kernel"] == "B30f" and vol.meta["body_part"] == "ABDOMEN"


def test_feet_first_orientation_sorts_by_normal(tmp_path):
    # rows along -x: the normal points to -z, so the slice with the highest z comes first
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    paths = [_ct_slice(tmp_path / f"{z}.dcm", np.full((8, 8), 1024 + z, np.int16), position=(0, 0, z),
                       orientation=orientation, instance=i)
             for i, z in enumerate((1, 2, 3))]
    vol = load_series(paths)
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [3, 2, 1])
    assert np.all(np.diff(vol.slice_positions_mm) > 0)


def test_gantry_tilt(tmp_path):
    tilt = math.radians(20.0)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    zs = [0.0, 2.0, 4.0, 6.0]
    paths = [_ct_slice(tmp_path / f"{i}.dcm", np.full((8, 8), 1024 + i, np.int16), position=(0, 5.0, z),
                       orientation=orientation, instance=4 - i)
             for i, z in enumerate(zs)]
    vol = load_series(paths[::-1])
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [0, 1, 2, 3])
    np.testing.assert_allclose(np.diff(vol.slice_positions_mm), 2.0 * math.cos(tilt), rtol=1e-6)
    assert vol.meta["gantry_tilt_deg"] == pytest.approx(20.0, abs=0.01)


def test_uneven_spacing_kept(tmp_path):
    zs = [0.0, 1.0, 2.0, 4.0, 5.0]
    paths = [_ct_slice(tmp_path / f"{i}.dcm", np.zeros((8, 8), np.int16), position=(0, 0, z), instance=i)
             for i, z in enumerate(zs)]
    vol = load_series(paths)
    np.testing.assert_allclose(vol.slice_positions_mm, zs)
    assert vol.meta["uneven_spacing"] is True


def test_rescale_and_padding(tmp_path):
    stored = np.array([[0, 100, 500], [-2000, 1000, 520]], dtype=np.int16)
    p = _ct_slice(tmp_path / "a.dcm", stored, slope=2.0, intercept=-1000.0, padding=-2000)
    vol = load_series([p])
    expected = np.array([[-1000, -800, 0], [-1024, 1000, 40]], dtype=np.float32)
    np.testing.assert_array_equal(vol.hu[0], expected)
    assert vol.hu.dtype == np.float32


def test_out_of_field_fill_without_padding_tag_is_air(tmp_path):
    stored = np.array([[-2000, 0, 1024]], dtype=np.int16)  # -3024 HU fill, -1024, 0
    vol = load_series([_ct_slice(tmp_path / "a.dcm", stored)])
    np.testing.assert_array_equal(vol.hu[0], [[-1024, -1024, 0]])


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"modality": "MR"}, "not a CT"),
        ({"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}, "not axial"),  # sagittal
        ({"orientation": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}, "not axial"),  # coronal
    ],
)
def test_skipped_series_reasons(tmp_path, kwargs, reason):
    paths = [_ct_slice(tmp_path / f"{i}.dcm", np.zeros((8, 8), np.int16), position=(i, i, i), instance=i, **kwargs)
             for i in range(2)]
    with pytest.raises(SeriesSkipped, match=reason):
        load_series(paths)


def test_localizer_inside_an_axial_series_is_left_out(tmp_path):
    paths = [_ct_slice(tmp_path / f"{i}.dcm", np.full((8, 8), 1024 + i, np.int16), position=(0, 0, i), instance=i)
             for i in range(3)]
    paths.append(_ct_slice(tmp_path / "scout.dcm", np.zeros((8, 8), np.int16), instance=9,
                           image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(0, 1, 0, 0, 0, -1)))
    vol = load_series(paths[::-1])
    assert vol.n_slices == 3
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [0, 1, 2])
    assert vol.meta["ignored_files"] == 1 and "localizer" in vol.meta["ignored_reasons"]


def test_several_series_rejected(tmp_path):
    a = _ct_slice(tmp_path / "a.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.1")
    b = _ct_slice(tmp_path / "b.dcm", np.zeros((8, 8), np.int16), series_uid="1.2.3.2", position=(0, 0, 1))
    with pytest.raises(ValueError, match="more than one series"):
        load_series([a, b])


def test_unreadable_inputs(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="junk.dcm"):
        load_series([junk])
    with pytest.raises(ValueError, match="empty"):
        load_series([])
    with pytest.raises(ValueError, match="single path"):
        load_series(str(junk))
    missing = tmp_path / "missing.dcm"
    with pytest.raises(ValueError, match="missing.dcm"):
        load_series([missing])
    nopix = tmp_path / "nopix.dcm"
    p = _ct_slice(nopix, np.zeros((4, 4), np.int16))
    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(ValueError, match="no Pixel Data"):
        load_series([p])


def _fg_item(**macros) -> Dataset:
    item = Dataset()
    for keyword, content in macros.items():
        sub = Dataset()
        for k, v in content.items():
            setattr(sub, k, v)
        setattr(item, keyword, Sequence([sub]))
    return item


@pytest.mark.parametrize("sop_class", [ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE])
def test_multiframe_functional_groups(tmp_path, sop_class):
    """Frames stored in reverse z order with per-frame rescale and CTDIvol."""
    zs = [30.0, 20.0, 10.0]
    frames = np.stack([np.full((8, 8), 100 * (i + 1), np.int16) for i in range(3)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, uid, "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = 3
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SharedFunctionalGroupsSequence = Sequence([_fg_item(
        PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        PixelMeasuresSequence={"PixelSpacing": [0.7, 0.7], "SliceThickness": 2.0},
        CTXRayDetailsSequence={"KVP": 100},
        CTReconstructionSequence={"ConvolutionKernel": "FC08"},
    )])
    per_frame = []
    for i, z in enumerate(zs):
        per_frame.append(_fg_item(
            PlanePositionSequence={"ImagePositionPatient": [0, 0, z]},
            PixelValueTransformationSequence={"RescaleSlope": 1.0, "RescaleIntercept": -1000.0 - i,
                                              "RescaleType": "HU"},
            CTExposureSequence={"CTDIvol": 10.0 + i},
            CTImageFrameTypeSequence={"FrameType": ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]},
        ))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = frames.tobytes()
    path = tmp_path / "mf.dcm"
    ds.save_as(path, enforce_file_format=True)

    vol = load_series([path])
    assert vol.n_slices == 3
    np.testing.assert_allclose(vol.slice_positions_mm, [10.0, 20.0, 30.0])
    assert vol.frame_numbers == [3, 2, 1]
    np.testing.assert_array_equal(vol.hu[:, 0, 0], [300 - 1002, 200 - 1001, 100 - 1000])
    np.testing.assert_allclose(vol.ctdivol_mgy, [12.0, 11.0, 10.0])
    assert vol.pixel_spacing_mm == (0.7, 0.7)
    assert vol.meta["slice_thickness_mm"] == 2.0
    assert vol.meta["kvp"] == 100.0 and vol.meta["kernel"] == "FC08"
    assert vol.sop_class_uids == [sop_class] * 3
    assert vol.sop_instance_uids == [uid] * 3


def test_enhanced_ct_from_pydicom_data():
    path = _testdata("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array.astype(np.float32)
    vol = load_series([path])
    assert vol.n_slices == 2
    # ImageOrientationPatient rows along -x: normal -z; frame 2 (z=-149) lies before frame 1 (z=-159)
    assert vol.frame_numbers == [2, 1]
    np.testing.assert_allclose(vol.slice_positions_mm, [149.0, 159.0])
    expected = raw[::-1] - 1024.0  # shared rescale: slope 1, intercept -1024
    expected[expected < -1500.0] = -1024.0
    np.testing.assert_array_equal(vol.hu, expected)
    assert vol.pixel_spacing_mm == pytest.approx((0.388672, 0.388672))
    assert vol.meta["slice_thickness_mm"] == 10.0


def test_pydicom_ct_files_load():
    small = load_series([_testdata("CT_small.dcm")])
    assert small.hu.shape == (1, 128, 128)
    ref = pydicom.dcmread(_testdata("CT_small.dcm"))
    raw = ref.pixel_array.astype(np.float32) * float(ref.RescaleSlope) + float(ref.RescaleIntercept)
    keep = raw >= -1500
    np.testing.assert_array_equal(small.hu[0][keep], raw[keep])
    head = load_series([_testdata("693_UNCR.dcm")])
    assert head.hu.shape == (1, 512, 512) and head.meta["kvp"] == 140.0


@pytest.mark.skipif(not WG04.is_dir(), reason=f"shared wg04 data not found at {WG04}")
@pytest.mark.parametrize("image", ["CT1", "CT2"])
def test_wg04_every_transfer_syntax_decodes(image):
    unc = load_series([WG04 / f"{image}_UNC"])
    assert unc.hu.shape == (1, 512, 512)
    for suffix in LOSSLESS:
        vol = load_series([WG04 / f"{image}_{suffix}"])
        np.testing.assert_array_equal(vol.hu, unc.hu, err_msg=f"{image}_{suffix} differs from _UNC")
    body = unc.hu[0] > -500
    near = load_series([WG04 / f"{image}_JLSN"])
    # JPEG-LS near-lossless bounds every pixel error (NEAR = 2 here); allow a margin
    assert float(np.max(np.abs(near.hu - unc.hu))) <= 8.0
    lossy = load_series([WG04 / f"{image}_J2KI"])  # compression ratio 69 (CT1) and 106 (CT2)
    diff = np.abs(lossy.hu[0][body] - unc.hu[0][body])
    assert float(np.median(diff)) < 30.0, f"{image}_J2KI: median |diff| {np.median(diff):.1f} HU"


@pytest.mark.skipif(not PHANTOM_1MM.is_dir(), reason=f"shared phantom data not found at {PHANTOM_1MM}")
def test_shared_phantom_series_geometry_and_meta():
    paths = sorted(PHANTOM_1MM.iterdir())
    rng = np.random.default_rng(0)
    vol = load_series([paths[i] for i in rng.permutation(len(paths))])
    assert vol.hu.shape == (140, 512, 512)
    np.testing.assert_allclose(np.diff(vol.slice_positions_mm), 1.0, atol=1e-3)
    assert np.all(np.isfinite(vol.ctdivol_mgy))
    assert 8.5 <= vol.ctdivol_mgy.min() and vol.ctdivol_mgy.max() <= 21.0
    meta = vol.meta
    assert meta["kvp"] == 120.0 and meta["kernel"] == "UB" and meta["station_name"] == "CT4"
    assert meta["device_serial"] == "336067" and meta["manufacturer"] == "Philips"
    assert meta["slice_thickness_mm"] == 1.0 and meta["scan_length_mm"] == pytest.approx(140.0)
    assert vol.pixel_spacing_mm == pytest.approx((0.451171875, 0.451171875))
    # sorted by position: InstanceNumber order need not agree, position order must
    positions = [float(h.ImagePositionPatient[2]) for h in vol.headers]
    assert positions == sorted(positions)
