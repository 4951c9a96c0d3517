"""The outbox sender against in-process pynetdicom PACS on loopback: batching over several
associations (each context proposed once), exactly-once delivery, failure statuses, timeouts,
unreachable PACS, the backoff doubling to its cap and give-up -> dead."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from pynetdicom import AE, evt

from scp.sender import Destination, Outgoing, plan_associations, run_outbox
from storage.db import Database, utcnow
from storage.filestore import FileStore
from storage.models import Delivery, DeliveryState
from storage.outbox import DueDelivery, RetryPolicy, list_deliveries
from tests.helpers import BASIC_TEXT_SR, PDF_STORAGE, queue_outbox_objects

EXPLICIT, IMPLICIT = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"


class FakePacs:
    """A pynetdicom Storage SCP that records what it receives and answers what the test says."""

    def __init__(self, status=0x0000, delay_s: float = 0.0, reject: tuple[int, int, int] | None = None,
                 ssl_context=None, reset_on: str | None = None) -> None:
        self.status = status  # int, or callable(sop_instance_uid) -> int
        self.delay_s = delay_s
        self.reject = reject
        self.reset_on = reset_on  # this SOP Instance UID: drop the TCP connection (RST) instead of answering
        self.received: Counter[str] = Counter()
        self.associations: list[list[tuple[str, tuple[str, ...]]]] = []  # proposed contexts per association
        self.requests = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        for sop in (PDF_STORAGE, BASIC_TEXT_SR):
            ae.add_supported_context(sop, [EXPLICIT, IMPLICIT])
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ssl_context, evt_handlers=[
            (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_requested(self, event) -> None:
        with self._lock:
            self.requests += 1
        if self.reject is not None:
            event.assoc.acse.send_reject(*self.reject)
            event.assoc.kill()
            return
        sock = event.assoc.dul.socket.socket
        self.client_certificate = sock.getpeercert() if hasattr(sock, "getpeercert") else None
        rq = event.assoc.requestor.primitive.presentation_context_definition_list
        with self._lock:
            self.associations.append([(str(cx.abstract_syntax), tuple(map(str, cx.transfer_syntax))) for cx in rq])

    def _on_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid == self.reset_on:  # the PACS process dies mid-association
            sock = event.assoc.dul.socket.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return 0x0000
        if self.delay_s:
            time.sleep(self.delay_s)
        status = self.status(uid) if callable(self.status) else self.status
        if status == 0x0000:
            with self._lock:
                self.received[uid] += 1
        return status

    def destination(self) -> Destination:
        return Destination("PACS", "PACS", "127.0.0.1", self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()


@pytest.fixture
def outbox_env(tmp_path):
    store = FileStore(tmp_path / "var")
    store.prepare()
    db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")
    db.create_all()
    yield db, store
    db.dispose()


@pytest.fixture
def pacs_factory():
    made = []

    def make(**kw) -> FakePacs:
        p = FakePacs(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


def deliveries(db) -> dict[str, dict]:
    return {r["sop_instance_uid"]: r for r in list_deliveries(db)}


def next_attempt(db, delivery_id: int):
    with db.session() as s:
        return s.get(Delivery, delivery_id).next_attempt_at


def test_backlog_goes_out_in_bounded_associations_each_context_once_each_object_once(outbox_env, pacs_factory):
    db, store = outbox_env
    pacs = pacs_factory()
    uids = queue_outbox_objects(db, store, 250, ["PACS"], implicit_every=5)
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()], policy=RetryPolicy(),
                        max_objects=100)
    assert counts == {"sent": 250, "retry": 0, "dead": 0, "associations": 3}
    assert pacs.received == Counter({u: 1 for u in uids})  # every object once, none twice
    # 250 objects over ceil(250/100) = 3 associations; the first proposes each of the 4
    # (SOP class, transfer syntax) pairs once, with exactly one transfer syntax each
    assert len(pacs.associations) == 3
    first = pacs.associations[0]
    assert sorted(first) == sorted([(PDF_STORAGE, (EXPLICIT,)), (BASIC_TEXT_SR, (EXPLICIT,)),
                                    (PDF_STORAGE, (IMPLICIT,)), (BASIC_TEXT_SR, (IMPLICIT,))])
    rows = deliveries(db)
    assert all(r["state"] == "sent" and r["attempts"] == 1 for r in rows.values())
    # a second pass sends nothing again
    assert run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                      policy=RetryPolicy())["sent"] == 0
    assert sum(pacs.received.values()) == 250


def test_plan_bounds_objects_and_presentation_contexts():
    def item(i: int, sop: str, ts: str) -> Outgoing:
        return Outgoing(DueDelivery(i, "PACS", f"o/{i}.dcm", sop, f"1.2.3.{i}", 0), None, ts)

    # 300 objects of 150 distinct SOP classes: no association may propose more than 128 contexts
    items = [item(i, f"1.2.840.99.{i % 150}", EXPLICIT) for i in range(300)]
    batches = plan_associations(items, max_objects=1000)
    assert [len({it.context for it in b}) for b in batches] == [128, 128, 44]
    assert [it for b in batches for it in b] == items  # order kept, nothing lost or repeated
    batches = plan_associations(items, max_objects=100)
    assert [len(b) for b in batches] == [100, 100, 100]



def test_overlapping_sends_in_two_threads_both_stream_and_leave_the_flag_as_it_was(monkeypatch):
    """pynetdicom streams a file only while its process-wide flag is on, read as send_c_store starts.
    Two senders whose C-STOREs overlap: the first to finish must not switch it off under the other,
    and when both are done it is back to what it was (off, pynetdicom's default)."""
    from pynetdicom import _config

    from scp import sender

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)

    class Assoc:  # stands in for an established association: records the flag as pynetdicom reads it
        def __init__(self) -> None:
            self.entered, self.release, self.flag_at_call = threading.Event(), threading.Event(), None

        def send_c_store(self, path):
            self.flag_at_call = _config.STORE_SEND_CHUNKED_DATASET
            self.entered.set()
            assert self.release.wait(10)
            return {"Status": 0}

    a, b = Assoc(), Assoc()
    ta = threading.Thread(target=sender._send_file, args=(a, "a.dcm"))
    tb = threading.Thread(target=sender._send_file, args=(b, "b.dcm"))
    ta.start()
    assert a.entered.wait(10)
    tb.start()
    assert b.entered.wait(10)
    a.release.set()  # the first send ends while the second is still under way
    ta.join(10)
    assert _config.STORE_SEND_CHUNKED_DATASET is True
    b.release.set()
    tb.join(10)
    assert (a.flag_at_call, b.flag_at_call) == (True, True)
    assert _config.STORE_SEND_CHUNKED_DATASET is False

