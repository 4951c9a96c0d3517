"""``qa-report --scanner CT1 [--since DATE] [--until DATE] [--protocol P] [--metric M]
[--format text|csv|json|html|pdf] [--out FILE]`` and the nightly scheduled reports.

- text (default): per protocol and metric: series in the period, baseline, limits, last value, status
  and direction of change;
- csv / json: every trend row of the period of the trended metrics (``[trends] metrics``, or the one
  ``--metric``); json adds the chart summaries, alerts and service events;
- html: one self-contained file (no scripts, no external resources): one control chart per metric
  (base64 PNG; one panel per protocol) with centre, control limits, tolerance and action levels,
  alerts and service events marked, the tables, the period and the generation time;
- pdf: the same content through matplotlib's PdfPages.

The report shows no patient data: trend rows carry only scanner, protocol, size band, series UID, time
and values.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import logging
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # never a GUI backend: the node and the CLI run headless
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sqlalchemy import distinct, func, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from reports.trend_settings import REPORT_FORMATS, ReportingSettings, TrendSettings  # noqa: E402
from reports.trends import (  # noqa: E402
    ALL_BANDS,
    RULE_TEXT,
    STATUS_ACTION,
    STATUS_BASELINE,
    STATUS_OK,
    STATUS_OOC,
    STATUS_PENDING,
    STATUS_TOLERANCE,
    ChartAnalysis,
    DayPoint,
    analyse_scanner,
)
from storage.db import Database, utcnow  # noqa: E402
from storage.trends import Alert, ServiceEvent, TrendPoint, alerts_for, known_scanners, service_events  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_PERIOD_DAYS = 90
EXIT_OK = 0
EXIT_EMPTY = 1
EXIT_USAGE = 2

CSV_COLUMNS = ("scanner", "protocol", "size_band", "metric", "series_instance_uid", "acquired_at", "value")
JSON_SCHEMA_VERSION = 1

_STATUS_COLOUR = {
    STATUS_BASELINE: "#8c8c8c",
    STATUS_OK: "#1f77b4",
    STATUS_OOC: "#ff7f0e",
    STATUS_TOLERANCE: "#d62728",
    STATUS_ACTION: "#7f0000",
    STATUS_PENDING: "#bcbcbc",
}


# ---------------------------------------------------------------------------------------------------
# report content


@dataclass(frozen=True)
class ChartSummary:
    protocol: str
    size_band: str
    metric: str
    n_series: int  # in the period
    n_points: int  # in the period
    baseline_centre: float | None
    baseline_sigma_between: float | None
    baseline_sigma_within: float | None
    baseline_first_day: date | None
    baseline_last_day: date | None
    baseline_n_series: int
    baseline_complete: bool
    lower: float | None  # control limits of the last point
    upper: float | None
    tolerance_low: float | None
    tolerance_high: float | None
    action_low: float | None
    action_high: float | None
    last_day: date | None
    last_value: float | None
    status: str
    change_percent: float | None  # last value vs baseline centre
    direction: str  # "up", "down", "steady" or "-"
    n_alerts: int

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k, v in d.items():
            if isinstance(v, date):
                d[k] = v.isoformat()
            elif isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


@dataclass(frozen=True)
class ReportData:
    scanner: str
    since: date  # inclusive
    until: date  # inclusive
    generated_at: datetime
    settings: TrendSettings
    protocol_filter: str | None
    metric_filter: str | None
    charts: tuple[ChartAnalysis, ...]  # points restricted to the period; baselines as computed
    summaries: tuple[ChartSummary, ...]
    rows: tuple[tuple[str, str, str, str, str, datetime, float], ...]
    alerts: tuple[Alert, ...]
    events: tuple[ServiceEvent, ...]
    # series of this scanner (same protocol/metric filters) whose acquisition date is outside the period
    n_series_before: int = 0
    n_series_after: int = 0
    # the Likert calibrations in use (qa-node calibrate; newest per metric): see calibrations_in_use
    calibrations: tuple[dict[str, Any], ...] = ()

    @property
    def outside_text(self) -> str:
        return (f"Series outside the period (by acquisition date): {self.n_series_before} before "
                f"{self.since.isoformat()}, {self.n_series_after} after {self.until.isoformat()}")

    @property
    def metrics(self) -> list[str]:
        return sorted({c.key.metric for c in self.charts})

    @property
    def period_text(self) -> str:
        return f"{self.since.isoformat()} to {self.until.isoformat()}"


class ReportError(Exception):
    """A request that cannot produce a report; ``exit_code`` says why (1 empty, 2 usage)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _direction(p: DayPoint | None) -> tuple[float | None, str]:
    if p is None or p.centre is None or p.sigma is None:
        return None, "-"
    pct = (p.value - p.centre) / abs(p.centre) * 100.0 if p.centre else None
    if p.value > p.centre + p.sigma:
        return pct, "up"
    if p.value < p.centre - p.sigma:
        return pct, "down"
    return pct, "steady"


