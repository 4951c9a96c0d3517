"""One node per PostgreSQL database: a session advisory lock whose holder's PID is named.

Uses the private PostgreSQL cluster of test_trends_postgres (skips when its binaries or psycopg are
absent)."""

from __future__ import annotations

import os

import pytest

from storage.nodelock import NodeLock, NodeLocked
from tests.integration.test_trends_postgres import pg_url  # noqa: F401 - the fixture


def test_second_node_on_one_postgres_database_is_refused(tmp_path, pg_url):  # noqa: F811
    first = NodeLock(tmp_path / "a", pg_url)
    first.acquire()
    try:
        second = NodeLock(tmp_path / "b", pg_url)  # another data folder, the same database
        with pytest.raises(NodeLocked, match=f"database .* is in use by another qa-node \\(PID {os.getpid()}\\)"):
            second.acquire()
        assert not second._locks[0].fd  # its data-folder lock was given back
    finally:
        first.release()
    second.acquire()  # the lock ends with the first node's session
    second.release()
