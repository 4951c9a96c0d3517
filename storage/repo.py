"""Repository functions over the node schema: small, explicit units of database work."""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, insert, select, update
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
    ReconstructionClaim,
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
    # Durability: the file and its directory entry are fsynced by place_file before the row is
    # written. The first row of a series this process has not yet seen committed (series row with
    # the scanner, calling AE and host) is committed durably (WAL fsync / synchronous commit); the
    # rows of later instances of that series are committed without waiting for the log flush: a power
    # loss can lose the last of them, never a file, and start-up reconciliation (node.reconcile)
    # indexes every durable file that has no row, into its durable series. A process crash loses
    # nothing (the log is in the OS page cache). This spares one log fsync per instance.
    known = _durable_series(db)
    lazy = info.series_instance_uid in known
    for attempt in range(3):
        try:
            with _index_transaction(db, lazy) as conn:
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
            # committed (durably unless lazy): later instances of this series may commit lazily
            if not lazy:
                known[info.series_instance_uid] = series_id
            return StoreOutcome.STORED, series_id
        except IntegrityError:
            if attempt == 2:
                raise
            log.debug("concurrent insert for series/instance, retrying")
    raise RuntimeError("unreachable")


_DURABLE_SERIES_MAX = 4096  # series UIDs remembered per database (the ones receiving now)


def _durable_series(db: Database) -> dict[str, int]:
    """Series whose first row this process committed durably, UID -> series id (bounded: cleared
    when full)."""
    known = db.__dict__.setdefault("_durable_series", {})
    if len(known) > _DURABLE_SERIES_MAX:
        known.clear()
    return known


def durable_series_id(db: Database, series_instance_uid: str) -> int | None:
    """The id of a series whose first row this process committed durably, else None."""
    return db.__dict__.get("_durable_series", {}).get(series_instance_uid)


@dataclass(frozen=True)
class PendingRow:
    """An instance whose file is durable in the store, of a series whose first row is durable,
    acknowledged and waiting for its index row (``add_instances_lazy``)."""

    info: InstanceInfo
    series_id: int
    rel_path: str
    size_bytes: int
    sha256: str | None  # None: not taken yet (the committer reads it from the stored file)
    scanner: str | None
    calling_ae: str | None
    peer_host: str | None
    received_at: datetime


class _SeriesGone(Exception):
    pass


# Built once: executed with a list of parameter sets (executemany), compiled once per engine.
_INSERT_INSTANCE = insert(Instance)
_SERIES_STATE = (select(Series.series_instance_uid, Series.state, Series.generation, Series.scanner_name,
                        Series.expected_instances).where(Series.id == bindparam("sid")))


def add_instances_lazy(db: Database, rows: Sequence[PendingRow]) -> list[tuple[PendingRow, str, str | None]]:
    """Index a batch of ``PendingRow`` in one transaction committed without waiting for the log
    flush (as ``add_instance`` commits a known series' later rows): one executemany of the instance
    rows, one update per series (count, last received, re-opened when complete). Rows of several
    associations share the transaction (group commit).

    Returns the rows that were not new, as (row, outcome, rel_path of the row already indexed):
    a SOP Instance UID already indexed (found when the batch's insert breaks the unique constraint:
    the batch is then indexed row by row). A series that disappeared meanwhile is created again
    (``add_instance``, durable). Raises SQLAlchemyError when the database fails."""
    groups: dict[int, list[PendingRow]] = {}
    for r in rows:
        groups.setdefault(r.series_id, []).append(r)
    try:
        with _index_transaction(db, True) as conn:
            for sid, group in groups.items():
                srow = conn.execute(_SERIES_STATE, {"sid": sid}).first()
                if srow is None or srow.series_instance_uid != group[0].info.series_instance_uid:
                    raise _SeriesGone
                values = {"n_instances": Series.n_instances + len(group),
                          "last_received_at": max(r.received_at for r in group)}
                if srow.state == SeriesState.COMPLETE:
                    values.update(state=SeriesState.RECEIVING, generation=Series.generation + 1, completed_at=None)
                    log.info("series %s re-opened by a late instance (generation %d)",
                             group[0].info.series_instance_uid, srow.generation + 1)
                scanner = next((r.scanner for r in group if r.scanner is not None), None)
                if srow.scanner_name is None and scanner is not None:
                    values["scanner_name"] = scanner
                expected = next((r.info.expected_instances for r in group if r.info.expected_instances), None)
                if expected and not srow.expected_instances:
                    values["expected_instances"] = expected
                conn.execute(update(Series).where(Series.id == sid).values(**values))
            conn.execute(_INSERT_INSTANCE, [
                {"series_id": r.series_id, "sop_instance_uid": r.info.sop_instance_uid,
                 "sop_class_uid": r.info.sop_class_uid, "transfer_syntax_uid": r.info.transfer_syntax_uid,
                 "rel_path": r.rel_path, "size_bytes": r.size_bytes, "sha256": r.sha256,
                 "number_of_frames": r.info.number_of_frames, "received_at": r.received_at} for r in rows])
        return []
    except (IntegrityError, _SeriesGone):
        log.debug("batch of %d index rows: a SOP Instance UID already indexed or a series gone; row by row", len(rows))
    out: list[tuple[PendingRow, str, str | None]] = []
    for r in rows:
        outcome, _ = add_instance(db, r.info, rel_path=r.rel_path, size_bytes=r.size_bytes, sha256=r.sha256,
                                  scanner=r.scanner, calling_ae=r.calling_ae, peer_host=r.peer_host)
        if outcome != StoreOutcome.STORED:
            with db.engine.connect() as conn:
                kept = conn.execute(select(Instance.rel_path)
                                    .where(Instance.sop_instance_uid == r.info.sop_instance_uid)).scalar()
            out.append((r, outcome, kept))
    return out


