"""Baselines, robust control limits, SPC rules, tolerance/action levels and alerts.

One control chart per scanner x protocol (x size band, when ``[trends] by_size_band``) x metric. A
chart *point* is the median of the series of one day (local day in ``[trends] timezone``), or of a few
consecutive days when one day holds fewer than ``series_per_point`` series (weekends, rare protocols).
Single patients are not process measurements (size, positioning, contrast phase move them); the median
of a point is. The limits of a point depend on how many series it holds:
sigma(n) = sqrt(between^2 + f(n) * within^2 / n), with the day-to-day ("between") and the
series-to-series ("within") spread estimated robustly from the baseline (see :func:`baseline_stats`).

Per chart and *epoch* (the time between two re-baselining service events):

- baseline: the first points holding at least ``baseline_n`` series and spanning at least
  ``baseline_min_days`` days, or the points inside ``[baseline_from, baseline_to]`` when configured
  (for the epoch that contains them);
- centre = median of the baseline points' medians; spreads from medians and MADs (1.4826 * MAD);
- SPC rules on each later point: ``beyond_limits`` (|x - centre| > sigma_k * sigma(n)), ``run`` (the
  last ``run_length`` points all on one side of the centre), ``trend`` (the last ``trend_length`` points
  strictly increasing or decreasing). With ``direction = "increase"`` / ``"decrease"`` in a metric's
  limits only violations on that side count;
- tolerance and action levels around the centre (percent or absolute, per metric).

A point's status: ``action`` (beyond the action level) > ``tolerance`` (beyond tolerance) >
``out_of_control`` (an SPC rule, within tolerance) > ``ok``; ``baseline`` while the point belongs to the
baseline or the baseline is not complete; ``pending`` for the newest point while it still collects series
(unless it already holds ``early_action_min_series`` series whose median is beyond both the action level
and its control limits: then it is ``action`` at once).

An alert is raised (stored, logged, e-mailable) for the action level, and for an SPC rule when the
point is also outside the tolerance level, or when the metric has no tolerance level configured.
Statistically significant changes inside the physicist's tolerance are shown on the chart but page
nobody: with dozens of charts per scanner, plain 3-sigma/run/trend rules raise false alerts every week.
Alerts are filed under the point's last day.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from reports.trend_settings import (
    RULE_ACTION,
    RULE_BEYOND,
    RULE_RUN,
    RULE_TREND,
    MetricLimits,
    TrendSettings,
)
from storage.db import utcnow
from storage.trends import Alert, ServiceEvent, TrendPoint, series_points

log = logging.getLogger(__name__)

ALL_BANDS = "all"
MAD_TO_SIGMA = 1.4826

STATUS_BASELINE = "baseline"
STATUS_PENDING = "pending"  # the last point is still collecting series
STATUS_OK = "ok"
STATUS_OOC = "out_of_control"
STATUS_TOLERANCE = "tolerance"
STATUS_ACTION = "action"

RULE_TEXT = {
    RULE_BEYOND: "beyond the control limits",
    RULE_RUN: "run of days on one side of the centre",
    RULE_TREND: "trend of days steadily moving",
    RULE_ACTION: "beyond the action level",
}


@dataclass(frozen=True)
class Sample:
    acquired_at: datetime
    value: float
    series_instance_uid: str


@dataclass(frozen=True)
class ChartKey:
    scanner: str
    protocol: str
    size_band: str  # a band label, or "all"
    metric: str


@dataclass(frozen=True)
class Baseline:
    epoch: int
    epoch_start: datetime | None  # the re-baselining event, None for the first epoch
    first_day: date | None
    last_day: date | None
    n_days: int
    n_series: int
    centre: float | None
    sigma_between: float | None  # day-to-day spread
    sigma_within: float | None  # series-to-series spread within a day
    complete: bool
    source: str  # "first_n" or "date_range"


@dataclass(frozen=True)
class DayPoint:
    """One chart point: the series of ``first_day`` .. ``day`` (one day, or several when a day holds
    fewer than ``series_per_point`` series)."""

    day: date  # the point's last day: the day it is plotted on and its alerts are filed under
    first_day: date
    value: float  # median of the point's series
    n_series: int
    epoch: int
    in_baseline: bool
    centre: float | None
    sigma: float | None  # the sigma of a day with this many series
    lower: float | None  # control limits
    upper: float | None
    tolerance_low: float | None
    tolerance_high: float | None
    action_low: float | None
    action_high: float | None
    rules: tuple[str, ...]  # SPC rules violated on this day
    alert_rules: tuple[str, ...]  # the ones (plus the action level) that raise an alert
    status: str
    last_series_uid: str


@dataclass(frozen=True)
class ChartAnalysis:
    key: ChartKey
    points: tuple[DayPoint, ...]
    baselines: tuple[Baseline, ...]
    n_series: int

    def point_on(self, day: date) -> DayPoint | None:
        """The point holding ``day`` (the latest one when a re-baselining event splits the day)."""
        for p in reversed(self.points):
            if p.first_day <= day <= p.day:
                return p
        return None


@dataclass(frozen=True)
class Evaluation:
    """One metric of one series against its chart; what the SR's qualitative evaluation reports."""

    metric: str
    protocol: str
    size_band: str
    value: float  # the series' own value
    day: date
    day_value: float  # the day's median, the charted value
    n_day: int
    centre: float | None
    sigma: float | None
    lower: float | None
    upper: float | None
    tolerance_low: float | None
    tolerance_high: float | None
    action_low: float | None
    action_high: float | None
    status: str
    rules: tuple[str, ...]
    alert_rules: tuple[str, ...]

    @property
    def within(self) -> bool:
        """True when the day is in control and within tolerance (or still part of the baseline)."""
        return self.status in (STATUS_OK, STATUS_BASELINE)


