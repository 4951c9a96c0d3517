"""Durability on ingest. The spooled file's data are flushed (fdatasync, in a helper thread) and
the series folder fsynced after its name was put there, both before Success; a flush error stores
nothing and answers 0xA700. The first row of a series (with the scanner, calling AE and host) is
committed durably; later rows of that series are committed without waiting for the log flush, their
files being durable before Success. What a power loss can take, the last lazily committed rows, start-up
reconciliation puts back from the durable files into the durable series, scanner attribution kept."""

from __future__ import annotations

import os
import shutil
import time

import pydicom
from sqlalchemy import delete, event, select, update

from node.config import settings_from_dict
from node.reconcile import reconcile_store
from node.service import Node
from scp.ingest import Ingestor, StoreStatus
from storage.models import Instance, Series
from tests.helpers import PHANTOM_5MM, require


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


def _ingest_with(ing: Ingestor, node: Node, files, series_uid: str | None = None) -> list:
    results = []
    for f in files:
        spooled = node.store.spool / f"in-{f.name}.dcm"
        if series_uid is None:
            shutil.copyfile(f, spooled)
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        else:  # the same instance in another series
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = series_uid
            ds.save_as(spooled)
        results.append(ing.store_file(
            spooled, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1",
            peer_host="127.0.0.1"))
    assert all(r.status == StoreStatus.SUCCESS for r in results), results
    return results


def _ingest(node: Node, files) -> None:
    """Store ``files`` through an Ingestor without group commit (each row committed as it comes)."""
    _ingest_with(Ingestor(node.db, node.store), node, files)


def _phantom_files(n: int) -> list:
    """The first ``n`` slices of the shared 5 mm phantom series."""
    return sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:n]


def _capture_postgres_index_writes(engine) -> list[str]:
    """A list that fills, in order, with "insert" for each INSERT INTO instances and "lazy" for each
    SET LOCAL synchronous_commit the engine executes."""
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def capture(conn, cursor, statement, *args):
        s = statement.strip().upper()
        if s.startswith(("SET LOCAL SYNCHRONOUS_COMMIT", "INSERT INTO INSTANCES")):
            seen.append("insert" if s.startswith("INSERT") else "lazy")

    return seen


def test_first_row_of_a_series_durable_later_rows_lazy(tmp_path):
    node = _node(tmp_path)
    files = _phantom_files(3)
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
    files = _phantom_files(5)
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


def test_reconciliation_while_running_takes_only_settled_files_of_recently_changed_series(tmp_path):
    """reconcile_store(since=, settle_s=) (after a receiver process died): files of series folders
    changed since ``since`` and older than ``settle_s`` are indexed; a newer file (a live receiver's,
    its row about to be written) and the folders changed before ``since`` are left alone."""
    node = _node(tmp_path)
    files = _phantom_files(4)
    _ingest(node, files)
    with node.db.session() as s:
        rows = s.scalars(select(Instance).order_by(Instance.id)).all()
        lost = {r.sop_instance_uid: node.store.abs(r.rel_path) for r in rows[1:]}
        s.execute(delete(Instance).where(Instance.id != rows[0].id))
        s.execute(update(Series).values(n_instances=1))
    now = time.time()
    paths = list(lost.values())
    for f in paths[:2]:
        os.utime(f, (now - 60, now - 60))  # acknowledged a minute ago
    os.utime(paths[2], (now, now))  # just now: a live receiver's, not settled
    folder = paths[0].parent
    os.utime(folder, (now - 30, now - 30))  # the folder last changed 30 s ago
    out = reconcile_store(node.db, node.store, since=now - 10, settle_s=5, why="test")
    assert (out.indexed, out.quarantined) == (0, 0)  # the folder changed before `since`: not looked at
    out = reconcile_store(node.db, node.store, since=now - 40, settle_s=5, why="test")
    assert (out.indexed, out.quarantined) == (2, 0)
    with node.db.session() as s:
        indexed = set(s.scalars(select(Instance.sop_instance_uid)))
        assert s.scalar(select(Series.n_instances)) == 3
    uids = list(lost)
    assert indexed == {rows[0].sop_instance_uid, uids[0], uids[1]}  # not the unsettled one
    assert all(p.exists() for p in paths)  # nothing quarantined or moved
    node.db.dispose()


