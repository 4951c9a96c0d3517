"""The output builders fed the way the node feeds them: from ``analysis.volume.load_series``
(headers without PixelData, slices sorted along the normal, a multi-frame image's header repeated
with its frame numbers). A map slice must land on the frame at the position of the volume slice it
was computed from."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from analysis.volume import load_series
from reports.inputs import AlgorithmId, MetricValue, slice_metrics_from_array
from reports.pmap import build_parametric_map, map_values
from reports.sr import build_measurement_report, read_measurement_report
from tests.unit.report_sources import PHANTOM_5MM

ALGO = AlgorithmId("ctqa-classical", "1.2.0")


def _sources() -> list[tuple[str, list]]:
    out = []
    if PHANTOM_5MM.is_dir():
        out.append(("phantom-28", sorted(p for p in PHANTOM_5MM.iterdir() if p.is_file())))
    from pydicom.data import get_testdata_file

    ect = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if ect is not None:
        out.append(("enhanced-ct", [ect]))
    return out


@pytest.mark.parametrize("name,paths", _sources(), ids=[n for n, _ in _sources()])
def test_map_and_sr_from_loaded_volume(name: str, paths: list) -> None:
    vol = load_series(paths)
    assert all("PixelData" not in h for h in vol.headers)
    # value of map slice i = i: identifies which volume slice a stored frame came from
    values = np.broadcast_to(
        np.arange(vol.n_slices, dtype=np.float32)[:, None, None], vol.hu.shape
    ).copy()
    pm = build_parametric_map(
        vol.headers,
        values,
        name="local_noise_sd",
        label="Local noise SD",
        unit_code="[hnsf'U]",
        unit_meaning="Hounsfield unit",
        algorithm=ALGO,
        series_number=9002,
        frame_numbers=vol.frame_numbers,
    )
    buf = io.BytesIO()
    pm.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    ds = pydicom.dcmread(buf)
    # real values through the Real World Value Mapping: integers 0..n-1 survive the uint16 quantisation
    pixels = np.rint(map_values(ds)).astype(int)
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    iop = [float(x) for x in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])  # the loader's slice normal: row direction x column direction
    seen = set()
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        i = int(pixels[k, 0, 0])
        assert np.all(pixels[k] == i)
        seen.add(i)
        pos = np.array([float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient])
        assert float(pos @ normal) == pytest.approx(float(vol.slice_positions_mm[i]), abs=1e-3), (
            f"{name}: frame {k + 1} holds volume slice {i} but sits at {pos}"
        )
        src = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == vol.sop_instance_uids[i]
        if vol.frame_numbers[i] is not None:
            assert int(src.ReferencedFrameNumber) == vol.frame_numbers[i]
    assert seen == set(range(vol.n_slices))

    slices = slice_metrics_from_array(
        "body_mean_hu",
        vol.hu.mean(axis=(1, 2)),
        vol.sop_class_uids,
        vol.sop_instance_uids,
        vol.frame_numbers,
        ALGO,
    )
    sr = build_measurement_report(vol.headers, [MetricValue("kvp", 120.0, ALGO)], slices, series_number=9001)
    back = read_measurement_report(sr)
    assert set(back.slice_metrics) == set(slices) and len(slices) == vol.n_slices
