"""Queue figures of `qa-node status` and the backlog warning, on a queue whose contents are known."""

from __future__ import annotations

import io
import logging
from datetime import datetime, timedelta, timezone
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
from sqlalchemy import update

from node.cli import print_queue
from node.config import settings_from_dict
from node.workers import BacklogWatch, threads_per_worker
from storage.db import Database, utcnow
from storage.models import Job, Series
from storage.repo import queue_stats
from tests.unit.test_alerts_smtp import smtp_server  # noqa: F401 - the fixture (a real SMTP exchange)

NOW = datetime(2026, 3, 2, 12, 0, 0, tzinfo=timezone.utc)
W1, W2 = "qa1:101:aaaa", "qa2:202:bbbb"


def _db(tmp_path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'q.sqlite'}")
    db.create_all()
    return db


def _series(s, n: int) -> list[int]:
    series = [Series(series_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2.3", n_instances=3,
                     state="complete") for i in range(n)]
    s.add_all(series)
    s.flush()
    return [x.id for x in series]


def _fill(db: Database, now: datetime) -> None:
    """5 waiting jobs (the oldest 50 min old), 2 running (one per worker), finished in the last hour:
    W1 3 jobs of 60, 90 and 120 s, W2 1 failed job of 30 s; one older job (2 h ago, 600 s) is outside the hour."""
    with db.session() as s:
        sid = iter(_series(s, 12))

        def job(state, created_min, **kw):
            s.add(Job(series_id=next(sid), generation=1, state=state, models="basic",
                      created_at=now - timedelta(minutes=created_min), **kw))

        for m in (50, 40, 30, 20, 10):
            job("pending", m)
        job("running", 60, worker=W1, started_at=now - timedelta(seconds=20), lease_until=now + timedelta(seconds=100))
        job("running", 60, worker=W2, started_at=now - timedelta(seconds=5), lease_until=now + timedelta(seconds=100))
        for dur, end_min, who, state in ((60, 40, W1, "done"), (90, 30, W1, "done"), (120, 5, W1, "done"),
                                         (30, 15, W2, "failed"), (600, 120, W2, "done")):
            end = now - timedelta(minutes=end_min)
            job(state, end_min + 30, finished_by=who, started_at=end - timedelta(seconds=dur), finished_at=end,
                outcome="done" if state == "done" else "failed")


def test_queue_stats_figures(tmp_path):
    db = _db(tmp_path)
    _fill(db, NOW)
    q = queue_stats(db, NOW, configured_workers=1)
    assert q.depth == 5 and q.running == 2
    assert q.oldest_wait_s == pytest.approx(3000.0)
    by = {w.worker: (w.running, w.done_last_hour) for w in q.workers}
    assert by == {W1: (1, 3), W2: (1, 1)}  # the 2-hour-old job is not in the last hour
    assert q.n_recent == 4 and q.mean_job_s == pytest.approx((60 + 90 + 120 + 30) / 4)
    assert q.n_workers == 2  # seen in the last hour, not the configured 1
    assert q.eta_s == pytest.approx(5 * 75.0 / 2)
    db.dispose()


def test_queue_stats_quiet_hour_and_empty_queue(tmp_path):
    db = _db(tmp_path)
    _fill(db, NOW)
    later = NOW + timedelta(hours=3)  # nothing finished in the last hour: the mean is over the last 20 finished
    q = queue_stats(db, later, configured_workers=3)
    assert q.n_recent == 5 and q.mean_job_s == pytest.approx((60 + 90 + 120 + 30 + 600) / 5)
    # the two running jobs' leases ran out meanwhile: they wait to be claimed again, nobody runs them
    assert q.workers == [] and (q.depth, q.running) == (7, 0)
    assert q.oldest_wait_s == pytest.approx(3600.0 + 3 * 3600)  # theirs, created 60 min before NOW
    assert q.n_workers == 3 and q.eta_s == pytest.approx(7 * 180.0 / 3)  # nobody seen lately: the configured 3
    (tmp_path / "e").mkdir()
    empty = queue_stats(_db(tmp_path / "e"), NOW, configured_workers=2)
    assert (empty.depth, empty.oldest_wait_s, empty.eta_s, empty.mean_job_s, empty.n_workers) == (0, None, 0.0, None, 2)
    db.dispose()


