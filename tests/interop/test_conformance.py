"""The README's conformance and C-STORE status tables, row by row, over the wire against `qa-node serve`
with real peers: DCMTK storescu (each syntax it can propose) and a pynetdicom SCU (the file's own bytes,
for the syntaxes storescu cannot propose and for the hostile inputs)."""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.crafted import (
    CT_IMAGE, DEFLATED, EXPLICIT, deflate, deflate_bomb, encode, file_meta, header_of, nested_sequences,
    pixel_data_offset, write_instance,
)
from tests.helpers import (
    PHANTOM_5MM, SHARED_DATA, NodeProcess, dataset_bytes, node_status, require, storescu, wait_until, write_config,
)

pytestmark = pytest.mark.interop

CS3D = SHARED_DATA / "corpus" / "cornerstone3D"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
# README "Transfer syntaxes": UID -> (cornerstone3D folder with that encoding of one CT image,
# storescu option proposing it or None (storescu cannot: pynetdicom sends it), lossless)
SYNTAXES = {
    "1.2.840.10008.1.2": ("LittleEndianImplicit", "-xi", True),
    "1.2.840.10008.1.2.1": ("LittleEndianExplicit", "-xe", True),
    "1.2.840.10008.1.2.1.99": ("DeflatedExplicitVRLittleEndian", "-xd", True),
    "1.2.840.10008.1.2.2": ("BigEndianExplicit", "-xb", True),
    "1.2.840.10008.1.2.5": ("RLELossless", "-xr", True),
    "1.2.840.10008.1.2.4.50": ("JPEGProcess1", "-xy", False),
    "1.2.840.10008.1.2.4.51": ("JPEGProcess2_4", "-xx", False),
    "1.2.840.10008.1.2.4.57": ("JPEGProcess14", None, True),
    "1.2.840.10008.1.2.4.70": ("JPEGProcess14SV1", "-xs", True),
    "1.2.840.10008.1.2.4.80": ("JPEGLSLossless", "-xt", True),
    "1.2.840.10008.1.2.4.81": ("JPEGLSLossy", "-xu", False),
    "1.2.840.10008.1.2.4.90": ("JPEG2000LosslessOnly", "-xv", True),
    "1.2.840.10008.1.2.4.91": ("JPEG2000", "-xw", False),
}
STUDY = "2.25.61845710012345"


def cs3d(name: str) -> Path:
    return next((require(CS3D) / f"GE_HiSpeedCTi_TS_{name}").glob("*.dcm"))


@pytest.fixture
def node(tmp_path):
    proc = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=600), tmp_path)
    proc.start()
    yield proc
    proc.stop()


def stored(node: NodeProcess) -> dict[str, Path]:
    return {p.stem: p for p in (node.workdir / "var" / "store").rglob("*.dcm")}


@contextlib.contextmanager
def scu(port: int, contexts: list[tuple[str, list[str]]], calling: str = "CT1"):
    """A pynetdicom association that sends files as their bytes are (chunked send: no re-encoding)."""
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate("127.0.0.1", port, ae_title="CTQA")
    try:
        assert assoc.is_established
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        _config.STORE_SEND_CHUNKED_DATASET = False


def status_of(assoc, what) -> int | None:
    rsp = assoc.send_c_store(what)
    return int(rsp.Status) if "Status" in rsp else None