# ---------------------------------------------------------------------------------------------------
# pure statistics


def robust_centre_sigma(values: Sequence[float]) -> tuple[float, float]:
    """Median and 1.4826 * MAD; the standard deviation when the MAD is 0; a tiny positive sigma when all
    values are equal (so any change is out of control)."""
    if len(values) == 0:
        raise ValueError('Argument "values" must not be empty')
    a = np.asarray(values, dtype=float)
    centre = float(np.median(a))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(a - centre)))
    if sigma <= 0 and a.size > 1:
        sigma = float(np.std(a, ddof=1))
    if sigma <= 0:
        sigma = 1e-9 * max(1.0, abs(centre))
    return centre, sigma


def median_variance_factor(n: int) -> float:
    """Var(median of n) / (sigma^2 / n) for normal data: 1 for n <= 2 (the mean), about pi/2 beyond."""
    if n < 1:
        raise ValueError(f'Argument "n" must be >= 1, got {n}')
    if n <= 2:
        return 1.0
    return math.pi / 2 * n / (n + 0.5) if n < 20 else math.pi / 2


_CHI2_1_MEDIAN = 0.454936


@dataclass(frozen=True)
class ChartStats:
    """Robust baseline statistics of a daily-median chart: the sigma of a day with n series is
    sqrt(between^2 + factor(n) * within^2 / n)."""

    centre: float
    sigma_between: float  # day-to-day (scanner) spread
    sigma_within: float  # series-to-series (patient) spread within a day

    def day_sigma(self, n: int) -> float:
        return math.sqrt(self.sigma_between**2 + median_variance_factor(n) * self.sigma_within**2 / n)


