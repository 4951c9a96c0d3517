"""Load with faults: 10 series pushed concurrently while the PACS flaps and the node is killed once.

- the node: `qa-node serve` (a subprocess, SQLite, models `basic`) with one destination, a local
  Orthanc on loopback started by this script;
- 10 scanners-to-be (pynetdicom SCUs, one association per series, each in its own thread) push at
  once: the shared 140-slice phantom, the shared 28-slice phantom, two small real series of the
  corpus, and six copies of the 140-slice phantom as other studies (new Study / Series / SOP Instance
  / Frame of Reference UIDs, everything else as the scanner wrote it). Like a scanner, an SCU whose
  association fails reconnects and sends again what was not acknowledged;
- the PACS flaps: Orthanc is stopped and restarted every few seconds until the pushes are done;
- the node is killed once with SIGKILL when about a third of the instances are acknowledged, and
  restarted at once (same data folder, same port).

Printed: instances acknowledged (Success over the wire) vs stored (indexed, file present, SHA-256 as
indexed): every acknowledged instance must be stored (exit 1 otherwise); outputs made vs delivered
(sent per the outbox, and counted in Orthanc); the node's peak RSS next to its RSS when idle after
start (the reference).

The same run without faults (no kill, PACS steady) goes first as the reference: its push and settle
times and peak RSS are printed beside those of the run with faults.

    .venv/bin/python bench/load.py [--copies 6] [--kill-at 0.35] [--flap-s 4] [--stable-age-s 30]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.orthanc import LocalOrthanc  # noqa: E402
from tests.helpers import (PHANTOM_1MM, PHANTOM_5MM, SHARED_DATA, NodeProcess, free_port,  # noqa: E402
                           pacs_destination, qa_node, write_config)

CORPUS_SERIES = ("dcmqi/GE_LightSpeedUltra_3slice", "dicom2nifti/GE_LightSpeed16_sliceincrement")
N_SERIES = 10


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("LICENSE", "README.md"))


def copy_as_other_study(src: list[Path], dst: Path, n: int) -> list[Path]:
    """The series as study ``n`` of another patient visit: new UIDs, same pixels and headers."""
    dst.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i, f in enumerate(src):
        ds = pydicom.dcmread(f)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = frame
        ds.SeriesNumber = 100 + n
        p = dst / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


class Rss:
    """Samples the RSS of whichever node process runs (VmRSS every 50 ms, and VmHWM)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.peak_kb = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def read(self, field: str = "VmRSS") -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, TypeError, ValueError):
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.pid:
                self.peak_kb = max(self.peak_kb, self.read("VmRSS"), self.read("VmHWM"))
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()


class Pusher(threading.Thread):
    """One series over pynetdicom, re-associating and re-sending what was not acknowledged."""

    def __init__(self, name: str, files: list[Path], port: int, acked: dict, lock: threading.Lock,
                 deadline: float) -> None:
        super().__init__(name=name, daemon=True)
        self.files, self.port, self.acked, self.lock, self.deadline = files, port, acked, lock, deadline
        self.refused: dict[str, int] = {}
        self.associations = 0
        self.failures = 0

    def run(self) -> None:
        from pynetdicom import AE

        meta = [pydicom.dcmread(f, stop_before_pixels=True) for f in self.files]
        pending = list(zip(self.files, meta))
        ae = AE(ae_title="CT1")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for ctx in {(str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID)) for _, m in pending}:
            ae.add_requested_context(*ctx)
        while pending and time.monotonic() < self.deadline:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="CTQA")
            if not assoc.is_established:
                time.sleep(0.3)
                continue
            self.associations += 1
            left = []
            for i, (f, m) in enumerate(pending):
                if not assoc.is_established:
                    left.extend(pending[i:])
                    break
                rsp = assoc.send_c_store(f)
                status = int(rsp.Status) if "Status" in rsp else None
                uid = str(m.SOPInstanceUID)
                if status == 0x0000:
                    with self.lock:
                        self.acked[uid] = self.name
                elif status is None or status == 0xA700:  # no answer (node gone) or out of resources: again
                    self.failures += 1
                    left.append((f, m))
                else:
                    self.refused[uid] = status  # a refusal of the data itself: not sent again
            if assoc.is_established:
                assoc.release()
            pending = left
            if pending:
                time.sleep(0.3)


