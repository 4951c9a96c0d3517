"""What fine-tuning LDCTIQA (``qa-node train ldctiqa``) costs on the CPU, beside its inference.

Real 512 x 512 slices (analysis.training.delta_iqa.SYNTHETIC_SOURCES under ../shared/data, at most
two per series: 13 in all; made-up scores: only the time is measured here) are passed through the trainer's own ``train``
(the published network, 27.6 M parameters, seeded random weights: the same FLOPs as ldct-iqa.pt;
NAdam, batch 8 accumulated over micro-batches of 2, augmentation on) for ``--images`` image steps.
Printed: wall and process CPU seconds per training image and step, beside the reference measured in
the same process on the same images: the forward pass the node runs per scored slice
(``analysis.ldctiqa.predict``, batch 4); the ratio cancels part of the machine's load. Then what a
few hundred ratings cost: 300 ratings, 240 training images (the default 20 % held out) x the default
3 epochs, plus the two held-out evaluations (init and result) of 60 images.

    .venv/bin/python bench/ldctiqa_finetune_cpu.py [--images N] [--threads T] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import ldctiqa as lq  # noqa: E402
from analysis.training import delta_iqa as dtr  # noqa: E402
from analysis.training import ldctiqa_train as tr  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=16, help="training image steps to time (default 16: 2 optimiser steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    files = dtr.synthetic_source_files(SHARED, max_per_series=2)[: a.images]
    from analysis.volume import load_series

    hu = np.stack([lq.to_512(load_series([f]).hu[:1])[0][0] for f in files])
    x01, _ = tr.window01(hu)
    data = tr.RatedImages(x=x01.astype(np.float16), scores=np.linspace(0, 4, len(files)),
                          groups=[str(f.parent) for f in files], paths=[str(f) for f in files])
    torch.manual_seed(0)
    net = lq.MultiHeadSwin().eval()

    # reference: the node's per-slice inference on the same images
    lq.predict(net, hu[:2])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    lq.predict(net, hu, batch_size=lq.DEFAULT_BATCH_CPU)
    ref_wall, ref_cpu = (time.perf_counter() - t0) / len(hu), (time.process_time() - c0) / len(hu)

    res = tr.train(net, data, (np.arange(len(files)), np.zeros(0, int)), epochs=1, seed=0, progress=False,
                   evaluate_init=False)
    wall, cpu = res.seconds / res.image_steps, res.cpu_seconds / res.image_steps
    steps_300 = 240 * tr.DEFAULT_EPOCHS
    total_300 = steps_300 * wall + 2 * 60 * ref_wall
    out = {
        "threads": a.threads, "image_steps": res.image_steps, "input": "512x512",
        "train_s_per_image_step_wall": round(wall, 3), "train_s_per_image_step_cpu": round(cpu, 3),
        "reference_forward_s_per_image_wall": round(ref_wall, 3), "reference_forward_s_per_image_cpu": round(ref_cpu, 3),
        "ratio_train_step_to_forward_wall": round(wall / ref_wall, 2),
        "estimate_300_ratings_3_epochs_min": round(total_300 / 60, 1),
    }
    print(f"fine-tuning ({a.threads} thread(s), {res.image_steps} image steps at 512 x 512, batch 8 / micro-batch 2): "
          f"{wall:.2f} s wall, {cpu:.2f} s CPU per image and step")
    print(f"reference (inference forward, batch 4, same images):                 "
          f"{ref_wall:.2f} s wall, {ref_cpu:.2f} s CPU per image; ratio {wall / ref_wall:.2f}")
    print(f"300 ratings (240 train x {tr.DEFAULT_EPOCHS} epochs + 2 x 60 held-out forwards): about "
          f"{total_300 / 60:.0f} min at this speed")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