@contextmanager
def _index_transaction(db: Database, lazy: bool):
    """``engine.begin()``; ``lazy``: the commit does not wait for the log flush (SQLite
    ``synchronous=NORMAL`` in WAL mode, PostgreSQL ``synchronous_commit = off``): atomic and
    consistent, durable at the next flush."""
    dialect = db.engine.dialect.name
    with db.engine.connect() as conn:
        if lazy and dialect == "sqlite":
            conn.exec_driver_sql("PRAGMA synchronous=NORMAL")  # not allowed inside a transaction
            conn.commit()
        try:
            with conn.begin():
                if lazy and dialect == "postgresql":
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                yield conn
        finally:
            if lazy and dialect == "sqlite":
                conn.exec_driver_sql("PRAGMA synchronous=FULL")  # the pool's connections stay durable
                conn.commit()


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
        res = s.execute(q.values(state=JobState.PENDING, worker=None, started_at=None, lease_until=None))
        return res.rowcount or 0


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def requeue_abandoned_jobs(db: Database, host: str, now: datetime | None = None,
                           alive: Callable[[int], bool] = _pid_alive) -> int:
    """At a node's start: back to pending go running jobs that no live worker holds: without a lease
    (left by a version before leases), with an expired lease, or held by a worker on this host
    (``host:pid:...``) whose process is gone. Jobs of live workers (here or on other machines sharing
    the database) are left alone."""
    now = now or utcnow()
    with db.session() as s:
        rows = s.execute(select(Job.id, Job.worker, Job.lease_until).where(Job.state == JobState.RUNNING)).all()
        ids = []
        for job_id, worker, lease_until in rows:
            parts = (worker or "").split(":")
            local_dead = len(parts) >= 3 and parts[0] == host and parts[1].isdigit() and not alive(int(parts[1]))
            if lease_until is None or lease_until < now or local_dead:
                ids.append(job_id)
        if not ids:
            return 0
        res = s.execute(update(Job).where(Job.id.in_(ids), Job.state == JobState.RUNNING)
                        .values(state=JobState.PENDING, worker=None, started_at=None, lease_until=None))
        return res.rowcount or 0


DEFAULT_LEASE_S = 120.0  # analysis.lease_s
MAX_ATTEMPTS = 3  # a job whose worker died this many times is failed, not claimed again


def _claimable(now: datetime):
    from sqlalchemy import and_, or_

    return or_(Job.state == JobState.PENDING,
               and_(Job.state == JobState.RUNNING, Job.lease_until.is_not(None), Job.lease_until < now))


def _series_frames():
    """The frames of a series' stored instances (a correlated subquery on ``series``): the slices an
    analysis pass gets from it, one per instance of a classic series, all of an enhanced one's."""
    return (select(func.coalesce(func.sum(Instance.number_of_frames), 0)).where(Instance.series_id == Series.id)
            .correlate(Series).scalar_subquery())


