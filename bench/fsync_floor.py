"""The floor a durable C-STORE puts under one association: the per-slice cost of making a received
file durable on this disk, beside the minimal pynetdicom SCP's per-slice time (bench/ingest.py).

Each slice of the series (by default the shared 140-slice Philips series) is written to a spool file
in 16 KiB writes (the PDV size storescu sends), then, per variant:

* ``spool``: removed again (what the minimal pynetdicom SCP does; no durability);
* ``node``: fdatasync of the file, rename into its series folder, fsync of the folder (the node's
  order: the file's flush starts at completion, the folder's after the rename; here one after the
  other, so this is the sum, not the overlapped wall-clock time);
* ``writeback``: as ``node``, with sync_file_range(SYNC_FILE_RANGE_WRITE) started on every 256 KiB
  written (the device write begins while the data still arrives; fdatasync then waits for the rest);
* ``rename_first``: rename, then fdatasync of the file and fsync of the folder;
* ``after_writeback``: only what must follow a dataset's last byte in any order that keeps the
  node's durability, at best: the data already on the device (written and waited for beforehand,
  untimed, as if written back while it arrived), then fdatasync, rename and the folder's fsync
  (the journal commits that make the file's size and its name durable).

Prints the median and mean ms per slice of each, the durable cost over ``spool``, and with
``--minimal`` (default) the minimal SCP's ms per slice on the same series and what 0.9 of it leaves
for everything the node does beyond it.

    .venv/bin/python bench/fsync_floor.py [--series FOLDER] [--rounds 3] [--no-minimal]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import ingest as bench  # noqa: E402

PDV = 16384
WRITEBACK_EVERY = 256 << 10
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # wait before, write, wait after: the range is on the device
_libc = ctypes.CDLL(None, use_errno=True)
_sfr = _libc.sync_file_range
_sfr.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _write(path: Path, data: bytes, writeback: bool) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    view, done, started = memoryview(data), 0, 0
    while done < len(data):
        done += os.write(fd, view[done:done + PDV])
        if writeback and done - started >= WRITEBACK_EVERY:
            _sfr(fd, started, done - started, SYNC_FILE_RANGE_WRITE)
            started = done
    return fd


def one(variant: str, data: bytes, spool: Path, folder: Path, i: int) -> float:
    src, dst = spool / f"in-{i}.dcm", folder / f"{i}.dcm"
    if variant == "after_writeback":
        fd = _write(src, data, False)
        _sfr(fd, 0, 0, SYNC_FILE_RANGE_ALL)
    t0 = time.perf_counter()
    if variant != "after_writeback":
        fd = _write(src, data, variant == "writeback")
    if variant == "spool":
        os.close(fd)
        os.unlink(src)
    elif variant == "rename_first":
        os.rename(src, dst)
        os.fdatasync(fd)
        os.close(fd)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    else:
        os.fdatasync(fd)
        os.close(fd)
        os.rename(src, dst)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    return time.perf_counter() - t0


VARIANTS = ("spool", "node", "writeback", "rename_first", "after_writeback")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=bench.SHARED_SERIES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-minimal", action="store_true", help="do not time the minimal pynetdicom SCP")
    args = ap.parse_args()
    files = sorted(p for p in args.series.iterdir() if p.is_file() and p.name not in ("LICENSE", "README.md"))
    blobs = [f.read_bytes() for f in files]
    n = len(blobs)
    print(f"series: {args.series} ({n} files, mean {sum(map(len, blobs)) / n / 1e3:.0f} kB); {bench.load_note()}")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    minimal: list[float] = []
    base = REPO / "var" if (REPO / "var").exists() else None
    with tempfile.TemporaryDirectory(prefix="ctqa-fsync-", dir=base) as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            for v in VARIANTS:  # rotation: the same disk state for each
                spool, folder = work / f"{v}{r}-spool", work / f"{v}{r}-store"
                spool.mkdir()
                folder.mkdir()
                times[v] += [one(v, b, spool, folder, i) for i, b in enumerate(blobs)]
            if not args.no_minimal:
                minimal.append(1e3 / bench.run_minimal_pynetdicom(args.series, work, n))
            print(f"round {r + 1}: " + "  ".join(f"{v} {1e3 * statistics.median(times[v][-n:]):.2f}" for v in VARIANTS)
                  + " ms/slice (median)" + (f"; minimal SCP {minimal[-1]:.2f} ms/slice" if minimal else "")
                  + f"  ({bench.load_note()})", flush=True)
    spool_ms = 1e3 * statistics.median(times["spool"])
    for v in VARIANTS:
        med, mean = 1e3 * statistics.median(times[v]), 1e3 * statistics.fmean(times[v])
        extra = "" if v in ("spool", "after_writeback") else f"; over spool: {med - spool_ms:.2f} median"
        print(f"{v:13s} median {med:.2f}  mean {mean:.2f}  p90 {1e3 * statistics.quantiles(times[v], n=10)[-1]:.2f} "
              f"ms/slice{extra}")
    if minimal:
        m = statistics.median(minimal)
        print(f"minimal pynetdicom SCP: {m:.2f} ms/slice ({1e3 / m:.0f} slices/s, median of {len(minimal)}); "
              f"0.9 of it is {m / 0.9:.2f} ms/slice: {m / 0.9 - m:.2f} ms per slice for all the node does beyond it")
        best = min(VARIANTS[1:4], key=lambda v: statistics.median(times[v]))
        print(f"cheapest durable write ({best}) over spool: {1e3 * statistics.median(times[best]) - spool_ms:.2f} ms/slice; "
              f"after the last byte at best (after_writeback): {1e3 * statistics.median(times['after_writeback']):.2f} ms/slice")
    print(f"after: {bench.load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
