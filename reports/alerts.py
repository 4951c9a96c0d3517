"""E-mail of trend alerts through SMTP (``[alerts]`` in config.toml).

Alerts are stored and logged by :func:`reports.trends.evaluate_series`; this module only mails the ones
not yet mailed. Call :func:`send_pending_alerts` in its own session *after* the evaluation committed,
so that a mail server that is down never rolls back an analysis: the alerts stay pending and go with
the next call. A message carries scanner, protocol, metric, day, values, limits and the series
instance UID: never a patient name or ID (the trend tables hold none).
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from sqlalchemy.orm import Session

from reports.trend_settings import AlertSettings
from reports.trends import RULE_TEXT
from storage.db import utcnow
from storage.trends import Alert, pending_alerts

log = logging.getLogger(__name__)


class AlertDeliveryError(RuntimeError):
    """The SMTP server could not be reached or refused the message."""


def format_alert_email(alerts: Sequence[Alert], settings: AlertSettings) -> EmailMessage:
    """One plain-text message for a batch of alerts."""
    if not alerts:
        raise ValueError('Argument "alerts" must not be empty')
    scanners = sorted({a.scanner for a in alerts})
    n_action = sum(a.severity == "action" for a in alerts)
    metrics = sorted({a.metric for a in alerts})
    subject = (
        f"{settings.subject_prefix} {', '.join(scanners)}: {len(alerts)} trend alert(s)"
        + (f", {n_action} beyond action level" if n_action else "")
        + f" ({', '.join(metrics[:3])}{', ...' if len(metrics) > 3 else ''})"
    )
    lines = [
        "The CT QA node found control-chart violations in patient-based image-quality trends.",
        "",
    ]
    for a in alerts:
        lines += [
            f"* {a.scanner} / {a.protocol}" + (f" / size band {a.size_band} cm" if a.size_band != "all" else ""),
            f"  metric {a.metric} on {a.day.isoformat()}: {RULE_TEXT.get(a.rule, a.rule)} ({a.severity})",
            f"  value (median of {a.n_series} series) {a.value:.4g}; baseline centre {a.centre:.4g}; "
            f"control limits {a.lower:.4g} to {a.upper:.4g}",
        ]
        levels = []
        if a.tolerance_low is not None or a.tolerance_high is not None:
            levels.append(f"tolerance {_f(a.tolerance_low)} to {_f(a.tolerance_high)}")
        if a.action_low is not None or a.action_high is not None:
            levels.append(f"action {_f(a.action_low)} to {_f(a.action_high)}")
        if levels:
            lines.append("  " + "; ".join(levels))
        lines.append(f"  last series: SeriesInstanceUID {a.series_instance_uid}")
        lines.append("")
    lines.append(f"See the control charts: qa-report --scanner {scanners[0]} --format html --out report.html")
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = settings.smtp_from
    msg["To"] = ", ".join(settings.smtp_to)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=settings.smtp_from.rsplit("@", 1)[-1])
    msg.set_content("\n".join(lines))
    return msg


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def send_message(settings: AlertSettings, msg: EmailMessage) -> None:
    """Deliver one message; raises :class:`AlertDeliveryError` with the server and the reason."""
    if not settings.enabled:
        raise ValueError('Argument "settings" has no smtp_host or no smtp_to: e-mail is not configured')
    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.timeout_s) as smtp:
            smtp.ehlo()
            if settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if settings.username is not None and settings.password is not None:
                smtp.login(settings.username, settings.password)
            smtp.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        raise AlertDeliveryError(
            f"could not send alert e-mail through {settings.smtp_host}:{settings.smtp_port}: {exc}"
        ) from exc


def send_pending_alerts(session: Session, settings: AlertSettings, *, limit: int = 100) -> int:
    """E-mail the alerts not yet e-mailed (one message) and mark them. Returns how many were sent:
    0 when e-mail is not configured, nothing is pending, or delivery failed (logged; they stay pending)."""
    if not settings.enabled:
        return 0
    alerts = pending_alerts(session, limit=limit)
    if not alerts:
        return 0
    msg = format_alert_email(alerts, settings)
    try:
        send_message(settings, msg)
    except AlertDeliveryError as exc:
        log.warning("%s; %d alert(s) stay pending for the next attempt", exc, len(alerts))
        return 0
    now = utcnow()
    for a in alerts:
        a.emailed = True
        a.emailed_at = now
    session.flush()
    log.info("e-mailed %d trend alert(s) to %d recipient(s)", len(alerts), len(settings.smtp_to))
    return len(alerts)
