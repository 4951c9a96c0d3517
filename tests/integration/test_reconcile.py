"""Start-up reconciliation: files in the store without an index row (what kill -9 between the file's
rename and the row's commit leaves) are indexed when they are valid instances, quarantined when not."""

from __future__ import annotations

import json
import logging
import shutil

import pydicom

from node.config import settings_from_dict
from node.service import Node
from scp.ingest import Ingestor, StoreStatus
from storage.filestore import quarantine_count, sha256_file
from storage.models import Instance, Series
from tests.helpers import PHANTOM_5MM, qa_node, require, write_config


def _settings(tmp_path):
    return settings_from_dict({
        "node": {"data_dir": str(tmp_path / "var"), "database": f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}",
                 "port": 0},
        "scanners": [{"name": "CT1", "ae_title": "CT1"}],
        "analysis": {"device": "cpu", "models": ["basic"]},
    }, "test.toml")


def _ingest(node: Node, f) -> None:
    spooled = node.store.spool / f"in-{f.name}.dcm"
    shutil.copyfile(f, spooled)
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    r = Ingestor(node.db, node.store).store_file(
        spooled, affected_sop_class=str(ds.SOPClassUID), affected_sop_instance=str(ds.SOPInstanceUID),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID), scanner="CT1", calling_ae="CT1", peer_host="127.0.0.1")
    assert r.status == StoreStatus.SUCCESS


def test_unindexed_store_files_are_indexed_or_quarantined(tmp_path, caplog):
    files = sorted(require(PHANTOM_5MM).iterdir())
    settings = _settings(tmp_path)
    node = Node(settings)
    node.prepare()
    for f in files[:3]:
        _ingest(node, f)
    node.stop()

    store = node.store
    hdr = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    series_dir = store.store / str(hdr[0].StudyInstanceUID) / str(hdr[0].SeriesInstanceUID)
    # Left by kill -9 after the rename, before the row: two valid instances where their UIDs put them.
    orphans = [series_dir / f"{hdr[i].SOPInstanceUID}.dcm" for i in (3, 4)]
    for i, dst in zip((3, 4), orphans):
        shutil.copyfile(files[i], dst)
    # Not valid: cut before the end of its Pixel Data; not DICOM at all; a valid slice in the wrong folder.
    truncated = series_dir / f"{hdr[5].SOPInstanceUID}.dcm"
    truncated.write_bytes(files[5].read_bytes()[:200_000])
    junk = store.store / "notes.txt"
    junk.write_bytes(b"not an instance")
    misplaced = store.store / str(hdr[6].StudyInstanceUID) / "1.2.3.4" / f"{hdr[6].SOPInstanceUID}.dcm"
    misplaced.parent.mkdir(parents=True)
    shutil.copyfile(files[6], misplaced)
    planted = {truncated.name: truncated.read_bytes(), junk.name: junk.read_bytes(),
               misplaced.name: misplaced.read_bytes()}

    caplog.set_level(logging.INFO)
    node = Node(settings)
    node.prepare()
    lines = [r.getMessage() for r in caplog.records if "reconciliation" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "5 file(s) in the store had no index row: 2 indexed, 3 quarantined" in lines[0]
    assert str(hdr[0].PatientName) not in lines[0] and str(hdr[0].PatientID) not in lines[0]

    with node.db.session() as s:
        rows = {i.sop_instance_uid: i for i in s.query(Instance)}
        series = s.query(Series).one()
        assert series.n_instances == 5 and series.series_instance_uid == str(hdr[0].SeriesInstanceUID)
    assert sorted(rows) == sorted(str(hdr[i].SOPInstanceUID) for i in range(5))
    for i, dst in zip((3, 4), orphans):
        row = rows[str(hdr[i].SOPInstanceUID)]
        assert store.abs(row.rel_path) == dst and dst.exists()
        assert row.sha256 == sha256_file(files[i]) and row.size_bytes == files[i].stat().st_size
        assert row.transfer_syntax_uid == str(hdr[i].file_meta.TransferSyntaxUID)

    # The invalid files are moved aside intact, not deleted, and counted.
    assert not truncated.exists() and not junk.exists() and not misplaced.exists()
    moved = {p.name.split("-", 2)[2]: p.read_bytes() for p in store.quarantine.iterdir()}
    assert moved == planted
    assert quarantine_count(settings.node.data_dir) == 3 == store.quarantine_count()
    node.stop()
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var")  # the same data folder and database
    r = qa_node("--config", str(cfg), "status", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["quarantined"] == 3

    # A second start finds nothing to do.
    caplog.clear()
    node = Node(settings)
    node.prepare()
    assert not [r for r in caplog.records if "reconciliation" in r.getMessage()]
    assert quarantine_count(settings.node.data_dir) == 3
    node.stop()


def test_quarantine_count_without_folder(tmp_path):
    assert quarantine_count(tmp_path / "nowhere") == 0


def test_downtime_does_not_complete_a_series(tmp_path):
    """A series left receiving when the node went down is not completed at the restart merely because
    the node itself was away: idleness counts from the start; a counted series still completes."""
    import time
    from datetime import timedelta

    from sqlalchemy import update

    from node.service import sweep_completed_series
    from storage.db import utcnow

    files = sorted(require(PHANTOM_5MM).iterdir())
    node = Node(_settings(tmp_path))
    node.prepare()
    _ingest(node, files[0])
    with node.db.session() as s:  # last instance an hour ago: the node was down meanwhile
        s.execute(update(Series).values(last_received_at=utcnow() - timedelta(hours=1)))
    started = time.monotonic()
    assert sweep_completed_series(node.db, 30.0, ["basic"], started) == []
    assert sweep_completed_series(node.db, 30.0, ["basic"], started - 31.0) == [str(
        pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)]
    node.stop()
