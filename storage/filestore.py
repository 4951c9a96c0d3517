"""The durable file store.

Layout under ``data_dir``::

    spool/                         incoming C-STORE data while an association receives it
    quarantine/                    files found in store/ at start-up that are not valid instances
    store/<study>/<series>/<sop>.dcm   received instances, exactly as received (file meta + dataset)
    outputs/<study>/<series>/<sop>.dcm objects the node made (SR, maps, reports)

Every UID is checked against the DICOM UID grammar before it becomes part of a path. A file is
made durable by: write to a temporary file in the target directory, fsync it, atomically rename it,
fsync the directory. On any error the temporary file is removed, so no partial file is left.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
TMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


QUARANTINE = "quarantine"


def quarantine_count(data_dir: str | Path) -> int:
    """Files moved aside into ``data_dir/quarantine/`` (0 when there are none)."""
    q = Path(data_dir) / QUARANTINE
    if not q.is_dir():
        return 0
    return sum(1 for p in q.iterdir() if p.is_file())


class InvalidUID(ValueError):
    pass


def is_valid_uid(uid: object) -> bool:
    """DICOM PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


def check_uid(uid: object, what: str) -> str:
    if not is_valid_uid(uid):
        shown = repr(uid)[:80]
        raise InvalidUID(f"{what} {shown} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return str(uid)


def fsync_path(path: Path) -> None:
    """fsync a complete file by its path (the data and its size on the device)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mtime(path: Path) -> float:
    """``path``'s mtime; +inf once it is gone (a file removed meanwhile is never older than a bound)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir()) if folder.is_dir() else []
    except FileNotFoundError:
        return []


class FileStore:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir)
        self.spool = self.root / "spool"
        self.store = self.root / "store"
        self.outputs = self.root / "outputs"
        self.quarantine = self.root / QUARANTINE

    def prepare(self) -> None:
        for d in (self.root, self.spool, self.store, self.outputs):
            d.mkdir(parents=True, exist_ok=True)

    def clean_spool(self) -> int:
        """Remove data left in the spool by an interrupted association (never acknowledged)."""
        n = 0
        if self.spool.exists():
            for p in self.spool.iterdir():
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    # -- paths --------------------------------------------------------------------------------
    def _rel(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        check_uid(study_uid, "StudyInstanceUID")
        check_uid(series_uid, "SeriesInstanceUID")
        check_uid(sop_uid, "SOPInstanceUID")
        return Path(study_uid) / series_uid / f"{sop_uid}.dcm"

    def instance_rel_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return str(Path("store") / self._rel(study_uid, series_uid, sop_uid))

    def output_rel_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        return str(Path("outputs") / self._rel(study_uid, series_uid, sop_uid))

    def abs(self, rel_path: str) -> Path:
        return self.root / rel_path

    # -- durable writes ------------------------------------------------------------------------
    def commit_file(self, src: Path, rel_path: str, *, synced: bool = False) -> None:
        """Durably move ``src`` (a file on the same filesystem, e.g. in the spool) to ``rel_path``.
        An existing file there is replaced: the database, not the file system, says what is stored
        (a file without an index row was never acknowledged). ``synced``: the caller has already
        fsynced ``src`` after its last write (e.g. while it validated it), so only the rename and
        the folder's fsync remain."""
        dst = self.abs(rel_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not synced:
            fsync_path(src)
        os.replace(src, dst)
        fsync_dir(dst.parent)

    def write_bytes(self, rel_path: str, chunks: Iterable[bytes] | bytes) -> int:
        """Durably write bytes to ``rel_path`` (temp file, fsync, rename, fsync dir). Returns size."""
        dst = self.abs(rel_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks:
                    f.write(chunk)
                    size += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def remove_tmp_files(self) -> int:
        """Remove temporary files an interrupted write left next to stored files."""
        n = 0
        for base in (self.store, self.outputs):
            if base.exists():
                for p in base.rglob(f"{TMP_PREFIX}*"):
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def store_files(self, *, series_changed_since: float | None = None,
                    modified_before: float | None = None) -> list[Path]:
        """Every file under store/ except the temporary files of interrupted writes. With
        ``series_changed_since`` (epoch seconds): only the files of series folders changed since then
        (a file renamed in changes its folder's mtime); with ``modified_before``: only files last
        modified before then. Files and folders removed meanwhile are left out."""
        if not self.store.exists():
            return []
        if series_changed_since is None:
            candidates: Iterable[Path] = self.store.rglob("*")
        else:
            candidates = [f for d in self.store.glob("*/*") if _mtime(d) >= series_changed_since
                          for f in _entries(d)]
        out = []
        for f in candidates:
            if f.name.startswith(TMP_PREFIX) or not f.is_file():
                continue
            if modified_before is not None and _mtime(f) >= modified_before:
                continue
            out.append(f)
        return sorted(out)

    def quarantine_file(self, path: Path) -> Path:
        """Move ``path`` (a file under the data folder) aside into quarantine/, named by the time,
        a random token and its original name; durable (fsync of both folders). Returns the new path."""
        from datetime import datetime, timezone

        self.quarantine.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dst = self.quarantine / f"{stamp}-{secrets.token_hex(4)}-{path.name[:120]}"
        os.replace(path, dst)
        fsync_dir(self.quarantine)
        fsync_dir(path.parent)
        return dst

    def quarantine_count(self) -> int:
        return quarantine_count(self.root)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free
