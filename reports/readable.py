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
import textwrap
from collections.abc import Sequence
from datetime import datetime, timezone

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pydicom import Dataset
from pydicom.uid import UID

from reports.common import new_instance_arguments, no_person_name_warnings, prepare_sources
from reports.codes import metric_code
from reports.inputs import ControlLimits, DeviceInfo, Evaluation, ReportMetric

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")
DOCUMENT_TITLE = "CT image quality report"


def format_number(value: float | None, unit: str = "") -> str:
    """A value as the report prints it: integers as integers, otherwise 3 significant digits
    (no exponent between 0.001 and 10^6), the unit after a space; "n/a" for no value."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    v = float(value)
    a = abs(v)
    if v.is_integer() and a < 1e6:
        text = str(int(v))
    elif 1e-3 <= a < 1e6:
        decimals = 2 - int(math.floor(math.log10(a)))
        rounded = round(v, decimals)
        if abs(rounded) >= 10 ** (3 - decimals):  # 9.996 -> 10.0: one digit more before the point
            decimals -= 1
            rounded = round(v, decimals)
        text = f"{rounded:.{max(decimals, 0)}f}" if decimals > 0 else str(int(round(rounded)))
    else:
        text = f"{v:.2e}"
    return f"{text} {unit}".strip() if unit and unit not in ("1", "no unit") else text


def _meaning(key: str) -> str:
    """What a score means and which way is better (the model spec's ``meaning``): one line in the report."""
    try:
        return metric_code(key).meaning
    except ValueError:
        return ""


def _is_context(key: str) -> bool:
    """Rows that describe the acquisition rather than score it: no baseline column."""
    try:
        return metric_code(key).context
    except ValueError:
        return False


def _status(m: ReportMetric) -> str:
    parts = []
    if m.evaluation is not None:
        parts.append("within limits" if m.evaluation.value == "within" else "OUTSIDE limits")
    if m.control_limits is not None:
        lo, hi = m.control_limits.lower, m.control_limits.upper
        parts.append(f"[{'-' if lo is None else format_number(lo)}, {'-' if hi is None else format_number(hi)}]")
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


_PAGE_W, _PAGE_H = 8.27, 11.69  # A4 portrait, inches
_LEFT, _RIGHT = 0.07, 0.93


def _wrap(text: str, width_frac: float, fontsize: float) -> list[str]:
    """Lines of ``text`` that fit ``width_frac`` of the page width at ``fontsize`` (DejaVu Sans
    averages about 0.55 em per character; 0.6 keeps a margin)."""
    chars = max(8, int(width_frac * _PAGE_W * 72 / (0.6 * fontsize)))
    return textwrap.wrap(text, chars) or [""]


def render_pdf(*args, **kwargs) -> bytes:
    """The PDF bytes of the readable report (no patient identifiers in it); see ``report_figure``."""
    fig = report_figure(*args, **kwargs)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": DOCUMENT_TITLE, "Creator": kwargs["device"].model_name}) as pdf:
        pdf.savefig(fig)
    return buf.getvalue()


def report_figure(
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
    notes: Sequence[str] = (),
) -> Figure:
    """The one A4 page of the readable report. Every text is wrapped to its column, so nothing runs
    off the page."""
    fig = Figure(figsize=(_PAGE_W, _PAGE_H))
    fig.text(_LEFT, 0.955, DOCUMENT_TITLE, fontsize=18, weight="bold")
    fig.text(_LEFT, 0.935, f"{device.model_name} {device.software_version} - created {created:%Y-%m-%d %H:%M} UTC",
             fontsize=8, color="0.35")
    y = 0.905
    for k, v in _header_text(source, scanner_name):
        fig.text(_LEFT, y, k, fontsize=9.5, color="0.3")
        fig.text(0.30, y, _wrap(v, _RIGHT - 0.30, 9.5)[0], fontsize=9.5)
        y -= 0.019

    # key-number table, meanings, outputs not produced: laid out at the largest font size (and the
    # most lines per note) that leaves room for the map thumbnail; without room the thumbnail goes
    top_y = y
    cols = ((_LEFT, 0.26, "Measurement"), (0.33, 0.13, "Value"), (0.46, 0.16, "Baseline"),
            (0.62, _RIGHT - 0.62, "Status / note"))
    baselines = baselines or {}
    meanings = [(m.label, _meaning(m.key)) for m in metrics if _meaning(m.key)]

    def body(fs: float, max_lines: int | None, draw: bool) -> float:
        line = fs * 1.35 / 72 / _PAGE_H

        def put(x: float, yy: float, text: str, **kw) -> None:
            if draw:
                fig.text(x, yy, text, **kw)

        yy = top_y - 0.012
        for x, _, title in cols:
            put(x, yy, title, fontsize=fs, weight="bold")
        yy -= 0.004
        if draw:
            fig.add_artist(Line2D([_LEFT, _RIGHT], [yy, yy], color="0.5", linewidth=0.6))
        yy -= line * 1.05
        for m in metrics:
            base = baselines.get(m.key)
            baseline = ("" if _is_context(m.key) else "no baseline yet") if base is None else \
                format_number(base, m.unit)
            cells = (m.label, format_number(m.value, m.unit), baseline, _status(m))
            wrapped = [_wrap(text, w - 0.01, fs) for (_, w, _), text in zip(cols, cells)]
            if max_lines is not None and len(wrapped[3]) > max_lines:
                wrapped[3] = wrapped[3][:max_lines - 1] + [wrapped[3][max_lines - 1][:-3] + "..."]
            for (x, _, _), lines in zip(cols, wrapped):
                for j, text in enumerate(lines):
                    put(x, yy - j * line, text, fontsize=fs,
                        color="0.45" if text == "no baseline yet" else ("#b00000" if "OUTSIDE" in text else "black"))
            yy -= line * max(len(w) for w in wrapped) + line * 0.3
        if meanings:
            yy -= line * 0.6
            put(_LEFT, yy, "What the numbers mean", fontsize=fs + 0.5, weight="bold")
            yy -= line * 1.2
            for label, text in meanings:
                for t in _wrap(f"{label}: {text}", _RIGHT - _LEFT, fs - 0.5):
                    put(_LEFT, yy, t, fontsize=fs - 0.5, color="0.2")
                    yy -= line * 0.95
        if notes:
            yy -= line * 0.6
            for note in notes:
                for t in _wrap(f"Source series: {note}", _RIGHT - _LEFT, fs - 0.5):
                    put(_LEFT, yy, t, fontsize=fs - 0.5, color="#a05000")
                    yy -= line * 0.95
        if omitted_outputs:
            yy -= line * 0.6
            for kind, why in omitted_outputs:
                name = f"Parametric Map {kind[5:]}" if kind.startswith("pmap:") else kind
                for t in _wrap(f"Not produced: {name}: {why}", _RIGHT - _LEFT, fs - 0.5):
                    put(_LEFT, yy, t, fontsize=fs - 0.5, color="#b00000")
                    yy -= line * 0.95
        return yy

    layouts = [(fs, n) for fs in (8.5, 7.5, 6.5) for n in (None, 4, 2)]
    need = 0.20 if map_values is not None else 0.03
    choice = next((lay for lay in layouts if body(*lay, draw=False) >= need), None)
    if choice is None:  # no room for the thumbnail: the numbers matter more
        map_values = None
        choice = next((lay for lay in layouts if body(*lay, draw=False) >= 0.03), layouts[-1])
    y = body(*choice, draw=True)

    if map_values is not None:
        mid = map_values.shape[0] // 2
        frame = np.asarray(map_values[mid], dtype=np.float32)
        step = max(1, int(math.ceil(max(frame.shape) / 256)))
        thumb = frame[::step, ::step]
        finite = thumb[np.isfinite(thumb)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        top = min(y - 0.03, 0.34)
        height = max(0.12, top - 0.04)
        ax = fig.add_axes((0.2, 0.035, 0.5, height))
        im = ax.imshow(thumb, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{map_label or 'Map'} - slice {mid + 1} of {map_values.shape[0]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"{map_label or 'Map'} ({map_unit or 'no unit'})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


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
    notes: Sequence[str] = (),
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
                     map_unit=map_unit, baselines=baselines, omitted_outputs=omitted_outputs, notes=notes)

    with no_person_name_warnings():
        ds = hd.SOPClass(
            study_instance_uid=str(src.StudyInstanceUID),
            **new_instance_arguments(device, series_instance_uid=series_instance_uid, series_number=series_number,
                                     sop_instance_uid=sop_instance_uid, instance_number=instance_number),
            sop_class_uid=ENCAPSULATED_PDF_STORAGE,
            modality="DOC",
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
