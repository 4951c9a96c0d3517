"""Alert e-mail through a real SMTP conversation with a tiny server on 127.0.0.1 (started here)."""

from __future__ import annotations

import socketserver
import threading
from datetime import date, datetime, timezone
from email import message_from_bytes
from email.policy import default as default_policy

import pytest
from sqlalchemy import select

from reports.alerts import send_pending_alerts
from reports.trend_settings import AlertSettings
from storage.db import Database
from storage.trends import Alert


class _SMTPHandler(socketserver.StreamRequestHandler):
    """Enough of RFC 5321 for smtplib: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def _reply(self, line: str) -> None:
        self.wfile.write((line + "\r\n").encode("ascii"))
        self.wfile.flush()

    def handle(self) -> None:
        server: _SMTPServer = self.server  # type: ignore[assignment]
        self._reply("220 test-smtp ready")
        mail_from, rcpts = None, []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            cmd = raw.decode("ascii", "replace").rstrip("\r\n")
            verb = cmd.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self._reply("250-test-smtp")
                self._reply("250 8BITMIME")
            elif verb == "HELO":
                self._reply("250 test-smtp")
            elif verb == "MAIL":
                mail_from, rcpts = cmd[10:].strip(), []
                self._reply("250 OK")
            elif verb == "RCPT":
                rcpts.append(cmd[8:].strip())
                self._reply("250 OK")
            elif verb == "DATA":
                self._reply("354 end with <CRLF>.<CRLF>")
                lines = []
                while True:
                    line = self.rfile.readline()
                    if line in (b".\r\n", b""):
                        break
                    lines.append(line[1:] if line.startswith(b"..") else line)
                server.messages.append((mail_from, list(rcpts), b"".join(lines)))
                self._reply("250 queued")
            elif verb in ("RSET", "NOOP"):
                self._reply("250 OK")
            elif verb == "QUIT":
                self._reply("221 bye")
                return
            else:
                self._reply("502 not implemented")


class _SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SMTPHandler)
        self.messages: list[tuple[str | None, list[str], bytes]] = []


@pytest.fixture()
def smtp_server():
    srv = _SMTPServer()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


@pytest.fixture()
def db(tmp_path):
    d = Database("sqlite:///" + str(tmp_path / "alerts.sqlite"))
    d.create_all()
    yield d
    d.dispose()


def _add_alert(db: Database, day: date, rule: str = "beyond_limits") -> None:
    with db.session() as s:
        s.add(
            Alert(
                scanner="CT1",
                protocol="ABDOMEN ROUTINE | B30f | 120 kV | 5 mm",
                size_band="all",
                metric="global_noise_hu",
                day=day,
                rule=rule,
                severity="alert",
                value=13.2,
                n_series=21,
                centre=11.0,
                lower=10.1,
                upper=11.9,
                tolerance_low=9.9,
                tolerance_high=12.1,
                action_low=8.8,
                action_high=13.2,
                series_instance_uid="1.2.826.0.1.3680043.2.1125.1.99",
                message="test",
                created_at=datetime(2026, 11, 3, 8, tzinfo=timezone.utc),
                updated_at=datetime(2026, 11, 3, 8, tzinfo=timezone.utc),
                emailed=False,
            )
        )


def test_alert_is_mailed_once_without_patient_data(db, smtp_server):
    _add_alert(db, date(2026, 11, 3))
    _add_alert(db, date(2026, 11, 4), rule="run")
    settings = AlertSettings(
        smtp_host="127.0.0.1",
        smtp_port=smtp_server.server_address[1],
        smtp_from="ctqa@hospital.example",
        smtp_to=("physics@hospital.example", "qa@hospital.example"),
        timeout_s=10,
    )
    with db.session() as s:
        assert send_pending_alerts(s, settings) == 2
    assert len(smtp_server.messages) == 1
    sender, rcpts, data = smtp_server.messages[0]
    assert "ctqa@hospital.example" in sender
    assert sorted(rcpts) == ["<physics@hospital.example>", "<qa@hospital.example>"]
    msg = message_from_bytes(data, policy=default_policy)
    assert "CT1" in msg["Subject"] and "2 trend alert" in msg["Subject"]
    body = msg.get_content()
    assert "global_noise_hu" in body and "2026-11-03" in body and "2026-11-04" in body
    # value, baseline centre, control limits, tolerance and action levels: each labelled, both alerts
    lines = [" ".join(ln.split()) for ln in body.splitlines()]
    assert lines.count("value (median of 21 series) 13.2; baseline centre 11; control limits 10.1 to 11.9") == 2
    assert sum(1 for ln in lines if ln.startswith("tolerance 9.9 to 12.1; action 8.8 to 13.2")) == 2
    assert "1.2.826.0.1.3680043.2.1125.1.99" in body
    # the alert tables hold no patient data; the message must not invent any
    lowered = data.decode("utf-8", "replace").lower()
    for word in ("patientname", "patient name", "patientid", "patient id", "birth"):
        assert word not in lowered
    with db.session() as s:
        assert all(a.emailed and a.emailed_at is not None for a in s.scalars(select(Alert)))
        # nothing pending: no second message
        assert send_pending_alerts(s, settings) == 0
    assert len(smtp_server.messages) == 1


def test_unreachable_server_leaves_alerts_pending(db, smtp_server, caplog):
    _add_alert(db, date(2026, 11, 3))
    port = smtp_server.server_address[1]
    smtp_server.shutdown()
    smtp_server.server_close()
    settings = AlertSettings(smtp_host="127.0.0.1", smtp_port=port, smtp_to=("physics@hospital.example",), timeout_s=2)
    with db.session() as s:
        assert send_pending_alerts(s, settings) == 0
    with db.session() as s:
        assert [a.emailed for a in s.scalars(select(Alert))] == [False]
    assert any("stay pending" in r.getMessage() for r in caplog.records)


def test_mail_not_configured_sends_nothing(db):
    _add_alert(db, date(2026, 11, 3))
    with db.session() as s:
        assert send_pending_alerts(s, AlertSettings()) == 0
        assert [a.emailed for a in s.scalars(select(Alert))] == [False]
