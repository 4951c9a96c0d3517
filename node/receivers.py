"""Receiving processes (``node.receivers = N``): concurrent associations spread over the cores.

pynetdicom runs every association on two threads of one interpreter, so all associations of one
process share one GIL. With ``node.receivers = N`` the serve process binds the plain DICOM port
as usual and N - 1 receiver processes (multiprocessing *spawn*: fresh interpreters, no inherited
database connections) accept from the same listening socket, each running the same storage SCP
(``make_storage_scp``: same AE title, allow list, limits, spool and store) with its own Ingestor
(its own committer thread; the database's own locking orders their transactions) and its own
database connections. A process already serving associations waits a little before it accepts
(``scp.server.SharedListenerServer``), so that an idle one takes a new association first.
``node.max_associations`` is shared out: each process accepts at most ceil(max_associations / N).
The TLS port, when configured, is served by the serve process alone. Start-up work (spool
cleaning, reconciliation, the single-node lock) stays in the serve process, which starts the
receivers once its own listener is bound, restarts one that dies (and reconciles the files it may
have acknowledged without their index rows: ``ReceiverPool._reconcile_after``) and stops them (SIGTERM: the
process stops its listener and aborts its associations, as the serve process does, and commits
its queued index rows) before it stops its own.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time

from node.config import Settings
from node.supervise import SupervisedPool
from storage.db import Database

log = logging.getLogger(__name__)

# how long after a receiver's death its files are reconciled, and how old a file must be then: 25x
# the group commit's 0.2 s window, so a live receiver's own row is written first
RECONCILE_SETTLE_S = 5.0


def make_storage_scp(settings: Settings, db: Database, store, *, min_free_bytes: int = 0, server_ctx=None,
                     listen_socket=None, shared_listener: bool = False):
    """The node's storage SCP (scp.server.StorageSCP) as the configuration describes it; the serve
    process and each receiver process build theirs here."""
    from scp.ingest import Ingestor
    from scp.server import AllowedPeer, StorageSCP

    node = settings.node
    peers = [AllowedPeer(s.name, s.ae_title, tuple(s.hosts), tuple(s.certificate_names)) for s in settings.scanners]
    tls = settings.tls
    return StorageSCP(
        ae_title=node.ae_title, host=node.host, port=None if node.port == -1 else node.port,
        peers=peers, ingestor=Ingestor(db, store, max_instance_bytes=node.max_instance_mb << 20, group_commit=True),
        spool_dir=store.spool, max_pdu=node.max_pdu,
        max_associations=max(1, math.ceil(node.max_associations / node.receivers)),
        min_free_bytes=min_free_bytes,
        tls_port=tls.port if (tls is not None and server_ctx is not None) else None, ssl_context=server_ctx,
        shared_listener=shared_listener, listen_socket=listen_socket,
    )


def receiver_process_main(settings: Settings, listen_socket, index: int, parent_pid: int,
                          min_free_bytes: int, ready=None) -> None:
    """Entry point of one receiver process (spawned): serves associations from the inherited
    listening socket until SIGTERM or until the parent dies; ``ready`` (a Connection) gets one
    message once it accepts."""
    from node.workers import _die_with_parent

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    from node.cli import setup_logging
    from storage.filestore import FileStore

    setup_logging(settings.node.log_level)
    db = Database(settings.node.database)
    scp = make_storage_scp(settings, db, FileStore(settings.node.data_dir), min_free_bytes=min_free_bytes,
                           listen_socket=listen_socket)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def _watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:  # orphaned: the parent died without telling us
                log.error("receiver %d: parent process gone; stopping", index + 1)
                stop.set()

    threading.Thread(target=_watch, name="parent-watch", daemon=True).start()
    scp.start()
    log.info("receiver process %d/%d started (pid %d)", index + 1, settings.node.receivers, os.getpid())
    if ready is not None:
        try:
            ready.send(os.getpid())
        except OSError:  # (a restart: nobody waits for it)
            pass
        ready.close()
    try:
        stop.wait()
    finally:
        scp.stop()  # (index rows still queued are committed)
        db.dispose()


class ReceiverPool(SupervisedPool):
    """The ``n`` receiver processes beside the serve process: started, restarted when one dies,
    stopped (node.supervise)."""

    supervisor_name = "receiver-pool"

    def __init__(self, settings: Settings, listen_socket, n: int, *, min_free_bytes: int = 0,
                 stop_timeout_s: float = 10.0) -> None:
        super().__init__(settings, n, stop_timeout_s=stop_timeout_s)
        self.listen_socket = listen_socket
        self.min_free_bytes = min_free_bytes
        self._started_at = [0.0] * n  # epoch seconds each child was started

    def _spawn(self, i: int):
        """Start receiver i (the serve process is receiver 1); returns the end of the pipe on which
        it says it is ready."""
        theirs, ours = self._ctx.Pipe(duplex=False)
        self._started_at[i] = time.time()
        self._start_child(i, receiver_process_main, f"qa-node-receiver-{i + 2}",
                          (self.settings, self.listen_socket, i + 1, os.getpid(), self.min_free_bytes, ours))
        ours.close()
        return theirs

    def _restart(self, i: int) -> None:
        self._spawn(i).close()

    def start(self, ready_timeout_s: float = 60.0) -> None:
        """Start the processes and wait (at most ``ready_timeout_s``) until each accepts: the node
        says it is ready with all its receivers listening."""
        pipes = [self._spawn(i) for i in range(self.n)]
        deadline = time.monotonic() + ready_timeout_s
        for i, conn in enumerate(pipes):
            try:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    log.error("receiver process %d not ready after %.0f s; the others serve meanwhile", i + 2,
                              ready_timeout_s)
                else:
                    conn.recv()
            except (EOFError, OSError):  # it died starting: the supervisor restarts it
                log.error("receiver process %d ended while starting (exit code %s)", i + 2, self._procs[i].exitcode)
            finally:
                conn.close()
        self._start_supervisor()

    def _exited(self, i: int, p) -> None:
        log.error("receiver process %d (pid %d) exited with code %s; restarting (acknowledged files whose "
                  "index rows it had not committed are indexed in %.0f s)", i + 2, p.pid, p.exitcode, RECONCILE_SETTLE_S)
        threading.Thread(target=self._reconcile_after, args=(i + 2, self._started_at[i]),
                         name="receiver-reconcile", daemon=True).start()

    def _reconcile_after(self, number: int, since: float) -> None:
        """A dead receiver may have acknowledged instances whose index rows its group commit had not
        written yet (within ~0.2 s of their Success): once RECONCILE_SETTLE_S have passed, the store's
        series folders changed since it started are reconciled (node.reconcile), leaving out newer
        files, which live receivers are still indexing."""
        if self._stopping.wait(RECONCILE_SETTLE_S):
            return  # stopping: the next start reconciles the whole store
        from node.reconcile import reconcile_store
        from storage.filestore import FileStore

        db = Database(self.settings.node.database)
        try:
            out = reconcile_store(db, FileStore(self.settings.node.data_dir), since=since - 1.0,
                                  settle_s=RECONCILE_SETTLE_S, why=f"receiver process {number} exit")
            if not (out.indexed or out.quarantined):
                log.info("receiver process %d exit reconciliation: every stored file is indexed", number)
        except Exception as exc:  # noqa: BLE001 - the next start reconciles the whole store
            log.error("receiver process %d exit reconciliation failed (%s: %s); the next start does it",
                      number, type(exc).__name__, str(exc)[:200])
        finally:
            db.dispose()