def test_a_failure_status_for_one_object_leaves_the_others_sent(outbox_env, pacs_factory, caplog):
    db, store = outbox_env
    uids = queue_outbox_objects(db, store, 6, ["PACS"])
    busy, bad = uids[1], uids[4]
    pacs = pacs_factory(status=lambda uid: {busy: 0xA700, bad: 0xC000}.get(uid, 0x0000))
    t0 = utcnow()
    with caplog.at_level(logging.WARNING, logger="scp.sender"):
        counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                            policy=RetryPolicy(initial_s=30, max_s=3600), now=t0)
    assert counts["sent"] == 4 and counts["retry"] == 1 and counts["dead"] == 1
    rows = deliveries(db)
    assert rows[busy]["state"] == "pending" and "0xA700" in rows[busy]["last_error"]
    assert next_attempt(db, rows[busy]["id"]) == t0 + timedelta(seconds=30)
    assert rows[bad]["state"] == "dead" and rows[bad]["last_error"] == "refused with 0xC000"
    assert {u for u, r in rows.items() if r["state"] == "sent"} == set(uids) - {busy, bad}
    assert set(pacs.received) == set(uids) - {busy, bad}
    warnings = [r.getMessage() for r in caplog.records if r.name == "scp.sender"]
    assert warnings == ["outbox: 1 delivery(ies) to PACS failed (dead): refused with 0xC000",
                        "outbox: 1 delivery(ies) to PACS failed (will retry): refused with 0xA700 (out of resources)"]


