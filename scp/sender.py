"""The outbound C-STORE client: sends due outbox deliveries to their destinations.

A pass takes the due deliveries page by page and, per destination, sends them over as few
associations as it can: each (SOP class, transfer syntax) is proposed once, and an association
carries at most ``MAX_OBJECTS_PER_ASSOCIATION`` objects (and at most 128 presentation contexts),
so a backlog of hundreds of objects after an outage goes out in several associations. Files are
streamed from disk one at a time (only the File Meta Information is read to plan the contexts).
Each object is marked sent as soon as the PACS acknowledges it.

A refusal the peer will repeat (association rejected permanently, SOP class or transfer syntax
not accepted, a "cannot understand"/"data set mismatch" status) is permanent and the delivery
goes to the dead-letter state; anything else (connection refused, TLS failure, timeout, abort,
out of resources) is retried with exponential backoff. When a destination cannot be reached, the
rest of its due deliveries in that pass fail with the same reason without another connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

from scp.connection import on_conn_open
from storage.db import Database
from storage.filestore import FileStore
from storage.outbox import DueDelivery, RetryPolicy, due_deliveries, mark_failed_many, mark_sent

log = logging.getLogger(__name__)

MAX_OBJECTS_PER_ASSOCIATION = 100  # bounded work per association: a failure costs at most this many retries
MAX_CONTEXTS = 128  # presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8: odd IDs 1-255)
PAGE = 200  # due deliveries read from the database at a time
PASS_BUDGET_S = 120.0  # a pass starts no new association after this long; the next pass goes on


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None  # DICOM TLS (the [tls] client context) when set

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool = False
    message: str = ""


@dataclass(frozen=True)
class Outgoing:
    """A due delivery whose file is on disk, with the transfer syntax it is stored in."""

    delivery: DueDelivery
    path: Path
    transfer_syntax: str

    @property
    def context(self) -> tuple[str, str]:
        return (self.delivery.sop_class_uid, self.transfer_syntax)


@dataclass
class BatchResult:
    outcomes: list[SendOutcome]
    connected: bool  # False: the association was never established (the destination is unreachable)


def _status_outcome(status: int) -> SendOutcome:
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or a warning: stored
        return SendOutcome(True, message=f"status 0x{status:04X}")
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the peer may recover
        return SendOutcome(False, False, f"refused with 0x{status:04X} (out of resources)")
    return SendOutcome(False, True, f"refused with 0x{status:04X}")


def plan_associations(items: Sequence[Outgoing], max_objects: int = MAX_OBJECTS_PER_ASSOCIATION,
                      max_contexts: int = MAX_CONTEXTS) -> list[list[Outgoing]]:
    """Split items, in order, into association batches of at most ``max_objects`` objects and at
    most ``max_contexts`` distinct (SOP class, transfer syntax) pairs."""
    batches: list[list[Outgoing]] = []
    current: list[Outgoing] = []
    contexts: set[tuple[str, str]] = set()
    for it in items:
        new_context = it.context not in contexts
        if current and (len(current) >= max_objects or (new_context and len(contexts) >= max_contexts)):
            batches.append(current)
            current, contexts = [], set()
        current.append(it)
        contexts.add(it.context)
    if current:
        batches.append(current)
    return batches


class _PeerErrors(logging.Filter):
    """For one association of ours: takes pynetdicom's ERROR lines and tracebacks about a failed
    connection, a failed TLS handshake, a rejection, a timeout or a peer that went away (its DUL,
    transport, ACSE and association modules log 2-4 lines each) off the log, and keeps the reason
    for our own single line per destination and pass. While associating any thread's records are
    looked at (the connection is made on a DUL thread not known yet); afterwards only those of the
    threads serving our association, so the SCP's own associations log as before."""

    LOGGERS = ("pynetdicom.transport", "pynetdicom.acse", "pynetdicom.dul", "pynetdicom.association")
    DROP = ("Association request failed: unable to connect to remote", "Association Rejected", "Result: ",
            "Reason: ", "Association Aborted", "Aborting Association")
    CLOSED = "the peer closed the connection"

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.reasons: list[str] = []
        self.threads: set[int] | None = None  # None: still associating

    def follow(self, assoc) -> None:
        self.threads = {threading.get_ident(), assoc.ident, assoc.dul.ident}

    @property
    def reason(self) -> str | None:
        return self.reasons[-1] if self.reasons else None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.threads is not None and record.thread not in self.threads:
            return True
        msg = record.getMessage()
        if msg.startswith("TCP Initialisation Error: "):
            self.reasons.append(msg.removeprefix("TCP Initialisation Error: "))
        elif msg.startswith("Connection closed"):  # before the entire PDU / while waiting for a DIMSE message
            if self.reason is None or not self.reason.startswith(self.CLOSED):
                self.reasons.append(self.CLOSED)
        elif msg in ("DIMSE timeout reached while waiting for message response", "Network timeout reached"):
            self.reasons.append(f"no answer within {self.timeout_s:g} s")
        elif record.exc_info is not None:  # the traceback pynetdicom adds to the lines above
            if self.reason == self.CLOSED:
                self.reasons[-1] += f" ({msg})"
        elif not msg.startswith(self.DROP):
            return True
        return False

    def __enter__(self) -> "_PeerErrors":
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _connect_reason(reason: str, dest: Destination) -> str:
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        detail = reason.split("certificate verify failed:", 1)[-1].split("(_ssl.c")[0].strip(" )")
        return f"TLS: the certificate of {dest.host}:{dest.port} is not accepted ({detail or reason})"
    if "SSL" in reason or "TLS" in reason:
        return f"TLS handshake with {dest.host}:{dest.port} failed: {reason}"
    if reason.startswith(_PeerErrors.CLOSED) and not dest.tls:
        reason += "; a DICOM TLS port? (set tls = true for this destination)"
    return f"cannot connect to {dest.host}:{dest.port}: {reason}"


