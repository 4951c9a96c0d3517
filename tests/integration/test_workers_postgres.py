"""Several machines, as a site runs them: one receiving node (`qa-node serve`, analysis.workers = 0)
and two `qa-node worker` processes sharing a PostgreSQL database and the data folder.

6 small series (2 slices each) are pushed with DCMTK's storescu; one worker is SIGKILLed in the middle of a job
(that series' job is made slow, deterministically, by the test-only hook CTQA_TEST_SLOW_SERIES of
node/worker.py); the other claims it again once its lease (analysis.lease_s = 3 s) expired. Every
series is analysed exactly once, and its outputs reach a real Orthanc once.

Uses the private PostgreSQL cluster of test_trends_postgres (skips when its binaries or psycopg are
absent) and Debian's Orthanc.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.orthanc import LocalOrthanc
from storage.db import Database
from storage.models import AnalysisRun, Delivery, Job, OutputObject, Series
from tests.helpers import PHANTOM_5MM, NodeProcess, pacs_destination, qa_node, require, require_tool, storescu, \
    wait_until, write_config
from tests.integration.test_trends_postgres import pg_url  # noqa: F401 - the fixture

N_SERIES = 12  # the slow one and eleven the two workers share while it runs (the issue: 12 series)
LEASE_S = 3
SLOW_S = 6  # the slow series' job, in each attempt


def make_series(src: Path, out: Path, n: int, slices: int = 3, distinct: bool = False) -> list[str]:
    """``n`` series of ``slices`` slices each, copies of the phantom with new Study/Series/SOP UIDs
    (each in its own study: a copy in the same study would be skipped as a duplicate reconstruction).
    The same first slices for every series, or with ``distinct`` different ones (series i: the
    phantom's slices 10 + i * slices onwards)."""
    ordered = sorted((p for p in src.iterdir() if p.name.startswith("I")),
                     key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    uids = []
    for i in range(n):
        series_uid, study_uid = generate_uid(), generate_uid()
        uids.append(series_uid)
        folder = out / f"s{i:02d}"
        folder.mkdir(parents=True)
        files = ordered[10 + i * slices:10 + (i + 1) * slices] if distinct else ordered[:slices]
        for j, f in enumerate(files):
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesNumber = 100 + i
            ds.save_as(folder / f"{j}.dcm", enforce_file_format=True)
    return uids


class Worker:
    """`qa-node worker --workers 1` in a subprocess (the worker runs in that very process)."""

    def __init__(self, config: Path, workdir: Path, name: str, env: dict) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node", "--config", str(config), "worker", "--workers", "1"],
                                     cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def test_two_worker_machines_one_killed_every_series_analysed_and_delivered_once(tmp_path, pg_url):  # noqa: F811
    require_tool("storescu")
    require_tool("Orthanc")
    uids = make_series(require(PHANTOM_5MM), tmp_path / "push", N_SERIES, slices=2)
    slow = uids[0]
    shared = tmp_path / "shared"  # the data folder every machine mounts (NFS at a site)
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        cfg = write_config(tmp_path / "config.toml", data_dir=shared, stable_age_s=1.0,
                           models='["basic", "classical"]',
                           extra=f"workers = 0\nlease_s = {LEASE_S}\n" + pacs_destination(pacs.dicom_port))
        sqlite = f'database = "sqlite:///{shared}/ctqa.sqlite"'
        cfg.write_text(cfg.read_text().replace(sqlite, f'database = "{pg_url}"'))
        node = NodeProcess(cfg, tmp_path)
        node.start()
        env = dict(os.environ, CTQA_TEST_SLOW_SERIES=f"{slow}={SLOW_S}")
        workers = [Worker(cfg, tmp_path, f"worker{i}", env) for i in (1, 2)]
        db = Database(pg_url)
        try:
            assert storescu(node.port, tmp_path / "push").returncode == 0

            def slow_job():
                with db.session() as s:
                    return s.execute(select(Job.id, Job.worker, Job.attempts, Job.state).join(Series)
                                     .where(Series.series_instance_uid == slow)).first()

            job = wait_until(lambda: (j := slow_job()) and j.state == "running" and j, timeout=60,
                             what="the slow series' job running")
            holder = job.worker
            pid = int(holder.split(":")[1])
            assert holder.split(":")[0] == socket.gethostname()
            assert pid in {w.proc.pid for w in workers}
            time.sleep(LEASE_S + 1)  # longer than the lease: a live worker's heartbeat keeps its job
            again = slow_job()
            assert (again.state, again.worker, again.attempts) == ("running", holder, 1)
            os.kill(pid, signal.SIGKILL)  # mid-job
            victim = next(w for w in workers if w.proc.pid == pid)
            survivor = next(w for w in workers if w.proc.pid != pid)
            victim.proc.wait(10)
            t_kill = time.monotonic()

            def all_done():
                with db.session() as s:
                    return s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) == N_SERIES
            wait_until(all_done, timeout=90, what="every series analysed")
            print(f"all analysed {time.monotonic() - t_kill:.1f} s after the kill")

            def delivered():  # polled in the database; `qa-node outbox` is what is checked
                with db.session() as s:
                    return s.scalar(select(func.count()).select_from(Delivery).where(Delivery.state == "sent"))
            try:
                wait_until(lambda: delivered() == 3 * N_SERIES, timeout=60, interval=0.25,
                           what="every output delivered")
            except TimeoutError:
                pass  # the assertion below says what the outbox holds
            last = json.loads(qa_node("--config", str(cfg), "outbox", "--json").stdout)
            assert len(last) == 3 * N_SERIES and all(r["state"] == "sent" for r in last), \
                f"outbox: {[(r['kind'], r['state'], r['last_error']) for r in last]}\n{node.log()[-3000:]}"
            with db.session() as s:
                jobs = s.execute(select(Series.series_instance_uid, Job.generation, Job.state, Job.outcome,
                                        Job.attempts, Job.finished_by, Job.outputs, Job.id)
                                 .join(Series)).all()
                runs = s.execute(select(AnalysisRun.series_id, AnalysisRun.model, AnalysisRun.job_id)).all()
                outputs = s.execute(select(OutputObject.series_id, OutputObject.kind)).all()
                n_deliveries = s.scalar(select(func.count()).select_from(Delivery))
                n_series = s.scalar(select(func.count()).select_from(Series))
            # one done job per series generation; the killed one claimed twice and closed by the survivor
            assert n_series == N_SERIES
            assert sorted(j.series_instance_uid for j in jobs) == sorted(uids)
            assert {(j.generation, j.state, j.outcome, j.outputs) for j in jobs} == {(1, "done", "done", "written")}
            by_uid = {j.series_instance_uid: j for j in jobs}
            assert by_uid[slow].attempts == 2
            assert by_uid[slow].finished_by.split(":")[1] == str(survivor.proc.pid)
            assert all(j.attempts == 1 for u, j in by_uid.items() if u != slow)
            finishers = {j.finished_by.split(":")[1] for j in jobs}
            assert str(survivor.proc.pid) in finishers <= {str(w.proc.pid) for w in workers}
            # runs recorded once: basic and classical per series, from its one job
            assert len(runs) == 2 * N_SERIES
            job_of = {j.id for j in jobs}
            assert all(r.job_id in job_of for r in runs)
            assert sorted((r.series_id, r.model) for r in runs) == sorted(
                {(r.series_id, m) for r in runs for m in ("basic", "classical")})
            # outputs written once (SR, map, report per series), one delivery each, in PACS once
            assert sorted(k for _, k in outputs) == sorted(["sr", "pmap", "pdf"] * N_SERIES)
            assert n_deliveries == 3 * N_SERIES
            assert pacs.get("/statistics")["CountInstances"] == 3 * N_SERIES
            assert "claimed again" in survivor.log()
            # the queue as `qa-node status` shows it: nothing waiting, all of them finished in the last hour
            q = json.loads(qa_node("--config", str(cfg), "status", "--json").stdout)["queue"]
            assert (q["depth"], q["running"], q["eta_s"]) == (0, 0, 0.0)
            assert sum(w["done_last_hour"] for w in q["workers"]) == N_SERIES
            assert {w["worker"].split(":")[1] for w in q["workers"]} == finishers
            # the receiving node analysed nothing and took no job
            assert "instances, analysis" not in node.log()
            assert survivor.stop() == 0
        finally:
            for w in workers:
                w.stop(signal.SIGKILL)
            node.stop()
            db.dispose()
