"""One node per data folder and per database.

``qa-node serve`` takes this lock before it touches anything (spool cleaning, job re-queueing,
reconciliation): a second node on the same data folder or the same database refuses at once and
leaves the running node alone.

- the data folder: an exclusive ``fcntl.flock`` on ``data_dir/node.lock`` (released by the kernel
  when the process dies, even by SIGKILL, so a crash never leaves a stale lock); the file holds the
  PID of the node holding it, for the message;
- an SQLite database: the same kind of lock on ``<database file>.node.lock`` (so that two data folders
  pointing at one database are refused too);
- PostgreSQL: a session-level advisory lock held on one connection for the node's lifetime, whose
  ``application_name`` names the PID.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from sqlalchemy.engine import make_url

LOCK_NAME = "node.lock"
_PG_LOCK_KEY = 0x43545141  # "CTQA"


class NodeLocked(RuntimeError):
    """Another node holds the data folder or the database."""


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "PID unknown"
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    pid = fields.get("pid", "")
    if not pid.isdigit():
        return "PID unknown"
    host = fields.get("host")
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


class _FileLock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's PID stays readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise NodeLocked(f"{self.what} is in use by another qa-node ({_read_holder(self.path)}); "
                                 f"lock {self.path}: stop that node first") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class NodeLock:
    """Held by a serving node for its lifetime: ``acquire()`` raises NodeLocked when taken."""

    def __init__(self, data_dir: str | Path, database_url: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.database_url = database_url
        self._locks: list[_FileLock] = [_FileLock(self.data_dir / LOCK_NAME, f"data folder {self.data_dir}")]
        self._pg_conn = None
        url = make_url(database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            db_file = Path(url.database).resolve()
            self._locks.append(_FileLock(db_file.with_name(db_file.name + ".node.lock"), f"database {db_file}"))
        self._pg = url.get_backend_name() == "postgresql"

    def acquire(self) -> None:
        taken: list[_FileLock] = []
        try:
            for lk in self._locks:
                lk.acquire()
                taken.append(lk)
            if self._pg:
                self._acquire_pg()
        except BaseException:
            for lk in taken:
                lk.release()
            raise

    def _acquire_pg(self) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        # A connection of its own, outside any pool: closing it ends the session and the lock.
        engine = create_engine(self.database_url, poolclass=NullPool)
        conn = engine.connect()
        try:
            conn.execute(text("SELECT set_config('application_name', :n, false)"),
                         {"n": f"qa-node pid={os.getpid()}"})
            ok = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _PG_LOCK_KEY}).scalar()
            conn.commit()
            if not ok:
                holder = conn.execute(text(
                    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.objid = :k AND l.granted LIMIT 1"),
                    {"k": _PG_LOCK_KEY}).scalar() or ""
                pid = holder.split("pid=", 1)[1] if "pid=" in holder else "unknown"
                raise NodeLocked(f"database {engine.url.render_as_string(hide_password=True)} is in use by "
                                 f"another qa-node (PID {pid}): stop that node first")
        except BaseException:
            conn.close()
            engine.dispose()
            raise
        self._pg_conn = conn
        self._pg_engine = engine

    def release(self) -> None:
        if self._pg_conn is not None:
            try:
                self._pg_conn.close()  # the session ends, and with it the advisory lock
                self._pg_engine.dispose()
            except Exception:  # noqa: BLE001 - the database may be gone; the lock goes with the session
                pass
            self._pg_conn = None
        for lk in reversed(self._locks):
            lk.release()
