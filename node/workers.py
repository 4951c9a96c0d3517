"""Analysis worker processes (``analysis.workers = N``, ``qa-node worker``) and the backlog watch.

Each worker process is a fresh interpreter (multiprocessing *spawn*: no GIL shared with the
receiving node, no inherited database connections): it builds its own Database and FileStore, claims
jobs from the database queue (storage.repo.claim_job: ``FOR UPDATE SKIP LOCKED`` and a lease on
PostgreSQL) and runs the same results stage as a one-worker node (node.service.after_job: trends,
SR / maps / report written and queued in the outbox). The receiving node keeps the storage SCP, the
completion sweep, the outbox sender and the reports. Torch CPU threads are split between the
processes: ``torch_threads`` (0 = the machine's cores) / N, at least 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import socket
import threading
import time
from functools import partial

from node.config import Settings
from node.supervise import SupervisedPool
from storage.db import Database
from storage.repo import queue_stats, requeue_running_jobs

log = logging.getLogger(__name__)


def threads_per_worker(torch_threads: int, n_workers: int, cores: int | None = None) -> int:
    """torch CPU threads of each of ``n_workers`` processes: the configured total (0 = the cores
    available) divided between them, at least 1."""
    total = torch_threads or cores
    if not total:
        total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, int(total) // max(1, n_workers))


def worker_settings(settings: Settings, n_workers: int) -> Settings:
    """The settings a worker process runs with: its share of the torch threads."""
    share = threads_per_worker(settings.analysis.torch_threads, n_workers)
    return dataclasses.replace(settings, analysis=dataclasses.replace(settings.analysis, torch_threads=share))


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies (even by SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent watch below still ends the process
        pass


class OutboxWake:
    """How a worker process tells the receiving node that outputs wait in the outbox, so that they
    are sent at once rather than at the sender's next poll (outbox.poll_s): one UDP datagram on
    loopback to the node's wake port. A datagram cannot be left half-sent or lock anything when its
    sender is killed (a multiprocessing Event can), is never waited for, and a lost one only means
    the next poll sends the outputs. Its content is ignored: a stray datagram costs one early pass."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def __call__(self) -> None:
        try:
            self._sock.sendto(b"outbox", ("127.0.0.1", self.port))
        except OSError as exc:  # (the node stopping) the poll sends them
            log.debug("outbox wake not sent: %s", exc)


class OutboxWakeListener:
    """The receiving node's side of OutboxWake: a loopback UDP port and a thread that calls
    ``on_wake`` for each datagram (several arriving together: once)."""

    def __init__(self, on_wake) -> None:
        self.on_wake = on_wake
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-wake", daemon=True)

    def start(self) -> "OutboxWakeListener":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.5)
                if not ready:
                    continue
                while True:  # drain: one pass for all that arrived together
                    self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                pass
            except (OSError, ValueError):
                return  # closed
            try:
                self.on_wake()
            except Exception as exc:  # noqa: BLE001 - the sender's poll still runs
                log.debug("outbox wake failed: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


def make_worker(settings: Settings, db: Database, store, *, wake_port: int | None = None):
    """An AnalysisWorker whose results stage is node.service.after_job on this process's own
    Database and FileStore; with ``wake_port``, the receiving node's outbox sender is woken after
    each job's results stage (OutboxWake)."""
    from node.service import after_job
    from node.worker import AnalysisWorker

    results = partial(after_job, settings, db, store)
    if not wake_port:
        return AnalysisWorker(settings, db, store, after_job=results)
    wake = OutboxWake(wake_port)

    def results_then_wake(job_id, result):
        try:
            return results(job_id, result)
        finally:
            wake()
    return AnalysisWorker(settings, db, store, after_job=results_then_wake)


def worker_process_main(settings: Settings, index: int, n_workers: int, parent_pid: int,
                        wake_port: int | None = None) -> None:
    """Entry point of one worker process (spawned): runs until SIGTERM (after the job in hand) or
    until the parent dies. (No multiprocessing Event: a process SIGKILLed while waiting on one
    leaves it unusable for the others.)"""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    from node.cli import setup_logging
    from storage.filestore import FileStore

    setup_logging(settings.node.log_level)
    settings = worker_settings(settings, n_workers)
    db = Database(settings.node.database)
    worker = make_worker(settings, db, FileStore(settings.node.data_dir), wake_port=wake_port)

    def _stop(*_args) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)

    def _watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:  # orphaned: the parent died without telling us
                log.error("analysis worker %d: parent process gone; stopping", index + 1)
                os._exit(1)

    threading.Thread(target=_watch, name="parent-watch", daemon=True).start()
    log.info("analysis worker process %d/%d started (pid %d, torch threads %d)", index + 1, n_workers,
             os.getpid(), settings.analysis.torch_threads)
    try:
        worker.run()
    finally:
        db.dispose()


