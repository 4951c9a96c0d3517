"""Model inference speed: slices/s of each model's node entry point (``run(volume, ctx)``) on a
300-slice 512x512 series made of synthetic anatomical phantoms with CT-like noise, beside the
target budget (300 slices in 60 s) as the reference: ratio = measured / target slices/s (>= 1 meets it).

    .venv/bin/python bench/models.py [--models n2q,d2iqa,ldctiqa,classical] [--slices 300] [--device auto]
                                     [--threads N]

LDCTIQA runs its scoring (``analysis.ldctiqa.score_series``, what the model's ``run`` calls) with seeded random weights (the
published file is not shipped; same architecture, same FLOPs) on its default evenly spaced subset of
``DEFAULT_MAX_SLICES`` slices, and reports scored slices/s (CUDA: with fp16 autocast).

On this CPU it runs with ``--threads`` torch threads (default: all cores); on a machine with a GPU,
``--device auto`` measures there.
"""

from __future__ import annotations

import argparse
import os
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


def bench_ldctiqa(vol, device: str, target: float) -> None:
    import numpy as np
    import torch

    from analysis.ldctiqa import DEFAULT_MAX_SLICES, MultiHeadSwin, score_series

    torch.manual_seed(0)
    net = MultiHeadSwin().eval().to(device)  # random weights: same architecture and FLOPs as ldct-iqa.pt
    n = vol.hu.shape[0]
    score_series(net, vol.hu[:2], device=device, max_slices=0)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    out = score_series(net, vol.hu, device=device, max_slices=DEFAULT_MAX_SLICES)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    scored = len(out.indices)
    assert np.isfinite(out.series_expected_score)
    rate = n / dt
    amp = " (fp16 autocast)" if device == "cuda" else ""
    print(f"{'ldctiqa':<10} {dt:7.1f} s for the series ({rate:6.2f} series-slices/s, {scored} slices scored){amp}; "
          f"ratio to target {rate / target:.2f} ({'meets' if dt <= TARGET_S * n / 300 else 'misses'})")
    print(f"{'':<10} LDCTIQA on the default subset of {DEFAULT_MAX_SLICES} slices: {scored / dt:.2f} scored slices/s "
          f"({dt / max(scored, 1):.2f} s per scored slice; all {n} slices would take {n * dt / max(scored, 1):.0f} s); "
          f"process CPU time {cpu:.1f} s (wall >> CPU x threads means other work shared the cores)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="n2q,d2iqa,ldctiqa")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from analysis.pipeline import run_model
    from analysis.results import RunContext
    from node.worker import resolve_device

    device = resolve_device(args.device)
    vol = make_volume(args.slices)
    ctx = RunContext(device=device, torch_threads=torch.get_num_threads())
    target = args.slices / (TARGET_S * args.slices / 300)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.slices} slices of 512x512 on {where}; target {TARGET_S:.0f} s per 300 slices "
          f"= {300 / TARGET_S:.1f} slices/s")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name == "ldctiqa":
            bench_ldctiqa(vol, device, target)
            continue
        run_model(name, make_volume(2), ctx)  # warm-up: weights loaded once per process, kernels compiled
        t0 = time.perf_counter()
        out = run_model(name, vol, ctx)
        dt = time.perf_counter() - t0
        scored = args.slices
        if name == "d2iqa":
            import numpy as np

            scored = int(np.isfinite(out.slice_metrics.get("d2iqa_score", np.full(args.slices, np.nan))).sum())
        rate = args.slices / dt
        print(f"{name:<10} {dt:7.1f} s for the series ({rate:6.2f} series-slices/s, {scored} slices scored); "
              f"ratio to target {rate / target:.2f} ({'meets' if dt <= TARGET_S * args.slices / 300 else 'misses'})")
        if name == "d2iqa":
            from analysis.models.d2iqa import DEFAULT_MAX_SLICES, DEFAULT_TRIALS

            print(f"{'':<10} D2IQA at the default T={DEFAULT_TRIALS} on the default subset of {DEFAULT_MAX_SLICES} slices: "
                  f"{scored / dt:.2f} scored slices/s ({dt / max(scored, 1):.2f} s per scored slice)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
