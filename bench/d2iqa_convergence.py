"""Convergence of the D2IQA slice score with the number of insertion trials T.

For a few held-out slices (S2010 slice 14, wg04 CT2, 693_UNCR, and the first slice of the held-out
synthetic head and body series of ``bench/d2iqa_eval.py``) and doses, run a pool of ``--pool`` random trials once, then estimate the
SD of the pooled-mAP score over T trials by drawing ``--repeats`` random subsets of size T from the
pool (without replacement; the SD is corrected by 1 / sqrt(1 - T/pool) for the finite pool). Also
reports the paper's criterion |mean of t sets - mean of t-1 sets| with sets of T trials.

The default T of ``analysis.d2iqa`` is chosen from this table together with the per-slice Spearman
of ``bench/d2iqa_eval.py`` and the CPU time budget (a 300-slice series in < 60 s on its slice subset).

    .venv/bin/python bench/d2iqa_convergence.py --out bench/results/d2iqa_convergence.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.training import dose_sim  # noqa: E402
from analysis.d2iqa import WEIGHTS_PATH, detect_trials, load_model, pooled_map, trial_layouts  # noqa: E402
from analysis.d2iqa_insert import InsertionConfig, placement_mask  # noqa: E402
from analysis.volume import load_series  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from d2iqa_eval import PHANTOM_SERIES, phantom_series  # noqa: E402

log = logging.getLogger("d2iqa_convergence")
DATA = ROOT.parent / "shared" / "data"


def slices() -> list[tuple[str, Path, int]]:
    from pydicom.data import get_testdata_file

    out = []
    s2010 = sorted((DATA / "ct" / "philips_head_phantom" / "S2010_5mm").glob("*"))
    if s2010:
        out.append(("philips_S2010_5mm", s2010, 14))
    ct2 = DATA / "dicom" / "wg04" / "CT2_UNC"
    if ct2.exists():
        out.append(("wg04_CT2", [ct2], 0))
    p = get_testdata_file("693_UNCR.dcm", download=False)
    if p:
        out.append(("pydicom_693_UNCR", [Path(p)], 0))
    return out


def cases(seed: int):
    """(set name, slice index, full-dose HU, pixel spacing, I0_full): the real slices above, then the
    first slice of each held-out synthetic series of bench/d2iqa_eval.py."""
    for name, paths, k in slices():
        vol = load_series(paths)
        k = min(k, vol.n_slices - 1)
        ps = float(np.mean(vol.pixel_spacing_mm))
        try:
            i0 = dose_sim.calibrate_i0(vol.hu, pixel_spacing_mm=ps, rng=seed)
        except ValueError:
            i0 = dose_sim.DEFAULT_I0_FULL
        yield name, k, vol.hu[k], ps, i0
    for name, (kind, noise_hu, seed0, _) in PHANTOM_SERIES.items():
        (k, hu, ps, i0), = phantom_series(kind, noise_hu, seed0, 1)
        yield name, k, hu, ps, i0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(WEIGHTS_PATH))
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--trials", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    ap.add_argument("--doses", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.weights, "cpu")
    config = InsertionConfig()
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, k, hu, ps, i0 in cases(args.seed):
        allowed = placement_mask(hu, config, pixel_spacing_mm=ps)
        imgs = dose_sim.simulate_low_dose(hu, args.doses, i0, pixel_spacing_mm=ps, rng=args.seed)
        layouts = trial_layouts(allowed, args.pool, args.seed + 7919, config)
        for d, img in zip(args.doses, imgs):
            gts, dets = detect_trials(model, img, layouts, config)
            n = len(gts)
            row = {"series": name, "slice": k, "dose": d, "pool": n, "pool_score": pooled_map(gts, dets), "T": {}}
            for t in args.trials:
                if t >= n:
                    continue
                vals = []
                for _ in range(args.repeats):
                    sub = rng.choice(n, size=t, replace=False)
                    vals.append(pooled_map([gts[j] for j in sub], [dets[j] for j in sub]))
                sd = float(np.std(vals, ddof=1)) / np.sqrt(max(1e-9, 1.0 - t / n))
                row["T"][str(t)] = {"mean": float(np.mean(vals)), "sd": sd}
            # the paper's criterion with sets of 100 trials (or pool // 3)
            set_size = min(100, n // 3)
            sets = [pooled_map(gts[j : j + set_size], dets[j : j + set_size]) for j in range(0, n - set_size + 1, set_size)]
            cum = np.cumsum(sets) / np.arange(1, len(sets) + 1)
            row["paper_criterion"] = {"set_size": set_size, "set_scores": sets, "abs_change": np.abs(np.diff(cum)).tolist()}
            rows.append(row)
            log.info("%s[%d] dose %.2f: pool %.3f  %s", name, k, d, row["pool_score"],
                     "  ".join(f"T={t}: sd {v['sd']:.3f}" for t, v in row["T"].items()))
    table = {}
    for t in args.trials:
        sds = [r["T"][str(t)]["sd"] for r in rows if str(t) in r["T"]]
        if sds:
            table[str(t)] = {"mean_sd": float(np.mean(sds)), "max_sd": float(np.max(sds))}
    print("T      mean SD   max SD   (over slices x doses)")
    for t, v in table.items():
        print(f"{t:>4s}   {v['mean_sd']:.4f}   {v['max_sd']:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"weights_sha256": model.sha256, "rows": rows, "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
