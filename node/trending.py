"""After analysis: the series' metrics into the per-scanner trend data, evaluated against the control
limits (alerts stored, logged and e-mailed when configured). Returns what the SR reports."""

from __future__ import annotations

import logging

from analysis.pipeline import SeriesResult
from node.config import Settings
from reports.alerts import send_pending_alerts
from reports.trends import STATUS_ACTION, STATUS_OK, STATUS_OOC, STATUS_TOLERANCE, evaluate_series
from storage.db import Database, utcnow
from storage.models import Job
from storage.trends import protocol_key, record_series, size_band

log = logging.getLogger(__name__)


class Judged(dict):
    """metric -> "within" | "outside" (what the SR's qualitative evaluation says), plus the chart's
    baseline centre per trended metric (``centres``, where the baseline has one) for the readable
    report's baseline column."""

    def __init__(self, *args, centres: dict[str, float] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.centres: dict[str, float] = dict(centres or {})


def _first(*values):
    return next((v for v in values if v is not None), None)


def reformat_marker(volume) -> str | None:
    """The trend key's reformat marker of an analysed series (``analysis.selection.reformat_of`` of
    its ImageType), None for acquired slices."""
    from analysis.selection import reformat_of

    header = getattr(volume, "header", None)
    return reformat_of(getattr(header, "ImageType", None) if header is not None else None)


def record_and_evaluate(settings: Settings, db: Database, job_id: int, result: SeriesResult) -> dict[str, str]:
    """Record one analysed series and evaluate it. Returns metric -> "within" | "outside" (a
    ``Judged`` dict that also carries the baseline centres). A series without a configured scanner
    (offline import) has no trend and returns {}."""
    reporting = settings.reporting
    with db.session() as s:
        series = s.get(Job, job_id).series
        if series.scanner_name is None:
            return {}
        meta = result.volume.meta if result.volume is not None else {}
        metrics = result.metrics
        protocol = protocol_key(series.protocol_name or meta.get("protocol"),
                                series.series_description or meta.get("series_description"),
                                # the header's kVp and thickness when classical did not run (basic only)
                                meta.get("kernel"), _first(metrics.get("kvp"), meta.get("kvp")),
                                _first(metrics.get("slice_thickness_mm"), meta.get("slice_thickness_mm")),
                                reformat=reformat_marker(result.volume))
        record_series(s, scanner=series.scanner_name, protocol=protocol, size_band=size_band(metrics.get("wed_cm")),
                      series_instance_uid=series.series_instance_uid,
                      acquired_at=series.acquired_at or utcnow(), metrics=metrics)
        evaluations = evaluate_series(s, reporting.trends, series.scanner_name, series.series_instance_uid)
        out = Judged({e.metric: v for e in evaluations if (v := sr_evaluation(e.status, e.alert_rules))},
                     centres={e.metric: float(e.centre) for e in evaluations if e.centre is not None})
        outside = sorted(k for k, v in out.items() if v == "outside")
        if outside:
            log.warning("series %s on scanner %s: outside control limits: %s", series.series_instance_uid,
                        series.scanner_name, ", ".join(outside))
    if reporting.alerts.enabled:
        send_alerts(db, settings)
    return out


def sr_evaluation(status: str, alert_rules) -> str | None:
    """The SR's qualitative evaluation of a judged metric: "outside" when its point breaks a control
    limit, tolerance or action level (or raised an alert), "within" when it was judged and passed.
    During the baseline, or while its point is still collecting series, nothing is claimed."""
    if alert_rules or status in (STATUS_OOC, STATUS_TOLERANCE, STATUS_ACTION):
        return "outside"
    if status == STATUS_OK:
        return "within"
    return None


def send_alerts(db: Database, settings: Settings) -> int:
    """Scheduler job and post-analysis step: e-mail the alerts not yet e-mailed."""
    with db.session() as s:
        return send_pending_alerts(s, settings.reporting.alerts)
