"""The cheap measured figures of the model cards (analysis/weights/*_MODEL_CARD.md), reprinted: the
ones that no evaluation script (``bench/n2q_eval.py``, ``bench/d2iqa_eval.py``,
``bench/d2iqa_convergence.py``, ``bench/models.py``) prints.

- sizes: parameters and file size of the shipped N2Q and D2IQA weights; LDCTIQA's state-dict entries and
  parameters (the architecture, no weights needed);
- LDCTIQA: the seeded random weights of ``tests/unit/test_ldctiqa.py`` on its three real slices against
  the committed golden reference outputs (``tests/data/ldctiqa_golden.npz``) and, where torchvision's
  ``swin_transformer.py`` is installed, against the reference model itself (max |difference| of the class
  probabilities); the CPU time of one 512 x 512 slice on one thread (best of --repeat) and the share of
  it spent in fp32 matrix multiplication (torch profiler: aten::mm/addmm/bmm self CPU time);
- D2IQA "Diagnosis" and "Training data": global noise (``dose_sim.estimate_noise_hu``) of the held-out
  sets of ``bench/d2iqa_eval.py`` and of the neck slice ``bad_sequence.dcm``; for S2010 also at 25 % and
  5 % dose, both by the quantum-noise scaling 1/sqrt(dose) and measured on images simulated with
  ``dose_sim.simulate_low_dose`` (I0_full calibrated to the series, on --sim-slices evenly spaced
  slices); the objects' contrast (8-10 % of the 1400 HU window) over that noise (per-pixel CNR).

    .venv/bin/python bench/model_cards.py [--repeat 2] [--sim-slices 8] [--json bench/results/model_cards.json]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis import d2iqa, ldctiqa, n2q  # noqa: E402
from analysis.training import dose_sim  # noqa: E402
from analysis.volume import load_series  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def _params(net: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def sizes() -> dict:
    res = {}
    m = n2q.load_model()
    res["N2Q"] = {"parameters": _params(m.net), "file_mb": Path(m.path).stat().st_size / 1e6,
                  "norm": m.config.get("norm", "instance")}
    d = d2iqa.load_model()
    res["D2IQA"] = {"parameters": _params(d.net), "file_mb": Path(d.path).stat().st_size / 1e6}
    net = ldctiqa.MultiHeadSwin()
    res["LDCTIQA"] = {"parameters": _params(net), "state_dict_entries": len(net.state_dict())}
    for name, r in res.items():
        extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "parameters")
        print(f"{name:<8} {r['parameters']:,} parameters; {extra}")
    return res


def ldctiqa_figures(repeat: int) -> dict:
    from tests.unit import test_ldctiqa as t

    res: dict = {}
    g = np.load(t.GOLDEN)
    net = ldctiqa.MultiHeadSwin().eval()
    net.load_state_dict(t.seeded_state(net.state_dict(), int(g["seed"])), strict=True)
    hu = t.real_slices()
    probs, _ = ldctiqa.predict(net, hu, batch_size=3)
    res["max_abs_diff_vs_golden"] = float(np.abs(probs - g["probabilities"]).max())
    print(f"LDCTIQA seeded weights on {len(hu)} real slices: max |p - golden reference| "
          f"{res['max_abs_diff_vs_golden']:.2e} (test tolerance 1e-5)")
    if t.REF is not None:
        ref = t.ReferenceMultiHeadSwin(t.REF).eval()
        ref.load_state_dict(t.seeded_state(ref.state_dict(), int(g["seed"])), strict=True)
        x, _ = ldctiqa.preprocess(hu)
        with torch.inference_mode():
            p_ref = ref(x).double().numpy()
        res["max_abs_diff_vs_reference"] = float(np.abs(probs - p_ref).max())
        print(f"        against torchvision's swin_transformer.py wrapped as ldct-benchmark's MultiHeadSwin: "
              f"max |p - p_ref| {res['max_abs_diff_vs_reference']:.2e}"
              + (" (bit-identical)" if res["max_abs_diff_vs_reference"] == 0.0 else ""))
    else:
        print("        torchvision's swin_transformer.py not installed: reference comparison skipped")
    x, _ = ldctiqa.preprocess(hu[:1])
    best = float("inf")
    with torch.inference_mode():
        net(x)  # warm-up
        for _ in range(repeat):
            c0 = time.process_time()
            net(x)
            best = min(best, time.process_time() - c0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS)
    res["cpu_s_per_slice_1_thread"] = best
    res["matmul_share"] = mm / total if total else float("nan")
    print(f"        one 512x512 slice, 1 thread: {best:.2f} s CPU (best of {repeat}); "
          f"matrix multiplication {100 * res['matmul_share']:.0f} % of the forward pass")
    return res


def d2iqa_noise(sim_slices: int) -> dict:
    import importlib.util

    from pydicom.data import get_testdata_file

    # bench/ is not put on sys.path: bench/analysis.py would shadow the analysis package
    spec = importlib.util.spec_from_file_location("d2iqa_eval", ROOT / "bench" / "d2iqa_eval.py")
    d2iqa_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(d2iqa_eval)
    heldout_series = d2iqa_eval.heldout_series

    res: dict = {}
    series = dict(heldout_series())
    p = get_testdata_file("bad_sequence.dcm", download=False)
    if p:
        series["bad_sequence (neck)"] = [Path(p)]
    for name, paths in series.items():
        vol = load_series(paths)
        ps = float(np.mean(vol.pixel_spacing_mm))
        gn = dose_sim.estimate_noise_hu(vol.hu, ps)
        res[name] = {"global_noise_hu": gn}
        line = f"D2IQA held-out/training noise: {name:<22} {gn:5.2f} HU"
        if name.startswith("philips_S2010"):
            idx = np.unique(np.linspace(0, vol.n_slices - 1, min(sim_slices, vol.n_slices)).round().astype(int))
            hu = vol.hu[idx]
            i0 = dose_sim.calibrate_i0(vol.hu, pixel_spacing_mm=ps, rng=0)
            low = dose_sim.simulate_low_dose(hu, (0.25, 0.05), i0, pixel_spacing_mm=ps, rng=0)
            for k, dose in enumerate((0.25, 0.05)):
                scaled = gn / np.sqrt(dose)
                sim = dose_sim.estimate_noise_hu(low[k], ps)
                res[name][f"{dose:g}"] = {"scaled_hu": scaled, "simulated_hu": sim,
                                          "cnr_min_scaled": 112.0 / scaled, "cnr_min_simulated": 112.0 / sim}
                line += (f"; {100 * dose:g} %: {scaled:.1f} HU scaled 1/sqrt(dose), {sim:.1f} HU simulated "
                         f"({len(idx)} slices); CNR of a 112 HU object {112.0 / scaled:.1f} / {112.0 / sim:.1f}")
        print(line)
    print("D2IQA objects: contrast 8, 9, 10 % of the [-1000, 400] HU window = "
          + ", ".join(f"{0.01 * c * 1400:.0f}" for c in (8, 9, 10)) + " HU")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sim-slices", type=int, default=8, help="S2010 slices for the simulated 25 %% / 5 %% doses")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # invalid-UID echoes on bad_sequence.dcm
    warnings.simplefilter("ignore", UserWarning)  # pydicom's invalid-UID echoes on bad_sequence.dcm
    t0 = time.perf_counter()
    res = {"sizes": sizes(), "ldctiqa": ldctiqa_figures(args.repeat), "d2iqa_noise": d2iqa_noise(args.sim_slices)}
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
