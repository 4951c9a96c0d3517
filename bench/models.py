"""Model inference speed: slices/s of each learned model's node entry point on a 300-slice 512x512
series made of synthetic anatomical phantoms with CT-like noise, at the batch the node runs with
(``--batch``, default: the device's default) beside the same model at batch 1 as the reference
(ratio = batched / batch 1 slices/s; on a loaded machine the interleaved reference cancels part of the
load), and beside the issue's budget (300 slices in 60 s: ratio >= 1 meets it).

    .venv/bin/python bench/models.py [--device auto|cpu|cuda] [--batch N] [--amp fp16|bf16|off]
        [--models n2q,d2iqa,ldctiqa,delta_iqa] [--slices 300] [--threads N] [--rounds 1]
        [--delta-iqa-weights PATH] [--json bench/results/models_<device>.json]

- N2Q and D2IQA: ``run_model`` (what the node runs; the body masks are recomputed for every timed
  run, as for a series no other model has touched). D2IQA scores its default 16 evenly spaced slices
  x 50 trials; its figure is series slices/s (300 / the time), its batch is trial images per pass.
- LDCTIQA: ``analysis.ldctiqa.score_series`` (what its ``run`` calls) with seeded random weights
  (the published file is not shipped; same architecture, same FLOPs) on its default 24 slices.
- Delta-IQA: ``run_model`` with ``--delta-iqa-weights PATH``, or by default ``random``: seeded random
  weights at the published width written to a temporary file (it ships none; same FLOPs).

``--series DIR`` times a real CT series instead (its files read by the node's loader; the first
``--slices`` slices in z order, or all of them when ``--slices`` is left out or larger), e.g. the
shared Philips phantom's 140 slices of 1 mm: ``--series ../shared/data/ct/philips_head_phantom/S2020_1mm_std
--slices 64``. The warm-up runs on its first 2 slices.

N2Q and D2IQA run a third time with ``channels_last = true`` (NHWC convolutions; ``--no-channels-last``
skips it), timed and compared with the default layout.

Each model's batched and batch-1 runs must give the same result (N2Q map within 1e-5, D2IQA scores
equal, the Likert scores within 1e-6 on the CPU); the line says so, or how far apart they are.
``--device cuda`` runs the GPU path (autocast per ``--amp``; CUDA syncs through the results' copy to
the host); without a GPU it stops with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 60.0  # issue target: a 300-slice series in < 60 s on this CPU


def make_volume(n: int, size: int = 512):
    import numpy as np
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from analysis.training.phantoms import make_phantom
    from analysis.volume import CTVolume

    rng = np.random.default_rng(0)
    base = [make_phantom("body", size, rng) for _ in range(4)]
    spacing = base[0][1]
    hu = np.empty((n, size, size), np.float32)
    for i in range(n):
        img = base[i % len(base)][0]
        hu[i] = img + rng.normal(0, 12, img.shape).astype(np.float32)
    uids = [generate_uid() for _ in range(n)]
    headers = []
    for uid in uids:
        ds = Dataset()
        ds.SOPInstanceUID = uid
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        headers.append(ds)
    return CTVolume(hu=hu, pixel_spacing_mm=(spacing, spacing), slice_positions_mm=np.arange(n, dtype=float),
                    sop_instance_uids=uids, frame_numbers=[None] * n,
                    sop_class_uids=["1.2.840.10008.5.1.4.1.1.2"] * n, ctdivol_mgy=np.full(n, 10.0),
                    headers=headers, meta={"kvp": 120.0, "slice_thickness_mm": 1.0, "body_part": "ABDOMEN"})


def load_volume(folder: Path, n: int | None):
    """The first ``n`` slices (z order) of the CT series in ``folder`` (all when ``n`` is None or larger)."""
    import dataclasses

    from analysis.volume import load_series

    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    vol = load_series(files)
    k = vol.n_slices if n is None else min(n, vol.n_slices)
    return dataclasses.replace(
        vol, hu=vol.hu[:k].copy(), slice_positions_mm=vol.slice_positions_mm[:k],
        sop_instance_uids=vol.sop_instance_uids[:k], frame_numbers=vol.frame_numbers[:k],
        sop_class_uids=vol.sop_class_uids[:k], ctdivol_mgy=vol.ctdivol_mgy[:k], headers=vol.headers[:k],
        body_masks=None)


class Runner:
    """One model: ``run(batch)`` -> (comparable result, batch actually used); ``compare(a, b)`` -> (same, how far)."""

    def __init__(self, name: str, vol, device: str, amp: str, delta_weights: str):
        import numpy as np
        import torch

        from analysis.results import RunContext

        self.name, self.vol, self.device, self.amp = name, vol, device, amp
        self.ctx = lambda opts: RunContext(device=device, torch_threads=torch.get_num_threads(),
                                           options={name: opts} if opts is not None else {})
        self.scored = vol.n_slices
        if name == "ldctiqa":
            from analysis.ldctiqa import DEFAULT_BATCH_CPU, DEFAULT_BATCH_CUDA, MultiHeadSwin

            torch.manual_seed(0)
            self.net = MultiHeadSwin().eval().to(device)  # random weights: same architecture and FLOPs
            self.default_batch = DEFAULT_BATCH_CUDA if device == "cuda" else DEFAULT_BATCH_CPU
        elif name == "n2q":
            from analysis import n2q

            self.default_batch = n2q.DEFAULT_BATCH_CUDA if device == "cuda" else n2q.DEFAULT_BATCH_CPU
        elif name == "d2iqa":
            from analysis import d2iqa

            self.default_batch = d2iqa.DEFAULT_BATCH_CUDA if device == "cuda" else d2iqa.DEFAULT_BATCH_CPU
        elif name == "delta_iqa":
            from analysis.models.delta_iqa import Options

            if delta_weights == "random":
                import logging
                import tempfile

                from analysis import delta_iqa

                torch.manual_seed(0)
                delta_weights = str(Path(tempfile.mkdtemp(prefix="bench-delta-")) / "random.pt")
                delta_iqa.save_weights(delta_weights, delta_iqa.build_network(1.0), width=1.0, labels="random")
                logging.getLogger("analysis.models.delta_iqa").setLevel(logging.ERROR)  # "not site labels", once a run
            elif not Path(delta_weights).is_file():
                raise LookupError(f"no Delta-IQA weights at {delta_weights}")
            self.default_batch = Options().batch
        else:
            raise LookupError(f"unknown model {name!r}")
        self.delta_weights = delta_weights
        self._np = np

    def run(self, batch: int | None, channels_last: bool = False):
        np = self._np
        vol = self.vol
        vol.body_masks = None  # every timed run computes its masks (as for a series no other model touched)
        if self.name == "ldctiqa":
            from analysis.ldctiqa import DEFAULT_MAX_SLICES, score_series

            out = score_series(self.net, vol.hu, device=self.device, max_slices=DEFAULT_MAX_SLICES, batch_size=batch)
            self.scored = len(out.indices)
            return np.asarray(out.slice_expected_score, float)
        from analysis.pipeline import run_model

        if self.name == "n2q":
            from analysis.models.n2q import Options

            out = run_model("n2q", vol, self.ctx(Options(batch=batch, amp=self.amp, channels_last=channels_last)))
            return out.maps[0].values
        if self.name == "d2iqa":
            from analysis.models.d2iqa import Options

            out = run_model("d2iqa", vol, self.ctx(Options(batch=batch, amp=self.amp, channels_last=channels_last)))
            s = out.slice_metrics["d2iqa_score"]
            self.scored = int(np.isfinite(s).sum())
            return np.asarray(s, float)
        from analysis.models.delta_iqa import Options

        opts = Options(weights=self.delta_weights, batch=batch or Options().batch)
        out = run_model("delta_iqa", vol, self.ctx(opts))
        s = out.slice_metrics["delta_iqa_score"]
        self.scored = int(np.isfinite(s).sum())
        return np.asarray(s, float)

    def compare(self, a, b) -> tuple[bool, float]:
        np = self._np
        fa, fb = np.isfinite(a), np.isfinite(b)
        if not np.array_equal(fa, fb):
            return False, float("inf")
        d = float(np.max(np.abs(a[fa] - b[fb]))) if fa.any() else 0.0
        return d <= {"n2q": 1e-5, "d2iqa": 0.0}.get(self.name, 1e-6), d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="n2q,d2iqa,ldctiqa,delta_iqa")
    ap.add_argument("--slices", type=int, default=None,
                    help="slices of the series (default: 300 synthetic; with --series all of its slices)")
    ap.add_argument("--series", type=Path, default=None,
                    help="a folder with one real CT series to time instead of the synthetic phantoms")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=0, help="slices (D2IQA: trial images) per pass; 0 = the device's default")
    ap.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "off"], help="CUDA autocast of N2Q and D2IQA")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved (batched, batch 1) rounds; the median is shown")
    ap.add_argument("--delta-iqa-weights", default="random",
                    help="a Delta-IQA weights file (qa-node train delta_iqa --out); random = seeded random weights")
    ap.add_argument("--json", default="", help="write the figures to this file")
    ap.add_argument("--no-channels-last", action="store_true",
                    help="skip the third run of N2Q and D2IQA with channels_last = true")
    args = ap.parse_args()
    if args.series is not None and not args.series.is_dir():
        ap.error(f"--series {args.series}: not a folder")
    if args.slices is None and args.series is None:
        args.slices = 300
    if args.batch < 0 or args.rounds < 1 or (args.slices is not None and args.slices < 2):
        ap.error("--batch must be >= 0, --rounds >= 1, --slices >= 2")

    import numpy as np
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from node.worker import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"bench/models.py: {exc}", file=sys.stderr)
        return 2
    if args.series is not None:
        vol = load_volume(args.series, args.slices)
        args.slices = vol.n_slices
        source = f"{args.series.name} (real series, {vol.pixel_spacing_mm[0]:.2f} mm pixels)"
    else:
        vol = make_volume(args.slices)
        source = "synthetic phantoms"
    target = 300 / TARGET_S
    where = (f"CUDA {torch.cuda.get_device_name(0)}, autocast {args.amp} (N2Q, D2IQA; LDCTIQA fp16)"
             if device == "cuda" else f"CPU, {torch.get_num_threads()} threads, fp32")
    print(f"{args.slices} slices of {vol.hu.shape[1]}x{vol.hu.shape[2]} ({source}) on {where}; reference: the same model at batch 1; "
          f"target {TARGET_S:.0f} s per 300 slices = {target:.1f} slices/s")
    results = {"device": device, "where": where, "slices": args.slices, "source": source, "threads": torch.get_num_threads(),
               "amp": args.amp if device == "cuda" else "fp32", "rounds": args.rounds,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "load_average_start": [round(v, 2) for v in os.getloadavg()], "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            r = Runner(name, vol, device, args.amp, args.delta_iqa_weights)
        except LookupError as exc:
            print(f"{name:<10} skipped: {exc}")
            results["models"][name] = {"skipped": str(exc)}
            continue
        batch = args.batch or None
        used = args.batch or r.default_batch
        variants = [("batched", batch, False), ("batch1", 1, False)]
        if name in ("n2q", "d2iqa") and not args.no_channels_last:
            variants.append(("channels_last", batch, True))  # the option [analysis.<model>] channels_last
        full, r.vol = r.vol, (load_volume(args.series, 2) if args.series is not None else make_volume(2))
        for _, b, cl in variants:  # warm-up: weights loaded once per process, kernels chosen
            r.run(b, cl)
        r.vol = full
        times: dict[str, list[float]] = {key: [] for key, _, _ in variants}
        outs = {}
        for k in range(args.rounds):
            for key, b, cl in variants:
                t0 = time.perf_counter()
                outs[key] = r.run(b, cl)
                times[key].append(time.perf_counter() - t0)
                print(f"{'':<10} round {k + 1} {key}: {times[key][-1]:.1f} s (load average {os.getloadavg()[0]:.2f})",
                      flush=True)  # as it goes: a run cut short keeps its rounds
        t_b, t_1 = statistics.median(times["batched"]), statistics.median(times["batch1"])
        same, diff = r.compare(outs["batched"], outs["batch1"])
        rate_b, rate_1 = args.slices / t_b, args.slices / t_1
        kind = "trial images" if name == "d2iqa" else "slices"
        scored = f", {r.scored} scored" if r.scored != args.slices else ""
        print(f"{name:<10} batch {used:>2} ({kind}/pass{', device default' if not args.batch else ''}): "
              f"{t_b:6.1f} s = {rate_b:6.2f} slices/s{scored} | batch 1: {t_1:6.1f} s = {rate_1:6.2f} slices/s | "
              f"ratio {rate_b / rate_1:.2f} | target ratio {rate_b / target:.2f} | "
              f"{'same result' if same else 'DIFFERENT result'} (max |diff| {diff:.2g})")
        results["models"][name] = {
            "batch": used, "batch_is_default": not args.batch, "seconds": times["batched"], "seconds_batch1": times["batch1"],
            "slices_per_s": rate_b, "slices_per_s_batch1": rate_1, "ratio_to_batch1": rate_b / rate_1,
            "ratio_to_target": rate_b / target, "scored_slices": r.scored, "same_result": same, "max_abs_diff": diff,
            "load_average_end": [round(v, 2) for v in os.getloadavg()]}
        print(f"{'':<10} rounds {args.rounds} (batched, batch 1 alternating): batched "
              + ", ".join(f"{t:.1f}" for t in times["batched"]) + " s; batch 1 "
              + ", ".join(f"{t:.1f}" for t in times["batch1"]) + " s; load average (1, 5, 15 min) at the end "
              + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        if "channels_last" in times:
            t_c = statistics.median(times["channels_last"])
            _, d_c = r.compare(outs["channels_last"], outs["batched"])
            print(f"{'':<10} channels_last = true, batch {used}: {t_c:6.1f} s = {args.slices / t_c:6.2f} slices/s | "
                  f"ratio to the default layout {t_b / t_c:.2f}, to batch 1 {t_1 / t_c:.2f} | "
                  f"max |diff| to the default layout {d_c:.2g} (float rounding; why it is off by default)")
            results["models"][name].update(seconds_channels_last=times["channels_last"],
                                           slices_per_s_channels_last=args.slices / t_c,
                                           ratio_channels_last_to_default=t_b / t_c, max_abs_diff_channels_last=d_c)
        if args.json:  # after every model, so a run cut short keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(m.get("same_result", True) or device == "cuda" for m in results["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