def test_postgresql_later_rows_commit_without_waiting_for_the_wal_flush(tmp_path, pg_cluster):
    node = _node(tmp_path, pg_cluster.fresh_database("ctqa_lazy_index"))
    files = _phantom_files(3)
    seen = _capture_postgres_index_writes(node.db.engine)

    _ingest(node, files)
    assert seen == ["insert", "lazy", "insert", "lazy", "insert"]
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 3 and len(s.scalars(select(Instance.id)).all()) == 3
    with node.db.engine.connect() as conn:  # SET LOCAL ended with its transaction
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    node.lock.release()
    node.db.dispose()


def test_file_and_its_name_fsynced_before_success_and_an_fsync_error_stores_nothing(tmp_path, monkeypatch):
    """Both flushes (the file's data, fdatasync, and the series folder's, fsync, after the name was
    put there) have returned before store_file returns Success; they run at the same time. A flush
    error stores nothing."""
    import errno
    import os

    import scp.ingest

    node = _node(tmp_path)
    files = _phantom_files(3)
    events: list[tuple[str, str]] = []
    real_fsync, real_fdatasync, real_replace, real_move = os.fsync, os.fdatasync, os.replace, scp.ingest.move_noreplace

    def fsync(fd):
        real_fsync(fd)
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))

    def fdatasync(fd):
        real_fdatasync(fd)
        events.append(("fdatasync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))

    def replace(src, dst):  # (recorded when done: the first try in a new series' folder fails)
        real_replace(src, dst)
        events.append(("rename", os.path.basename(dst)))

    def move_noreplace(src, dst):
        real_move(src, dst)
        events.append(("rename-noreplace", os.path.basename(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(scp.ingest, "move_noreplace", move_noreplace)
    ing = Ingestor(node.db, node.store, group_commit=True)
    # the series' first instance, a later one: both put there without replacing (an os.replace
    # would show as "rename")
    for f, how in zip(files[:2], ("rename-noreplace", "rename-noreplace")):
        events.clear()
        _ingest_with(ing, node, [f])
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        series_dir = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        # the name put in the store and the folder flushed after it, the file flushed (under either
        # name: its flush starts before the name is put there), all before Success
        names = {f"in-{f.name}.dcm": "file", f"{uid}.dcm": "file", series_dir: "folder"}
        seen = [(op, names.get(name, name)) for op, name in events]
        assert sorted(seen) == sorted([(how, "file"), ("fdatasync", "file"), ("fsync", "folder")]), events
        assert seen.index((how, "file")) < seen.index(("fsync", "folder"))

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    spool = node.store.spool / "in-x.dcm"
    shutil.copyfile(files[2], spool)
    ds = pydicom.dcmread(files[2], stop_before_pixels=True)
    r = ing.store_file(
        spool, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1", peer_host="127.0.0.1")
    assert r.status == StoreStatus.OUT_OF_RESOURCES and r.detail == "not stored: Input/output error"
    assert not spool.exists()
    ing.close()
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 2
        assert str(ds.SOPInstanceUID) not in set(s.scalars(select(Instance.sop_instance_uid)))
    assert len(list(node.store.store_files())) == 2
    node.db.dispose()


def test_group_commit_batches_rows_of_several_stores_in_one_transaction(tmp_path, monkeypatch):
    """With group commit the first row of a series is committed durably before Success; later rows
    are queued and committed by one thread, all that queued up in one transaction (one executemany),
    at the latest when someone waits for them (here: a gather window longer than the test)."""
    import time

    import scp.ingest
    from storage import repo

    node = _node(tmp_path)
    files = _phantom_files(6)
    batches = []
    real = repo.add_instances_lazy

    def counted(db, rows):
        batches.append(len(rows))
        return real(db, rows)

    monkeypatch.setattr(scp.ingest, "add_instances_lazy", counted)
    monkeypatch.setattr(scp.ingest._Committer, "GATHER_S", 60.0)
    inserts: list[int] = []

    @event.listens_for(node.db.engine, "before_cursor_execute")
    def capture(conn, cursor, statement, parameters, context, executemany):
        if statement.strip().upper().startswith("INSERT INTO INSTANCES"):
            inserts.append(len(parameters) if executemany else 1)

    ing = Ingestor(node.db, node.store, group_commit=True)
    _ingest_with(ing, node, files)  # all six answered Success
    assert inserts == [1]  # only the series' first row so far, committed durably
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 1
    assert len(list(node.store.store_files())) == 6  # every file is in the store
    t0 = time.monotonic()
    assert ing.flush()  # (what an A-RELEASE-RQ does: scp.server)
    assert time.monotonic() - t0 < 10
    assert batches == [5] and inserts == [1, 5]
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 6
        assert len(s.scalars(select(Instance.id)).all()) == 6
    ing.close()
    node.db.dispose()


def test_group_commit_duplicates_conflicts_and_a_database_outage(tmp_path, monkeypatch):
    """Under group commit: the same instance again is a duplicate (no second copy), the same UID in
    another series of the node a conflict (the second file removed, counted); while the committer
    cannot write, new instances are refused (0xA700) and the queued rows are committed once the
    database is back."""
    import scp.ingest
    from sqlalchemy.exc import OperationalError
    from storage import repo
    from storage.models import InstanceConflict

    node = _node(tmp_path)
    files = _phantom_files(5)
    ing = Ingestor(node.db, node.store, group_commit=True)
    _ingest_with(ing, node, files[:2])
    assert [r.outcome for r in _ingest_with(ing, node, files[1:2])] == ["duplicate"]
    # the same SOP Instance UID in another series (durable first row there, then a conflict)
    other = "1.2.826.0.1.3680043.8.498.99"
    _ingest_with(ing, node, files[2:3], series_uid=other)
    assert [r.outcome for r in _ingest_with(ing, node, files[:1], series_uid=other)] == ["stored"]
    ing.flush()  # the committer finds the UID indexed in the first series: a conflict
    with node.db.session() as s:
        assert s.query(InstanceConflict).count() == 1
        assert len(s.scalars(select(Instance.id)).all()) == 3
    assert len(list(node.store.store_files())) == 3

    # the database fails under the committer: the row stays queued, the next store is refused
    failing = [True]
    real = repo.add_instances_lazy

    def flaky(db, rows):
        if failing[0]:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        return real(db, rows)

    monkeypatch.setattr(scp.ingest, "add_instances_lazy", flaky)
    monkeypatch.setattr(scp.ingest._Committer, "RETRY_S", 0.05)
    _ingest_with(ing, node, files[3:4])  # answered: its file is durable, its row queued
    import time

    deadline = time.monotonic() + 5
    while ing._committer.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ing._committer.healthy
    bad = "sqlite:///" + str(tmp_path / "missing" / "x.sqlite")
    ing.db, real_db = repo.Database(bad), ing.db  # the synchronous path meets the outage too
    spooled = node.store.spool / "in-y.dcm"
    shutil.copyfile(files[4], spooled)
    ds = pydicom.dcmread(files[4], stop_before_pixels=True)
    r = ing.store_file(spooled, affected_sop_class=str(ds.SOPClassUID),
                       affected_sop_instance=str(ds.SOPInstanceUID),
                       transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1",
                       peer_host="127.0.0.1")
    assert r.status == StoreStatus.OUT_OF_RESOURCES
    ing.db = real_db
    failing[0] = False
    ing.flush()
    assert ing._committer.healthy
    with node.db.session() as s:
        uids = set(s.scalars(select(Instance.sop_instance_uid)))
    assert str(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID) in uids
    assert str(ds.SOPInstanceUID) not in uids and len(uids) == 4
    ing.close()
    node.db.dispose()


def test_rows_lost_with_the_committer_come_back_from_the_durable_files(tmp_path, monkeypatch):
    """A crash after Success and before the committer wrote the rows: the files are in the store,
    start-up reconciliation indexes them into their durable series."""
    import scp.ingest

    node = _node(tmp_path)
    files = _phantom_files(4)
    monkeypatch.setattr(scp.ingest._Committer, "_run", lambda self: None)  # it never gets to commit
    ing = Ingestor(node.db, node.store, group_commit=True)
    _ingest_with(ing, node, files)
    with node.db.session() as s:
        assert len(s.scalars(select(Instance.id)).all()) == 1
    assert len(list(node.store.store_files())) == 4
    out = reconcile_store(node.db, node.store)
    assert (out.indexed, out.quarantined) == (3, 0)
    with node.db.session() as s:
        series = s.scalars(select(Series)).one()
        assert series.n_instances == 4 and series.scanner_name == "CT1"
    node.db.dispose()


def test_postgresql_group_commit(tmp_path, pg_cluster):
    node = _node(tmp_path, pg_cluster.fresh_database("ctqa_group_commit"))
    files = _phantom_files(4)
    seen = _capture_postgres_index_writes(node.db.engine)

    ing = Ingestor(node.db, node.store, group_commit=True)
    _ingest_with(ing, node, files)
    ing.close()
    # the first row durable; the other three in lazy transactions (one or more batches)
    assert seen[0] == "insert" and seen[1] == "lazy" and seen.count("lazy") == seen.count("insert") - 1
    with node.db.session() as s:
        assert s.scalar(select(Series.n_instances)) == 4 and len(s.scalars(select(Instance.id)).all()) == 4
    node.lock.release()
    node.db.dispose()


def test_two_receivers_same_uid_within_one_commit_window_first_copy_kept(tmp_path, monkeypatch):
    """Two receiving processes (two Ingestors, each with its own database connection, as
    node.receivers = 2 runs them) get the same SOP Instance UID while the first copy's row is still
    queued in the first one's group commit (its file stored and acknowledged). The second copy never
    replaces that file: with other bytes it is a conflict (counted), with the same bytes a duplicate;
    the index ends with the first copy's hash and the store with its bytes."""
    import hashlib

    import scp.ingest
    from storage.db import Database
    from storage.models import InstanceConflict

    monkeypatch.setattr(scp.ingest._Committer, "GATHER_S", 5.0)  # the first receiver's row waits
    node = _node(tmp_path)
    files = _phantom_files(3)
    first = Ingestor(node.db, node.store, group_commit=True)
    second_db = Database(node.db.url)
    second = Ingestor(second_db, node.store, group_commit=True)
    _ingest_with(first, node, files[:1])  # the series' first row, durable
    _ingest_with(second, node, files[1:2])  # the second receiver's first row of that series, durable
    assert [r.outcome for r in _ingest_with(first, node, files[2:3])] == ["stored"]  # row queued
    ds = pydicom.dcmread(files[2])
    uid = str(ds.SOPInstanceUID)
    with node.db.session() as s:
        assert uid not in set(s.scalars(select(Instance.sop_instance_uid)))  # not committed yet
    rel = node.store.instance_rel_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), uid)
    original = hashlib.sha256(files[2].read_bytes()).hexdigest()

    ds.ImageComments = "another copy"
    spooled = node.store.spool / "in-other.dcm"
    ds.save_as(spooled)
    other = hashlib.sha256(spooled.read_bytes()).hexdigest()
    args = dict(affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=uid,
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT2",
                peer_host="127.0.0.1")
    r = second.store_file(spooled, **args)
    assert (r.status, r.outcome) == (StoreStatus.SUCCESS, "conflict")
    assert hashlib.sha256(node.store.abs(rel).read_bytes()).hexdigest() == original
    assert [r.outcome for r in _ingest_with(second, node, files[2:3])] == ["duplicate"]
    assert not list(node.store.spool.iterdir())

    assert first.flush() and second.flush()
    with node.db.session() as s:
        assert s.scalar(select(Instance.sha256).where(Instance.sop_instance_uid == uid)) == original
        conflicts = s.scalars(select(InstanceConflict)).all()
        assert [(c.sop_instance_uid, c.sha256, c.calling_ae) for c in conflicts] == [(uid, other, "CT2")]
        assert s.scalar(select(Series.n_instances)) == 3
    assert hashlib.sha256(node.store.abs(rel).read_bytes()).hexdigest() == original
    assert len(list(node.store.store_files())) == 3
    first.close()
    second.close()
    second_db.dispose()
    node.db.dispose()
