"""Throughput of the classical analysis pipeline on one core, beside a bare reference loop.

Full pipeline = ``analysis.volume.load_series`` (read, decode, sort, HU, padding) +
``analysis.classical.run`` (body mask, local-SD map, global noise, WED, SSDE, NPS, tissue HU).
Reference = the bare loop "dcmread + pixel_array + HU + 11x11 local SD (uniform_filter)" per file.

Both run in this one process with every BLAS/OpenMP pool at one thread, interleaved (reference,
pipeline, reference, ...) ``--repeat`` times after one warm-up pass (so the files are in the page
cache); the best (shortest) round of each is reported, as wall time and as CPU time of this process
(the CPU figure is the fairer one on a machine shared with other work). Target: >= 100 slices/s.

    .venv/bin/python bench/analysis.py [--series DIR] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from scipy import ndimage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import classical  # noqa: E402
from analysis.results import RunContext  # noqa: E402
from analysis.volume import load_series  # noqa: E402
from tests.helpers import PHANTOM_1MM  # noqa: E402

TARGET_SLICES_PER_S = 100.0


def reference(paths: list[Path]) -> float:
    """read + decode + HU + 11x11 local SD per file; returns a checksum so nothing is skipped."""
    acc = 0.0
    for p in paths:
        ds = pydicom.dcmread(str(p))
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        m1 = ndimage.uniform_filter(hu, 11)
        m2 = ndimage.uniform_filter(hu * hu, 11)
        acc += float(np.sqrt(np.maximum(m2 - m1 * m1, 0.0)).mean())
    return acc


def pipeline(paths: list[Path]) -> dict:
    vol = load_series(paths)
    out = classical.run(vol, RunContext())
    return out.series_metrics


def _timed(fn, paths):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn(paths)
    return time.perf_counter() - w0, time.process_time() - c0, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=Path, default=PHANTOM_1MM, help="folder with the files of one CT series")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds of each (best is reported)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if not args.series.is_dir():
        print(f"series folder not found: {args.series}", file=sys.stderr)
        return 2
    if args.repeat < 1:
        print(f"--repeat must be >= 1, got {args.repeat}", file=sys.stderr)
        return 2
    paths = sorted(p for p in args.series.iterdir() if p.is_file())
    n = len(paths)

    reference(paths)  # warm-up: page cache, imports, decoder plugins
    metrics = pipeline(paths)
    ref_wall, ref_cpu, full_wall, full_cpu = [], [], [], []
    for _ in range(args.repeat):
        w, c, _ = _timed(reference, paths)
        ref_wall.append(w)
        ref_cpu.append(c)
        w, c, _ = _timed(pipeline, paths)
        full_wall.append(w)
        full_cpu.append(c)

    fig = {
        "series": str(args.series),
        "n_slices": n,
        "repeat": args.repeat,
        "reference_slices_per_s_wall": n / min(ref_wall),
        "reference_slices_per_s_cpu": n / min(ref_cpu),
        "pipeline_slices_per_s_wall": n / min(full_wall),
        "pipeline_slices_per_s_cpu": n / min(full_cpu),
        "target_slices_per_s": TARGET_SLICES_PER_S,
        "series_metrics": metrics,
    }
    fig["ratio_wall"] = fig["pipeline_slices_per_s_wall"] / fig["reference_slices_per_s_wall"]
    fig["ratio_cpu"] = fig["pipeline_slices_per_s_cpu"] / fig["reference_slices_per_s_cpu"]
    print(f"series: {args.series} ({n} slices), best of {args.repeat} rounds, one thread")
    print(f"{'':38s}{'wall':>12s}{'cpu':>12s}")
    print(f"{'reference (read+HU+11x11 local SD)':38s}{fig['reference_slices_per_s_wall']:>9.1f} /s"
          f"{fig['reference_slices_per_s_cpu']:>9.1f} /s")
    print(f"{'classical pipeline (all metrics)':38s}{fig['pipeline_slices_per_s_wall']:>9.1f} /s"
          f"{fig['pipeline_slices_per_s_cpu']:>9.1f} /s")
    print(f"{'ratio pipeline / reference':38s}{fig['ratio_wall']:>12.2f}{fig['ratio_cpu']:>12.2f}")
    met = fig["pipeline_slices_per_s_cpu"] >= TARGET_SLICES_PER_S
    print(f"target >= {TARGET_SLICES_PER_S:.0f} slices/s (cpu): {'met' if met else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
