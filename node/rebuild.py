"""``qa-node rebuild-outputs``: build and queue the outputs of analysed series again from the results
stored in the database, without running the models.

What the database keeps per analysis: every model's series metrics (with the reason a metric is
absent), its per-slice metrics, algorithm name, version and weights checksum. It does not keep the
pixel maps (local noise SD, N2Q quality): a rebuild from stored results therefore writes the SR and
the readable report, and a Parametric Map only where the original one was already written (its file
and outbox row are kept; the same deterministic UIDs are used). ``--reanalyse`` queues a new analysis
job instead, which re-runs the models and rebuilds every output, maps included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from analysis.pipeline import SeriesResult
from analysis.results import ModelOutput, SeriesSkipped
from node.config import Settings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import OutputsState
from storage.repo import job_files, set_outputs_state, stored_runs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rebuilt:
    series_instance_uid: str
    outputs: str  # OutputsState
    outputs_error: str | None


def result_from_storage(db: Database, store: FileStore, job_id: int) -> SeriesResult:
    """The SeriesResult of a finished job, from its stored runs and the stored instances (pixels are
    decoded to rebuild the volume's geometry and headers; no model runs). Maps are absent."""
    from analysis.volume import load_series

    job, series, rel_paths = job_files(db, job_id)
    try:
        volume = load_series([store.abs(p) for p in rel_paths])
    except (SeriesSkipped, ValueError, OSError) as exc:
        raise ValueError(f"cannot reload the stored instances: {exc}") from None
    runs = stored_runs(db, series.id, volume.n_slices)
    if not runs:
        raise ValueError("no stored results for this series (analyse it again with --reanalyse)")
    from analysis.pipeline import flag_out_of_distribution
    from node.worker import PARAMETERS_INFO_KEY

    outputs = []
    for r in runs:
        info = dict(r.info)
        params = info.pop(PARAMETERS_INFO_KEY, "")
        outputs.append(ModelOutput(name=r.model, algorithm=r.algorithm, version=r.version,
                                   weights_sha256=r.weights_sha256, series_metrics=dict(r.series_metrics),
                                   reasons=dict(r.reasons),
                                   slice_metrics={k: np.asarray(v, float) for k, v in r.slice_metrics.items()},
                                   info=info, parameters=[p for p in params.split("\n") if p]))
    result = SeriesResult(series.series_instance_uid, series.study_instance_uid, len(rel_paths), "done", None,
                          outputs, volume)
    flag_out_of_distribution(result)  # the same flags as the analysis: from the series and its stored metrics
    return result


def rebuild_outputs(settings: Settings, db: Database, store: FileStore, job_id: int) -> Rebuilt:
    """Rebuild, write and queue the outputs of one finished job; record its new outputs state."""
    from node.service import _one_line, write_and_judge_outputs
    from node.trending import record_and_evaluate

    job, series, _ = job_files(db, job_id)
    uid = series.series_instance_uid
    try:
        result = result_from_storage(db, store, job_id)
    except ValueError as exc:
        error = f"rebuild failed: {exc}"
        log.error("series %s: outputs failed: %s", uid, error)
        set_outputs_state(db, job_id, OutputsState.FAILED, error)
        return Rebuilt(uid, OutputsState.FAILED, error)
    try:
        evaluations = record_and_evaluate(settings, db, job_id, result)
    except Exception as exc:  # the outputs still go, without the qualitative evaluation
        log.error("series %s: trend evaluation failed: %s", uid, _one_line(exc))
        evaluations = {}
    state, error = write_and_judge_outputs(settings, db, store, job_id, result, evaluations,
                                           writer=write_missing_outputs)
    if state == OutputsState.WRITTEN and not _has_map(db, job_id):
        error = "; ".join(x for x in (error, MAPS_NOT_STORED) if x)
    set_outputs_state(db, job_id, state, error)
    return Rebuilt(uid, state, error)


def write_missing_outputs(settings: Settings, db: Database, store: FileStore, job_id: int, result: SeriesResult,
                          evaluations=None):
    """Like ``node.outputs.write_outputs``, but an object this analysis already wrote (same
    deterministic SOP Instance UID, recorded in the outbox) is kept as it is: never rewritten, never
    queued twice. Returns the same ``OutputsWritten`` (kept objects count as written)."""
    from sqlalchemy import select

    from node.outputs import OutputsWritten, WrittenOutput, _encode, build_outputs, previous_reports
    from storage.models import Job, OutputObject
    from storage.outbox import record_output

    with db.session() as s:
        job = s.get(Job, job_id)
        series_id, scanner = job.series_id, job.series.scanner_name
        seed = f"{job.series.series_instance_uid}:{job.generation}"
        generation = job.generation
        recorded = {o.sop_instance_uid: o for o in s.scalars(select(OutputObject)
                                                              .where(OutputObject.series_id == series_id))}
    destinations = [d.name for d in settings.destinations]
    built = build_outputs(result, scanner, evaluations, uid_seed=seed, generation=generation,
                          previous_reports=previous_reports(db, store, series_id, generation))
    written, n_new = [], 0
    for kind, ds in built.objects:
        sop = str(ds.SOPInstanceUID)
        if sop in recorded:
            written.append(WrittenOutput(kind, sop, recorded[sop].rel_path))
            continue
        rel = store.output_rel_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), sop)
        store.write_bytes(rel, _encode(ds))
        record_output(db, series_id=series_id, job_id=job_id, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                      sop_instance_uid=sop, rel_path=rel, destinations=destinations)
        written.append(WrittenOutput(kind, sop, rel))
        n_new += 1
    log.info("series %s: outputs rebuilt from stored results: %d new object(s), %d kept as written",
             result.series_instance_uid, n_new, len(written) - n_new)
    return OutputsWritten(written, list(built.failures), list(built.errors))


MAPS_NOT_STORED = "rebuilt from stored results: Parametric Maps are not stored (qa-node rebuild-outputs --reanalyse)"


def _has_map(db: Database, job_id: int) -> bool:
    from sqlalchemy import func, select

    from storage.models import OutputObject

    with db.session() as s:
        return bool(s.scalar(select(func.count()).select_from(OutputObject)
                             .where(OutputObject.job_id == job_id, OutputObject.kind == "pmap")))