def claim_job(db: Database, worker: str, *, lease_s: float = DEFAULT_LEASE_S, now: datetime | None = None,
              max_frames: int | None = None) -> int | None:
    """Atomically take the oldest pending job, or a running one whose worker's lease expired (the
    worker died: killed, its machine down). Returns its id or None. The claim holds a lease of
    ``lease_s`` seconds that the worker renews (``renew_lease``) while it runs the job.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` so that concurrent workers take different
    jobs without waiting on each other; SQLite (one machine): writes are serialised and the guarded
    UPDATE decides. A job whose lease expired ``MAX_ATTEMPTS`` times is failed with the reason.

    ``max_frames`` (series batching: a worker holding a job fills the rest of its pass): only a job
    whose series has at most that many frames (the same claim, joined to ``series``; on PostgreSQL
    only the job row is locked)."""
    now = now or utcnow()
    pg = db.engine.dialect.name != "sqlite"
    with db.session() as s:
        for _ in range(5):
            q = select(Job.id, Job.state, Job.attempts, Job.worker).where(_claimable(now)).order_by(Job.id)
            if max_frames is not None:
                q = q.join(Series, Series.id == Job.series_id).where(_series_frames() <= max_frames)
            rows = s.execute(q.limit(1).with_for_update(skip_locked=True, of=Job) if pg else q.limit(5)).all()
            if not rows:
                return None
            for job_id, state, attempts, old_worker in rows:
                if state == JobState.RUNNING and attempts >= MAX_ATTEMPTS:
                    res = s.execute(update(Job).where(Job.id == job_id, _claimable(now)).values(
                        state=JobState.FAILED, outcome="failed", worker=None, lease_until=None, finished_at=now,
                        outputs=OutputsState.NONE,
                        error=f"analysis interrupted {attempts} times (its worker stopped renewing the lease "
                              f"each time, e.g. killed or out of memory); not retried"))
                    if res.rowcount == 1:
                        settle_reconstruction_claims(s, job_id, "failed")
                        log.error("analysis job %d failed: its worker was lost %d times", job_id, attempts)
                    continue
                res = s.execute(
                    update(Job).where(Job.id == job_id, _claimable(now))
                    .values(state=JobState.RUNNING, worker=worker, started_at=now, attempts=Job.attempts + 1,
                            lease_until=now + timedelta(seconds=lease_s))
                )
                if res.rowcount == 1:
                    if state == JobState.RUNNING:
                        log.warning("analysis job %d: the lease of worker %s expired; claimed again by %s",
                                    job_id, old_worker, worker)
                    return job_id
            if not pg:
                return None
    return None


def renew_lease(db: Database, job_id: int, worker: str, lease_s: float = DEFAULT_LEASE_S) -> bool:
    """Heartbeat of a live worker: extend its lease on the job. False when the job is no longer its
    own (re-queued at a node's stop, or claimed by another worker after the lease expired)."""
    with db.session() as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker)
                        .values(lease_until=utcnow() + timedelta(seconds=lease_s)))
        return res.rowcount == 1


def holds_job(db: Database, job_id: int, worker: str) -> bool:
    """Whether ``worker`` still holds the running job (checked before its outputs are written)."""
    with db.engine.connect() as conn:
        return conn.scalar(select(Job.id).where(Job.id == job_id, Job.state == JobState.RUNNING,
                                                Job.worker == worker)) is not None


def job_size(db: Database, job_id: int) -> tuple[str, int]:
    """(the job's models, its series' frame count): what series batching needs before loading."""
    with db.engine.connect() as conn:
        row = conn.execute(select(Job.models, _series_frames().label("frames"))
                           .join(Series, Series.id == Job.series_id).where(Job.id == job_id)).one()
    return row.models, int(row.frames or 0)


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
        # The guarded UPDATE first takes the row (PostgreSQL row lock; SQLite's write lock): a claim
        # of the same job by another worker after a lease expiry waits for this transaction and
        # then finds the job closed, or it came first and this worker finds the job not its own.
        held = s.execute(update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.worker == worker)
                         .values(finished_by=worker))
        if held.rowcount != 1:
            s.rollback()
            return False
        job = s.get(Job, job_id)
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
        settle_reconstruction_claims(s, job_id, outcome)
        job.finished_at = utcnow()
        job.worker = None
        job.lease_until = None
        job.finished_by = worker
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
    newest job's outputs failed or partly failed (``partial``). An unknown UID or a series never analysed raises ValueError."""
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
                and outputs_state(job, counts.get(job.id, 0))[0] in (OutputsState.FAILED, OutputsState.PARTIAL)]


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


