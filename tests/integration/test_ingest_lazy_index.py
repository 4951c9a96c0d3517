"""Durability on ingest. The spooled file is fsynced (in a helper thread, while its header is walked
and hashed) before it is renamed into the store and before Success; an fsync error stores nothing
and answers 0xA700. The first row of a series (with the scanner, calling AE and host) is
committed durably; later rows of that series are committed without waiting for the log flush, their
files being durable before Success. What a power loss can take, the last lazily committed rows, start-up
reconciliation puts back from the durable files into the durable series, scanner attribution kept."""

from __future__ import annotations

import shutil

import pydicom
from sqlalchemy import delete, event, select, update

from node.config import settings_from_dict
from node.reconcile import reconcile_store
from node.service import Node
from scp.ingest import Ingestor, StoreStatus
from storage.models import Instance, Series
from tests.helpers import PHANTOM_5MM, require
from tests.integration.test_outputs_state_postgres import _fresh_database
from tests.integration.test_trends_postgres import pg_url  # noqa: F401  (fixture)


def _node(tmp_path, url: str | None = None) -> Node:
    settings = settings_from_dict({
        "node": {"data_dir": str(tmp_path / "var"),
                 "database": url or f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}", "port": 0},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "analysis": {"device": "cpu", "models": ["basic"]},
    }, "test.toml")
    node = Node(settings)
    node.prepare()
    return node


def _ingest(node: Node, files) -> None:
    ing = Ingestor(node.db, node.store)
    for f in files:
        spooled = node.store.spool / f"in-{f.name}.dcm"
        shutil.copyfile(f, spooled)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        r = ing.store_file(spooled, affected_sop_class=str(ds.SOPClassUID),
                           affected_sop_instance=str(ds.SOPInstanceUID),
                           transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1",
                           peer_host="127.0.0.1")
        assert r.status == StoreStatus.SUCCESS


def test_first_row_of_a_series_durable_later_rows_lazy(tmp_path):
    node = _node(tmp_path)
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:3]
    seen: list[str] = []

    @event.listens_for(node.db.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, *args):
        s = statement.strip().upper()
        if s.startswith(("PRAGMA SYNCHRONOUS", "INSERT INTO INSTANCES")):
            seen.append("insert" if s.startswith("INSERT") else s.replace(" ", ""))

    _ingest(node, files)
    # instance 1 (new series): plain durable commit; instances 2 and 3: NORMAL around the
    # transaction, FULL again afterwards
    assert seen == ["insert",
                    "PRAGMASYNCHRONOUS=NORMAL", "insert", "PRAGMASYNCHRONOUS=FULL",
                    "PRAGMASYNCHRONOUS=NORMAL", "insert", "PRAGMASYNCHRONOUS=FULL"]
    with node.db.engine.connect() as conn:  # the pool's connections are durable for everyone else
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 3
    node.db.dispose()


def test_rows_a_power_loss_takes_come_back_from_the_durable_files(tmp_path):
    node = _node(tmp_path)
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:5]
    _ingest(node, files)
    with node.db.session() as s:
        first = s.scalars(select(Instance).order_by(Instance.id)).first()
        # what a power loss can lose: the lazily committed transactions of instances 2-5 (their rows
        # and their series counter updates); the files were fsynced before each Success
        s.execute(delete(Instance).where(Instance.id != first.id))
        s.execute(update(Series).values(n_instances=1))
    out = reconcile_store(node.db, node.store)
    assert (out.indexed, out.quarantined) == (4, 0)
    with node.db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.n_instances == 5 and series.scanner_name == "CT1" and series.calling_ae == "CT1"
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert uids == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    node.db.dispose()


def test_postgresql_later_rows_commit_without_waiting_for_the_wal_flush(tmp_path, pg_url):  # noqa: F811
    node = _node(tmp_path, _fresh_database(pg_url, "ctqa_lazy_index"))
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:3]
    seen: list[str] = []

    @event.listens_for(node.db.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, *args):
        s = statement.strip().upper()
        if s.startswith(("SET LOCAL SYNCHRONOUS_COMMIT", "INSERT INTO INSTANCES")):
            seen.append("insert" if s.startswith("INSERT") else "lazy")

    _ingest(node, files)
    assert seen == ["insert", "lazy", "insert", "lazy", "insert"]
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 3 and len(s.scalars(select(Instance.id)).all()) == 3
    with node.db.engine.connect() as conn:  # SET LOCAL ended with its transaction
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    node.lock.release()
    node.db.dispose()


def test_file_fsynced_before_its_rename_and_an_fsync_error_stores_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import scp.ingest

    node = _node(tmp_path)
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:2]
    events: list[tuple[str, str]] = []
    real_fsync_path, real_replace = scp.ingest.fsync_path, os.replace

    def fsync_path(path):
        events.append(("fsync", path.name))
        real_fsync_path(path)

    def replace(src, dst):
        events.append(("rename", os.path.basename(src)))
        real_replace(src, dst)

    monkeypatch.setattr(scp.ingest, "fsync_path", fsync_path)
    monkeypatch.setattr(os, "replace", replace)
    _ingest(node, files[:1])
    spooled = f"in-{files[0].name}.dcm"
    assert events == [("fsync", spooled), ("rename", spooled)]

    def failing(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(scp.ingest, "fsync_path", failing)
    spool = node.store.spool / "in-x.dcm"
    shutil.copyfile(files[1], spool)
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    r = Ingestor(node.db, node.store).store_file(
        spool, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1", peer_host="127.0.0.1")
    assert r.status == StoreStatus.OUT_OF_RESOURCES and r.detail == "not stored: Input/output error"
    assert not spool.exists()
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 1
        assert str(ds.SOPInstanceUID) not in set(s.scalars(select(Instance.sop_instance_uid)))
    assert len(list(node.store.store_files())) == 1
    node.db.dispose()
