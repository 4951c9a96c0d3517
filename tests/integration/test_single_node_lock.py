"""One node per data folder and per database: two real `qa-node serve` processes.

The second refuses at once, naming the PID of the first, and touches nothing of the running node:
its spool file, its temporary file in the store and its running job are all still there afterwards,
and the first node still stores what is pushed to it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import PHANTOM_5MM, NodeProcess, free_port, require, storescu, wait_until, write_config


def _serve(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "--config", str(config), "serve", "--min-free-mb", "0"],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def _db_rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_second_serve_refuses_and_touches_nothing(tmp_path):
    files = sorted(require(PHANTOM_5MM).iterdir())
    data = tmp_path / "var"
    cfg = write_config(tmp_path / "a.toml", data_dir=data, stable_age_s=3600)
    a = NodeProcess(cfg, tmp_path)
    a.start()
    try:
        assert storescu(a.port, files[0]).returncode == 0
        db = data / "ctqa.sqlite"
        wait_until(lambda: _db_rows(db, "select count(*) from instances")[0][0] == 1, 10, what="first instance")
        # What a busy node has in flight: an association's spool file, a temporary file of a write in
        # progress, and an analysis job it is running.
        spooled = data / "spool" / "tmpinflight.dcm"
        spooled.write_bytes(b"partial data of an association in progress")
        series_dir = next((data / "store").iterdir())
        tmp_file = next(series_dir.iterdir()) / ".tmp-inflight"
        tmp_file.write_bytes(b"being written")
        con = sqlite3.connect(db)
        con.execute("insert into jobs (series_id, generation, state, models, attempts, worker, created_at) "
                    "values (1, 1, 'running', 'basic', 1, 'the-first-node', '2026-01-01 00:00:00')")
        con.commit()
        con.close()

        # Same data folder (another port): refused at once, the first node's PID named.
        cfg_b = write_config(tmp_path / "b.toml", data_dir=data, port=free_port())
        t0 = time.monotonic()
        r = _serve(cfg_b, tmp_path)
        assert r.returncode == 2, r.stderr
        assert time.monotonic() - t0 < 20
        err = r.stderr.strip().splitlines()
        assert len(err) == 1, r.stderr
        assert f"PID {a.proc.pid}" in err[0] and "data folder" in err[0]
        assert "Traceback" not in r.stderr

        # Same database from another data folder: refused as well.
        other = tmp_path / "other"
        (tmp_path / "c.toml").write_text(cfg.read_text().replace(f'data_dir = "{data}"', f'data_dir = "{other}"'))
        r = _serve(tmp_path / "c.toml", tmp_path)
        assert r.returncode == 2, r.stderr
        assert f"PID {a.proc.pid}" in r.stderr and "database" in r.stderr
        assert not (other / "spool").exists() and not (other / "store").exists()

        # Nothing of the running node was touched.
        assert spooled.read_bytes() == b"partial data of an association in progress"
        assert tmp_file.exists()
        assert _db_rows(db, "select state, worker from jobs") == [("running", "the-first-node")]
        # And it still serves.
        assert storescu(a.port, files[1]).returncode == 0
        wait_until(lambda: _db_rows(db, "select count(*) from instances")[0][0] == 2, 10, what="second instance")
    finally:
        assert a.stop() == 0

    # Once the first has stopped the data folder is free again (and a SIGKILLed node leaves no stale
    # lock: the kernel drops an flock with its process).
    b = NodeProcess(cfg, tmp_path)
    b.start()
    b.stop(signal.SIGKILL)
    c = NodeProcess(cfg, tmp_path)
    c.start()
    try:
        assert not spooled.exists() and not tmp_file.exists()  # a node that holds the lock cleans up
        assert _db_rows(db, "select worker from jobs")[0][0] != "the-first-node"  # re-queued at start
        assert "removed 1 unacknowledged spool files and 1 temporary files" in c.log()
    finally:
        c.stop()
