"""The node against SCUs other than DCMTK storescu: GDCM's gdcmscu (an independent DICOM network
implementation) and Orthanc forwarding a study as a PACS router does (its own presentation-context
proposals, calling AE of the PACS, compressed instances sent in the syntax they are stored in)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers import (
    PHANTOM_5MM,
    WG04,
    NodeProcess,
    node_sql,
    node_status,
    dataset_bytes,
    require,
    require_tool,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.interop


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "LICENSE")


def stored_by_uid(node: NodeProcess) -> dict[str, Path]:
    return {p.stem: p for p in (node.workdir / "var" / "store").rglob("*.dcm")}


def gdcmscu(port: int, *inputs: Path, calling: str = "CT1") -> subprocess.CompletedProcess:
    exe = require_tool("gdcmscu")
    cmd = [exe, "--store", "--aetitle", calling, "--call", "CTQA"]
    for p in inputs:
        cmd += ["-i", str(p)]
    return subprocess.run([*cmd, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=300)


def test_gdcmscu_push_stored_byte_identical_and_unknown_caller_rejected(tmp_path):
    series = require(PHANTOM_5MM)
    files = dicom_files(series)
    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var"), tmp_path)
    node.start()
    try:
        # Debian's gdcmscu 3.0.21 aborts in its own teardown after A-RELEASE (it does so against
        # DCMTK storescp too), so its exit code says nothing: the node's side is what is checked.
        gdcmscu(node.port, *files)
        wait_until(lambda: node_sql(node, "SELECT state FROM jobs") == [("done",)], timeout=120, interval=0.25,
                   what="analysis")
        (row,) = node_status(node)["series"]
        assert row["job"]["state"] == "done"
        assert row["n_instances"] == 28 and row["completions"] == 1 and row["scanner"] == "CT1"
        stored = stored_by_uid(node)
        assert len(stored) == 28
        for f in files:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert dataset_bytes(stored[uid]) == dataset_bytes(f), f"{f.name} not stored as gdcmscu sent it"
        assert "released: scanner CT1 (AE CT1 from 127.0.0.1), 28 stored, 0 duplicate, 0 failed" in node.log()

        r = gdcmscu(node.port, files[0], calling="INTRUDER")
        assert "calling-AE-title-not-recognized" in r.stdout + r.stderr
        assert len(stored_by_uid(node)) == 28
        assert "unknown calling AE title (calling AE 'INTRUDER' from 127.0.0.1)" in node.log()
    finally:
        node.stop()


def _upload(orthanc, path: Path) -> str:
    req = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "application/dicom"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read().decode())["ID"]


def test_orthanc_forwards_a_study_in_its_stored_syntaxes(tmp_path):
    """A PACS routing to the node: Orthanc C-STOREs a phantom series and every wg04 file (seven
    transfer syntaxes) with its own calling AE; the node accepts each in the syntax it was sent in,
    and the lossless ones decode to exactly the pixels of the uncompressed file."""
    require_tool("Orthanc")
    from node.orthanc import LocalOrthanc

    from analysis.volume import load_series

    phantom = dicom_files(require(PHANTOM_5MM))
    wg04 = dicom_files(require(WG04))
    scanners = '[[scanners]]\nname = "ROUTER"\nae_title = "ORTHANC"\nhosts = ["127.0.0.1"]\n'
    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", scanners=scanners), tmp_path)
    node.start()
    try:
        with LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", node.port)}, workdir=tmp_path / "orthanc") as pacs:
            ids = [_upload(pacs, f) for f in phantom + wg04]
            job = pacs.post("/modalities/CTQA/store", {"Resources": ids, "Synchronous": True})
            assert isinstance(job, dict)
        stored = wait_until(lambda: (s := stored_by_uid(node)) and len(s) == len(ids) and s, timeout=60,
                            what="every forwarded instance stored")
        # wg04 holds four series: CT1 and CT2 in six syntaxes each, and their RLE copies in series of their own
        wait_until(lambda: (j := node_sql(node, "SELECT state FROM jobs")) and len(j) == 5
                   and all(st in ("done", "failed") for (st,) in j), timeout=180, interval=0.25,
                   what="analysis of the five series")
        st = node_status(node)
        assert len(st["series"]) == 5
        assert {r["scanner"] for r in st["series"]} == {"ROUTER"}
        assert sorted(r["n_instances"] for r in st["series"]) == [1, 1, 6, 6, 28]
        assert all(r["completions"] == 1 for r in st["series"])
        # every one of them is analysed (the phantom and each wg04 series: the same slice in several
        # syntaxes); those whose first image is DERIVED\SECONDARY (the lossy copies of CT2 and both RLE
        # copies) keep their basic statistics as derived secondary images and end skipped (no outputs)
        outcomes = sorted((r["n_instances"], r["job"]["state"], r["job"]["outcome"]) for r in st["series"])
        assert outcomes == [(1, "done", "skipped"), (1, "done", "skipped"), (6, "done", "done"),
                            (6, "done", "skipped"), (28, "done", "done")], outcomes
        for r in st["series"]:
            if r["job"]["outcome"] == "skipped":
                assert r["job"]["error"].startswith("not selected: default: basic statistics are kept for a "
                                                    "derived secondary image (ImageType DERIVED\\SECONDARY"), r
                assert r["selection"] == [{"model": "basic", "selected": True, "rule": "default: derived reformat",
                                           "reason": r["job"]["error"].removeprefix("not selected: ")}]
        for f in phantom:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            np.testing.assert_array_equal(pydicom.dcmread(stored[uid]).pixel_array, pydicom.dcmread(f).pixel_array)
        hu = {}
        for f in wg04:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            got = pydicom.dcmread(stored[ds.SOPInstanceUID], stop_before_pixels=True)
            assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID, \
                f"{f.name} arrived as {got.file_meta.TransferSyntaxUID}, not in its own syntax"
            hu[f.name] = load_series([stored[ds.SOPInstanceUID]]).hu[0]
        for ct in ("CT1", "CT2"):
            for ts in ("RLE", "JPLL", "JLSL", "J2KR"):
                np.testing.assert_array_equal(hu[f"{ct}_{ts}"], hu[f"{ct}_UNC"], err_msg=f"{ct}_{ts}")
    finally:
        node.stop()


def test_dcmsend_one_context_per_encoding_each_file_stored_as_sent(tmp_path):
    """DCMTK dcmsend proposes one presentation context per encoding of its input files ([JPEG
    Lossless, Explicit VR LE], [RLE, Explicit VR LE], ...). The node accepts each context's first
    syntax, so every WG04 file arrives in its own encoding (dcmsend converts nothing) and is stored
    with its pixel data as compressed by its writer (DCMTK re-encodes the rest of the dataset on
    sending); pynetdicom alone would pick Explicit VR LE for every context of the SOP class."""
    import shutil

    exe = shutil.which("dcmsend") or pytest.skip("dcmsend (DCMTK) not installed")
    files = [p for p in dicom_files(require(WG04)) if p.name.startswith("CT1_")]
    node = NodeProcess(write_config(tmp_path / "config.toml", data_dir=tmp_path / "var", stable_age_s=600), tmp_path)
    node.start()
    try:
        out = subprocess.run([exe, "-v", "-aet", "CT1", "-aec", "CTQA", "127.0.0.1", str(node.port), *map(str, files)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Converting transfer syntax" not in out.stdout + out.stderr
        stored = stored_by_uid(node)
        syntaxes = set()
        for f in files:
            src = pydicom.dcmread(f)
            kept = pydicom.dcmread(stored[str(src.SOPInstanceUID)])
            assert kept.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID, f.name
            assert kept.PixelData == src.PixelData, f.name  # the same (compressed) pixel bytes
            syntaxes.add(str(src.file_meta.TransferSyntaxUID))
        assert len(syntaxes) >= 5  # uncompressed, RLE, JPEG Lossless, JPEG-LS, JPEG 2000 ...
    finally:
        node.stop()