def resolve_protocol(requested: str, available: Sequence[str]) -> list[str]:
    """Protocol keys matching ``requested``: the exact key, else a case-insensitive substring."""
    if requested in available:
        return [requested]
    low = requested.lower()
    return [p for p in available if low in p.lower()]


def build_report(
    session: Session,
    settings: TrendSettings,
    scanner: str,
    since: date,
    until: date,
    *,
    protocol: str | None = None,
    metric: str | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Everything a report shows, for ``since`` .. ``until`` (local days in ``[trends] timezone``)."""
    if until < since:
        raise ReportError(f"--until {until} is before --since {since}", EXIT_USAGE)
    tz = settings.tz()
    t0 = datetime.combine(since, time(0), tzinfo=tz)
    t1 = datetime.combine(until + timedelta(days=1), time(0), tzinfo=tz)
    protocols: list[str] | None = None
    if protocol is not None:
        stmt = select(TrendPoint.protocol).where(TrendPoint.scanner == scanner).distinct()
        available = sorted(set(session.scalars(stmt)))
        protocols = resolve_protocol(protocol, available)
        if not protocols:
            raise ReportError(
                f"no protocol of scanner {scanner} matches {protocol!r}; known protocols:\n  " + "\n  ".join(available),
                EXIT_EMPTY,
            )
    if metric is not None:
        stmt_m = select(TrendPoint.metric).where(TrendPoint.scanner == scanner).distinct()
        available_m = sorted(set(session.scalars(stmt_m)))
        if metric not in available_m:
            raise ReportError(
                f"scanner {scanner} has no metric {metric!r}; known metrics: {', '.join(available_m) or '(none)'}",
                EXIT_EMPTY,
            )
    charts_all = analyse_scanner(session, settings, scanner, metric=metric, until=t1)
    if protocols is not None:
        charts_all = [c for c in charts_all if c.key.protocol in protocols]

    def reported(stmt):
        """``stmt`` limited to the scanner's rows this report covers: the metric asked for (or the
        trended ones) and the protocols matched."""
        stmt = stmt.where(TrendPoint.scanner == scanner)
        if metric is not None:
            stmt = stmt.where(TrendPoint.metric == metric)
        elif "*" not in settings.metrics:
            stmt = stmt.where(TrendPoint.metric.in_(sorted(set(settings.metrics) | set(settings.limits))))
        if protocols is not None:
            stmt = stmt.where(TrendPoint.protocol.in_(protocols))
        return stmt

    row_stmt = reported(select(
        TrendPoint.scanner,
        TrendPoint.protocol,
        TrendPoint.size_band,
        TrendPoint.metric,
        TrendPoint.series_instance_uid,
        TrendPoint.acquired_at,
        TrendPoint.value,
    )).where(TrendPoint.acquired_at >= t0, TrendPoint.acquired_at < t1)
    rows = tuple(tuple(r) for r in session.execute(row_stmt.order_by(TrendPoint.acquired_at, TrendPoint.id)))
    # Series left out by their acquisition date (same filters): said in every report, never dropped silently.
    outside = reported(select(func.count(distinct(TrendPoint.series_instance_uid))))
    n_before = session.scalar(outside.where(TrendPoint.acquired_at < t0)) or 0
    n_after = session.scalar(outside.where(TrendPoint.acquired_at >= t1)) or 0
    if not rows:
        what = " ".join(
            x for x in (f"protocol {protocol!r}" if protocol else "", f"metric {metric!r}" if metric else "") if x
        )
        elsewhere = (f" ({n_before} series acquired before {since}, {n_after} after {until})"
                     if n_before or n_after else "")
        raise ReportError(
            f"no trend data for scanner {scanner}{' ' + what if what else ''} from {since} to {until}{elsewhere}; "
            "choose another period with --since/--until",
            EXIT_EMPTY,
        )

    alerts = [a for a in alerts_for(session, scanner, since=since, until=until + timedelta(days=1))]
    if metric is not None:
        alerts = [a for a in alerts if a.metric == metric]
    if protocols is not None:
        alerts = [a for a in alerts if a.protocol in protocols]
    events = service_events(session, scanner, since=t0, until=t1)

    per_chart_series: dict[tuple[str, str, str], int] = defaultdict(int)
    for _, prot, band, met, _, _, _ in rows:
        per_chart_series[(prot, band if settings.by_size_band else ALL_BANDS, met)] += 1
    alert_count: dict[tuple[str, str, str], int] = defaultdict(int)
    for a in alerts:
        alert_count[(a.protocol, a.size_band, a.metric)] += 1

    charts: list[ChartAnalysis] = []
    summaries: list[ChartSummary] = []
    for c in charts_all:
        pts = tuple(p for p in c.points if p.day >= since and p.first_day <= until)
        if not pts:
            continue
        charts.append(ChartAnalysis(key=c.key, points=pts, baselines=c.baselines, n_series=c.n_series))
        last = pts[-1]
        base = c.baselines[last.epoch] if last.epoch < len(c.baselines) else c.baselines[-1]
        judged = [p for p in pts if p.status != STATUS_PENDING]
        ref = judged[-1] if judged else last
        pct, direction = _direction(ref if ref.status != STATUS_BASELINE else None)
        ck = (c.key.protocol, c.key.size_band, c.key.metric)
        summaries.append(
            ChartSummary(
                protocol=c.key.protocol,
                size_band=c.key.size_band,
                metric=c.key.metric,
                n_series=per_chart_series.get(ck, 0),
                n_points=len(pts),
                baseline_centre=base.centre,
                baseline_sigma_between=base.sigma_between,
                baseline_sigma_within=base.sigma_within,
                baseline_first_day=base.first_day,
                baseline_last_day=base.last_day,
                baseline_n_series=base.n_series,
                baseline_complete=base.complete,
                lower=ref.lower,
                upper=ref.upper,
                tolerance_low=ref.tolerance_low,
                tolerance_high=ref.tolerance_high,
                action_low=ref.action_low,
                action_high=ref.action_high,
                last_day=ref.day,
                last_value=ref.value,
                status=ref.status,
                change_percent=pct,
                direction=direction,
                n_alerts=alert_count.get(ck, 0),
            )
        )
    return ReportData(
        scanner=scanner,
        since=since,
        until=until,
        generated_at=now or utcnow(),
        settings=settings,
        protocol_filter=protocol,
        metric_filter=metric,
        charts=tuple(charts),
        summaries=tuple(summaries),
        rows=rows,
        alerts=tuple(alerts),
        events=tuple(events),
        n_series_before=n_before,
        n_series_after=n_after,
        calibrations=calibrations_in_use(session),
    )


def calibrations_in_use(session: Session) -> tuple[dict[str, Any], ...]:
    """The calibration of each metric that analyses apply (the newest row of table ``calibrations``):
    id, date, method, images / series / ratings, the ratings file's SHA-256 and the cross-validated
    aggregate |PLCC|+|SROCC|+|KROCC| with its 95 % CI. Empty without calibrations (or the table)."""
    from sqlalchemy import inspect

    from storage.models import Calibration

    if not inspect(session.connection()).has_table(Calibration.__tablename__):
        return ()
    newest = select(func.max(Calibration.id)).group_by(Calibration.metric)
    out = []
    for c in session.scalars(select(Calibration).where(Calibration.id.in_(newest)).order_by(Calibration.metric)):
        try:
            agg = json.loads(c.statistics)["cross_validated"]["aggregate"]
            value, (lo, hi) = agg["value"], agg["ci95"]
        except (ValueError, KeyError, TypeError):
            value = lo = hi = None
        out.append({"id": c.id, "metric": c.metric, "likert_metric": c.metric + "_likert",
                    "created_at": c.created_at.isoformat(), "method": c.method, "n_images": c.n_images,
                    "n_series": c.n_series, "n_ratings": c.n_ratings, "ratings_sha256": c.ratings_sha256,
                    "aggregate_cv": value, "aggregate_cv_ci95": [lo, hi]})
    return tuple(out)


def calibration_lines(r: ReportData) -> list[str]:
    """One line per calibration in use (none: no line)."""
    lines = []
    for c in r.calibrations:
        lo, hi = c["aggregate_cv_ci95"]
        lines.append(
            f"Likert calibration of {c['metric']} ({c['likert_metric']}): calibration {c['id']} of "
            f"{c['created_at'][:16].replace('T', ' ')} UTC, {c['method']}, {c['n_images']} rated images of "
            f"{c['n_series']} series ({c['n_ratings']} ratings); cross-validated |PLCC|+|SROCC|+|KROCC| "
            f"{_f(c['aggregate_cv'], 3)} (95% CI {_f(lo, 3)}-{_f(hi, 3)})")
    return lines


# ---------------------------------------------------------------------------------------------------
# renderers


def _f(v: float | None, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}g}"


def _limits_text(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return "-"
    return f"{_f(lo)}..{_f(hi)}"


def _change_text(s: ChartSummary) -> str:
    if s.change_percent is None:
        return s.direction
    return f"{s.change_percent:+.1f}% {s.direction}"


def _header_lines(r: ReportData) -> list[str]:
    st = r.settings
    lines = [
        f"CT QA trend report - scanner {r.scanner}",
        f"Period: {r.period_text} ({st.timezone} days); generated {r.generated_at.strftime('%Y-%m-%d %H:%M')} UTC",
        f"Series in period: {len({row[4] for row in r.rows})}; trend rows: {len(r.rows)}; alerts: {len(r.alerts)}; "
        f"service events: {len(r.events)}",
        r.outside_text,
        f"Method: one chart point per day (or per few days until {st.series_per_point} series), median of its series; "
        f"baseline = first {st.baseline_n} series over >= {st.baseline_min_days} days"
        + (f" or {st.baseline_from}..{st.baseline_to}" if st.baseline_from else "")
        + f"; limits = median +/- {st.sigma:g} robust sigma; rules: {', '.join(st.rules) or 'none'}",
    ]
    if r.protocol_filter or r.metric_filter:
        lines.append(f"Filters: protocol={r.protocol_filter or '*'} metric={r.metric_filter or '*'}")
    return lines + calibration_lines(r)


def render_text(r: ReportData) -> str:
    out = _header_lines(r)
    by_protocol: dict[tuple[str, str], list[ChartSummary]] = defaultdict(list)
    for s in r.summaries:
        by_protocol[(s.protocol, s.size_band)].append(s)
    head = (
        f"  {'metric':<22} {'series':>6}  {'baseline centre (sd day/series)':<32} {'control limits':<17} "
        f"{'tolerance':<17} {'last (day)':<20} {'status':<15} change"
    )
    for (prot, band), items in by_protocol.items():
        out.append("")
        out.append(prot + (f"  [size band {band} cm]" if band != ALL_BANDS else ""))
        out.append(head)
        for s in items:
            if s.baseline_complete:
                base = f"{_f(s.baseline_centre)} ({_f(s.baseline_sigma_between, 2)}/{_f(s.baseline_sigma_within, 2)})"
            else:
                base = f"building ({s.baseline_n_series} series)"
            last = f"{_f(s.last_value)} ({s.last_day.isoformat() if s.last_day else '-'})"
            out.append(
                f"  {s.metric:<22} {s.n_series:>6}  {base:<32} {_limits_text(s.lower, s.upper):<17} "
                f"{_limits_text(s.tolerance_low, s.tolerance_high):<17} {last:<20} {s.status:<15} {_change_text(s)}"
            )
    if r.alerts:
        out += ["", "Alerts:"]
        for a in r.alerts:
            out.append(
                f"  {a.day.isoformat()}  {a.severity:<6} {a.metric:<20} {a.rule:<14} {a.protocol}: value {_f(a.value)}"
            )
    if r.events:
        out += ["", "Service events:"]
        for e in r.events:
            flag = "  (new baseline)" if e.rebaseline else ""
            out.append(f"  {e.occurred_at.strftime('%Y-%m-%d %H:%M')}  {e.text}{flag}")
    return "\n".join(out) + "\n"


def render_csv(r: ReportData) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for scanner, prot, band, met, uid, t, v in r.rows:
        w.writerow([scanner, prot, band, met, uid, t.isoformat(), repr(float(v))])
    return buf.getvalue()


def _alert_dict(a: Alert) -> dict[str, Any]:
    return {
        "day": a.day.isoformat(),
        "protocol": a.protocol,
        "size_band": a.size_band,
        "metric": a.metric,
        "rule": a.rule,
        "severity": a.severity,
        "value": a.value,
        "n_series": a.n_series,
        "centre": a.centre,
        "lower": a.lower,
        "upper": a.upper,
        "series_instance_uid": a.series_instance_uid,
        "emailed": a.emailed,
        "message": a.message,
    }


def report_dict(r: ReportData) -> dict[str, Any]:
    st = r.settings
    return {
        "report": "ctqa-trends",
        "schema_version": JSON_SCHEMA_VERSION,
        "scanner": r.scanner,
        "period": {"since": r.since.isoformat(), "until": r.until.isoformat(), "timezone": st.timezone,
                   "series_before": r.n_series_before, "series_after": r.n_series_after},
        "generated_at": r.generated_at.isoformat(),
        "filters": {"protocol": r.protocol_filter, "metric": r.metric_filter},
        "method": {
            "baseline_n": st.baseline_n,
            "baseline_min_days": st.baseline_min_days,
            "baseline_from": st.baseline_from.isoformat() if st.baseline_from else None,
            "baseline_to": st.baseline_to.isoformat() if st.baseline_to else None,
            "series_per_point": st.series_per_point,
            "sigma": st.sigma,
            "rules": list(st.rules),
            "run_length": st.run_length,
            "trend_length": st.trend_length,
        },
        "charts": [s.as_dict() for s in r.summaries],
        "calibrations": list(r.calibrations),
        "alerts": [_alert_dict(a) for a in r.alerts],
        "service_events": [
            {"occurred_at": e.occurred_at.isoformat(), "text": e.text, "rebaseline": e.rebaseline} for e in r.events
        ],
        "rows": [
            {
                "scanner": sc,
                "protocol": prot,
                "size_band": band,
                "metric": met,
                "series_instance_uid": uid,
                "acquired_at": t.isoformat(),
                "value": float(v),
            }
            for sc, prot, band, met, uid, t, v in r.rows
        ],
    }


def render_json(r: ReportData) -> str:
    return json.dumps(report_dict(r), indent=1, allow_nan=False) + "\n"


def _day_dt(d: date) -> datetime:
    return datetime.combine(d, time(12))


def chart_figure(r: ReportData, metric: str) -> Figure:
    """One control chart per metric: a panel per protocol (and size band), shared time axis."""
    charts = [c for c in r.charts if c.key.metric == metric]
    n = max(1, len(charts))
    fig = Figure(figsize=(11, 1.2 + 2.3 * n), dpi=90, layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(f"{r.scanner} - {metric} - {r.period_text}", fontsize=11)
    x0, x1 = _day_dt(r.since) - timedelta(hours=12), _day_dt(r.until) + timedelta(hours=12)
    alerts_by_key: dict[tuple[str, str], list[Alert]] = defaultdict(list)
    for a in r.alerts:
        if a.metric == metric:
            alerts_by_key[(a.protocol, a.size_band)].append(a)
    for ax, c in zip(axes, charts):
        labelled: set[str] = set()
        pts = c.points
        xs = [_day_dt(p.day) for p in pts]
        # control band, centre, levels: drawn per epoch so a new baseline starts a new line
        for epoch in sorted({p.epoch for p in pts}):
            ep = [p for p in pts if p.epoch == epoch and p.centre is not None]
            if not ep:
                continue
            ex = [_day_dt(p.day) for p in ep]
            ax.fill_between(ex, [p.lower for p in ep], [p.upper for p in ep], step="mid", color="#1f77b4", alpha=0.12,
                            linewidth=0, label="control limits" if epoch == pts[0].epoch else None)
            ax.step(ex, [p.centre for p in ep], where="mid", color="#1f77b4", linewidth=1.0,
                    label="centre" if epoch == pts[0].epoch else None)
            for attr_lo, attr_hi, style, colour, name in (
                ("tolerance_low", "tolerance_high", ":", "#d62728", "tolerance"),
                ("action_low", "action_high", "-.", "#7f0000", "action"),
            ):
                for attr in (attr_lo, attr_hi):
                    vals = [getattr(p, attr) for p in ep]
                    if all(v is None for v in vals):
                        continue
                    ax.step(ex, [math.nan if v is None else v for v in vals], where="mid", linestyle=style,
                            color=colour, linewidth=1.0, label=None if name in labelled else name)
                    labelled.add(name)
            base = [p for p in ep if p.in_baseline]
            if base:
                half = timedelta(hours=12)
                ax.axvspan(_day_dt(base[0].first_day) - half, _day_dt(base[-1].day) + half,
                           color="#999999", alpha=0.12, linewidth=0)
        ax.plot(xs, [p.value for p in pts], color="#555555", linewidth=0.6, zorder=2)
        for status, colour in _STATUS_COLOUR.items():
            sel = [p for p in pts if p.status == status]
            if sel:
                ax.scatter([_day_dt(p.day) for p in sel], [p.value for p in sel], s=14, color=colour, zorder=3,
                           label=status.replace("_", " "),
                           facecolors="none" if status == STATUS_PENDING else colour)
        al = alerts_by_key.get((c.key.protocol, c.key.size_band), [])
        if al:
            days = sorted({a.day for a in al})
            val = {p.day: p.value for p in pts}
            ax.scatter([_day_dt(d) for d in days if d in val], [val[d] for d in days if d in val], s=90, marker="o",
                       facecolors="none", edgecolors="#d62728", linewidths=1.6, zorder=4, label="alert")
        for e in r.events:
            ax.axvline(e.occurred_at.replace(tzinfo=None), color="#2ca02c", linestyle="--", linewidth=1.2, zorder=1)
            ax.annotate(e.text[:40] + (" (new baseline)" if e.rebaseline else ""),
                        (e.occurred_at.replace(tzinfo=None), 1.0),
                        xycoords=("data", "axes fraction"), fontsize=7, color="#2ca02c", rotation=0,
                        xytext=(3, -10), textcoords="offset points")
        title = c.key.protocol + (f"  [size {c.key.size_band} cm]" if c.key.size_band != ALL_BANDS else "")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(x0, x1)
    if charts:
        handles, labels = [], []
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        axes[0].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    loc = AutoDateLocator()
    axes[-1].xaxis.set_major_locator(loc)
    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(loc))
    return fig


def _png_base64(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555;font-size:13px} img.chart{max-width:100%;border:1px solid #ddd}
.s-ok{color:#1f77b4}.s-out_of_control{color:#c25e00}.s-tolerance{color:#d62728;font-weight:bold}
.s-action{color:#7f0000;font-weight:bold}.s-baseline,.s-pending{color:#777}
"""