class WorkerPool(SupervisedPool):
    """N worker processes: started, restarted when one dies (its job re-queued at once), stopped
    with their unfinished jobs put back in the queue (node.supervise)."""

    supervisor_name = "worker-pool"
    kill_wait_s = 5.0

    def __init__(self, settings: Settings, n_workers: int, *, stop_timeout_s: float = 5.0,
                 wake_port: int | None = None) -> None:
        super().__init__(settings, n_workers, stop_timeout_s=stop_timeout_s)
        self._host = socket.gethostname()
        self.wake_port = wake_port  # the receiving node's OutboxWakeListener, if it sends outputs

    def _spawn(self, i: int) -> None:
        self._start_child(i, worker_process_main, f"qa-node-worker-{i + 1}",
                          (self.settings, i, self.n, os.getpid(), self.wake_port))

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)
        self._start_supervisor()

    def _requeue_of(self, pid: int, db: Database | None = None) -> int:
        own = db is None
        db = db or Database(self.settings.node.database)
        try:
            return requeue_running_jobs(db, f"{self._host}:{pid}:")
        finally:
            if own:
                db.dispose()

    def _exited(self, i: int, p) -> None:
        try:
            n = self._requeue_of(p.pid)
        except Exception as exc:  # noqa: BLE001 - the lease expiry re-queues it anyway
            log.error("analysis worker %d: could not re-queue its job (%s)", i + 1, type(exc).__name__)
            n = 0
        log.error("analysis worker process %d (pid %d) exited with code %s%s; restarting", i + 1, p.pid,
                  p.exitcode, f", its job re-queued" if n else "")

    def _stopped(self, procs: list) -> None:
        """After ``stop``'s SIGTERM (a worker stops after the job in hand: idle ones exit at once)
        and ``stop_timeout_s``: one still in the middle of a job is ended and its job goes back to
        the queue (as with a one-worker node)."""
        db = Database(self.settings.node.database)
        try:
            for p in procs:
                self._kill(p)
                n = self._requeue_of(p.pid, db)
                if n:
                    log.info("re-queued %d unfinished analysis job(s) of worker pid %d", n, p.pid)
        finally:
            db.dispose()


def run_workers(settings: Settings, n_workers: int, stop: threading.Event) -> None:
    """``qa-node worker``: N analysis workers until ``stop`` is set. One worker runs in this
    process; several are worker processes. No node lock is taken: workers on several machines share
    the database and the data folder."""
    from storage.filestore import FileStore

    if n_workers == 1:
        db = Database(settings.node.database)
        worker = make_worker(settings, db, FileStore(settings.node.data_dir))
        worker.start()
        log.info("analysis worker started (pid %d)", os.getpid())
        stop.wait()
        worker.stop()
        n = requeue_running_jobs(db, worker.worker_id)
        if n:
            log.info("re-queued %d unfinished analysis job(s)", n)
        db.dispose()
        return
    pool = WorkerPool(settings, n_workers)
    pool.start()
    stop.wait()
    pool.stop()


class BacklogWatch:
    """Scheduler job of the receiving node: when the oldest waiting job is older than
    ``analysis.backlog_warn_s``, one WARNING line and one alert e-mail (through [alerts]) until the
    backlog clears (then one INFO line); never one per check. No patient data: counts and ages."""

    def __init__(self, settings: Settings, db: Database, *, send=None, clock=None) -> None:
        self.settings = settings
        self.db = db
        self.limit_s = float(settings.analysis.backlog_warn_s)
        self.send = send  # (AlertSettings, EmailMessage) -> None; default reports.alerts.send_message
        self.clock = clock
        self.warned = False
        self.alerted = False
        self.mail_failed = False  # the failed alert e-mail was logged (once per backlog)

    def __call__(self) -> bool:
        """Returns whether the backlog is over the limit now."""
        now = self.clock() if self.clock is not None else None
        stats = queue_stats(self.db, now, configured_workers=self.settings.analysis.workers)
        over = stats.oldest_wait_s is not None and stats.oldest_wait_s > self.limit_s
        if not over:
            if self.warned:
                log.info("analysis backlog cleared: %d job(s) waiting", stats.depth)
            self.warned = self.alerted = self.mail_failed = False
            return False
        if not self.warned:
            self.warned = True
            log.warning("analysis backlog: %s", backlog_text(stats, self.limit_s))
        if not self.alerted:
            self.alerted = self._alert(stats)
        return True

    def _alert(self, stats) -> bool:
        alerts = self.settings.reporting.alerts
        if not alerts.enabled:
            return True  # nothing to send: the WARNING is the alert
        from reports.alerts import AlertDeliveryError, send_message

        msg = backlog_email(stats, self.limit_s, alerts, self.settings.node.ae_title)
        try:
            (self.send or send_message)(alerts, msg)
        except AlertDeliveryError as exc:
            if not self.mail_failed:  # one WARNING while the mail server stays unreachable, not one per check
                log.warning("%s; the backlog alert is retried at every check", exc)
                self.mail_failed = True
            else:
                log.debug("%s; backlog alert still not sent", exc)
            return False
        log.info("backlog alert e-mailed to %d recipient(s)", len(alerts.smtp_to))
        return True


def _duration(s: float | None) -> str:
    if s is None:
        return "unknown"
    s = float(s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def backlog_text(stats, limit_s: float) -> str:
    return (f"{stats.depth} job(s) waiting, the oldest for {_duration(stats.oldest_wait_s)} "
            f"(limit analysis.backlog_warn_s = {_duration(limit_s)}); {len(stats.workers)} worker(s) active, "
            f"ETA {_duration(stats.eta_s)}")


def backlog_email(stats, limit_s: float, alerts, ae_title: str):
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    msg = EmailMessage()
    msg["Subject"] = f"{alerts.subject_prefix} {ae_title}: analysis backlog, {stats.depth} job(s) waiting"
    msg["From"] = alerts.smtp_from
    msg["To"] = ", ".join(alerts.smtp_to)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=alerts.smtp_from.rsplit("@", 1)[-1])
    msg.set_content("\n".join([
        f"The CT QA node {ae_title} is not keeping up with the series it receives.",
        "",
        f"Analysis backlog: {backlog_text(stats, limit_s)}.",
        "",
        "Add workers (analysis.workers, or `qa-node worker` on another machine sharing the database and",
        "the data folder), or narrow the series selected for analysis. See `qa-node status`.",
    ]))
    return msg