def stored_instances(db: Path, data: Path) -> tuple[set[str], list[str]]:
    """SOP Instance UIDs indexed whose file is present with the indexed SHA-256; and the bad ones."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select sop_instance_uid, rel_path, sha256 from instances").fetchall()
    finally:
        con.close()
    ok, bad = set(), []
    for uid, rel, sha in rows:
        p = data / rel
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha:
            ok.add(uid)
        else:
            bad.append(uid)
    return ok, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=6, help="copies of the 140-slice phantom as other studies")
    ap.add_argument("--kill-at", type=float, default=0.35, help="SIGKILL the node at this fraction acknowledged")
    ap.add_argument("--flap-s", type=float, default=4.0, help="PACS down for this long, then up as long")
    ap.add_argument("--stable-age-s", type=float, default=30.0, help="the node's node.stable_age_s")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    args = ap.parse_args()

    for p in (PHANTOM_1MM, PHANTOM_5MM, *(SHARED_DATA / "corpus" / c for c in CORPUS_SERIES)):
        if not p.exists():
            print(f"shared data {p} is absent", file=sys.stderr)
            return 2
    if shutil.which("Orthanc") is None:
        print("Orthanc not installed (apt-get install orthanc)", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below
    work = Path(tempfile.mkdtemp(prefix="ctqa-load-"))
    series = {"S2020_1mm": dicom_files(PHANTOM_1MM), "S2010_5mm": dicom_files(PHANTOM_5MM)}
    for c in CORPUS_SERIES:
        series[c.split("/")[1]] = dicom_files(SHARED_DATA / "corpus" / c)
    for n in range(args.copies):
        series[f"S2020_copy{n + 1}"] = copy_as_other_study(series["S2020_1mm"], work / "copies" / str(n), n)
    total = sum(len(v) for v in series.values())
    print(f"{len(series)} series, {total} instances "
          f"({sum(f.stat().st_size for v in series.values() for f in v) / 2**20:.0f} MiB), pushed at once")
    try:
        ref = run(work / "reference", series, args, faults=False)
        print(f"reference (no faults): pushed in {ref['push_s']:.1f} s ({total / ref['push_s']:.0f} instances/s), "
              f"settled {ref['settle_s']:.1f} s later; acknowledged {ref['acked']}, stored {ref['stored']}; "
              f"analysis jobs {ref['jobs']}; outputs made {ref['outputs']}, delivered {ref['sent']}; node peak RSS "
              f"{ref['peak_mb']:.0f} MB ({ref['push_peak_mb']:.0f} MB while receiving)")
        res = run(work / "faults", series, args, faults=True)
    finally:
        if args.keep:
            print(f"working folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"with faults: pushed in {res['push_s']:.1f} s ({total / res['push_s']:.0f} instances/s, "
          f"ratio to the reference {ref['push_s'] / res['push_s']:.2f}), settled {res['settle_s']:.1f} s later "
          f"(reference {ref['settle_s']:.1f} s)")
    print(f"  associations: {res['associations']} (re-sends after a failure: {res['resends']}); node SIGKILLed "
          f"once at {res['killed_at']} acknowledged and restarted; PACS stopped and restarted {res['flaps']}x")
    print(f"  instances acknowledged {res['acked']}, stored {res['stored']} (refused by the node: "
          f"{res['refused']}; acknowledged but not stored: {res['lost']}; indexed with a missing or changed "
          f"file: {res['bad']})")
    if res["reconcile"]:
        print("  at the restart: " + res["reconcile"])
    print(f"  analysis jobs: {res['jobs']}")
    print(f"  outputs made {res['outputs']}, delivered {res['sent']} (dead {res['dead']}; instances in the "
          f"PACS: {res['in_pacs']})")
    print(f"  node peak RSS {res['peak_mb']:.0f} MB (reference {ref['peak_mb']:.0f} MB, ratio "
          f"{res['peak_mb'] / max(ref['peak_mb'], 1):.2f}); while receiving {res['push_peak_mb']:.0f} MB "
          f"(reference {ref['push_peak_mb']:.0f} MB); idle after start {res['idle_mb']:.0f} MB")
    ok = res["lost"] == 0 and res["bad"] == 0 and res["acked"] == res["stored"] and res["sent"] == res["outputs"]
    return 0 if ok else 1


def run(work: Path, series: dict[str, list[Path]], args, *, faults: bool) -> dict:
    total = sum(len(v) for v in series.values())
    node_port = free_port()
    pacs = LocalOrthanc(known_aes={"CTQA": ("127.0.0.1", node_port)}, workdir=work / "orthanc").start()
    data = work / "var"
    cfg = write_config(
        work / "config.toml", data_dir=data, port=node_port, stable_age_s=args.stable_age_s,
        extra=pacs_destination(pacs.dicom_port, ae_title=pacs.ae_title, retry_max_s=4, poll_s=1))
    node = NodeProcess(cfg, work)
    rss = Rss()
    try:
        return _run(work, series, args, faults, total, node_port, pacs, data, cfg, node, rss)
    finally:  # whatever happens (an error, SIGTERM), no node or Orthanc is left running
        if node.proc is not None:
            node.stop(signal.SIGKILL)
        pacs.cleanup()
        rss.stop()


def _run(work, series, args, faults, total, node_port, pacs, data, cfg, node, rss) -> dict:
    node.start()
    rss.pid = node.proc.pid
    time.sleep(1.0)
    idle_kb = rss.read("VmRSS")

    acked: dict[str, str] = {}
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    pushers = [Pusher(name, files, node_port, acked, lock, deadline) for name, files in series.items()]
    pushing = threading.Event()
    pushing.set()
    flaps = [0]

    def flap() -> None:
        while pushing.is_set():
            time.sleep(args.flap_s)
            pacs.stop()
            flaps[0] += 1
            time.sleep(args.flap_s)
            pacs.start()

    flapper = threading.Thread(target=flap, daemon=True)
    for p in pushers:
        p.start()
    if faults:
        flapper.start()

    killed_at = None
    while any(p.is_alive() for p in pushers):
        if faults and killed_at is None and len(acked) >= args.kill_at * total:
            killed_at = len(acked)
            node.stop(signal.SIGKILL)
            node.start()
            rss.pid = node.proc.pid
        time.sleep(0.02)
    push_s = time.monotonic() - t0
    pushing.clear()
    if faults:
        flapper.join()
    if pacs.proc is None:
        pacs.start()

    def outbox() -> list[dict]:
        r = qa_node("--config", str(cfg), "outbox", "--json", cwd=work)
        return json.loads(r.stdout) if r.returncode == 0 else []

    def status() -> dict:
        r = qa_node("--config", str(cfg), "status", "--json", cwd=work)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    push_peak_kb = rss.peak_kb
    # Let the node finish: every series analysed, every output delivered (or the timeout).
    while time.monotonic() < deadline:
        rows = status().get("series", [])
        finished = [r for r in rows if r["state"] == "complete" and r["job"]
                    and r["job"]["state"] in ("done", "failed")]
        ob = outbox()
        if len(finished) >= len(series) and all(d["state"] in ("sent", "dead") for d in ob):
            break
        time.sleep(1.0)
    settle_s = time.monotonic() - t0 - push_s

    ok, bad = stored_instances(data / "ctqa.sqlite", data)
    ob = outbox()
    jobs = status().get("jobs", {})
    reconcile = [ln.split("start-up reconciliation: ", 1)[-1] for ln in node.log().splitlines()
                 if "reconciliation" in ln]
    in_pacs = pacs.get("/statistics").get("CountInstances")
    node.stop()
    return {
        "push_s": push_s, "settle_s": settle_s, "acked": len(acked), "stored": len(ok),
        "lost": len(set(acked) - ok), "bad": len(bad), "refused": sum(len(p.refused) for p in pushers),
        "associations": sum(p.associations for p in pushers), "resends": sum(p.failures for p in pushers),
        "killed_at": killed_at, "flaps": flaps[0], "reconcile": reconcile[0] if reconcile else "",
        "jobs": ", ".join(f"{k} {v}" for k, v in sorted(jobs.items())), "outputs": len(ob),
        "sent": sum(1 for d in ob if d["state"] == "sent"), "dead": sum(1 for d in ob if d["state"] == "dead"),
        "in_pacs": in_pacs, "peak_mb": rss.peak_kb / 1024, "idle_mb": idle_kb / 1024,
        "push_peak_mb": push_peak_kb / 1024,
    }


if __name__ == "__main__":
    raise SystemExit(main())
