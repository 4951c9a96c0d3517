"""The analysis worker: claims jobs from the database queue and runs the pipeline on them."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from analysis.pipeline import SeriesResult, analyse_series, parse_models
from analysis.results import RunContext
from analysis.selection import record_json
from node.calibrate import apply_calibrations, current_calibrations
from node.config import Settings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import JobState, OutputsState
from storage.repo import RunRecord, claim_job, claim_reconstruction, finish_job, holds_job, job_files, renew_lease

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``. ``cuda`` without a GPU is an error."""
    if requested == "cpu":
        return "cpu"
    try:
        import torch
    except ModuleNotFoundError:
        if requested == "cuda":
            raise ValueError("analysis.device = 'cuda' but torch is not installed") from None
        return "cpu"
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ValueError("analysis.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return "cuda" if has_cuda else "cpu"


def run_context(settings: Settings, device: str | None = None) -> RunContext:
    """[analysis] -> what every model run gets: the device, torch_threads, and each model's options
    (its table [analysis.<name>], validated by node.config)."""
    a = settings.analysis
    return RunContext(device=resolve_device(device or a.device), options=dict(a.model_options),
                      torch_threads=a.torch_threads)


def startup_warnings(settings: Settings) -> list[str]:
    """One line per configured model that cannot work as configured (e.g. its weights file is not
    installed): logged once when the worker starts, not for every series."""
    from analysis.models import get

    lines = []
    for name in settings.analysis.models:
        spec = get(name)
        if spec.startup_check is not None:
            why = spec.startup_check(settings.analysis.options(name))
            if why:
                lines.append(f"model {name}: {why}")
    return lines


# info key under which a run's further TID 4019 parameters are stored (rebuild-outputs restores them)
PARAMETERS_INFO_KEY = "algorithm_parameters"


def run_records(result: SeriesResult) -> list[RunRecord]:
    return [
        RunRecord(model=o.name, algorithm=o.algorithm, version=o.version, weights_sha256=o.weights_sha256,
                  series_metrics=dict(o.series_metrics), reasons=dict(o.reasons),
                  slice_metrics={k: list(v) for k, v in o.slice_metrics.items()},
                  info={**o.info, **({PARAMETERS_INFO_KEY: "\n".join(o.parameters)} if o.parameters else {})})
        for o in result.outputs
    ]


@dataclass(frozen=True)
class AfterJob:
    """What the results stage did for an analysed series: the outputs state (``OutputsState``) with
    its reason, and a note for the job's error text (e.g. a failed trend evaluation)."""

    outputs: str
    outputs_error: str | None = None
    note: str | None = None


# Called for an analysed series before its job is closed: (job_id, series_result) -> AfterJob. The
# results stage (SR / maps / outbox, trends) plugs in here, so the worker does not depend on reports.
AfterJobHook = Callable[[int, SeriesResult], AfterJob]


class AnalysisWorker:
    def __init__(self, settings: Settings, db: Database, store: FileStore, *,
                 after_job: AfterJobHook | None = None, poll_s: float = 1.0) -> None:
        self.settings = settings
        self.db = db
        self.store = store
        self.after_job = after_job
        self.poll_s = poll_s
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = float(settings.analysis.lease_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: RunContext | None = None

    def start(self) -> None:
        for line in startup_warnings(self.settings):
            log.warning("%s", line)
        self._thread = threading.Thread(target=self._loop, name="analysis-worker", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 0.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and timeout:
            self._thread.join(timeout)

    def run(self) -> None:
        """The worker loop in the calling thread (a worker process's main thread) until ``stop()``."""
        for line in startup_warnings(self.settings):
            log.warning("%s", line)
        self._loop()

    def _loop(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        failing = 0
        while not self._stop.is_set():
            try:
                job_id = claim_job(self.db, self.worker_id, lease_s=self.lease_s)
            except SQLAlchemyError as exc:  # database down or disk full: the worker waits, it does not die
                failing += 1
                if failing == 1:
                    log.error("analysis worker: cannot read the job queue (%s); retrying with back-off",
                              type(exc).__name__)
                self._wake.wait(min(60.0, self.poll_s * 2 ** min(failing, 6)))
                self._wake.clear()
                continue
            if failing:
                log.info("analysis worker: job queue readable again after %d failed attempt(s)", failing)
                failing = 0
            if job_id is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self.process(job_id)
            except Exception as exc:  # the worker outlives any one job; the job records why it failed
                log.exception("analysis job %d failed unexpectedly", job_id)
                try:
                    finish_job(self.db, job_id, self.worker_id, state=JobState.FAILED,
                               error=f"{type(exc).__name__}: {exc}", outcome="failed")
                except SQLAlchemyError as db_exc:  # left running: re-queued at the next start
                    log.error("analysis job %d could not be marked failed (%s)", job_id, type(db_exc).__name__)

    def _duplicate_of(self, job_id: int, series_id: int, facts, claim: bool = True) -> str | None:
        """The series of the same study that analyses (or analysed) the same reconstruction, or None
        (selection's duplicate check). ``claim``: this series would be analysed, so it takes the
        reconstruction atomically (``storage.repo.claim_reconstruction``): of two workers checking two
        duplicates at the same time exactly one gets None."""
        return claim_reconstruction(self.db, study_instance_uid=facts.study_instance_uid,
                                    reconstruction=facts.reconstruction_key(), series_id=series_id,
                                    job_id=job_id, take=claim)

    def process(self, job_id: int) -> SeriesResult | None:
        """Run one claimed job, renewing its lease from a heartbeat thread meanwhile."""
        beat = _Heartbeat(self.db, job_id, self.worker_id, self.lease_s)
        beat.start()
        try:
            return self._process(job_id, beat)
        finally:
            beat.stop()

    def _process(self, job_id: int, beat: _Heartbeat) -> SeriesResult | None:
        job, series, rel_paths = job_files(self.db, job_id)
        _test_delay(series.series_instance_uid)
        try:
            if self._ctx is None:
                self._ctx = run_context(self.settings)
            models = parse_models(job.models)
            result = analyse_series([self.store.abs(p) for p in rel_paths], models, self._ctx,
                                    series_instance_uid=series.series_instance_uid,
                                    study_instance_uid=series.study_instance_uid,
                                    selection=self.settings.selection_policy, scanner=series.scanner_name,
                                    duplicate_of=lambda facts, claim=True: self._duplicate_of(
                                        job_id, series.id, facts, claim))
            apply_calibrations(result, current_calibrations(self.db))  # <metric>_likert (qa-node calibrate)
        except ValueError as exc:  # bad model list or device: a configuration problem, not the data's
            finish_job(self.db, job_id, self.worker_id, state=JobState.FAILED, error=str(exc), outcome="failed")
            log.error("series %s: analysis failed: %s", series.series_instance_uid, exc)
            return None
        vol = result.volume
        refs = list(zip(vol.sop_instance_uids, vol.frame_numbers)) if vol is not None else []
        state = JobState.FAILED if result.status == "failed" else JobState.DONE
        # Outputs (SR, maps, report) are written and queued before the job is closed: their UIDs are
        # derived from the series and its generation, so a job re-run after a crash re-creates the
        # same objects instead of sending duplicates.
        if beat.lost.is_set() or not holds_job(self.db, job_id, self.worker_id):
            # another worker took the job over (this one stalled past its lease): it writes the
            # outputs and the results, once; this worker writes nothing
            log.warning("series %s: job %d is no longer this worker's (lease lost); results discarded",
                        series.series_instance_uid, job_id)
            return None
        if result.status == "failed" or (result.status == "skipped" and not result.outputs):
            after = AfterJob(OutputsState.NONE)
        elif self.after_job is None:
            after = AfterJob(OutputsState.NONE, None if result.status == "skipped" else "no results stage in this worker")
        else:
            try:
                after = self.after_job(job_id, result)
            except Exception as exc:  # the analysis is kept; the series shows outputs failed, never done
                log.exception("series %s: results stage failed unexpectedly", series.series_instance_uid)
                after = AfterJob(OutputsState.FAILED, f"{type(exc).__name__}: {exc}")
        error = "; ".join(x for x in (result.reason, after.note) if x) or None
        kept = finish_job(self.db, job_id, self.worker_id, state=state, error=error,
                          outcome=result.status, runs=run_records(result), slice_refs=refs,
                          outputs=after.outputs, outputs_error=after.outputs_error,
                          selection=record_json(result.selection, result.facts))
        if not kept:
            log.info("series %s: job %d was re-queued while running; results discarded", series.series_instance_uid, job_id)
            return None
        log.info("series %s (scanner %s): %d instances, analysis %s%s", series.series_instance_uid,
                 series.scanner_name, len(rel_paths), result.status,
                 f" ({result.reason})" if result.reason else "")
        return result


class _Heartbeat:
    """Renews a running job's lease every lease_s / 3 seconds; ``lost`` is set when the job is no
    longer this worker's (re-queued, or claimed by another worker after the lease expired)."""

    def __init__(self, db: Database, job_id: int, worker_id: str, lease_s: float) -> None:
        self.db, self.job_id, self.worker_id, self.lease_s = db, job_id, worker_id, lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        while not self._stop.wait(self.lease_s / 3):
            try:
                if not renew_lease(self.db, self.job_id, self.worker_id, self.lease_s):
                    self.lost.set()
                    return
            except SQLAlchemyError as exc:  # the database is briefly away: try again at the next beat
                log.warning("job %d: lease not renewed (%s)", self.job_id, type(exc).__name__)


# Test hook: tests/integration/test_workers_postgres.py makes one series' job slow, deterministically,
# to kill its worker mid-job. Unset in production (the default): no effect.
_SLOW_SERIES_ENV = "CTQA_TEST_SLOW_SERIES"  # "<SeriesInstanceUID>=<seconds>"


def _test_delay(series_instance_uid: str) -> None:
    spec = os.environ.get(_SLOW_SERIES_ENV)
    if not spec or "=" not in spec:
        return
    uid, seconds = spec.rsplit("=", 1)
    if uid == series_instance_uid:
        log.info("series %s: test delay of %s s (%s)", uid, seconds, _SLOW_SERIES_ENV)
        import time

        time.sleep(float(seconds))
