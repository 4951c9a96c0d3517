"""Store one received instance: parse its header, validate, make it durable, index it.

This is the whole of the C-STORE handler's work, kept out of pynetdicom callbacks so that it can be
tested directly. No pixel data is decoded here; pixel decoding happens in analysis.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from scp.dataset_check import DatasetError, InstanceTooLarge, check_pixel_data, walk_file

from storage.db import Database, utcnow
from storage.filestore import FileStore, InvalidUID, check_uid, fsync_dir, sha256_file
from storage.repo import (InstanceInfo, PendingRow, StoreOutcome, add_instance, add_instances_lazy,
                          durable_series_id, record_conflict)

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
ACCEPTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
MULTIFRAME_SOP_CLASSES = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)

ENOSPC_LIKE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
DEFAULT_MAX_INSTANCE_BYTES = 2048 << 20  # node.max_instance_mb


class StoreStatus(IntEnum):
    """DIMSE C-STORE status codes used by the node (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_PARSE = 0xC210  # "Cannot understand": the dataset does not parse
    PROCESSING_FAILURE = 0xC211  # "Cannot understand": unexpected error in the node (one log line)
    TOO_LARGE = 0xC212  # "Cannot understand": larger than node.max_instance_mb (inflated) or too many elements
    INVALID_UID = 0xC220  # "Cannot understand": a UID violates the grammar or does not match
    MISSING_ATTRIBUTE = 0xC230  # "Cannot understand": a required attribute is absent


@dataclass(frozen=True)
class StoreResult:
    status: StoreStatus
    outcome: str | None = None
    detail: str = ""
    series_id: int | None = None


def _str(ds, keyword: str) -> str | None:
    """A pydicom Dataset's or a walked dataset's value as text, at most 64 characters."""
    v = ds.text(keyword) if hasattr(ds, "text") else ds.get(keyword)
    if v is None or v == "":
        return None
    return str(v).strip()[:64] or None


def _acquired_at(ds) -> datetime | None:
    for date_kw, time_kw in (("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime"),
                             ("StudyDate", "StudyTime")):
        d = _str(ds, date_kw)
        if not d or len(d) < 8 or not d[:8].isdigit():
            continue
        t = (_str(ds, time_kw) or "000000").split(".")[0].ljust(6, "0")[:6]
        try:
            return datetime.strptime(d[:8] + t, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    return None


def _positive_int(ds, keyword: str) -> int | None:
    try:
        v = int(ds.integer(keyword) if hasattr(ds, "integer") else ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def read_instance_info(path: Path, *, affected_sop_class: str, affected_sop_instance: str,
                       transfer_syntax: str, max_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> InstanceInfo:
    """Walk the whole dataset (never decoding pixels), check that it can be read to its end with
    complete Pixel Data, and validate what becomes part of a path.

    Raises InvalidUID, KeyError (missing attribute), _Mismatch, DatasetError or InstanceTooLarge."""
    check_uid(affected_sop_instance, "Affected SOP Instance UID")
    ds = walk_file(path, transfer_syntax, max_bytes=max_bytes)
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if ds.uid(kw) is None:
            raise KeyError(kw)
    sop_uid = check_uid(ds.uid("SOPInstanceUID"), "SOPInstanceUID")
    if sop_uid != affected_sop_instance:
        raise InvalidUID(f"SOPInstanceUID {sop_uid} differs from the request's Affected SOP Instance UID")
    sop_class = ds.uid("SOPClassUID") or ""
    if sop_class != affected_sop_class:
        raise _Mismatch(f"SOPClassUID {sop_class[:80]!r} differs from the request's Affected SOP Class UID {affected_sop_class}")
    series_uid = check_uid(ds.uid("SeriesInstanceUID"), "SeriesInstanceUID")
    study_uid = check_uid(ds.uid("StudyInstanceUID"), "StudyInstanceUID")
    check_pixel_data(ds)  # every accepted SOP class is an image
    frames = _positive_int(ds, "NumberOfFrames") or 1
    expected = _positive_int(ds, "ImagesInAcquisition")
    if expected is None and affected_sop_class in MULTIFRAME_SOP_CLASSES:
        expected = 1  # one multi-frame instance normally carries the whole series
    return InstanceInfo(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        transfer_syntax_uid=transfer_syntax,
        number_of_frames=frames,
        modality=_str(ds, "Modality"),
        manufacturer=_str(ds, "Manufacturer"),
        model_name=_str(ds, "ManufacturerModelName"),
        device_serial=_str(ds, "DeviceSerialNumber"),
        station_name=_str(ds, "StationName"),
        series_description=_str(ds, "SeriesDescription"),
        protocol_name=_str(ds, "ProtocolName"),
        acquired_at=_acquired_at(ds),
        expected_instances=expected,
    )


def _flush_data(fd: int) -> None:
    os.fdatasync(fd)  # looked up at each call (tests replace it)


class _Mismatch(ValueError):
    pass


class _NoLink(OSError):
    pass


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
try:
    import ctypes

    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
except (ImportError, OSError, AttributeError):  # not Linux / glibc < 2.28: the hard link below
    _renameat2 = None


def move_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError, nothing changed): Linux
    renameat2(RENAME_NOREPLACE), one atomic step; elsewhere a hard link and an unlink. _NoLink where
    the file system can do neither (the caller replaces instead)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst)) if err != errno.EEXIST else FileExistsError(
                err, os.strerror(err), str(dst))
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOENT):
            raise
        raise _NoLink(exc.errno, exc.strerror) from None
    os.unlink(src)