# The rule of a series-selection decision that skipped a duplicate reconstruction
# (analysis.selection.default_category; storage imports nothing from analysis)
DUPLICATE_RULE = "default: duplicate reconstruction"


def _selection_record(text: str | None) -> dict:
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _latest_jobs_of_study(s: Session, study_instance_uid: str) -> list:
    """The latest job of each series of the study: rows (series_id, series_instance_uid, generation,
    job id, state, outcome, selection, models), in job order."""
    rows = s.execute(
        select(Series.id, Series.series_instance_uid, Series.generation, Job.id, Job.state, Job.outcome,
               Job.selection, Job.models)
        .join(Job, Job.series_id == Series.id)
        .where(Series.study_instance_uid == study_instance_uid).order_by(Job.id)).all()
    latest = {r[0]: r for r in rows}
    return sorted(latest.values(), key=lambda r: r[3])


def analysed_reconstruction(db: Database, study_instance_uid: str | None, reconstruction: str,
                            exclude_series_instance_uid: str | None) -> str | None:
    """The Series Instance UID of another series of the same study whose latest job analysed (outcome
    done) the same reconstruction (``Job.selection``'s "reconstruction" key), or None. Read-only: the
    look-up for series analysed before ``reconstruction_claims`` existed (``claim_reconstruction``)."""
    if not study_instance_uid:
        return None
    with db.session() as s:
        found = _legacy_holder(s, study_instance_uid, reconstruction, exclude_series_instance_uid)
    return found[1] if found else None


def _legacy_holder(s: Session, study_instance_uid: str, reconstruction: str, exclude_uid: str | None):
    for series_id, uid, _gen, job_id, _state, outcome, text, _models in _latest_jobs_of_study(s, study_instance_uid):
        if uid != exclude_uid and outcome == "done" and _selection_record(text).get("reconstruction") == reconstruction:
            return series_id, uid, job_id
    return None


def _claim_digest(reconstruction: str) -> str:
    import hashlib

    return hashlib.sha256(reconstruction.encode("utf-8")).hexdigest()


def claim_reconstruction(db: Database, *, study_instance_uid: str | None, reconstruction: str, series_id: int,
                         job_id: int, take: bool = True) -> str | None:
    """The duplicate check of series selection, made atomically: None when the series (``series_id``,
    analysed by job ``job_id``) analyses this reconstruction of its study, else the Series Instance
    UID of the series that does (this one is a duplicate of it).

    ``take``: the series would be analysed, so it claims the reconstruction (a row of
    ``reconstruction_claims``; its unique constraint lets exactly one of concurrent workers, on any
    machine, insert it; the others read the winner). A claim of this very series (a re-run of it, or
    its job claimed again after a lost lease) stays this series'. A claim is stale, and taken over,
    when its series never analysed the reconstruction and its job is neither pending nor running (it
    failed or ended skipped). ``take=False`` only reads (a series selection skips anyway).
    Series analysed before this table existed are found by their jobs' selection records."""
    if not study_instance_uid:
        return None
    digest = _claim_digest(reconstruction)
    for _ in range(10):
        with db.session() as s:
            row = s.execute(
                select(ReconstructionClaim.id, ReconstructionClaim.series_id, ReconstructionClaim.job_id,
                       ReconstructionClaim.analysed, Series.series_instance_uid, Job.state)
                .join(Series, Series.id == ReconstructionClaim.series_id)
                .outerjoin(Job, Job.id == ReconstructionClaim.job_id)
                .where(ReconstructionClaim.study_instance_uid == study_instance_uid,
                       ReconstructionClaim.key_sha256 == digest)).first()
            if row is None:
                own_uid = s.scalar(select(Series.series_instance_uid).where(Series.id == series_id))
                legacy = _legacy_holder(s, study_instance_uid, reconstruction, own_uid)
                if not take:
                    return legacy[1] if legacy else None
        if row is None:
            holder = (legacy[0], legacy[2], True) if legacy else (series_id, job_id, False)
            try:
                with db.session() as s:
                    s.add(ReconstructionClaim(study_instance_uid=study_instance_uid, key_sha256=digest,
                                              reconstruction=reconstruction, series_id=holder[0],
                                              job_id=holder[1], analysed=holder[2]))
                    if not legacy:
                        _drop_other_claims(s, series_id, digest)
            except IntegrityError:
                continue  # another worker claimed it first: read its claim
            return legacy[1] if legacy else None
        claim_id, holder_series, holder_job, analysed, holder_uid, job_state = row
        if holder_series == series_id:
            if take:
                with db.session() as s:
                    s.execute(update(ReconstructionClaim).where(ReconstructionClaim.id == claim_id)
                              .values(job_id=job_id))
                    _drop_other_claims(s, series_id, digest)
            return None
        if analysed or job_state in (JobState.PENDING, JobState.RUNNING):
            return holder_uid
        if not take:
            return None
        with db.session() as s:  # stale: taken over, by one claimer only (guarded update)
            res = s.execute(update(ReconstructionClaim)
                            .where(ReconstructionClaim.id == claim_id, ReconstructionClaim.series_id == holder_series,
                                   ReconstructionClaim.job_id == holder_job, ReconstructionClaim.analysed.is_(False))
                            .values(series_id=series_id, job_id=job_id, created_at=utcnow()))
            if res.rowcount == 1:
                _drop_other_claims(s, series_id, digest)
                return None
    raise RuntimeError(f"reconstruction claim of study {study_instance_uid}: no stable answer after 10 tries")


