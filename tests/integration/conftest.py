"""Fixtures of the integration tests: one private PostgreSQL cluster for the whole session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    return None


@dataclass(frozen=True)
class PgCluster:
    sock: Path
    port: int

    @property
    def connect_args(self) -> dict:
        return {"host": str(self.sock), "port": self.port, "user": "ctqa"}

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://ctqa@/{dbname}?host={self.sock}&port={self.port}"

    def fresh_database(self, dbname: str) -> str:
        """An empty database ``dbname`` in this cluster (dropped first if it exists); its URL."""
        import psycopg

        with psycopg.connect(**self.connect_args, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {dbname}")
            conn.execute(f"CREATE DATABASE {dbname}")
        return self.url(dbname)


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL cluster (initdb in a temporary folder, Unix socket only, trust auth, fsync
    off), started once for every test that needs one (``pg_url`` in test_trends_postgres gives each
    module a database of its own in it); skips with the reason when the server binaries or psycopg
    are not installed (apt-get install postgresql; pip install 'psycopg[binary]')."""
    psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'psycopg[binary]')")
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    if initdb is None or postgres is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) not installed")
    # not under pytest's tmp folder: that is private to root and the server runs as another user
    base = Path(tempfile.mkdtemp(prefix="ctqa-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        prefix = [runuser, "-u", "postgres", "--"]
    init = subprocess.run(prefix + [initdb, "-D", str(data), "-U", "ctqa", "--auth=trust", "-E", "UTF8"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        pytest.fail(f"initdb failed: {init.stderr[-2000:]}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(base / "pg.log", "wb")
    proc = subprocess.Popen(prefix + [postgres, "-D", str(data), "-k", str(sock), "-p", str(port), "-c",
                                      "listen_addresses=", "-c", "fsync=off"], stdout=log, stderr=subprocess.STDOUT)
    cluster = PgCluster(sock, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(**cluster.connect_args, dbname="postgres").close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("PostgreSQL did not start: " + (base / "pg.log").read_text()[-2000:])
            time.sleep(0.2)
    yield cluster
    proc.terminate()
    proc.wait(timeout=30)
    log.close()
    shutil.rmtree(base, ignore_errors=True)
