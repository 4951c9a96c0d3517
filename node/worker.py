"""The analysis worker: claims jobs from the database queue and runs the pipeline on them."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from analysis.pipeline import SeriesResult, finish_series, parse_models, prepare_series, run_prepared
from analysis.results import RunContext
from analysis.selection import record_json
from node.calibrate import apply_calibrations, current_calibrations
from node.config import Settings
from storage.db import Database
from storage.filestore import FileStore
from storage.models import JobState, OutputsState
from storage.repo import RunRecord, claim_job, claim_reconstruction, finish_job, holds_job, job_files, job_size, \
    renew_lease

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


def series_batch_on(mode: str, device: str) -> bool:
    """[analysis] series_batch with the resolved device: ``on``, ``off``, or ``auto`` = on only on CUDA."""
    return mode == "on" or (mode == "auto" and device == "cuda")


def run_context(settings: Settings, device: str | None = None) -> RunContext:
    """[analysis] -> what every model run gets: the device, torch_threads, each model's options
    (its table [analysis.<name>], validated by node.config) and whether series batching is on."""
    a = settings.analysis
    resolved = resolve_device(device or a.device)
    return RunContext(device=resolved, options=dict(a.model_options), torch_threads=a.torch_threads,
                      series_batch=series_batch_on(a.series_batch, resolved))


# series batching: at most this many jobs held together by one worker
MAX_GROUP = 8


def fill_target(models: list[str], ctx: RunContext) -> int:
    """The slices one pass holds for these models (the largest resolved batch of those with
    ``run_many``): how many instances a worker gathers from small jobs; 0 when none batches series."""
    from analysis.models import get

    sizes = [get(n).batch_of(ctx.options_for(n), ctx.device) for n in models
             if get(n).run_many is not None and get(n).batch_of is not None]
    return max(sizes, default=0)


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
            group = self._fill(job_id)
            try:
                self.process_group(group)
            except Exception as exc:  # noqa: BLE001 - each job closes alone; the worker outlives any one
                for j in group:
                    self._fail_unexpected(j, exc)

    def _fail_unexpected(self, job_id: int, exc: Exception) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        log.error("analysis job %d failed unexpectedly", job_id, exc_info=exc)
        try:
            finish_job(self.db, job_id, self.worker_id, state=JobState.FAILED,
                       error=f"{type(exc).__name__}: {exc}", outcome="failed")
        except SQLAlchemyError as db_exc:  # left running: re-queued at the next start
            log.error("analysis job %d could not be marked failed (%s)", job_id, type(db_exc).__name__)

    def _context(self) -> RunContext:
        if self._ctx is None:
            self._ctx = run_context(self.settings)
        return self._ctx

    def _fill(self, job_id: int) -> list[int]:
        """Series batching: the claimed job, and further pending jobs claimed while their series fit
        in the rest of a pass (``claim_job(..., max_frames=room)``: a series adds its frames, one per
        instance of a classic series), at most ``MAX_GROUP``. Just the job when series batching is off
        or its models do not batch series."""
        from sqlalchemy.exc import SQLAlchemyError

        try:
            ctx = self._context()
            if not ctx.series_batch:
                return [job_id]
            models, n = job_size(self.db, job_id)
            room = fill_target(parse_models(models), ctx) - n
        except (ValueError, SQLAlchemyError):  # the job itself says why when it runs
            return [job_id]
        group = [job_id]
        while room >= 1 and len(group) < MAX_GROUP:
            try:
                more = claim_job(self.db, self.worker_id, lease_s=self.lease_s, max_frames=room)
                if more is None:
                    break
                group.append(more)
                room -= job_size(self.db, more)[1]
            except SQLAlchemyError as exc:  # the jobs held so far run; the rest stay in the queue
                log.warning("analysis worker: no further job claimed for series batching (%s)", type(exc).__name__)
                break
        if len(group) > 1:
            log.info("series batching: jobs %s analysed together", ", ".join(map(str, group)))
        return group

    def _duplicate_of(self, job_id: int, series_id: int, facts, claim: bool = True) -> str | None:
        """The series of the same study that analyses (or analysed) the same reconstruction, or None
        (selection's duplicate check). ``claim``: this series would be analysed, so it takes the
        reconstruction atomically (``storage.repo.claim_reconstruction``): of two workers checking two
        duplicates at the same time exactly one gets None."""
        return claim_reconstruction(self.db, study_instance_uid=facts.study_instance_uid,
                                    reconstruction=facts.reconstruction_key(), series_id=series_id,
                                    job_id=job_id, take=claim)

    def process(self, job_id: int) -> SeriesResult | None:
        """Run one claimed job (``process_group`` of one: the same stages and the same closing)."""
        return self.process_group([job_id])[0]

    def _series_args(self, job_id: int, series) -> dict:
        return dict(series_instance_uid=series.series_instance_uid, study_instance_uid=series.study_instance_uid,
                    selection=self.settings.selection_policy, scanner=series.scanner_name,
                    duplicate_of=lambda facts, claim=True: self._duplicate_of(job_id, series.id, facts, claim))

    def _fail_config(self, job_id: int, series, exc: ValueError) -> None:
        finish_job(self.db, job_id, self.worker_id, state=JobState.FAILED, error=str(exc), outcome="failed")
        log.error("series %s: analysis failed: %s", series.series_instance_uid, exc)
        return None

    def process_group(self, job_ids: list[int]) -> list[SeriesResult | None]:
        """Claimed jobs analysed together (``analysis.pipeline``: prepared one by one, the models with
        ``run_many`` run once over all of them (series batching), finished one by one), then closed
        one by one in claim order; one job is the group of one (``process``). Each job keeps its
        own lease and heartbeat: a job whose lease was lost is discarded alone; a job that fails
        fails alone."""
        beats = {j: _Heartbeat(self.db, j, self.worker_id, self.lease_s) for j in job_ids}
        for beat in beats.values():
            beat.start()
        try:
            return self._process_group(job_ids, beats)
        finally:
            for beat in beats.values():
                beat.stop()

    def _process_group(self, job_ids: list[int], beats: dict) -> list[SeriesResult | None]:
        results: dict[int, SeriesResult | None] = {j: None for j in job_ids}
        held = []  # (job_id, series, rel_paths, prepared), in claim order
        for job_id in job_ids:
            try:
                job, series, rel_paths = job_files(self.db, job_id)
                _test_delay(series.series_instance_uid)
                try:
                    models = parse_models(job.models)
                    prepared = prepare_series([self.store.abs(p) for p in rel_paths], models, self._context(),
                                              **self._series_args(job_id, series))
                except ValueError as exc:
                    self._fail_config(job_id, series, exc)
                    continue
            except Exception as exc:  # noqa: BLE001 - this job fails alone
                self._fail_unexpected(job_id, exc)
                continue
            held.append((job_id, series, rel_paths, prepared))
        run_prepared([h[3] for h in held], self._context())
        for job_id, series, rel_paths, prepared in held:
            try:
                try:
                    if prepared.error is not None:
                        raise prepared.error
                    result = finish_series(prepared)
                    apply_calibrations(result, current_calibrations(self.db))  # <metric>_likert (qa-node calibrate)
                except ValueError as exc:  # bad model list or device: a configuration problem, not the data's
                    self._fail_config(job_id, series, exc)
                    continue
                results[job_id] = self._close(job_id, beats[job_id], series, rel_paths, result)
            except Exception as exc:  # noqa: BLE001 - this job fails alone
                self._fail_unexpected(job_id, exc)
        return [results[j] for j in job_ids]

    def _close(self, job_id: int, beat: _Heartbeat, series, rel_paths: list[str],
               result: SeriesResult) -> SeriesResult | None:
        """Write an analysed series' outputs and results and close its job (nothing when the job is
        no longer this worker's)."""
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
