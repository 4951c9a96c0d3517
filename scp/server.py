"""The Storage SCP: a pynetdicom Application Entity with C-ECHO and C-STORE for CT.

Handlers are short: access control at association request, and for C-STORE a call into
``scp.ingest.Ingestor`` with the spooled file pynetdicom wrote while receiving (chunked receive:
large instances never sit whole in memory). Nothing is decoded on the association thread.
"""

from __future__ import annotations

import ipaddress
import secrets
import logging
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification

from scp.ingest import ACCEPTED_SOP_CLASSES, Ingestor, StoreStatus

log = logging.getLogger(__name__)

# Transfer syntaxes CT scanners use. Accepted as sent and stored as received.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction (SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old scanners)
]


DUL_LOOP_DELAY_S = 0.0001


class RejectReason:
    """A-ASSOCIATE-RJ (result, source, diagnostic) as used by the node."""

    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class AllowedPeer:
    name: str  # scanner name from config
    ae_title: str
    hosts: tuple[str, ...] = ()  # empty: any host


@dataclass
class _AssocStats:
    scanner: str | None
    calling_ae: str
    host: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class StorageSCP:
    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        peers: Sequence[AllowedPeer],
        ingestor: Ingestor,
        spool_dir: Path,
        max_pdu: int = 1048576,
        max_associations: int = 10,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.peers = {p.ae_title: p for p in peers}
        self.ingestor = ingestor
        self.spool_dir = Path(spool_dir)
        self._server = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()

        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = max_associations
        ae.require_called_aet = True  # a wrong called AE title gets A-ASSOCIATE-RJ (0x07)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for uid in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.ae = ae

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> int:
        """Start serving in background threads; returns the bound port (useful with port 0)."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # pynetdicom's chunked receive writes each incoming dataset to a NamedTemporaryFile in the
        # default temp dir: point it at our spool so that the final rename stays on one filesystem.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.spool_dir)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            tempfile.tempdir = self._saved_tempdir  # the spool redirect is ours only while serving
        self.ae.shutdown()

    # -- handlers -----------------------------------------------------------------------------
    def _on_conn_open(self, event) -> None:
        # pynetdicom never sets TCP_NODELAY: without it small PDUs (C-STORE-RSP) wait for Nagle.
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom's DUL thread sleeps 1 ms whenever it finds no event; between two C-STOREs that
        # idle sleep alone costs ~20% of the throughput. 0.1 ms keeps latency low at little CPU.
        event.assoc.dul._run_loop_delay = DUL_LOOP_DELAY_S

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = (rq.calling_ae_title or "").strip()
        called = (rq.called_ae_title or "").strip()
        host = assoc.requestor.address
        peer = self.peers.get(calling)
        if called != self.ae_title:
            return  # pynetdicom rejects it (called AE title not recognised) and we log at EVT_REJECTED
        if peer is None or (peer.hosts and not any(_same_host(host, h) for h in peer.hosts)):
            why = "unknown calling AE title" if peer is None else "host not allowed for this AE title"
            log.warning("association rejected: %s (calling AE %r from %s)", why, calling, host)
            assoc.acse.send_reject(*RejectReason.CALLING_AE_NOT_RECOGNISED)
            assoc.kill()  # as pynetdicom's own ACSE does: lets the DUL deliver the A-ASSOCIATE-RJ
            return
        with self._lock:
            self._stats[id(assoc)] = _AssocStats(peer.name, calling, host)
        self._prefer_requestor_syntaxes(assoc)

    @staticmethod
    def _prefer_requestor_syntaxes(assoc) -> None:
        """Accept, for each context, the first transfer syntax the SCU proposed that we support.

        pynetdicom picks by the acceptor's order; a scanner lists its native (as-stored) syntax
        first, and choosing it is what lets us store every instance exactly as the scanner has it
        (an SCU asked for a syntax it cannot convert to fails the store)."""
        order: list[str] = []
        for rq_cx in assoc.requestor.primitive.presentation_context_definition_list or []:
            for ts in rq_cx.transfer_syntax:
                if ts not in order:
                    order.append(str(ts))
        for cx in assoc.acceptor.supported_contexts:
            ours = list(cx.transfer_syntax)
            ranked = [ts for ts in order if ts in ours] + [ts for ts in ours if ts not in order]
            cx.transfer_syntax = ranked

    def _on_rejected(self, event) -> None:
        rq = event.assoc.requestor.primitive
        called = (rq.called_ae_title or "").strip() if rq is not None else ""
        if called != self.ae_title:
            log.warning("association rejected: called AE title %r is not ours (from %s)", called,
                        event.assoc.requestor.address)

    def _on_closed(self, event) -> None:
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info(
            "association %s: scanner %s (AE %s from %s), %d stored, %d duplicate, %d failed, %.1f s",
            how, st.scanner, st.calling_ae, st.host, st.stored, st.duplicates, st.failed,
            time.monotonic() - st.started,
        )

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        st = self._stats.get(id(event.assoc))
        req = event.request
        try:
            path = Path(event.dataset_path)
        except AttributeError:  # chunked receive disabled by someone: write the bytes to the spool
            path = self.spool_dir / f"in-{secrets.token_hex(8)}.dcm"
            path.write_bytes(event.encoded_dataset())
        result = self.ingestor.store_file(
            path,
            affected_sop_class=str(req.AffectedSOPClassUID),
            affected_sop_instance=str(req.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            scanner=st.scanner if st else None,
            calling_ae=st.calling_ae if st else None,
            peer_host=st.host if st else None,
        )
        if st is not None:
            if result.status == StoreStatus.SUCCESS:
                if result.outcome == "stored":
                    st.stored += 1
                else:
                    st.duplicates += 1
            else:
                st.failed += 1
        return int(result.status)
