"""Held-out evaluation of the shipped D2IQA detector.

For every held-out slice: simulate doses 100/50/25/12/5 % (projection domain, ``analysis.training.dose_sim``,
``I0_full`` calibrated per series), draw ``T_max`` insertion layouts ONCE from the 100 % image (fixed
seed per slice) and score every dose on those same layouts. Reports, for T in a list of trial counts
(the first T of the T_max trials):

- series score (mean over slices) per dose, and whether it falls strictly with dose;
- per-slice Spearman correlation between dose and score (5 doses), averaged over slices;
- a Table-3-style grid: pooled mAP per object size (7 / 10 px) x contrast (8 / 10 %) x dose;
- timing: ms per trial per slice (insert + detect + mAP) and slices/s at the default T.

Held out (never trained on): /work/shared/data/ct/philips_head_phantom/S2010_5mm (28 slices; the
training used S2020 of the same phantom), wg04 CT1 and CT2 (UNC), pydicom-data 693_UNCR.dcm, and two
synthetic series of textured phantoms (``analysis.training.phantoms``, 512 x 512) from seeds the trainer never
uses (``d2iqa_train.HELDOUT_PHANTOM_SEED0`` on; training phantoms start at ``TRAIN_PHANTOM_SEED0``):
``synthetic_head`` (8 head slices, routine full-dose global noise 4 HU) and ``synthetic_body`` (8 body
slices, 12 HU), the noise made with ``dose_sim`` at an I0_full calibrated to that level.

    .venv/bin/python bench/d2iqa_eval.py --out bench/results/d2iqa_eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.training import dose_sim  # noqa: E402
from analysis.d2iqa import (  # noqa: E402
    DEFAULT_TRIALS,
    WEIGHTS_PATH,
    detect_trials,
    load_model,
    pooled_map,
    trial_layouts,
)
from analysis.d2iqa_insert import InsertionConfig, placement_mask  # noqa: E402
from analysis.training.d2iqa_train import HELDOUT_PHANTOM_SEED0  # noqa: E402
from analysis.training.phantoms import make_phantom  # noqa: E402
from analysis.volume import load_series  # noqa: E402

log = logging.getLogger("d2iqa_eval")
DATA = ROOT.parent / "shared" / "data"
DOSES = (1.0, 0.5, 0.25, 0.12, 0.05)
# held-out synthetic series: name -> (phantom kind, full-dose global noise in HU, first seed, slices).
# The noise levels are routine ones measured on real series here (head about 3-5 HU, neck/abdomen
# about 10-15 HU at 512 x 512; analysis/training/n2q_train.py).
PHANTOM_SERIES = {"synthetic_head": ("head", 4.0, HELDOUT_PHANTOM_SEED0, 8),
                  "synthetic_body": ("body", 12.0, HELDOUT_PHANTOM_SEED0 + 100, 8)}


def phantom_series(kind: str, noise_hu: float, seed0: int, n: int):
    """[(slice index, full-dose HU, pixel spacing, I0_full)] of one held-out synthetic series."""
    out = []
    for k in range(n):
        clean, ps = make_phantom(kind, 512, np.random.default_rng(seed0 + k))
        i0 = dose_sim.calibrate_i0(clean, noise_hu, pixel_spacing_mm=ps, rng=seed0 + k)
        full = clean + dose_sim.unit_noise(clean, pixel_spacing_mm=ps, rng=10_000 + seed0 + k)[0] / np.sqrt(i0)
        out.append((k, full.astype(np.float32), ps, i0))
    return out


def heldout_cases(seed: int, max_slices: int):
    """Yields (set name, [(slice index, HU, pixel spacing, I0_full)]) for every held-out set."""
    for name, paths in heldout_series().items():
        vol = load_series(paths)
        ps = float(np.mean(vol.pixel_spacing_mm))
        try:
            i0 = dose_sim.calibrate_i0(vol.hu, pixel_spacing_mm=ps, rng=seed)
        except ValueError as exc:
            log.warning("%s: I0 calibration failed (%s); default I0", name, exc)
            i0 = dose_sim.DEFAULT_I0_FULL
        idx = np.arange(vol.n_slices)
        if max_slices and vol.n_slices > max_slices:
            idx = np.unique(np.linspace(0, vol.n_slices - 1, max_slices).round().astype(int))
        log.info("%s: %d slices, %.3f mm, I0_full %.3g", name, len(idx), ps, i0)
        yield name, [(int(i), vol.hu[i], ps, i0) for i in idx]
    for name, (kind, noise_hu, seed0, n) in PHANTOM_SERIES.items():
        n = min(n, max_slices) if max_slices else n
        log.info("%s: %d held-out %s phantoms (seeds %d..%d), full-dose noise %.1f HU", name, n, kind, seed0, seed0 + n - 1, noise_hu)
        yield name, phantom_series(kind, noise_hu, seed0, n)


def heldout_series() -> dict[str, list[Path]]:
    from pydicom.data import get_testdata_file

    out = {
        "philips_S2010_5mm": sorted((DATA / "ct" / "philips_head_phantom" / "S2010_5mm").glob("*")),
        "wg04_CT1": [DATA / "dicom" / "wg04" / "CT1_UNC"],
        "wg04_CT2": [DATA / "dicom" / "wg04" / "CT2_UNC"],
    }
    p = get_testdata_file("693_UNCR.dcm", download=False)
    if p:
        out["pydicom_693_UNCR"] = [Path(p)]
    return {k: v for k, v in out.items() if v and all(x.exists() for x in v)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(y) == 0 or not np.all(np.isfinite(y)):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(WEIGHTS_PATH))
    ap.add_argument("--trials", type=int, nargs="+", default=[10, 20, 50, 100], help="trial counts to report (max = T_max)")
    ap.add_argument("--max-slices", type=int, default=0, help="evenly spaced slices per series (0 = all)")
    ap.add_argument("--table3-slices", type=int, default=8, help="slices for the size x contrast grid")
    ap.add_argument("--table3-trials", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.weights, "cpu")
    t_max = max(args.trials)
    config = InsertionConfig()
    rows = []  # per slice: series, index, scores[T][dose]
    t3_pool = []  # (series, slice idx, doses images, allowed)
    det_time, det_trials = 0.0, 0
    for name, slices in heldout_cases(args.seed, args.max_slices):
        for i, hu, ps, i0 in slices:
            allowed = placement_mask(hu, config, pixel_spacing_mm=ps)
            if not allowed.any():
                log.info("  slice %d: no room for objects, skipped", i)
                continue
            seed = args.seed + int(i)
            layouts = trial_layouts(allowed, t_max, seed, config)
            if sum(len(lay) > 0 for lay in layouts) == 0:
                continue
            imgs = dose_sim.simulate_low_dose(hu, DOSES, i0, pixel_spacing_mm=ps, rng=seed)
            scores = {t: [] for t in args.trials}
            for d, img in zip(DOSES, imgs):
                t0 = time.perf_counter()
                gts, dets = detect_trials(model, img, layouts, config)
                det_time += time.perf_counter() - t0
                det_trials += len(gts)
                for t in args.trials:
                    scores[t].append(pooled_map(gts[:t], dets[:t]))
            row = {"series": name, "slice": int(i), "scores": {str(t): v for t, v in scores.items()},
                   "spearman": {str(t): spearman(np.array(DOSES), np.array(v)) for t, v in scores.items()}}
            rows.append(row)
            t3_pool.append((name, int(i), imgs, allowed))
            log.info("  slice %3d  T=%d: %s  rho %.2f", i, t_max, " ".join(f"{s:.3f}" for s in scores[t_max]), row["spearman"][str(t_max)])

    result: dict = {"weights": str(args.weights), "weights_sha256": model.sha256, "doses": DOSES, "trials": args.trials,
                    "heldout": sorted({r["series"] for r in rows}), "n_slices": len(rows), "per_slice": rows}
    summary = {}
    for t in args.trials:
        per_series = {}
        for name in result["heldout"]:
            m = np.array([r["scores"][str(t)] for r in rows if r["series"] == name])
            rho = np.array([r["spearman"][str(t)] for r in rows if r["series"] == name])
            per_series[name] = {"mean_by_dose": m.mean(0).round(4).tolist(), "n_slices": int(m.shape[0]),
                                "strictly_falling": bool(np.all(np.diff(m.mean(0)) < 0)),
                                "mean_spearman": float(np.nanmean(rho)), "n_rho_nan": int(np.isnan(rho).sum())}
        allm = np.array([r["scores"][str(t)] for r in rows])
        rhos = np.array([r["spearman"][str(t)] for r in rows])
        summary[str(t)] = {
            "series": per_series,
            "all_slices_mean_by_dose": allm.mean(0).round(4).tolist(),
            "mean_spearman": float(np.nanmean(rhos)),  # over all held-out slices (the target)
            "mean_of_set_spearman": float(np.mean([v["mean_spearman"] for v in per_series.values()])),
            "all_sets_strictly_falling": bool(all(v["strictly_falling"] for v in per_series.values())),
            "median_spearman": float(np.nanmedian(rhos)),
            "fraction_rho_1": float(np.mean(np.isclose(rhos, 1.0))),
        }
    result["summary"] = summary
    result["ms_per_trial_per_slice"] = 1000.0 * det_time / max(det_trials, 1)

    # Table-3 style grid: smaller / fainter objects -> lower mAP
    rng = np.random.default_rng(args.seed)
    pick = [t3_pool[k] for k in np.unique(np.linspace(0, len(t3_pool) - 1, min(args.table3_slices, len(t3_pool))).round().astype(int))]
    grid = {}
    for radius in (7.0, 10.0):
        for contrast in (0.08, 0.10):
            cfg = InsertionConfig(radii=(radius,), contrasts=(contrast,))
            per_dose = []
            for k, d in enumerate(DOSES):
                g_all, d_all = [], []
                for name, i, imgs, allowed in pick:
                    lay = trial_layouts(allowed, args.table3_trials, args.seed + 1000 + i, cfg)
                    g, dd = detect_trials(model, imgs[k], lay, cfg)
                    g_all += g
                    d_all += dd
                per_dose.append(round(pooled_map(g_all, d_all), 4))
            grid[f"size{int(radius)}_contrast{int(contrast * 100)}"] = per_dose
            log.info("table3 size %d contrast %d%%: %s", radius, contrast * 100, per_dose)
    result["table3"] = {"doses": DOSES, "n_slices": len(pick), "trials_per_slice": args.table3_trials, "pooled_map": grid}
    del rng

    # timing at the default T on one thread
    name, i, imgs, allowed = t3_pool[0]
    lay = trial_layouts(allowed, DEFAULT_TRIALS, args.seed + i, config)
    t0 = time.perf_counter()
    gts, dets = detect_trials(model, imgs[0], lay, config)
    pooled_map(gts, dets)
    dt = time.perf_counter() - t0
    result["timing_default_T"] = {"T": DEFAULT_TRIALS, "s_per_slice": dt, "slices_per_s": 1.0 / dt, "threads": args.threads}

    for t in args.trials:
        s = summary[str(t)]
        print(f"T={t:4d}  mean rho {s['mean_spearman']:.3f} (mean of sets {s['mean_of_set_spearman']:.3f})  "
              f"all-slice mean by dose {s['all_slices_mean_by_dose']}")
        for name, v in s["series"].items():
            print(f"        {name:20s} n={v['n_slices']:3d} rho {v['mean_spearman']:.3f} {v['mean_by_dose']}  "
                  f"strictly falling: {v['strictly_falling']}")
    print("table3:", json.dumps(grid))
    print(f"ms per trial per slice {result['ms_per_trial_per_slice']:.1f}; default T={DEFAULT_TRIALS}: {dt:.2f} s/slice")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
