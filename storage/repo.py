"""Repository functions over the node schema: small, explicit units of database work."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Database, utcnow
from storage.models import (
    AnalysisRun,
    Instance,
    InstanceConflict,
    Job,
    JobState,
    OutputObject,
    OutputsState,
    Series,
    SeriesMetric,
    SeriesState,
    SliceMetric,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceInfo:
    """What the node records about one received instance (taken from its header)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    number_of_frames: int = 1
    modality: str | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    device_serial: str | None = None
    station_name: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    acquired_at: datetime | None = None
    expected_instances: int | None = None


class StoreOutcome:
    STORED = "stored"
    DUPLICATE = "duplicate"  # same bytes: acknowledged, no second copy
    CONFLICT = "conflict"  # same UID, different bytes: first kept, counted


def record_conflict(db: Database, sop_instance_uid: str, sha256: str, calling_ae: str | None) -> None:
    with db.session() as s:
        s.add(InstanceConflict(sop_instance_uid=sop_instance_uid, sha256=sha256, calling_ae=calling_ae))


def add_instance(
    db: Database,
    info: InstanceInfo,
    *,
    rel_path: str,
    size_bytes: int,
    sha256: str,
    scanner: str | None,
    calling_ae: str | None,
    peer_host: str | None,
    place_file: Callable[[], None] | None = None,
) -> tuple[str, int]:
    """Index an instance in one transaction. Returns (outcome, series id); re-opens a completed series.

    ``place_file`` makes the file durable; it runs only when the SOP Instance UID is new, after the
    duplicate check and before the row is written, so that an index row never points at a missing
    file and a duplicate never touches the stored copy. Two associations may create the same series
    concurrently: a unique-constraint race is retried."""
    # SQLAlchemy Core on one connection: this runs on the association thread for every instance,
    # where the ORM's unit-of-work overhead is a measurable share of the ingest rate.
    placed = False
    for attempt in range(3):
        try:
            with db.engine.begin() as conn:
                row = conn.execute(select(Instance.sha256, Instance.series_id)
                                   .where(Instance.sop_instance_uid == info.sop_instance_uid)).first()
                if row is not None:
                    return (StoreOutcome.DUPLICATE if row.sha256 == sha256 else StoreOutcome.CONFLICT, row.series_id)
                if place_file is not None and not placed:
                    place_file()
                    placed = True
                now = utcnow()
                srow = conn.execute(select(Series.id, Series.state, Series.generation, Series.scanner_name,
                                           Series.expected_instances)
                                    .where(Series.series_instance_uid == info.series_instance_uid)).first()
                if srow is None:
                    series_id = conn.execute(insert(Series).values(
                        series_instance_uid=info.series_instance_uid, study_instance_uid=info.study_instance_uid,
                        scanner_name=scanner, calling_ae=calling_ae, peer_host=peer_host,
                        manufacturer=info.manufacturer, model_name=info.model_name, device_serial=info.device_serial,
                        station_name=info.station_name, modality=info.modality,
                        series_description=info.series_description, protocol_name=info.protocol_name,
                        acquired_at=info.acquired_at, expected_instances=info.expected_instances,
                        state=SeriesState.RECEIVING, n_instances=1, generation=1, completions=0,
                        first_received_at=now, last_received_at=now)).inserted_primary_key[0]
                else:
                    series_id = srow.id
                    values = {"n_instances": Series.n_instances + 1, "last_received_at": now}
                    if srow.state == SeriesState.COMPLETE:
                        values.update(state=SeriesState.RECEIVING, generation=Series.generation + 1, completed_at=None)
                        log.info("series %s re-opened by a late instance (generation %d)",
                                 info.series_instance_uid, srow.generation + 1)
                    if srow.scanner_name is None and scanner is not None:
                        values["scanner_name"] = scanner
                    if info.expected_instances and not srow.expected_instances:
                        values["expected_instances"] = info.expected_instances
                    conn.execute(update(Series).where(Series.id == series_id).values(**values))
                conn.execute(insert(Instance).values(
                    series_id=series_id, sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                    transfer_syntax_uid=info.transfer_syntax_uid, rel_path=rel_path, size_bytes=size_bytes,
                    sha256=sha256, number_of_frames=info.number_of_frames, received_at=now))
                return StoreOutcome.STORED, series_id
        except IntegrityError:
            if attempt == 2:
                raise
            log.debug("concurrent insert for series/instance, retrying")
    raise RuntimeError("unreachable")


