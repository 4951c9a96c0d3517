"""Delta-IQA convergence on SYNTHETIC ratings whose truth is known (not radiologist ratings).

Real slices of 11 series (analysis.training.delta_iqa.SYNTHETIC_SOURCES under ../shared/data) are
degraded at 5 graded levels (CT-like noise and streaks, as LDCTIQAC made its images), each image
"rated" by its level (score = 4 - level). Delta-IQA is trained with the trainer's defaults (the
published network, 512 x 512) on the images of some series and scored on the images of the others
(split by series). Prints the held-out PLCC / SROCC / KROCC and the wall time, beside the reference:
the classical global noise (Christianson mode of the local SD over 0-150 HU; higher noise = lower
score, so its sign is flipped) on the same held-out images.

    .venv/bin/python bench/delta_iqa_synthetic.py [--epochs N] [--realisations R] [--json FILE]

Weights from this run are synthetic-degradation weights: the script writes them only with --out,
labelled ``synthetic`` in the file and in the model card; never enable them as a Likert model.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=tr.DEFAULT_EPOCHS)
    p.add_argument("--lr", type=float, default=tr.DEFAULT_LR)
    p.add_argument("--batch-size", type=int, default=tr.DEFAULT_BATCH)
    p.add_argument("--width", type=float, default=1.0, help="1.0 = the published network")
    p.add_argument("--realisations", type=int, default=3, help="noise realisations per slice and level")
    p.add_argument("--per-series", type=int, default=3, help="source slices per series")
    p.add_argument("--holdout", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
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
        src = tr.synthetic_source_files(SHARED, args.per_series)
        csv_path = tr.make_synthetic_ratings(src, Path(tmp), seed=args.seed, realisations=args.realisations)
        rows = read_ratings_csv(csv_path)
        data = tr.load_rated_images(rows)
        t_data = time.perf_counter() - t0
        split = tr.split_by_series(data.groups, args.holdout, args.seed)
        res = tr.train(data, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                       width=args.width, split=split)
        # reference: global noise of the same held-out images (HU from the written files)
        from analysis.volume import load_series

        noise = []
        for i in res.held_idx:
            v = load_series([Path(data.paths[i])])
            noise.append(estimate_noise_hu(v.hu[0], v.pixel_spacing_mm))
        noise = np.array(noise)
        ok = np.isfinite(noise)
        ref = dq.correlations(-noise[ok], res.held_true[ok])
        if args.out:
            ns = argparse.Namespace(labels="synthetic", width=args.width, epochs=args.epochs, batch_size=args.batch_size,
                                    lr=args.lr, seed=args.seed, device="cpu", ratings=str(csv_path) + " (temporary)")
            dq.save_weights(args.out, res.net, width=args.width, labels="synthetic", extra={"held_out": res.held_out})
            from analysis.weights import file_sha256

            tr.card_path(Path(args.out)).write_text(tr.model_card(
                ns, rows, data, res, command="bench/delta_iqa_synthetic.py " + " ".join(argv or sys.argv[1:]),
                ratings_sha=file_sha256(csv_path), weights_sha=file_sha256(args.out)), encoding="utf-8")
    n_train_series = len({data.groups[i] for i in res.train_idx})
    n_held_series = len({data.groups[i] for i in res.held_idx})
    h = res.held_out
    print("SYNTHETIC ratings (degradation levels, not radiologist scores)")
    print(f"images: {len(rows)} ({n_train_series} series train / {n_held_series} series held out: "
          f"{len(res.train_idx)} / {len(res.held_idx)} images); data {t_data:.0f} s")
    print(f"Delta-IQA width {args.width:g}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}: "
          f"training {res.seconds:.0f} s ({res.seconds / 60:.1f} min, {torch.get_num_threads()} threads)")
    print(f"{'held-out images':<28}{'PLCC':>8}{'SROCC':>8}{'KROCC':>8}")
    print(f"{'Delta-IQA':<28}{h['plcc']:>8.3f}{h['srocc']:>8.3f}{h['krocc']:>8.3f}")
    print(f"{'global noise (reference)':<28}{ref['plcc']:>8.3f}{ref['srocc']:>8.3f}{ref['krocc']:>8.3f}"
          f"   ({int(ok.sum())} images with soft tissue)")
    print(f"SROCC ratio Delta-IQA / global noise: {h['srocc'] / ref['srocc']:.2f}" if ref["srocc"] else "")
    print("training loss per epoch: " + ", ".join(f"{v:.3f}" for v in res.losses))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "labels": "synthetic", "images": len(rows), "train_images": len(res.train_idx), "held_images": len(res.held_idx),
            "train_series": n_train_series, "held_series": n_held_series, "epochs": args.epochs, "lr": args.lr,
            "batch": args.batch_size, "width": args.width, "train_s": res.seconds, "data_s": t_data,
            "delta_iqa": h, "global_noise": ref, "losses": res.losses}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
