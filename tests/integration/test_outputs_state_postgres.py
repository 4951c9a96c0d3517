"""The outputs-state columns on PostgreSQL: a database from before them is upgraded in place, and a
database without the node's tables is reported in one line, never created by looking.

Uses the private PostgreSQL cluster of ``test_trends_postgres`` (skips the same way without it)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from node.cli import NoDatabase, open_existing_database
from storage.db import Database
from tests.integration.test_trends_postgres import pg_url  # noqa: F401  (fixture)


def test_old_postgres_database_gains_the_outputs_columns(pg_url, pg_cluster):  # noqa: F811
    url = pg_cluster.fresh_database("ctqa_upgrade")
    with pytest.raises(NoDatabase, match=r"^no node tables in the database at .*: start `qa-node serve` first$"):
        open_existing_database(url)
    db = Database(url)
    assert inspect(db.engine).get_table_names() == []  # looking created nothing
    db.create_all()
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN outputs"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN outputs_error"))
    assert not {"outputs", "outputs_error"} & {c["name"] for c in inspect(db.engine).get_columns("jobs")}
    db.dispose()
    db = open_existing_database(url)  # what status/outbox do: the columns come back, nullable
    cols = {c["name"]: c for c in inspect(db.engine).get_columns("jobs")}
    assert cols["outputs"]["nullable"] and cols["outputs_error"]["nullable"]
    assert str(cols["outputs"]["type"]).startswith("VARCHAR(16)")
    from node.cli import status_dict

    assert status_dict(db)["series"] == []
    db.dispose()
