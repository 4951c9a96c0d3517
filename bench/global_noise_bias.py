"""Bias of the global noise (docs/metrics.md, "Global noise" table), reprinted.

Synthetic 30 cm soft-tissue cylinders (50 HU, 512 x 512, 0.7 mm pixels, 5 slices) with white, CT-like
(ramp x Hann), band-pass (ring at 0.3 mm^-1) and low-pass (Gaussian 0.8 px) noise scaled so that the
pixel SD inside the body is exactly 5, 10, 20 or 40 HU (the truth, after any filtering); the
classical model's series global noise against that truth, in percent. The phantoms are those of
``tests/unit/test_classical.py`` (same generator, seed = int(SD) as there).

A second table gives the plain mode's bias (no peak correction) and the degrees of freedom nu that
the correction read off the noise peak (from the per-slice corrected / plain ratio).
``--single-slice N`` also runs N single-slice phantoms per cell (seeds int(SD) + 100 k) and prints
the range (worst, mean, best) of their biases: one slice has no median over slices to steady it.

    .venv/bin/python bench/global_noise_bias.py [--seeds 1] [--single-slice 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from analysis import classical  # noqa: E402
from analysis.results import RunContext  # noqa: E402
from tests.unit.test_classical import _noisy_cylinder, _volume  # noqa: E402

KINDS = {"white": "white", "ramp": "CT-like (ramp x Hann)", "band": "band-pass (ring at 0.3 mm^-1)",
         "lowpass": "low-pass (Gaussian 0.8 px)"}
SDS = (5.0, 10.0, 20.0, 40.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="phantoms per cell (seeds int(SD) + 100 k); mean bias")
    ap.add_argument("--single-slice", type=int, default=0, metavar="N",
                    help="also N single-slice phantoms per cell: range of their biases")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ctx = RunContext()
    table: dict[str, dict[str, float]] = {}
    print("| Noise | " + " | ".join(f"{sd:g} HU" for sd in SDS) + " |")
    print("|---|" + "---|" * len(SDS))
    plain: dict[str, dict[str, dict[str, float]]] = {}
    for kind, label in KINDS.items():
        row, prow = {}, {}
        for sd in SDS:
            biases, mode_biases, nus = [], [], []
            for k in range(args.seeds):
                out = classical.run(_volume(_noisy_cylinder(sd, kind, seed=int(sd) + 100 * k), 0.7), ctx)
                biases.append(100.0 * (out.series_metrics["global_noise_hu"] / sd - 1.0))
                mode = np.asarray(out.slice_metrics["global_noise_mode_hu"], dtype=float)
                ratio2 = (np.asarray(out.slice_metrics["global_noise_hu"], dtype=float) / mode) ** 2
                mode_biases.append(100.0 * (float(np.nanmedian(mode)) / sd - 1.0))
                # corrected = mode x sqrt(nu / (nu - 1)) -> nu = r^2 / (r^2 - 1)
                nus.append(float(np.nanmedian(ratio2 / np.maximum(ratio2 - 1.0, 1e-12))))
            row[f"{sd:g}"] = float(np.mean(biases))
            prow[f"{sd:g}"] = {"mode_bias_percent": float(np.mean(mode_biases)), "nu": float(np.mean(nus))}
        table[kind] = row
        plain[kind] = prow
        print(f"| {label} | " + " | ".join(f"{v:+.1f} %" for v in row.values()) + " |")
    print("\nplain mode (no peak correction): bias, and the degrees of freedom nu the correction read off the peak")
    print("| Noise | " + " | ".join(f"{sd:g} HU" for sd in SDS) + " |")
    print("|---|" + "---|" * len(SDS))
    for kind, label in KINDS.items():
        print(f"| {label} | " + " | ".join(f"{c['mode_bias_percent']:+.1f} %, nu {c['nu']:.0f}"
                                           for c in plain[kind].values()) + " |")
    out_json: dict = {**table, "plain_mode": plain}
    if args.single_slice > 0:
        single: dict[str, dict[str, dict[str, float]]] = {}
        print(f"\nsingle-slice phantoms ({args.single_slice} per cell): bias min / mean / max")
        print("| Noise | " + " | ".join(f"{sd:g} HU" for sd in SDS) + " |")
        print("|---|" + "---|" * len(SDS))
        for kind, label in KINDS.items():
            cells = {}
            for sd in SDS:
                b = []
                for k in range(args.single_slice):
                    vol = _volume(_noisy_cylinder(sd, kind, n_slices=1, seed=int(sd) + 100 * k), 0.7)
                    b.append(100.0 * (classical.run(vol, ctx).series_metrics["global_noise_hu"] / sd - 1.0))
                cells[f"{sd:g}"] = {"min": float(min(b)), "mean": float(np.mean(b)), "max": float(max(b))}
            single[kind] = cells
            print(f"| {label} | " + " | ".join(f"{c['min']:+.1f} / {c['mean']:+.1f} / {c['max']:+.1f} %"
                                               for c in cells.values()) + " |")
        out_json["single_slice"] = {"phantoms_per_cell": args.single_slice, **single}
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out_json, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
