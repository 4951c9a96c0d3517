"""Detection and false-alarm figures of the trend charts (docs/trends.md "Validation"), reprinted.

Synthetic histories of ``tests/unit/trend_history.py`` (4 protocols, 3 metrics, 90 days, 12 charts),
analysed with ``reports.trends.analyse_chart`` (pure chart analysis, no database):

- stable: histories with no alert day, and alert days in all (seeds 0 .. --stable-seeds - 1);
- step: +15 % global noise on the chest protocol (15/weekday) from day 60: day of the first alert;
- incremental: the chart as ``evaluate_series`` sees it at the end of each day 60..63 (the history up
  to that day only): +15 % on the chest protocol and on the 12/weekday protocol flagged within 3 days;
  a +40 % step on the 12/weekday protocol flagged the same day, with and without the early action check;
- no tolerance levels: plain SPC rules on the stable histories, alert days per history.

    .venv/bin/python bench/trend_detection.py [--stable-seeds 200] [--incremental-seeds 100]
        [--plain-seeds 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reports.trends import ALL_BANDS, ChartKey, Sample, analyse_chart  # noqa: E402
from tests.unit.trend_history import KEYS, SETTINGS, START, make_history  # noqa: E402

STEP_DAY = 60
NOISE = "global_noise_hu"


def charts(hist, last_day: int | None = None):
    g = defaultdict(list)
    for s in hist:
        if last_day is not None and s.day_index > last_day:
            continue
        for m, v in s.metrics.items():
            g[ChartKey("CT1", s.protocol, ALL_BANDS, m)].append(Sample(s.acquired_at, v, s.uid))
    return g


def alert_days(hist, settings, only=None, last_day=None) -> list:
    """(protocol, metric, day) of every point with an alert."""
    out = []
    for k, ss in charts(hist, last_day).items():
        if only is not None and (k.protocol, k.metric) != only:
            continue
        out += [(k.protocol, k.metric, p.day) for p in analyse_chart(k, ss, [], settings).points if p.alert_rules]
    return out


def first_alert_offset(hist, settings, protocol_index: int, last_day=None) -> int | None:
    step = (START + timedelta(days=STEP_DAY)).date()
    days = sorted(d for _, _, d in alert_days(hist, settings, (KEYS[protocol_index], NOISE), last_day) if d >= step)
    return (days[0] - step).days if days else None


def incremental_offset(seed: int, protocol_index: int, factor: float, settings, max_days: int = 3) -> int | None:
    """Days after the step until the chart, as seen at the end of each day, has an alert on or after it."""
    hist = make_history(seed, step=(protocol_index, STEP_DAY, factor))
    for d in range(max_days + 1):
        off = first_alert_offset(hist, settings, protocol_index, last_day=STEP_DAY + d)
        if off is not None and off <= d:
            return d
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stable-seeds", type=int, default=200)
    ap.add_argument("--incremental-seeds", type=int, default=100)
    ap.add_argument("--plain-seeds", type=int, default=50)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res: dict = {}

    n = args.stable_seeds
    per_hist = [len(alert_days(make_history(s), SETTINGS)) for s in range(n)]
    clean = sum(1 for x in per_hist if x == 0)
    res["stable"] = {"histories": n, "without_alert": clean, "alert_days_total": sum(per_hist),
                     "alert_days_in_noisy": sorted(x for x in per_hist if x)}
    print(f"stable history: no alert in {clean} of {n} histories; {sum(per_hist)} alert days in all "
          f"({n} x 12 charts); histories with alerts: {res['stable']['alert_days_in_noisy']}")

    offsets = Counter()
    for s in range(n):
        off = first_alert_offset(make_history(s, step=(2, STEP_DAY, 1.15)), SETTINGS, 2)
        offsets["none" if off is None else ("later" if off > 3 else f"day {STEP_DAY + off}")] += 1
    within = sum(v for k, v in offsets.items() if k.startswith("day"))
    res["step_pure"] = {"histories": n, "first_alert": dict(offsets), "within_3_days": within}
    print(f"+15 % noise, chest protocol, from day {STEP_DAY} (pure): first alert "
          + ", ".join(f"{k}: {v}" for k, v in sorted(offsets.items())) + f"; delay <= 3 days in {within}/{n}")

    m = args.incremental_seeds
    early_off = replace(SETTINGS, early_action_min_series=0)
    inc = {
        "chest_15pct_within_3_days": sum(incremental_offset(s, 2, 1.15, SETTINGS) is not None for s in range(m)),
        "p12_15pct_within_3_days": sum(incremental_offset(s, 3, 1.15, SETTINGS) is not None for s in range(m)),
        "p12_40pct_same_day_early": sum(incremental_offset(s, 3, 1.40, SETTINGS, 0) == 0 for s in range(m)),
        "p12_40pct_same_day_no_early": sum(incremental_offset(s, 3, 1.40, early_off, 0) == 0 for s in range(m)),
        "histories": m,
    }
    res["incremental"] = inc
    print(f"incremental ({m} seeds): +15 % chest within 3 days {inc['chest_15pct_within_3_days']}/{m}; "
          f"+15 % 12/weekday protocol {inc['p12_15pct_within_3_days']}/{m}; +40 % same day "
          f"{inc['p12_40pct_same_day_early']}/{m} with early action check "
          f"({inc['p12_40pct_same_day_no_early']}/{m} without)")

    k = args.plain_seeds
    plain = replace(SETTINGS, limits={})
    days = [len(alert_days(make_history(s), plain)) for s in range(k)]
    res["no_tolerance"] = {"histories": k, "mean_alert_days": sum(days) / k, "min": min(days), "max": max(days)}
    print(f"no tolerance levels (plain SPC rules, {k} stable histories): {sum(days) / k:.1f} alert days per "
          f"history on average ({min(days)} to {max(days)})")
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"({res['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
