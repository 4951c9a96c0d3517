"""Results -> DICOM outputs in the source study: the TID 1500 SR, one Parametric Map per pixel-wise
map, and the readable report (Encapsulated PDF). Each object is written durably under
``data_dir/outputs`` and recorded in the outbox (one delivery per destination) before any send."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis.pipeline import SeriesResult
from analysis.volume import series_notes
from node.config import Settings
from analysis.models import report_keys
from node import catalogue as _catalogue  # noqa: F401  (installs the model specs' codes)
from reports.codes import CATALOGUE, map_code
from reports.common import prepare_sources, source_series_label, stable_uid
from reports.inputs import AlgorithmId, Evaluation, MetricValue, ReportMetric, slice_metrics_from_array
from reports.pmap import MapNotPossible, build_parametric_map
from reports.readable import build_readable_report
from reports.sr import build_measurement_report
from storage.db import Database
from storage.filestore import FileStore
from storage.models import Job
from storage.outbox import record_output

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
PDF_SERIES_NUMBER = 9902
MAP_SERIES_NUMBER = 9910  # + index of the map

# Key numbers of the readable report, in order (those present are shown): the metrics the model
# specs mark in_report, scores first, then the acquisition context.
REPORT_KEYS = report_keys()


@dataclass(frozen=True)
class WrittenOutput:
    kind: str  # sr | pmap | pdf
    sop_instance_uid: str
    rel_path: str


@dataclass
class BuiltOutputs:
    """What ``build_outputs`` made: ``objects`` (kind, dataset) and ``failures`` (kind, reason) of
    the outputs that could not be built (kind "sr", "pdf" or "pmap:<map name>"; the reason is one
    line without patient data). One failing builder never costs the others their objects."""

    objects: list[tuple[str, object]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    # the kinds among ``failures`` whose builder failed by an error, not by a limit of the source
    # (``MapNotPossible``, e.g. no Frame of Reference): the node should have made them
    errors: list[str] = field(default_factory=list)

    def fail(self, kind: str, exc: BaseException) -> str:
        reason = _one_line(exc)
        self.failures.append((kind, reason))
        if not isinstance(exc, MapNotPossible):
            self.errors.append(kind)
        return reason


@dataclass
class OutputsWritten:
    """What ``write_outputs`` wrote and queued, and the outputs it could not build."""

    written: list[WrittenOutput] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # as ``BuiltOutputs.errors``


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _algorithm(out) -> AlgorithmId:
    return AlgorithmId(out.algorithm[:64], out.version[:64], out.weights_sha256,
                       notes=tuple(getattr(out, "parameters", ()) or ()) + _ood_notes(out))


def _ood_notes(out) -> tuple[str, ...]:
    """The out-of-distribution flag beside the model's scores (TID 4019 Algorithm Parameters)."""
    reasons = list(getattr(out, "out_of_distribution", ()) or ())
    return (f"out_of_distribution=yes: {'; '.join(reasons)}",) if reasons else ()


def map_resolution(name: str, rows: int, cols: int, pixel_spacing_mm: tuple[float, float]) -> tuple[int, str]:
    """(downsample factor, one-line note) for storing map ``name`` at the resolution it really has.

    N2Q predicts on the slice padded to a square and resized to 256 x 256, so a 512 x 512 slice has a
    2 x 2 map block per model pixel: stored at 256 x 256. The local noise SD map is a box SD over
    6 mm: it carries no detail finer than about 3 mm, so it is stored at the largest power-of-two
    reduction whose pixels stay at or below 3 mm. A factor that does not divide the matrix falls
    back to the next smaller one (at worst 1, the source matrix)."""
    try:
        code = map_code(name)
    except ValueError:
        return 1, "stored at the source matrix"
    why = code.why
    if code.model_matrix:
        n = max(rows, cols)
        f = n // code.model_matrix if n % code.model_matrix == 0 else 1
    elif code.detail_mm:
        f = 1
        while f * 2 * max(pixel_spacing_mm) <= code.detail_mm:
            f *= 2
    else:
        return 1, "stored at the source matrix"
    while f > 1 and (rows % f or cols % f):
        f //= 2 if f % 2 == 0 else f
    return f, (f"{why}: stored at {rows // f} x {cols // f}, "
               f"{pixel_spacing_mm[0] * f:.3g} x {pixel_spacing_mm[1] * f:.3g} mm pixels (source {rows} x {cols})")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300] if not isinstance(exc, MapNotPossible) else \
        " ".join(str(exc).split())[:300]


