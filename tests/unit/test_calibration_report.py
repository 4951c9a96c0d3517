"""qa-report names the Likert calibrations in use (qa-node calibrate): id, date, method, counts and
the cross-validated aggregate with its 95 % CI, in text (so PDF and HTML) and JSON."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timedelta, timezone

from reports import qa_report
from reports.trends import reevaluate_scanner
from storage.db import Database
from storage.models import Calibration
from storage.trends import record_series
from tests.unit.trend_history import SETTINGS, START, make_history

DAYS = 20


def _stats(value, lo, hi):
    block = {k: {"value": 0.5, "ci95": [0.4, 0.6]} for k in ("plcc", "srocc", "krocc")}
    return json.dumps({"raw": dict(block, aggregate={"value": 1.5, "ci95": [1.2, 1.8]}),
                       "cross_validated": dict(block, aggregate={"value": value, "ci95": [lo, hi]})})


def test_report_names_the_calibration_in_use(tmp_path) -> None:
    db = Database("sqlite:///" + str(tmp_path / "r.sqlite"))
    db.create_all()
    with db.session() as s:
        for h in make_history(5, days=DAYS):
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="25-30", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
        reevaluate_scanner(s, SETTINGS, "CT1")
        common = dict(metric="global_noise_hu", method="isotonic", parameters="{}", ratings_file="/r.csv",
                      ratings_sha256="0" * 64)
        # an older calibration of the same metric: superseded, not named
        s.add(Calibration(**common, n_ratings=30, n_images=30, n_series=3, statistics=_stats(1.0, 0.5, 1.5),
                          created_at=datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)))
        s.add(Calibration(**dict(common, method="logistic"), n_ratings=250, n_images=200, n_series=12,
                          statistics=_stats(2.41234, 2.1, 2.6),
                          created_at=datetime(2026, 11, 20, 14, 30, tzinfo=timezone.utc)))
        s.commit()
    since = START.date()
    until = since + timedelta(days=DAYS - 1)
    p = argparse.ArgumentParser()
    qa_report.add_arguments(p)
    for fmt in ("text", "json"):
        out = tmp_path / f"r.{fmt}"
        args = p.parse_args(["--scanner", "CT1", "--since", since.isoformat(), "--until", until.isoformat(),
                             "--format", fmt, "--out", str(out)])
        assert qa_report.run(args, db, ["CT1"], SETTINGS) == 0
        text = out.read_text()
        if fmt == "text":
            lines = [x for x in text.splitlines() if x.startswith("Likert calibration")]
            assert lines == ["Likert calibration of global_noise_hu (global_noise_hu_likert): calibration 2 of "
                             "2026-11-20 14:30 UTC, logistic, 200 rated images of 12 series (250 ratings); "
                             "cross-validated |PLCC|+|SROCC|+|KROCC| 2.41 (95% CI 2.1-2.6)"]
        else:
            cals = json.loads(text)["calibrations"]
            assert len(cals) == 1
            c = cals[0]
            assert (c["id"], c["metric"], c["method"], c["n_images"], c["n_series"], c["n_ratings"]) == \
                (2, "global_noise_hu", "logistic", 200, 12, 250)
            assert c["created_at"] == "2026-11-20T14:30:00+00:00"
            assert c["aggregate_cv"] == 2.41234 and c["aggregate_cv_ci95"] == [2.1, 2.6]
    db.dispose()
