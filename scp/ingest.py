"""Store one received instance: parse its header, validate, make it durable, index it.

This is the whole of the C-STORE handler's work, kept out of pynetdicom callbacks so that it can be
tested directly. No pixel data is decoded here; pixel decoding happens in analysis.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from scp.dataset_check import DatasetError, InstanceTooLarge, check_pixel_data, walk_file

from storage.db import Database
from storage.filestore import FileStore, InvalidUID, check_uid, fsync_path, sha256_file
from storage.repo import InstanceInfo, StoreOutcome, add_instance, record_conflict

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


class _Mismatch(ValueError):
    pass


class Ingestor:
    """Durable storage of received instances; shared by all association threads."""

    def __init__(self, db: Database, store: FileStore, *, min_free_bytes: int = 0,
                 max_instance_bytes: int = DEFAULT_MAX_INSTANCE_BYTES) -> None:
        self.db = db
        self.store = store
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes
        # One SOP Instance UID is stored by one thread at a time (striped locks).
        self._locks = [threading.Lock() for _ in range(64)]
        # The spooled file's fsync and its SHA-256 start when the C-STORE handler starts and run (the
        # GIL released) while the header is walked; the file is moved into the store only after the
        # fsync returned.
        self._flusher = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spool-fsync")

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
    ) -> StoreResult:
        """Take ownership of ``spooled`` (a complete file in the spool): it is moved into the store
        or removed. Returns the DIMSE status to send."""
        try:
            return self._store(spooled, affected_sop_class, affected_sop_instance, transfer_syntax,
                               scanner, calling_ae, peer_host)
        except Exception as exc:  # a bug, not the peer's fault: one line (traceback at DEBUG), nothing kept
            log.error("C-STORE failed: unexpected error (%s: %s)", type(exc).__name__, str(exc)[:200])
            log.debug("C-STORE failure", exc_info=True)
            return StoreResult(StoreStatus.PROCESSING_FAILURE, detail=f"unexpected error: {type(exc).__name__}")
        finally:
            spooled.unlink(missing_ok=True)

    def _store(self, spooled, sop_class, sop_instance, ts, scanner, calling_ae, peer_host) -> StoreResult:
        flushed = self._flusher.submit(fsync_path, spooled)
        hashed = self._flusher.submit(sha256_file, spooled)
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

        with self._locks[hash(info.sop_instance_uid) % len(self._locks)]:
            return self._commit(spooled, info, scanner, calling_ae, peer_host, flushed, hashed)

    def _commit(self, spooled: Path, info: InstanceInfo, scanner, calling_ae, peer_host,
                flushed: Future, hashed: Future) -> StoreResult:
        sha = hashed.result()
        size = spooled.stat().st_size
        if self.min_free_bytes and self.store.free_bytes() - size < self.min_free_bytes:
            log.error("C-STORE refused: free disk space below the configured minimum")
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail="disk space below the configured minimum")
        rel = self.store.instance_rel_path(info.study_instance_uid, info.series_instance_uid, info.sop_instance_uid)
        placed: list[bool] = []

        def place() -> None:
            flushed.result()  # the file's fsync (an OSError from it: not stored, 0xA700)
            self.store.commit_file(spooled, rel, synced=True)
            placed.append(True)

        try:
            outcome, series_id = add_instance(self.db, info, rel_path=rel, size_bytes=size, sha256=sha,
                                              scanner=scanner, calling_ae=calling_ae, peer_host=peer_host,
                                              place_file=place)
        except (SQLAlchemyError, OSError) as exc:  # disk full, write error, database down: acknowledge nothing
            if placed:
                self.store.abs(rel).unlink(missing_ok=True)
            what = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else type(exc).__name__
            log.error("C-STORE failed: instance not stored (%s)", what)
            return StoreResult(StoreStatus.OUT_OF_RESOURCES, detail=f"not stored: {what}")
        if outcome == StoreOutcome.STORED:
            return StoreResult(StoreStatus.SUCCESS, outcome, series_id=series_id)
        return self._duplicate(info, sha, outcome, series_id, calling_ae)

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