def test_backoff_doubles_to_its_cap_then_gives_up(outbox_env, pacs_factory):
    db, store = outbox_env
    (uid,) = queue_outbox_objects(db, store, 1, ["PACS"])
    pacs = pacs_factory(status=0xA700)
    policy = RetryPolicy(initial_s=10, max_s=40, give_up_after_s=1000)
    dest = [pacs.destination()]
    row = deliveries(db)[uid]
    with db.session() as s:
        created = s.get(Delivery, row["id"]).created_at
    now = created
    expected_delays = [10, 20, 40, 40, 40]  # retry_initial_s doubling, capped at retry_max_s
    for attempt, delay in enumerate(expected_delays, start=1):
        # not due a moment before its time: the pass does not touch it
        before = run_outbox(db, store, calling_ae="CTQA", destinations=dest, policy=policy,
                            now=now - timedelta(seconds=1)) if attempt > 1 else None
        assert before is None or before == {"sent": 0, "retry": 0, "dead": 0, "associations": 0}
        counts = run_outbox(db, store, calling_ae="CTQA", destinations=dest, policy=policy, now=now)
        assert counts["retry"] == 1
        r = deliveries(db)[uid]
        assert r["state"] == "pending" and r["attempts"] == attempt
        assert next_attempt(db, r["id"]) == now + timedelta(seconds=delay)
        now = now + timedelta(seconds=delay)
    assert pacs.requests == len(expected_delays)  # one association per due attempt, none in between
    # older than give_up_after_s: the next failure is the last
    now = created + timedelta(seconds=1000)
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=dest, policy=policy, now=now)
    assert counts["dead"] == 1
    r = deliveries(db)[uid]
    assert r["state"] == "dead" and r["attempts"] == 6
    assert r["last_error"] == "gave up after 6 attempts: refused with 0xA700 (out of resources)"
    assert not pacs.received


def test_a_pacs_that_does_not_answer_times_out_and_is_retried(outbox_env, pacs_factory):
    db, store = outbox_env
    uids = queue_outbox_objects(db, store, 3, ["PACS"])
    pacs = pacs_factory(delay_s=3.0)
    t0 = utcnow()
    started = time.monotonic()
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                        policy=RetryPolicy(initial_s=30), timeout_s=1.0, now=t0)
    assert time.monotonic() - started < 10  # gave up waiting after the timeout, not the PACS's 3 s x 3
    assert counts == {"sent": 0, "retry": 3, "dead": 0, "associations": 1}
    rows = deliveries(db)
    assert rows[uids[0]]["last_error"] == "no response: no answer within 1 s"
    assert {rows[u]["last_error"] for u in uids[1:]} == {"association lost: no answer within 1 s"}
    assert all(next_attempt(db, rows[u]["id"]) == t0 + timedelta(seconds=30) for u in uids)


def test_unreachable_pacs_costs_one_connection_per_pass_and_one_log_line(outbox_env, pacs_factory, caplog):
    db, store = outbox_env
    queue_outbox_objects(db, store, 250, ["PACS"])
    # a transient rejection (result 2: rejected-transient, source 1, "no reason given")
    pacs = pacs_factory(reject=(0x02, 0x01, 0x01))
    t0 = utcnow()
    with caplog.at_level(logging.WARNING):
        counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                            policy=RetryPolicy(initial_s=30), now=t0, max_objects=100)
    assert counts == {"sent": 0, "retry": 250, "dead": 0, "associations": 0}
    assert pacs.requests == 1  # not one association request per batch (3) or per page (2)
    rows = list_deliveries(db)
    assert {r["state"] for r in rows} == {"pending"}
    assert {r["last_error"] for r in rows} == {"association rejected (result 2, source 1, reason 1)"}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["outbox: 250 delivery(ies) to PACS failed (will retry): "
                     "association rejected (result 2, source 1, reason 1)"]

    # nobody listening at all: the reason names the address and the OS error, pynetdicom's own
    # two ERROR lines are not repeated
    pacs.stop()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                            policy=RetryPolicy(initial_s=30), now=t0 + timedelta(seconds=30))
    assert counts["retry"] == 250
    errors = {r["last_error"] for r in list_deliveries(db)}
    assert errors == {f"cannot connect to 127.0.0.1:{pacs.port}: [Errno 111] Connection refused"}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    with db.session() as s:
        assert {d.attempts for d in s.query(Delivery)} == {2}
        assert {d.state for d in s.query(Delivery)} == {DeliveryState.PENDING}


