"""The outbox: output objects and their deliveries to each destination.

An output is written to disk and recorded here before any send. Each (output, destination) pair is
one delivery: pending -> sent, or -> dead after a permanent refusal or when retries are exhausted.
Retries back off exponentially: ``initial * 2**(attempts-1)`` capped at ``max``; a delivery older
than ``give_up_after`` is given up on its next failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from storage.db import Database, utcnow
from storage.models import Delivery, DeliveryState, OutputObject


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 30.0
    max_s: float = 3600.0
    give_up_after_s: float = 7 * 24 * 3600.0

    def delay(self, attempts: int) -> float:
        return min(self.initial_s * (2 ** max(attempts - 1, 0)), self.max_s)


@dataclass(frozen=True)
class DueDelivery:
    id: int
    destination: str
    rel_path: str
    sop_class_uid: str
    sop_instance_uid: str
    attempts: int


def record_output(db: Database, *, series_id: int, job_id: int | None, kind: str, sop_class_uid: str,
                  sop_instance_uid: str, rel_path: str, destinations: Sequence[str]) -> int:
    """Record a written output and queue one delivery per destination. Returns the output id.
    Recording the same SOP Instance UID again (a re-run job) changes nothing."""
    with db.session() as s:
        existing = s.scalar(select(OutputObject).where(OutputObject.sop_instance_uid == sop_instance_uid))
        if existing is not None:
            return existing.id
        out = OutputObject(series_id=series_id, job_id=job_id, kind=kind, sop_class_uid=sop_class_uid,
                           sop_instance_uid=sop_instance_uid, rel_path=rel_path)
        s.add(out)
        s.flush()
        for d in destinations:
            s.add(Delivery(output_id=out.id, destination=d, state=DeliveryState.PENDING, attempts=0,
                           next_attempt_at=utcnow()))
        return out.id


def due_deliveries(db: Database, now: datetime | None = None, limit: int = 200) -> list[DueDelivery]:
    now = now or utcnow()
    with db.session() as s:
        q = (select(Delivery, OutputObject).join(OutputObject, Delivery.output_id == OutputObject.id)
             .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
             .order_by(Delivery.next_attempt_at, Delivery.id).limit(limit))
        return [DueDelivery(d.id, d.destination, o.rel_path, o.sop_class_uid, o.sop_instance_uid, d.attempts)
                for d, o in s.execute(q)]


def mark_sent(db: Database, delivery_id: int) -> None:
    with db.session() as s:
        s.execute(update(Delivery).where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING)
                  .values(state=DeliveryState.SENT, sent_at=utcnow(), attempts=Delivery.attempts + 1,
                          last_error=None))


def mark_failed(db: Database, delivery_id: int, error: str, *, permanent: bool, policy: RetryPolicy,
                now: datetime | None = None) -> str:
    """Record a failed attempt; returns the new state (pending or dead)."""
    return mark_failed_many(db, [delivery_id], error, permanent=permanent, policy=policy, now=now)[delivery_id]


def mark_failed_many(db: Database, delivery_ids: Sequence[int], error: str, *, permanent: bool,
                     policy: RetryPolicy, now: datetime | None = None) -> dict[int, str]:
    """Record one failed attempt for each delivery (one transaction: a PACS outage fails hundreds at
    once). Each gets its own backoff from its own attempt count. Returns id -> new state."""
    now = now or utcnow()
    states: dict[int, str] = {}
    with db.session() as s:
        for d in s.scalars(select(Delivery).where(Delivery.id.in_(list(delivery_ids)))):
            if d.state != DeliveryState.PENDING:  # sent or dead meanwhile (resend, another pass): leave it
                states[d.id] = d.state
                continue
            d.attempts += 1
            d.last_error = error[:2000]
            too_old = now - d.created_at >= timedelta(seconds=policy.give_up_after_s)
            if permanent or too_old:
                d.state = DeliveryState.DEAD
                if too_old and not permanent:
                    d.last_error = f"gave up after {d.attempts} attempts: {error}"[:2000]
            else:
                d.next_attempt_at = now + timedelta(seconds=policy.delay(d.attempts))
            states[d.id] = d.state
    return states


def resend(db: Database, *, ids: Sequence[int] = (), dead: bool = False, pending: bool = False) -> int:
    """Put deliveries back in the queue to be tried now. Sent ones are never re-sent."""
    with db.session() as s:
        q = update(Delivery).where(Delivery.state != DeliveryState.SENT)
        conds = []
        if ids:
            conds.append(Delivery.id.in_(list(ids)))
        if dead:
            conds.append(Delivery.state == DeliveryState.DEAD)
        if pending:
            conds.append(Delivery.state == DeliveryState.PENDING)
        if not conds:
            return 0
        from sqlalchemy import or_

        res = s.execute(q.where(or_(*conds)).values(state=DeliveryState.PENDING, next_attempt_at=utcnow()))
        return res.rowcount or 0


def list_deliveries(db: Database, state: str | None = None) -> list[dict]:
    with db.session() as s:
        q = (select(Delivery, OutputObject).join(OutputObject, Delivery.output_id == OutputObject.id)
             .order_by(Delivery.id))
        if state:
            q = q.where(Delivery.state == state)
        return [{
            "id": d.id, "output_id": o.id, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
            "destination": d.destination, "state": d.state, "attempts": d.attempts,
            "next_attempt_at": d.next_attempt_at.isoformat() if d.state == DeliveryState.PENDING else None,
            "sent_at": d.sent_at.isoformat() if d.sent_at else None, "last_error": d.last_error,
            "path": o.rel_path,
        } for d, o in s.execute(q)]