class _StreamedSends:
    """pynetdicom streams a file given to ``send_c_store`` by its path (the dataset's own bytes after
    the File Meta Information, never decoded) only while its process-wide flag
    ``_config.STORE_SEND_CHUNKED_DATASET`` is true; it reads the flag as the call starts. Saving and
    restoring the flag around each call is not safe with two senders in one process: the first to
    finish switches streaming off under the other, which then decodes its file, and the later
    restore leaves the flag on for good. Here the flag is on while at least one of our C-STOREs is
    under way (counted under a lock) and back to the value it had before the first one when the
    last ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = False

    def __enter__(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = _config.STORE_SEND_CHUNKED_DATASET
            self._active += 1
            _config.STORE_SEND_CHUNKED_DATASET = True

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                _config.STORE_SEND_CHUNKED_DATASET = self._saved


_streamed = _StreamedSends()


def _send_file(assoc, path: Path):
    """C-STORE a file streamed from disk (never decoded or held whole in memory)."""
    with _streamed:
        return assoc.send_c_store(path)


def send_batch(calling_ae: str, dest: Destination, items: Sequence[Outgoing], timeout_s: float = 30.0,
               on_outcome: Callable[[Outgoing, SendOutcome], None] | None = None) -> BatchResult:
    """C-STORE each item over one association, proposing each (SOP class, transfer syntax) once.
    ``on_outcome`` is called as soon as each response arrives. Returns one outcome per item."""
    contexts = list(dict.fromkeys(it.context for it in items))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts in one association (at most {MAX_CONTEXTS})")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, [ts])

    def fail_all(outcome: SendOutcome, connected: bool = False) -> BatchResult:
        return BatchResult([outcome] * len(items), connected)

    tls_args = (dest.ssl_context, dest.host) if dest.ssl_context is not None else None
    with _PeerErrors(timeout_s) as errors:
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, on_conn_open)])  # as the SCP's
        except (OSError, socket.error) as exc:
            return fail_all(SendOutcome(False, False, _connect_reason(str(exc), dest)))
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            permanent = rsp is not None and rsp.result == 0x01
            why = (f"association rejected (result {rsp.result}, source {rsp.result_source}, reason {rsp.diagnostic})"
                   if rsp else "association rejected")
            return fail_all(SendOutcome(False, permanent, why))
        if not assoc.is_established:
            if errors.reason:
                return fail_all(SendOutcome(False, False, _connect_reason(errors.reason, dest)))
            how = " (after the TLS handshake)" if dest.tls else ""
            return fail_all(SendOutcome(False, False,
                                        f"cannot connect to {dest.host}:{dest.port}: no association{how}"))
        errors.follow(assoc)
        outcomes: list[SendOutcome] = []
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            accepted_classes = {sop for sop, _ts in accepted}
            for it in items:
                if it.context not in accepted:
                    what = (f"transfer syntax {it.transfer_syntax} for SOP class {it.delivery.sop_class_uid}"
                            if it.delivery.sop_class_uid in accepted_classes
                            else f"SOP class {it.delivery.sop_class_uid}")
                    outcome = SendOutcome(False, True, f"{what} not accepted by {dest.name}")
                elif not assoc.is_established:
                    outcome = SendOutcome(False, False, f"association lost: {errors.reason or 'aborted'}")
                else:
                    try:
                        rsp = _send_file(assoc, it.path)
                        status = rsp.Status if "Status" in rsp else None
                        outcome = (_status_outcome(status) if status is not None else
                                   SendOutcome(False, False, f"no response: {errors.reason or 'connection lost'}"))
                    except (InvalidDicomError, AttributeError, ValueError) as exc:
                        outcome = SendOutcome(False, True, f"output file {it.delivery.rel_path} cannot be sent: {exc}")
                    except OSError as exc:
                        outcome = SendOutcome(False, False, f"cannot read {it.delivery.rel_path}: {exc.strerror or exc}")
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(it, outcome)
        finally:
            if assoc.is_established:
                assoc.release()
    return BatchResult(outcomes, True)


class _PassLog:
    """Counts for one destination in one pass: one log line per distinct failure, not per object."""

    def __init__(self) -> None:
        self.sent = 0
        self.associations = 0
        self.failures: Counter[tuple[str, str]] = Counter()

    def emit(self, name: str) -> None:
        if self.sent:
            log.info("outbox: %d object(s) delivered to %s over %d association(s)", self.sent, name,
                     self.associations)
        for (state, message), n in sorted(self.failures.items()):
            log.warning("outbox: %d delivery(ies) to %s failed (%s): %s", n, name,
                        "dead" if state == "dead" else "will retry", message)


def _prepare(db: Database, store: FileStore, items: Sequence[DueDelivery], policy: RetryPolicy,
             now: datetime | None, plog: _PassLog, counts: dict[str, int]) -> list[Outgoing]:
    """The items whose file is there and readable as DICOM (File Meta Information only); the
    others go to the dead letters with the reason."""
    ready: list[Outgoing] = []
    for d in items:
        path = store.abs(d.rel_path)
        try:
            ts = str(read_file_meta_info(path).TransferSyntaxUID)
        except FileNotFoundError:
            _fail(db, [d], SendOutcome(False, True, f"output file {d.rel_path} is missing"), policy, now, plog, counts)
            continue
        except (InvalidDicomError, AttributeError, OSError) as exc:
            _fail(db, [d], SendOutcome(False, True, f"output file {d.rel_path} is not a DICOM file: {exc}"),
                  policy, now, plog, counts)
            continue
        ready.append(Outgoing(d, path, ts))
    return ready


def _fail(db: Database, items: Sequence[DueDelivery], outcome: SendOutcome, policy: RetryPolicy,
          now: datetime | None, plog: _PassLog, counts: dict[str, int]) -> None:
    states = mark_failed_many(db, [d.id for d in items], outcome.message, permanent=outcome.permanent,
                              policy=policy, now=now)
    for st in states.values():
        key = "dead" if st == "dead" else "retry"
        counts[key] += 1
        plog.failures[(key, outcome.message)] += 1


def run_outbox(db: Database, store: FileStore, *, calling_ae: str, destinations: Sequence[Destination],
               policy: RetryPolicy, timeout_s: float = 30.0, now: datetime | None = None,
               max_objects: int = MAX_OBJECTS_PER_ASSOCIATION, budget_s: float = PASS_BUDGET_S) -> dict[str, int]:
    """One pass over due deliveries. Returns counts of sent / retry / dead (and associations).

    ``now`` fixes the clock for the due query and the backoff (tests); by default the real time."""
    by_name = {d.name: d for d in destinations}
    counts = {"sent": 0, "retry": 0, "dead": 0, "associations": 0}
    plogs: dict[str, _PassLog] = defaultdict(_PassLog)
    unreachable: dict[str, SendOutcome] = {}
    seen: set[int] = set()
    started = time.monotonic()
    while time.monotonic() - started < budget_s:
        page = [d for d in due_deliveries(db, now=now, limit=PAGE) if d.id not in seen]
        if not page:
            break
        seen.update(d.id for d in page)
        groups: dict[str, list[DueDelivery]] = defaultdict(list)
        for d in page:
            groups[d.destination].append(d)
        for name, items in groups.items():
            plog = plogs[name]
            dest = by_name.get(name)
            if dest is None:
                _fail(db, items, SendOutcome(False, True, f"destination {name!r} is no longer in the configuration"),
                      policy, now, plog, counts)
                continue
            if name in unreachable:
                _fail(db, items, unreachable[name], policy, now, plog, counts)
                continue
            ready = _prepare(db, store, items, policy, now, plog, counts)
            for batch in plan_associations(ready, max_objects=max_objects):
                if name in unreachable or time.monotonic() - started >= budget_s:
                    if name in unreachable:
                        _fail(db, [it.delivery for it in batch], unreachable[name], policy, now, plog, counts)
                    else:  # out of time: left due for the next pass, untouched
                        seen.difference_update(it.delivery.id for it in batch)
                    continue

                def record(it: Outgoing, outcome: SendOutcome, plog=plog) -> None:
                    if outcome.ok:
                        mark_sent(db, it.delivery.id)  # committed at once: an acknowledged object is never sent again
                        counts["sent"] += 1
                        plog.sent += 1
                    else:
                        _fail(db, [it.delivery], outcome, policy, now, plog, counts)

                result = send_batch(calling_ae, dest, batch, timeout_s=timeout_s,
                                    on_outcome=record)
                if not result.connected:
                    unreachable[name] = result.outcomes[0]
                    _fail(db, [it.delivery for it in batch], result.outcomes[0], policy, now, plog, counts)
                else:
                    counts["associations"] += 1
                    plog.associations += 1
    for name, plog in plogs.items():
        plog.emit(name)
    return counts