def renamed(src: Path, dst: Path, n: int) -> Path:
    """A copy of ``src`` in its own transfer syntax with its own Series and SOP Instance UID (the
    cornerstone3D files are one image with one set of UIDs in every encoding)."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{STUDY}.{n}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{STUDY}.{n}.1"
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_every_listed_transfer_syntax_stored_as_sent_and_decodes(node, tmp_path):
    ref = pydicom.dcmread(cs3d("LittleEndianExplicit")).pixel_array
    sent: dict[str, tuple[Path, bool]] = {}  # ts -> (file, sent raw by pynetdicom)
    for n, (ts, (folder, flag, _)) in enumerate(SYNTAXES.items(), start=1):
        f = renamed(cs3d(folder), tmp_path / f"ts{n}.dcm", n)
        assert str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        if flag:
            r = storescu(node.port, f, extra=(flag,), verbose=True)
            assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr, \
                f"{ts} via storescu {flag}: {r.stdout[-800:]}{r.stderr[-800:]}"
            sent[ts] = (f, False)
        # pynetdicom sends the file's own bytes (a second instance): exactly what arrives is kept
        raw = renamed(cs3d(folder), tmp_path / f"raw{n}.dcm", 100 + n)
        with scu(node.port, [(CT_IMAGE, [ts])]) as assoc:
            assert status_of(assoc, raw) == 0x0000, ts
        sent[f"raw {ts}"] = (raw, True)
    # a shared phantom slice deflated by storescu on the fly (the refused case)
    phantom = require(PHANTOM_5MM) / "I10"
    r = storescu(node.port, phantom, extra=("-xd",), verbose=True)
    assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr, r.stdout[-800:]

    have = stored(node)
    for key, (f, raw) in sent.items():
        ts = key.removeprefix("raw ")
        src = pydicom.dcmread(f, stop_before_pixels=True)
        got = have[str(src.SOPInstanceUID)]
        assert str(pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts, key
        if raw:
            assert dataset_bytes(got) == dataset_bytes(f), f"{key}: not stored as received"
        pixels = pydicom.dcmread(got).pixel_array
        if SYNTAXES[ts][2]:
            np.testing.assert_array_equal(pixels, ref, err_msg=key)
        else:
            assert pixels.shape == ref.shape and np.corrcoef(pixels.ravel(), ref.ravel())[0, 1] > 0.999, key
    deflated = have[str(pydicom.dcmread(phantom, stop_before_pixels=True).SOPInstanceUID)]
    assert str(pydicom.dcmread(deflated, stop_before_pixels=True).file_meta.TransferSyntaxUID) == DEFLATED
    assert deflated.stat().st_size < phantom.stat().st_size * 0.8  # stored deflated, as received
    np.testing.assert_array_equal(pydicom.dcmread(deflated).pixel_array, pydicom.dcmread(phantom).pixel_array)
    assert len(have) == len(sent) + 1
    st = node_status(node)
    assert sum(s["n_instances"] for s in st["series"]) == len(have) and st["instance_conflicts"] == 0


def test_negotiation_first_proposed_syntax_and_unlisted_ones_refused(node):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

    ae = AE(ae_title="CT1")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_requested_context(ENHANCED_CT, ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2.2", ["1.2.840.10008.1.2"])  # Legacy Converted
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.55", "1.2.840.10008.1.2.4.53"])  # retired JPEG
    # one context per encoding of the same SOP class, as dcmsend proposes: each gets its own first
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"])  # RLE first
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.1"])  # JPEG-LS first
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
    assert assoc.is_established
    try:
        accepted = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in assoc.accepted_contexts}
        rejected = {(cx.abstract_syntax, tuple(cx.transfer_syntax)) for cx in assoc.rejected_contexts}
        assert (CTImageStorage, ("1.2.840.10008.1.2.2",)) in accepted  # the first proposed, not ours first
        assert (CTImageStorage, ("1.2.840.10008.1.2.5",)) in accepted
        assert (CTImageStorage, ("1.2.840.10008.1.2.4.80",)) in accepted
        assert (ENHANCED_CT, ("1.2.840.10008.1.2.4.80",)) in accepted
        assert ("1.2.840.10008.5.1.4.1.1.2.2", ("1.2.840.10008.1.2",)) in accepted
        assert {cx[0] for cx in rejected} == {CTImageStorage, MRImageStorage}
        wait_until(lambda: re.search(r"association accepted from 127\.0\.0\.1 \(AE CT1\): 2 presentation context\(s\) "
                                     r"refused: CT Image Storage \(transfer syntaxes not supported\); MR Image Storage "
                                     r"\(abstract syntax not supported\)", node.log()), timeout=5, what="refusals logged")
        assert (CTImageStorage, ("1.2.840.10008.1.2.4.55",)) in rejected  # (pynetdicom shows the first proposed)
        assert int(assoc.send_c_echo().Status) == 0x0000  # Verification SCP
    finally:
        assoc.release()


def _store_with_command(assoc, sop_class: str, sop_instance: str, data: bytes) -> int | None:
    """Send ``data`` (an encoded dataset) in a C-STORE-RQ whose command carries these Affected SOP
    Class and Instance UIDs, unchecked (pynetdicom's setters would refuse them); the status, or None
    when no response came."""
    import io
    import time

    from pydicom.uid import UID
    from pynetdicom.dimse_primitives import C_STORE

    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CT_IMAGE and c.transfer_syntax[0] == EXPLICIT)
    req = C_STORE()
    req.MessageID = 7
    req._affected_sop_class_uid = UID(sop_class)
    req._affected_sop_instance_uid = UID(sop_instance)
    req.Priority = 2
    req.DataSet = io.BytesIO(data)
    req._context_id = cx.context_id
    assoc._reactor_checkpoint.clear()  # (what send_c_store does: the reactor leaves the messages to us)
    try:
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    status = getattr(rsp, "Status", None)
    return int(status) if status is not None else None


def test_a_command_pynetdicom_cannot_serve_is_refused_and_the_association_goes_on(node):
    """An Affected SOP Class UID with no service class ("31", as DCMTK's dcmsend writes for one
    corpus file, or an unknown 1.2.3.4) and an Affected SOP Instance UID over 64 characters: pynetdicom
    alone aborts the association (no status, the sender's later instances lost). The node answers
    0xA900 (the dataset's SOP class is not the command's), 0xC220 (not a valid UID), stores neither,
    and the next instance on the same association is stored."""
    files = sorted(p for p in require(PHANTOM_5MM).iterdir() if p.name.startswith("I"))[:4]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    with scu(node.port, [(CT_IMAGE, [EXPLICIT])]) as assoc:
        assert _store_with_command(assoc, "31", uids[0], dataset_bytes(files[0])) == 0xA900
        assert _store_with_command(assoc, "1.2.3.4", uids[1], dataset_bytes(files[1])) == 0xA900
        assert _store_with_command(assoc, "1." + "2" * 65, uids[2], dataset_bytes(files[2])) == 0xA900
        assert _store_with_command(assoc, CT_IMAGE, "1." + "2" * 65, dataset_bytes(files[2])) == 0xC220
        assert assoc.is_established
        assert _store_with_command(assoc, CT_IMAGE, uids[3], dataset_bytes(files[3])) == 0x0000
    assert sorted(stored(node)) == [uids[3]]
    log = node.log()
    assert "Traceback" not in log and "No supported service class" not in log


def _raw_instance(tmp_path: Path, name: str, body: bytes, *, ts: str = EXPLICIT, sop_class: str = CT_IMAGE,
                  sop_instance: str) -> Path:
    return write_instance(tmp_path / name, body, ts, sop_class, sop_instance)


def test_every_documented_status_over_the_wire(node, tmp_path):
    src = require(PHANTOM_5MM) / "I10"
    ds = pydicom.dcmread(src)
    uid = str(ds.SOPInstanceUID)
    body = encode(ds, EXPLICIT)
    pix = pixel_data_offset(body)
    _, header = header_of(src)

    def with_uid(**changes) -> pydicom.Dataset:
        d = pydicom.dcmread(src)
        for k, v in changes.items():
            if v is None:
                delattr(d, k)
            else:
                setattr(d, k, v)
        return d

    cases = [  # (what, file or dataset, transfer syntax, expected status, one log line contains)
        ("cut before Pixel Data", _raw_instance(tmp_path, "cut0.dcm", body[:pix], sop_instance=uid), EXPLICIT,
         0xC210, "no Pixel Data"),
        ("cut inside Pixel Data", _raw_instance(tmp_path, "cut1.dcm", body[:-1000], sop_instance=uid), EXPLICIT,
         0xC210, "dataset ends early"),
        ("sequences nested 500 deep", _raw_instance(tmp_path, "deep.dcm", body[:pix] + nested_sequences(500) + body[pix:],
                                                    sop_instance=uid), EXPLICIT, 0xC210, "nested deeper than 32"),
        ("deflate stream cut", _raw_instance(tmp_path, "dcut.dcm", deflate(body)[:-5000], ts=DEFLATED, sop_instance=uid),
         DEFLATED, 0xC210, "deflated dataset is cut"),
        ("deflate bomb 3 GiB", _raw_instance(tmp_path, "bomb.dcm", deflate_bomb(header, 3 << 30), ts=DEFLATED,
                                             sop_instance=uid), DEFLATED, 0xC212, "exceeds the instance limit of 2048 MiB"),
        ("Pixel Data of 3 GiB declared", _raw_instance(
            tmp_path, "bomb2.dcm", deflate(header + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 3 << 30)),
            ts=DEFLATED, sop_instance=uid), DEFLATED, 0xC212, "a value of 3221225472 bytes exceeds"),
        ("SOP Class differs from the request", _raw_instance(tmp_path, "cls.dcm", encode(with_uid(SOPClassUID=ENHANCED_CT), EXPLICIT),
                                                             sop_instance=uid), EXPLICIT, 0xA900, "differs from the request's Affected SOP Class"),
        ("SOP Instance UID differs from the request", _raw_instance(tmp_path, "inst.dcm", body, sop_instance=uid + ".9"),
         EXPLICIT, 0xC220, "differs from the request's Affected SOP Instance UID"),
        ("UID grammar (leading zero)", with_uid(SOPInstanceUID="1.2.826.0.1.3680043.2.1125.01.5"), EXPLICIT, 0xC220,
         "is not a valid DICOM UID"),
        ("UID with path characters", with_uid(SeriesInstanceUID="1.2.3/../../etc"), EXPLICIT, 0xC220,
         "is not a valid DICOM UID"),
        ("Series Instance UID missing", with_uid(SeriesInstanceUID=None), EXPLICIT, 0xC230,
         "required attribute 'SeriesInstanceUID' missing"),
        ("Study Instance UID missing", with_uid(StudyInstanceUID=None), EXPLICIT, 0xC230,
         "required attribute 'StudyInstanceUID' missing"),
    ]
    with scu(node.port, [(CT_IMAGE, [EXPLICIT]), (CT_IMAGE, [DEFLATED])]) as assoc:
        for what, item, ts, expected, text in cases:
            before = node.log().count("\n")
            if isinstance(item, pydicom.Dataset):
                item.file_meta.TransferSyntaxUID = ts
                from pynetdicom import _config
                _config.STORE_SEND_CHUNKED_DATASET = False  # pynetdicom encodes the dataset
                got = status_of(assoc, item)
                _config.STORE_SEND_CHUNKED_DATASET = True
            else:
                got = status_of(assoc, item)
            assert got == expected, f"{what}: 0x{got or 0:04X}, expected 0x{expected:04X}"
            # one line per refusal (the analysis worker process may log its start meanwhile: not counted)
            new = [line for line in node.log().splitlines()[before:] if " node.workers: " not in line]
            assert len(new) == 1 and text in new[0], f"{what}: {new}"
        # the same association then stores a good instance; a second identical copy is acknowledged
        # without a second file; different bytes under the same UID: Success, first copy kept, counted
        assert status_of(assoc, src) == 0x0000
        assert status_of(assoc, src) == 0x0000
        changed = tmp_path / "changed.dcm"
        d = pydicom.dcmread(src)
        d.SeriesDescription = "changed"
        d.save_as(changed)
        assert status_of(assoc, changed) == 0x0000
    log = node.log()
    assert "Traceback" not in log and str(ds.PatientID) not in log and str(ds.PatientName) not in log
    (kept,) = stored(node).values()
    assert kept.read_bytes()[-2000:] == src.read_bytes()[-2000:]
    assert pydicom.dcmread(kept, stop_before_pixels=True).SeriesDescription != "changed"
    assert not list((node.workdir / "var" / "spool").iterdir())
    st = node_status(node)
    assert st["instance_conflicts"] == 1 and st["series"][0]["n_instances"] == 1
    assert re.search(r"released: scanner CT1 .*, 1 stored, 2 duplicate, 12 failed", log)


def test_out_of_resources_below_min_free_space(tmp_path):
    """0xA700: below `serve --min-free-mb` (here more than any disk has), nothing is kept."""
    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var"), tmp_path,
                       min_free_mb=1 << 40)
    node.start()
    try:
        src = require(PHANTOM_5MM) / "I10"
        r = storescu(node.port, src, verbose=True)
        assert "Received Store Response (Refused: OutOfResources)" in r.stdout + r.stderr, r.stderr[-600:]
        with scu(node.port, [(CT_IMAGE, [EXPLICIT])]) as assoc:
            assert status_of(assoc, src) == 0xA700
        assert stored(node) == {}
        assert node.proc.poll() is None
        assert re.search(r"free disk space \(\d+ MiB\) is below the configured minimum \(\d+ MiB, --min-free-mb\): "
                         r"every C-STORE is refused", node.log())  # said at start, before any store
    finally:
        node.stop()


def test_max_associations_max_pdu_and_max_instance_mb(tmp_path):
    cfg = write_config(tmp_path / "config.toml", data_dir=tmp_path / "var")
    cfg.write_text(cfg.read_text().replace('log_level = "INFO"', 'log_level = "INFO"\nmax_associations = 2\n'
                                           'max_pdu = 16384\nmax_instance_mb = 1', 1))
    node = NodeProcess(cfg, tmp_path)
    node.start()
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    try:
        ae = AE(ae_title="CT1")
        ae.add_requested_context(CTImageStorage, [EXPLICIT])
        ae.add_requested_context(ENHANCED_CT, [EXPLICIT])
        # connections that never ask for an association (a port scan, a hostile client) do not take
        # the registered scanners' slots, and are closed after scp.server.REQUEST_WAIT_S
        import socket
        import time

        from scp.server import REQUEST_WAIT_S

        idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(6)]
        time.sleep(0.5)
        held = [ae.associate("127.0.0.1", node.port, ae_title="CTQA") for _ in range(2)]
        assert all(a.is_established for a in held)
        t0 = time.monotonic()
        for sock in idle:
            sock.settimeout(REQUEST_WAIT_S + 20)
            assert sock.recv(1) == b""  # closed by the node
            sock.close()
        assert time.monotonic() - t0 < REQUEST_WAIT_S + 5
        assert held[0].acceptor.maximum_length == 16384  # node.max_pdu, as the node announces it
        third = ae.associate("127.0.0.1", node.port, ae_title="CTQA")
        assert third.is_rejected  # A-ASSOCIATE-RJ: local limit exceeded (transient)
        wait_until(lambda: "association rejected: the association limit (2, node.max_associations) is reached "
                           "(calling AE 'CT1' from 127.0.0.1)" in node.log(), timeout=5, what="the limit's log line")
        held[0].release()  # the node frees the slot when its side of the release is done (a moment later)
        again = wait_until(lambda: (a := ae.associate("127.0.0.1", node.port, ae_title="CTQA")).is_established and a,
                           timeout=10, interval=0.2, what="a free association slot after a release")
        # max_instance_mb = 1: a slice of 0.5 MiB is stored, a 2-frame 512 x 512 Enhanced CT (1 MiB of pixels) is not
        src = require(PHANTOM_5MM) / "I10"
        assert status_of(again, src) == 0x0000
        two = next((SHARED_DATA / "corpus" / "dicomParser" / "Acme_EnhancedCT_2frames").glob("*.dcm"))
        assert status_of(again, two) == 0xC212
        # 4 MiB arriving: dropped while it arrives (never spooled whole), same answer
        ds, header = header_of(src)
        big = write_instance(tmp_path / "big.dcm", header + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 4 << 20)
                             + bytes(4 << 20), EXPLICIT, CT_IMAGE, "2.25.4242")
        from pynetdicom import _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assert status_of(again, big) == 0xC212
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
        assert re.search(r"instance too large \(\d+ bytes arrived; the limit is 1 MiB", node.log())
        assert not list((node.workdir / "var" / "spool").iterdir())
        again.release()
        held[1].release()
        assert re.search(r"instance too large \(dataset of 10\d{5} bytes exceeds the instance limit of 1 MiB "
                         r"\(node.max_instance_mb\)\)", node.log())
        # storescu sees the PDU limit and sends within it
        r = storescu(node.port, require(PHANTOM_5MM) / "I100", extra=("-d",))
        out = r.stdout + r.stderr
        assert r.returncode == 0 and re.search(r"Their Max PDU Receive Size\s*:\s*16384", out), out[-1500:]
        assert len(stored(node)) == 2
    finally:
        node.stop()
