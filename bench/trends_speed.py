"""Speed of the trend side (docs/trends.md "Speed"), reprinted beside the documented reference.

A demo history (``reports.demo.generate_demo_history``, seed 0) of ``--days`` days in a fresh SQLite
database; then, best of ``--repeat`` rounds each (wall clock, and the CPU time of this process, the
fairer figure on a shared machine): ``evaluate_series`` of the newest series (all its
trended metrics), every chart of the scanner (``analyse_scanner``), and ``qa-report`` for the whole
history as text, CSV and HTML, and for the last 90 days as HTML and PDF (build + render).

    .venv/bin/python bench/trends_speed.py [--days 365] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from reports.demo import DEMO_TREND_SETTINGS, generate_demo_history  # noqa: E402
from reports.qa_report import build_report, render  # noqa: E402
from reports.trends import analyse_scanner, evaluate_series  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.trends import TrendPoint  # noqa: E402
logging.getLogger("reports.trends").setLevel(logging.ERROR)  # not the demo history's alert lines

# documented figures (docs/trends.md), seconds, for the ratio column
REFERENCE = {"evaluate_series": 0.49, "all_charts": 1.2, "report_text": 1.7, "report_csv": 1.7,
             "report_html": 4.0, "report_html_90d": 2.5, "report_pdf_90d": 3.0}


def best(fn, repeat: int) -> tuple[float, float]:
    """(best wall time, CPU time of that round) in seconds."""
    times = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    st = DEMO_TREND_SETTINGS
    with tempfile.TemporaryDirectory(prefix="ctqa-trends-bench-") as tmp:
        db = Database(f"sqlite:///{tmp}/trends.sqlite")
        db.create_all()
        t0 = time.perf_counter()
        n_series = generate_demo_history(db, "CT1", args.days, seed=0, settings=st)
        t_gen = time.perf_counter() - t0
        with db.session() as s:
            n_rows = s.scalar(select(func.count()).select_from(TrendPoint))
            metrics = sorted(set(s.scalars(select(TrendPoint.metric).distinct())))
            newest = s.scalars(select(TrendPoint.series_instance_uid).order_by(TrendPoint.acquired_at.desc())
                               .limit(1)).one()
            last_day = s.scalar(select(func.max(TrendPoint.acquired_at)))
        until = last_day.astimezone(st.tz()).date()
        since_all = until - timedelta(days=args.days)
        since_90 = until - timedelta(days=89)
        n_trended = sum(1 for m in metrics if st.trended(m))
        print(f"demo history: {args.days} days, {n_series} series, {len(metrics)} metrics ({n_trended} trended), "
              f"{n_rows} rows; generated in {t_gen:.1f} s; best of {args.repeat}")

        def ev():
            with db.session() as s:
                evaluate_series(s, st, "CT1", newest)

        def charts():
            with db.session() as s:
                analyse_scanner(s, st, "CT1")

        def report(fmt, since):
            def run():
                with db.session() as s:
                    render(build_report(s, st, "CT1", since, until, now=datetime.now().astimezone()), fmt)
            return run

        figures = {
            "evaluate_series": best(ev, args.repeat),
            "all_charts": best(charts, args.repeat),
            "report_text": best(report("text", since_all), args.repeat),
            "report_csv": best(report("csv", since_all), args.repeat),
            "report_html": best(report("html", since_all), args.repeat),
            "report_html_90d": best(report("html", since_90), args.repeat),
            "report_pdf_90d": best(report("pdf", since_90), args.repeat),
        }
        db.dispose()
    print(f"{'':<20} {'wall':>8} {'cpu':>8} {'reference':>10} {'ratio (wall)':>13}")
    for k, (wall, cpu) in figures.items():
        ref = REFERENCE[k]
        print(f"{k:<20} {wall:>7.2f}s {cpu:>7.2f}s {ref:>9.2f}s {wall / ref:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"days": args.days, "series": n_series, "rows": n_rows,
                                               "wall_cpu_seconds": figures, "reference_seconds": REFERENCE}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
