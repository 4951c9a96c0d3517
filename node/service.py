"""Wiring of the running node: storage SCP + scheduler (series completion) + analysis worker."""

from __future__ import annotations

import logging
import socket
import threading
import time

from apscheduler.schedulers.background import BackgroundScheduler

from analysis.pipeline import parse_models
from node.config import Settings
from node.worker import AfterJob, AnalysisWorker
from node.receivers import ReceiverPool, make_storage_scp
from scp.sender import Destination, run_outbox
from scp.server import StorageSCP
from storage.db import Database
from storage.filestore import FileStore
from storage.models import OutputsState
from storage.nodelock import NodeLock
from storage.outbox import RetryPolicy
from storage.repo import complete_due_series, requeue_abandoned_jobs, requeue_running_jobs

log = logging.getLogger(__name__)


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


_NEVER_IDLE_S = 10 * 365 * 86400.0


def sweep_completed_series(db: Database, stable_age_s: float, models: list[str],
                           started: float | None = None) -> list[str]:
    """Scheduler job: complete idle (or fully counted) series and queue their analysis.

    ``started`` (time.monotonic() at the node's start): for the first ``stable_age_s`` after a start
    no series completes by idleness, so that the node's own downtime (a crash, a restart) does not
    count as the scanner having finished; series whose expected count is reached still complete."""
    age = stable_age_s
    if started is not None and time.monotonic() - started < stable_age_s:
        age = _NEVER_IDLE_S
    done = complete_due_series(db, age, models)
    for uid in done:
        log.info("series %s complete; analysis queued", uid)
    return done