class _Committer:
    """One thread that commits queued index rows (``storage.repo.PendingRow``) in batches: whatever
    queued up while the previous transaction ran, from every association, goes into the next one.

    A database error keeps the rows queued and retries every ``RETRY_S``; meanwhile ``healthy`` is
    False, so that new instances take the synchronous path (and are refused with 0xA700 while the
    database is down). A row found not new at commit time (its SOP Instance UID indexed under
    another path by then) is a duplicate or a conflict, as ``add_instance`` says: the file placed
    for it is removed, a conflict counted."""

    RETRY_S = 1.0
    # a batch is committed this long after its first row (at once when flushed: an association's
    # A-RELEASE, a series' first row, stop): a 140-slice association takes a few such commits
    # instead of one every 20 ms, which halves this thread's CPU (and GIL) time during a receive
    GATHER_S = 0.2
    BATCH_MAX = 512

    def __init__(self, db: Database, store: FileStore) -> None:
        self.db = db
        self.store = store
        self.healthy = True
        self._cond = threading.Condition()
        self._queue: list[PendingRow] = []
        self._queued = 0  # rows ever queued
        self._done = 0  # rows committed or given up
        self._closing = False
        self._urgent = 0  # flush() calls waiting
        self._thread = threading.Thread(target=self._run, name="index-committer", daemon=True)
        self._thread.start()

    def put(self, row: PendingRow) -> None:
        with self._cond:
            self._queue.append(row)
            self._queued += 1
            if len(self._queue) == 1 or len(self._queue) >= self.BATCH_MAX:
                self._cond.notify_all()  # (a batch gathering is not woken for each row)

    def flush(self) -> bool:
        """Wait until the rows queued so far are committed; False when they cannot be (the database
        failing for more than two retries, or the thread gone)."""
        with self._cond:
            target = self._queued
            if self._done >= target:
                return True
            deadline = None
            self._urgent += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    if not self._thread.is_alive():
                        return False
                    if not self.healthy:
                        deadline = deadline or time.monotonic() + 2 * self.RETRY_S
                        if time.monotonic() >= deadline:
                            return False
                    self._cond.wait(0.1)
                return True
            finally:
                self._urgent -= 1

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                # gather: fewer, larger transactions, and this thread off the GIL meanwhile
                until = time.monotonic() + self.GATHER_S
                while (not self._closing and not self._urgent and len(self._queue) < self.BATCH_MAX
                       and (left := until - time.monotonic()) > 0):
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
            batch = self._hashed(batch)
            if not batch:
                continue
            try:
                not_new = add_instances_lazy(self.db, batch)
            except Exception as exc:  # noqa: BLE001 - the database failed: keep the rows, retry
                if self.healthy:
                    log.error("index rows not committed (%s: %s); retrying every %.0f s (their files are "
                              "durable; start-up reconciliation indexes them if the node stops first)",
                              type(exc).__name__, str(exc)[:200], self.RETRY_S)
                self.healthy = False
                with self._cond:
                    self._queue[:0] = batch
                    if self._closing:
                        log.error("%d index row(s) not committed at stop: start-up reconciliation indexes "
                                  "their files", len(self._queue))
                        self._done += len(self._queue)
                        self._queue = []
                        self._cond.notify_all()
                        return
                    self._cond.wait(self.RETRY_S)
                continue
            if not self.healthy:
                log.info("index rows committed again")
                self.healthy = True
            for row, outcome, kept in not_new:
                self._not_new(row, outcome, kept)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _hashed(self, batch: list[PendingRow]) -> list[PendingRow]:
        """The rows with their SHA-256, read from the stored files (hashlib releases the GIL)."""
        out = []
        for row in batch:
            if row.sha256 is None:
                try:
                    row = replace(row, sha256=sha256_file(self.store.abs(row.rel_path)))
                except OSError as exc:  # not indexed now; start-up reconciliation looks at it again
                    log.error("stored instance unreadable, not indexed (%s)", os.strerror(exc.errno) if exc.errno else exc)
                    with self._cond:
                        self._done += 1
                    continue
            out.append(row)
        return out

    def _not_new(self, row: PendingRow, outcome: str, kept: str | None) -> None:
        if kept != row.rel_path:
            try:
                self.store.abs(row.rel_path).unlink(missing_ok=True)
            except OSError as exc:
                log.debug("could not remove a second copy: %s", exc)
        if outcome == StoreOutcome.DUPLICATE:
            log.debug("duplicate instance with identical bytes acknowledged (no second copy)")
            return
        try:
            record_conflict(self.db, row.info.sop_instance_uid, row.sha256, row.calling_ae)
        except SQLAlchemyError as exc:
            log.error("could not count the conflicting copy (%s)", type(exc).__name__)
        log.warning("instance %s received again with different bytes: first copy kept, conflict counted",
                    row.info.sop_instance_uid)


