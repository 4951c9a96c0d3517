"""Ingest throughput: DCMTK storescu pushing a 300-slice 512x512 series to (a) DCMTK storescp and
(b) `qa-node serve` with full durability (fsync + atomic rename + database row before Success).

Three runs each, alternating; prints slices/s per run, the medians and the ratio node/storescp.
Target: ratio >= 0.5. TCP_NODELAY=1 is set for DCMTK on both ends (DCMTK leaves Nagle on).

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
        ref, ours = [], []
        for i in range(args.runs):
            ref.append(run_storescp(series, work, args.slices))
            ours.append(run_node(series, work, args.slices))
            print(f"run {i + 1}: storescp {ref[-1]:7.1f} slices/s   qa-node {ours[-1]:7.1f} slices/s")
        r, o = statistics.median(ref), statistics.median(ours)
        print(f"median: storescp {r:.1f} slices/s, qa-node (durable) {o:.1f} slices/s, ratio {o / r:.2f} "
              f"(target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
