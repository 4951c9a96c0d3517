"""The receive path over real associations: the file's flush and its storing starting as soon as the
dataset is complete (on pynetdicom's receive thread, before the C-STORE handler runs), and several receiving processes (node.receivers)
sharing the DICOM port: concurrent associations served by more than one process, every instance
stored once and indexed, a refused instance still refused."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pydicom
import pytest

from scp.ingest import Ingestor, StoreStatus
from scp.server import AllowedPeer, StorageSCP
from storage.db import Database
from storage.filestore import FileStore
from tests.helpers import PHANTOM_5MM, NodeProcess, node_sql, require, write_config

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _phantom(n: int | None = None) -> list[Path]:
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    return files[:n] if n else files


def _ae():
    from pynetdicom import AE

    ae = AE(ae_title="CT1")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    return ae


def _status(rsp) -> int:
    return int(rsp.Status) if "Status" in rsp else -1


def test_flush_and_store_start_when_the_dataset_is_complete_before_the_handler(tmp_path, monkeypatch):
    from pynetdicom.dul import DULServiceProvider

    store = FileStore(tmp_path / "var")
    store.prepare()
    db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")
    db.create_all()
    ing = Ingestor(db, store, group_commit=True)
    events: list[tuple[str, str]] = []
    real_start, real_store = Ingestor.start_flush, Ingestor.store_file

    def start_flush(self, fd):
        on_dul = isinstance(threading.current_thread(), DULServiceProvider)
        events.append(("flush", "dul" if on_dul else threading.current_thread().name))
        return real_start(self, fd)

    def store_file(self, spooled, **kw):
        where = threading.current_thread().name.split("_")[0]
        events.append(("store", where, "flushing" if kw.get("flushed") is not None else "not flushing"))
        return real_store(self, spooled, **kw)

    def on_store(self, event):
        events.append(("handler",))
        return real_on_store(self, event)

    real_on_store = StorageSCP._on_store
    monkeypatch.setattr(Ingestor, "start_flush", start_flush)
    monkeypatch.setattr(Ingestor, "store_file", store_file)
    monkeypatch.setattr(StorageSCP, "_on_store", on_store)
    scp = StorageSCP(ae_title="CTQA", host="127.0.0.1", port=0, peers=[AllowedPeer("CT1", "CT1")], ingestor=ing,
                     spool_dir=store.spool)
    port = scp.start()
    try:
        assoc = _ae().associate("127.0.0.1", port, ae_title="CTQA")
        assert assoc.is_established
        files = _phantom(3)
        statuses = [_status(assoc.send_c_store(f)) for f in files]
        # refused (the SOP Instance UID breaks the UID grammar): its early flush is wasted, nothing kept
        bad = pydicom.dcmread(files[0])
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.01.5"
        statuses.append(_status(assoc.send_c_store(bad)))
        assoc.release()
    finally:
        scp.stop()
    assert statuses == [0, 0, 0, StoreStatus.INVALID_UID]
    # every dataset: its flush started on pynetdicom's receive (DUL) thread, its storing in a helper
    # thread with that flush (not by the handler, which only waits for it)
    assert len(events) == 12, events
    for i in range(0, 12, 3):
        assert events[i] == ("flush", "dul"), events
        assert sorted(events[i + 1:i + 3]) == [("handler",), ("store", "ingest-store", "flushing")], events
    assert len(store.store_files()) == 3 and not list(store.spool.iterdir())
    db.dispose()


def _node_with_receivers(tmp_path: Path, n: int) -> NodeProcess:
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=600)
    cfg.write_text(cfg.read_text().replace("[node]\n", f"[node]\nreceivers = {n}\n", 1))
    node = NodeProcess(cfg, tmp_path)
    node.start()
    return node


def _run_at_once(port: int, batches: list[list]) -> list[tuple[list[int], bool]]:
    """One association per batch, all established first, then all sending at once."""
    ae = _ae()
    assocs = [ae.associate("127.0.0.1", port, ae_title="CTQA") for _ in batches]
    assert all(a.is_established for a in assocs)
    out: list = [None] * len(batches)
    go = threading.Barrier(len(batches))

    def send(i: int) -> None:
        go.wait()
        statuses = [_status(assocs[i].send_c_store(x)) for x in batches[i]]
        assocs[i].release()
        out[i] = (statuses, assocs[i].is_released)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _released_by(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"association released: .*, process (\d+)", log)]


def test_receiver_processes_take_concurrent_associations_and_store_each_instance_once(tmp_path):
    files = _phantom()
    node = _node_with_receivers(tmp_path, 2)
    try:
        batches = [files[i::4] for i in range(4)]
        results = _run_at_once(node.port, batches)
    finally:
        node.stop()
    assert [r[0] for r in results] == [[0] * len(b) for b in batches]
    assert all(r[1] for r in results)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    stored = list((tmp_path / "var" / "store").rglob("*.dcm"))
    assert sorted(p.stem for p in stored) == sorted(uids)  # each once, under its own UID
    rows = node_sql(node, "select sop_instance_uid from instances")
    n_series = node_sql(node, "select n_instances from series")
    assert sorted(r[0] for r in rows) == sorted(uids)
    assert n_series == [(len(files),)]
    # the four associations were served by both processes
    served = _released_by(node.log())
    assert len(served) == 4 and len(set(served)) == 2, node.log()


def test_a_refused_instance_is_still_refused_by_every_receiver(tmp_path):
    src = _phantom(1)[0]
    bad = pydicom.dcmread(src)
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.01.5"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (tmp_path / "n").mkdir()
    node = _node_with_receivers(tmp_path / "n", 2)
    try:
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # the cut file goes as its bytes are
        try:
            results = _run_at_once(node.port, [[bad, cut], [bad, cut], [bad, cut]])
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
    finally:
        node.stop()
    assert [r[0] for r in results] == [[StoreStatus.INVALID_UID, StoreStatus.CANNOT_PARSE]] * 3
    assert len(set(_released_by(node.log()))) == 2, node.log()
    assert not list((tmp_path / "n" / "var" / "store").rglob("*.dcm"))
    assert not list((tmp_path / "n" / "var" / "spool").iterdir())


def test_a_dead_receivers_unindexed_files_are_indexed_while_the_node_runs(tmp_path):
    """A receiver process killed after acknowledging an instance whose row its group commit had not
    written: the file lies in the store without an index row. The serve process restarts the
    receiver and, RECONCILE_SETTLE_S later, indexes that file (it used to wait for the next start).
    The acknowledged-but-unindexed file is put there by the test as the dead receiver would have left
    it (the reconciliation cannot tell who wrote it)."""
    import os
    import signal
    import shutil
    import time

    from node.receivers import RECONCILE_SETTLE_S
    from tests.helpers import wait_until

    src = _phantom(1)[0]
    node = _node_with_receivers(tmp_path, 2)
    try:
        pid = int(wait_until(lambda: re.search(r"receiver process 2/2 started \(pid (\d+)\)", node.log()),
                             timeout=30, what="receiver 2 started").group(1))
        store = FileStore(tmp_path / "var")
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        rel = store.instance_rel_path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        dst = store.abs(rel)
        dst.parent.mkdir(parents=True)
        shutil.copyfile(src, dst)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        line = wait_until(lambda: re.search(r"receiver process 2 exit reconciliation: .*", node.log()),
                          timeout=RECONCILE_SETTLE_S + 30, what="the exit reconciliation").group(0)
        assert time.monotonic() - t_kill >= RECONCILE_SETTLE_S  # it waited for live receivers' commits
        assert "1 file(s) in the store had no index row: 1 indexed, 0 quarantined" in line, node.log()
        assert re.search(r"receiver process 2 \(pid %d\) exited with code -9; restarting" % pid, node.log())
        rows = node_sql(node, "select sop_instance_uid, rel_path from instances")
        series = node_sql(node, "select series_instance_uid, n_instances, state from series")
        assert rows == [(str(ds.SOPInstanceUID), rel)]
        assert series == [(str(ds.SeriesInstanceUID), 1, "receiving")]  # completed and analysed as usual
        # the restarted receiver serves: an association to the port is answered
        ae = _ae()
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
        assert assoc.is_established
        assoc.release()
    finally:
        node.stop()