def build_outputs(result: SeriesResult, scanner_name: str | None,
                  evaluations: Mapping[str, str] | None = None, *, uid_seed: str, generation: int = 1,
                  previous_reports: Sequence = ()) -> BuiltOutputs:
    """Build (kind, dataset) for every output of one analysed series. ``uid_seed`` (source series UID
    and generation) makes the new series and instance UIDs deterministic: rebuilding the outputs of
    the same analysis yields the same objects, never duplicates in the PACS.

    A series re-opened by late instances is analysed again as its next ``generation``: from the
    second on, every output's Series Description says "analysis N", and the SR references the
    earlier generation's SR(s) (``previous_reports``, headers) in its Predecessor Documents
    Sequence, so that a PACS user can tell the current results from those they replace.

    Each builder runs on its own: a map the source cannot hold (no Frame of Reference) or a builder
    error is recorded in ``failures`` and named in the SR; the other objects are still returned."""

    def uids(*name: str) -> dict:
        return {"series_instance_uid": stable_uid(uid_seed, *name, "series"),
                "sop_instance_uid": stable_uid(uid_seed, *name, "instance")}

    built = BuiltOutputs()
    vol = result.volume
    if vol is None:
        return built
    try:
        sources = prepare_sources(vol.headers)
    except ValueError as exc:
        built.fail("sr", exc)
        return built
    src_label = source_series_label(sources[0])
    notes = series_notes(vol.meta)
    if generation > 1:
        src_label = f"analysis {generation}, {src_label}"
    evals = {k: Evaluation(v) for k, v in (evaluations or {}).items()}

    # maps first, then the PDF, then the SR: the later ones name what could not be made
    first_map = None
    i = 0
    for out in result.outputs:
        for m in out.maps:
            kind = f"pmap:{m.name}"
            try:
                factor, note = map_resolution(m.name, int(m.values.shape[1]), int(m.values.shape[2]),
                                              vol.pixel_spacing_mm)
                pm = build_parametric_map(
                    sources, m.values.astype(np.float32), name=m.name, label=m.label, unit_code=m.unit_code,
                    unit_meaning=m.unit_meaning, algorithm=_algorithm(out), series_number=MAP_SERIES_NUMBER + i,
                    frame_numbers=vol.frame_numbers, downsample=factor, resolution_note=note,
                    series_description=f"QA map: {m.label}, {src_label}"[:64], fill_value=0.0,
                    **uids("pmap", m.name))
                built.objects.append(("pmap", pm))
                first_map = first_map or m
            except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
                log.warning("series %s: Parametric Map %s not built: %s", result.series_instance_uid, m.name,
                            built.fail(kind, exc))
            i += 1

    try:
        metrics = result.metrics
        reasons = result.reasons
        rows = []
        for key in REPORT_KEYS:
            if key not in metrics:
                continue
            code = CATALOGUE[key]
            ev = evals.get(key)
            rows.append(ReportMetric(key, metrics[key], code.unit_display, code.label, ev,
                                     reasons.get(key, "") if metrics[key] is None else ""))
        built.objects.append(("pdf", build_readable_report(
            sources, rows, scanner_name or "unknown scanner",
            first_map.values if first_map is not None else None,
            first_map.label if first_map is not None else None, PDF_SERIES_NUMBER,
            map_unit=_unit_display(first_map) if first_map is not None else None,
            baselines=dict(getattr(evaluations, "centres", None) or {}), omitted_outputs=list(built.failures),
            notes=notes,
            series_description=f"QA report (PDF), {src_label}"[:64], **uids("pdf"))))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError) as exc:
        log.warning("series %s: readable report not built: %s", result.series_instance_uid, built.fail("pdf", exc))
    try:
        series_metrics, slice_metrics, seen = [], [], set()
        for out in result.outputs:
            alg = _algorithm(out)
            for key, value in out.series_metrics.items():
                if value is None or key not in CATALOGUE or key in seen:
                    continue
                seen.add(key)
                series_metrics.append(MetricValue(key, float(value), alg, evals.get(key)))
            for key, values in out.slice_metrics.items():
                if key in CATALOGUE:
                    slice_metrics.extend(slice_metrics_from_array(key, np.asarray(values, float), vol.sop_class_uids,
                                                                  vol.sop_instance_uids, vol.frame_numbers, alg))
        not_computed = {k: (result.reasons.get(k) or "not computed") for k, v in result.metrics.items()
                        if v is None and k in CATALOGUE}
        omitted = [(kind, reason) for kind, reason in built.failures]
        built.objects.insert(0, ("sr", build_measurement_report(
            sources, series_metrics, slice_metrics, series_number=SR_SERIES_NUMBER,
            series_description=f"CT QA measurements, {src_label}"[:64], not_computed=not_computed,
            omitted_outputs=omitted, series_notes=notes, previous_versions=previous_reports,
            **uids("sr"))))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        log.warning("series %s: measurement report not built: %s", result.series_instance_uid, built.fail("sr", exc))

    return built


