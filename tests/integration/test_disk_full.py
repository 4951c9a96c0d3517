"""Disk full while receiving is a status, not an abort.

A real `qa-node serve` whose data folder (store, spool and SQLite database) is an 8 MiB tmpfs is
pushed real 512x512 slices over one association until the file system is full: every C-STORE gets
a response, those that did not fit get 0xA700 Out of Resources, the association is released
normally, no partial file is left in the spool or the store, and every instance acknowledged with
Success is indexed and reads back byte for byte. When space returns (the tmpfs is grown), pushing the
refused instances again gives Success.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PHANTOM_5MM, NodeProcess, dataset_bytes, require, write_config

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("mount not available")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _push(port: int, files: list[Path]) -> tuple[list[int], bool]:
    """C-STORE each file (its bytes as they are) on one association: (statuses, released normally)."""
    from pynetdicom import AE

    ae = AE(ae_title="CT1")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTQA")
    assert assoc.is_established
    statuses = []
    for f in files:
        rsp = assoc.send_c_store(f)
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)  # -1: no response (aborted)
    aborted = assoc.is_aborted
    assoc.release()
    return statuses, (not aborted) and assoc.is_released


def _indexed(db: Path) -> dict[str, str]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("select sop_instance_uid, rel_path from instances").fetchall())
    finally:
        con.close()


def _leftovers(data: Path) -> list[str]:
    spool = [p.name for p in (data / "spool").iterdir()]
    tmp = [p.name for p in (data / "store").rglob(".tmp-*")]
    return spool + tmp


def test_disk_full_answers_out_of_resources_and_recovers(tmp_path, small_fs):
    import pydicom

    files = sorted(require(PHANTOM_5MM).iterdir())  # 28 slices of 520 KiB: 14 MiB, more than the 8 MiB
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    data = small_fs / "var"
    cfg = write_config(tmp_path / "config.toml", data_dir=data, stable_age_s=3600)
    node = NodeProcess(cfg, tmp_path)
    node.start()
    try:
        statuses, released = _push(node.port, files)
        print("statuses:", [hex(s) for s in statuses])
        assert released, statuses  # the association was not aborted
        assert set(statuses) <= {0x0000, 0xA700}, [hex(s) for s in statuses]
        ok = [u for u, s in zip(uids, statuses) if s == 0x0000]
        refused = [i for i, s in enumerate(statuses) if s == 0xA700]
        assert len(ok) >= 3 and len(refused) >= 5, [hex(s) for s in statuses]
        assert _leftovers(data) == []  # no partial file in the spool, no temporary file in the store

        indexed = _indexed(data / "ctqa.sqlite")
        assert sorted(indexed) == sorted(ok)  # every Success is indexed, nothing else
        for f, uid in zip(files, uids):
            if uid in ok:
                stored = data / indexed[uid]
                assert dataset_bytes(stored) == dataset_bytes(f)  # reads back exactly as sent
                assert pydicom.dcmread(stored).pixel_array.shape == (512, 512)
        assert not any(p.name.split(".dcm")[0] in {uids[i] for i in refused}
                       for p in (data / "store").rglob("*.dcm"))
        log = node.log()
        assert "No space left on device" in log
        assert "Traceback" not in log

        # Space returns: the refused instances are now stored.
        r = subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        again, released = _push(node.port, [files[i] for i in refused])
        assert released and again == [0x0000] * len(refused), [hex(s) for s in again]
        assert sorted(_indexed(data / "ctqa.sqlite")) == sorted(uids)
        assert _leftovers(data) == []
    finally:
        assert node.stop() == 0


def test_spool_file_below_minimum_keeps_nothing(tmp_path):
    """Below --min-free-mb no spool file is even created; what arrives is counted and dropped."""
    from scp.server import SpoolFile

    f = SpoolFile(tmp_path, min_free_bytes=1 << 62)
    assert f.write(b"x" * 1000) == 1000 and f.received == 1000
    f.close()
    assert f.error == "free disk space below the configured minimum"
    assert list(tmp_path.iterdir()) == []


def test_failing_sweep_backs_off_and_logs_once(caplog):
    """The completion sweep on a failing database: one error line, skipped ticks with doubling
    back-off (capped), one line on recovery."""
    from sqlalchemy.exc import OperationalError

    from node.service import _Guarded

    now = [0.0]
    calls = []
    failing = [True]

    def sweep():
        calls.append(now[0])
        if failing[0]:
            raise OperationalError("INSERT", {}, Exception("database or disk is full"))
        return ["1.2.3"]

    job = _Guarded(sweep, "series completion sweep", initial_s=2.0, max_s=16.0, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="node.service")
    for _ in range(200):  # 100 s of ticks every 0.5 s
        assert job() is None
        now[0] += 0.5
    # attempts at 0, 2, 6, 14, 30, then every 16 s: 46, 62, 78, 94
    assert calls == [0.0, 2.0, 6.0, 14.0, 30.0, 46.0, 62.0, 78.0, 94.0]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "series completion sweep failing" in errors[0].getMessage()
    assert "database or disk is full" in errors[0].getMessage()
    failing[0] = False
    now[0] = 200.0
    assert job() == ["1.2.3"]
    assert any("recovered after 9 failed attempt(s)" in r.getMessage() for r in caplog.records)
    assert job() == ["1.2.3"] and job.failures == 0


def test_worker_survives_a_failing_job_queue(tmp_path, monkeypatch, caplog):
    """The analysis worker on a database that fails (disk full): it waits with back-off, logs one
    line, does not die, and takes jobs again once the database answers."""
    import time

    from sqlalchemy.exc import OperationalError

    import node.worker as worker_mod
    from node.config import settings_from_dict
    from storage.db import Database
    from storage.filestore import FileStore

    settings = settings_from_dict({"node": {"data_dir": str(tmp_path), "database": f"sqlite:///{tmp_path}/db.sqlite"},
                                   "analysis": {"device": "cpu", "models": ["basic"]}}, "test.toml")
    calls = []

    def claim(db, worker, **_kw):
        calls.append(time.monotonic())
        if len(calls) <= 4:
            raise OperationalError("UPDATE jobs", {}, Exception("database or disk is full"))
        return None

    monkeypatch.setattr(worker_mod, "claim_job", claim)
    caplog.set_level(logging.INFO, logger="node.worker")
    w = worker_mod.AnalysisWorker(settings, Database(settings.node.database), FileStore(tmp_path), poll_s=0.01)
    w.start()
    try:
        deadline = time.monotonic() + 10
        while len(calls) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) >= 6 and w._thread.is_alive()
    finally:
        w.stop(timeout=5)
    gaps = [b - a for a, b in zip(calls, calls[1:5])]
    assert all(g >= 0.9 * e for g, e in zip(gaps, (0.02, 0.04, 0.08, 0.16))), gaps  # doubling back-off
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the job queue" in m for m in msgs) == 1
    assert any("job queue readable again after 4 failed attempt(s)" in m for m in msgs)


def test_peer_killed_mid_dataset_leaves_no_spool_file(tmp_path):
    """A scanner that dies in the middle of a C-STORE (storescu SIGKILLed while sending a 128 MiB
    instance): the association is aborted, its partial dataset leaves the spool at once (not at the
    next start), and the node keeps serving."""
    import signal
    import time

    import numpy as np
    from pydicom.uid import generate_uid

    from tests.helpers import require_tool, storescu, wait_until

    exe = require_tool("storescu")
    import pydicom

    src = sorted(require(PHANTOM_5MM).iterdir())[0]
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = 8192
    ds.PixelData = np.zeros((8192, 8192), np.uint16).tobytes()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds

    data = tmp_path / "var"
    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=data, stable_age_s=3600), tmp_path)
    node.start()
    try:
        scu = subprocess.Popen([exe, "-aet", "CT1", "-aec", "CTQA", "127.0.0.1", str(node.port), str(big)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: any((data / "spool").iterdir()), 30, 0.01, "the dataset arriving in the spool")
        finally:
            scu.send_signal(signal.SIGKILL)
            scu.wait()
        wait_until(lambda: "association aborted" in node.log(), 30, what="the abort")
        time.sleep(0.2)
        assert list((data / "spool").iterdir()) == []
        assert storescu(node.port, src).returncode == 0  # still serving
        assert _indexed(data / "ctqa.sqlite") and list((data / "spool").iterdir()) == []
    finally:
        node.stop()
