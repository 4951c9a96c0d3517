"""Accuracy and per-slice cost of the classical metrics on synthetic phantoms (docs/metrics.md,
"Water-equivalent diameter", "Noise power spectrum" and "Speed"), reprinted.

- WED: water cylinders of 16, 20 and 32 cm (blurred edge, couch below, 10 HU noise; the phantoms of
  ``tests/unit/test_classical.py``), error of the series WED in percent;
- NPS: band-pass noise peaking at 0.30 mm^-1 in a 30 cm cylinder at 0.45 mm (64 px ROIs) and 0.7 mm
  pixels (32 px ROIs): f_peak and f_avg in mm^-1;
- cost: ``classical.run`` per slice on 30 cm soft-tissue cylinders filling the field of view at 0.78
  and 0.45 mm pixels (CT-like noise, 10 slices), CPU time of this process, best of --repeat, one thread;
  and the cost of its steps on one such slice (local mean/SD, body mask, noise histogram) and of
  reading and decoding one file of the shared phantom series.

    .venv/bin/python bench/classical_phantoms.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from analysis import classical  # noqa: E402
from analysis.results import RunContext  # noqa: E402
from tests.helpers import PHANTOM_1MM  # noqa: E402
from tests.unit.test_classical import _grid, _noisy_cylinder, _volume  # noqa: E402

CTX = RunContext()


def water_cylinder(diameter_cm: float, spacing: float, n: int = 512) -> np.ndarray:
    """As in test_wed_of_water_cylinders_within_1_percent."""
    y, x = _grid(n, spacing)
    r = np.hypot(y, x)
    img = np.full((n, n), -1000.0)
    img[r <= diameter_cm * 5.0] = 0.0
    img = ndimage.gaussian_filter(img, 0.7)
    couch = (y > diameter_cm * 5.0 + 15) & (y < diameter_cm * 5.0 + 17) & (np.abs(x) < 180)
    img[couch] = 300.0
    img += np.random.default_rng(1).normal(0, 10, img.shape)
    return img


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res: dict = {"wed_error_percent": {}, "nps": {}, "ms_per_slice_cpu": {}}
    for d, spacing in ((16, 0.49), (20, 0.59), (32, 0.78)):
        wed = classical.run(_volume(water_cylinder(d, spacing), spacing, ctdivol=15.0), CTX).series_metrics["wed_cm"]
        res["wed_error_percent"][f"{d} cm"] = round(100.0 * (wed / d - 1.0), 3)
    print("WED of water cylinders: " + ", ".join(f"{k} {v:+.2f} %" for k, v in res["wed_error_percent"].items()))
    for spacing in (0.45, 0.7):
        out = classical.run(_volume(_noisy_cylinder(15.0, "band", n_slices=3, spacing=spacing), spacing), CTX)
        res["nps"][f"{spacing} mm"] = {"f_peak": out.series_metrics["nps_f_peak_per_mm"],
                                       "f_avg": out.series_metrics["nps_f_avg_per_mm"],
                                       "rois": out.info.get("nps_rois")}
        print(f"NPS of band-pass noise (peak 0.30 mm^-1), {spacing} mm pixels: f_peak "
              f"{out.series_metrics['nps_f_peak_per_mm']:.3f}, f_avg {out.series_metrics['nps_f_avg_per_mm']:.3f} mm^-1 "
              f"({out.info.get('nps_rois')})")
    for spacing in (0.78, 0.45):
        n = 512
        vol = _volume(_noisy_cylinder(10.0, "ramp", n_slices=10, spacing=spacing, n=n), spacing)
        best = float("inf")
        for _ in range(args.repeat):
            c0 = time.process_time()
            classical.run(_volume(vol.hu, spacing), CTX)  # a fresh volume: its body masks are part of the cost
            best = min(best, (time.process_time() - c0) / vol.n_slices)
        res["ms_per_slice_cpu"][f"{spacing} mm"] = round(1000 * best, 2)
        print(f"classical step on a 30 cm cylinder filling the field, {spacing} mm pixels: {1000 * best:.1f} ms "
              "per slice (CPU)")
    # cost of the steps on one 512 x 512 slice filling the field (0.78 mm pixels), CPU ms, best of 20
    from analysis.mask import body_mask

    sl = _noisy_cylinder(10.0, "ramp", n_slices=1, spacing=0.78)[0]
    kernel = classical.noise_kernel_px((0.78, 0.78))
    mean, sd = classical.local_mean_sd(sl, kernel)
    tissue = sd[(mean > 0) & (mean < 150)]
    phantom = sorted(PHANTOM_1MM.iterdir())
    steps = {"local mean and SD": lambda: classical.local_mean_sd(sl, kernel),
             "body mask": lambda: body_mask(sl, (0.78, 0.78)),
             "noise histogram": lambda: classical.histogram_mode(tissue)}
    if phantom:
        import pydicom

        steps["reading and decoding (phantom file)"] = lambda: pydicom.dcmread(phantom[70]).pixel_array
    res["step_ms_cpu"] = {}
    for name, fn in steps.items():
        best = float("inf")
        for _ in range(20):
            c0 = time.process_time()
            fn()
            best = min(best, time.process_time() - c0)
        res["step_ms_cpu"][name] = round(1000 * best, 2)
    print("per 512x512 slice (CPU): " + ", ".join(f"{k} {v:.1f} ms" for k, v in res["step_ms_cpu"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
