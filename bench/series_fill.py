"""What batching slices of several short series together would change, per learned model, on the
device at hand: the inputs of a design decision (docs/series_batching.md), not a feature.

``--series`` short series of ``--slices`` slices each (synthetic 512 x 512 body phantoms with CT-like
noise, different content per series) go through each model's slice runner three ways:

- one at a time: each series alone, in passes of at most ``--batch`` slices (what a worker does
  today: a series shorter than the batch runs one partly filled pass);
- filled: all series' slices concatenated, in full passes of ``--batch`` (what series batching does);
- batch 1: every slice alone (the reference of bench/models.py).

It prints seconds and slices/s of each, the ratio filled / one at a time, and for each series the
largest |difference| between its filled and its one-at-a-time results; then whether a series' result
depends on the *shape* of the pass or on the *other slices* in it: series 0 run in a pass of
``--batch`` with its own slices padded by zero images, against the same pass shape shared with the
other series (bit-identical means: sharing a pass of a fixed shape is invisible to a series).

    .venv/bin/python bench/series_fill.py [--device cpu|cuda] [--models n2q,ldctiqa,delta_iqa]
        [--series 4] [--slices 2] [--batch 8] [--threads 2] [--rounds 1] [--built] [--json PATH]

``--built``: also the node's series batching as built (``[analysis] series_batch = "on"``: each
model's ``*_many`` runner over ``analysis.batching.run_across``, every pass padded to ``--batch``),
all series together against each series alone through the same runner, with the largest
|difference| between the two per series (0 = bit-identical, what the node relies on).

N2Q: ``analysis.n2q.predict_quality`` (shipped weights); LDCTIQA: ``analysis.ldctiqa.predict`` with
seeded random weights (the published file is not shipped; same FLOPs); Delta-IQA:
``analysis.delta_iqa.predict_probs`` with seeded random weights. D2IQA is left out: it batches the
trial images of one slice (50 by default), so its passes are full whatever the series' length.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_series(n_series: int, n_slices: int, size: int = 512):
    import numpy as np

    from analysis.training.phantoms import make_phantom

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_series):
        img = make_phantom("body", size, rng)[0]
        out.append(np.stack([img + rng.normal(0, 12, img.shape).astype(np.float32) for _ in range(n_slices)]))
    return out


def runner(name: str, device: str):
    """name -> fn(hu (n, H, W), batch) -> per-slice result array (n, ...)."""
    import numpy as np
    import torch

    if name == "n2q":
        from analysis import n2q

        return lambda hu, b: n2q.predict_quality(hu, device=device, batch=b)[0]
    if name == "ldctiqa":
        from analysis import ldctiqa

        torch.manual_seed(0)
        net = ldctiqa.MultiHeadSwin().eval().to(device)
        return lambda hu, b: ldctiqa.predict(net, hu, device=device, batch_size=b)[0]
    if name == "delta_iqa":
        from analysis import delta_iqa

        torch.manual_seed(0)
        net = delta_iqa.build_network(1.0).eval().to(device)
        return lambda hu, b: np.asarray(delta_iqa.predict_probs(net, hu, device=device, batch=b))
    raise LookupError(f"unknown model {name!r}")


def built_runner(name: str, device: str):
    """name -> fn(list of hu (n_i, H, W), batch) -> list of per-slice result arrays: the node's
    series-batching runner of that model (fixed-shape passes across series)."""
    import numpy as np
    import torch

    if name == "n2q":
        from analysis import n2q

        return lambda hus, b: n2q.predict_quality_many(hus, device=device, batch=b)[0]
    if name == "ldctiqa":
        from analysis import ldctiqa

        torch.manual_seed(0)
        net = ldctiqa.MultiHeadSwin().eval().to(device)
        return lambda hus, b: [r.probabilities for r in ldctiqa.score_many(net, hus, device=device, max_slices=0,
                                                                           batch_size=b)[0]]
    if name == "delta_iqa":
        from analysis import delta_iqa

        torch.manual_seed(0)
        net = delta_iqa.build_network(1.0).eval().to(device)
        return lambda hus, b: [np.asarray(p) for p in delta_iqa.predict_probs_many(net, hus, device=device, batch=b)[0]]
    raise LookupError(f"unknown model {name!r}")


def maxdiff(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default="n2q,ldctiqa,delta_iqa")
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--slices", type=int, default=2, help="slices per series")
    ap.add_argument("--batch", type=int, default=8, help="slices per pass")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the median time is shown")
    ap.add_argument("--built", action="store_true", help="also time the node's series batching as built")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import numpy as np
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    series = make_series(args.series, args.slices)
    allhu = np.concatenate(series)
    n = len(allhu)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"{args.series} series x {args.slices} slices of 512x512 on {args.device}, {torch.get_num_threads()} "
          f"threads, fp32 on the CPU; pass of {args.batch} slices")
    figures = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with torch.inference_mode():
            fn = runner(name, args.device)
            fn(series[0][:1], 1)  # warm-up (weights loaded, kernels chosen)
            t_one, t_fill, t_ref = [], [], []
            for _ in range(args.rounds):
                t, one = timed(lambda: [fn(s, args.batch) for s in series])
                sync()
                t_one.append(t)
                t, filled = timed(lambda: fn(allhu, args.batch))
                sync()
                t_fill.append(t)
                t, ref = timed(lambda: fn(allhu, 1))
                sync()
                t_ref.append(t)
            offsets = np.cumsum([0] + [len(s) for s in series])
            per_series = [maxdiff(filled[offsets[i]:offsets[i + 1]], one[i]) for i in range(len(series))]
            s0 = series[0]
            padded = np.concatenate([s0, np.zeros((args.batch - len(s0), *s0.shape[1:]), np.float32)])
            alone_fixed = fn(padded, args.batch)[:len(s0)]
            shared_fixed = fn(allhu[:args.batch], args.batch)[:len(s0)]
            shape_vs_others = maxdiff(alone_fixed, shared_fixed)
            to_ref = maxdiff(filled, ref)
        m_one, m_fill, m_ref = (statistics.median(x) for x in (t_one, t_fill, t_ref))
        row = dict(model=name, one_at_a_time_s=m_one, filled_s=m_fill, batch1_s=m_ref,
                   one_at_a_time_slices_per_s=n / m_one, filled_slices_per_s=n / m_fill, batch1_slices_per_s=n / m_ref,
                   ratio_filled_to_one_at_a_time=m_one / m_fill, ratio_filled_to_batch1=m_ref / m_fill,
                   max_diff_filled_vs_one_at_a_time_per_series=per_series, max_diff_filled_vs_batch1=to_ref,
                   max_diff_fixed_shape_alone_vs_shared=shape_vs_others)
        if args.built:
            with torch.inference_mode():
                many = built_runner(name, args.device)
                many([series[0][:1]], 1)  # warm-up
                t_balone, t_bjoint = [], []
                for _ in range(args.rounds):
                    t, b_alone = timed(lambda: [many([s], args.batch)[0] for s in series])
                    sync()
                    t_balone.append(t)
                    t, b_joint = timed(lambda: many(series, args.batch))
                    sync()
                    t_bjoint.append(t)
            m_ba, m_bj = statistics.median(t_balone), statistics.median(t_bjoint)
            b_diff = [maxdiff(x, y) for x, y in zip(b_joint, b_alone)]
            row.update(built_alone_s=m_ba, built_together_s=m_bj, built_alone_slices_per_s=n / m_ba,
                       built_together_slices_per_s=n / m_bj, ratio_built_together_to_alone=m_ba / m_bj,
                       max_diff_built_together_vs_alone_per_series=b_diff)
        figures.append(row)
        print(f"{name:<10} one at a time {m_one:6.2f} s = {n / m_one:6.2f} slices/s | filled {m_fill:6.2f} s = "
              f"{n / m_fill:6.2f} slices/s | batch 1 {m_ref:6.2f} s = {n / m_ref:6.2f} slices/s | ratio filled/one "
              f"{m_one / m_fill:.2f}, filled/batch 1 {m_ref / m_fill:.2f}")
        print(f"{'':<10} filled vs one at a time, per series max |diff|: "
              f"{', '.join(f'{d:.2g}' for d in per_series)}; filled vs batch 1: {to_ref:.2g}; "
              f"same pass shape, alone (zero-padded) vs shared: {shape_vs_others:.2g}")
        if args.built:
            print(f"{'':<10} built (series_batch on): alone {row['built_alone_s']:6.2f} s = "
                  f"{row['built_alone_slices_per_s']:6.2f} slices/s | together {row['built_together_s']:6.2f} s = "
                  f"{row['built_together_slices_per_s']:6.2f} slices/s | ratio "
                  f"{row['ratio_built_together_to_alone']:.2f}; together vs alone, per series max |diff|: "
                  f"{', '.join(f'{d:.2g}' for d in row['max_diff_built_together_vs_alone_per_series'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "figures": figures}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