def test_missing_or_unreadable_output_file_goes_dead_without_blocking_the_rest(outbox_env, pacs_factory):
    db, store = outbox_env
    uids = queue_outbox_objects(db, store, 4, ["PACS"])
    rows = deliveries(db)
    store.abs(rows[uids[0]]["path"]).unlink()
    store.abs(rows[uids[1]]["path"]).write_bytes(b"not DICOM at all")
    pacs = pacs_factory()
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()], policy=RetryPolicy())
    assert counts["sent"] == 2 and counts["dead"] == 2
    rows = deliveries(db)
    assert rows[uids[0]]["last_error"] == f"output file {rows[uids[0]]['path']} is missing"
    assert rows[uids[1]]["last_error"].startswith(f"output file {rows[uids[1]]['path']} is not a DICOM file")
    assert set(pacs.received) == set(uids[2:])


def test_tls_destination_checks_the_pacs_certificate_and_its_host_name(outbox_env, pacs_factory, tmp_path):
    from scp.tls import client_context, server_context
    from tests.helpers import TlsPki

    pki = TlsPki(tmp_path / "pki").make()
    db, store = outbox_env
    client = client_context(str(pki.cert("node")), str(pki.key("node")), str(pki.ca))
    good = pacs_factory(ssl_context=server_context(str(pki.cert("pacs")), str(pki.key("pacs")), str(pki.ca)))
    misnamed = pacs_factory(ssl_context=server_context(str(pki.cert("wrongname")), str(pki.key("wrongname")),
                                                       str(pki.ca)))
    uids = queue_outbox_objects(db, store, 2, ["GOOD", "MISNAMED"])
    dests = [Destination("GOOD", "PACS", "127.0.0.1", good.port, client),
             Destination("MISNAMED", "PACS", "127.0.0.1", misnamed.port, client)]
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=dests, policy=RetryPolicy())
    assert counts["sent"] == 2 and counts["retry"] == 2
    assert set(good.received) == set(uids) and not misnamed.received
    # the PACS required and saw the node's client certificate
    assert dict(x[0] for x in good.client_certificate["subject"]) == {"commonName": "node"}
    rows = {r["destination"]: r for r in list_deliveries(db) if r["state"] == "pending"}
    assert set(rows) == {"MISNAMED"}
    assert rows["MISNAMED"]["last_error"].startswith(f"TLS: the certificate of 127.0.0.1:{misnamed.port} is not accepted")
    assert "IP address mismatch" in rows["MISNAMED"]["last_error"]


def test_pacs_that_dies_mid_association_loses_nothing_and_logs_one_line_per_reason(outbox_env, pacs_factory,
                                                                                   caplog):
    db, store = outbox_env
    uids = queue_outbox_objects(db, store, 6, ["PACS"])
    pacs = pacs_factory(reset_on=uids[2])
    t0 = utcnow()
    with caplog.at_level(logging.WARNING):
        counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                            policy=RetryPolicy(initial_s=30), now=t0, timeout_s=5)
    assert counts == {"sent": 2, "retry": 4, "dead": 0, "associations": 1}
    rows = deliveries(db)
    assert [rows[u]["state"] for u in uids] == ["sent", "sent"] + ["pending"] * 4
    closed = "the peer closed the connection ([Errno 104] Connection reset by peer)"
    assert rows[uids[2]]["last_error"] == f"no response: {closed}"
    assert {rows[u]["last_error"] for u in uids[3:]} == {f"association lost: {closed}"}
    # our two lines, none of pynetdicom's ERROR lines or tracebacks for our association
    lines = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert lines == [f"outbox: 1 delivery(ies) to PACS failed (will retry): no response: {closed}",
                     f"outbox: 3 delivery(ies) to PACS failed (will retry): association lost: {closed}"]
    # the PACS is back: the next due pass sends the four others, nothing twice
    pacs.reset_on = None
    counts = run_outbox(db, store, calling_ae="CTQA", destinations=[pacs.destination()],
                        policy=RetryPolicy(initial_s=30), now=t0 + timedelta(seconds=30))
    assert counts["sent"] == 4
    assert pacs.received == Counter({u: 1 for u in uids})
