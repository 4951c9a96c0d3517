"""Ingest throughput: DCMTK storescu pushing a 300-slice 512x512 series to (a) DCMTK storescp and
(b) `qa-node serve` with full durability (fsync + atomic rename + database row before Success).

Three runs each, alternating; prints slices/s per run, the medians and the ratio node/storescp.
Target: ratio >= 0.5. TCP_NODELAY=1 is set for DCMTK on both ends (DCMTK leaves Nagle on).

A third receiver, (c) a minimal pynetdicom SCP in the node's configuration (chunked receive,
TCP_NODELAY, 1 MiB max PDU, 0.1 ms DUL loop delay) whose C-STORE handler only deletes the spooled file,
is timed in the same rotation: it is the ceiling that pynetdicom itself puts on any node built on it,
before header parsing, hashing, fsync and the index.

    .venv/bin/python bench/ingest.py [--slices 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import NodeProcess, free_port, write_config  # noqa: E402


def make_series(folder: Path, n: int, size: int = 512) -> None:
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    for i in range(n):
        img = np.where(body, 1024 + 40, 24) + rng.normal(0, 12, (size, size))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "Bench^Phantom", "BENCH"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-125.0, -125.0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.49, 0.49]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        ds.save_as(folder / f"CT{i:04d}.dcm", enforce_file_format=True)


def push(port: int, folder: Path, called: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "CT1", "-aec", called, "+sd", "-nh", "127.0.0.1", str(port), str(folder)],
                       capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    return dt


def run_storescp(folder: Path, work: Path, n: int) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "--max-pdu", "131072", "-od", str(out), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        dt = push(port, folder, "STORESCP")
    finally:
        proc.terminate()
        proc.wait()
    assert len(list(out.iterdir())) == n, "storescp did not store every slice"
    return n / dt


MINIMAL_SCP = r"""
import os, socket, sys, tempfile
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage
_config.STORE_RECV_CHUNKED_DATASET = True
tempfile.tempdir = sys.argv[2]
def on_open(event):
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    event.assoc.dul._run_loop_delay = 0.0001
def on_store(event):
    os.unlink(event.dataset_path)
    return 0x0000
ae = AE(ae_title="MINIMAL")
ae.maximum_pdu_size = 1048576
ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
server = ae.start_server(("127.0.0.1", 0), block=False,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_C_STORE, on_store)])
print(server.server_address[1], flush=True)
sys.stdin.read()
server.shutdown()
"""


def run_minimal_pynetdicom(folder: Path, work: Path, n: int) -> float:
    spool = work / "minimal-spool"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", MINIMAL_SCP, "", str(spool)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        dt = push(port, folder, "MINIMAL")
    finally:
        proc.stdin.close()
        proc.wait(30)
    return n / dt


def run_node(folder: Path, work: Path, n: int) -> float:
    node_dir = work / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    node_dir.mkdir()
    # stable age long enough that analysis does not compete with the receive
    cfg = write_config(node_dir / "config.toml", data_dir=node_dir / "var", stable_age_s=600)
    proc = NodeProcess(cfg, node_dir)
    proc.start()
    try:
        dt = push(proc.port, folder, "CTQA")
    finally:
        proc.stop()
    assert len(list((node_dir / "var" / "store").rglob("*.dcm"))) == n, "node did not store every slice"
    return n / dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ctqa-bench-", dir=REPO / "var" if (REPO / "var").exists() else None) as tmp:
        work = Path(tmp)
        series = work / "series"
        series.mkdir()
        make_series(series, args.slices)
        ref, ours, minimal = [], [], []
        for i in range(args.runs):
            ref.append(run_storescp(series, work, args.slices))
            ours.append(run_node(series, work, args.slices))
            minimal.append(run_minimal_pynetdicom(series, work, args.slices))
            print(f"run {i + 1}: storescp {ref[-1]:7.1f} slices/s   qa-node {ours[-1]:7.1f} slices/s   "
                  f"minimal pynetdicom {minimal[-1]:7.1f} slices/s")
        r, o, m = statistics.median(ref), statistics.median(ours), statistics.median(minimal)
        print(f"median: storescp {r:.1f} slices/s, qa-node (durable) {o:.1f} slices/s, ratio {o / r:.2f} "
              f"(target >= 0.5)")
        print(f"reference: minimal pynetdicom SCP (no durability) {m:.1f} slices/s, ratio to storescp "
              f"{m / r:.2f}; qa-node reaches {o / m:.2f} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
