"""Settings for trends, control limits, alerts and scheduled reports: ``[trends]``,
``[trends.limits.<metric>]``, ``[alerts]`` and ``[reports]`` in config.toml.

Each section is a frozen dataclass with a validating ``from_toml(section, file)`` that rejects unknown
keys and wrong types with a :class:`TrendConfigError` (a ``ValueError``) naming the file, the key and
what is expected. The node's config loader registers these as section validators.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class TrendConfigError(ValueError):
    """A problem in the [trends], [alerts] or [reports] section, phrased for the person who edits it."""


RULE_BEYOND = "beyond_limits"
RULE_RUN = "run"
RULE_TREND = "trend"
RULE_ACTION = "action_level"
SPC_RULES: tuple[str, ...] = (RULE_BEYOND, RULE_RUN, RULE_TREND)
REPORT_FORMATS: tuple[str, ...] = ("text", "csv", "json", "html", "pdf")
def default_trend_metrics() -> tuple[str, ...]:
    """Metrics charted and judged by default: those the model specs mark ``trended`` (image quality
    and dose; reports.codes.trended_keys). Patient descriptors (wed_cm, body_*), counts (n_slices)
    and protocol constants are stored but not trended unless listed in [trends] metrics."""
    from reports.codes import trended_keys

    return trended_keys()


_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


def _type_name(tp: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    if isinstance(tp, tuple):
        return " or ".join(names.get(t, t.__name__) for t in tp)
    return names.get(tp, tp.__name__)


def _get(section: dict, key: str, tp: type | tuple[type, ...], default: Any, file: str, prefix: str) -> Any:
    if key not in section:
        return default
    value = section[key]
    types = tp if isinstance(tp, tuple) else (tp,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
        ok = True
    if not ok:
        raise TrendConfigError(f"{file}: key '{prefix}.{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _check_keys(section: Any, allowed: set[str], file: str, prefix: str) -> None:
    if not isinstance(section, dict):
        raise TrendConfigError(f"{file}: '{prefix}' must be a table ([{prefix}]), got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise TrendConfigError(
            f"{file}: unknown key '{prefix}.{unknown[0]}'; expected one of: {', '.join(sorted(allowed))}"
        )


def _get_date(section: dict, key: str, file: str, prefix: str) -> date | None:
    if key not in section:
        return None
    v = section[key]
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    if isinstance(v, str):
        try:
            return date.fromisoformat(v)
        except ValueError:
            pass
    raise TrendConfigError(f"{file}: key '{prefix}.{key}' must be a date such as 2026-01-31, got {v!r}")


@dataclass(frozen=True)
class MetricLimits:
    """Tolerance and action levels of one metric, relative to its baseline centre.

    ``mode = "percent"``: level = centre * (1 +/- x/100); ``"absolute"``: centre +/- x in the metric's
    unit. ``direction``: which side matters: ``"both"``, ``"increase"`` (only values above) or
    ``"decrease"``.
    """

    metric: str
    tolerance: float | None = None
    action: float | None = None
    mode: str = "percent"
    direction: str = "both"

    def __post_init__(self) -> None:
        if self.mode not in ("percent", "absolute"):
            raise ValueError(f'Argument "mode" must be "percent" or "absolute", got {self.mode!r}')
        if self.direction not in ("both", "increase", "decrease"):
            raise ValueError(f'Argument "direction" must be "both", "increase" or "decrease", got {self.direction!r}')
        for name in ("tolerance", "action"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f'Argument "{name}" must be a number > 0, got {v!r}')
        if self.tolerance is not None and self.action is not None and self.action < self.tolerance:
            raise ValueError(f'Argument "action" ({self.action}) must be >= "tolerance" ({self.tolerance})')

    def band(self, centre: float, level: float | None) -> tuple[float | None, float | None]:
        """(low, high) of a level around ``centre``; a side that does not matter is None."""
        if level is None:
            return None, None
        delta = abs(centre) * level / 100.0 if self.mode == "percent" else level
        low = centre - delta if self.direction in ("both", "decrease") else None
        high = centre + delta if self.direction in ("both", "increase") else None
        return low, high

    @classmethod
    def from_toml(cls, metric: str, section: Any, file: str) -> MetricLimits:
        prefix = f"trends.limits.{metric}"
        _check_keys(section, {"tolerance", "action", "mode", "direction"}, file, prefix)
        tol = _get(section, "tolerance", float, None, file, prefix)
        act = _get(section, "action", float, None, file, prefix)
        mode = _get(section, "mode", str, "percent", file, prefix)
        direction = _get(section, "direction", str, "both", file, prefix)
        if mode not in ("percent", "absolute"):
            raise TrendConfigError(f"{file}: key '{prefix}.mode' must be \"percent\" or \"absolute\", got {mode!r}")
        if direction not in ("both", "increase", "decrease"):
            raise TrendConfigError(
                f"{file}: key '{prefix}.direction' must be \"both\", \"increase\" or \"decrease\", got {direction!r}"
            )
        for key, v in (("tolerance", tol), ("action", act)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise TrendConfigError(f"{file}: key '{prefix}.{key}' must be a number > 0, got {v!r}")
        if tol is None and act is None:
            raise TrendConfigError(f"{file}: table '[{prefix}]' needs 'tolerance' and/or 'action'")
        if tol is not None and act is not None and act < tol:
            raise TrendConfigError(f"{file}: key '{prefix}.action' ({act}) must be >= '{prefix}.tolerance' ({tol})")
        return cls(metric=metric, tolerance=tol, action=act, mode=mode, direction=direction)


@dataclass(frozen=True)
class TrendSettings:
    """``[trends]``: baselines, SPC rules and levels.

    The control chart of a scanner x protocol (x size band) x metric plots one point per day, or per
    run of consecutive days when one day holds fewer than ``series_per_point`` series: the median of
    those series. The baseline is the first ``baseline_n`` series (but at least ``baseline_min_days``
    days, whole points) after the last re-baselining service event, or the points inside
    ``baseline_from`` to ``baseline_to`` when those are given (until a re-baselining event).
    """

    baseline_n: int = 50
    baseline_min_days: int = 20
    baseline_from: date | None = None
    baseline_to: date | None = None
    rules: tuple[str, ...] = SPC_RULES
    sigma: float = 3.0
    run_length: int = 8
    trend_length: int = 6
    series_per_point: int = 20
    early_action_min_series: int = 5  # 0 = a point is judged only once it holds series_per_point series
    by_size_band: bool = False
    timezone: str = "UTC"
    limits: dict[str, MetricLimits] = field(default_factory=dict)
    metrics: tuple[str, ...] = field(default_factory=default_trend_metrics)  # "*" = every stored metric

    def trended(self, metric: str) -> bool:
        """Whether ``metric`` gets a control chart (and can raise alerts)."""
        return "*" in self.metrics or metric in self.metrics or metric in self.limits

    def __post_init__(self) -> None:
        if self.baseline_n < 2:
            raise ValueError(f'Argument "baseline_n" must be >= 2, got {self.baseline_n}')
        if self.baseline_min_days < 1:
            raise ValueError(f'Argument "baseline_min_days" must be >= 1, got {self.baseline_min_days}')
        if (self.baseline_from is None) != (self.baseline_to is None):
            raise ValueError('Arguments "baseline_from" and "baseline_to" must be given together')
        if self.baseline_from is not None and self.baseline_to is not None and self.baseline_to < self.baseline_from:
            raise ValueError(
                f'Argument "baseline_to" ({self.baseline_to}) must not be before "baseline_from" ({self.baseline_from})'
            )
        bad = [r for r in self.rules if r not in SPC_RULES]
        if bad:
            raise ValueError(f'Argument "rules" has unknown rule {bad[0]!r}; known: {", ".join(SPC_RULES)}')
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f'Argument "sigma" must be > 0, got {self.sigma}')
        if self.early_action_min_series < 0:
            raise ValueError(f'Argument "early_action_min_series" must be >= 0, got {self.early_action_min_series}')
        if self.series_per_point < 1:
            raise ValueError(f'Argument "series_per_point" must be >= 1, got {self.series_per_point}')
        if self.run_length < 2 or self.trend_length < 3:
            raise ValueError(
                f'Argument "run_length" must be >= 2 and "trend_length" >= 3, '
                f"got {self.run_length} and {self.trend_length}"
            )
        self.tz()  # validates the name

    def tz(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f'Argument "timezone" must be an IANA zone such as "Europe/Berlin", got {self.timezone!r}'
            ) from exc

    @classmethod
    def from_toml(cls, section: Any, file: str) -> TrendSettings:
        prefix = "trends"
        allowed = {
            "baseline_n", "baseline_min_days", "baseline_from", "baseline_to", "rules", "sigma",
            "run_length", "trend_length", "series_per_point", "early_action_min_series", "by_size_band", "timezone",
            "limits", "metrics",
        }  # fmt: skip
        _check_keys(section, allowed, file, prefix)
        rules = _get(section, "rules", list, list(SPC_RULES), file, prefix)
        for i, r in enumerate(rules):
            if r not in SPC_RULES:
                raise TrendConfigError(
                    f"{file}: key '{prefix}.rules[{i}]' must be one of {', '.join(SPC_RULES)} (an empty list "
                    f"turns the SPC rules off), got {r!r}"
                )
        metrics = _get(section, "metrics", list, list(default_trend_metrics()), file, prefix)
        for i, m in enumerate(metrics):
            if not isinstance(m, str) or not m:
                raise TrendConfigError(
                    f"{file}: key '{prefix}.metrics[{i}]' must be a metric name such as \"global_noise_hu\" "
                    f"or \"*\" for all, got {m!r}"
                )
        raw_limits = section.get("limits", {})
        if not isinstance(raw_limits, dict):
            raise TrendConfigError(
                f"{file}: 'trends.limits' must be tables [trends.limits.<metric>], got {raw_limits!r}"
            )
        limits = {m: MetricLimits.from_toml(m, s, file) for m, s in raw_limits.items()}
        values = dict(
            baseline_n=_get(section, "baseline_n", int, 50, file, prefix),
            baseline_min_days=_get(section, "baseline_min_days", int, 20, file, prefix),
            baseline_from=_get_date(section, "baseline_from", file, prefix),
            baseline_to=_get_date(section, "baseline_to", file, prefix),
            rules=tuple(rules),
            sigma=_get(section, "sigma", float, 3.0, file, prefix),
            run_length=_get(section, "run_length", int, 8, file, prefix),
            trend_length=_get(section, "trend_length", int, 6, file, prefix),
            series_per_point=_get(section, "series_per_point", int, 20, file, prefix),
            early_action_min_series=_get(section, "early_action_min_series", int, 5, file, prefix),
            by_size_band=_get(section, "by_size_band", bool, False, file, prefix),
            timezone=_get(section, "timezone", str, "UTC", file, prefix),
            limits=limits,
            metrics=tuple(metrics),
        )
        try:
            return cls(**values)
        except ValueError as exc:
            raise TrendConfigError(f"{file}: section [trends]: {exc}") from None


@dataclass(frozen=True)
class AlertSettings:
    """``[alerts]``: e-mail through SMTP. Alerts are always stored and logged; they are e-mailed only
    when ``smtp_host`` and ``smtp_to`` are set."""

    smtp_host: str = ""
    smtp_port: int = 25
    smtp_from: str = "ctqa-node@localhost"
    smtp_to: tuple[str, ...] = ()
    starttls: bool = False
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0
    subject_prefix: str = "[CT QA]"

    @property
    def enabled(self) -> bool:
        return bool(self.smtp_host) and bool(self.smtp_to)

    def __repr__(self) -> str:  # never show the password in logs or tracebacks
        return (
            f"AlertSettings(smtp_host={self.smtp_host!r}, smtp_port={self.smtp_port}, smtp_from={self.smtp_from!r}, "
            f"smtp_to={self.smtp_to!r}, starttls={self.starttls}, username={self.username!r}, "
            f"password={'***' if self.password else None})"
        )

    @classmethod
    def from_toml(cls, section: Any, file: str) -> AlertSettings:
        prefix = "alerts"
        allowed = {
            "smtp_host", "smtp_port", "smtp_from", "smtp_to", "starttls", "username", "password", "timeout_s",
            "subject_prefix",
        }  # fmt: skip
        _check_keys(section, allowed, file, prefix)
        port = _get(section, "smtp_port", int, 25, file, prefix)
        if not 1 <= port <= 65535:
            raise TrendConfigError(f"{file}: key 'alerts.smtp_port' must be a TCP port 1-65535, got {port}")
        to = _get(section, "smtp_to", (list, str), [], file, prefix)
        if isinstance(to, str):
            to = [to]
        for i, addr in enumerate(to):
            if not isinstance(addr, str) or not _EMAIL_RE.match(addr):
                raise TrendConfigError(
                    f"{file}: key 'alerts.smtp_to[{i}]' must be an e-mail address such as physics@hospital.org, "
                    f"got {addr!r}"
                )
        sender = _get(section, "smtp_from", str, "ctqa-node@localhost", file, prefix)
        if not _EMAIL_RE.match(sender):
            raise TrendConfigError(f"{file}: key 'alerts.smtp_from' must be an e-mail address, got {sender!r}")
        user = _get(section, "username", str, None, file, prefix)
        pw = _get(section, "password", str, None, file, prefix)
        if (user is None) != (pw is None):
            raise TrendConfigError(f"{file}: keys 'alerts.username' and 'alerts.password' must be given together")
        timeout = _get(section, "timeout_s", float, 30.0, file, prefix)
        if not timeout > 0:
            raise TrendConfigError(f"{file}: key 'alerts.timeout_s' must be > 0, got {timeout}")
        return cls(
            smtp_host=_get(section, "smtp_host", str, "", file, prefix),
            smtp_port=port,
            smtp_from=sender,
            smtp_to=tuple(to),
            starttls=_get(section, "starttls", bool, False, file, prefix),
            username=user,
            password=pw,
            timeout_s=timeout,
            subject_prefix=_get(section, "subject_prefix", str, "[CT QA]", file, prefix),
        )


@dataclass(frozen=True)
class ReportSettings:
    """``[reports]``: nightly reports under ``data_dir/reports/`` (``schedule = ""`` turns them off)."""

    schedule: str = "0 2 * * *"
    formats: tuple[str, ...] = ("html",)
    period_days: int = 90
    timezone: str = "UTC"

    @classmethod
    def from_toml(cls, section: Any, file: str) -> ReportSettings:
        prefix = "reports"
        _check_keys(section, {"schedule", "formats", "period_days", "timezone"}, file, prefix)
        schedule = _get(section, "schedule", str, "0 2 * * *", file, prefix)
        tzname = _get(section, "timezone", str, "UTC", file, prefix)
        try:
            ZoneInfo(tzname)
        except (ZoneInfoNotFoundError, ValueError):
            raise TrendConfigError(
                f"{file}: key 'reports.timezone' must be an IANA zone such as \"Europe/Berlin\", got {tzname!r}"
            ) from None
        if schedule:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(schedule, timezone=tzname)
            except ValueError as exc:
                raise TrendConfigError(
                    f"{file}: key 'reports.schedule' must be a 5-field cron expression such as \"0 2 * * *\" "
                    f"(02:00 every night) or \"\" to turn scheduled reports off, got {schedule!r} ({exc})"
                ) from None
        formats = _get(section, "formats", list, ["html"], file, prefix)
        for i, f in enumerate(formats):
            if f not in REPORT_FORMATS:
                raise TrendConfigError(
                    f"{file}: key 'reports.formats[{i}]' must be one of {', '.join(REPORT_FORMATS)}, got {f!r}"
                )
        days = _get(section, "period_days", int, 90, file, prefix)
        if days < 1:
            raise TrendConfigError(f"{file}: key 'reports.period_days' must be >= 1, got {days}")
        return cls(schedule=schedule, formats=tuple(formats), period_days=days, timezone=tzname)


@dataclass(frozen=True)
class ReportingSettings:
    """The three sections together, with defaults for absent ones."""

    trends: TrendSettings = field(default_factory=TrendSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    reports: ReportSettings = field(default_factory=ReportSettings)

    @classmethod
    def from_sections(cls, sections: dict[str, Any]) -> ReportingSettings:
        """From already validated section objects, e.g. the node config's ``extra`` dict."""
        return cls(
            trends=sections.get("trends") or TrendSettings(),
            alerts=sections.get("alerts") or AlertSettings(),
            reports=sections.get("reports") or ReportSettings(),
        )

    @classmethod
    def from_toml(cls, doc: dict[str, Any], file: str) -> ReportingSettings:
        """From a whole parsed config.toml; other sections are ignored."""
        return cls(
            trends=TrendSettings.from_toml(doc.get("trends", {}), file),
            alerts=AlertSettings.from_toml(doc.get("alerts", {}), file),
            reports=ReportSettings.from_toml(doc.get("reports", {}), file),
        )


#: name -> validator, for node/config.py's SECTION_VALIDATORS.
SECTION_VALIDATORS = {
    "trends": TrendSettings.from_toml,
    "alerts": AlertSettings.from_toml,
    "reports": ReportSettings.from_toml,
}