def baseline_stats(days: Sequence[Sequence[float]]) -> ChartStats:
    """Robust centre and spreads from the baseline days' series values.

    centre = median of the day medians; within = 1.4826 * MAD of the series' deviations from their day's
    median (days with >= 2 series; corrected for the shrinkage towards the median), between = the
    value that makes the standardised squared deviations of the day medians have the median of a
    chi-square(1) variable (a robust moment estimate, 0 when the day medians scatter no more than the
    patient spread explains).
    """
    if not days or any(len(d) == 0 for d in days):
        raise ValueError('Argument "days" must be a non-empty list of non-empty lists of values')
    med = np.array([float(np.median(d)) for d in days])
    ns = np.array([len(d) for d in days])
    centre = float(np.median(med))
    resid: list[float] = []
    for d, m in zip(days, med):
        if len(d) >= 2:
            k = math.sqrt(len(d) / (len(d) - 1))
            resid.extend((np.asarray(d, dtype=float) - m) * k)
    if resid:
        within = MAD_TO_SIGMA * float(np.median(np.abs(resid)))
    else:
        within = 0.0
    dev2 = (med - centre) ** 2
    kw = np.array([median_variance_factor(int(n)) / n for n in ns]) * within**2

    def f(s: float) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(s + kw > 0, dev2 / (s + kw), np.where(dev2 > 0, np.inf, 0.0))
        return float(np.median(r))

    between = 0.0
    if len(days) >= 2 and f(0.0) > _CHI2_1_MEDIAN:
        lo, hi = 0.0, float(dev2.max()) / _CHI2_1_MEDIAN + 1e-300
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            if f(mid) > _CHI2_1_MEDIAN:
                lo = mid
            else:
                hi = mid
        between = math.sqrt(hi)
    if between == 0.0 and within == 0.0:
        _, fallback = robust_centre_sigma(med)
        between = fallback
    return ChartStats(centre=centre, sigma_between=between, sigma_within=within)


def _side_ok(direction: str, sign: int) -> bool:
    return direction == "both" or (direction == "increase" and sign > 0) or (direction == "decrease" and sign < 0)


def spc_rules(
    history: Sequence[float], centre: float, sigma: float, settings: TrendSettings, direction: str = "both"
) -> tuple[str, ...]:
    """SPC rules violated by the last value of ``history`` (the epoch's day values up to and including it)."""
    if not history:
        return ()
    x = history[-1]
    out: list[str] = []
    if RULE_BEYOND in settings.rules and abs(x - centre) > settings.sigma * sigma:
        if _side_ok(direction, 1 if x > centre else -1):
            out.append(RULE_BEYOND)
    L = settings.run_length
    if RULE_RUN in settings.rules and len(history) >= L:
        last = history[-L:]
        if all(v > centre for v in last) and _side_ok(direction, 1):
            out.append(RULE_RUN)
        elif all(v < centre for v in last) and _side_ok(direction, -1):
            out.append(RULE_RUN)
    T = settings.trend_length
    if RULE_TREND in settings.rules and len(history) >= T:
        last = history[-T:]
        diffs = np.diff(last)
        if np.all(diffs > 0) and _side_ok(direction, 1):
            out.append(RULE_TREND)
        elif np.all(diffs < 0) and _side_ok(direction, -1):
            out.append(RULE_TREND)
    return tuple(out)


def _outside(x: float, low: float | None, high: float | None) -> bool:
    return (low is not None and x < low) or (high is not None and x > high)


def local_day(t: datetime, tz: ZoneInfo) -> date:
    return t.astimezone(tz).date()


