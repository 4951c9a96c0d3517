"""The Storage SCP: a pynetdicom Application Entity with C-ECHO and C-STORE for CT.

Handlers are short: access control at association request, and for C-STORE a call into
``scp.ingest.Ingestor`` with the spooled file pynetdicom wrote while receiving (chunked receive:
large instances never sit whole in memory), started in a helper thread the moment the dataset is
complete (``_on_dimse_recv``) so that it overlaps pynetdicom's hand-over of the request to the
association thread, whose C-STORE handler waits for its result. Nothing is decoded on the
association thread.
"""

from __future__ import annotations

import ipaddress
import secrets
import logging
import socket
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import os
import weakref
from concurrent.futures import ThreadPoolExecutor

from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from scp.connection import on_conn_open
from scp.negotiation import prefer_requestor_syntaxes
from scp.ingest import ACCEPTED_SOP_CLASSES, Ingestor, StoreResult, StoreStatus

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


class _PeerValueEcho(logging.Filter):
    """Drops pydicom's and pynetdicom's warnings about a peer's invalid UID (or other value) logged
    on an association's threads (DIMSE and DUL): scp.ingest answers the C-STORE with one line that
    names it, and these repeat it once per decoding of the request (a dozen lines for one instance)."""

    PREFIXES = ("Invalid value for VR", "Non-conformant '")

    def filter(self, record: logging.LogRecord) -> bool:
        from pynetdicom.association import Association
        from pynetdicom.dul import DULServiceProvider

        if not isinstance(threading.current_thread(), (Association, DULServiceProvider)):
            return True
        return not str(record.msg).startswith(self.PREFIXES)


def _quiet_peer_value_echoes() -> None:
    for name in ("pydicom", "pynetdicom.utils"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PeerValueEcho) for f in logger.filters):
            logger.addFilter(_PeerValueEcho())
    # pydicom also raises the same text as a Python warning (printed to stderr once per value)
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning, module="pydicom")