def _drop_other_claims(s: Session, series_id: int, keep_digest: str) -> None:
    """A series holds one reconstruction (its current images): its claims of other keys (an earlier
    generation's) go."""
    s.execute(delete(ReconstructionClaim).where(ReconstructionClaim.series_id == series_id,
                                                ReconstructionClaim.key_sha256 != keep_digest))


def settle_reconstruction_claims(s: Session, job_id: int, outcome: str | None) -> None:
    """When job ``job_id`` closes (in its closing transaction): a claim it holds is marked analysed
    (outcome done), or else released unless its series analysed it before; the series skipped as
    duplicates of a released claim get a new pending job, so that one of them analyses it instead; a
    job closing skipped as the duplicate of a claim released meanwhile queues its series itself."""
    claims = s.scalars(select(ReconstructionClaim).where(ReconstructionClaim.job_id == job_id)).all()
    if not claims and outcome == "skipped":
        _requeue_if_holder_released(s, job_id)
    for claim in claims:
        if outcome == "done":
            claim.analysed = True
            continue
        if claim.analysed:
            continue
        s.delete(claim)
        s.flush()
        for series_id, uid, generation, _job, state, outcome_, text, models in _latest_jobs_of_study(
                s, claim.study_instance_uid):
            rec = _selection_record(text)
            if (series_id == claim.series_id or state not in (JobState.DONE, JobState.FAILED) or outcome_ != "skipped"
                    or rec.get("reconstruction") != claim.reconstruction
                    or not any(isinstance(d, dict) and d.get("rule") == DUPLICATE_RULE
                               for d in rec.get("decisions") or ())):
                continue
            s.add(Job(series_id=series_id, generation=generation, state=JobState.PENDING, models=models))
            log.info("analysis job %d ended without analysing its reconstruction: series %s (skipped as its "
                     "duplicate) queued again", job_id, uid)