def complete_due_series(db: Database, stable_age_s: float, models: Sequence[str], now: datetime | None = None) -> list[str]:
    """Mark series complete that are idle for ``stable_age_s`` or have all expected instances, and
    queue one analysis job per completion. Returns the completed series UIDs."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stable_age_s)
    done: list[str] = []
    with db.session() as s:
        rows = s.scalars(select(Series).where(Series.state == SeriesState.RECEIVING)).all()
        for series in rows:
            idle = series.last_received_at <= cutoff
            counted = series.expected_instances is not None and series.n_instances >= series.expected_instances
            if not (idle or counted):
                continue
            # Guarded update: only one sweeper (or process) completes a given generation.
            res = s.execute(
                update(Series)
                .where(Series.id == series.id, Series.state == SeriesState.RECEIVING,
                       Series.generation == series.generation)
                .values(state=SeriesState.COMPLETE, completed_at=now, completions=Series.completions + 1)
            )
            if res.rowcount != 1:
                continue
            s.add(Job(series_id=series.id, generation=series.generation, state=JobState.PENDING,
                      models=",".join(models)))
            done.append(series.series_instance_uid)
    return done


def requeue_running_jobs(db: Database, worker_prefix: str | None = None) -> int:
    """Jobs left running by a stopped or crashed node go back to pending."""
    with db.session() as s:
        q = update(Job).where(Job.state == JobState.RUNNING)
        if worker_prefix is not None:
            q = q.where(Job.worker.like(f"{worker_prefix}%"))
        res = s.execute(q.values(state=JobState.PENDING, worker=None, started_at=None))
        return res.rowcount or 0


def claim_job(db: Database, worker: str) -> int | None:
    """Atomically take the oldest pending job. Returns its id or None."""
    with db.session() as s:
        for job_id in s.scalars(select(Job.id).where(Job.state == JobState.PENDING).order_by(Job.id).limit(5)):
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
                .values(state=JobState.RUNNING, worker=worker, started_at=utcnow(), attempts=Job.attempts + 1)
            )
            if res.rowcount == 1:
                return job_id
    return None


def job_files(db: Database, job_id: int) -> tuple[Job, Series, list[str]]:
    with db.session() as s:
        job = s.get(Job, job_id)
        series = s.get(Series, job.series_id)
        paths = [i.rel_path for i in series.instances]
        s.expunge(job)
        s.expunge(series)
        return job, series, paths


def _clean(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class RunRecord:
    """Model output in storage terms (storage imports nothing from analysis)."""

    model: str
    algorithm: str
    version: str
    weights_sha256: str | None
    series_metrics: dict[str, float | None]
    reasons: dict[str, str]
    slice_metrics: dict[str, Sequence[float]]
    info: dict[str, str] = field(default_factory=dict)


def finish_job(
    db: Database,
    job_id: int,
    worker: str,
    *,
    state: str,
    error: str | None,
    outcome: str | None = None,
    runs: Sequence[RunRecord] = (),
    slice_refs: Sequence[tuple[str, int | None]] = (),
    outputs: str | None = None,
    outputs_error: str | None = None,
    selection: str | None = None,
) -> bool:
    """Store results and close the job in one transaction, only if this worker still holds it.
    ``selection`` is the series-selection record (JSON text, see ``Job.selection``).
    Older results of the same series are marked superseded (``current = False``), never duplicated.
    Returns False (and stores nothing) if the job was taken away (e.g. re-queued at shutdown)."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None or job.state != JobState.RUNNING or job.worker != worker:
            s.rollback()
            return False
        if runs:
            s.execute(update(AnalysisRun).where(AnalysisRun.series_id == job.series_id, AnalysisRun.current.is_(True))
                      .values(current=False))
        for r in runs:
            run = AnalysisRun(series_id=job.series_id, job_id=job.id, model=r.model, algorithm=r.algorithm,
                              version=r.version, weights_sha256=r.weights_sha256, current=True,
                              info=json.dumps(r.info, sort_keys=True) if r.info else None)
            s.add(run)
            s.flush()
            for name, value in r.series_metrics.items():
                s.add(SeriesMetric(run_id=run.id, name=name, value=_clean(value), reason=r.reasons.get(name)))
            rows = []
            for name, values in r.slice_metrics.items():
                for i, v in enumerate(values):
                    cv = _clean(v)
                    if cv is None:
                        continue
                    uid, frame = slice_refs[i] if i < len(slice_refs) else ("", None)
                    rows.append(dict(run_id=run.id, slice_index=i, sop_instance_uid=uid, frame_number=frame,
                                     name=name, value=cv))
            if rows:
                s.execute(SliceMetric.__table__.insert(), rows)
        job.state = state
        job.error = error
        job.outcome = outcome
        job.outputs = outputs if outputs is not None else (
            OutputsState.NONE if outcome != "done" else None)
        job.outputs_error = outputs_error
        job.selection = selection
        job.finished_at = utcnow()
        job.worker = None
        return True


def current_metrics(session: Session, series_id: int) -> dict[str, tuple[float | None, str | None]]:
    out: dict[str, tuple[float | None, str | None]] = {}
    q = (select(SeriesMetric).join(AnalysisRun)
         .where(AnalysisRun.series_id == series_id, AnalysisRun.current.is_(True))
         .order_by(AnalysisRun.id, SeriesMetric.id))
    for m in session.scalars(q):
        out[m.name] = (m.value, m.reason)
    return out



def outputs_state(job: Job, n_outputs: int) -> tuple[str, str | None]:
    """(outputs state, error) of a job as shown by ``qa-node status``. A job finished by a version
    before the outputs column is judged by what it recorded in the outbox."""
    if job.outputs:
        return job.outputs, job.outputs_error
    if job.state in (JobState.PENDING, JobState.RUNNING):
        return OutputsState.PENDING, None
    if job.outcome != "done":
        return OutputsState.NONE, None
    if n_outputs:
        return OutputsState.WRITTEN, None
    return OutputsState.FAILED, job.error or "no output recorded for this analysis"


