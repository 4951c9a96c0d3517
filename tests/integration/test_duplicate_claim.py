"""The duplicate-reconstruction check of series selection across concurrent workers: two workers
(each with its own database connection, as worker processes or machines have) analyse two copies of
the same reconstruction of one study at the same moment; exactly one runs the models, the other is
skipped naming it (`qa-node status`'s selection and reason). When the winner's analysis fails its
claim is released and the skipped copy is queued again and analysed. On SQLite and on PostgreSQL
(the private cluster of ``test_trends_postgres``; skipped without it).

The two checks are made simultaneous, and both before either job closes, by a barrier around each
worker's duplicate check: the race that a check reading only finished jobs loses every time."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from node.cli import status_dict
from node.config import settings_from_dict
from node.service import Node
from node.worker import AnalysisWorker
from storage.db import Database, utcnow
from storage.models import AnalysisRun, Job, ReconstructionClaim, Series
from storage.repo import (DUPLICATE_RULE, MAX_ATTEMPTS, claim_job, claim_reconstruction, complete_due_series,
                          finish_job)
from tests.helpers import PHANTOM_5MM, require
from tests.integration.test_node_pipeline import push_files
from tests.integration.test_selection_node import copy_series

MODELS = ["basic", "classical"]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'db.sqlite'}"
    return request.getfixturevalue("pg_cluster").fresh_database(
        f"ctqa_dup_{request.node.name.split('[')[0][-30:]}".lower())


@pytest.fixture
def node(tmp_path, db_url):
    settings = settings_from_dict({
        "node": {"data_dir": str(tmp_path / "var"), "database": db_url, "port": 0},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "analysis": {"device": "cpu", "models": MODELS},
    }, "test.toml")
    n = Node(settings)
    n.prepare()
    yield n
    n.db.dispose()


def _two_copies(node, tmp_path) -> tuple[str, str]:
    """Two copies of the same 3 slices (one study, new Series UIDs), stored and completed: 2 jobs."""
    thick = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:3]
    uids = []
    for name in ("a", "b"):
        uid, files = copy_series(thick, tmp_path / name)
        push_files(node, files)
        uids.append(uid)
    assert len(complete_due_series(node.db, 0.0, MODELS)) == 2
    return uids[0], uids[1]


def _workers(node, n: int = 2) -> list[AnalysisWorker]:
    """Workers with a database connection (engine) each; results as a worker without a results stage."""
    return [AnalysisWorker(node.settings, Database(node.settings.node.database), node.store) for _ in range(n)]


def _hold_at_check(worker: AnalysisWorker, before: threading.Barrier, after: threading.Barrier | None = None,
                   seen: list | None = None) -> None:
    real = worker._duplicate_of

    def checked(job_id, series_id, facts, claim=True):
        before.wait(30)
        dup = real(job_id, series_id, facts, claim)
        if seen is not None:
            seen.append((series_id, dup))
        if after is not None:
            after.wait(30)
        return dup
    worker._duplicate_of = checked


def _run_together(workers: list[AnalysisWorker], job_ids: list[int]) -> None:
    errors = []

    def run(w, j):
        try:
            w.process(j)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(w, j)) for w, j in zip(workers, job_ids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def _jobs(node) -> dict[str, list[Job]]:
    with node.db.session() as s:
        rows = s.execute(select(Series.series_instance_uid, Job).join(Job, Job.series_id == Series.id)
                         .order_by(Job.id)).all()
        for _, job in rows:
            s.expunge(job)
    out: dict[str, list[Job]] = {}
    for uid, job in rows:
        out.setdefault(uid, []).append(job)
    return out


def _runs(node, job_id: int) -> list[str]:
    with node.db.session() as s:
        return sorted(s.scalars(select(AnalysisRun.model).where(AnalysisRun.job_id == job_id)))


def _claims(node) -> list[tuple[str, bool]]:
    with node.db.session() as s:
        return [tuple(r) for r in s.execute(select(Series.series_instance_uid, ReconstructionClaim.analysed)
                                            .join(Series, Series.id == ReconstructionClaim.series_id))]


def test_two_workers_two_duplicates_at_once_exactly_one_analyses(node, tmp_path):
    uid_a, uid_b = _two_copies(node, tmp_path)
    workers = _workers(node)
    before, after = threading.Barrier(2), threading.Barrier(2)
    for w in workers:
        _hold_at_check(w, before, after)
    job_ids = [claim_job(w.db, w.worker_id) for w in workers]
    assert None not in job_ids and len(set(job_ids)) == 2
    _run_together(workers, job_ids)

    jobs = _jobs(node)
    outcomes = {uid: [j.outcome for j in jobs[uid]] for uid in (uid_a, uid_b)}
    assert sorted(outcomes.values()) == [["done"], ["skipped"]], outcomes
    winner = next(uid for uid, o in outcomes.items() if o == ["done"])
    loser = uid_b if winner == uid_a else uid_a
    assert _runs(node, jobs[winner][0].id) == MODELS
    assert _runs(node, jobs[loser][0].id) == []
    assert _claims(node) == [(winner, True)]
    # what `qa-node status --json` says: the skipped copy names the series it duplicates
    rows = {r["series_instance_uid"]: r for r in status_dict(node.db)["series"]}
    assert {d["model"]: (d["selected"], d["rule"]) for d in rows[loser]["selection"]} == {
        m: (False, DUPLICATE_RULE) for m in MODELS}
    assert {d["model"]: d["selected"] for d in rows[winner]["selection"]} == {m: True for m in MODELS}
    assert f"as series {winner} of this study, already analysed" in rows[loser]["job"]["error"]
    assert rows[loser]["job"]["outcome"] == "skipped" and rows[winner]["job"]["outcome"] == "done"

    # a re-run of the winner is not a duplicate of itself; a re-run of the copy still is
    with node.db.session() as s:
        sid = {u: s.scalar(select(Series.id).where(Series.series_instance_uid == u)) for u in (uid_a, uid_b)}
        for u in (winner, loser):
            s.add(Job(series_id=sid[u], generation=1, state="pending", models=",".join(MODELS)))
    w = _workers(node, 1)[0]
    for _ in range(2):
        w.process(claim_job(w.db, w.worker_id))
    jobs = _jobs(node)
    assert [j.outcome for j in jobs[winner]] == ["done", "done"]
    assert [j.outcome for j in jobs[loser]] == ["skipped", "skipped"]
    assert _runs(node, jobs[winner][1].id) == MODELS
    assert _claims(node) == [(winner, True)]
    for w in workers:
        w.db.dispose()


def test_winner_fails_claim_released_the_duplicate_is_analysed_on_its_rerun(node, tmp_path, monkeypatch):
    uid_a, uid_b = _two_copies(node, tmp_path)
    workers = _workers(node)
    before = threading.Barrier(2)
    seen: list = []
    for w in workers:
        _hold_at_check(w, before, None, seen)
    # the series that wins the claim fails in its model run, after the other series was checked
    checked_both = threading.Event()
    import analysis.pipeline as pipeline

    real_run_model = pipeline.run_model

    def failing_for_winner(name, volume, ctx):
        checked_both.wait(30)
        winner_ids = [sid for sid, dup in seen if dup is None]
        with node.db.session() as s:
            winner_uid = s.scalar(select(Series.series_instance_uid).where(Series.id == winner_ids[0]))
        if str(volume.header.SeriesInstanceUID) == winner_uid:
            raise RuntimeError("model blew up")
        return real_run_model(name, volume, ctx)
    monkeypatch.setattr(pipeline, "run_model", failing_for_winner)

    real_claim = [w._duplicate_of for w in workers]

    def after_check(i):
        def checked(*a, **k):
            dup = real_claim[i](*a, **k)
            if len(seen) == 2:
                checked_both.set()
            return dup
        return checked
    for i, w in enumerate(workers):
        w._duplicate_of = after_check(i)

    job_ids = [claim_job(w.db, w.worker_id) for w in workers]
    _run_together(workers, job_ids)
    assert sorted(dup is None for _, dup in seen) == [False, True]
    jobs = _jobs(node)
    failed = next(u for u in (uid_a, uid_b) if jobs[u][0].outcome == "failed")
    other = uid_b if failed == uid_a else uid_a
    assert jobs[failed][0].state == "failed" and "model blew up" in jobs[failed][0].error
    assert jobs[other][0].outcome == "skipped" and f"as series {failed} of this study" in jobs[other][0].error
    # the claim is released and the skipped copy queued again
    assert _claims(node) == []
    assert [j.state for j in jobs[other]] == ["done", "pending"]

    monkeypatch.setattr(pipeline, "run_model", real_run_model)
    w = _workers(node, 1)[0]
    job_id = claim_job(w.db, w.worker_id)
    assert job_id == jobs[other][1].id
    w.process(job_id)
    jobs = _jobs(node)
    assert jobs[other][1].outcome == "done" and _runs(node, job_id) == MODELS
    assert _claims(node) == [(other, True)]
    assert claim_job(w.db, w.worker_id) is None  # nothing else queued
    for x in (*workers, w):
        x.db.dispose()


def _series_and_job(db: Database, study: str, state: str = "running", worker: str | None = "w") -> tuple[int, int]:
    from pydicom.uid import generate_uid

    with db.session() as s:
        series = Series(series_instance_uid=generate_uid(), study_instance_uid=study, state="complete")
        s.add(series)
        s.flush()
        job = Job(series_id=series.id, generation=1, state=state, models="basic", worker=worker,
                  lease_until=utcnow() + timedelta(seconds=60) if state == "running" else None)
        s.add(job)
        s.flush()
        return series.id, job.id


def _uid(db: Database, series_id: int) -> str:
    with db.session() as s:
        return s.get(Series, series_id).series_instance_uid


def test_claim_rules_on_the_repository(node):
    """Held while the holder's job is pending or running, kept once it analysed; taken over when its
    job failed without settling (e.g. an older version closed it); released when the job exhausted
    its lease retries; a series analysed before the claims table is found by its selection record."""
    db, key = node.db, "ORIGINAL\\PRIMARY\\AXIAL|B30F|5.00|0.98|0.98|512x512|3|0.00|10.00"
    a, ja = _series_and_job(db, "1.2.3")
    b, jb = _series_and_job(db, "1.2.3")
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key, series_id=a, job_id=ja) is None
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key, series_id=b, job_id=jb) == _uid(db, a)
    # another study, another key: independent
    assert claim_reconstruction(db, study_instance_uid="9.9", reconstruction=key, series_id=b, job_id=jb) is None
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key + "x", series_id=b,
                                job_id=jb) is None
    # the holder's job stops without closing (killed): pending again, still held
    with db.session() as s:
        s.get(Job, ja).state = "pending"
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key, series_id=b, job_id=jb) == _uid(db, a)
    # its job failed without releasing: stale, taken over by the next claimer
    with db.session() as s:
        s.get(Job, ja).state = "failed"
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key, series_id=b, job_id=jb) is None
    assert claim_reconstruction(db, study_instance_uid="1.2.3", reconstruction=key, series_id=a, job_id=ja) == _uid(db, b)
    # read-only (a series that selection skips anyway) takes nothing
    c, jc = _series_and_job(db, "1.2.3")
    assert claim_reconstruction(db, study_instance_uid="1.2.4", reconstruction=key, series_id=c, job_id=jc,
                                take=False) is None
    assert claim_reconstruction(db, study_instance_uid="1.2.4", reconstruction=key, series_id=b, job_id=jb) is None

    # a job whose worker is lost MAX_ATTEMPTS times is failed by claim_job: its claim is released
    d, jd = _series_and_job(db, "5.5")
    assert claim_reconstruction(db, study_instance_uid="5.5", reconstruction=key, series_id=d, job_id=jd) is None
    with db.session() as s:
        s.execute(Job.__table__.update().values(state="done", outcome="skipped").where(Job.state != "done"))
        j = s.get(Job, jd)
        j.state, j.attempts, j.lease_until = "running", MAX_ATTEMPTS, utcnow() - timedelta(seconds=1)
    assert claim_job(db, "other") is None
    with db.session() as s:
        assert s.get(Job, jd).state == "failed"
        assert s.scalar(select(ReconstructionClaim.id).where(ReconstructionClaim.job_id == jd)) is None

    # a database from before the claims table: a series analysed then is found by its jobs' records
    e, je = _series_and_job(db, "7.7", worker="w7")
    f, jf = _series_and_job(db, "7.7")
    import json

    assert finish_job(db, je, "w7", state="done", error=None, outcome="done",
                      selection=json.dumps({"reconstruction": key, "decisions": []}))
    with db.session() as s:
        s.execute(ReconstructionClaim.__table__.delete().where(ReconstructionClaim.study_instance_uid == "7.7"))
    assert claim_reconstruction(db, study_instance_uid="7.7", reconstruction=key, series_id=f, job_id=jf) == _uid(db, e)
    assert claim_reconstruction(db, study_instance_uid="7.7", reconstruction=key, series_id=e, job_id=je) is None


def test_holder_fails_before_its_duplicate_closes_the_duplicate_is_queued_again(node):
    """The other order of the winner-fails race: the holder's job fails (its claim released) while
    the duplicate's job is still running, so the release finds nothing skipped to queue again; the
    duplicate's own closing sees the claim gone and queues itself. A duplicate closing while the
    claim is still held is not queued again."""
    import json

    db, key = node.db, "ORIGINAL\\PRIMARY\\AXIAL|B30F|1.00|0.70|0.70|512x512|300|0.00|300.00"
    skipped = json.dumps({"reconstruction": key, "decisions": [{"model": "basic", "selected": False,
                                                                "rule": DUPLICATE_RULE}]})
    a, ja = _series_and_job(db, "3.3", worker="wa")
    b, jb = _series_and_job(db, "3.3", worker="wb")
    assert claim_reconstruction(db, study_instance_uid="3.3", reconstruction=key, series_id=a, job_id=ja) is None
    assert claim_reconstruction(db, study_instance_uid="3.3", reconstruction=key, series_id=b, job_id=jb) == _uid(db, a)
    assert finish_job(db, ja, "wa", state="failed", error="model blew up", outcome="failed")
    with db.session() as s:
        assert s.scalar(select(ReconstructionClaim.id).where(ReconstructionClaim.study_instance_uid == "3.3")) is None
        assert s.scalars(select(Job.state).where(Job.series_id == b)).all() == ["running"]  # nothing queued yet
    assert finish_job(db, jb, "wb", state="done", error="skipped as a duplicate", outcome="skipped", selection=skipped)
    with db.session() as s:
        jobs_b = s.execute(select(Job.state, Job.outcome, Job.models).where(Job.series_id == b).order_by(Job.id)).all()
    assert [tuple(j) for j in jobs_b] == [("done", "skipped", "basic"), ("pending", None, "basic")]

    # held by a live holder: the duplicate closes skipped and stays so
    c, jc = _series_and_job(db, "4.4", worker="wc")
    d, jd = _series_and_job(db, "4.4", worker="wd")
    assert claim_reconstruction(db, study_instance_uid="4.4", reconstruction=key, series_id=c, job_id=jc) is None
    assert claim_reconstruction(db, study_instance_uid="4.4", reconstruction=key, series_id=d, job_id=jd) == _uid(db, c)
    assert finish_job(db, jd, "wd", state="done", error="skipped as a duplicate", outcome="skipped", selection=skipped)
    with db.session() as s:
        assert s.scalars(select(Job.state).where(Job.series_id == d)).all() == ["done"]
