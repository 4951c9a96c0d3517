"""Delta-IQA convergence on SYNTHETIC ratings whose truth is known (not radiologist ratings).

Real slices of 12 series (analysis.training.delta_iqa.SYNTHETIC_SOURCES under ../shared/data) are
degraded at 5 graded levels (projection-domain CT noise and streaks, as LDCTIQAC made its images),
4 noise realisations per slice and level, each image "rated" by its level (score = 4 - level).
``--levels absolute`` (default): a level is the total noise in the body (as acquired, then 50, 75,
105, 140 HU: the image alone decides its level), so only slices whose own noise is below 50 / 1.2 HU
are used (the base noise of every source slice is printed; the two sharp-kernel Toshiba slices,
about 120 HU and not measurable, are left out); ``--levels relative``: the earlier definition (a
fixed SD added on top of each series' own noise), to reproduce the earlier runs.
Delta-IQA is trained with the trainer's defaults (the published network, 512 x 512) on the images of
some series and scored on the images of 20 % held-out patient series (whole series; the head phantom,
which has almost no soft tissue, always trains). Prints the held-out PLCC / SROCC / KROCC, per held-out
series too, and the wall time, beside two references (higher noise = lower score, so their sign is
flipped), each on the held-out images where it is defined: the node's global noise of each image
(analysis/classical.py, the node's ``global_noise_hu`` of the slice; not measurable where the noise
pushes soft tissue out of -300..400 HU, as at 140 HU) and the simpler Christianson mode of
analysis/training/dose_sim.estimate_noise_hu (the reference of the earlier runs).

    .venv/bin/python bench/delta_iqa_synthetic.py [--levels absolute|relative] [--seed S] [--epochs N]
        [--lr LR] [--val F] [--data-dir DIR] [--json FILE] [--log FILE]

Every run of the recipe search is in bench/results/delta_iqa_runs.json (and .md). Weights from this
run are synthetic-degradation weights: the script writes them only with --out, labelled
``synthetic`` in the file and in the model card; never enable them as a Likert model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import delta_iqa as dq  # noqa: E402
from analysis.training import delta_iqa as tr  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


TRAIN_ONLY = ("ct/philips_head_phantom/S2010_5mm",)  # no soft tissue: the reference is undefined on it


def patient_split(groups, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """tr.split_by_series over the patient series only: the head phantom (TRAIN_ONLY; air-filled skull,
    almost no soft tissue, global noise undefined on it) always trains. The held-out share is of all
    images, the held-out series are whole series never seen in training."""
    import pydicom

    phantom = set()
    for rel in TRAIN_ONLY:
        folder = SHARED / rel
        f = next(p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in ("LICENSE", "README.md"))
        phantom.add(str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID))
    g = np.asarray(groups)
    cand = np.nonzero(~np.isin(g, sorted(phantom)))[0]
    share = holdout * len(g) / max(1, len(cand))
    sub_tr, sub_ho = tr.split_by_series([groups[i] for i in cand], share, seed)
    held = cand[sub_ho]
    train = np.setdiff1d(np.arange(len(g)), held)
    return train, held


def _nan_to_none(v):
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=tr.DEFAULT_EPOCHS)
    p.add_argument("--lr", type=float, default=tr.DEFAULT_LR)
    p.add_argument("--batch-size", type=int, default=tr.DEFAULT_BATCH)
    p.add_argument("--width", type=float, default=1.0, help="1.0 = the published network")
    p.add_argument("--realisations", type=int, default=4, help="noise realisations per slice and level")
    p.add_argument("--per-series", type=int, default=3, help="source slices per series")
    p.add_argument("--holdout", type=float, default=0.2, help="share of all images held out (whole patient series)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=float, default=tr.DEFAULT_WARMUP)
    p.add_argument("--val", type=float, default=tr.DEFAULT_VAL)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--noise", default="projection", choices=("projection", "image"),
                   help="projection-domain noise (default) or the fast image-domain ramp noise")
    p.add_argument("--levels", default="absolute", choices=tr.LEVEL_DEFINITIONS,
                   help="absolute (default): a level is the total noise in the body; relative: a fixed SD "
                        "added on top of each series' own noise (the earlier runs)")
    p.add_argument("--data-dir", help="keep the synthetic images here and reuse them when the folder already "
                                      "holds a ratings.csv made with the same settings")
    p.add_argument("--log", help="append this run (settings and figures) to this JSON list")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the (synthetic-label) weights and their model card here")
    p.add_argument("--json", help="write the figures as JSON here")
    args = p.parse_args(argv)
    import torch

    from analysis.training.dose_sim import estimate_noise_hu
    from node.ratings import read_ratings_csv

    torch.set_num_threads(args.threads)
    if not SHARED.is_dir():
        print(f"shared data {SHARED} is absent", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data_key = {"seed": args.seed, "realisations": args.realisations, "per_series": args.per_series,
                    "noise": args.noise, "levels": [list(v) for v in tr.LEVELS], "sources": list(tr.SYNTHETIC_SOURCES),
                    "level_definition": args.levels, "absolute_noise_hu": list(tr.ABSOLUTE_NOISE_HU),
                    "base_margin": tr.BASE_MARGIN}
        folder = Path(args.data_dir) if args.data_dir else Path(tmp)
        key_file = folder / "settings.json"
        csv_path = folder / "ratings.csv"
        reused = bool(args.data_dir) and csv_path.is_file() and key_file.is_file() \
            and json.loads(key_file.read_text()) == data_key
        if not reused:
            src = tr.synthetic_source_files(SHARED, args.per_series)
            csv_path = tr.make_synthetic_ratings(src, folder, seed=args.seed, realisations=args.realisations,
                                                 noise=args.noise, levels=args.levels)
            key_file.write_text(json.dumps(data_key))
        rows = read_ratings_csv(csv_path)
        with (folder / "sources.csv").open(newline="") as fh:
            sources = list(csv.DictReader(fh))
        data = tr.load_rated_images(rows)
        t_data = time.perf_counter() - t0
        split = patient_split(data.groups, args.holdout, args.seed)
        res = tr.train(data, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       width=args.width, split=split, warmup=args.warmup, val=args.val, precision=args.precision)
        # reference: global noise of the same held-out images (HU from the written files)
        from analysis import classical
        from analysis.results import RunContext
        from analysis.volume import load_series

        noise, node_noise = [], []
        for i in res.held_idx:
            v = load_series([Path(data.paths[i])])
            noise.append(estimate_noise_hu(v.hu[0], v.pixel_spacing_mm))
            node_noise.append(float(classical.run(v, RunContext()).slice_metrics["global_noise_hu"][0]))
        noise, node_noise = np.array(noise), np.array(node_noise)
        ok, ok_node = np.isfinite(noise), np.isfinite(node_noise)
        ref = dq.correlations(-noise[ok], res.held_true[ok])
        ref_node = dq.correlations(-node_noise[ok_node], res.held_true[ok_node])
        if args.out:
            ns = argparse.Namespace(labels="synthetic", width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                                    lr=args.lr, seed=args.seed, device="cpu", warmup=args.warmup, val=args.val,
                                    ratings=str(csv_path) + ("" if args.data_dir else " (temporary)"))
            dq.save_weights(args.out, res.net, width=args.width, labels="synthetic", extra={"held_out": res.held_out})
            from analysis.weights import file_sha256

            tr.card_path(Path(args.out)).write_text(tr.model_card(
                ns, rows, data, res, command="bench/delta_iqa_synthetic.py " + " ".join(argv or sys.argv[1:]),
                ratings_sha=file_sha256(csv_path), weights_sha=file_sha256(args.out),
                synthetic_info=tr.synthetic_levels_info(csv_path)), encoding="utf-8")
    n_train_series = len({data.groups[i] for i in res.train_idx})
    n_held_series = len({data.groups[i] for i in res.held_idx})
    h = res.held_out
    print("SYNTHETIC ratings (degradation levels, not radiologist scores)")
    if args.levels == "absolute":
        print("levels: absolute (total noise in the body: as acquired, "
              + ", ".join(f"{v:g}" for v in tr.ABSOLUTE_NOISE_HU[1:]) + " HU; streaks per level)")
    else:
        print("levels: relative (added noise SD " + ", ".join(f"{v[0]:g}" for v in tr.LEVELS)
              + " HU on top of each slice's own noise; streaks per level)")
    print("source slices (base noise HU, method, used):")
    for r in sources:
        print(f"  {Path(r['source']).parent.name[:44]:<44} {Path(r['source']).name[:24]:<24} {float(r['base_noise_hu']):7.1f}"
              f"  {r['method']:<40} {r['used']}{'  (' + r['why_not'] + ')' if r['why_not'] else ''}")
    print(f"images: {len(rows)} ({n_train_series} series train / {n_held_series} series held out: "
          f"{len(res.train_idx)} / {len(res.held_idx)} images); data {t_data:.0f} s")
    print(f"images: {args.noise}-domain noise; data {'reused from ' + str(folder) if reused else 'made'}")
    print(f"Delta-IQA width {args.width:g}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
          f"warm-up {args.warmup:g} + cosine, validation {args.val:g} ({len(res.val_idx)} images; epoch "
          f"{res.kept_epoch} kept), {res.precision}: "
          f"training {res.seconds:.0f} s ({res.seconds / 60:.1f} min, {torch.get_num_threads()} threads)")
    print(f"{'held-out images':<28}{'PLCC':>8}{'SROCC':>8}{'KROCC':>8}")
    print(f"{'Delta-IQA':<28}{h['plcc']:>8.3f}{h['srocc']:>8.3f}{h['krocc']:>8.3f}")
    print(f"{'global noise (node)':<28}{ref_node['plcc']:>8.3f}{ref_node['srocc']:>8.3f}{ref_node['krocc']:>8.3f}"
          f"   ({int(ok_node.sum())} of {len(ok_node)} images measurable)")
    print(f"{'dose_sim noise (earlier ref)':<28}{ref['plcc']:>8.3f}{ref['srocc']:>8.3f}{ref['krocc']:>8.3f}"
          f"   ({int(ok.sum())} of {len(ok)} images measurable)")
    print(f"SROCC ratio Delta-IQA / node global noise: {h['srocc'] / ref_node['srocc']:.2f}" if ref_node["srocc"] else "")
    print("training loss per epoch: " + ", ".join(f"{v:.3f}" for v in res.losses))
    per_series = {}
    for uid in sorted({data.groups[i] for i in res.held_idx}):
        m = np.array([data.groups[i] == uid for i in res.held_idx])
        c = dq.correlations(res.held_pred[m], res.held_true[m])
        per_series[uid] = {"images": int(m.sum()), "srocc": c["srocc"],
                           "mean_score_per_level": [float(res.held_pred[m & (res.held_true == 4 - lv)].mean())
                                                    for lv in range(5) if (m & (res.held_true == 4 - lv)).any()]}
        print(f"  held-out series ...{uid[-12:]}: {int(m.sum())} images, SROCC {c['srocc']:.3f}; mean score per level 0-4: "
              + " ".join(f"{v:.2f}" for v in per_series[uid]["mean_score_per_level"]))
    if res.val_srocc:
        print("validation SROCC per epoch: " + ", ".join(f"{v:.3f}" for v in res.val_srocc))
    record = {
        "labels": "synthetic", "noise": args.noise, "images": len(rows), "train_images": len(res.train_idx),
        "val_images": len(res.val_idx), "held_images": len(res.held_idx), "train_series": n_train_series,
        "held_series": n_held_series, "held_series_uids": sorted({data.groups[i] for i in res.held_idx}),
        "epochs": args.epochs, "lr": args.lr, "batch": args.batch_size, "warmup": args.warmup, "val": args.val,
        "precision": res.precision, "width": args.width, "seed": args.seed, "realisations": args.realisations,
        "train_s": res.seconds, "data_s": t_data, "kept_epoch": res.kept_epoch, "delta_iqa": h,
        "global_noise": ref, "global_noise_images": int(ok.sum()), "node_global_noise": ref_node,
        "node_global_noise_images": int(ok_node.sum()), "levels": args.levels,
        "absolute_noise_hu": list(tr.ABSOLUTE_NOISE_HU) if args.levels == "absolute" else None,
        "sources": [{"source": str(Path(r["source"]).relative_to(SHARED)) if r["source"].startswith(str(SHARED)) else r["source"],
                     "base_noise_hu": float(r["base_noise_hu"]), "method": r["method"], "used": r["used"] == "yes"}
                    for r in sources],
        "per_series": args.per_series, "held_out_per_series": per_series, "losses": res.losses, "val_srocc": res.val_srocc,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_avg_1min": os.getloadavg()[0]}
    record = _nan_to_none(record)  # strict JSON: an undefined figure is null
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.log:
        log_path = Path(args.log)
        runs = json.loads(log_path.read_text()) if log_path.is_file() else []
        runs.append(record)
        log_path.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
