"""The outbound C-STORE client: sends due outbox deliveries to their destinations.

One association per destination per pass. A refusal the peer will repeat (association rejected
permanently, SOP class not accepted, a "cannot understand"/"data set mismatch" status) is
permanent and the delivery goes to the dead-letter state; anything else (connection refused,
timeout, abort, out of resources) is retried with exponential backoff.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from storage.db import Database
from storage.filestore import FileStore
from storage.outbox import DueDelivery, RetryPolicy, due_deliveries, mark_failed, mark_sent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class SendOutcome:
    ok: bool
    permanent: bool = False
    message: str = ""


def _status_outcome(status: int | None) -> SendOutcome:
    if status is None:
        return SendOutcome(False, False, "no response (connection lost or timeout)")
    if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or a warning: stored
        return SendOutcome(True, message=f"status 0x{status:04X}")
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the peer may recover
        return SendOutcome(False, False, f"refused with 0x{status:04X} (out of resources)")
    return SendOutcome(False, True, f"refused with 0x{status:04X}")


def send_batch(calling_ae: str, dest: Destination, items: Sequence[tuple[DueDelivery, Path]],
               timeout_s: float = 30.0) -> list[SendOutcome]:
    """C-STORE each file over one association. Returns one outcome per item."""
    datasets = []
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for d, path in items:
        ds = dcmread(path)
        datasets.append(ds)
        ae.add_requested_context(d.sop_class_uid, [str(ds.file_meta.TransferSyntaxUID)])
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except (OSError, socket.error) as exc:
        return [SendOutcome(False, False, f"cannot connect: {exc}")] * len(items)
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        permanent = rsp is not None and rsp.result == 0x01
        why = f"association rejected (result {rsp.result}, source {rsp.result_source}, reason {rsp.diagnostic})" if rsp else "association rejected"
        return [SendOutcome(False, permanent, why)] * len(items)
    if not assoc.is_established:
        return [SendOutcome(False, False, f"cannot connect to {dest.host}:{dest.port} (no association)")] * len(items)
    outcomes: list[SendOutcome] = []
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for (d, _path), ds in zip(items, datasets):
            if d.sop_class_uid not in accepted:
                outcomes.append(SendOutcome(False, True, f"SOP class {d.sop_class_uid} not accepted by {dest.name}"))
                continue
            if not assoc.is_established:
                outcomes.append(SendOutcome(False, False, "association lost"))
                continue
            rsp = assoc.send_c_store(ds)
            outcomes.append(_status_outcome(rsp.Status if "Status" in rsp else None))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def run_outbox(db: Database, store: FileStore, *, calling_ae: str, destinations: Sequence[Destination],
               policy: RetryPolicy) -> dict[str, int]:
    """One pass over due deliveries. Returns counts of sent / retry / dead."""
    by_name = {d.name: d for d in destinations}
    groups: dict[str, list[DueDelivery]] = defaultdict(list)
    for d in due_deliveries(db):
        groups[d.destination].append(d)
    counts = {"sent": 0, "retry": 0, "dead": 0}
    for name, items in groups.items():
        dest = by_name.get(name)
        if dest is None:
            for d in items:
                mark_failed(db, d.id, f"destination {name!r} is no longer in the configuration", permanent=True,
                            policy=policy)
                counts["dead"] += 1
            continue
        ready = []
        for d in items:
            path = store.abs(d.rel_path)
            if not path.exists():
                mark_failed(db, d.id, f"output file {d.rel_path} is missing", permanent=True, policy=policy)
                counts["dead"] += 1
            else:
                ready.append((d, path))
        if not ready:
            continue
        for (d, _p), outcome in zip(ready, send_batch(calling_ae, dest, ready)):
            if outcome.ok:
                mark_sent(db, d.id)  # committed at once: an acknowledged object is never sent again
                counts["sent"] += 1
            else:
                state = mark_failed(db, d.id, outcome.message, permanent=outcome.permanent, policy=policy)
                counts["dead" if state == "dead" else "retry"] += 1
                log.warning("delivery %d of %s to %s failed (%s): %s", d.id, d.sop_instance_uid, name,
                            "dead" if state == "dead" else "will retry", outcome.message)
    if counts["sent"]:
        log.info("outbox: %d object(s) delivered", counts["sent"])
    return counts