def previous_reports(db: Database, store: FileStore, series_id: int, generation: int) -> list:
    """Headers of the SR(s) this node wrote for the newest earlier generation of the series (read
    from the outputs store); one that cannot be read is left out with a WARNING."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from sqlalchemy import select

    from storage.models import OutputObject

    with db.session() as s:
        rows = s.execute(select(OutputObject.rel_path, Job.generation).join(Job, Job.id == OutputObject.job_id)
                         .where(OutputObject.series_id == series_id, OutputObject.kind == "sr",
                                Job.generation < generation)).all()
    if not rows:
        return []
    newest = max(g for _, g in rows)
    out = []
    for rel, g in rows:
        if g != newest:
            continue
        try:
            out.append(pydicom.dcmread(store.abs(rel), stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]))
        except (OSError, InvalidDicomError) as exc:
            log.warning("earlier measurement report not referenced as predecessor: %s", _one_line(exc))
    return out


def _unit_display(m) -> str:
    return {"[hnsf'U]": "HU", "1": "no unit"}.get(m.unit_code, m.unit_meaning)


def write_outputs(settings: Settings, db: Database, store: FileStore, job_id: int, result: SeriesResult,
                  evaluations: Mapping[str, str] | None = None) -> OutputsWritten:
    """Build, write durably, and queue for every destination. Returns what was written and the
    outputs that could not be built (kind, reason); a builder failure never raises here."""
    with db.session() as s:
        job = s.get(Job, job_id)
        series_id = job.series_id
        scanner = job.series.scanner_name
        seed = f"{job.series.series_instance_uid}:{job.generation}"
        generation = job.generation
    written = []
    destinations = [d.name for d in settings.destinations]
    built = build_outputs(result, scanner, evaluations, uid_seed=seed, generation=generation,
                          previous_reports=previous_reports(db, store, series_id, generation))
    for kind, ds in built.objects:
        rel = store.output_rel_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        store.write_bytes(rel, _encode(ds))
        record_output(db, series_id=series_id, job_id=job_id, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                      sop_instance_uid=str(ds.SOPInstanceUID), rel_path=rel, destinations=destinations)
        written.append(WrittenOutput(kind, str(ds.SOPInstanceUID), rel))
    log.info("series %s: %d output object(s) written%s%s", result.series_instance_uid, len(written),
             f", queued for {', '.join(destinations)}" if destinations else " (no destinations configured)",
             f"; not built: {', '.join(k for k, _ in built.failures)}" if built.failures else "")
    return OutputsWritten(written, list(built.failures), list(built.errors))
