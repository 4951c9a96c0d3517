"""The classical metrics on real patient slices against hand measurements (docs/metrics.md, "Global
noise" last paragraph and "Water-equivalent diameter"), reprinted.

Real slices of the shared data: WG-04 ``CT1_UNC`` (GE chest) and ``CT2_UNC`` (Toshiba head) from
``../shared/data/dicom/wg04``, pydicom-data ``693_UNCR.dcm`` (head) and pydicom's ``CT_small.dcm`` (a
128 x 128 reduction of a body slice). The hand measurements are those of ``tests/unit/test_classical.py``
(same ROIs and rectangles, picked by coordinates):

- global noise: the series value of ``analysis.classical`` beside the SDs of square hand ROIs on a
  regular grid that lie in uniform soft tissue (mean 0-100 HU, no pixel below -150 or above 250 HU):
  the most uniform one (minimum SD, biased low) and the median one (biased high by anatomy); the test
  requires minimum <= global noise <= 1.1 x median. For CT1 also the anterior chest-wall muscle ROI;
- WED: the series value against a TG-220 sum over a rectangle drawn around the patient by hand (CT1,
  693_UNCR, CT_small), in percent; CT2 against its effective diameter sqrt(AP x LAT) read off the
  centre profiles (the skull makes the WED a few percent larger than the geometric diameter).

    .venv/bin/python bench/classical_real.py [--json bench/results/classical_real.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from analysis import classical  # noqa: E402
from analysis.results import RunContext  # noqa: E402
from analysis.volume import load_series  # noqa: E402
from tests.unit.test_classical import WG04, _hand_roi_sds, _hand_wed_cm, _roi  # noqa: E402

# name, file (WG-04 folder name or pydicom test file), hand ROI size and grid (rows, cols), hand WED
# rectangle (rows, cols, lower HU bound) or None (CT2: effective diameter instead)
SLICES = [
    ("CT1 chest", ("wg04", "CT1_UNC"), 16, (16, 496, 16), (16, 496, 16), (slice(0, 478), slice(0, 512), -900.0)),
    ("CT2 head", ("wg04", "CT2_UNC"), 16, (140, 400, 20), (140, 380, 20), None),
    ("693_UNCR head", ("pydicom", "693_UNCR.dcm"), 16, (140, 400, 20), (140, 380, 20),
     (slice(90, 460), slice(100, 440), -900.0)),
    ("CT_small body", ("pydicom", "CT_small.dcm"), 8, (8, 120, 8), (8, 120, 8),
     (slice(0, 128), slice(0, 128), -260.0)),
]
CT2_PROFILE = {"lat": (69, 411), "ap": (62, 452)}  # first/last pixel above -260 HU on the centre profiles


def _path(source: tuple[str, str]) -> Path | None:
    kind, name = source
    if kind == "wg04":
        p = WG04 / name
        return p if p.exists() else None
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name, download=False)
    return Path(p) if p else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ctx = RunContext()
    res: dict = {}
    print("| slice | global noise | plain mode | hand ROIs | most uniform ROI | median ROI | "
          "min <= GN <= 1.1 median | WED | hand WED | WED error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, source, size, rows, cols, rect in SLICES:
        path = _path(source)
        if path is None:
            print(f"| {name} | not installed ({source[1]}) | | | | | | | | |")
            continue
        vol = load_series([path])
        hu = vol.hu[0]
        out = classical.run(vol, ctx)
        m = out.series_metrics
        gn = float(m["global_noise_hu"])
        mode = float(np.nanmedian(out.slice_metrics["global_noise_mode_hu"]))
        sds = _hand_roi_sds(hu, size, range(*rows), range(*cols))
        lo, med = float(sds.min()), float(np.median(sds))
        wed = float(m["wed_cm"])
        sp = float(vol.pixel_spacing_mm[0])
        row = {"global_noise_hu": gn, "global_noise_mode_hu": mode, "hand_rois": int(len(sds)),
               "hand_roi_px": size, "hand_roi_sd_min_hu": lo, "hand_roi_sd_median_hu": med,
               "within_hand_bounds": bool(lo <= gn <= 1.1 * med), "wed_cm": wed}
        if rect is not None:
            hand = _hand_wed_cm(hu, sp, rect[0], rect[1], above_hu=rect[2])
            row["hand_wed_cm"] = hand
            row["wed_error_percent"] = 100.0 * (wed / hand - 1.0)
            wed_cells = f"{hand:.2f} cm (hand sum) | {row['wed_error_percent']:+.2f} %"
        else:
            (l0, l1), (a0, a1) = CT2_PROFILE["lat"], CT2_PROFILE["ap"]
            d_eff = math.sqrt((l1 - l0 + 1) * (a1 - a0 + 1)) * sp / 10.0
            row["effective_diameter_cm"] = d_eff
            row["wed_over_effective_diameter"] = wed / d_eff
            wed_cells = f"{d_eff:.2f} cm (sqrt(AP x LAT)) | ratio {wed / d_eff:.3f}"
        print(f"| {name} | {gn:.2f} HU | {mode:.2f} HU | {len(sds)} of {size}x{size} px | {lo:.2f} HU | "
              f"{med:.2f} HU | {'yes' if row['within_hand_bounds'] else 'NO'} | {wed:.2f} cm | {wed_cells} |")
        if name.startswith("CT1"):
            muscle = _roi(hu, 96, 176, 16)
            row["chest_wall_muscle_roi"] = {"mean_hu": float(muscle.mean()), "sd_hu": float(muscle.std(ddof=1))}
            print(f"|   CT1 anterior chest-wall muscle ROI (16x16 px at row 96, col 176): mean "
                  f"{muscle.mean():.1f} HU, SD {muscle.std(ddof=1):.2f} HU | | | | | | | | | |")
        res[name] = row
    errs = [abs(r["wed_error_percent"]) for r in res.values() if "wed_error_percent" in r]
    if errs:
        print(f"largest |WED error| against the hand sums: {max(errs):.2f} % (test tolerance 2 %)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