class Ingestor:
    """Durable storage of received instances; shared by all association threads.

    Durability (what is on the device before Success): the instance's bytes and length (fdatasync
    of the file) and its name in the store (fsync of the series folder). The file's flush runs in a
    helper thread; the node's receiver (``scp.server``) starts it the moment the last byte of the
    dataset is written to the spool, so that it runs while the association thread picks the request
    up and walks the header; called without one (``flushed=None``) it starts after the walk. The
    folder's fsync runs on the association thread after the name was linked into the store; Success
    waits for both. fdatasync suffices for the file: it writes the data and the metadata needed to
    read them back (size, block allocation; POSIX synchronized I/O data integrity), leaving only the
    timestamps, which nothing reads, to the file system's next commit; the folder, whose new entry
    is what a reader needs to find the file, gets a full fsync. A crash before both returned leaves
    a file that was never acknowledged and has no index row, which start-up reconciliation
    (node.reconcile) checks like a C-STORE and indexes or quarantines; a refused instance is only
    removed from the spool (its early flush, if any, was wasted, nothing else). The index row of a
    series' first instance (series row with the scanner, calling AE and host) is committed durably
    before Success. With
    ``group_commit`` (the node's receiver) the rows of later instances of such a series are handed
    to one committer thread and Success is sent without waiting for them: the committer takes their
    SHA-256 from the stored files and writes whatever has queued up, from every association, in one
    transaction (``add_instances_lazy``), within 0.2 s of its first row (``_Committer.GATHER_S``);
    an association's rows are all committed before its A-RELEASE is answered (``scp.server``). A
    crash or power loss can lose the last of those rows, never a file, and reconciliation indexes
    those files at the next start into their durable series.
    Without ``group_commit`` each row is committed (lazily after the first of its series) before
    the call returns."""

    def __init__(self, db: Database, store: FileStore, *, max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES,
                 group_commit: bool = False) -> None:
        self.db = db
        self.store = store
        self.max_instance_bytes = max_instance_bytes
        self.group_commit = group_commit
        # One SOP Instance UID is stored by one thread at a time (striped locks).
        self._locks = [threading.Lock() for _ in range(64)]
        self._state_lock = threading.Lock()
        self._flusher: ThreadPoolExecutor | None = None  # started on first use, shut down by close()
        self._committer: _Committer | None = None

    # -- helper threads ------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        """The helper threads: each file's flush, beside its folder's on the association thread."""
        with self._state_lock:
            if self._flusher is None:
                self._flusher = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ingest-io")
            return self._flusher

    def start_flush(self, fd: int) -> Future:
        """Flush a complete spooled file's data (``os.fdatasync``, see the class doc) in a helper
        thread; the descriptor is closed when it is done (also when cancelled). By descriptor: the
        file may be renamed into the store, or removed, while its flush runs."""
        try:
            flushed = self._executor().submit(_flush_data, fd)
        except BaseException:
            os.close(fd)
            raise
        flushed.add_done_callback(lambda _: os.close(fd))
        return flushed

    def _rows(self) -> "_Committer":
        with self._state_lock:
            if self._committer is None:
                self._committer = _Committer(self.db, self.store)
            return self._committer

    def flush(self) -> bool:
        """Wait until every index row handed to the committer so far is committed; False when they
        cannot be now (the database failing)."""
        committer = self._committer
        return committer.flush() if committer is not None else True

    def close(self) -> None:
        """Commit the index rows still queued and stop the helper threads (a later store starts
        them again)."""
        with self._state_lock:
            committer, self._committer = self._committer, None
            flusher, self._flusher = self._flusher, None
        if committer is not None:
            committer.close()
        if flusher is not None:
            flusher.shutdown(wait=True)

    # -- storing -------------------------------------------------------------------------------
    def store_file(
        self,
        spooled: Path,
        *,
        affected_sop_class: str,
        affected_sop_instance: str,
        transfer_syntax: str,
        scanner: str | None,
        calling_ae: str | None,
        peer_host: str | None,
        flushed: Future | None = None,
    ) -> StoreResult:
        """Take ownership of ``spooled`` (a complete file in the spool): it is moved into the store
        or removed. ``flushed``: the file's flush already started (``start_flush``), else it starts
        once the instance is accepted. Returns the DIMSE status to send."""
        try:
            return self._store(spooled, affected_sop_class, affected_sop_instance, transfer_syntax,
                               scanner, calling_ae, peer_host, flushed)
        except Exception as exc:  # a bug, not the peer's fault: one line (traceback at DEBUG), nothing kept
            log.error("C-STORE failed: unexpected error (%s: %s)", type(exc).__name__, str(exc)[:200])
            log.debug("C-STORE failure", exc_info=True)
            return StoreResult(StoreStatus.PROCESSING_FAILURE, detail=f"unexpected error: {type(exc).__name__}")
        finally:
            spooled.unlink(missing_ok=True)

    def _store(self, spooled, sop_class, sop_instance, ts, scanner, calling_ae, peer_host,
               flushed: Future | None) -> StoreResult:
        try:
            info = read_instance_info(spooled, affected_sop_class=sop_class, affected_sop_instance=sop_instance,
                                      transfer_syntax=ts, max_bytes=self.max_instance_bytes)
        except InvalidUID as exc:
            log.warning("C-STORE refused: %s", exc)
            return StoreResult(StoreStatus.INVALID_UID, detail=str(exc))
        except _Mismatch as exc:
            log.warning("C-STORE refused: %s", exc)
            return StoreResult(StoreStatus.DATASET_MISMATCH, detail=str(exc))
        except KeyError as exc:
            log.warning("C-STORE refused: required attribute %s missing", exc)
            return StoreResult(StoreStatus.MISSING_ATTRIBUTE, detail=f"required attribute {exc} missing")
        except InstanceTooLarge as exc:
            log.warning("C-STORE refused: instance too large (%s)", exc)
            return StoreResult(StoreStatus.TOO_LARGE, detail=f"instance too large: {exc}")
        except DatasetError as exc:
            log.warning("C-STORE refused: dataset cannot be read (%s)", exc)
            return StoreResult(StoreStatus.CANNOT_PARSE, detail=f"dataset cannot be read: {exc}")
        except OSError as exc:  # reading our own spool failed: our resources, not the peer's data
            log.error("C-STORE failed: spooled dataset unreadable (%s)", os.strerror(exc.errno) if exc.errno else exc)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="spooled dataset unreadable")

        # accepted: the file's flush (if not started while the request was picked up) starts now, so
        # that a refused instance costs no device write; the folder's flush joins it once the file
        # is linked into the store
        try:
            if flushed is None:
                fd = os.open(spooled, os.O_RDONLY)
                size = os.fstat(fd).st_size
                flushed = self.start_flush(fd)
            else:
                size = os.stat(spooled).st_size
        except OSError as exc:
            log.error("C-STORE failed: spooled dataset unreadable (%s)", os.strerror(exc.errno) if exc.errno else exc)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="spooled dataset unreadable")
        with self._locks[hash(info.sop_instance_uid) % len(self._locks)]:
            return self._commit(spooled, size, info, scanner, calling_ae, peer_host, flushed)

    def _place(self, spooled: Path, rel: str, flushed: Future, *, replace: bool) -> None:
        """Put the spooled file at ``rel`` and make file and name durable: the folder's fsync here,
        beside the file's flush (``flushed``), both awaited. ``replace=False``: an existing file there
        raises FileExistsError, untouched (``move_noreplace``). On an error nothing is left at ``rel``."""
        dst = self.store.abs(rel)
        move = os.replace if replace else move_noreplace
        try:
            move(spooled, dst)
        except FileNotFoundError:  # the series' folder (or the study's) does not exist yet
            dst.parent.mkdir(parents=True, exist_ok=True)
            move(spooled, dst)
        try:
            fsync_dir(dst.parent)
            flushed.result()  # the file's flush (an OSError from it: not stored, 0xA700)
        except BaseException:
            dst.unlink(missing_ok=True)
            raise

    def _commit(self, spooled: Path, size: int, info: InstanceInfo, scanner, calling_ae, peer_host,
                flushed: Future) -> StoreResult:
        rel = self.store.instance_rel_path(info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid)
        if self.group_commit:
            committer = self._rows()
            series_id = durable_series_id(self.db, info.series_instance_uid) if committer.healthy else None
            if series_id is not None:
                try:
                    self._place(spooled, rel, flushed, replace=False)
                except (FileExistsError, _NoLink):
                    pass  # this UID is stored there already (or queued): the full path below decides
                except OSError as exc:
                    return self._not_stored(exc)
                else:  # its SHA-256 is taken by the committer, from the stored file, after Success
                    committer.put(PendingRow(info, series_id, rel, size, None, scanner, calling_ae, peer_host,
                                             utcnow()))
                    return StoreResult(StoreStatus.SUCCESS, StoreOutcome.STORED, series_id=series_id)
            if not committer.flush():  # queued rows first: the duplicate check below must see them
                log.error("C-STORE failed: instance not stored (index rows queued and the database failing)")
                return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="not stored: database unavailable")
        try:
            sha = sha256_file(spooled)
        except OSError as exc:
            flushed.cancel()
            log.error("C-STORE failed: spooled dataset unreadable (%s)", os.strerror(exc.errno) if exc.errno else exc)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="spooled dataset unreadable")
        placed: list[bool] = []

        def place() -> None:
            # never over a file already there: with no index row for it, it is another receiving
            # process's copy, acknowledged, whose row that process has not committed yet
            try:
                self._place(spooled, rel, flushed, replace=False)
            except _NoLink:  # a file system with neither renameat2 nor hard links: replace
                self._place(spooled, rel, flushed, replace=True)
            placed.append(True)

        try:
            outcome, series_id = add_instance(self.db, info, rel_path=rel, size_bytes=size, sha256=sha,
                                              scanner=scanner, calling_ae=calling_ae, peer_host=peer_host,
                                              place_file=place)
        except FileExistsError:
            return self._held_elsewhere(info, rel, sha, calling_ae)
        except (SQLAlchemyError, OSError) as exc:  # disk full, write error, database down: acknowledge nothing
            if placed:
                self.store.abs(rel).unlink(missing_ok=True)
            return self._not_stored(exc)
        finally:
            if not placed:
                flushed.cancel()
        if outcome == StoreOutcome.STORED:
            return StoreResult(StoreStatus.SUCCESS, outcome, series_id=series_id)
        return self._duplicate(info, sha, outcome, series_id, calling_ae)

    def _held_elsewhere(self, info: InstanceInfo, rel: str, sha: str, calling_ae: str | None) -> StoreResult:
        """The store has a file of this SOP Instance UID that the index does not know yet (another
        receiving process stored it a moment ago; its row follows): that copy is the first, kept
        untouched, and this one is a duplicate or a conflict by its bytes, as against an indexed copy."""
        try:
            first = sha256_file(self.store.abs(rel))
        except OSError as exc:
            log.error("C-STORE failed: the stored copy of this instance is unreadable (%s)",
                      os.strerror(exc.errno) if exc.errno else exc)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="stored copy unreadable")
        outcome = StoreOutcome.DUPLICATE if first == sha else StoreOutcome.CONFLICT
        return self._duplicate(info, sha, outcome, durable_series_id(self.db, info.series_instance_uid), calling_ae)

    @staticmethod
    def _not_stored(exc: Exception) -> StoreResult:
        what = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
        log.error("C-STORE failed: instance not stored (%s)", what)
        return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail=f"not stored: {what}")

    def _duplicate(self, info: InstanceInfo, sha: str, outcome: str, series_id: int,
                   calling_ae: str | None) -> StoreResult:
        if outcome == StoreOutcome.DUPLICATE:
            log.debug("duplicate instance with identical bytes acknowledged (no second copy)")
            return StoreResult(StoreStatus.SUCCESS, StoreOutcome.DUPLICATE, series_id=series_id)
        try:
            record_conflict(self.db, info.sop_instance_uid, sha, calling_ae)
        except SQLAlchemyError as exc:
            log.error("could not count the conflicting copy (%s)", type(exc).__name__)
        log.warning("instance %s received again with different bytes: first copy kept, conflict counted",
                    info.sop_instance_uid)
        return StoreResult(StoreStatus.SUCCESS, StoreOutcome.CONFLICT, series_id=series_id)