def day_end_utc(day: date, tz: ZoneInfo) -> datetime:
    """The first instant after ``day`` (local) as an aware datetime."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)


def analyse_chart(
    key: ChartKey,
    samples: Iterable[Sample],
    rebaseline_at: Sequence[datetime],
    settings: TrendSettings,
) -> ChartAnalysis:
    """Points, baselines, limits, rules and statuses of one chart (pure).

    Within each epoch, consecutive days are gathered into one point until it holds at least
    ``series_per_point`` series (a busy protocol: one point per day; a rare one: one per few days);
    a last point still short of that is ``pending``.
    """
    tz = settings.tz()
    limits: MetricLimits | None = settings.limits.get(key.metric)
    direction = limits.direction if limits is not None else "both"
    events = sorted(rebaseline_at)
    grouped: dict[tuple[int, date], list[Sample]] = defaultdict(list)
    n_total = 0
    for s in sorted(samples, key=lambda s: s.acquired_at):
        epoch = bisect.bisect_right(events, s.acquired_at)
        grouped[(epoch, local_day(s.acquired_at, tz))].append(s)
        n_total += 1
    by_epoch: dict[int, list[tuple[date, list[Sample]]]] = defaultdict(list)
    for (epoch, day), ss in sorted(grouped.items()):
        by_epoch[epoch].append((day, ss))

    points: list[DayPoint] = []
    baselines: list[Baseline] = []
    per_point = settings.series_per_point
    for epoch in sorted(by_epoch):
        # --- gather days into points
        batches: list[tuple[date, date, list[Sample]]] = []
        cur: list[Sample] = []
        first: date | None = None
        for day, ss in by_epoch[epoch]:
            first = first or day
            cur.extend(ss)
            if len(cur) >= per_point:
                batches.append((first, day, cur))
                cur, first = [], None
        open_batch = (first, by_epoch[epoch][-1][0], cur) if cur and first is not None else None
        closed = len(batches)
        if open_batch is not None:
            batches.append(open_batch)
        medians = [float(np.median([s.value for s in ss])) for _, _, ss in batches]
        # --- baseline points (closed ones only)
        source = "first_n"
        base_idx: list[int] = []
        complete = False
        if settings.baseline_from is not None and settings.baseline_to is not None:
            base_idx = [
                i
                for i in range(closed)
                if settings.baseline_from <= batches[i][0] and batches[i][1] <= settings.baseline_to
            ]
            if base_idx:
                source = "date_range"
                # complete once the range is over and it holds at least 2 points
                complete = len(base_idx) >= 2 and batches[-1][1] > settings.baseline_to
        if source == "first_n":
            n_series = 0
            base_days = 0
            base_idx = []
            for i in range(closed):
                f, l, ss = batches[i]
                base_idx.append(i)
                n_series += len(ss)
                base_days += (l - f).days + 1
                if n_series >= settings.baseline_n and base_days >= settings.baseline_min_days and len(base_idx) >= 2:
                    complete = True
                    break
        base_set = set(base_idx)
        stats: ChartStats | None = None
        if complete:
            stats = baseline_stats([[s.value for s in batches[i][2]] for i in base_idx])
        centre = stats.centre if stats is not None else None
        baselines.append(
            Baseline(
                epoch=epoch,
                epoch_start=events[epoch - 1] if epoch > 0 else None,
                first_day=batches[base_idx[0]][0] if base_idx else None,
                last_day=batches[base_idx[-1]][1] if base_idx else None,
                n_days=sum((batches[i][1] - batches[i][0]).days + 1 for i in base_idx),
                n_series=sum(len(batches[i][2]) for i in base_idx),
                centre=centre,
                sigma_between=stats.sigma_between if stats is not None else None,
                sigma_within=stats.sigma_within if stats is not None else None,
                complete=complete,
                source=source,
            )
        )
        tol = limits.band(centre, limits.tolerance) if (limits and centre is not None) else (None, None)
        act = limits.band(centre, limits.action) if (limits and centre is not None) else (None, None)
        for i, (first_day, day, ss) in enumerate(batches):
            x = medians[i]
            n = len(ss)
            in_base = i in base_set or not complete
            sigma = lower = upper = None
            if stats is not None:
                sigma = stats.day_sigma(n)
                lower, upper = stats.centre - settings.sigma * sigma, stats.centre + settings.sigma * sigma
            rules: tuple[str, ...] = ()
            alert_rules: tuple[str, ...] = ()
            status = STATUS_BASELINE
            if i >= closed:
                status = STATUS_PENDING
                # a gross change need not wait for the point to fill: beyond the action level and beyond the
                # (wider, few-series) control limits already raises the action alert
                early = settings.early_action_min_series
                if early and n >= early and not in_base and stats is not None and sigma is not None:
                    if _outside(x, *act) and abs(x - stats.centre) > settings.sigma * sigma:
                        status = STATUS_ACTION
                        alert_rules = (RULE_ACTION,)
            elif not in_base and stats is not None and sigma is not None:
                rules = spc_rules(medians[: i + 1], stats.centre, sigma, settings, direction)
                beyond_action = _outside(x, *act)
                beyond_tol = _outside(x, *tol)
                if beyond_action:
                    status = STATUS_ACTION
                elif beyond_tol:
                    status = STATUS_TOLERANCE
                elif rules:
                    status = STATUS_OOC
                else:
                    status = STATUS_OK
                no_tolerance = limits is None or limits.tolerance is None
                spc_alerts = rules if (no_tolerance or beyond_tol or beyond_action) else ()
                alert_rules = ((RULE_ACTION,) if beyond_action else ()) + spc_alerts
            points.append(
                DayPoint(
                    day=day,
                    first_day=first_day,
                    value=x,
                    n_series=n,
                    epoch=epoch,
                    in_baseline=in_base and i < closed,
                    centre=centre,
                    sigma=sigma,
                    lower=lower,
                    upper=upper,
                    tolerance_low=tol[0],
                    tolerance_high=tol[1],
                    action_low=act[0],
                    action_high=act[1],
                    rules=rules,
                    alert_rules=alert_rules,
                    status=status,
                    last_series_uid=ss[-1].series_instance_uid,
                )
            )
    return ChartAnalysis(key=key, points=tuple(points), baselines=tuple(baselines), n_series=n_total)


# ---------------------------------------------------------------------------------------------------
# database side


def rebaseline_times(session: Session, scanner: str) -> list[datetime]:
    stmt = (
        select(ServiceEvent.occurred_at)
        .where(ServiceEvent.scanner == scanner, ServiceEvent.rebaseline.is_(True))
        .order_by(ServiceEvent.occurred_at)
    )
    return list(session.scalars(stmt))


def load_samples(
    session: Session,
    scanner: str,
    settings: TrendSettings,
    *,
    protocol: str | None = None,
    metric: str | None = None,
    size_band: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[ChartKey, list[Sample]]:
    """A scanner's trend rows grouped into charts (columns only, no ORM objects: a year stays fast)."""
    stmt = select(
        TrendPoint.protocol,
        TrendPoint.size_band,
        TrendPoint.metric,
        TrendPoint.acquired_at,
        TrendPoint.value,
        TrendPoint.series_instance_uid,
    ).where(TrendPoint.scanner == scanner)
    if protocol is not None:
        stmt = stmt.where(TrendPoint.protocol == protocol)
    if metric is not None:
        stmt = stmt.where(TrendPoint.metric == metric)
    if size_band is not None and settings.by_size_band:
        stmt = stmt.where(TrendPoint.size_band == size_band)
    if since is not None:
        stmt = stmt.where(TrendPoint.acquired_at >= since)
    if until is not None:
        stmt = stmt.where(TrendPoint.acquired_at < until)
    stmt = stmt.order_by(TrendPoint.acquired_at, TrendPoint.id)
    out: dict[ChartKey, list[Sample]] = defaultdict(list)
    for prot, band, met, t, v, uid in session.execute(stmt):
        key = ChartKey(scanner, prot, band if settings.by_size_band else ALL_BANDS, met)
        out[key].append(Sample(t, float(v), uid))
    return dict(out)


