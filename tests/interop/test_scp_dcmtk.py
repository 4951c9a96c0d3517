"""The node against a real DICOM peer: DCMTK storescu/echoscu pushing to `qa-node serve`."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import numpy as np
import pydicom
import pytest

from tests.helpers import (
    PHANTOM_1MM,
    WG04,
    NodeProcess,
    node_sql,
    node_status,
    dataset_bytes,
    qa_node,
    require,
    require_tool,
    storescu,
    pydicom_file,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.interop


@pytest.fixture
def node(tmp_path):
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=2.0)
    proc = NodeProcess(cfg, tmp_path)
    proc.start()
    yield proc
    proc.stop()


def test_phantom_series_stored_byte_identical_and_completes_once(node):
    series_dir = require(PHANTOM_1MM)
    sent = sorted(p for p in series_dir.iterdir() if p.is_file() and p.name != "LICENSE")
    assert len(sent) == 140
    r = storescu(node.port, series_dir)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: node_sql(node, "SELECT state FROM jobs") == [("done",)], timeout=120, interval=0.25,
               what="analysis")
    (series,) = node_status(node)["series"]
    assert series["job"]["state"] == "done"
    assert series["n_instances"] == 140
    assert series["completions"] == 1 and series["state"] == "complete"
    assert series["scanner"] == "CT1"
    assert series["job"]["outcome"] == "done"
    # every instance on disk, byte-identical dataset to what was sent
    store = node.workdir / "var" / "store"
    stored = {p.stem: p for p in store.rglob("*.dcm")}
    assert len(stored) == 140
    for f in sent:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[uid]) == dataset_bytes(f), f"{f.name} not stored as received"
        meta = pydicom.dcmread(stored[uid], stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == uid
    # the scanner's own identity recorded with the series
    from storage.db import Database
    from storage.models import Series

    db = Database(f"sqlite:///{node.workdir / 'var' / 'ctqa.sqlite'}")
    with db.session() as s:
        row = s.query(Series).one()
        assert (row.manufacturer, row.model_name, row.device_serial, row.station_name) == (
            "Philips", "Ingenuity CT", "336067", "CT4")
    # a second identical push: acknowledged, no second copy, no re-analysis
    r = storescu(node.port, series_dir)
    assert r.returncode == 0, r.stderr
    st = node_status(node)
    assert st["series"][0]["n_instances"] == 140 and st["series"][0]["completions"] == 1
    assert st["instance_conflicts"] == 0
    assert len(list(store.rglob("*.dcm"))) == 140


def test_every_wg04_transfer_syntax_accepted_and_decodes(node):
    wg04 = require(WG04)
    files = sorted(wg04.iterdir())
    # propose each file's own (compressed) syntax, so the node must accept every one of them as sent
    flags = {"J2KI": "-xw", "J2KR": "-xv", "JLSL": "-xt", "JLSN": "-xu", "JPLL": "-xs", "RLE": "-xr", "UNC": "-xe"}
    for ts, flag in flags.items():
        r = storescu(node.port, *[f for f in files if f.name.endswith("_" + ts)], extra=(flag,))
        assert r.returncode == 0, f"{ts}: {r.stderr + r.stdout}"
    store = node.workdir / "var" / "store"
    stored = {p.stem: p for p in store.rglob("*.dcm")}
    from analysis.volume import load_series

    pixels = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        path = stored[ds.SOPInstanceUID]
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == \
            ds.file_meta.TransferSyntaxUID, f"{f.name} was not stored in its own transfer syntax"
        pixels[f.name] = load_series([path]).hu[0]
    for ct in ("CT1", "CT2"):
        ref = pixels[f"{ct}_UNC"]
        for ts in ("RLE", "JPLL", "JLSL", "J2KR"):
            np.testing.assert_array_equal(pixels[f"{ct}_{ts}"], ref, err_msg=f"{ct}_{ts} lossless differs")
        for ts in ("JLSN", "J2KI"):  # lossy: the same image, not the same pixels
            lossy = pixels[f"{ct}_{ts}"]
            assert not np.array_equal(lossy, ref)
            r = np.corrcoef(lossy.ravel(), ref.ravel())[0, 1]
            assert r > 0.99, f"{ct}_{ts} decodes to a different image (r={r:.4f})"


def test_raw_bytes_of_every_wg04_file_stored_exactly(node):
    """storescu re-encodes undefined-length sequences; an SCU that sends the file's own bytes
    (pynetdicom chunked send) shows that the node keeps exactly what arrives."""
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    files = sorted(require(WG04).iterdir())
    ae = AE(ae_title="CT1")
    for f in files:
        ae.add_requested_context(CTImageStorage, [pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
        assert assoc.is_established
        statuses = [assoc.send_c_store(f).Status for f in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert statuses == [0] * len(files)
    stored = {p.stem: p for p in (node.workdir / "var" / "store").rglob("*.dcm")}
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[uid]) == dataset_bytes(f), f"{f.name} not stored as received"


def test_access_control_and_sop_class_negotiation(node):
    echoscu = require_tool("echoscu")

    def echo(calling, called):
        return subprocess.run([echoscu, "-aet", calling, "-aec", called, "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=60)

    ok = echo("CT1", "CTQA")
    assert ok.returncode == 0, ok.stderr
    unknown = echo("INTRUDER", "CTQA")
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
    wrong_called = echo("CT1", "NOTUS")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    # a non-CT SOP class (MR) is refused at negotiation
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage

    ae = AE(ae_title="CT1")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
    assert assoc.is_established
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    assoc.release()
    assert CTImageStorage in accepted and MRImageStorage in rejected
    assert "unknown calling AE title" in node.log()


def test_unknown_host_rejected(tmp_path):
    # CT1 may only connect from 127.0.0.2: a push from 127.0.0.1 is rejected
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var",
                       scanners='[[scanners]]\nname = "CT1"\nae_title = "CT1"\nhosts = ["127.0.0.2"]\n')
    proc = NodeProcess(cfg, tmp_path)
    proc.start()
    try:
        echoscu = require_tool("echoscu")
        r = subprocess.run([echoscu, "-aet", "CT1", "-aec", "CTQA", "127.0.0.1", str(proc.port)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
        assert "host not allowed" in proc.log()
    finally:
        proc.stop()


def test_bad_inputs_get_failure_status_and_node_keeps_serving(node, tmp_path):
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    src = require(PHANTOM_1MM) / "I10"
    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])

    def send(path_or_ds):
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
        assert assoc.is_established
        try:
            st = assoc.send_c_store(path_or_ds)
            return st.Status if "Status" in st else None
        finally:
            assoc.release()

    # invalid UID: a component with a leading zero (not DICOM UID grammar)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.01.5"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    assert send(ds) == 0xC220
    # invalid series UID with path characters
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = "1.2.3/../../etc"
    assert send(ds) == 0xC220
    # a truncated dataset, sent raw (chunked send does not re-encode)
    raw = src.read_bytes()
    trunc = tmp_path / "truncated.dcm"
    trunc.write_bytes(raw[: len(raw) // 2])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assert send(trunc) == 0xC210
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    # pydicom-data's bad_sequence.dcm (a real CT slice with invalid UIDs), sent as its bytes are
    bad = pydicom_file("bad_sequence.dcm")
    bad_ds = pydicom.dcmread(bad, stop_before_pixels=True)
    ae.add_requested_context(CTImageStorage, [bad_ds.file_meta.TransferSyntaxUID])
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status_bad = send(bad)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    from storage.filestore import is_valid_uid

    uids_ok = all(is_valid_uid(str(bad_ds.get(k, ""))) for k in ("SOPInstanceUID", "SeriesInstanceUID",
                                                                 "StudyInstanceUID"))
    assert not uids_ok, "bad_sequence.dcm is expected to carry invalid UIDs"
    assert status_bad == 0xC220
    # nothing was written for any of them, and the node still serves
    assert not list((node.workdir / "var" / "store").rglob("*.dcm"))
    assert not [p for p in (node.workdir / "var" / "spool").iterdir()]
    good = storescu(node.port, src)
    assert good.returncode == 0, good.stderr
    assert len(list((node.workdir / "var" / "store").rglob("*.dcm"))) == 1
    assert node.proc.poll() is None


def test_kill_9_mid_push_loses_nothing_acknowledged(tmp_path):
    series_dir = require(PHANTOM_1MM)
    require_tool("storescu")
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=10.0)
    proc = NodeProcess(cfg, tmp_path)
    proc.start()
    store = tmp_path / "var" / "store"
    import os

    push = subprocess.Popen(
        ["storescu", "-v", "-aet", "CT1", "-aec", "CTQA", "+sd", "+r", "-nh", "127.0.0.1", str(proc.port),
         str(series_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TCP_NODELAY="1"))
    wait_until(lambda: store.exists() and len(list(store.rglob("*.dcm"))) >= 40, timeout=60, interval=0.005,
               what="first 40 instances")
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait()
    proc.stop()
    out, _ = push.communicate(timeout=60)
    # storescu -v: "Sending file: PATH" ... "Received Store Response (Success)"
    acknowledged, current = [], None
    for line in out.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            current = None
    assert 0 < len(acknowledged) < 140, out[-2000:]
    # restart: every acknowledged instance is on disk and indexed
    proc.start()
    try:
        st = json.loads(qa_node("--config", str(cfg), "status", "--json", cwd=tmp_path).stdout)
        assert st["series"][0]["n_instances"] >= len(acknowledged)
        from storage.db import Database
        from storage.models import Instance

        db = Database(f"sqlite:///{tmp_path / 'var' / 'ctqa.sqlite'}")
        with db.session() as s:
            indexed = {i.sop_instance_uid: i.rel_path for i in s.query(Instance)}
        for f in acknowledged:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert uid in indexed, f"acknowledged {f} lost"
            assert dataset_bytes(tmp_path / "var" / indexed[uid]) == dataset_bytes(f)
        # the scanner sends the series again (as modalities do after a failure): completes once
        r = storescu(proc.port, series_dir)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: node_sql(proc, "SELECT state FROM jobs") == [("done",)], timeout=120, interval=0.25,
                   what="analysis")
        st = json.loads(qa_node("--config", str(cfg), "status", "--json", cwd=tmp_path).stdout)
        assert st["series"][0]["job"]["state"] == "done"
        assert st["series"][0]["n_instances"] == 140
        assert st["series"][0]["completions"] == 1
        assert st["jobs"] == {"done": 1}
    finally:
        proc.stop()


def test_sigterm_stops_cleanly(node):
    rc = node.stop(signal.SIGTERM)
    assert rc == 0
    assert "stopped" in node.log()
