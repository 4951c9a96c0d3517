"""analysis.workers = N on one machine (SQLite): N worker processes share the queue, each series is
analysed once and its outputs written by the process that analysed it; job leases (claim, renew,
expiry, a stale worker refused) on the repository functions."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from node.config import settings_from_dict
from node.service import Node
from storage.db import Database, utcnow
from storage.models import AnalysisRun, Job, OutputObject, Series
from storage.repo import MAX_ATTEMPTS, claim_job, complete_due_series, finish_job, renew_lease, \
    requeue_abandoned_jobs
from tests.helpers import PHANTOM_5MM, require, wait_until
from tests.integration.test_node_pipeline import push_files
from tests.integration.test_workers_postgres import make_series


def _settings(tmp_path, workers: int):
    return settings_from_dict({
        "node": {"data_dir": str(tmp_path / "var"), "database": f"sqlite:///{tmp_path / 'var' / 'db.sqlite'}",
                 "port": 0, "stable_age_s": 0.5},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "destinations": [{"name": "PACS", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 9}],
        "analysis": {"device": "cpu", "models": ["basic", "classical"], "workers": workers, "lease_s": 5},
        "outbox": {"retry_initial_s": 3600},
    }, "test.toml")


def test_two_worker_processes_share_the_queue(tmp_path):
    uids = make_series(require(PHANTOM_5MM), tmp_path / "push", 4, slices=2)
    node = Node(_settings(tmp_path, workers=2))
    node.start()
    try:
        assert node.worker is None and node.pool is not None and len(node.pool.pids) == 2
        push_files(node, sorted((tmp_path / "push").rglob("*.dcm")))

        def done():
            with node.db.session() as s:
                return s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) == 4
        wait_until(done, timeout=120, what="4 series analysed by the worker processes")
        with node.db.session() as s:
            jobs = s.execute(select(Series.series_instance_uid, Job.attempts, Job.finished_by, Job.outputs, Job.id)
                             .join(Series)).all()
            runs = s.execute(select(AnalysisRun.job_id, AnalysisRun.model)).all()
            outputs = s.execute(select(OutputObject.job_id, OutputObject.kind)).all()
        assert sorted(j.series_instance_uid for j in jobs) == sorted(uids)
        assert {(j.attempts, j.outputs) for j in jobs} == {(1, "written")}
        # analysed in the worker processes, not in this one
        pids = {int(j.finished_by.split(":")[1]) for j in jobs}
        assert pids <= set(node.pool.pids) and len(pids) >= 1
        assert sorted(runs) == sorted((j.id, m) for j in jobs for m in ("basic", "classical"))
        # outputs written by the process that analysed the series: SR, map and report, once per series
        assert sorted(outputs) == sorted((j.id, k) for j in jobs for k in ("sr", "pmap", "pdf"))
        # a worker process dies holding a job (its lease far from expiry): the pool re-queues that job
        # at once and starts a new process
        victim = node.pool.pids[0]
        with node.db.session() as s:
            series_id = s.scalar(select(Series.id).where(Series.series_instance_uid == uids[0]))
            held = Job(series_id=series_id, generation=1, state="running", models="basic,classical", attempts=1,
                       worker=f"{socket.gethostname()}:{victim}:gone", started_at=utcnow(),
                       lease_until=utcnow() + timedelta(seconds=600))
            s.add(held)
            s.flush()
            held_id = held.id
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in node.pool.pids and len(node.pool.pids) == 2, timeout=30,
                   what="a new worker process")

        def held_done():
            with node.db.session() as s:
                return s.get(Job, held_id).state == "done"
        wait_until(held_done, timeout=90, what="the dead worker's job analysed again")
        with node.db.session() as s:
            j = s.get(Job, held_id)
            assert (j.state, j.attempts, j.outputs) == ("done", 2, "written")
            assert int(j.finished_by.split(":")[1]) in node.pool.pids
            # the re-analysis re-creates the same outputs: still 3 per series
            assert s.scalar(select(func.count()).select_from(OutputObject)) == 12
    finally:
        node.stop()


def test_a_worker_process_wakes_the_outbox_sender(tmp_path):
    """Outputs written by a worker process reach the PACS at once, not at the sender's next poll
    (outbox.poll_s, 300 s here: the first poll would come 5 minutes after the start)."""
    from node.orthanc import LocalOrthanc
    from storage.models import Delivery
    from tests.helpers import require_tool

    require_tool("Orthanc")
    make_series(require(PHANTOM_5MM), tmp_path / "push", 2, slices=2)
    with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", 104)}, workdir=tmp_path / "orthanc") as pacs:
        settings = _settings(tmp_path, workers=1)
        settings = dataclasses.replace(
            settings, destinations=[dataclasses.replace(settings.destinations[0], port=pacs.dicom_port)],
            outbox=dataclasses.replace(settings.outbox, poll_s=300.0))
        node = Node(settings)
        node.start()
        try:
            assert node.pool is not None and node.worker is None
            push_files(node, sorted((tmp_path / "push").rglob("*.dcm")))

            def sent():
                with node.db.session() as s:
                    rows = s.execute(select(Delivery.state, Delivery.sent_at)).all()
                return len(rows) == 6 and all(r.state == "sent" for r in rows) and rows
            wait_until(sent, timeout=120, what="the outputs of 2 series sent without waiting for the poll")
            with node.db.session() as s:
                finished = s.scalars(select(Job.finished_at)).all()
                sent_at = s.scalars(select(Delivery.sent_at)).all()
            assert len(finished) == 2
            # each series' outputs left within seconds of its job ending (the poll would wait ~300 s)
            assert (max(sent_at) - max(finished)).total_seconds() < 30
            assert pacs.get("/statistics")["CountInstances"] == 6  # SR, map and report of each series
        finally:
            node.stop()


@pytest.fixture()
def queue(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'q.sqlite'}")
    db.create_all()
    with db.session() as s:
        s.add(Series(series_instance_uid="1.2.3.4", study_instance_uid="1.2.3", state="receiving", n_instances=1))
    complete_due_series(db, 0.0, ["basic"])
    yield db
    db.dispose()


def test_expired_lease_is_claimed_again_and_the_stale_worker_is_refused(queue):
    now = utcnow()
    job = claim_job(queue, "host:1:a", lease_s=10, now=now)
    assert job is not None
    assert claim_job(queue, "host:2:b", lease_s=10, now=now + timedelta(seconds=9)) is None  # lease still held
    assert renew_lease(queue, job, "host:1:a", lease_s=10)  # the heartbeat: now held until ~now + 10 s
    with queue.session() as s:
        lease = s.get(Job, job).lease_until
    assert claim_job(queue, "host:2:b", lease_s=10, now=lease - timedelta(seconds=1)) is None
    assert claim_job(queue, "host:2:b", lease_s=10, now=lease + timedelta(seconds=1)) == job
    # the first worker comes back: its lease is gone, it cannot renew or close the job
    assert not renew_lease(queue, job, "host:1:a")
    assert finish_job(queue, job, "host:1:a", state="done", error=None, outcome="done") is False
    assert finish_job(queue, job, "host:2:b", state="done", error=None, outcome="done") is True
    with queue.session() as s:
        j = s.get(Job, job)
        assert (j.state, j.attempts, j.finished_by, j.worker, j.lease_until) == ("done", 2, "host:2:b", None, None)


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason(queue):
    now = utcnow()
    for i in range(MAX_ATTEMPTS):
        assert claim_job(queue, f"host:{i}:x", lease_s=5, now=now + timedelta(seconds=10 * i)) is not None
    assert claim_job(queue, "host:9:x", lease_s=5, now=now + timedelta(seconds=10 * MAX_ATTEMPTS)) is None
    with queue.session() as s:
        j = s.scalars(select(Job)).one()
        assert (j.state, j.outcome, j.attempts) == ("failed", "failed", MAX_ATTEMPTS)
        assert j.error.startswith(f"analysis interrupted {MAX_ATTEMPTS} times")


def test_start_requeues_only_jobs_no_live_worker_holds(queue):
    now = utcnow()
    job = claim_job(queue, "here:4242:a", lease_s=60, now=now)
    # a live worker (here or on another machine) keeps its job across a receiving node's restart
    assert requeue_abandoned_jobs(queue, "here", now=now, alive=lambda pid: True) == 0
    assert requeue_abandoned_jobs(queue, "elsewhere", now=now, alive=lambda pid: False) == 0
    # its process gone (same host): back to the queue at once, without waiting for the lease
    assert requeue_abandoned_jobs(queue, "here", now=now, alive=lambda pid: pid != 4242) == 1
    with queue.session() as s:
        assert (s.get(Job, job).state, s.get(Job, job).worker) == ("pending", None)
    # a lease expired on another machine: back to the queue too
    claim_job(queue, "far:1:b", lease_s=60, now=now)
    assert requeue_abandoned_jobs(queue, "here", now=now + timedelta(seconds=61)) == 1


def test_qa_node_worker_refuses_what_it_cannot_run(tmp_path, capsys):
    from node.cli import main

    data = tmp_path / "var"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\ndata_dir = "{data}"\ndatabase = "sqlite:///{data}/db.sqlite"\n[analysis]\nworkers = 0\n')
    assert main(["--config", str(cfg), "worker"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "analysis.workers = 0: no worker to run; give --workers N (N >= 1)")
    assert main(["--config", str(cfg), "worker", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qa-node: data folder {data} not found (on another machine: is the shared folder mounted?)")
    data.mkdir()
    assert main(["--config", str(cfg), "worker", "--workers", "1"]) == 1  # no database: serve makes it
    assert capsys.readouterr().err.strip() == f"qa-node: no database at {data}/db.sqlite: start `qa-node serve` first"
    assert list(data.iterdir()) == []  # nothing created, no node lock taken


def test_serve_with_two_worker_processes_then_sigterm(tmp_path):
    """`qa-node serve` with analysis.workers = 2 as a real process: series pushed by storescu are
    analysed in its two worker processes, which SIGTERM stops with the node."""
    from tests.helpers import NodeProcess, require_tool, storescu, write_config

    require_tool("storescu")
    make_series(require(PHANTOM_5MM), tmp_path / "push", 2, slices=2)
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=0.5,
                       models='["basic"]', extra="workers = 2\n")
    node = NodeProcess(cfg, tmp_path)
    node.start()
    try:
        assert storescu(node.port, tmp_path / "push").returncode == 0
        db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")

        def finishers():
            with db.session() as s:
                rows = s.scalars(select(Job.finished_by).where(Job.state == "done")).all()
            return len(rows) == 2 and rows
        rows = wait_until(finishers, timeout=90, what="2 series analysed")
        db.dispose()
        pids = {int(r.split(":")[1]) for r in rows}
        assert node.proc.pid not in pids  # analysed in worker processes, not in serve itself
        assert node.stop() == 0
        for pid in pids:  # the worker processes ended with the node
            wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                       open(f"/proc/{pid}/stat").read().split()[2] == "Z", timeout=10, what=f"worker {pid} gone")
        assert "analysis worker process 2/2 started" in node.log()
        assert "Traceback" not in node.log()
    finally:
        node.stop()
