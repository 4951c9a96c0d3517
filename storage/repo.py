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
) -> bool:
    """Store results and close the job in one transaction, only if this worker still holds it.
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



def indexed_rel_paths(db: Database, series_instance_uid: str) -> set[str]:
    """The stored paths of a series' indexed instances (start-up reconciliation of the store)."""
    with db.engine.connect() as conn:
        return set(conn.scalars(select(Instance.rel_path).join(Series, Instance.series_id == Series.id)
                                .where(Series.series_instance_uid == series_instance_uid)))
