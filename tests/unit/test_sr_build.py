"""The SR reports.sr builds is the SR highdicom's own templates and Comprehensive3DSR build (the
builder before it was made fast, tests/unit/sr_reference.py): element by element and byte for byte
as written, for real CT headers, a multi-frame source and series whose images differ in the
descriptors the image library holds. Only the clock-set dates/times are made the same in both (the
tracking UIDs are derived from the series and the group, the same in both builds)."""

from __future__ import annotations

import copy

import pytest

from reports.inputs import AlgorithmId, ControlLimits, DeviceInfo, Evaluation, MetricValue, SliceMetricValue
from reports.inputs import slice_metrics_from_array
from reports.sr import build_measurement_report, read_measurement_report
from tests.unit.report_sources import enhanced_ct_header
from tests.unit.sr_reference import (
    build_measurement_report_reference,
    content_rows,
    encoded,
    first_difference,
    read_back,
)

CLASSICAL = AlgorithmId("ctqa-classical", "1.2.0")
N2Q = AlgorithmId("n2q", "0.3.1", "4d7596a1638ebb1ccb8945f079b08b30791a1241965f1541dc842d48a0341bc2",
                  ("out_of_distribution=yes: kVp 80 outside training range",))
UIDS = {"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2"}


def _slices(key, values, headers, algo):
    return slice_metrics_from_array(key, values, [h.SOPClassUID for h in headers],
                                    [h.SOPInstanceUID for h in headers], [None] * len(headers), algo)


def _both(*args, **kwargs):
    """(new SR, reference SR)."""
    return build_measurement_report(*args, **kwargs), build_measurement_report_reference(*args, **kwargs)


def assert_same_sr(new, ref) -> None:
    new_bytes, ref_bytes = encoded(new), encoded(ref)
    a, b = read_back(new_bytes), read_back(ref_bytes)
    rows_new = content_rows(a.file_meta) + content_rows(a)
    rows_ref = content_rows(b.file_meta) + content_rows(b)
    difference = first_difference(rows_new, rows_ref)
    assert not difference, difference
    assert new_bytes == ref_bytes
    # what the new SR's highdicom object answers is its own content tree
    assert list(new.content[0].ContentSequence) == list(new.ContentSequence)


def test_same_sr_as_highdicom_builds_for_a_real_series(headers) -> None:
    series = [
        MetricValue("global_noise_hu", 4.837261905, CLASSICAL, Evaluation.WITHIN, ControlLimits(3.9, 5.6)),
        MetricValue("ssde_mgy", 29.918273645546, CLASSICAL, None, ControlLimits(None, 25.0, "CMS1074 threshold")),
        MetricValue("wed_cm", 17.25, CLASSICAL),
        MetricValue("n_slices", 28, CLASSICAL),
        MetricValue("n2q_mean_quality", 0.8125, N2Q),
    ]
    n = len(headers)
    slices = (_slices("global_noise_hu", [3.0 + 0.1 * i for i in range(n)], headers, CLASSICAL)
              + _slices("ctdivol_mgy", [float("nan") if i == 5 else 9.0 + 0.5 * i for i in range(n)], headers,
                        CLASSICAL)
              + _slices("n2q_mean_quality", [0.5 + i / 100 for i in range(n)], headers, N2Q))
    device = DeviceInfo(institution_name="General Hospital", institutional_department_name="Radiology",
                        station_name="CTQA1")
    new, ref = _both(headers, series, slices, series_number=9901, instance_number=2,
                     evaluations={"ssde_mgy": Evaluation.OUTSIDE}, device=device,
                     series_description="CT QA measurements, series 2 test", **UIDS,
                     not_computed={"nps_f_peak_per_mm": "no uniform region"},
                     omitted_outputs=[("pmap:local_noise_sd", "no FrameOfReferenceUID"), ("pdf", "RuntimeError: x")])
    assert_same_sr(new, ref)
    back = read_measurement_report(read_back(encoded(new)))
    assert len(back.slice_metrics) == 3 * n - 1 and len(back.series_metrics) == len(series)


def test_same_sr_when_the_images_differ_in_their_library_descriptors(headers) -> None:
    """Images without a SliceThickness (a library entry without geometry), without a Frame of
    Reference, without a SpacingBetweenSlices, or in another orientation, mixed in one series."""
    hs = [copy.deepcopy(h) for h in headers[:12]]
    del hs[2].SliceThickness
    hs[3].SliceThickness = None
    del hs[5].FrameOfReferenceUID
    if "SpacingBetweenSlices" in hs[7]:
        del hs[7].SpacingBetweenSlices
    else:
        hs[7].SpacingBetweenSlices = 5.0
    hs[8].ImageOrientationPatient = [1, 0, 0, 0, 0.9961947, -0.0871557]
    hs[9].PixelSpacing = [0.5, 0.5]
    hs[10].Rows = 256
    hs[11].FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"
    new, ref = _both(hs, [MetricValue("wed_cm", 17.0, CLASSICAL)],
                     _slices("global_noise_hu", [4.0 + i for i in range(len(hs))], hs, CLASSICAL),
                     series_number=9901, **UIDS)
    assert_same_sr(new, ref)


def test_same_sr_for_a_multiframe_source() -> None:
    ect = enhanced_ct_header()
    slices = [SliceMetricValue("global_noise_hu", 7.5, ect.SOPClassUID, ect.SOPInstanceUID, CLASSICAL, 2),
              SliceMetricValue("global_noise_hu", 6.25, ect.SOPClassUID, ect.SOPInstanceUID, CLASSICAL, 1)]
    new, ref = _both([ect, ect], [MetricValue("global_noise_hu", 6.875, CLASSICAL)], slices, series_number=12,
                     **UIDS)
    assert_same_sr(new, ref)


def test_comparison_sees_a_changed_value(headers) -> None:
    """The comparison above is not blind: one per-slice value changed in the last digit is found."""
    slices = _slices("global_noise_hu", [3.0 + 0.1 * i for i in range(len(headers))], headers, CLASSICAL)
    changed = list(slices)
    changed[7] = SliceMetricValue("global_noise_hu", slices[7].value + 1e-12, slices[7].sop_class_uid,
                                  slices[7].sop_instance_uid, CLASSICAL)
    new = build_measurement_report(headers, [], changed, series_number=1, **UIDS)
    ref = build_measurement_report_reference(headers, [], slices, series_number=1, **UIDS)
    with pytest.raises(AssertionError, match=r"ContentSequence\[\d+\]\.MeasuredValueSequence\[0\]\.FloatingPointValue"):
        assert_same_sr(new, ref)