class _QuietSkips(logging.Filter):
    """An interval job with max_instances=1 whose run outlasts its interval skips a tick: expected
    (the job coalesces), not worth a WARNING line each time."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('Execution of job "%s" skipped: maximum number of running')


def _quiet_scheduler_skips() -> None:
    lg = logging.getLogger("apscheduler.scheduler")
    if not any(isinstance(f, _QuietSkips) for f in lg.filters):
        lg.addFilter(_QuietSkips())


class _Guarded:
    """A scheduler job that backs off while it fails (disk full, database down) instead of failing,
    with a traceback, at every tick: one line when it starts failing, exponential back-off
    (``initial_s`` doubling to ``max_s``) during which ticks are skipped, one line when it recovers."""

    def __init__(self, fn, name: str, *, initial_s: float = 2.0, max_s: float = 60.0, clock=None) -> None:
        import time

        self.fn = fn
        self.name = name
        self.initial_s = initial_s
        self.max_s = max_s
        self.clock = clock or time.monotonic
        self.failures = 0
        self.skip_until = 0.0
        self.delay = 0.0

    def __call__(self, *args, **kwargs):
        now = self.clock()
        if self.failures and now < self.skip_until:
            return None
        try:
            out = self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure of a periodic job is retried later
            self.failures += 1
            self.delay = min(self.max_s, self.initial_s * 2 ** (self.failures - 1))
            self.skip_until = now + self.delay
            if self.failures == 1:
                log.error("%s failing (%s: %s); retrying with back-off up to %.0f s", self.name,
                          type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "", self.max_s)
            else:
                log.debug("%s still failing (%d times): %s", self.name, self.failures, type(exc).__name__)
            return None
        if self.failures:
            log.info("%s recovered after %d failed attempt(s)", self.name, self.failures)
            self.failures = 0
        return out


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_and_judge_outputs(settings: Settings, db: Database, store: FileStore, job_id: int, result,
                            evaluations=None, *, writer=None) -> tuple[str, str | None]:
    """Build, write and queue the outputs of an analysed series; return (outputs state, reason).

    ``written`` when the SR and whatever else could be built are written and queued; an output the
    source cannot hold (e.g. a map for a source without Frame of Reference) is named in the reason
    but is not a failure of the rest. ``partial`` when the SR is written but another output failed
    to build by an error (named in the reason, one ERROR line): ``rebuild-outputs --failed`` takes
    it again. ``failed`` when nothing, or no SR, could be written, with one ERROR line.
    ``writer`` replaces ``node.outputs.write_outputs`` (same signature and result)."""
    from node.outputs import write_outputs

    uid = result.series_instance_uid
    try:
        res = (writer or write_outputs)(settings, db, store, job_id, result, evaluations)
    except Exception as exc:  # any builder/write/queue error: the series must show it, never "done"
        error = f"outputs not written: {_one_line(exc)}"
        log.error("series %s: outputs failed: %s", uid, error)
        log.debug("outputs failure", exc_info=True)
        return OutputsState.FAILED, error
    written = list(getattr(res, "written", res) or [])
    failures = list(getattr(res, "failures", []) or [])
    left_out = "; ".join(f"{kind}: {reason}" for kind, reason in failures) or None
    if not written or not any(w.kind == "sr" for w in written):
        what = "no output object" if not written else "no measurement report (SR)"
        error = f"{what} could be built" + (f": {left_out}" if left_out else "")
        log.error("series %s: outputs failed: %s", uid, error)
        return OutputsState.FAILED, error
    errors = list(getattr(res, "errors", []) or [])
    if errors:
        log.error("series %s: outputs partly failed: %s not built (an error, see the WARNING above)", uid,
                  ", ".join(errors))
        return OutputsState.PARTIAL, left_out
    return OutputsState.WRITTEN, left_out


def after_job(settings: Settings, db: Database, store: FileStore, job_id: int, result) -> AfterJob:
    """For an analysed series: trends recorded, outputs written and queued for every destination.
    Returns the outputs state for the job (the analysis results are kept regardless). Runs in the
    worker that analysed the series (a worker process of ``serve`` or of ``qa-node worker``, node.workers,
    or the one worker of ``qa-node worker --workers 1``)."""
    from sqlalchemy.exc import SQLAlchemyError

    from node.trending import record_and_evaluate

    note = None
    evaluations: dict[str, str] = {}
    try:
        evaluations = record_and_evaluate(settings, db, job_id, result)
    except (ValueError, SQLAlchemyError, RuntimeError) as exc:
        log.error("series %s: trend evaluation failed: %s", result.series_instance_uid, _one_line(exc))
        log.debug("trend evaluation failure", exc_info=True)
        note = f"trend evaluation failed: {_one_line(exc)}"
    if result.status == "skipped":
        # left out by series selection but with its basic statistics: a trend row, no outputs
        return AfterJob(OutputsState.NONE, None, note)
    state, error = write_and_judge_outputs(settings, db, store, job_id, result, evaluations)
    return AfterJob(state, error, note)


_OUTBOX_PASS = threading.Lock()


def send_outbox(db: Database, store: FileStore, calling_ae: str, destinations: list[Destination],
                policy: RetryPolicy) -> dict[str, int]:
    """Scheduler job: one pass of the outbox sender. A backlog pass can outlast poll_s: a run that
    finds one still going returns at once (silently, where APScheduler would warn every poll)."""
    if not _OUTBOX_PASS.acquire(blocking=False):
        return {}
    try:
        return run_outbox(db, store, calling_ae=calling_ae, destinations=destinations, policy=policy)
    finally:
        _OUTBOX_PASS.release()


class Node:
    def __init__(self, settings: Settings, *, min_free_bytes: int = 0) -> None:
        self.settings = settings
        self.db = Database(settings.node.database)
        self.store = FileStore(settings.node.data_dir)
        self.min_free_bytes = min_free_bytes
        self.models = parse_models(settings.analysis.models)
        self.scp: StorageSCP | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.worker: AnalysisWorker | None = None  # an in-process worker the tests attach (serve has none)
        self.pool = None  # node.workers.WorkerPool when analysis.workers >= 1
        self.receivers: ReceiverPool | None = None  # node.receivers >= 2
        self._wake = None  # node.workers.OutboxWakeListener: worker processes wake the outbox sender
        self.stopped = threading.Event()
        self.lock = NodeLock(settings.node.data_dir, settings.node.database)
        self._locked = False

    def take_lock(self) -> None:
        """One node per data folder and database: raises storage.nodelock.NodeLocked when another
        node holds them. Taken before anything is touched (spool, jobs, store)."""
        if not self._locked:
            self.lock.acquire()
            self._locked = True

    def prepare(self) -> None:
        """Create folders and tables, and pick up what a crash or stop left behind."""
        self.take_lock()
        self.store.prepare()
        n_spool = self.store.clean_spool()
        n_tmp = self.store.remove_tmp_files()
        if n_spool or n_tmp:
            log.info("removed %d unacknowledged spool files and %d temporary files", n_spool, n_tmp)
        self.db.create_all()
        from node.reconcile import reconcile_store

        reconcile_store(self.db, self.store)  # store files without an index row: indexed or quarantined
        # jobs of live workers (worker processes, `qa-node worker` on other machines) keep running
        n_jobs = requeue_abandoned_jobs(self.db, socket.gethostname())
        if n_jobs:
            log.info("re-queued %d analysis jobs left running", n_jobs)

    def start(self, *, run_worker: bool = True) -> int:
        self.prepare()
        n_workers = self.settings.analysis.workers if run_worker else 0
        # analysis in worker processes (node.workers), one included: as a thread of this process it
        # shared the GIL with receiving, which then ran at 0.71-0.88 of the speed it has beside a
        # worker process (bench/ingest_while_analysing.py); none: this node only receives and sends
        # (`qa-node worker` analyses, here or on other machines)
        if n_workers >= 1:
            from node.workers import OutboxWakeListener, WorkerPool

            if self.settings.destinations:  # a worker process's outputs are sent at once, not at the next poll
                self._wake = OutboxWakeListener(self._wake_outbox).start()
            self.pool = WorkerPool(self.settings, n_workers, wake_port=self._wake.port if self._wake else None)
        tls = self.settings.tls
        server_ctx = client_ctx = None
        if tls is not None:
            from scp.tls import client_context, server_context

            if tls.port != -1:
                server_ctx = server_context(tls.certificate, tls.private_key, tls.ca_certificates,
                                            tls.require_client_certificate)
            if any(d.tls for d in self.settings.destinations):
                client_ctx = client_context(tls.certificate, tls.private_key, tls.ca_certificates)
        n_receivers = self.settings.node.receivers if self.settings.node.port != -1 else 1
        self.scp = make_storage_scp(self.settings, self.db, self.store, min_free_bytes=self.min_free_bytes,
                                    server_ctx=server_ctx, shared_listener=n_receivers > 1)
        port = self.scp.start()
        if n_receivers > 1:  # node.receivers: more processes accept from the same listening socket
            self.receivers = ReceiverPool(self.settings, self.scp.listen_socket, n_receivers - 1,
                                          min_free_bytes=self.min_free_bytes)
            self.receivers.start()
        self.scheduler = BackgroundScheduler(timezone="UTC")
        _quiet_scheduler_skips()
        interval = max(0.5, min(5.0, self.settings.node.stable_age_s / 4))
        self.scheduler.add_job(
            _Guarded(sweep_completed_series, "series completion sweep"), "interval", seconds=interval,
            id="sweep_completed_series", name="sweep_completed_series",
            args=[self.db, self.settings.node.stable_age_s, self.models, time.monotonic()],
            coalesce=True, max_instances=1, misfire_grace_time=60,
        )
        if self.settings.destinations:
            ob = self.settings.outbox
            self.scheduler.add_job(
                send_outbox, "interval", seconds=ob.poll_s, id="send_outbox",
                args=[self.db, self.store, self.settings.node.ae_title,
                      [Destination(d.name, d.ae_title, d.host, d.port, client_ctx if d.tls else None)
                       for d in self.settings.destinations],
                      RetryPolicy(ob.retry_initial_s, ob.retry_max_s, ob.give_up_after_s)],
                coalesce=True, max_instances=2, misfire_grace_time=60,  # the 2nd returns at once: see send_outbox
            )
        reporting = self.settings.reporting
        if reporting.alerts.enabled:
            from node.trending import send_alerts

            self.scheduler.add_job(send_alerts, "interval", seconds=300, id="send_alerts",
                                   args=[self.db, self.settings], coalesce=True, max_instances=1,
                                   misfire_grace_time=600)
        from reports.qa_report import schedule_reports

        schedule_reports(self.scheduler, self.db, reporting, [s.name for s in self.settings.scanners],
                         self.settings.node.data_dir)
        if self.settings.analysis.backlog_warn_s > 0:
            from node.workers import BacklogWatch

            self.scheduler.add_job(_Guarded(BacklogWatch(self.settings, self.db), "analysis backlog check"),
                                   "interval", seconds=max(1.0, min(60.0, self.settings.analysis.backlog_warn_s / 10)),
                                   id="backlog_check", coalesce=True, max_instances=1, misfire_grace_time=60)
        self.scheduler.start()
        if self.pool is not None:
            self.pool.start()
        return port

    def _after_job(self, job_id: int, result) -> AfterJob:
        """For an analysed series: ``after_job``, then the outbox sender is woken."""
        after = after_job(self.settings, self.db, self.store, job_id, result)
        self._wake_outbox()
        return after

    def _wake_outbox(self) -> None:
        """The outbox sender's next pass now (outputs were queued), not at its next poll."""
        if self.scheduler is not None and self.scheduler.get_job("send_outbox") is not None:
            self.scheduler.modify_job("send_outbox", next_run_time=_now())

    def stop(self) -> None:
        """Stop receiving, stop the scheduler and worker, and put unfinished work back in the queue."""
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        if self.scp is not None:
            self.scp.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.worker is not None:  # an attached in-process worker: its unfinished job goes back
            self.worker.stop()
            n = requeue_running_jobs(self.db, self.worker.worker_id)
            if n:
                log.info("re-queued %d unfinished analysis job(s)", n)
        if self.pool is not None:
            self.pool.stop()  # its workers' unfinished jobs go back in the queue
        if self._wake is not None:
            self._wake.stop()
            self._wake = None
        self.db.dispose()
        if self._locked:
            self.lock.release()
            self._locked = False
        self.stopped.set()
