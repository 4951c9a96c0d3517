"""Trend storage, robust baselines, SPC rules, alerts and service events on synthetic histories with
known truth (tests/unit/trend_history.py)."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import func, select

from reports.trend_settings import MetricLimits, TrendSettings
from reports.trends import (
    ALL_BANDS,
    STATUS_BASELINE,
    ChartKey,
    Sample,
    analyse_chart,
    analyse_scanner,
    baseline_stats,
    evaluate_series,
    reevaluate_scanner,
    spc_rules,
)
from storage.db import Database
from storage.trends import (
    Alert,
    TrendPoint,
    add_service_event,
    alerts_for,
    history,
    known_scanners,
    protocol_key,
    record_series,
    size_band,
)
from tests.unit.trend_history import KEYS, SETTINGS, START, make_history


@pytest.fixture()
def db(tmp_path):
    d = Database("sqlite:///" + str(tmp_path / "trends.sqlite"))
    d.create_all()
    yield d
    d.dispose()


def _charts(hist, scanner="CT1"):
    g = defaultdict(list)
    for s in hist:
        for m, v in s.metrics.items():
            g[ChartKey(scanner, s.protocol, ALL_BANDS, m)].append(Sample(s.acquired_at, v, s.uid))
    return g


def _record(session, series, scanner="CT1"):
    for s in series:
        record_series(
            session,
            scanner=scanner,
            protocol=s.protocol,
            size_band="25-30",
            series_instance_uid=s.uid,
            acquired_at=s.acquired_at,
            metrics=s.metrics,
        )


# ------------------------------------------------------------------------------------------ keys


def test_size_band_edges():
    assert size_band(None) == "unknown"
    assert size_band(float("nan")) == "unknown"
    assert size_band(0) == "unknown"
    assert size_band(12.0) == "<20"
    assert size_band(19.999) == "<20"
    assert size_band(20.0) == "20-25"
    assert size_band(27.3) == "25-30"
    assert size_band(30.0) == "30-35"
    assert size_band(35.0) == ">35"
    assert size_band(52.0) == ">35"
    with pytest.raises(ValueError, match="wed_cm"):
        size_band(280.0)  # millimetres by mistake


def test_protocol_key_normalises():
    a = protocol_key("  Abdomen_routine  ", "ignored", "B30f", 120.0, 5.0)
    b = protocol_key("ABDOMEN   ROUTINE", None, "B30f", 120, 5)
    assert a == b == "ABDOMEN ROUTINE | B30f | 120 kV | 5 mm"
    assert protocol_key(None, "Thorax 1.0", ["Br40d", "3"], 100, 1.0) == "THORAX 1.0 | Br40d 3 | 100 kV | 1 mm"
    assert protocol_key("", "", None, None, None) == "UNNAMED | ? | ? kV | ? mm"
    # a different kernel or thickness is a different protocol
    assert protocol_key("Head", None, "H30s", 120, 5) != protocol_key("Head", None, "H60s", 120, 5)
    assert protocol_key("Head", None, "H30s", 120, 5) != protocol_key("Head", None, "H30s", 120, 3)
    assert len(protocol_key("X" * 500, None, "B30f", 120, 5)) <= 200
    # a reformat of the same protocol trends apart; a long name is shortened, the marker kept
    assert protocol_key("Head", None, "H30s", 120, 5, reformat="MIP") == "HEAD [MIP] | H30s | 120 kV | 5 mm"
    assert protocol_key("Head", None, "H30s", 120, 5, reformat="DERIVED SECONDARY") == \
        "HEAD [DERIVED SECONDARY] | H30s | 120 kV | 5 mm"
    assert protocol_key("Head", None, "H30s", 120, 5, reformat=None) == "HEAD | H30s | 120 kV | 5 mm"
    long = protocol_key("X" * 500, None, "B30f", 120, 5, reformat="MPR")
    assert len(long) == 200 and long.endswith("X [MPR] | B30f | 120 kV | 5 mm")


# ------------------------------------------------------------------------------------------ storage


def test_record_series_replaces_rows_on_reanalysis(db):
    t = datetime(2026, 3, 2, 10, tzinfo=timezone.utc)
    with db.session() as s:
        n = record_series(s, scanner="CT1", protocol=KEYS[0], size_band="<20", series_instance_uid="1.2.3",
                          acquired_at=t, metrics={"global_noise_hu": 5.0, "ssde_mgy": 40.0, "n2q_mean_quality": None})
        assert n == 2
    with db.session() as s:
        record_series(s, scanner="CT1", protocol=KEYS[0], size_band="<20", series_instance_uid="1.2.3",
                      acquired_at=t, metrics={"global_noise_hu": 6.0, "n2q_mean_quality": 0.9})
    with db.session() as s:
        rows = {r.metric: r.value for r in s.scalars(select(TrendPoint))}
        assert rows == {"global_noise_hu": 6.0, "n2q_mean_quality": 0.9}
        got = history(s, "CT1", metric="global_noise_hu")
        assert len(got) == 1 and got[0].acquired_at == t  # comes back UTC-aware
        assert known_scanners(s) == ["CT1"]
    with db.session() as s, pytest.raises(ValueError, match="acquired_at"):
        record_series(s, scanner="CT1", protocol=KEYS[0], size_band="<20", series_instance_uid="1.2.4",
                      acquired_at=datetime(2026, 3, 2), metrics={"x": 1.0})
    with db.session() as s, pytest.raises(ValueError, match="size_band"):
        record_series(s, scanner="CT1", protocol=KEYS[0], size_band="huge", series_instance_uid="1.2.4",
                      acquired_at=t, metrics={"x": 1.0})


def test_named_indexes_exist(db):
    from sqlalchemy import inspect

    names = {ix["name"] for ix in inspect(db.engine).get_indexes("trend_points")}
    assert {"ix_trend_scanner_metric_time", "ix_trend_scanner_protocol_metric_time", "ix_trend_scanner_time"} <= names
    # the report's query uses the index (SQLite query plan)
    with db.engine.connect() as c:
        plan = " ".join(
            str(r[-1])
            for r in c.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT value FROM trend_points WHERE scanner='CT1' AND protocol='P' "
                "AND metric='m' AND acquired_at < '2027-01-01' ORDER BY acquired_at"
            )
        )
    assert "ix_trend_scanner_protocol_metric_time" in plan


# ------------------------------------------------------------------------------------------ statistics


def test_baseline_stats_recover_known_spreads():
    rng = np.random.default_rng(3)
    centre, between, within = 10.0, 0.2, 1.0
    days = []
    for _ in range(400):
        shift = rng.normal(0, between)
        days.append(list(centre + shift + rng.normal(0, within, size=int(rng.integers(5, 30)))))
    st = baseline_stats(days)
    assert st.centre == pytest.approx(centre, abs=0.1)
    assert st.sigma_within == pytest.approx(within, rel=0.06)
    assert st.sigma_between == pytest.approx(between, rel=0.35)
    # the sigma of a day's median shrinks with n
    assert st.day_sigma(25) < st.day_sigma(5) < st.day_sigma(1)


def test_baseline_stats_ignore_an_outlier_patient():
    rng = np.random.default_rng(4)
    days = [list(10 + rng.normal(0, 1.0, 20)) for _ in range(30)]
    days[3][0] = 1000.0  # a gross outlier series
    st = baseline_stats(days)
    assert st.centre == pytest.approx(10.0, abs=0.15)
    assert st.sigma_within == pytest.approx(1.0, rel=0.1)


def test_spc_rules_on_known_sequences():
    s = TrendSettings()
    assert spc_rules([0.0, 0.1, 3.5], 0.0, 1.0, s) == ("beyond_limits",)
    assert spc_rules([0.0, 0.1, -3.01], 0.0, 1.0, s) == ("beyond_limits",)
    assert spc_rules([0.0, 0.1, 2.99], 0.0, 1.0, s) == ()
    run = [-0.5, 0.2, 0.3, 0.1, 0.9, 0.2, 0.4, 0.6, 0.3]  # last 8 above the centre, not monotonic
    assert spc_rules(run, 0.0, 1.0, s) == ("run",)
    assert spc_rules(run[:-1], 0.0, 1.0, s) == ()  # only 7
    trend = [0.5, -0.9, -0.5, -0.3, 0.0, 0.2, 0.8]  # 6 strictly increasing, crossing the centre
    assert spc_rules(trend, 0.0, 1.0, s) == ("trend",)
    assert spc_rules(trend, 0.0, 1.0, s, direction="decrease") == ()
    assert spc_rules([0.0, -3.5], 0.0, 1.0, s, direction="increase") == ()
    off = TrendSettings(rules=("run",))
    assert spc_rules([0.0, 5.0], 0.0, 1.0, off) == ()


# ------------------------------------------------------------------------------------------ histories


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_stable_history_raises_no_alert_pure(seed):
    charts = _charts(make_history(seed))
    assert len(charts) == 12  # 4 protocols x 3 metrics
    alerts = [
        (k.protocol, k.metric, p.day, p.alert_rules)
        for k, ss in charts.items()
        for p in analyse_chart(k, ss, [], SETTINGS).points
        if p.alert_rules
    ]
    assert alerts == []


def test_stable_history_in_database_raises_no_alert(db):
    with db.session() as s:
        _record(s, make_history(0))
    with db.session() as s:
        assert reevaluate_scanner(s, SETTINGS, "CT1") == 0
        assert s.scalar(select(func.count()).select_from(Alert)) == 0
        charts = analyse_scanner(s, SETTINGS, "CT1")
        assert len(charts) == 12
        for c in charts:
            b = c.baselines[0]
            assert b.complete and b.n_series >= SETTINGS.baseline_n and b.n_days >= SETTINGS.baseline_min_days
            assert c.points[-1].status in ("ok", "out_of_control", "pending")


def test_noise_step_flagged_within_three_days(db, caplog):
    """+15 % global noise on the chest protocol from day 60 (incremental path, as the node runs it)."""
    hist = make_history(11, step=(2, 60, 1.15))
    before = [h for h in hist if h.day_index < 60]
    after = [h for h in hist if 60 <= h.day_index <= 63]
    with db.session() as s:
        _record(s, before)
        assert reevaluate_scanner(s, SETTINGS, "CT1") == 0
    first_alert_day = None
    other = []
    with caplog.at_level(logging.WARNING, logger="reports.trends"):
        for h in after:
            with db.session() as s:
                _record(s, [h])
                evs = evaluate_series(s, SETTINGS, "CT1", h.uid)
            assert {e.metric for e in evs} == set(h.metrics)
            for e in evs:
                if e.alert_rules and (e.protocol, e.metric) == (KEYS[2], "global_noise_hu"):
                    first_alert_day = first_alert_day or e.day
                    assert not e.within and e.status in ("tolerance", "action")
                    assert e.day_value > e.tolerance_high
                elif e.alert_rules:
                    other.append((e.protocol, e.metric))
    step_day = (START + timedelta(days=60)).date()
    assert first_alert_day is not None, "the +15 % noise step was not flagged"
    assert (first_alert_day - step_day).days <= 3
    assert other == []
    with db.session() as s:
        stored = alerts_for(s, "CT1")
        assert stored and {(a.protocol, a.metric) for a in stored} == {(KEYS[2], "global_noise_hu")}
        a = stored[0]
        assert a.rule in ("beyond_limits", "run", "trend", "action_level") and not a.emailed
        assert a.value > a.upper and a.centre == pytest.approx(14.0, rel=0.05)
        n_before = len(stored)
        # evaluating the same series again does not duplicate alerts
        evaluate_series(s, SETTINGS, "CT1", a.series_instance_uid)
        assert len(alerts_for(s, "CT1")) == n_before
    assert any("trend alert" in r.getMessage() and "global_noise_hu" in r.getMessage() for r in caplog.records)


def test_service_event_with_rebaseline(db):
    """A new tube changes noise by +25 % on day 45 for good. Without re-baselining every later point of
    that chart alerts; with it, a new baseline forms and nothing alerts."""
    hist = make_history(5, step=(1, 45, 1.25))
    event_at = START + timedelta(days=45)
    with db.session() as s:
        _record(s, hist)
        add_service_event(s, scanner="CT1", occurred_at=event_at, text="tube replaced", rebaseline=False)
        n_plain = reevaluate_scanner(s, SETTINGS, "CT1")
    assert n_plain > 10
    with db.session() as s:
        add_service_event(s, scanner="CT1", occurred_at=event_at + timedelta(minutes=1), text="new baseline",
                          rebaseline=True)
        assert reevaluate_scanner(s, SETTINGS, "CT1") == 0
        assert s.scalar(select(func.count()).select_from(Alert)) == 0
        charts = analyse_scanner(s, SETTINGS, "CT1", metric="global_noise_hu")
        chart = next(c for c in charts if c.key.protocol == KEYS[1])
    assert len(chart.baselines) == 2
    b0, b1 = chart.baselines
    assert b1.complete and b1.first_day >= event_at.date()
    assert b1.centre / b0.centre == pytest.approx(1.25, rel=0.04)
    # the points right after the event belong to the new baseline
    assert all(p.status == STATUS_BASELINE for p in chart.points if p.epoch == 1 and p.day <= b1.last_day)


def test_date_range_baseline_and_incomplete_baseline():
    hist = make_history(2, days=40)
    key = ChartKey("CT1", KEYS[0], ALL_BANDS, "global_noise_hu")
    ss = _charts(hist)[key]
    st = TrendSettings(baseline_from=date(2026, 1, 12), baseline_to=date(2026, 1, 25))
    ch = analyse_chart(key, ss, [], st)
    b = ch.baselines[0]
    assert b.source == "date_range" and b.complete
    assert b.first_day >= date(2026, 1, 12) and b.last_day <= date(2026, 1, 25)
    assert b.centre == pytest.approx(4.5, rel=0.03)
    # points before the range are judged against it too, not part of it
    assert not ch.points[0].in_baseline
    # too little data: everything is baseline, nothing alerts
    short = analyse_chart(key, [x for x in ss if x.acquired_at < START + timedelta(days=5)], [], TrendSettings())
    assert not short.baselines[0].complete
    assert all(p.status in (STATUS_BASELINE, "pending") and not p.alert_rules for p in short.points)


def test_levels_percent_absolute_and_direction():
    lim = MetricLimits("m", tolerance=10, action=20)
    assert lim.band(10.0, lim.tolerance) == (9.0, 11.0)
    ab = MetricLimits("m", tolerance=1.5, mode="absolute", direction="increase")
    assert ab.band(10.0, ab.tolerance) == (None, 11.5)
    with pytest.raises(ValueError, match="action"):
        MetricLimits("m", tolerance=10, action=5)


def test_evaluate_unknown_series_returns_nothing(db):
    with db.session() as s:
        assert evaluate_series(s, SETTINGS, "CT1", "9.9.9") == []


def test_untrended_metric_is_stored_but_not_judged(db):
    hist = make_history(6, days=40)
    with db.session() as s:
        for h in hist:
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="<20", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics={**h.metrics, "n_slices": 100.0 + h.day_index})
        evs = evaluate_series(s, SETTINGS, "CT1", hist[-1].uid)
        assert {e.metric for e in evs} == set(hist[-1].metrics)  # no n_slices evaluation
        assert reevaluate_scanner(s, SETTINGS, "CT1") == 0  # n_slices climbs steadily: would be a "trend"
        assert {c.key.metric for c in analyse_scanner(s, SETTINGS, "CT1")} == set(hist[0].metrics)
        assert len(history(s, "CT1", metric="n_slices")) == len(hist)
        every = TrendSettings(metrics=("*",))
        assert reevaluate_scanner(s, every, "CT1") > 0


def test_charts_split_by_size_band(db):
    hist = make_history(8, days=30)
    bands = ("<20", "20-25", "25-30")
    with db.session() as s:
        for i, h in enumerate(hist):
            record_series(s, scanner="CT1", protocol=h.protocol, size_band=bands[i % 3], series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
        split = TrendSettings(by_size_band=True, series_per_point=10)
        charts = analyse_scanner(s, split, "CT1", metric="global_noise_hu")
        assert {(c.key.protocol, c.key.size_band) for c in charts} == {(k, b) for k in KEYS for b in bands}
        assert sum(c.n_series for c in charts) == len(hist)
        evs = evaluate_series(s, split, "CT1", hist[-1].uid)
        assert {e.size_band for e in evs} == {bands[(len(hist) - 1) % 3]}
        merged = analyse_scanner(s, TrendSettings(), "CT1", metric="global_noise_hu")
        assert {c.key.size_band for c in merged} == {ALL_BANDS} and len(merged) == len(KEYS)


def test_gross_change_alerts_before_the_point_is_full():
    rng = np.random.default_rng(9)
    key = ChartKey("CT1", KEYS[3], ALL_BANDS, "global_noise_hu")
    samples = [
        Sample(START + timedelta(days=d, hours=8 + i * 0.5), float(rng.normal(10.0, 1.0)), f"1.{d}.{i}")
        for d in range(30)
        for i in range(20)
    ]
    day30 = START + timedelta(days=30, hours=8)
    lim = TrendSettings(limits={"global_noise_hu": MetricLimits("global_noise_hu", tolerance=10, action=20)})

    def last_point(values, settings):
        extra = [Sample(day30 + timedelta(minutes=10 * i), v, f"2.{i}") for i, v in enumerate(values)]
        return analyse_chart(key, samples + extra, [], settings).points[-1]

    p = last_point([16.0, 15.5, 16.4, 15.8, 16.2, 16.1], lim)  # +60 %, 6 series of 20
    assert p.n_series == 6 and p.status == "action" and p.alert_rules == ("action_level",)
    assert last_point([16.0, 15.5, 16.4], lim).status == "pending"  # fewer than 5 series: wait
    assert last_point([10.5, 9.7, 10.2, 10.9, 9.9, 10.1], lim).status == "pending"  # normal values: wait
    off = TrendSettings(early_action_min_series=0, limits=lim.limits)
    assert last_point([16.0, 15.5, 16.4, 15.8, 16.2, 16.1], off).status == "pending"
