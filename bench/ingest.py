"""Ingest throughput: DCMTK storescu pushing one series (by default the shared 140-slice Philips
series, ../shared/data/ct/philips_head_phantom/S2020_1mm_std; ``--slices N`` makes a synthetic
512x512 series instead) on one association to (a) DCMTK storescp, (b) `qa-node serve` with full
durability (the file's data flushed, fdatasync, and its folder fsynced after the rename, both
before Success; a series' first index row committed durably, later rows group-committed: README,
C-STORE statuses) and (d) Orthanc, the PACS a site
would otherwise point its scanners at (its storage area synced, ``SyncStorageArea``).

Rounds alternate the receivers (storescp, Orthanc, minimal pynetdicom, the same with fsync, node); prints slices/s per
round, the medians and the ratios.
Targets: qa-node >= Orthanc and >= 0.9 of the minimal pynetdicom SCP. TCP_NODELAY=1 is set for
DCMTK everywhere, Orthanc included (DCMTK leaves Nagle on, and Orthanc's DICOM side is DCMTK: without
it each PDU waits for the delayed ACK and Orthanc stalls at ~20 slices/s; Orthanc's own
``TcpNoDelay`` option is for its HTTP server only).

A third receiver, (c) a minimal pynetdicom SCP in the node's configuration (chunked receive,
TCP_NODELAY, 1 MiB max PDU, 0.1 ms DUL loop delay) whose C-STORE handler only deletes the spooled file,
is timed in the same rotation: it is the ceiling that pynetdicom itself puts on any node built on it,
before header parsing, hashing, fsync and the index. The same SCP with the node's durability and
nothing else (``minimal_durable``: its handler fdatasyncs the spooled file, renames it into one folder
and fsyncs that folder before Success) separates what the disk costs from what the node's own work
costs: qa-node / minimal pynetdicom + fsync is the node's overhead at equal durability.

``--associations K`` (K >= 2) splits the series into K parts pushed at once, one storescu
association each (a PACS forwarding, or several scanners): slices/s is all K parts over the wall
time of the last to finish. storescp then forks per association (``--fork``); the node is timed
twice, as configured by default (``node``: node.receivers = 1, every association a thread of one
process) and with ``node.receivers = K`` (``node_procs``: one receiving process per association).

    .venv/bin/python bench/ingest.py [--series FOLDER | --slices N] [--runs 3] [--associations K]
                                     [--only storescp,orthanc,minimal,minimal_durable,node,node_procs]
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

from tests.helpers import PHANTOM_1MM, NodeProcess, free_port, write_config  # noqa: E402


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


PARTS: list[Path] = []  # --associations K: the series split into K folders (links), pushed at once


def push(port: int, folder: Path, called: str) -> float:
    """Wall time of one storescu association pushing ``folder``, or with ``PARTS`` set of one
    association per part, all started at once (until the last one is done)."""
    env = dict(os.environ, TCP_NODELAY="1")
    folders = PARTS or [folder]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "CT1", "-aec", called, "+sd", "-nh", "127.0.0.1", str(port), str(f)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for f in folders]
    outs = [p.communicate() for p in procs]
    dt = time.perf_counter() - t0
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err[-500:]}")
    return dt


def split_series(series: Path, work: Path, k: int) -> list[Path]:
    files = sorted(p for p in series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    parts = []
    for i in range(k):
        part = work / f"part{i + 1}"
        part.mkdir()
        for f in files[i::k]:
            (part / f.name).symlink_to(f.resolve())
        parts.append(part)
    return parts


def wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def settle(pid: int, timeout: float = 30.0) -> None:
    """Wait until a freshly started receiver is idle (its start-up work, e.g. the node's imports and
    worker start, would otherwise compete with the first push): < 20 ms of CPU in 0.5 s."""
    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    deadline = time.monotonic() + timeout
    last = cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu()
        if now - last < 0.02:
            return
        last = now


def run_storescp(folder: Path, work: Path, n: int) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    fork = ["--fork"] if PARTS else []  # one process per association (storescp serves one at a time)
    proc = subprocess.Popen(["storescp", *fork, "-aet", "STORESCP", "--max-pdu", "131072", "-od", str(out), str(port)],
                            env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        settle(proc.pid)
        dt = push(port, folder, "STORESCP")
    finally:
        proc.terminate()
        proc.wait()
    if PARTS:  # (the forked children may still be writing their last files)
        time.sleep(0.5)
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
STORE = sys.argv[3] if len(sys.argv) > 3 else None
def on_store(event):
    path = event.dataset_path
    if STORE is None:  # the ceiling: nothing kept
        os.unlink(path)
        return 0x0000
    # the node's durability and nothing else: the file's data, its rename, its folder, before Success
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.close(fd)
    os.rename(path, os.path.join(STORE, path.name))
    fd = os.open(STORE, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
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


def run_minimal_pynetdicom(folder: Path, work: Path, n: int, durable: bool = False) -> float:
    spool, store = work / "minimal-spool", work / "minimal-store"
    for d in (spool, store):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
    argv = [sys.executable, "-c", MINIMAL_SCP, "", str(spool)] + ([str(store)] if durable else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        settle(proc.pid)
        dt = push(port, folder, "MINIMAL")
    finally:
        proc.stdin.close()
        proc.wait(30)
    if durable:
        kept = sum(1 for _ in store.iterdir())
        assert kept == n, f"the durable minimal SCP kept {kept} of {n} slices"
    return n / dt


def run_minimal_durable(folder: Path, work: Path, n: int) -> float:
    return run_minimal_pynetdicom(folder, work, n, durable=True)


def run_orthanc(folder: Path, work: Path, n: int) -> float:
    from node.orthanc import LocalOrthanc

    class BenchOrthanc(LocalOrthanc):
        def _plain_config(self) -> dict:
            cfg = super()._plain_config()
            # durability like the node's: every stored file synced before the C-STORE response
            # (SyncStorageArea, set explicitly); its index is SQLite with Orthanc's defaults
            cfg.update({"SyncStorageArea": True, "StorageCompression": False})
            return cfg

    odir = work / "orthanc"
    shutil.rmtree(odir, ignore_errors=True)
    odir.mkdir()
    os.environ["TCP_NODELAY"] = "1"  # inherited by Orthanc: its DICOM server is DCMTK
    orthanc = BenchOrthanc(workdir=odir, known_aes={"CT1": ("127.0.0.1", free_port())})
    orthanc.start()
    try:
        settle(orthanc.proc.pid)
        dt = push(orthanc.dicom_port, folder, "ORTHANC")
        stored = orthanc.get("/statistics")["CountInstances"]
    finally:
        orthanc.stop()
    assert stored == n, f"Orthanc stored {stored} of {n} slices"
    return n / dt


def run_node(folder: Path, work: Path, n: int, receivers: int = 1) -> float:
    node_dir = work / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    node_dir.mkdir()
    # stable age long enough that analysis does not compete with the receive
    cfg = write_config(node_dir / "config.toml", data_dir=node_dir / "var", stable_age_s=600)
    if receivers != 1:
        cfg.write_text(cfg.read_text().replace("[node]\n", f"[node]\nreceivers = {receivers}\n", 1))
    proc = NodeProcess(cfg, node_dir)
    proc.start()
    try:
        settle(proc.proc.pid)
        for child in _children(proc.proc.pid):
            settle(child)
        dt = push(proc.port, folder, "CTQA")
    finally:
        proc.stop()
    assert len(list((node_dir / "var" / "store").rglob("*.dcm"))) == n, "node did not store every slice"
    return n / dt


def run_node_procs(folder: Path, work: Path, n: int) -> float:
    return run_node(folder, work, n, receivers=max(2, len(PARTS)))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


SHARED_SERIES = PHANTOM_1MM  # (bench/ingest_breakdown.py's default too)
RECEIVERS = {"storescp": run_storescp, "orthanc": run_orthanc, "minimal": run_minimal_pynetdicom,
             "minimal_durable": run_minimal_durable, "node": run_node, "node_procs": run_node_procs}
LABELS = {"storescp": "storescp", "node": "qa-node", "minimal": "minimal pynetdicom", "orthanc": "Orthanc",
          "minimal_durable": "minimal pynetdicom + fsync", "node_procs": "qa-node receivers=K"}
# the default rotation on one association
ONE_ASSOCIATION = ("storescp", "orthanc", "minimal", "minimal_durable", "node")


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=None,
                    help=f"folder of one series to push (default: {SHARED_SERIES} when present)")
    ap.add_argument("--slices", type=int, default=None, help="push a synthetic series of N 512x512 slices instead")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--associations", type=int, default=1,
                    help="push the series split over K associations at once (default 1)")
    ap.add_argument("--only", default=None,
                    help="comma-separated receivers in rotation order: " + ", ".join(RECEIVERS)
                    + f" (default {','.join(ONE_ASSOCIATION)}; with --associations K >= 2 node_procs too)")
    args = ap.parse_args()
    if args.associations < 1:
        print("--associations must be >= 1", file=sys.stderr)
        return 2
    default = ",".join(ONE_ASSOCIATION) + (",node_procs" if args.associations > 1 else "")
    only = [x.strip() for x in (args.only or default).split(",") if x.strip()]
    for x in only:
        if x not in RECEIVERS:
            print(f"unknown receiver {x!r}; known: {', '.join(RECEIVERS)}", file=sys.stderr)
            return 2
    tools = ["storescu"] + (["storescp"] if "storescp" in only else []) + (["Orthanc"] if "orthanc" in only else [])
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install {'orthanc' if tool == 'Orthanc' else 'dcmtk'}", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="ctqa-bench-", dir=REPO / "var" if (REPO / "var").exists() else None) as tmp:
        work = Path(tmp)
        if args.slices is None and (args.series or SHARED_SERIES).is_dir():
            series = args.series or SHARED_SERIES
            n = sum(1 for p in series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
            what = f"{series} ({n} files)"
        else:
            series = work / "series"
            series.mkdir()
            n = args.slices or 300
            make_series(series, n)
            what = f"synthetic {n} slices 512x512"
        if args.associations > 1:
            PARTS[:] = split_series(series, work, args.associations)
        how = "one association" if args.associations == 1 else f"{args.associations} associations at once"
        print(f"series: {what}; {how} per round; {load_note()}")
        figures: dict[str, list[float]] = {x: [] for x in only}
        for i in range(args.runs):
            for x in only:
                figures[x].append(RECEIVERS[x](series, work, n))
            print(f"round {i + 1}: " + "   ".join(f"{LABELS[x]} {figures[x][-1]:7.1f}" for x in only)
                  + f" slices/s   ({load_note()})")
        med = {x: statistics.median(v) for x, v in figures.items()}
        print("median slices/s: " + ", ".join(f"{LABELS[x]} {med[x]:.1f}" for x in only))
        for node in ("node", "node_procs"):
            if node not in med:
                continue
            for ref, target in (("orthanc", 1.0), ("minimal", 0.9), ("minimal_durable", None), ("storescp", None)):
                if ref in med:
                    goal = f" (target >= {target})" if target else ""
                    print(f"{LABELS[node]} / {LABELS[ref]}: {med[node] / med[ref]:.2f}{goal}")
        if "node" in med and "node_procs" in med:
            print(f"{LABELS['node_procs']} / {LABELS['node']}: {med['node_procs'] / med['node']:.2f}")
        print(f"after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
