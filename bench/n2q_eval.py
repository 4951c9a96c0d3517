"""Held-out evaluation of N2Q weights (and the ablations) in the paper's terms.

    .venv/bin/python bench/n2q_eval.py [--weights analysis/weights/n2q.pt] [--ablation NAME=FILE ...]
        [--trials 2] [--phantoms 16] [--json OUT.json]

Held-out sets (never trained on):
  (a) synthetic phantoms drawn with seeds the trainer never uses (``default_rng([7919, k])``),
      half body, half head, at 256 x 256, full-dose noise drawn from the trainer's per-kind prior;
  (b) different real objects: wg04 ``CT1_UNC`` and ``CT2_UNC`` (../shared/data/dicom/wg04) and
      pydicom-data ``693_UNCR.dcm`` (head). Their I0_full is calibrated against their measured noise
      and doses 5, 10, 25, 50, 75 % are simulated at the native 512 x 512 (projection domain,
      independent realisation per dose and trial), then both images are resized to 256 like the node does.

True map = 2 * SSIM_map(window(low), window(full)) - 1 at 256 (maps in [-1, 1]). Per image and dose:
SSIM between predicted and true maps (Gaussian, data range 2), MSE, NRMSE (skimage, Euclidean),
each over the whole image and MSE also inside the body mask; beside it the constant baseline (a map
of 1 everywhere = "full quality"). Per held-out slice: Spearman of body-mean predicted quality over
the five doses plus full dose; over all: Pearson of body-mean predicted vs true quality, dose-class
accuracy. The real Mayo quarter-dose pair is not available on this machine: no real low-dose figure.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from skimage.metrics import normalized_root_mse, structural_similarity

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.training import dose_sim  # noqa: E402
from analysis.mask import body_mask  # noqa: E402
from analysis.training.n2q_train import PHANTOM_FULL_NOISE_HU  # noqa: E402
from analysis.n2q import DOSE_CLASSES, MODEL_SIZE, load_model, predict_model_res, resize_to_model  # noqa: E402
from analysis.training.phantoms import make_phantom  # noqa: E402
from analysis.ssim import ssim_map, window_hu  # noqa: E402

LEVELS = tuple(DOSE_CLASSES) + (1.0,)
SHARED = ROOT.parent / "shared" / "data"


def _read_hu(path: Path) -> tuple[np.ndarray, float]:
    import pydicom

    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.maximum(hu, -1024.0), float(ds.PixelSpacing[0])


def real_cases() -> list[tuple[str, np.ndarray, float]]:
    from pydicom.data import get_testdata_file

    cases = []
    for name in ("CT1_UNC", "CT2_UNC"):
        p = SHARED / "dicom" / "wg04" / name
        if p.is_file():
            cases.append((f"wg04 {name}", *_read_hu(p)))
    p693 = get_testdata_file("693_UNCR.dcm", download=False)
    if p693:
        cases.append(("pydicom-data 693_UNCR", *_read_hu(Path(p693))))
    return cases


def build_real(trials: int) -> list[dict]:
    """Each item: name, trial, levels -> (low HU 256, full HU 256), body mask 256."""
    items = []
    for name, hu, ps in real_cases():
        noise = dose_sim.estimate_noise_hu(hu, ps)
        i0 = dose_sim.calibrate_i0(hu, noise, pixel_spacing_mm=ps, rng=11)
        for t in range(trials):
            sims = dose_sim.simulate_low_dose(hu, DOSE_CLASSES, i0, pixel_spacing_mm=ps, rng=np.random.default_rng([31, t, len(items)]))
            stack = np.concatenate([sims, hu[None]])  # 5 doses + full
            small, _ = resize_to_model(stack)
            small = small.numpy()
            full = small[-1]
            body = body_mask(full, (ps * hu.shape[0] / MODEL_SIZE,) * 2)
            items.append({"name": name, "trial": t, "low": small, "full": full, "body": body, "noise_hu": noise, "i0": i0})
    return items


def build_phantoms(n: int, sim_matrix: int = 512) -> list[dict]:
    """Phantoms drawn at ``sim_matrix`` (a scanner's matrix) with their noise simulated there, then
    resized to 256 like the node does (``sim_matrix`` 0: drawn and simulated at 256, as before v1.1)."""
    items = []
    for k in range(n):
        rng = np.random.default_rng([7919, k])
        kind = "body" if k % 2 == 0 else "head"
        clean, ps = make_phantom(kind, sim_matrix or MODEL_SIZE, rng)
        un = dose_sim.unit_noise(clean, pixel_spacing_mm=ps, rng=rng, n_realisations=len(DOSE_CLASSES) + 1)
        if sim_matrix and sim_matrix != MODEL_SIZE:
            ps = ps * sim_matrix / MODEL_SIZE
            clean = resize_to_model(clean[None])[0][0].numpy()
            un = resize_to_model(un)[0].numpy()
        m = (clean > -300) & (clean < 300)
        lo, hi = PHANTOM_FULL_NOISE_HU[kind]  # the same realistic full-dose noise prior as training
        sd_target = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        i0 = (float(un[0][m].std()) / sd_target) ** 2
        full = clean + un[0] / np.sqrt(i0)
        lows = [full + un[j + 1] / np.sqrt(dose_sim.added_i0(i0, d)) for j, d in enumerate(DOSE_CLASSES)]
        stack = np.stack(lows + [full]).astype(np.float32)
        body = body_mask(full, (ps, ps))
        items.append({"name": f"phantom-{kind}-{k}", "trial": 0, "low": stack, "full": full, "body": body, "noise_hu": sd_target, "i0": i0})
    return items


def true_maps(item: dict) -> np.ndarray:
    fw = window_hu(item["full"])
    return np.stack([2.0 * ssim_map(window_hu(low), fw) - 1.0 for low in item["low"]])


def map_metrics(pred: np.ndarray, true: np.ndarray, body: np.ndarray) -> dict:
    return {
        "ssim": float(structural_similarity(true, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0)),
        "mse": float(np.mean((pred - true) ** 2)),
        "nrmse": float(normalized_root_mse(true, pred)),
        "mse_body": float(np.mean((pred[body] - true[body]) ** 2)) if body.any() else float("nan"),
    }


def evaluate(weights: str, items: list[dict], batch: int = 8) -> dict:
    model = load_model(weights, "cpu")
    rows, mono, per_img_pred, per_img_true, dose_hits, full_pred = [], [], [], [], [], []
    base_rows, min_full = [], []
    t_inf, n_inf = 0.0, 0
    for it in items:
        tm = true_maps(it)
        t0 = time.time()
        raw, probs = predict_model_res(model.net, torch.from_numpy(it["low"]), "cpu", batch)
        t_inf += time.time() - t0
        min_full.append(float(((raw[-1] + 1) / 2)[it["body"]].min()) if it["body"].any() else 1.0)
        n_inf += raw.shape[0]
        body = it["body"]
        pred_q = []
        for j, lvl in enumerate(LEVELS):
            if lvl < 1.0:
                rows.append(map_metrics(raw[j], tm[j], body))
                base_rows.append(map_metrics(np.ones_like(tm[j]), tm[j], body))
                if not np.isnan(probs[j]).any():
                    dose_hits.append(int(np.argmax(probs[j]) == j))
                per_img_pred.append(float(((raw[j] + 1) / 2)[body].mean()))
                per_img_true.append(float(((tm[j] + 1) / 2)[body].mean()))
            pred_q.append(float(((raw[j] + 1) / 2)[body].mean()))
        full_pred.append(pred_q[-1])
        mono.append(float(stats.spearmanr(LEVELS, pred_q).statistic))

    def agg(rs: list[dict]) -> dict:
        return {k: float(np.nanmean([r[k] for r in rs])) for k in rs[0]}

    m, b = agg(rows), agg(base_rows)
    return {
        "model": agg(rows), "constant_1": b,
        "mse_ratio_baseline_over_model": b["mse"] / m["mse"], "mse_body_ratio": b["mse_body"] / m["mse_body"],
        "pearson_mean_quality": float(stats.pearsonr(per_img_pred, per_img_true).statistic),
        "spearman_dose_min": float(np.min(mono)), "spearman_dose_mean": float(np.mean(mono)),
        "spearman_ge_0.9_fraction": float(np.mean(np.array(mono) >= 0.9)),
        "dose_class_accuracy": float(np.mean(dose_hits)) if dose_hits else None,
        "slices_per_s_cpu": n_inf / t_inf if t_inf else None,
        "n_maps": len(rows), "n_slices": len(items),
        "mean_quality_by_dose_pred": {**_by_dose(per_img_pred), "100%": float(np.mean(full_pred))},
        "mean_quality_by_dose_true": {**_by_dose(per_img_true), "100%": 1.0},
        "spearman_per_slice": {f"{it['name']} #{it['trial']}": float(v) for it, v in zip(items, mono)},
        "body_min_quality_full_dose": float(np.min(min_full)),
    }


def _by_dose(vals: list[float]) -> dict:
    arr = np.array(vals).reshape(-1, len(DOSE_CLASSES))
    return {f"{int(d * 100)}%": float(v) for d, v in zip(DOSE_CLASSES, arr.mean(0))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "analysis" / "weights" / "n2q.pt"))
    ap.add_argument("--ablation", nargs="*", default=[], metavar="NAME=FILE")
    ap.add_argument("--trials", type=int, default=2, help="noise realisations per real slice")
    ap.add_argument("--phantoms", type=int, default=16)
    ap.add_argument("--sim-matrix", type=int, default=512, help="matrix the held-out phantoms are drawn at (0: 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sets-cache", help="pickle of the simulated held-out sets (built once, reused)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.sets_cache and Path(args.sets_cache).is_file():
        with open(args.sets_cache, "rb") as fh:
            sets = pickle.load(fh)
    else:
        sets = {"real (wg04 CT1/CT2, 693_UNCR)": build_real(args.trials), "synthetic held-out phantoms": build_phantoms(args.phantoms, args.sim_matrix)}
        if args.sets_cache:
            with open(args.sets_cache, "wb") as fh:
                pickle.dump(sets, fh)
    print(f"held-out sets built in {time.time() - t0:.0f} s", flush=True)
    for it in sets["real (wg04 CT1/CT2, 693_UNCR)"]:
        if it["trial"] == 0:
            print(f"  {it['name']}: measured noise {it['noise_hu']:.1f} HU -> I0_full {it['i0']:.3g}")
    models = {"N2Q": args.weights}
    for spec in args.ablation:
        name, _, path = spec.partition("=")
        models[name] = path
    results: dict = {}
    for mname, path in models.items():
        if not Path(path).is_file():
            print(f"skipping {mname}: {path} not found")
            continue
        results[mname] = {sname: evaluate(path, items) for sname, items in sets.items()}
    for sname in sets:
        print(f"\n## {sname}")
        print("| model | SSIM | MSE | NRMSE | MSE body | MSE ratio const/model | Pearson mean q | Spearman min / mean | dose acc |")
        print("|---|---|---|---|---|---|---|---|---|")
        first = True
        for mname, res in results.items():
            r = res[sname]
            if first:
                c = r["constant_1"]
                print(f"| constant 1 | {c['ssim']:.4f} | {c['mse']:.4f} | {c['nrmse']:.4f} | {c['mse_body']:.4f} | 1 | - | - | - |")
                first = False
            m = r["model"]
            acc = "-" if r["dose_class_accuracy"] is None else f"{r['dose_class_accuracy']:.2f}"
            print(f"| {mname} | {m['ssim']:.4f} | {m['mse']:.4f} | {m['nrmse']:.4f} | {m['mse_body']:.4f} | "
                  f"{r['mse_ratio_baseline_over_model']:.1f} | {r['pearson_mean_quality']:.3f} | "
                  f"{r['spearman_dose_min']:.2f} / {r['spearman_dose_mean']:.2f} | {acc} |")
        for mname, res in results.items():
            r = res[sname]
            print(f"  {mname} body-mean quality by dose, predicted: " + ", ".join(f"{k} {v:.3f}" for k, v in r["mean_quality_by_dose_pred"].items()))
            print(f"  {mname} body-mean quality by dose, true:      " + ", ".join(f"{k} {v:.3f}" for k, v in r["mean_quality_by_dose_true"].items()))
            print(f"  {mname} Spearman per slice: " + ", ".join(f"{k} {v:.2f}" for k, v in r["spearman_per_slice"].items()))
            print(f"  {mname} lowest body-pixel quality at full dose: {r['body_min_quality_full_dose']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