def analyse_scanner(
    session: Session,
    settings: TrendSettings,
    scanner: str,
    *,
    protocol: str | None = None,
    metric: str | None = None,
    until: datetime | None = None,
) -> list[ChartAnalysis]:
    """Every chart of a scanner over its whole history up to ``until`` (baselines need the past): the
    trended metrics (``[trends] metrics``), or the one ``metric`` asked for."""
    events = rebaseline_times(session, scanner)
    charts = load_samples(session, scanner, settings, protocol=protocol, metric=metric, until=until)
    keys = [k for k in charts if metric is not None or settings.trended(k.metric)]
    keys.sort(key=lambda k: (k.protocol, k.size_band, k.metric))
    return [analyse_chart(k, charts[k], events, settings) for k in keys]


def _alert_message(key: ChartKey, p: DayPoint, rule: str) -> str:
    parts = [
        f"scanner {key.scanner}, protocol {key.protocol}"
        + (f", size band {key.size_band} cm" if key.size_band != ALL_BANDS else ""),
        f"metric {key.metric} on {p.day.isoformat()}: median {p.value:.4g} of {p.n_series} series"
        + (f" ({p.first_day.isoformat()} to {p.day.isoformat()})" if p.first_day != p.day else ""),
        f"rule: {RULE_TEXT.get(rule, rule)}",
    ]
    if p.centre is not None and p.lower is not None and p.upper is not None:
        parts.append(f"baseline centre {p.centre:.4g}, control limits {p.lower:.4g} to {p.upper:.4g}")
    if p.tolerance_low is not None or p.tolerance_high is not None:
        parts.append(f"tolerance {_fmt(p.tolerance_low)} to {_fmt(p.tolerance_high)}")
    if p.action_low is not None or p.action_high is not None:
        parts.append(f"action {_fmt(p.action_low)} to {_fmt(p.action_high)}")
    return "; ".join(parts)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _fill_alert(a: Alert, key: ChartKey, p: DayPoint, rule: str, trigger_uid: str, msg: str, now: datetime) -> None:
    a.severity = "action" if rule == RULE_ACTION else "alert"
    a.value = p.value
    a.n_series = p.n_series
    a.centre = float(p.centre) if p.centre is not None else math.nan
    a.lower = float(p.lower) if p.lower is not None else math.nan
    a.upper = float(p.upper) if p.upper is not None else math.nan
    a.tolerance_low, a.tolerance_high = p.tolerance_low, p.tolerance_high
    a.action_low, a.action_high = p.action_low, p.action_high
    a.series_instance_uid = trigger_uid
    a.message = msg
    a.updated_at = now