def test_a_restarted_worker_is_not_counted_twice_in_the_eta(tmp_path):
    """One worker process restarted twice finished jobs under three names in the last hour; it runs
    one job now: the ETA divides by 1 (it divided by the 3 names seen)."""
    db = _db(tmp_path)
    with db.session() as s:
        sid = iter(_series(s, 12))
        for m in range(4):
            s.add(Job(series_id=next(sid), generation=1, state="pending", models="basic",
                      created_at=NOW - timedelta(minutes=m)))
        for i, name in enumerate(("qa1:201:a", "qa1:202:b", "qa1:203:c")):
            end = NOW - timedelta(minutes=50 - 20 * i)
            s.add(Job(series_id=next(sid), generation=1, state="done", models="basic", created_at=end,
                      finished_by=name, started_at=end - timedelta(seconds=100), finished_at=end, outcome="done"))
        s.add(Job(series_id=next(sid), generation=1, state="running", models="basic", created_at=NOW,
                  worker="qa1:203:c", started_at=NOW, lease_until=NOW + timedelta(seconds=60)))
    q = queue_stats(db, NOW, configured_workers=1)
    assert (q.depth, q.running, q.n_workers) == (4, 1, 1)
    assert q.eta_s == pytest.approx(4 * 100.0)
    assert [w.worker for w in q.workers] == ["qa1:201:a", "qa1:202:b", "qa1:203:c"]  # each one's last hour shown
    # between two jobs (nothing running) the worker that finished in the last 10 minutes counts
    with db.session() as s:
        s.execute(update(Job).where(Job.state == "running").values(state="done", finished_by="qa1:203:c",
                                                                   finished_at=NOW, outcome="done"))
    assert queue_stats(db, NOW + timedelta(minutes=1), configured_workers=5).n_workers == 1
    db.dispose()


def test_status_prints_the_queue_figures(tmp_path):
    db = _db(tmp_path)
    _fill(db, NOW)
    out = io.StringIO()
    print_queue(queue_stats(db, NOW, configured_workers=1).as_dict(), 1800.0, out=out)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("analysis queue: 5 waiting, 2 running; oldest waiting 50 min"
                        "  <- BACKLOG over analysis.backlog_warn_s (30 min)")
    assert lines[1] == "ETA for the waiting jobs: 3 min (mean job 75 s over the last 4; 2 worker(s))"
    assert lines[2:] == [f"  worker {W1}: 1 running, 3 finished in the last hour",
                         f"  worker {W2}: 1 running, 1 finished in the last hour"]
    db.dispose()


def test_qa_node_status_shows_the_queue(tmp_path, capsys):
    """The command itself, on a database filled relative to the real clock."""
    from node.cli import main

    data = tmp_path / "var"
    data.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\ndata_dir = "{data}"\ndatabase = "sqlite:///{data}/db.sqlite"\n'
                   '[analysis]\nbacklog_warn_s = 7200\nworkers = 2\n')
    db = Database(f"sqlite:///{data}/db.sqlite")
    db.create_all()
    _fill(db, utcnow())
    db.dispose()
    assert main(["--config", str(cfg), "status"]) == 0
    text = capsys.readouterr().out
    assert "analysis queue: 5 waiting, 2 running; oldest waiting 50 min\n" in text  # under the 2 h limit
    assert "ETA for the waiting jobs: 3 min (mean job 75 s over the last 4; 2 worker(s))" in text
    assert main(["--config", str(cfg), "status", "--json"]) == 0
    import json

    q = json.loads(capsys.readouterr().out)["queue"]
    assert (q["depth"], q["running"], round(q["mean_job_s"]), round(q["eta_s"], 1)) == (5, 2, 75, 187.5)
    assert round(q["oldest_wait_s"] / 60) == 50


def _settings(tmp_path, limit_s: float, smtp_port: int | None = None):
    raw = {"node": {"data_dir": str(tmp_path), "database": f"sqlite:///{tmp_path / 'q.sqlite'}",
                    "ae_title": "CTQA"},
           "analysis": {"backlog_warn_s": limit_s, "workers": 0}}
    if smtp_port is not None:
        raw["alerts"] = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_to": ["physics@example.org"]}
    return settings_from_dict(raw, "test.toml")