def _requeue_if_holder_released(s: Session, job_id: int) -> None:
    """Job ``job_id`` closes skipped as a duplicate: if the claim it was a duplicate of is gone by now
    (its holder failed and released it while this job was still running, so that release could not
    queue this series again), queue it again here. The claim row is read FOR UPDATE (PostgreSQL):
    either the release commits first and this transaction finds no claim, or this one commits first
    and the release's scan, which runs after its delete waited for this transaction, finds this job
    skipped. SQLite serialises the two closing transactions (each starts with an UPDATE)."""
    job = s.get(Job, job_id)
    rec = _selection_record(job.selection)
    reconstruction = rec.get("reconstruction")
    if not reconstruction or not any(isinstance(d, dict) and d.get("rule") == DUPLICATE_RULE
                                     for d in rec.get("decisions") or ()):
        return
    series = s.get(Series, job.series_id)
    if not series.study_instance_uid:
        return
    held = s.scalars(select(ReconstructionClaim.id).where(
        ReconstructionClaim.study_instance_uid == series.study_instance_uid,
        ReconstructionClaim.key_sha256 == _claim_digest(reconstruction)).with_for_update()).first()
    if held is not None or _legacy_holder(s, series.study_instance_uid, reconstruction, series.series_instance_uid):
        return
    s.add(Job(series_id=series.id, generation=job.generation, state=JobState.PENDING, models=job.models))
    log.info("analysis job %d skipped as a duplicate of a reconstruction no series holds any more: series %s "
             "queued again", job_id, series.series_instance_uid)


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the queue sees it: jobs it holds now, jobs it finished in the last hour."""

    worker: str
    running: int
    done_last_hour: int


@dataclass(frozen=True)
class QueueStats:
    """The analysis queue at one moment (``qa-node status``, the backlog warning)."""

    depth: int  # jobs waiting to be claimed (pending)
    oldest_wait_s: float | None  # age of the oldest pending job
    running: int
    workers: list[WorkerLoad]
    mean_job_s: float | None  # mean duration of the recently finished jobs
    n_recent: int  # how many finished jobs that mean is over
    n_workers: int  # workers the ETA divides by
    eta_s: float | None  # depth x mean_job_s / n_workers

    def as_dict(self) -> dict:
        return {"depth": self.depth, "oldest_wait_s": self.oldest_wait_s, "running": self.running,
                "workers": [{"worker": w.worker, "running": w.running, "done_last_hour": w.done_last_hour}
                            for w in self.workers],
                "mean_job_s": self.mean_job_s, "n_recent": self.n_recent, "n_workers": self.n_workers,
                "eta_s": self.eta_s}


ACTIVE_WINDOW = timedelta(minutes=10)  # a worker that finished a job this recently is taken as alive


def queue_stats(db: Database, now: datetime | None = None, *, configured_workers: int = 0,
                recent: int = 20) -> QueueStats:
    """Queue depth, the oldest waiting job's age, jobs per worker (running now, finished - done or
    failed - in the last hour), the mean duration of the jobs finished in the last hour (else of
    the last ``recent`` finished jobs) and an ETA for the waiting jobs: depth x mean / workers.
    A running job whose lease has expired is waiting (any worker may claim it again), not running.
    Workers for the ETA are those running a job under a live lease now, else those that finished one
    in the last ``ACTIVE_WINDOW`` (between two jobs), else ``configured_workers``: a worker restarted
    under a new name does not count twice. None when there is no mean or no worker."""
    from sqlalchemy import func

    now = now or utcnow()
    hour_ago = now - timedelta(hours=1)
    with db.session() as s:
        expired = (Job.state == JobState.RUNNING) & Job.lease_until.is_not(None) & (Job.lease_until <= now)
        waiting = (Job.state == JobState.PENDING) | expired
        depth = s.scalar(select(func.count()).select_from(Job).where(waiting)) or 0
        oldest = s.scalar(select(func.min(Job.created_at)).where(waiting))
        running = dict(s.execute(select(Job.worker, func.count()).where(Job.state == JobState.RUNNING, ~expired)
                                 .group_by(Job.worker)).all())
        just_finished = set(s.scalars(select(Job.finished_by).distinct().where(
            Job.finished_at >= now - ACTIVE_WINDOW, Job.finished_by.is_not(None))))
        done = dict(s.execute(select(Job.finished_by, func.count())
                              .where(Job.state.in_((JobState.DONE, JobState.FAILED)), Job.finished_at >= hour_ago,
                                     Job.finished_by.is_not(None))
                              .group_by(Job.finished_by)).all())
        finished = select(Job.started_at, Job.finished_at).where(
            Job.state.in_((JobState.DONE, JobState.FAILED)), Job.started_at.is_not(None), Job.finished_at.is_not(None))
        spans = s.execute(finished.where(Job.finished_at >= hour_ago)).all()
        if not spans:
            spans = s.execute(finished.order_by(Job.finished_at.desc()).limit(recent)).all()
    if isinstance(oldest, str):  # SQLite aggregates bypass the column type
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        from datetime import timezone

        oldest = oldest.replace(tzinfo=timezone.utc)
    durations = [(b - a).total_seconds() for a, b in spans]
    mean = sum(durations) / len(durations) if durations else None
    names = sorted({w for w in running if w} | set(done))
    workers = [WorkerLoad(w, running.get(w, 0), done.get(w, 0)) for w in names]
    n_workers = len({w for w in running if w}) or len(just_finished) or configured_workers
    eta = None
    if depth == 0:
        eta = 0.0
    elif mean is not None and n_workers:
        eta = depth * mean / n_workers
    return QueueStats(depth=depth, oldest_wait_s=(now - oldest).total_seconds() if oldest is not None else None,
                      running=sum(running.values()), workers=workers, mean_job_s=mean, n_recent=len(durations),
                      n_workers=n_workers, eta_s=eta)