def render_html(r: ReportData) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>CT QA report {e(r.scanner)} {e(r.period_text)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>CT QA trend report &mdash; scanner {e(r.scanner)}</h1>",
        f'<p class="meta">Period <b>{e(r.period_text)}</b> ({e(r.settings.timezone)} days) &middot; generated '
        f'<time datetime="{e(r.generated_at.isoformat())}">'
        f'{e(r.generated_at.strftime("%Y-%m-%d %H:%M"))} UTC</time></p>',
        '<p class="meta">' + "<br>".join(e(x) for x in _header_lines(r)[2:]) + "</p>",
    ]
    for metric in r.metrics:
        fig = chart_figure(r, metric)
        parts.append(f'<h2 id="metric-{e(re.sub(r"[^A-Za-z0-9_-]", "_", metric))}">{e(metric)}</h2>')
        parts.append(
            f'<img class="chart" data-metric="{e(metric)}" alt="control chart of {e(metric)}" '
            f'src="data:image/png;base64,{_png_base64(fig)}">'
        )
        parts.append(
            "<table><thead><tr><th>protocol</th><th>size band</th><th>series</th><th>baseline centre</th>"
            "<th>sd day / series</th><th>baseline days</th><th>control limits</th><th>tolerance</th><th>action</th>"
            "<th>last</th><th>day</th><th>status</th><th>change</th><th>alerts</th></tr></thead><tbody>"
        )
        for s in r.summaries:
            if s.metric != metric:
                continue
            bdays = "-"
            if s.baseline_first_day:
                bdays = f"{s.baseline_first_day}..{s.baseline_last_day} ({s.baseline_n_series})"
            parts.append(
                f"<tr><td>{e(s.protocol)}</td><td>{e(s.size_band)}</td><td class=num>{s.n_series}</td>"
                f"<td class=num>{e(_f(s.baseline_centre))}</td>"
                f"<td class=num>{e(_f(s.baseline_sigma_between, 2))} / {e(_f(s.baseline_sigma_within, 2))}</td>"
                f"<td>{e(bdays)}{'' if s.baseline_complete else ' (building)'}</td>"
                f"<td class=num>{e(_limits_text(s.lower, s.upper))}</td>"
                f"<td class=num>{e(_limits_text(s.tolerance_low, s.tolerance_high))}</td>"
                f"<td class=num>{e(_limits_text(s.action_low, s.action_high))}</td>"
                f"<td class=num>{e(_f(s.last_value))}</td><td>{e(str(s.last_day or '-'))}</td>"
                f'<td class="s-{e(s.status)}">{e(s.status.replace("_", " "))}</td><td>{e(_change_text(s))}</td>'
                f"<td class=num>{s.n_alerts}</td></tr>"
            )
        parts.append("</tbody></table>")
    parts.append(f"<h2>Alerts ({len(r.alerts)})</h2>")
    if r.alerts:
        parts.append(
            "<table><thead><tr><th>day</th><th>severity</th><th>protocol</th><th>metric</th><th>rule</th><th>value</th>"
            "<th>centre</th><th>control limits</th><th>series</th><th>e-mailed</th></tr></thead><tbody>"
        )
        for a in r.alerts:
            parts.append(
                f"<tr><td>{a.day}</td><td>{e(a.severity)}</td><td>{e(a.protocol)}</td><td>{e(a.metric)}</td>"
                f"<td>{e(RULE_TEXT.get(a.rule, a.rule))}</td><td class=num>{e(_f(a.value))}</td>"
                f"<td class=num>{e(_f(a.centre))}</td><td class=num>{e(_limits_text(a.lower, a.upper))}</td>"
                f"<td class=num>{a.n_series}</td><td>{'yes' if a.emailed else 'no'}</td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append("<p>No alerts in this period.</p>")
    parts.append(f"<h2>Service events ({len(r.events)})</h2>")
    if r.events:
        parts.append("<table><thead><tr><th>when (UTC)</th><th>event</th><th>new baseline</th></tr></thead><tbody>")
        for ev in r.events:
            parts.append(
                f"<tr><td>{e(ev.occurred_at.strftime('%Y-%m-%d %H:%M'))}</td><td>{e(ev.text)}</td>"
                f"<td>{'yes' if ev.rebaseline else 'no'}</td></tr>"
            )
        parts.append("</tbody></table>")
    else:
        parts.append("<p>No service events in this period.</p>")
    parts.append(
        '<p class="meta">Charts: dots are chart points (median of a day\'s series), coloured by status; the shaded '
        "band is the control limits (they widen on days with few series), dotted/dash-dot lines the tolerance and "
        "action levels, grey shading the baseline, dashed green lines service events, red rings stored alerts.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_pdf(r: ReportData) -> bytes:
    buf = io.BytesIO()
    meta = {"Title": f"CT QA trend report {r.scanner} {r.period_text}", "Creator": "ctqa-node"}
    with PdfPages(buf, metadata=meta) as pdf:
        text = render_text(r).splitlines()
        per_page = 60
        for i in range(0, max(1, len(text)), per_page):
            fig = Figure(figsize=(11.69, 8.27))
            fig.text(0.03, 0.97, "\n".join(text[i : i + per_page]), family="monospace", fontsize=5.6, va="top")
            pdf.savefig(fig)
        for metric in r.metrics:
            pdf.savefig(chart_figure(r, metric))
    return buf.getvalue()


RENDERERS = {"text": render_text, "csv": render_csv, "json": render_json, "html": render_html, "pdf": render_pdf}
EXTENSIONS = {"text": "txt", "csv": "csv", "json": "json", "html": "html", "pdf": "pdf"}


def render(r: ReportData, fmt: str) -> str | bytes:
    if fmt not in RENDERERS:
        raise ValueError(f'Argument "fmt" must be one of {", ".join(REPORT_FORMATS)}, got {fmt!r}')
    return RENDERERS[fmt](r)


# ---------------------------------------------------------------------------------------------------
# CLI


def _parse_date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date such as 2026-11-02, got {value!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scanner", required=True, help="scanner name from config.toml, e.g. CT1")
    parser.add_argument("--since", type=_parse_date, help="first day (YYYY-MM-DD); default: 90 days before --until")
    parser.add_argument("--until", type=_parse_date, help="last day, inclusive (YYYY-MM-DD); default: today")
    parser.add_argument("--protocol", help="protocol key, or a case-insensitive part of it (e.g. 'abdomen')")
    parser.add_argument("--metric", help="one metric, e.g. global_noise_hu")
    parser.add_argument("--format", choices=REPORT_FORMATS, default="text", help="output format (default: text)")
    parser.add_argument("--out", help="write to this file instead of standard output")


def _write(content: str | bytes, out: str | None) -> None:
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    elif isinstance(content, bytes):
        sys.stdout.buffer.write(content)
        sys.stdout.flush()
    else:
        sys.stdout.write(content)


def run(args: argparse.Namespace, db: Database, scanners: list[str], settings: TrendSettings | None = None) -> int:
    """The ``qa-report`` command: 0 report written, 1 nothing to report, 2 bad request (unknown scanner,
    bad period). Messages go to standard error."""
    settings = settings or TrendSettings()
    until = args.until or datetime.now(settings.tz()).date()
    since = args.since or until - timedelta(days=DEFAULT_PERIOD_DAYS - 1)
    with db.session() as s:
        known = sorted(set(scanners) | set(known_scanners(s)))
        if args.scanner not in known:
            print(
                f"qa-report: unknown scanner {args.scanner!r}; "
                f"known scanners: {', '.join(known) or '(none configured)'}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        try:
            report = build_report(s, settings, args.scanner, since, until, protocol=args.protocol, metric=args.metric)
        except ReportError as exc:
            print(f"qa-report: {exc}", file=sys.stderr)
            return exc.exit_code
        content = render(report, args.format)
    _write(content, args.out)
    if args.out:
        print(
            f"qa-report: wrote {args.format} report of scanner {args.scanner} ({report.period_text}) to {args.out}",
            file=sys.stderr,
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------
# scheduled reports

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def generate_scheduled_reports(
    db: Database,
    settings: ReportingSettings,
    scanners: Sequence[str],
    data_dir: str | Path,
    *,
    today: date | None = None,
) -> list[Path]:
    """Write each scanner's report for the last ``[reports] period_days`` days, in every configured
    format, to ``data_dir/reports/<scanner>/<scanner>_<last day>.<ext>``. A scanner without data in the
    period is skipped (logged). Returns the files written. Plain function: the scheduler calls it."""
    trend = settings.trends
    until = today or (datetime.now(trend.tz()).date() - timedelta(days=1))  # the last complete day
    since = until - timedelta(days=settings.reports.period_days - 1)
    written: list[Path] = []
    for scanner in scanners:
        safe = _SAFE.sub("_", scanner).strip("._") or "scanner"
        with db.session() as s:
            try:
                report = build_report(s, trend, scanner, since, until)
            except ReportError as exc:
                log.info("scheduled report: scanner %s skipped: %s", scanner, exc)
                continue
            contents = {fmt: render(report, fmt) for fmt in settings.reports.formats}
        folder = Path(data_dir) / "reports" / safe
        folder.mkdir(parents=True, exist_ok=True)
        for fmt, content in contents.items():
            path = folder / f"{safe}_{until.isoformat()}.{EXTENSIONS[fmt]}"
            tmp = path.with_name(path.name + ".part")
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                tmp.write_text(content, encoding="utf-8")
            tmp.replace(path)
            written.append(path)
        log.info("scheduled report: scanner %s, %s, %d file(s)", scanner, report.period_text, len(contents))
    return written


SCHEDULED_JOB_ID = "ctqa-scheduled-reports"


def schedule_reports(
    scheduler: Any, db: Database, settings: ReportingSettings, scanners: Sequence[str], data_dir: str | Path
) -> Any:
    """Add the nightly report job to an APScheduler 3 scheduler (created and started by the caller).
    Returns the job, or None when ``[reports] schedule`` is empty."""
    if not settings.reports.schedule:
        log.info("scheduled reports are off ([reports] schedule is empty)")
        return None
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(settings.reports.schedule, timezone=settings.reports.timezone)
    return scheduler.add_job(
        generate_scheduled_reports,
        trigger,
        args=[db, settings, list(scanners), str(data_dir)],
        id=SCHEDULED_JOB_ID,
        name="nightly QA reports",
        replace_existing=True,
        coalesce=True,
        misfire_grace_time=3600,
        max_instances=1,
    )