def test_backlog_warns_and_alerts_once_until_it_clears(tmp_path, caplog, smtp_server):  # noqa: F811
    db = _db(tmp_path)
    _fill(db, NOW)
    clock = {"now": NOW}
    watch = BacklogWatch(_settings(tmp_path, 1800.0, smtp_server.server_address[1]), db, clock=lambda: clock["now"])
    caplog.set_level(logging.INFO, logger="node.workers")
    assert watch() and watch() and watch()  # 50 min > 30 min, three checks
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["analysis backlog: 5 job(s) waiting, the oldest for 50 min (limit analysis.backlog_warn_s "
                        "= 30 min); 2 worker(s) active, ETA 3 min"]
    assert len(smtp_server.messages) == 1
    msg = message_from_bytes(smtp_server.messages[0][2], policy=default_policy)
    assert msg["Subject"] == "[CT QA] CTQA: analysis backlog, 5 job(s) waiting"
    body = msg.get_content()
    assert "5 job(s) waiting, the oldest for 50 min" in body
    assert "1.2.3" not in body  # no series (nor patient) identifiers: counts and ages only
    # the backlog clears: one INFO line; a new backlog later warns and alerts again, once
    with db.session() as s:
        for j in s.query(Job).filter(Job.state == "pending"):
            j.state = "done"
    caplog.clear()
    assert watch() is False and watch() is False
    assert [r.getMessage() for r in caplog.records] == ["analysis backlog cleared: 0 job(s) waiting"]
    with db.session() as s:
        s.add(Job(series_id=1, generation=2, state="pending", models="basic", created_at=NOW - timedelta(hours=1)))
    assert watch()
    assert len(smtp_server.messages) == 2
    db.dispose()


def test_an_unreachable_mail_server_is_one_warning_and_the_alert_is_sent_when_it_is_back(tmp_path, caplog):
    from reports.alerts import AlertDeliveryError

    db = _db(tmp_path)
    _fill(db, NOW)
    sent, up = [], {"ok": False}

    def send(alerts, msg):
        if not up["ok"]:
            raise AlertDeliveryError("alert e-mail not sent: 127.0.0.1:9 refused the connection")
        sent.append(msg)

    watch = BacklogWatch(_settings(tmp_path, 1800.0, 9), db, send=send, clock=lambda: NOW)
    caplog.set_level(logging.INFO, logger="node.workers")
    assert watch() and watch() and watch()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and warnings[0].startswith("analysis backlog: 5 job(s) waiting")
    assert warnings[1] == ("alert e-mail not sent: 127.0.0.1:9 refused the connection; the backlog alert is "
                           "retried at every check")
    assert sent == []
    up["ok"] = True
    caplog.clear()
    assert watch() and watch()
    assert len(sent) == 1  # sent once when the server is back, not again
    assert [r.getMessage() for r in caplog.records] == ["backlog alert e-mailed to 1 recipient(s)"]
    db.dispose()


def test_backlog_under_the_limit_is_quiet(tmp_path, caplog):
    db = _db(tmp_path)
    _fill(db, NOW)
    watch = BacklogWatch(_settings(tmp_path, 3600.0), db, clock=lambda: NOW)
    caplog.set_level(logging.INFO, logger="node.workers")
    assert watch() is False
    assert caplog.records == []
    db.dispose()


def test_torch_threads_split_between_workers():
    assert threads_per_worker(8, 3) == 2
    assert threads_per_worker(0, 2, cores=16) == 8
    assert threads_per_worker(2, 4) == 1  # at least one each
    assert threads_per_worker(0, 1, cores=2) == 2


@pytest.mark.parametrize("key, value, message", [
    ("workers", -1, "key 'analysis.workers' must be >= 0 (0 = this node only receives and sends), got -1"),
    ("lease_s", 1, "key 'analysis.lease_s' must be >= 3 seconds, got 1.0"),
    ("backlog_warn_s", -5, "key 'analysis.backlog_warn_s' must be >= 0 (0 = no backlog warning), got -5.0"),
])
def test_worker_keys_are_validated(key, value, message):
    from node.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        settings_from_dict({"node": {}, "analysis": {key: value}}, "c.toml")
    assert str(exc.value) == f"c.toml: {message}"


def test_worker_keys_defaults_and_zero_workers():
    a = settings_from_dict({"node": {}}, "c.toml").analysis
    assert (a.workers, a.lease_s, a.backlog_warn_s) == (1, 120.0, 3600.0)
    assert settings_from_dict({"node": {}, "analysis": {"workers": 0}}, "c.toml").analysis.workers == 0