def _store_day_alerts(
    session: Session, key: ChartKey, p: DayPoint, existing: dict[str, Alert], trigger_uid: str
) -> list[Alert]:
    """Upsert the alerts of one chart-day; drop stale ones that were not e-mailed. Returns new/updated.

    On PostgreSQL a new alert is inserted inside a SAVEPOINT: when another worker inserted the same
    (chart, day, rule) since ``existing`` was read, that row is updated instead of failing the whole
    transaction. SQLite needs no such guard (one writer at a time, and the node writes the series' trend
    rows, taking the write lock, before it reads the alerts) and pysqlite's SAVEPOINT handling would
    commit early outside an explicit transaction.
    """
    now = utcnow()
    savepoints = session.get_bind().dialect.name != "sqlite"
    changed: list[Alert] = []
    for rule, a in list(existing.items()):
        if rule not in p.alert_rules and not a.emailed:
            session.delete(a)
    for rule in p.alert_rules:
        msg = _alert_message(key, p, rule)
        a = existing.get(rule)
        if a is not None:
            if a.value == p.value and a.n_series == p.n_series:
                continue
            _fill_alert(a, key, p, rule, trigger_uid, msg, now)
            changed.append(a)
            continue
        a = Alert(
            scanner=key.scanner,
            protocol=key.protocol,
            size_band=key.size_band,
            metric=key.metric,
            day=p.day,
            rule=rule,
            created_at=now,
            emailed=False,
        )
        _fill_alert(a, key, p, rule, trigger_uid, msg, now)
        if not savepoints:
            session.add(a)
            log.warning("trend alert: %s", msg)
            changed.append(a)
            continue
        try:
            with session.begin_nested():
                session.add(a)
        except IntegrityError:
            theirs = session.scalars(
                select(Alert).where(
                    Alert.scanner == key.scanner,
                    Alert.protocol == key.protocol,
                    Alert.size_band == key.size_band,
                    Alert.metric == key.metric,
                    Alert.day == p.day,
                    Alert.rule == rule,
                )
            ).one()
            _fill_alert(theirs, key, p, rule, trigger_uid, msg, now)
            changed.append(theirs)
            continue
        log.warning("trend alert: %s", msg)
        changed.append(a)
    return changed