class SpoolFile:
    """Where pynetdicom's chunked receive writes one incoming C-STORE dataset (in place of its
    NamedTemporaryFile in the default temp dir): a file in the node's spool.

    pynetdicom writes to this file on its DUL thread, where a write error (disk full) would abort the
    association. Here the first write error, or free space falling below the node's minimum, removes
    the file at once and the rest of the dataset is read from the network and dropped; the C-STORE
    handler then answers 0xA700 Out of Resources and the association carries on. Writes are
    unbuffered, so an error is seen at the write that caused it and no partial file is left behind.
    Once the dataset is complete (``complete``, at pynetdicom's EVT_DIMSE_RECV on the same thread),
    the file's flush to the device starts in a helper thread (``flushed``) while the request waits
    for the association thread and its header is walked.
    """

    def __init__(self, spool_dir: Path, min_free_bytes: int = 0, max_bytes: int = 0) -> None:
        self.min_free_bytes = min_free_bytes
        self.max_bytes = max_bytes  # more than this arriving: dropped too (node.max_instance_mb, 0xC212)
        self.too_large = False
        self.spool_dir = spool_dir
        self.error: str | None = None
        self.received = 0
        self.flushed = None  # concurrent.futures.Future of the file's flush, once complete
        self.stored = None  # concurrent.futures.Future of its store_file result, once started
        # (Affected SOP Class UID, Affected SOP Instance UID) as the sender wrote them in the command
        # (``_keep_association`` may give pynetdicom other values); None until the message is complete
        self.command: tuple[str, str] | None = None
        self._fd: int | None = None
        self.name = str(spool_dir / f"in-{secrets.token_hex(8)}.dcm")
        if min_free_bytes and self._free() < min_free_bytes:
            self.error = "free disk space below the configured minimum"
            return
        try:
            self._fd = os.open(self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self._fail(exc)

    @property
    def file(self) -> "SpoolFile":  # pynetdicom calls ``.file.flush()`` after each write
        return self

    def _free(self) -> int:
        try:
            st = os.statvfs(self.spool_dir)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def _fail(self, exc: OSError | None, why: str | None = None) -> None:
        self.error = why or (os.strerror(exc.errno) if exc is not None and exc.errno else str(exc))
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
        except OSError as e:  # the spool is cleaned at the next start in any case
            log.debug("could not remove failed spool file: %s", e)

    def write(self, data) -> int:
        n = len(data)
        self.received += n
        if self.error is not None:
            return n  # read from the network and dropped: the handler answers 0xA700 (0xC212: too large)
        if self.max_bytes and self.received > self.max_bytes:
            self.too_large = True
            self._fail(None, f"more than {self.max_bytes} bytes arriving")
            return n
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            self._fail(exc)
            return n
        if self.min_free_bytes and self._free() < self.min_free_bytes:
            self._fail(None, "free disk space below the configured minimum")
        return n

    def flush(self) -> None:
        pass  # unbuffered

    def complete(self, start_flush) -> None:
        """The dataset's last byte is written: its descriptor goes to ``start_flush`` (which returns
        a Future and closes it when done), unless receiving failed."""
        if self.error is None and self._fd is not None and self.flushed is None:
            fd, self._fd = self._fd, None
            try:
                self.flushed = start_flush(fd)
            except Exception as exc:  # (the descriptor is closed) no helper thread: flushed after the walk
                log.debug("early flush not started: %s", exc)

    def discard(self) -> None:
        """The association ended before the dataset was complete: nothing of it is kept."""
        if self.error is None:
            self._fail(None, "association ended before the dataset was complete")

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                if self.error is None:
                    self.error = os.strerror(exc.errno) if exc.errno else str(exc)

    def __bool__(self) -> bool:  # pynetdicom tests ``if self._data_set_file:``
        return True


# pynetdicom creates the file for a chunked C-STORE dataset with dimse_messages.NamedTemporaryFile
# on the association's DUL thread; it is routed to the spool of the StorageSCP serving that
# association (any other use keeps the standard behaviour).
_SCP_BY_AE: "weakref.WeakValueDictionary[int, StorageSCP]" = weakref.WeakValueDictionary()
_NamedTemporaryFile = tempfile.NamedTemporaryFile


def _uid_name(uid) -> str:
    """A UID's name where the data dictionary knows it (CT Image Storage), else the UID."""
    name = getattr(uid, "name", "") or ""
    return name if name and name != str(uid) else str(uid)


def _spool_file_factory(*args, **kwargs):
    assoc = getattr(threading.current_thread(), "assoc", None)
    scp = _SCP_BY_AE.get(id(getattr(assoc, "ae", None))) if assoc is not None else None
    if scp is None:
        return _NamedTemporaryFile(*args, **kwargs)
    # the encoded dataset is never much larger than its inflated size: a dataset arriving beyond the
    # instance limit (plus room for the file meta) is dropped while it arrives, not spooled whole
    cap = scp.ingestor.max_instance_bytes
    limit = cap + cap // 256 + (1 << 16) if cap else 0  # (deflate expands incompressible data by < 0.1 %)
    return SpoolFile(scp.spool_dir, scp.min_free_bytes, limit)


class SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a listening socket that several receiving processes of one
    node accept from (``node.receivers``): the serve process binds it (``adopt`` None) and each
    receiver process adopts the same socket, inherited (``adopt``).

    The socket is non-blocking, so that a process woken for a connection another one took gets
    EAGAIN at once (socketserver ignores it) instead of waiting in accept(). A process already
    serving n associations waits n ms (at most 5) before it accepts: an idle process, woken at the
    same time, takes the connection first, which spreads concurrent associations over the
    processes (and so over the cores, one GIL each). Closing it never shuts the socket down (that
    would stop the other processes' listening too)."""

    adopt: "socket.socket | None" = None
    request_queue_size = 64

    def server_bind(self) -> None:
        if self.adopt is not None:
            self.socket.close()
            self.socket = self.adopt
            self.server_address = self.socket.getsockname()
        else:
            super().server_bind()
        self.socket.setblocking(False)

    def server_activate(self) -> None:
        if self.adopt is None:
            super().server_activate()

    def get_request(self):
        busy = len(self.active_associations)
        if busy:
            time.sleep(min(0.005, 0.001 * busy))
        sock, address = self.socket.accept()  # BlockingIOError: another process took it
        sock.setblocking(True)  # as pynetdicom's own accepted sockets (it sets its timeouts later)
        return sock, address

    def server_close(self) -> None:
        self.socket.close()


def _shared_server_class(adopt: "socket.socket | None") -> type:
    return type("SharedListenerServer", (SharedListenerServer,), {"adopt": adopt})


class RejectReason:
    """A-ASSOCIATE-RJ (result, source, diagnostic) as used by the node."""

    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
    CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # transient: the sender retries later


# node.max_associations counts associations a caller asked for; a TCP connection that has not sent
# its A-ASSOCIATE-RQ yet (a port scan, a stuck or hostile client) waits at most REQUEST_WAIT_S and
# takes one of UNREQUESTED_ALLOWANCE slots of pynetdicom's own limit beside them, so that idle
# connections cannot keep the registered scanners out
REQUEST_WAIT_S = 10.0
UNREQUESTED_ALLOWANCE = 32


@dataclass(frozen=True)
class AllowedPeer:
    name: str  # scanner name from config
    ae_title: str
    hosts: tuple[str, ...] = ()  # empty: any host
    # empty: any certificate the TLS context accepts (or plain DICOM); else accepted only over TLS
    # with a client certificate naming one of these (subject CN, subjectAltName DNS or IP address)
    certificate_names: tuple[str, ...] = ()


@dataclass
class _AssocStats:
    scanner: str | None
    calling_ae: str
    host: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


def _certificate_names(cert: dict) -> list[str]:
    """The names a verified peer certificate (``SSLSocket.getpeercert()``) carries: subject CNs,
    subjectAltName DNS names and IP addresses."""
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    return names


def _name_matches(presented: str, wanted: str) -> bool:
    try:
        return ipaddress.ip_address(presented) == ipaddress.ip_address(wanted)
    except ValueError:
        return presented.casefold() == wanted.casefold()


def _certificate_mismatch(assoc, wanted: Sequence[str]) -> str | None:
    """None when the association came over TLS with a client certificate naming one of ``wanted``;
    else why it is refused (the names are the certificate's, never patient data)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return "this scanner is accepted only over DICOM TLS (certificate_names is set)"
    cert = sock.getpeercert() or {}
    names = _certificate_names(cert)
    if not names:
        return "this scanner must present a client certificate naming it (certificate_names is set)"
    if any(_name_matches(p, w) for p in names for w in wanted):
        return None
    return f"client certificate names {', '.join(names)}, none of this scanner's certificate_names"


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
        port: int | None,
        peers: Sequence[AllowedPeer],
        ingestor: Ingestor,
        spool_dir: Path,
        max_pdu: int = 1048576,
        max_associations: int = 10,
        tls_port: int | None = None,
        ssl_context=None,
        min_free_bytes: int = 0,
        shared_listener: bool = False,
        listen_socket: "socket.socket | None" = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port  # None: no plain DICOM listener
        self.tls_port = tls_port  # the DICOM TLS listener (PS3.15 Annex B), with ssl_context
        self.ssl_context = ssl_context
        self._tls_server = None
        self.peers = {p.ae_title: p for p in peers}
        self.ingestor = ingestor
        self.spool_dir = Path(spool_dir)
        self.min_free_bytes = min_free_bytes  # receiving stops (0xA700) below this much free space
        self.max_associations = max_associations  # requested associations at once (node.max_associations)
        self._server = None
        # the plain listener shared with receiver processes (node.receivers): bound here
        # (shared_listener) or adopted from the serve process (listen_socket)
        self.shared_listener = shared_listener or listen_socket is not None
        self._listen_socket = listen_socket
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._stores: ThreadPoolExecutor | None = None  # each complete C-STORE's storing, started at once

        prefer_requestor_syntaxes()  # each context: the first syntax the sender proposed (scp.negotiation)
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.maximum_associations = max_associations + UNREQUESTED_ALLOWANCE  # the node counts requests itself
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
        """Start serving in background threads; returns the bound plain port (useful with port 0),
        or the TLS port when there is no plain listener."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.min_free_bytes:
            st = os.statvfs(self.spool_dir)
            free = st.f_bavail * st.f_frsize
            if free < self.min_free_bytes:
                log.warning("free disk space (%d MiB) is below the configured minimum (%d MiB, --min-free-mb): "
                            "every C-STORE is refused (0xA700) until space is freed", free >> 20,
                            self.min_free_bytes >> 20)
        _quiet_peer_value_echoes()
        # pynetdicom's chunked receive writes each incoming dataset to a NamedTemporaryFile in the
        # default temp dir: ours goes to our spool (so that the final rename stays on one filesystem)
        # and turns a write error into a 0xA700 answer instead of an aborted association.
        _config.STORE_RECV_CHUNKED_DATASET = True
        dimse_messages.NamedTemporaryFile = _spool_file_factory
        _SCP_BY_AE[id(self.ae)] = self
        # one at a time per association: as many threads as associations
        self._stores = ThreadPoolExecutor(max_workers=max(1, self.max_associations),
                                          thread_name_prefix="ingest-store")
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),  # TCP_NODELAY, DUL loop delay, the request's wait
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            # (normally logged at its release or abort; a connection lost may close first: a slot of
            # node.max_associations must never leak)
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_DIMSE_RECV, self._on_dimse_recv),
        ]
        if self.port is not None and self.shared_listener:
            from pynetdicom.utils import make_target

            self._server = self.ae.make_server((self.host, self.port), evt_handlers=handlers,
                                               server_class=_shared_server_class(self._listen_socket))
            self.ae._servers.append(self._server)  # as AE.start_server does
            threading.Thread(target=make_target(self._server.serve_forever), name="SharedAcceptor",
                             daemon=True).start()
            self.port = self._server.server_address[1]
            if self._listen_socket is None:
                log.info("storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        elif self.port is not None:
            self._server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
            self.port = self._server.server_address[1]
            log.info("storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        if self.tls_port is not None:
            self._start_tls(handlers)
        return self.port if self.port is not None else self.tls_port

    @property
    def listen_socket(self) -> "socket.socket | None":
        """The plain listening socket (to hand to receiver processes when ``shared_listener``)."""
        return self._server.socket if self._server is not None else None

    def _start_tls(self, handlers) -> None:
        """The TLS listener: the same AE, handlers and allow list as the plain one; the TLS handshake
        (client certificate checked against the CA) runs before any DICOM is read."""
        import ssl

        from pynetdicom.utils import make_target

        from scp.tls import TlsAssociationServer

        try:
            server = self.ae.make_server((self.host, self.tls_port), ssl_context=self.ssl_context,
                                         evt_handlers=handlers, server_class=TlsAssociationServer)
        except OSError:
            if self._server is not None:
                self._server.shutdown()
                self._server = None
            raise
        self.ae._servers.append(server)  # as AE.start_server does: counted for max_associations, shut down by ae
        threading.Thread(target=make_target(server.serve_forever), name="TlsAcceptor", daemon=True).start()
        self._tls_server = server
        self.tls_port = server.server_address[1]
        mode = ("client certificate required" if self.ssl_context.verify_mode == ssl.CERT_REQUIRED
                else "client certificate optional")
        log.info("storage SCP %s listening for DICOM TLS on %s:%d (%s)", self.ae_title, self.host, self.tls_port, mode)

    def stop(self) -> None:
        if self._tls_server is not None:
            self._tls_server.shutdown()
            self._tls_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        _SCP_BY_AE.pop(id(self.ae), None)
        self.ae.shutdown()
        stores, self._stores = self._stores, None
        if stores is not None:
            stores.shutdown(wait=True)  # (what was started is stored before the rows are committed)
        self.ingestor.close()  # the index rows still queued are committed

    # -- handlers -----------------------------------------------------------------------------
    @staticmethod
    def _on_conn_open(event) -> None:
        on_conn_open(event)
        event.assoc.acse_timeout = REQUEST_WAIT_S  # the wait for its A-ASSOCIATE-RQ (see UNREQUESTED_ALLOWANCE)

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        assoc.acse_timeout = self.ae.acse_timeout  # requested: the ACSE's own timeout from here on
        rq = assoc.requestor.primitive
        calling = (rq.calling_ae_title or "").strip()
        called = (rq.called_ae_title or "").strip()
        host = assoc.requestor.address
        peer = self.peers.get(calling)
        if called != self.ae_title:
            return  # pynetdicom rejects it (called AE title not recognised) and we log at EVT_REJECTED
        why = None
        if peer is None:
            why = "unknown calling AE title"
        elif peer.hosts and not any(_same_host(host, h) for h in peer.hosts):
            why = "host not allowed for this AE title"
        elif peer.certificate_names:
            why = _certificate_mismatch(assoc, peer.certificate_names)
        if why is not None:
            log.warning("association rejected: %s (calling AE %r from %s)", why, calling, host)
            assoc.acse.send_reject(*RejectReason.CALLING_AE_NOT_RECOGNISED)
            assoc.kill()  # as pynetdicom's own ACSE does: lets the DUL deliver the A-ASSOCIATE-RJ
            return
        with self._lock:
            full = len(self._stats) >= self.max_associations
            if not full:
                self._stats[id(assoc)] = _AssocStats(peer.name, calling, host)
        if full:
            log.warning("association rejected: the association limit (%d, node.max_associations) is reached "
                        "(calling AE %r from %s)", self.max_associations, calling, host)
            assoc.acse.send_reject(*RejectReason.LOCAL_LIMIT_EXCEEDED)
            assoc.kill()

    def _on_rejected(self, event) -> None:
        rq = event.assoc.requestor.primitive
        called = (rq.called_ae_title or "").strip() if rq is not None else ""
        calling = (rq.calling_ae_title or "").strip() if rq is not None else ""
        if called != self.ae_title:
            log.warning("association rejected: called AE title %r is not ours (from %s)", called,
                        event.assoc.requestor.address)
        elif id(event.assoc) not in self._stats:
            return  # rejected by the node itself (unknown caller, host, certificate): logged there
        else:
            with self._lock:
                self._stats.pop(id(event.assoc), None)
            active = sum(1 for a in self.ae.active_associations if a.is_acceptor)
            why = (f"too many open connections ({active}, of which some never asked for an association)"
                   if active > self.ae.maximum_associations else "refused by the DICOM layer")
            log.warning("association rejected: %s (calling AE %r from %s)", why, calling, event.assoc.requestor.address)

    def _on_accepted(self, event) -> None:
        refused = getattr(event.assoc, "_rejected_cx", None) or []
        if not refused:
            return
        why = {0x01: "user rejection", 0x02: "no reason", 0x03: "abstract syntax not supported",
               0x04: "transfer syntaxes not supported"}
        names = sorted({f"{_uid_name(cx.abstract_syntax)} ({why.get(cx.result, cx.result)})" for cx in refused})
        st = self._stats.get(id(event.assoc))
        log.info("association accepted from %s (AE %s): %d presentation context(s) refused: %s",
                 event.assoc.requestor.address, st.calling_ae if st else "?", len(refused), "; ".join(names))

    def _on_closed(self, event) -> None:
        # A peer gone in the middle of a C-STORE (abort, connection lost) leaves its partial dataset
        # in pynetdicom's unfinished message: remove it now rather than at the next start.
        partial = getattr(getattr(getattr(event.assoc, "dimse", None), "message", None), "_data_set_file", None)
        if isinstance(partial, SpoolFile):
            partial.discard()
        with self._lock:
            st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info(
            "association %s: scanner %s (AE %s from %s), %d stored, %d duplicate, %d failed, %.1f s%s",
            how, st.scanner, st.calling_ae, st.host, st.stored, st.duplicates, st.failed,
            time.monotonic() - st.started, f", process {os.getpid()}" if self.shared_listener else "",
        )

    def _on_acse_recv(self, event) -> None:
        # An A-RELEASE-RQ, before it is answered: the association's index rows queued for the group
        # commit are committed first, so that a released association is indexed in full.
        if isinstance(event.primitive, A_RELEASE) and event.primitive.result is None:
            self.ingestor.flush()

    def _on_dimse_recv(self, event) -> None:
        # On the DUL thread, the moment a DIMSE message is complete (before the association thread
        # takes it: pynetdicom's association thread looks for a message every millisecond): a
        # C-STORE's spooled dataset starts its flush to the device, and its storing (walk, rename,
        # the folder's flush, the index hand-off) starts in a helper thread; the C-STORE handler
        # then waits for its result. Both overlap the request's pick-up.
        spool = getattr(event.message, "_data_set_file", None)
        if not isinstance(spool, SpoolFile):
            return
        cs = event.message.command_set
        spool.command = (str(cs.get("AffectedSOPClassUID", "") or ""), str(cs.get("AffectedSOPInstanceUID", "") or ""))
        self._keep_association(event.assoc, event.message)
        spool.complete(self.ingestor.start_flush)
        if spool.flushed is None or self._stores is None:
            return  # (receiving failed, or no helper thread): the handler does it all
        try:
            msg = event.message
            ts = event.assoc._accepted_cx[msg.context_id].transfer_syntax[0]
            st = self._stats.get(id(event.assoc))
            spool.stored = self._stores.submit(
                self.ingestor.store_file, Path(spool.name),
                affected_sop_class=spool.command[0], affected_sop_instance=spool.command[1],
                transfer_syntax=str(ts), scanner=st.scanner if st else None, calling_ae=st.calling_ae if st else None,
                peer_host=st.host if st else None, flushed=spool.flushed)
        except Exception as exc:  # (e.g. stopping) the handler stores it itself
            log.debug("early store not started: %s", exc)

    @staticmethod
    def _keep_association(assoc, msg) -> None:
        """pynetdicom aborts the whole association, without a status for the sender and losing its
        later instances, on a C-STORE-RQ whose Affected SOP Instance UID is over 64 characters (it
        cannot build the request) or whose Affected SOP Class UID has no service class (e.g. "31" or
        an unknown private UID). The node refuses such an instance instead (0xC220, resp. 0xA900
        when the dataset's SOP class differs): pynetdicom gets values it accepts, the context's SOP
        class and a stand-in UID (the response then carries them), while the C-STORE checks take
        the sender's own from the spool file (``SpoolFile.command``)."""
        from pynetdicom.service_class import StorageServiceClass
        from pynetdicom.sop_class import uid_to_service_class

        cs = msg.command_set
        cx = assoc._accepted_cx.get(msg.context_id)
        if cx is None:
            return  # pynetdicom answers an unknown context itself
        sop_class = str(cs.get("AffectedSOPClassUID", "") or "")
        if not sop_class or uid_to_service_class(sop_class) is not StorageServiceClass:
            cs.AffectedSOPClassUID = str(cx.abstract_syntax)
        instance = str(cs.get("AffectedSOPInstanceUID", "") or "")
        if not instance or len(instance) > 64:
            cs.AffectedSOPInstanceUID = "2.25.0"

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        st = self._stats.get(id(event.assoc))
        req = event.request
        spooled = getattr(req, "_dataset_file", None)
        flushed = None
        if isinstance(spooled, SpoolFile):
            flushed = spooled.flushed
            spooled.close()  # complete: everything was written (unbuffered) before this event
            if spooled.error is not None:
                if st is not None:
                    st.failed += 1
                if spooled.too_large:
                    log.warning("C-STORE refused: instance too large (%d bytes arrived; the limit is %d MiB, "
                                "node.max_instance_mb)", spooled.received, self.ingestor.max_instance_bytes >> 20)
                    return int(StoreStatus.TOO_LARGE)
                log.error("C-STORE failed: instance not stored while receiving (%s); %d bytes dropped",
                          spooled.error, spooled.received)
                return int(StoreStatus.OUT_OF_RESOURCES)
        if isinstance(spooled, SpoolFile) and spooled.stored is not None:
            result = self._result(spooled.stored, event)
        else:
            result = self._store_here(event, st, flushed)
        if st is not None:
            if result.status == StoreStatus.SUCCESS:
                if result.outcome == "stored":
                    st.stored += 1
                else:
                    st.duplicates += 1
            else:
                st.failed += 1
        return int(result.status)

    def _result(self, stored, event):
        try:
            return stored.result()
        except Exception as exc:  # (store_file answers every failure itself: a bug, not the peer's fault)
            log.error("C-STORE failed: unexpected error (%s: %s)", type(exc).__name__, str(exc)[:200])
            return StoreResult(StoreStatus.PROCESSING_FAILURE, detail=f"unexpected error: {type(exc).__name__}")

    def _store_here(self, event, st, flushed):
        req = event.request
        try:
            path = Path(event.dataset_path)
        except AttributeError:  # chunked receive disabled by someone: write the bytes to the spool
            path = self.spool_dir / f"in-{secrets.token_hex(8)}.dcm"
            path.write_bytes(event.encoded_dataset())
        command = getattr(getattr(req, "_dataset_file", None), "command", None)
        sop_class, sop_instance = command or (str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID))
        return self.ingestor.store_file(
            path,
            affected_sop_class=sop_class,
            affected_sop_instance=sop_instance,
            transfer_syntax=str(event.context.transfer_syntax),
            scanner=st.scanner if st else None,
            calling_ae=st.calling_ae if st else None,
            peer_host=st.host if st else None,
            flushed=flushed,
        )
