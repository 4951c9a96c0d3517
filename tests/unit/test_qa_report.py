"""qa-report in every format, its error exits, scheduled reports and the demo history."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import re
import shutil
import subprocess
from datetime import timedelta

import numpy as np
import pytest
from matplotlib.image import imread

from reports import qa_report
from reports.demo import DEMO_METRICS, generate_demo_history
from reports.trend_settings import ReportingSettings, ReportSettings
from reports.trends import reevaluate_scanner
from storage.db import Database
from storage.trends import add_service_event, alerts_for, record_series
from tests.unit.trend_history import KEYS, METRICS, SETTINGS, START, make_history

DAYS = 45
SINCE = START.date()
UNTIL = SINCE + timedelta(days=DAYS - 1)


@pytest.fixture(scope="module")
def report_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.sqlite"
    db = Database("sqlite:///" + str(path))
    db.create_all()
    hist = make_history(21, days=DAYS, step=(2, 35, 1.3))
    with db.session() as s:
        for h in hist:
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="25-30", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
        add_service_event(s, scanner="CT1", occurred_at=START + timedelta(days=30, hours=6), text="tube replaced")
        reevaluate_scanner(s, SETTINGS, "CT1")
    with db.session() as s:
        n_alerts = len(alerts_for(s, "CT1"))
    yield db, hist, n_alerts
    db.dispose()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qa-report")
    qa_report.add_arguments(p)
    return p.parse_args(list(argv))


def _run(db, tmp_path, fmt, *extra):
    out = tmp_path / f"report.{fmt}"
    rc = qa_report.run(
        _args("--scanner", "CT1", "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(), "--format", fmt,
              "--out", str(out), *extra),
        db, ["CT1", "CT2"], SETTINGS,
    )
    return rc, out


def test_fixture_has_alerts_from_the_step(report_db):
    _, _, n_alerts = report_db
    assert n_alerts >= 1


def test_text_report(report_db, tmp_path):
    db, hist, _ = report_db
    rc, out = _run(db, tmp_path, "text")
    assert rc == 0
    text = out.read_text()
    assert f"scanner CT1" in text and f"{SINCE} to {UNTIL}" in text
    for key in KEYS:
        assert key in text
    # per protocol and metric: series count, status and direction are there
    chest = text.split(KEYS[2])[1].split("\n\n")[0]
    noise_line = next(line for line in chest.splitlines() if "global_noise_hu" in line)
    n_chest = sum(1 for h in hist if h.protocol == KEYS[2])
    assert f" {n_chest} " in noise_line
    assert "up" in noise_line and ("tolerance" in noise_line or "action" in noise_line)
    assert "tube replaced" in text and "Alerts:" in text


def test_csv_has_every_row(report_db, tmp_path):
    db, hist, _ = report_db
    rc, out = _run(db, tmp_path, "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len(hist) * len(METRICS)
    assert tuple(rows[0]) == qa_report.CSV_COLUMNS
    assert {r["metric"] for r in rows} == set(METRICS)
    by_uid = {h.uid: h for h in hist}
    r = rows[100]
    assert float(r["value"]) == pytest.approx(by_uid[r["series_instance_uid"]].metrics[r["metric"]], rel=1e-12)
    # filters
    rc, out = _run(db, tmp_path, "csv", "--protocol", "chest", "--metric", "ssde_mgy")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == sum(1 for h in hist if h.protocol == KEYS[2])
    assert {r["protocol"] for r in rows} == {KEYS[2]} and {r["metric"] for r in rows} == {"ssde_mgy"}


def test_json_schema(report_db, tmp_path):
    db, hist, n_alerts = report_db
    rc, out = _run(db, tmp_path, "json")
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["report"] == "ctqa-trends" and doc["schema_version"] == 1 and doc["scanner"] == "CT1"
    assert doc["period"] == {"since": SINCE.isoformat(), "until": UNTIL.isoformat(), "timezone": "UTC",
                             "series_before": 0, "series_after": 0}
    assert set(doc) == {"report", "schema_version", "scanner", "period", "generated_at", "filters", "method",
                        "charts", "calibrations", "alerts", "service_events", "rows"}
    assert doc["calibrations"] == []  # no qa-node calibrate in this database
    assert len(doc["rows"]) == len(hist) * len(METRICS)
    row_keys = {"scanner", "protocol", "size_band", "metric", "series_instance_uid", "acquired_at", "value"}
    assert all(set(r) == row_keys and isinstance(r["value"], float) for r in doc["rows"])
    assert len(doc["charts"]) == len(KEYS) * len(METRICS)
    for c in doc["charts"]:
        assert {"protocol", "metric", "n_series", "baseline_centre", "lower", "upper", "last_value", "status",
                "direction", "change_percent", "n_alerts"} <= set(c)
        assert c["status"] in ("ok", "out_of_control", "tolerance", "action", "baseline", "pending")
        assert c["direction"] in ("up", "down", "steady", "-")
    assert sum(c["n_series"] for c in doc["charts"]) == len(hist) * len(METRICS)
    assert len(doc["alerts"]) == n_alerts
    assert doc["service_events"] == [
        {"occurred_at": (START + timedelta(days=30, hours=6)).isoformat(), "text": "tube replaced", "rebaseline": False}
    ]


def test_html_one_chart_per_metric(report_db, tmp_path):
    db, _, _ = report_db
    rc, out = _run(db, tmp_path, "html")
    assert rc == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    imgs = re.findall(r'<img class="chart" data-metric="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert sorted(m for m, _ in imgs) == sorted(METRICS)
    assert page.count("<img") == len(METRICS)
    # self-contained: nothing loaded from elsewhere, no scripts
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    assert f"{SINCE} to {UNTIL}" in page and "generated" in page and "tube replaced" in page
    for _, b64 in imgs:
        png = base64.b64decode(b64)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(io.BytesIO(png))
        assert img.shape[0] > 300 and img.shape[1] > 600
        assert float(np.std(img[..., :3])) > 0.05  # a drawn chart, not a blank image


def _pdf_pages_text(data: bytes) -> list[str]:
    """Text of each page (Ghostscript txtwrite), whitespace collapsed."""
    out = subprocess.run(["gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=txtwrite", "-sOutputFile=-", "-"],
                         input=data, capture_output=True, check=True, timeout=120).stdout.decode("utf-8", "replace")
    return [" ".join(page.split()) for page in out.split("\f")]


def test_pdf(report_db, tmp_path):
    """The PDF carries the text report (same lines, 60 per page) and one chart page per metric."""
    if shutil.which("gs") is None:
        pytest.skip("Ghostscript (gs) not installed: cannot extract PDF text")
    db, _, _ = report_db
    rc, out = _run(db, tmp_path, "pdf")
    assert rc == 0
    data = out.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    _, txt = _run(db, tmp_path, "text")
    lines = txt.read_text().splitlines()
    n_text_pages = -(-len(lines) // 60)
    n_pages = len(re.findall(rb"/Type\s*/Page\b", data))
    assert n_pages == n_text_pages + len(METRICS)
    text = " ".join(_pdf_pages_text(data))
    for line in lines:
        if line.strip():
            assert " ".join(line.split()) in text, f"text-report line missing from the PDF: {line!r}"
    for metric in METRICS:
        assert f"CT1 - {metric} - {SINCE.isoformat()} to {UNTIL.isoformat()}" in text, metric


def test_series_outside_the_period_are_counted(report_db, tmp_path, capsys):
    """A report of part of the history says how many series fall before and after its period."""
    db, hist, _ = report_db
    since, until = SINCE + timedelta(days=10), SINCE + timedelta(days=29)
    before = {h.uid for h in hist if h.acquired_at.date() < since}
    after = {h.uid for h in hist if h.acquired_at.date() > until}
    assert before and after  # the fixture's history spans the whole 45 days
    out = tmp_path / "part.json"
    rc = qa_report.run(_args("--scanner", "CT1", "--since", since.isoformat(), "--until", until.isoformat(),
                             "--format", "json", "--out", str(out)), db, ["CT1"], SETTINGS)
    assert rc == 0
    period = json.loads(out.read_text())["period"]
    assert (period["series_before"], period["series_after"]) == (len(before), len(after))
    txt = tmp_path / "part.txt"
    assert qa_report.run(_args("--scanner", "CT1", "--since", since.isoformat(), "--until", until.isoformat(),
                               "--out", str(txt)), db, ["CT1"], SETTINGS) == 0
    assert (f"Series outside the period (by acquisition date): {len(before)} before {since.isoformat()}, "
            f"{len(after)} after {until.isoformat()}") in txt.read_text().splitlines()
    # a period with no series at all names where the series are
    rc = qa_report.run(_args("--scanner", "CT1", "--since", "2020-01-01", "--until", "2020-02-01"),
                       db, ["CT1"], SETTINGS)
    assert rc != 0
    assert f"(0 series acquired before 2020-01-01, {len(hist)} after 2020-02-01)" in capsys.readouterr().err
    # the same history, the whole period: none outside
    full = tmp_path / "full.txt"
    assert qa_report.run(_args("--scanner", "CT1", "--since", SINCE.isoformat(), "--until", UNTIL.isoformat(),
                               "--out", str(full)), db, ["CT1"], SETTINGS) == 0
    assert (f"Series outside the period (by acquisition date): 0 before {SINCE.isoformat()}, 0 after "
            f"{UNTIL.isoformat()}") in full.read_text()


def test_unknown_scanner_lists_known_ones(report_db, tmp_path, capsys):
    db, _, _ = report_db
    rc = qa_report.run(_args("--scanner", "CT9"), db, ["CT1", "CT2"], SETTINGS)
    assert rc != 0
    err = capsys.readouterr().err
    assert "CT9" in err and "CT1" in err and "CT2" in err


def test_empty_period_says_so(report_db, tmp_path, capsys):
    db, _, _ = report_db
    out = tmp_path / "empty.txt"
    rc = qa_report.run(_args("--scanner", "CT1", "--since", "2020-01-01", "--until", "2020-02-01", "--out", str(out)),
                       db, ["CT1"], SETTINGS)
    assert rc != 0 and not out.exists()
    assert "no trend data" in capsys.readouterr().err
    # a configured scanner that never sent anything: also empty, not unknown
    rc = qa_report.run(_args("--scanner", "CT2"), db, ["CT1", "CT2"], SETTINGS)
    assert rc == qa_report.EXIT_EMPTY
    rc = qa_report.run(_args("--scanner", "CT1", "--metric", "nope"), db, ["CT1"], SETTINGS)
    assert rc != 0 and "global_noise_hu" in capsys.readouterr().err


def test_scheduled_reports_written(report_db, tmp_path):
    db, _, _ = report_db
    settings = ReportingSettings(trends=SETTINGS, reports=ReportSettings(formats=("html", "csv"), period_days=30))
    files = qa_report.generate_scheduled_reports(db, settings, ["CT1", "CT2"], tmp_path, today=UNTIL)
    assert sorted(p.name for p in files) == [f"CT1_{UNTIL}.csv", f"CT1_{UNTIL}.html"]
    assert all(p.parent == tmp_path / "reports" / "CT1" and p.stat().st_size > 1000 for p in files)


def test_schedule_job_with_cron(report_db, tmp_path):
    from apscheduler.schedulers.background import BackgroundScheduler

    db, _, _ = report_db
    sched = BackgroundScheduler(timezone="UTC")
    job = qa_report.schedule_reports(sched, db, ReportingSettings(), ["CT1"], tmp_path)
    assert job.id == qa_report.SCHEDULED_JOB_ID
    assert str(job.trigger.fields[5]) == "2" and str(job.trigger.fields[6]) == "0"  # hour 2, minute 0
    off = ReportingSettings(reports=ReportSettings(schedule=""))
    assert qa_report.schedule_reports(sched, db, off, ["CT1"], tmp_path) is None


def test_demo_history(tmp_path):
    db = Database("sqlite:///" + str(tmp_path / "demo.sqlite"))
    db.create_all()
    n = generate_demo_history(db, "CT1", 30, seed=1)
    assert 30 * 20 < n < 30 * 60
    out = tmp_path / "demo.json"
    rc = qa_report.run(_args("--scanner", "CT1", "--format", "json", "--out", str(out)), db, ["CT1"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {r["metric"] for r in doc["rows"]} == set(DEMO_METRICS)
    assert len({r["protocol"] for r in doc["rows"]}) == 4
    assert len({r["size_band"] for r in doc["rows"]}) >= 3
    db.dispose()
