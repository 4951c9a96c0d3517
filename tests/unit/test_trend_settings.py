"""[trends], [trends.limits.*], [alerts] and [reports] parsing: good files load, bad ones name file and key."""

from __future__ import annotations

import tomllib
from datetime import date

import pytest

from reports.trend_settings import (
    SECTION_VALIDATORS,
    AlertSettings,
    ReportingSettings,
    ReportSettings,
    TrendConfigError,
    TrendSettings,
)

GOOD = """
[trends]
baseline_n = 40
baseline_min_days = 15
baseline_from = 2026-01-05
baseline_to = "2026-02-01"
rules = ["beyond_limits", "run"]
sigma = 3
run_length = 8
trend_length = 6
series_per_point = 15
by_size_band = true
timezone = "Europe/Berlin"

[trends.limits.global_noise_hu]
tolerance = 10
action = 20.0
direction = "increase"

[trends.limits.ctdivol_mgy]
tolerance = 1.5
mode = "absolute"

[alerts]
smtp_host = "mail.hospital.example"
smtp_port = 587
smtp_from = "ctqa@hospital.example"
smtp_to = ["physics@hospital.example"]
starttls = true
username = "ctqa"
password = "s3cret"

[reports]
schedule = "30 1 * * 1-5"
formats = ["html", "pdf", "csv"]
period_days = 60
"""


def test_good_file_loads():
    doc = tomllib.loads(GOOD)
    rs = ReportingSettings.from_toml(doc, "config.toml")
    t = rs.trends
    assert t.baseline_n == 40 and t.baseline_min_days == 15
    assert t.baseline_from == date(2026, 1, 5) and t.baseline_to == date(2026, 2, 1)
    assert t.rules == ("beyond_limits", "run") and t.sigma == 3.0 and isinstance(t.sigma, float)
    assert t.series_per_point == 15 and t.by_size_band and t.timezone == "Europe/Berlin"
    noise = t.limits["global_noise_hu"]
    assert (noise.tolerance, noise.action, noise.mode, noise.direction) == (10.0, 20.0, "percent", "increase")
    assert noise.band(10.0, noise.tolerance) == (None, 11.0)
    ctdi = t.limits["ctdivol_mgy"]
    assert ctdi.mode == "absolute" and ctdi.band(10.0, ctdi.tolerance) == (8.5, 11.5)
    a = rs.alerts
    assert a.enabled and a.smtp_port == 587 and a.starttls and a.smtp_to == ("physics@hospital.example",)
    assert "s3cret" not in repr(a)
    assert rs.reports.schedule == "30 1 * * 1-5" and rs.reports.formats == ("html", "pdf", "csv")
    # the same through the per-section validators the node's config loader registers
    assert SECTION_VALIDATORS["trends"](doc["trends"], "config.toml") == t


def test_defaults():
    rs = ReportingSettings.from_toml({}, "config.toml")
    assert rs.trends == TrendSettings()
    assert not rs.alerts.enabled
    assert rs.reports == ReportSettings()
    assert ReportingSettings.from_sections({}) == rs


@pytest.mark.parametrize(
    ("section", "body", "needle"),
    [
        ("trends", "baseline_nn = 3", "unknown key 'trends.baseline_nn'"),
        ("trends", 'baseline_n = "many"', "'trends.baseline_n' must be an integer"),
        ("trends", "by_size_band = 1", "'trends.by_size_band' must be true or false"),
        ("trends", 'rules = ["beyond_limits", "westgard"]', "'trends.rules[1]'"),
        ("trends", 'baseline_from = "yesterday"', "'trends.baseline_from' must be a date"),
        ("trends", "baseline_from = 2026-01-01", "baseline_from"),
        ("trends", 'timezone = "Mars/Olympus"', "timezone"),
        ("trends.limits.global_noise_hu", "tolerance = -5",
         "'trends.limits.global_noise_hu.tolerance' must be a number > 0"),
        ("trends.limits.global_noise_hu", 'mode = "relative"', "'trends.limits.global_noise_hu.mode'"),
        ("trends.limits.global_noise_hu", "tolerance = 20\naction = 10", "'trends.limits.global_noise_hu.action'"),
        ("trends.limits.global_noise_hu", "tolerence = 10", "unknown key 'trends.limits.global_noise_hu.tolerence'"),
        ("trends.limits.global_noise_hu", 'direction = "up"', "direction"),
        ("alerts", "smtp_port = 70000", "'alerts.smtp_port' must be a TCP port"),
        ("alerts", 'smtp_to = ["not-an-address"]', "'alerts.smtp_to[0]' must be an e-mail address"),
        ("alerts", 'username = "x"', "'alerts.username' and 'alerts.password'"),
        ("alerts", "smtp_hots = 'x'", "unknown key 'alerts.smtp_hots'"),
        ("reports", 'schedule = "every night"', "'reports.schedule' must be a 5-field cron expression"),
        ("reports", 'formats = ["docx"]', "'reports.formats[0]' must be one of"),
        ("reports", "period_days = 0", "'reports.period_days' must be >= 1"),
    ],
)
def test_bad_values_name_file_and_key(section, body, needle):
    doc = tomllib.loads(f"[{section}]\n{body}\n")
    with pytest.raises(TrendConfigError) as exc:
        ReportingSettings.from_toml(doc, "/etc/ctqa/config.toml")
    msg = str(exc.value)
    assert msg.startswith("/etc/ctqa/config.toml:")
    assert needle in msg
    assert isinstance(exc.value, ValueError)


def test_empty_schedule_turns_reports_off():
    assert ReportSettings.from_toml({"schedule": ""}, "c.toml").schedule == ""
    assert AlertSettings.from_toml({"smtp_to": "a@b.example"}, "c.toml").smtp_to == ("a@b.example",)
