"""Does receiving slow down while the node analyses? DCMTK storescu pushes a 140-slice series (a copy
of the shared 1 mm phantom as another study) to `qa-node serve` while the node analyses another
series, with the one analysis worker

- ``thread``: the worker a thread of the serve process: `analysis.workers = 1` run from ``--thread-tree``,
  a checkout of the node from before its one worker became a process (e.g. ``git archive ecd3af6``:
  `serve` then imports that tree through PYTHONPATH), or
- ``process``: `analysis.workers = 0` and one `qa-node worker --workers 1` process beside it (what
  `analysis.workers = 1` does now),

and, as the reference, ``idle``: the same push with nothing being analysed. Per round the modes
alternate; each starts a fresh node, pushes the series to analyse (the 1 mm phantom), waits until its
job runs, then times the second push and checks that the analysis was still running when the push
ended (a push that outlasted the analysis is reported, not counted), and waits for that analysis to
finish (its job's seconds from claim to finish: is the analysis slower in one mode?). Prints slices/s
per round, the medians, the ratios thread/idle, process/idle and process/thread, and the analysis
seconds.

    git archive ecd3af6 | tar -x -C /tmp/thread-tree
    .venv/bin/python bench/ingest_while_analysing.py --thread-tree /tmp/thread-tree [--runs 3]
                                                     [--models basic,classical,n2q,d2iqa]
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

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import PHANTOM_1MM, NodeProcess, node_sql, wait_until, write_config  # noqa: E402

MODES = ("idle", "thread", "process")


def copy_as_other_study(src: Path, out: Path) -> int:
    """The series under new Study/Series/SOP UIDs (so it is not a duplicate of the analysed one)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    n = 0
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(out / f.name, enforce_file_format=True)
        n += 1
    return n


def push(port: int, folder: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "CT1", "-aec", "CTQA", "+sd", "-nh", "127.0.0.1", str(port), str(folder)],
                       capture_output=True, text=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    return time.perf_counter() - t0


THREAD_TREE: Path | None = None


def one_round(mode: str, work: Path, analysed: Path, timed: Path, models: str) -> tuple[float, bool, float | None]:
    """(slices/s of the timed push, whether the analysis ran during the whole push, the analysed
    series' job seconds from claim to finish)."""
    node_dir = work / f"node-{mode}"
    shutil.rmtree(node_dir, ignore_errors=True)
    node_dir.mkdir()
    workers = 1 if mode == "thread" else 0
    cfg = write_config(node_dir / "config.toml", data_dir=node_dir / "var", stable_age_s=2.0,
                       models=models, extra=f"workers = {workers}\n")
    node = NodeProcess(cfg, node_dir)
    saved = os.environ.get("PYTHONPATH")
    if mode == "thread":
        os.environ["PYTHONPATH"] = str(THREAD_TREE)
    try:
        port = node.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    worker = None
    try:
        if mode == "process":
            worker = subprocess.Popen([sys.executable, "-m", "node", "--config", str(cfg), "worker", "--workers", "1"],
                                      cwd=node_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)  # imports of the node and the worker done
        running = "SELECT count(*) FROM jobs WHERE state = 'running'"
        if mode != "idle":
            push(port, analysed)
            wait_until(lambda: (node_sql(node, running) or [(0,)])[0][0] == 1, 60, 0.2, "the analysis to start")
            time.sleep(1.0)
        n = len(list(timed.iterdir()))
        dt = push(port, timed)
        during = mode == "idle" or (node_sql(node, running) or [(0,)])[0][0] >= 1
        stored = len(list((node_dir / "var" / "store").rglob("*.dcm")))
        assert stored == n + (0 if mode == "idle" else len(list(analysed.iterdir()))), "not every slice stored"
        job_s = None
        if mode != "idle":
            first = "SELECT state, started_at, finished_at FROM jobs ORDER BY id LIMIT 1"
            wait_until(lambda: (node_sql(node, first) or [("",)])[0][0] in ("done", "failed"), 600, 0.2,
                       "the analysis to finish")
            state, started, finished = node_sql(node, first)[0]
            job_s = (_when(finished) - _when(started)).total_seconds() if state == "done" else None
        return n / dt, during, job_s
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        node.stop()


def _when(text: str):
    from datetime import datetime

    return datetime.fromisoformat(str(text))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", default="basic,classical,n2q,d2iqa",
                    help="models of the analysis running during the push (default basic,classical,n2q,d2iqa)")
    ap.add_argument("--thread-tree", type=Path, required=True,
                    help="a checkout of the node whose analysis.workers = 1 is a thread of serve (e.g. git archive ecd3af6)")
    args = ap.parse_args()
    global THREAD_TREE
    THREAD_TREE = args.thread_tree.resolve()
    if not (THREAD_TREE / "node" / "service.py").is_file():
        print(f"--thread-tree {THREAD_TREE}: not a checkout of the node")
        return 2
    if shutil.which("storescu") is None or not PHANTOM_1MM.is_dir():
        print("needs DCMTK storescu and the shared 1 mm phantom series")
        return 2
    models = "[" + ", ".join(f'"{m}"' for m in args.models.split(",")) + "]"
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    jobs: dict[str, list[float]] = {m: [] for m in MODES[1:]}
    with tempfile.TemporaryDirectory(prefix="ctqa-ingest-busy-") as tmp:
        work = Path(tmp)
        timed = work / "timed"
        copy_as_other_study(PHANTOM_1MM, timed)
        print(f"timed push: {len(list(timed.iterdir()))} slices; analysed meanwhile: {PHANTOM_1MM.name} with {models}; "
              f"load average {load()} on {os.cpu_count()} cores")
        for r in range(args.runs):
            row = []
            for mode in MODES:
                rate, during, job_s = one_round(mode, work, PHANTOM_1MM, timed, models)
                job = f" (its analysis {job_s:.1f} s)" if job_s is not None else ""
                row.append(f"{mode} {rate:6.1f}{'' if during else ' (analysis ended first: not counted)'}{job}")
                if during:
                    rates[mode].append(rate)
                if job_s is not None:
                    jobs[mode].append(job_s)
            print(f"round {r + 1}: " + "   ".join(row) + f" slices/s   (load average {load()})")
    med = {m: statistics.median(v) for m, v in rates.items() if v}
    print("median slices/s: " + ", ".join(f"{m} {v:.1f}" for m, v in med.items()))
    for a, b in (("thread", "idle"), ("process", "idle"), ("process", "thread")):
        if a in med and b in med:
            print(f"{a} / {b}: {med[a] / med[b]:.2f}")
    job_med = {m: statistics.median(v) for m, v in jobs.items() if v}
    if job_med:
        print("median seconds of the analysis that ran meanwhile: " + ", ".join(f"{m} {v:.1f}" for m, v in job_med.items())
              + (f"; process / thread {job_med['process'] / job_med['thread']:.2f}" if len(job_med) == 2 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