def set_outputs_state(db: Database, job_id: int, state: str, error: str | None) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(outputs=state, outputs_error=error))


def latest_jobs(session: Session) -> dict[int, Job]:
    """series id -> its newest job."""
    last: dict[int, Job] = {}
    for j in session.scalars(select(Job).order_by(Job.id)):
        last[j.series_id] = j
    return last


def output_counts(session: Session) -> dict[int, int]:
    """job id -> number of output objects recorded for it."""
    from sqlalchemy import func

    return dict(session.execute(select(OutputObject.job_id, func.count()).group_by(OutputObject.job_id)).all())


@dataclass
class StoredRun:
    """One current model run as stored: what an output rebuild needs instead of the model."""

    model: str
    algorithm: str
    version: str
    weights_sha256: str | None
    info: dict[str, str]
    series_metrics: dict[str, float | None]
    reasons: dict[str, str]
    slice_metrics: dict[str, list[float]]  # name -> value per slice index (NaN where none was stored)


def stored_runs(db: Database, series_id: int, n_slices: int) -> list[StoredRun]:
    """The current runs of a series with their series and per-slice metrics, in run order."""
    out = []
    with db.session() as s:
        runs = s.scalars(select(AnalysisRun).where(AnalysisRun.series_id == series_id,
                                                   AnalysisRun.current.is_(True)).order_by(AnalysisRun.id)).all()
        for run in runs:
            metrics = s.scalars(select(SeriesMetric).where(SeriesMetric.run_id == run.id)
                                .order_by(SeriesMetric.id)).all()
            slices: dict[str, list[float]] = {}
            for m in s.scalars(select(SliceMetric).where(SliceMetric.run_id == run.id)):
                values = slices.setdefault(m.name, [math.nan] * n_slices)
                if 0 <= m.slice_index < n_slices:
                    values[m.slice_index] = m.value if m.value is not None else math.nan
            out.append(StoredRun(run.model, run.algorithm, run.version, run.weights_sha256,
                                 json.loads(run.info) if run.info else {},
                                 {m.name: m.value for m in metrics},
                                 {m.name: m.reason for m in metrics if m.reason}, slices))
    return out


def series_for_rebuild(db: Database, *, series_uid: str | None = None, failed: bool = False) -> list[tuple[int, int]]:
    """(series id, newest job id) of analysed series to rebuild: one by UID, or every series whose
    newest job's outputs failed. An unknown UID or a series never analysed raises ValueError."""
    with db.session() as s:
        last = latest_jobs(s)
        counts = output_counts(s)
        if series_uid is not None:
            sid = s.scalar(select(Series.id).where(Series.series_instance_uid == series_uid))
            if sid is None:
                raise ValueError(f"no series {series_uid} in the database")
            job = last.get(sid)
            if job is None or job.state != JobState.DONE or job.outcome != "done":
                state = "never analysed" if job is None else f"job {job.state}/{job.outcome or '-'}"
                raise ValueError(f"series {series_uid} has no completed analysis to build outputs from ({state})")
            return [(sid, job.id)]
        return [(sid, job.id) for sid, job in sorted(last.items())
                if failed and job.state == JobState.DONE and job.outcome == "done"
                and outputs_state(job, counts.get(job.id, 0))[0] == OutputsState.FAILED]


def queue_reanalysis(db: Database, series_id: int, models: Sequence[str]) -> int:
    """A new pending analysis job for the series' current generation (a running node picks it up)."""
    with db.session() as s:
        series = s.get(Series, series_id)
        job = Job(series_id=series_id, generation=series.generation, state=JobState.PENDING, models=",".join(models))
        s.add(job)
        s.flush()
        return job.id


def indexed_rel_paths(db: Database, series_instance_uid: str) -> set[str]:
    """The stored paths of a series' indexed instances (start-up reconciliation of the store)."""
    with db.engine.connect() as conn:
        return set(conn.scalars(select(Instance.rel_path).join(Series, Instance.series_id == Series.id)
                                .where(Series.series_instance_uid == series_instance_uid)))


def analysed_reconstruction(db: Database, study_instance_uid: str | None, reconstruction: str,
                            exclude_series_instance_uid: str | None) -> str | None:
    """The Series Instance UID of another series of the same study whose latest job analysed (outcome
    done) the same reconstruction (``Job.selection``'s "reconstruction" key), or None."""
    if not study_instance_uid:
        return None
    with db.session() as s:
        rows = s.execute(
            select(Series.series_instance_uid, Job.selection)
            .join(Job, Job.series_id == Series.id)
            .where(Series.study_instance_uid == study_instance_uid, Job.outcome == "done",
                   Job.selection.is_not(None), Series.series_instance_uid != (exclude_series_instance_uid or ""))
            .order_by(Job.id)).all()
    for uid, text in rows:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("reconstruction") == reconstruction:
            return uid
    return None
