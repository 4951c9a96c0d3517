"""The trend tables, evaluation and report on PostgreSQL give the same results as on SQLite.

Starts a private PostgreSQL cluster (initdb in a temporary folder, Unix socket only, trust auth) and
skips with the reason when the server binaries or psycopg are not installed
(apt-get install postgresql; pip install 'psycopg[binary]').
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest

from reports.qa_report import build_report, report_dict
from reports.trends import evaluate_series, reevaluate_scanner
from storage.db import Database
from storage.trends import add_service_event, alerts_for, record_series
from tests.unit.trend_history import SETTINGS, START, make_history

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


INITDB, POSTGRES = _pg_bin("initdb"), _pg_bin("postgres")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    if INITDB is None or POSTGRES is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not installed")
    # not under pytest's tmp folder: that is private to root and the server runs as another user
    base = Path(tempfile.mkdtemp(prefix="ctqa-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        prefix = [runuser, "-u", "postgres", "--"]
    init = subprocess.run(prefix + [INITDB, "-D", str(data), "-U", "ctqa", "--auth=trust", "-E", "UTF8"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr[-2000:]}")
    port = _free_port()
    log = open(base / "pg.log", "wb")
    proc = subprocess.Popen(prefix + [POSTGRES, "-D", str(data), "-k", str(sock), "-p", str(port), "-c",
                                      "listen_addresses=", "-c", "fsync=off"], stdout=log, stderr=subprocess.STDOUT)
    url = f"postgresql+psycopg://ctqa@/postgres?host={sock}&port={port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(host=str(sock), port=port, user="ctqa", dbname="postgres").close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("PostgreSQL did not start: " + (base / "pg.log").read_text()[-2000:])
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(base, ignore_errors=True)


def _fill_and_report(db: Database) -> tuple[list, list, dict]:
    hist = make_history(41, days=35, step=(2, 28, 1.3))
    with db.session() as s:
        for h in hist[:-40]:
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="25-30", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
        add_service_event(s, scanner="CT1", occurred_at=START + timedelta(days=20), text="tube replaced")
        reevaluate_scanner(s, SETTINGS, "CT1")
    evaluations = []
    for h in hist[-40:]:  # the incremental path, one session per series as the node does
        with db.session() as s:
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="25-30", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
            evaluations += [(h.uid, e.metric, e.status, e.alert_rules, round(e.day_value, 9))
                            for e in evaluate_series(s, SETTINGS, "CT1", h.uid)]
    with db.session() as s:
        alerts = [(a.day, a.protocol, a.metric, a.rule, round(a.value, 9)) for a in alerts_for(s, "CT1")]
        doc = report_dict(build_report(s, SETTINGS, "CT1", START.date(), (START + timedelta(days=34)).date(),
                                       now=START))
    return evaluations, alerts, doc


def test_postgres_matches_sqlite(pg_url, tmp_path):
    pg = Database(pg_url)
    pg.create_all()
    lite = Database("sqlite:///" + str(tmp_path / "lite.sqlite"))
    lite.create_all()
    try:
        ev_pg, al_pg, doc_pg = _fill_and_report(pg)
        ev_lite, al_lite, doc_lite = _fill_and_report(lite)
    finally:
        pg.dispose()
        lite.dispose()
    assert al_pg, "the +30 % step should raise alerts"
    assert al_pg == al_lite
    assert ev_pg == ev_lite
    assert doc_pg["rows"] == doc_lite["rows"]
    assert doc_pg["charts"] == doc_lite["charts"]
    assert doc_pg["service_events"] == doc_lite["service_events"]
    assert doc_pg["rows"][0]["acquired_at"].endswith("+00:00")


def test_concurrent_alert_insert_updates_instead_of_failing(pg_url):
    """Worker B read no alert for a chart-day, worker A inserted and committed it meanwhile: B updates
    A's row inside a savepoint; B's other work in the same transaction survives."""
    from datetime import date

    from sqlalchemy import func, select

    from reports.trends import ChartKey, DayPoint, _store_day_alerts
    from storage.trends import Alert

    db = Database(pg_url)
    db.create_all()
    key = ChartKey("CT7", "P | B30f | 120 kV | 5 mm", "all", "global_noise_hu")

    def point(value: float) -> DayPoint:
        return DayPoint(day=date(2026, 5, 4), first_day=date(2026, 5, 4), value=value, n_series=22, epoch=0,
                        in_baseline=False, centre=10.0, sigma=0.3, lower=9.1, upper=10.9, tolerance_low=9.0,
                        tolerance_high=11.0, action_low=8.0, action_high=12.0, rules=("beyond_limits",),
                        alert_rules=("beyond_limits",), status="tolerance", last_series_uid="1.2.3")

    try:
        with db.session() as a:
            _store_day_alerts(a, key, point(11.5), {}, "1.2.3")
        with db.session() as b:
            add_service_event(b, scanner="CT7", occurred_at=START, text="other work in the same transaction")
            changed = _store_day_alerts(b, key, point(11.8), {}, "1.2.4")  # stale read: no existing alerts
            assert len(changed) == 1 and changed[0].value == 11.8
        with db.session() as s:
            rows = list(s.scalars(select(Alert).where(Alert.scanner == "CT7")))
            assert [(r.value, r.series_instance_uid) for r in rows] == [(11.8, "1.2.4")]
            from storage.trends import ServiceEvent

            assert s.scalar(select(func.count()).select_from(ServiceEvent).where(ServiceEvent.scanner == "CT7")) == 1
    finally:
        db.dispose()
