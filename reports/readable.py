"""Human-readable report: an Encapsulated PDF Storage object in the source study.

For PACS viewers that show neither SR nor Parametric Maps. The PDF (one A4 page, made with
matplotlib's PdfPages) holds the key numbers, the scanner's name and identity (manufacturer, model,
station, serial number), the series and its acquisition date, and a thumbnail of the middle slice
of a map. It carries no patient name or ID (the DICOM header does, copied from the source, so the
PACS files it into the right study); hence Burned In Annotation NO.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from pydicom import Dataset
from pydicom.uid import UID

from reports.common import new_uid, no_person_name_warnings, prepare_sources
from reports.codes import metric_code
from reports.inputs import ControlLimits, DeviceInfo, Evaluation, ReportMetric

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
DOCUMENT_TITLE = "CT image quality report"


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    a = abs(value)
    if a == 0 or 0.01 <= a < 1e5:
        return f"{value:.3g}" if a < 10 else f"{value:.1f}" if a < 1000 else f"{value:.0f}"
    return f"{value:.3e}"


def _remark(m: ReportMetric) -> str:
    parts = []
    if m.evaluation is not None:
        parts.append("within limits" if m.evaluation.value == "within" else "OUTSIDE limits")
    if m.control_limits is not None:
        lo, hi = m.control_limits.lower, m.control_limits.upper
        parts.append(f"[{'-' if lo is None else _fmt(lo)}, {'-' if hi is None else _fmt(hi)}]")
    if m.value is None or not math.isfinite(m.value):
        parts.append(m.note or "not measured")
    elif m.note:
        parts.append(m.note)
    return "; ".join(parts)


def _header_text(src: Dataset, scanner_name: str) -> list[tuple[str, str]]:
    def g(kw: str) -> str:
        v = src.get(kw)
        return str(v) if v not in (None, "") else "-"

    date_kw = next((kw for kw in ("AcquisitionDate", "SeriesDate", "StudyDate") if src.get(kw)), "StudyDate")
    date = g(date_kw)
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    return [
        ("Scanner", scanner_name),
        ("Manufacturer / model", f"{g('Manufacturer')} / {g('ManufacturerModelName')}"),
        ("Station / serial no.", f"{g('StationName')} / {g('DeviceSerialNumber')}"),
        ("Institution", g("InstitutionName")),
        ("Acquired", date),
        ("Series", f"{g('SeriesNumber')}  {g('SeriesDescription')}"),
        ("Protocol", g("ProtocolName")),
    ]


def render_pdf(
    source: Dataset,
    metrics: Sequence[ReportMetric],
    scanner_name: str,
    map_values: np.ndarray | None,
    map_label: str | None,
    *,
    device: DeviceInfo,
    created: datetime,
    map_unit: str | None = None,
    baselines: dict[str, float] | None = None,
    omitted_outputs: Sequence[tuple[str, str]] = (),
) -> bytes:
    """The PDF bytes of the readable report (no patient identifiers in it)."""
    fig = Figure(figsize=(8.27, 11.69))  # A4 portrait
    fig.text(0.07, 0.955, DOCUMENT_TITLE, fontsize=18, weight="bold")
    fig.text(
        0.07,
        0.935,
        f"{device.model_name} {device.software_version} - created {created:%Y-%m-%d %H:%M} UTC",
        fontsize=8,
        color="0.35",
    )
    y = 0.9
    for k, v in _header_text(source, scanner_name):
        fig.text(0.07, y, k, fontsize=10, color="0.3")
        fig.text(0.32, y, v[:70], fontsize=10)
        y -= 0.022

    table_bottom = 0.37
    table_ax = fig.add_axes((0.07, table_bottom, 0.86, y - table_bottom))
    table_ax.axis("off")
    rows = [[m.label, _fmt(m.value), m.unit, _remark(m)] for m in metrics]
    if rows:
        table = table_ax.table(
            cellText=rows,
            colLabels=["Measurement", "Value", "Unit", "Control limits / note"],
            colWidths=[0.40, 0.15, 0.10, 0.35],
            cellLoc="left",
            # rows of at most 0.22 inch, top-aligned: a long table shrinks instead of overflowing
            bbox=(0.0, 1.0 - (h := min(1.0, (len(rows) + 1) * 0.22 / ((y - table_bottom) * 11.69))), 1.0, h),
        )
        table.auto_set_font_size(False)
        table.set_fontsize(9 if len(rows) <= 24 else 7)
    else:
        table_ax.text(0, 1, "No measurements.", va="top")

    if map_values is not None:
        mid = map_values.shape[0] // 2
        frame = np.asarray(map_values[mid], dtype=np.float32)
        step = max(1, int(math.ceil(max(frame.shape) / 256)))
        thumb = frame[::step, ::step]
        finite = thumb[np.isfinite(thumb)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        ax = fig.add_axes((0.2, 0.04, 0.5, 0.28))
        im = ax.imshow(thumb, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{map_label or 'Map'} - slice {mid + 1} of {map_values.shape[0]}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": DOCUMENT_TITLE, "Creator": device.model_name}) as pdf:
        pdf.savefig(fig)
    return buf.getvalue()


def build_readable_report(
    source_images: Sequence[Dataset],
    metrics: Sequence[ReportMetric],
    scanner_name: str,
    map_values: np.ndarray | None,
    map_label: str | None,
    series_number: int,
    *,
    instance_number: int = 1,
    device: DeviceInfo | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    created: datetime | None = None,
    map_unit: str | None = None,
    baselines: dict[str, float] | None = None,
    omitted_outputs: Sequence[tuple[str, str]] = (),
    series_description: str = "QA report (PDF)",
) -> Dataset:
    """Build an Encapsulated PDF Storage object (modality DOC) in the study of ``source_images``.

    ``metrics``: the rows of the key-number table, in order. ``scanner_name``: the site's name for
    the scanner (config). ``map_values``: (n, rows, cols) map whose middle slice is shown as a
    thumbnail, or None. The Patient, General Study and Patient Study modules are copied from the
    first source header; Source Instance Sequence references every source image.
    """
    if not isinstance(series_number, int) or series_number < 1:
        raise ValueError(f'Argument "series_number" must be a positive int, got {series_number!r}')
    if not scanner_name:
        raise ValueError(f'Argument "scanner_name" must be a non-empty string, got {scanner_name!r}')
    if map_values is not None and (not isinstance(map_values, np.ndarray) or map_values.ndim != 3):
        raise ValueError(
            'Argument "map_values" must be None or an array (n_slices, rows, cols), got '
            f"{getattr(map_values, 'shape', map_values)!r}"
        )
    device = device or DeviceInfo()
    sources = prepare_sources(source_images)
    src = sources[0]
    created = (created or datetime.now(timezone.utc)).astimezone(timezone.utc)
    pdf = render_pdf(src, metrics, scanner_name, map_values, map_label, device=device, created=created,
                     map_unit=map_unit, baselines=baselines, omitted_outputs=omitted_outputs)

    with no_person_name_warnings():
        ds = hd.SOPClass(
            study_instance_uid=str(src.StudyInstanceUID),
            series_instance_uid=series_instance_uid or new_uid(),
            series_number=series_number,
            sop_instance_uid=sop_instance_uid or new_uid(),
            sop_class_uid=ENCAPSULATED_PDF_STORAGE,
            instance_number=instance_number,
            modality="DOC",
            manufacturer=device.manufacturer,
            manufacturer_model_name=device.model_name,
            software_versions=device.software_version,
            device_serial_number=device.device_serial_number,
            institution_name=device.institution_name,
            institutional_department_name=device.institutional_department_name,
            series_description=series_description[:64],
            content_date=created.date(),
            content_time=created.time().replace(microsecond=0),
            specific_character_set=src.get("SpecificCharacterSet"),
        )
        ds.copy_patient_and_study_information(src)
    if device.station_name:
        ds.StationName = device.station_name
    # SC Equipment module
    ds.ConversionType = "WSD"  # workstation
    # Encapsulated Document module
    ds.AcquisitionDateTime = created.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "YES" if map_values is not None else "NO"
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.SourceInstanceSequence = [_sop_ref(s) for s in sources]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    logger.info("built readable report %s: %d metrics, %d PDF bytes", ds.SOPInstanceUID, len(metrics), len(pdf))
    return ds


def _sop_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def pdf_bytes(ds: Dataset) -> bytes:
    """The PDF held by an Encapsulated PDF object, without the DICOM even-length padding."""
    data = bytes(ds.EncapsulatedDocument)
    n = int(ds.get("EncapsulatedDocumentLength", len(data)))
    return data[:n]


def report_metric(
    key: str,
    value: float | None,
    evaluation: Evaluation | None = None,
    note: str = "",
    control_limits: ControlLimits | None = None,
) -> ReportMetric:
    """A table row for ``key`` with the catalogue's label and display unit (``reports.codes``)."""
    mc = metric_code(key)
    return ReportMetric(key, value, mc.unit_display, mc.label, evaluation, note, control_limits)
