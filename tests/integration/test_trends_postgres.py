"""The trend tables, evaluation and report on PostgreSQL give the same results as on SQLite.

Uses the session's private PostgreSQL cluster (``pg_cluster`` in tests/integration/conftest.py: initdb
in a temporary folder, Unix socket only, trust auth), which skips with the reason when the server
binaries or psycopg are not installed (apt-get install postgresql; pip install 'psycopg[binary]').
Other modules import ``pg_url`` from here: a database of their own in that cluster.
"""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from reports.qa_report import build_report, report_dict
from reports.trends import evaluate_series, reevaluate_scanner
from storage.db import Database
from storage.trends import add_service_event, alerts_for, record_series
from tests.unit.trend_history import SETTINGS, START, make_history

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")


@pytest.fixture(scope="module")
def pg_url(pg_cluster, request):
    """A database of its own for each test module that asks, in the session's one private PostgreSQL
    cluster (tests/integration/conftest.py: initdb and a server start cost seconds each)."""
    name = "ctqa_" + re.sub(r"[^a-z0-9_]", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    return pg_cluster.fresh_database(name)


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
