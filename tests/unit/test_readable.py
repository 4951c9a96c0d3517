"""Readable report: Encapsulated PDF in the source study, read back field by field; the PDF text is
checked with Ghostscript's text extraction where ``gs`` is installed."""

from __future__ import annotations

import copy
import io
import shutil
import subprocess
from datetime import datetime, timezone

import numpy as np
import pydicom
import pytest

from reports.codes import CATALOGUE
from reports.inputs import ControlLimits, Evaluation
from reports.readable import ENCAPSULATED_PDF_STORAGE, build_readable_report, format_number, pdf_bytes, report_metric
from tests.unit.report_sources import assert_patient_study_copied

CREATED = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)


_metric = report_metric

METRICS = [
    _metric("global_noise_hu", 4.8372, Evaluation.WITHIN, control_limits=ControlLimits(3.9, 5.6)),
    _metric("wed_cm", 17.25),
    _metric("ssde_mgy", 29.9, Evaluation.OUTSIDE),
    _metric("ctdivol_mgy", None, note="no CTDIvol in headers"),
    _metric("n_slices", 28),
]


@pytest.fixture(scope="module")
def report(headers) -> pydicom.Dataset:
    values = np.random.default_rng(0).gamma(3.0, 2.0, (len(headers), 512, 512)).astype(np.float32)
    ds = build_readable_report(
        headers, METRICS, "CT4 (Ingenuity, room 2)", values, "Local noise SD (HU)", 9004, created=CREATED,
        map_unit="HU", baselines={"wed_cm": 16.0},
        omitted_outputs=[("pmap:n2q_quality", "the source has no FrameOfReferenceUID")],
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_encapsulated_pdf_in_source_study(headers, report) -> None:
    ds, src = report, headers[0]
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.file_meta.MediaStorageSOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert ds.Modality == "DOC"
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SeriesNumber == 9004
    assert assert_patient_study_copied(ds, src) >= 10
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.BurnedInAnnotation == "NO"
    assert ds.DocumentTitle == "CT image quality report"
    assert ds.ContentDate == "20260304" and ds.ContentTime == "050607"
    assert {i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence} == {h.SOPInstanceUID for h in headers}
    assert len(ds.EncapsulatedDocument) % 2 == 0


def test_pdf_is_one_page_pdf(report) -> None:
    pdf = pdf_bytes(report)
    assert len(pdf) == int(report.EncapsulatedDocumentLength)
    assert pdf.startswith(b"%PDF-1.")
    assert pdf.rstrip().endswith(b"%%EOF")
    assert pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") + pdf.count(b"/Type /Page>") == 1
    assert b"/Subtype /Image" in pdf  # the map thumbnail


@pytest.mark.skipif(shutil.which("gs") is None, reason="Ghostscript (gs) not installed: cannot extract PDF text")
def test_pdf_text_has_key_numbers_and_scanner(headers, report) -> None:
    out = subprocess.run(
        ["gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite", "-sOutputFile=-", "-"],
        input=pdf_bytes(report),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode("utf-8", "replace")
    text = " ".join(out.split())
    src = headers[0]
    for expected in (
        "CT image quality report",
        "CT4 (Ingenuity, room 2)",
        f"{src.Manufacturer} / {src.ManufacturerModelName}",
        f"{src.StationName} / {src.DeviceSerialNumber}",
        "2015-02-06",  # AcquisitionDate of the phantom series
        "Global noise 4.84 HU no baseline yet within limits; [3.90, 5.60]",
        "Water-equivalent diameter 17.2 cm 16 cm",  # its baseline, given
        "SSDE 29.9 mGy no baseline yet OUTSIDE limits",
        "CTDIvol n/a no baseline yet no CTDIvol in headers",
        "Slices analysed 28 What the numbers mean",  # a context row: no baseline column
        "Global noise: image noise in soft tissue (mode of the local SD); lower is less noisy, at equal dose",
        "SSDE: size-speci",  # gs extracts the "fi" ligature as one glyph
        "Local noise SD (HU) - slice 15 of 28",
        "Not produced: Parametric Map n2q_quality: the source has no FrameOfReferenceUID",
    ):
        assert expected in text, f"{expected!r} not in PDF text: {text[:800]}"
    assert str(src.PatientID) not in text


@pytest.mark.parametrize("value,unit,text", [
    (28, "", "28"), (28.0, "slices", "28 slices"), (120.0, "kV", "120 kV"), (5.0, "mm", "5 mm"),
    (4.8372, "HU", "4.84 HU"), (17.25, "cm", "17.2 cm"), (0.5, "1", "0.500"), (0.0123456, "/mm", "0.0123 /mm"),
    (9.996, "", "10.0"), (1234.5, "mGy", "1230 mGy"), (-12.345, "HU", "-12.3 HU"), (0.0, "HU", "0 HU"),
    (1.5e-5, "", "1.50e-05"), (None, "HU", "n/a"), (float("nan"), "HU", "n/a"),
])
def test_numbers_integers_as_integers_else_three_significant_digits(value, unit, text) -> None:
    assert format_number(value, unit) == text


@pytest.mark.parametrize("crowded", [False, True], ids=["one-long-note", "every-row-a-long-note"])
def test_page_fits_and_colour_bar_names_the_unit(headers, crowded: bool) -> None:
    """Every text lies inside the page and above the map thumbnail (also long reasons on every row),
    and the colour bar is labelled with the unit."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from node.outputs import REPORT_KEYS
    from reports.inputs import DeviceInfo
    from reports.readable import report_figure

    long_note = "not measurable in any slice: " + "27 slice(s) with too few soft-tissue pixels; " * 6
    if crowded:
        metrics = [_metric(k, None if i % 2 else 1.5 * i, note=long_note if i % 2 else "")
                   for i, k in enumerate(REPORT_KEYS)]
    else:
        metrics = [*METRICS, _metric("nps_f_peak_per_mm", None, note=long_note)]
    values = np.ones((3, 64, 64), np.float32)
    fig = report_figure(headers[0], metrics, "CT4", values, "Local noise SD", device=DeviceInfo(),
                        created=CREATED, map_unit="HU", omitted_outputs=[("pmap:n2q_quality", "no FoR")])
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    w, h = fig.bbox.width, fig.bbox.height
    texts = [t for t in fig.texts if t.get_text()]
    assert any("not measurable in any slice" in t.get_text() for t in texts)
    assert any(t.get_text().startswith("Not produced: Parametric Map n2q_quality") for t in texts)
    image_ax = fig.axes[0]
    map_top = image_ax.get_window_extent(renderer).y1 + image_ax.title.get_window_extent(renderer).height
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= w and box.y0 >= 0 and box.y1 <= h, f"{t.get_text()!r} leaves the page"
        assert box.y0 > map_top, f"{t.get_text()!r} runs into the map thumbnail"
    assert fig.axes[-1].get_ylabel() == "Local noise SD (HU)"


def test_report_metric_uses_catalogue() -> None:
    m = report_metric("ssde_mgy", 12.5, Evaluation.OUTSIDE)
    assert (m.label, m.unit, m.value, m.evaluation) == (CATALOGUE["ssde_mgy"].label, "mGy", 12.5, Evaluation.OUTSIDE)
    with pytest.raises(ValueError, match="Unknown metric key"):
        report_metric("bogus", 1.0)


def test_without_map_and_bad_arguments(headers) -> None:
    ds = build_readable_report(headers, METRICS, "CT4", None, None, 12)
    assert ds.RecognizableVisualFeatures == "NO"
    assert b"/Subtype /Image" not in pdf_bytes(ds)
    with pytest.raises(ValueError, match="series_number"):
        build_readable_report(headers, METRICS, "CT4", None, None, 0)
    with pytest.raises(ValueError, match="scanner_name"):
        build_readable_report(headers, METRICS, "", None, None, 1)
    with pytest.raises(ValueError, match="map_values"):
        build_readable_report(headers, METRICS, "CT4", np.zeros((4, 4)), None, 1)


def test_non_ascii_patient_name_survives_in_all_outputs(headers) -> None:
    """Latin-1 names are copied with their Specific Character Set into SR, map and PDF alike."""
    from reports.inputs import AlgorithmId, MetricValue
    from reports.pmap import build_parametric_map
    from reports.sr import build_measurement_report

    src = [copy.deepcopy(h) for h in headers[:3]]
    for h in src:
        h.SpecificCharacterSet = "ISO_IR 100"
        h.PatientName = "Müller^Jürgen"
    algo = AlgorithmId("ctqa-classical", "1.2.0")
    objects = [
        build_measurement_report(src, [MetricValue("wed_cm", 17.0, algo)], [], series_number=1),
        build_parametric_map(
            src,
            np.zeros((3, src[0].Rows, src[0].Columns), np.float32),
            name="local_noise_sd",
            label="L",
            unit_code="[hnsf'U]",
            unit_meaning="Hounsfield unit",
            algorithm=algo,
            series_number=2,
        ),
        build_readable_report(src, METRICS, "CT4", None, None, 3),
    ]
    for obj in objects:
        buf = io.BytesIO()
        obj.save_as(buf, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(buf.getvalue()))
        assert back.SpecificCharacterSet == "ISO_IR 100"
        assert str(back.PatientName) == "Müller^Jürgen"
        assert "Müller".encode("latin-1") in buf.getvalue()
