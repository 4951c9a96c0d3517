"""The HTML report opened in headless Debian Chromium: no console messages, and the charts render.

Skips when /usr/bin/chromium is absent (apt-get install -y chromium). Chromium writes page console
messages to stderr as ``...:CONSOLE(...)] "text", source: ...`` with ``--enable-logging=stderr``; the
report has no scripts, so any console line (a JS error, a CSP or resource complaint) fails the test.
A first check proves the parsing catches a page that does log errors.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from reports import qa_report
from reports.trends import reevaluate_scanner
from storage.db import Database
from storage.trends import add_service_event, record_series
from tests.unit.trend_history import SETTINGS, START, make_history

pytestmark = pytest.mark.interop

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CONSOLE_RE = re.compile(r":CONSOLE(?:\(\d+\))?\]|:CONSOLE:\d+\]")


def _chromium(url: str, tmp: Path, name: str) -> tuple[str, Path]:
    shot = tmp / f"{name}.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / ('profile-' + name)}",
        "--enable-logging=stderr",
        "--v=0",
        "--hide-scrollbars",
        "--window-size=1280,1600",
        f"--screenshot={shot}",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return proc.stderr, shot


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_RE.search(line)]


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chromium")
    db = Database("sqlite:///" + str(tmp / "r.sqlite"))
    db.create_all()
    with db.session() as s:
        for h in make_history(31, days=40, step=(1, 32, 1.3)):
            record_series(s, scanner="CT1", protocol=h.protocol, size_band="20-25", series_instance_uid=h.uid,
                          acquired_at=h.acquired_at, metrics=h.metrics)
        add_service_event(s, scanner="CT1", occurred_at=START + timedelta(days=25), text="tube replaced")
        reevaluate_scanner(s, SETTINGS, "CT1")
    out = tmp / "report.html"
    p = argparse.ArgumentParser()
    qa_report.add_arguments(p)
    until = (START + timedelta(days=39)).date().isoformat()
    args = p.parse_args(["--scanner", "CT1", "--since", START.date().isoformat(), "--until", until,
                         "--format", "html", "--out", str(out)])
    assert qa_report.run(args, db, ["CT1"], SETTINGS) == 0
    db.dispose()
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install -y chromium)")
def test_console_parsing_catches_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                   '<script>console.error("deliberate"); notDefined();</script></body></html>')
    stderr, _ = _chromium(bad.as_uri(), tmp_path, "bad")
    lines = _console_lines(stderr)
    assert any("deliberate" in line for line in lines)
    assert any("notDefined" in line for line in lines)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install -y chromium)")
def test_report_loads_without_console_errors_and_charts_render(report_html, tmp_path):
    stderr, shot = _chromium(report_html.as_uri(), tmp_path, "report")
    assert _console_lines(stderr) == []
    img = imread(str(shot))[..., :3]
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    flat = img.reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) > 50, "screenshot is (nearly) one colour"
    frac = _chart_coloured(img)
    assert frac > 0.03, f"only {frac:.4f} of the screenshot is chart-coloured"
    # the same page with the chart images broken is detected by this measure
    broken = tmp_path / "broken.html"
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,AAAA", report_html.read_text())
    broken.write_text(page)
    _, shot2 = _chromium(broken.as_uri(), tmp_path, "broken")
    assert _chart_coloured(imread(str(shot2))[..., :3]) < 0.01


def _chart_coloured(img: np.ndarray) -> float:
    """Fraction of bluish pixels: the charts' #1f77b4 points/centre line and their light-blue control
    band appear only if the embedded PNGs were decoded and drawn; the page's text and tables are grey."""
    flat = img.reshape(-1, 3)
    r, b = flat[:, 0], flat[:, 2]
    return float(((b - r > 0.04) & (b > 0.5)).mean())
