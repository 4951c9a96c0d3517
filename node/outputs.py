"""Results -> DICOM outputs in the source study: the TID 1500 SR, one Parametric Map per pixel-wise
map, and the readable report (Encapsulated PDF). Each object is written durably under
``data_dir/outputs`` and recorded in the outbox (one delivery per destination) before any send."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from analysis.pipeline import SeriesResult
from node.config import Settings
from reports.codes import CATALOGUE
from reports.common import stable_uid
from reports.inputs import AlgorithmId, Evaluation, MetricValue, ReportMetric, slice_metrics_from_array
from reports.pmap import build_parametric_map
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

# Key numbers of the readable report, in order (those present are shown).
REPORT_KEYS = ("global_noise_hu", "wed_cm", "ctdivol_mgy", "ssde_mgy", "nps_f_peak_per_mm", "nps_f_avg_per_mm",
               "mean_hu_tissue", "n2q_mean_quality", "n2q_p05_quality", "n2q_low_fraction", "d2iqa_score",
               "n_slices", "kvp", "slice_thickness_mm")


@dataclass(frozen=True)
class WrittenOutput:
    kind: str  # sr | pmap | pdf
    sop_instance_uid: str
    rel_path: str


def _encode(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _algorithm(out) -> AlgorithmId:
    return AlgorithmId(out.algorithm[:64], out.version[:64], out.weights_sha256)


def build_outputs(result: SeriesResult, scanner_name: str | None,
                  evaluations: Mapping[str, str] | None = None, *, uid_seed: str) -> list[tuple[str, object]]:
    """Build (kind, dataset) for every output of one analysed series. ``uid_seed`` (source series UID
    and generation) makes the new series and instance UIDs deterministic: rebuilding the outputs of
    the same analysis yields the same objects, never duplicates in the PACS."""

    def uids(*name: str) -> dict:
        return {"series_instance_uid": stable_uid(uid_seed, *name, "series"),
                "sop_instance_uid": stable_uid(uid_seed, *name, "instance")}

    vol = result.volume
    if vol is None:
        return []
    sources = vol.headers
    evals = {k: Evaluation(v) for k, v in (evaluations or {}).items()}
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
    objects: list[tuple[str, object]] = []
    objects.append(("sr", build_measurement_report(sources, series_metrics, slice_metrics,
                                                   series_number=SR_SERIES_NUMBER, **uids("sr"))))
    first_map = None
    i = 0
    for out in result.outputs:
        for m in out.maps:
            objects.append(("pmap", build_parametric_map(
                sources, m.values.astype(np.float32), name=m.name, label=m.label, unit_code=m.unit_code,
                unit_meaning=m.unit_meaning, algorithm=_algorithm(out), series_number=MAP_SERIES_NUMBER + i,
                frame_numbers=vol.frame_numbers, **uids("pmap", m.name))))
            first_map = first_map or m
            i += 1
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
    objects.append(("pdf", build_readable_report(
        sources, rows, scanner_name or "unknown scanner",
        first_map.values if first_map is not None else None,
        first_map.label if first_map is not None else None, PDF_SERIES_NUMBER, **uids("pdf"))))
    return objects


def write_outputs(settings: Settings, db: Database, store: FileStore, job_id: int, result: SeriesResult,
                  evaluations: Mapping[str, str] | None = None) -> list[WrittenOutput]:
    """Build, write durably, and queue for every destination. Returns what was written."""
    with db.session() as s:
        job = s.get(Job, job_id)
        series_id = job.series_id
        scanner = job.series.scanner_name
        seed = f"{job.series.series_instance_uid}:{job.generation}"
    written = []
    destinations = [d.name for d in settings.destinations]
    for kind, ds in build_outputs(result, scanner, evaluations, uid_seed=seed):
        rel = store.output_rel_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        store.write_bytes(rel, _encode(ds))
        record_output(db, series_id=series_id, job_id=job_id, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                      sop_instance_uid=str(ds.SOPInstanceUID), rel_path=rel, destinations=destinations)
        written.append(WrittenOutput(kind, str(ds.SOPInstanceUID), rel))
    log.info("series %s: %d output object(s) written%s", result.series_instance_uid, len(written),
             f", queued for {', '.join(destinations)}" if destinations else " (no destinations configured)")
    return written