def _existing_alerts(session: Session, key: ChartKey, day: date) -> dict[str, Alert]:
    stmt = select(Alert).where(
        Alert.scanner == key.scanner,
        Alert.protocol == key.protocol,
        Alert.size_band == key.size_band,
        Alert.metric == key.metric,
        Alert.day == day,
    )
    return {a.rule: a for a in session.scalars(stmt)}


def evaluate_series(
    session: Session, settings: TrendSettings, scanner: str, series_instance_uid: str
) -> list[Evaluation]:
    """Evaluate a freshly recorded series (call after ``storage.trends.record_series``).

    For each of its trended metrics (``[trends] metrics``): recompute the chart up to the end of the
    series' day, classify the point holding that day,
    store (upsert) and log the alerts it raises. Returns one :class:`Evaluation` per metric, for the
    series' SR. No patient data is read or logged. A series with no trend rows gives ``[]``.
    """
    own = series_points(session, scanner, series_instance_uid)
    if not own:
        log.warning("evaluate_series: no trend rows for this series on scanner %s; record_series first", scanner)
        return []
    tz = settings.tz()
    events = rebaseline_times(session, scanner)
    out: list[Evaluation] = []
    for tp in own:
        if not settings.trended(tp.metric):
            continue
        day = local_day(tp.acquired_at, tz)
        epoch = bisect.bisect_right(events, tp.acquired_at)
        since = events[epoch - 1] if epoch > 0 else None
        band = tp.size_band if settings.by_size_band else ALL_BANDS
        charts = load_samples(
            session,
            scanner,
            settings,
            protocol=tp.protocol,
            metric=tp.metric,
            size_band=tp.size_band,
            since=since,
            until=day_end_utc(day, tz),
        )
        key = ChartKey(scanner, tp.protocol, band, tp.metric)
        chart = analyse_chart(key, charts.get(key, []), events, settings)
        p = chart.point_on(day)
        if p is None:  # cannot happen: the series itself is in the chart
            raise RuntimeError(f"series day {day} missing from its own chart {key}")
        _store_day_alerts(session, key, p, _existing_alerts(session, key, day), series_instance_uid)
        out.append(
            Evaluation(
                metric=tp.metric,
                protocol=tp.protocol,
                size_band=band,
                value=tp.value,
                day=day,
                day_value=p.value,
                n_day=p.n_series,
                centre=p.centre,
                sigma=p.sigma,
                lower=p.lower,
                upper=p.upper,
                tolerance_low=p.tolerance_low,
                tolerance_high=p.tolerance_high,
                action_low=p.action_low,
                action_high=p.action_high,
                status=p.status,
                rules=p.rules,
                alert_rules=p.alert_rules,
            )
        )
    session.flush()
    return out


def reevaluate_scanner(session: Session, settings: TrendSettings, scanner: str, *, since: date | None = None) -> int:
    """Recompute every chart of a scanner and bring the stored alerts of days >= ``since`` in line
    (after a re-baselining service event, a change of limits, or a bulk import). Returns the number of
    alerts that fire on those days."""
    charts = analyse_scanner(session, settings, scanner)
    stmt = select(Alert).where(Alert.scanner == scanner)
    if since is not None:
        stmt = stmt.where(Alert.day >= since)
    existing: dict[tuple[str, str, str, date], dict[str, Alert]] = defaultdict(dict)
    for a in session.scalars(stmt):
        existing[(a.protocol, a.size_band, a.metric, a.day)][a.rule] = a
    n = 0
    seen: set[tuple[str, str, str, date]] = set()
    for chart in charts:
        k = chart.key
        for p in chart.points:
            if since is not None and p.day < since:
                continue
            ek = (k.protocol, k.size_band, k.metric, p.day)
            seen.add(ek)
            if p.alert_rules or ek in existing:
                _store_day_alerts(session, k, p, existing.get(ek, {}), p.last_series_uid)
            n += len(p.alert_rules)
    for ek, rules in existing.items():
        if ek not in seen:  # the chart-day has no data any more
            for a in rules.values():
                if not a.emailed:
                    session.delete(a)
    session.flush()
    return n
