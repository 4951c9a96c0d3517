"""Durability and bookkeeping of received instances, in process: duplicates, conflicts, a full disk,
a failing database, completion by count, re-opening, re-queueing."""

from __future__ import annotations

import errno
import os
import shutil
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest

from scp.ingest import Ingestor, StoreStatus
from storage.db import Database, utcnow
from storage.filestore import FileStore
from storage.models import Instance, InstanceConflict, Job, JobState, Series
from storage.repo import claim_job, complete_due_series, requeue_running_jobs
from tests.helpers import PHANTOM_5MM, require, pydicom_file

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPL = "1.2.840.10008.1.2.1"


@pytest.fixture
def env(tmp_path):
    store = FileStore(tmp_path / "var")
    store.prepare()
    db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")
    db.create_all()
    return db, store, Ingestor(db, store)


def spool_copy(store: FileStore, src: Path, name: str = "in.dcm") -> Path:
    dst = store.spool / name
    shutil.copyfile(src, dst)
    return dst


def store_one(ing: Ingestor, store: FileStore, src: Path, **kw):
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    return ing.store_file(spool_copy(store, src), affected_sop_class=str(ds.SOPClassUID),
                          affected_sop_instance=str(ds.SOPInstanceUID),
                          transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1",
                          peer_host="127.0.0.1", **kw)


def files_in(store: FileStore) -> list[Path]:
    return [p for p in store.store.rglob("*") if p.is_file()]


def test_stored_then_duplicate_then_conflict(env, tmp_path):
    db, store, ing = env
    src = require(PHANTOM_5MM) / sorted(os.listdir(PHANTOM_5MM))[0]
    r = store_one(ing, store, src)
    assert r.status == StoreStatus.SUCCESS and r.outcome == "stored"
    assert store_one(ing, store, src).outcome == "duplicate"
    assert len(files_in(store)) == 1
    # same SOP Instance UID, different bytes: first kept, conflict counted
    ds = pydicom.dcmread(src)
    ds.SeriesDescription = "changed"
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    r = store_one(ing, store, changed)
    assert r.status == StoreStatus.SUCCESS and r.outcome == "conflict"
    (kept,) = files_in(store)
    assert kept.read_bytes()[-1000:] == src.read_bytes()[-1000:]
    assert pydicom.dcmread(kept, stop_before_pixels=True).SeriesDescription != "changed"
    with db.session() as s:
        assert s.query(InstanceConflict).count() == 1
        assert s.query(Instance).count() == 1
    assert not list(store.spool.iterdir())


def test_full_disk_returns_out_of_resources_and_leaves_nothing(env, monkeypatch):
    db, store, ing = env
    src = require(PHANTOM_5MM) / sorted(os.listdir(PHANTOM_5MM))[0]
    # (the configured free-space floor is checked once, while the dataset arrives: scp.server.SpoolFile,
    # tests/integration/test_disk_full.py and tests/interop/test_conformance.py)
    # the disk fills while the instance is made durable (the file's flush, fdatasync, reports ENOSPC)
    real_fdatasync = os.fdatasync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    r = store_one(ing, store, src)
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    assert r.status == StoreStatus.OUT_OF_RESOURCES and r.status == 0xA700
    assert files_in(store) == []
    assert not list(store.spool.iterdir())
    with db.session() as s:
        assert s.query(Instance).count() == 0
    # after space is back the same instance stores normally
    assert store_one(ing, store, src).outcome == "stored"


def test_database_failure_acknowledges_nothing(env, tmp_path):
    db, store, ing = env
    src = require(PHANTOM_5MM) / sorted(os.listdir(PHANTOM_5MM))[0]
    broken = Database(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.sqlite'}")
    r = Ingestor(broken, store).store_file(
        spool_copy(store, src), affected_sop_class=CT,
        affected_sop_instance=str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID),
        transfer_syntax=EXPL, scanner="CT1", calling_ae="CT1", peer_host="127.0.0.1")
    assert r.status == StoreStatus.OUT_OF_RESOURCES
    assert files_in(store) == []


def test_dataset_that_does_not_match_its_sop_class_is_refused(env):
    db, store, ing = env
    src = require(PHANTOM_5MM) / sorted(os.listdir(PHANTOM_5MM))[0]
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    r = ing.store_file(spool_copy(store, src), affected_sop_class="1.2.840.10008.5.1.4.1.1.2.1",
                       affected_sop_instance=str(ds.SOPInstanceUID), transfer_syntax=EXPL, scanner="CT1",
                       calling_ae="CT1", peer_host="127.0.0.1")
    assert r.status == StoreStatus.DATASET_MISMATCH and files_in(store) == []


def test_enhanced_ct_completes_by_count_without_waiting(env):
    db, store, ing = env
    src = pydicom_file("eCT_Supplemental.dcm")
    assert store_one(ing, store, src).outcome == "stored"
    # stable age of one hour: only the expected count can complete it now
    assert len(complete_due_series(db, 3600, ["basic"])) == 1
    assert complete_due_series(db, 3600, ["basic"]) == []
    with db.session() as s:
        (series,) = s.query(Series).all()
        assert series.state == "complete" and series.expected_instances == 1 and series.completions == 1
        assert s.query(Job).count() == 1


def test_idle_completion_late_instance_reopens_and_requeue(env):
    db, store, ing = env
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))
    for f in files[:-1]:
        assert store_one(ing, store, f).outcome == "stored"
    assert complete_due_series(db, 30, ["basic"]) == []  # not idle yet
    later = utcnow() + timedelta(seconds=31)
    assert len(complete_due_series(db, 30, ["basic"], now=later)) == 1
    # a late instance re-opens the series: a new generation, analysed again after it settles
    assert store_one(ing, store, files[-1]).outcome == "stored"
    with db.session() as s:
        series = s.query(Series).one()
        assert series.state == "receiving" and series.generation == 2 and series.n_instances == len(files)
    assert len(complete_due_series(db, 30, ["basic"], now=utcnow() + timedelta(seconds=31))) == 1
    with db.session() as s:
        jobs = s.query(Job).order_by(Job.id).all()
        assert [j.generation for j in jobs] == [1, 2]
    # a job left running by a crashed worker goes back to pending at start-up
    job_id = claim_job(db, "crashed-worker")
    assert job_id is not None
    assert requeue_running_jobs(db) == 1
    with db.session() as s:
        assert s.get(Job, job_id).state == JobState.PENDING

