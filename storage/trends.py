"""Trend data: one row per analysed series per metric, service events and stored alerts.

Keys: scanner (the config name), protocol key (see :func:`protocol_key`), patient-size band (see
:func:`size_band`). A re-analysis of a series replaces its rows (:func:`record_series`), it never
duplicates them. Every query a report or an evaluation makes is served by a named index. Plain
SQLAlchemy constructs only, so the same code runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime

from sqlalchemy import (
    Boolean,
    Date,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from storage.db import Base, UTCDateTime, utcnow

log = logging.getLogger(__name__)

UID_LEN = 64
PROTOCOL_LEN = 200
SCANNER_LEN = 64
METRIC_LEN = 64

#: Water-equivalent-diameter bands (cm), lower bound inclusive: (label, lower, upper).
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("<20", 0.0, 20.0),
    ("20-25", 20.0, 25.0),
    ("25-30", 25.0, 30.0),
    ("30-35", 30.0, 35.0),
    (">35", 35.0, math.inf),
)
UNKNOWN_BAND = "unknown"
SIZE_BAND_LABELS: tuple[str, ...] = tuple(b[0] for b in SIZE_BANDS) + (UNKNOWN_BAND,)


class TrendPoint(Base):
    """One metric value of one analysed series."""

    __tablename__ = "trend_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scanner: Mapped[str] = mapped_column(String(SCANNER_LEN))
    protocol: Mapped[str] = mapped_column(String(PROTOCOL_LEN))
    size_band: Mapped[str] = mapped_column(String(16))
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    metric: Mapped[str] = mapped_column(String(METRIC_LEN))
    value: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        # a re-analysis replaces, never duplicates; also serves "all rows of one series"
        UniqueConstraint("series_instance_uid", "metric", name="uq_trend_series_metric"),
        # qa-report --scanner X [--metric M] over a period
        Index("ix_trend_scanner_metric_time", "scanner", "metric", "acquired_at"),
        # evaluation of one control chart: scanner x protocol x metric history in time order
        Index("ix_trend_scanner_protocol_metric_time", "scanner", "protocol", "metric", "acquired_at"),
        # qa-report --scanner X over a period, every metric
        Index("ix_trend_scanner_time", "scanner", "acquired_at"),
    )


class ServiceEvent(Base):
    """Something done to a scanner (tube replaced, recalibration); ``rebaseline`` starts new baselines."""

    __tablename__ = "service_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scanner: Mapped[str] = mapped_column(String(SCANNER_LEN))
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    text: Mapped[str] = mapped_column(Text)
    rebaseline: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_event_scanner_time", "scanner", "occurred_at"),)


class Alert(Base):
    """A control-chart violation of one metric on one day of one scanner x protocol (x size band).

    Unique per (scanner, protocol, size band, metric, day, rule): re-evaluating the day updates the row.
    """

    __tablename__ = "trend_alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scanner: Mapped[str] = mapped_column(String(SCANNER_LEN))
    protocol: Mapped[str] = mapped_column(String(PROTOCOL_LEN))
    size_band: Mapped[str] = mapped_column(String(16))  # "all" when charts are not split by size
    metric: Mapped[str] = mapped_column(String(METRIC_LEN))
    day: Mapped[date] = mapped_column(Date)
    rule: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))  # "action" or "alert"
    value: Mapped[float] = mapped_column(Float)  # the day's median
    n_series: Mapped[int] = mapped_column(Integer)
    centre: Mapped[float] = mapped_column(Float)
    lower: Mapped[float] = mapped_column(Float)  # control limits
    upper: Mapped[float] = mapped_column(Float)
    tolerance_low: Mapped[float | None] = mapped_column(Float)
    tolerance_high: Mapped[float | None] = mapped_column(Float)
    action_low: Mapped[float | None] = mapped_column(Float)
    action_high: Mapped[float | None] = mapped_column(Float)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))  # the series that raised it
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    emailed: Mapped[bool] = mapped_column(Boolean, default=False)
    emailed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("scanner", "protocol", "size_band", "metric", "day", "rule", name="uq_alert_chart_day_rule"),
        # qa-report: a scanner's alerts over a period
        Index("ix_alert_scanner_day", "scanner", "day"),
        # the mailer: alerts not yet e-mailed
        Index("ix_alert_emailed_created", "emailed", "created_at"),
    )


# ---------------------------------------------------------------------------------------------------
# keys


_WS = re.compile(r"\s+")


def _norm_text(value: str | None) -> str:
    if value is None:
        return ""
    return _WS.sub(" ", str(value).replace("\\", " ").replace("_", " ")).strip().upper()


def protocol_key(
    protocol_name: str | None,
    series_description: str | None,
    kernel: str | Sequence[str] | None,
    kvp: float | None,
    slice_thickness_mm: float | None,
    reformat: str | None = None,
) -> str:
    """A stable key for "the same protocol": normalised name + kernel + kVp + slice thickness.

    ``reformat`` (e.g. ``"MIP"``, for a derived reformat) is appended to the name in brackets, so a
    reformat that keeps its source's description and reconstruction gets a trend of its own.

    The name is ProtocolName, or SeriesDescription when ProtocolName is empty, upper-cased with
    whitespace and underscores collapsed. Kernel keeps its case (vendors distinguish it); a
    multi-valued ConvolutionKernel is joined with a space. Example: ``"ABDOMEN ROUTINE | Br40d | 120 kV
    | 5 mm"``. Missing parts read ``?``.
    """
    name = _norm_text(protocol_name) or _norm_text(series_description) or "UNNAMED"
    marker = f" [{_norm_text(reformat)}]" if reformat and _norm_text(reformat) else ""
    if kernel is None or (not isinstance(kernel, str) and len(kernel) == 0):
        kern = "?"
    elif isinstance(kernel, str):
        kern = _WS.sub(" ", kernel.replace("\\", " ")).strip() or "?"
    else:
        kern = " ".join(str(k).strip() for k in kernel if str(k).strip()) or "?"
    if kvp is None or not math.isfinite(float(kvp)) or float(kvp) <= 0:
        kv = "? kV"
    else:
        kv = f"{float(kvp):.0f} kV"
    if slice_thickness_mm is None or not math.isfinite(float(slice_thickness_mm)) or float(slice_thickness_mm) <= 0:
        st = "? mm"
    else:
        st = f"{round(float(slice_thickness_mm), 2):g} mm"
    key = f"{name}{marker} | {kern} | {kv} | {st}"
    if len(key) > PROTOCOL_LEN:
        # keep the technical suffix, shorten the name
        suffix = f"{marker} | {kern} | {kv} | {st}"
        key = name[: max(1, PROTOCOL_LEN - len(suffix))] + suffix
        key = key[:PROTOCOL_LEN]
    return key


def size_band(wed_cm: float | None) -> str:
    """The water-equivalent-diameter band of a patient: ``<20``, ``20-25``, ``25-30``, ``30-35``, ``>35``
    (cm, lower bound inclusive) or ``unknown`` when the WED is missing or not a positive number."""
    if wed_cm is None:
        return UNKNOWN_BAND
    w = float(wed_cm)
    if not math.isfinite(w) or w <= 0:
        return UNKNOWN_BAND
    if w > 100:
        raise ValueError(f'Argument "wed_cm" must be in centimetres (0-100), got {w}; was it given in mm?')
    for label, lo, hi in SIZE_BANDS:
        if lo <= w < hi:
            return label
    return UNKNOWN_BAND  # unreachable: the bands cover (0, inf)


# ---------------------------------------------------------------------------------------------------
# repository functions


def _check_aware(name: str, value: datetime) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f'Argument "{name}" must be a timezone-aware datetime (UTC), got {value!r}')


def record_series(
    session: Session,
    *,
    scanner: str,
    protocol: str,
    size_band: str,
    series_instance_uid: str,
    acquired_at: datetime,
    metrics: Mapping[str, float | None],
) -> int:
    """Store one analysed series' metrics, replacing any rows of an earlier analysis of that series.

    ``None`` and non-finite values are not stored (a missing measurement is not a trend point).
    Returns the number of rows stored.
    """
    if not scanner or len(scanner) > SCANNER_LEN:
        raise ValueError(
            f'Argument "scanner" must be a non-empty config name of at most {SCANNER_LEN} characters, got {scanner!r}'
        )
    if not protocol or len(protocol) > PROTOCOL_LEN:
        raise ValueError(f'Argument "protocol" must be a key from protocol_key(), got {protocol!r}')
    if size_band not in SIZE_BAND_LABELS:
        raise ValueError(f'Argument "size_band" must be one of {", ".join(SIZE_BAND_LABELS)}, got {size_band!r}')
    if not series_instance_uid or len(series_instance_uid) > UID_LEN:
        raise ValueError(
            f'Argument "series_instance_uid" must be a UID of 1-64 characters, got {series_instance_uid!r}'
        )
    _check_aware("acquired_at", acquired_at)
    session.execute(delete(TrendPoint).where(TrendPoint.series_instance_uid == series_instance_uid))
    n = 0
    for name, value in metrics.items():
        if not name or len(name) > METRIC_LEN:
            raise ValueError(
                f'Argument "metrics" has a metric name that is empty or longer than {METRIC_LEN}: {name!r}'
            )
        if value is None or not math.isfinite(float(value)):
            continue
        session.add(
            TrendPoint(
                scanner=scanner,
                protocol=protocol,
                size_band=size_band,
                series_instance_uid=series_instance_uid,
                acquired_at=acquired_at,
                metric=name,
                value=float(value),
            )
        )
        n += 1
    session.flush()
    log.debug("trend: %d metric rows for a series on scanner %s, protocol %s", n, scanner, protocol)
    return n


def series_points(session: Session, scanner: str, series_instance_uid: str) -> list[TrendPoint]:
    """The stored rows of one series (empty when it was never recorded for this scanner)."""
    stmt = (
        select(TrendPoint)
        .where(TrendPoint.series_instance_uid == series_instance_uid, TrendPoint.scanner == scanner)
        .order_by(TrendPoint.metric)
    )
    return list(session.scalars(stmt))


def history(
    session: Session,
    scanner: str,
    *,
    protocol: str | None = None,
    metric: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[TrendPoint]:
    """A scanner's trend rows in time order, optionally for one protocol / metric and a period
    (``since`` inclusive, ``until`` exclusive)."""
    stmt = select(TrendPoint).where(TrendPoint.scanner == scanner)
    if protocol is not None:
        stmt = stmt.where(TrendPoint.protocol == protocol)
    if metric is not None:
        stmt = stmt.where(TrendPoint.metric == metric)
    if since is not None:
        _check_aware("since", since)
        stmt = stmt.where(TrendPoint.acquired_at >= since)
    if until is not None:
        _check_aware("until", until)
        stmt = stmt.where(TrendPoint.acquired_at < until)
    stmt = stmt.order_by(TrendPoint.acquired_at, TrendPoint.id)
    return list(session.scalars(stmt))


def known_scanners(session: Session) -> list[str]:
    """Scanner names that have trend data or service events."""
    a = set(session.scalars(select(TrendPoint.scanner).distinct()))
    b = set(session.scalars(select(ServiceEvent.scanner).distinct()))
    return sorted(a | b)


def add_service_event(
    session: Session, *, scanner: str, occurred_at: datetime, text: str, rebaseline: bool = False
) -> ServiceEvent:
    """Record a service event; with ``rebaseline`` every chart of the scanner starts a new baseline
    with the first series acquired at or after ``occurred_at``."""
    if not scanner or len(scanner) > SCANNER_LEN:
        raise ValueError(f'Argument "scanner" must be a non-empty config name, got {scanner!r}')
    _check_aware("occurred_at", occurred_at)
    if not text or not text.strip():
        raise ValueError('Argument "text" must describe the event, e.g. "tube replaced", got an empty string')
    ev = ServiceEvent(scanner=scanner, occurred_at=occurred_at, text=text.strip(), rebaseline=bool(rebaseline))
    session.add(ev)
    session.flush()
    log.info("service event on scanner %s at %s (rebaseline=%s)", scanner, occurred_at.isoformat(), ev.rebaseline)
    return ev


def service_events(
    session: Session, scanner: str, *, since: datetime | None = None, until: datetime | None = None
) -> list[ServiceEvent]:
    stmt = select(ServiceEvent).where(ServiceEvent.scanner == scanner)
    if since is not None:
        stmt = stmt.where(ServiceEvent.occurred_at >= since)
    if until is not None:
        stmt = stmt.where(ServiceEvent.occurred_at < until)
    return list(session.scalars(stmt.order_by(ServiceEvent.occurred_at, ServiceEvent.id)))


def alerts_for(
    session: Session, scanner: str, *, since: date | None = None, until: date | None = None
) -> list[Alert]:
    """A scanner's stored alerts by day (``since`` inclusive, ``until`` exclusive)."""
    stmt = select(Alert).where(Alert.scanner == scanner)
    if since is not None:
        stmt = stmt.where(Alert.day >= since)
    if until is not None:
        stmt = stmt.where(Alert.day < until)
    return list(session.scalars(stmt.order_by(Alert.day, Alert.id)))


def pending_alerts(session: Session, limit: int = 100) -> list[Alert]:
    """Alerts not yet e-mailed, oldest first."""
    stmt = select(Alert).where(Alert.emailed.is_(False)).order_by(Alert.created_at, Alert.id).limit(limit)
    return list(session.scalars(stmt))
