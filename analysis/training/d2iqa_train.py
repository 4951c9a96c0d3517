"""Self-supervised training of the D2IQA detector (``qa-node train d2iqa``).

Every training sample is made fresh: a random slice of the training series, optionally with the air
inside the body replaced by tissue-range values (phantoms such as the shared head phantom are mostly
air inside the skull), a random simulated dose (projection-domain noise from ``analysis.training.dose_sim``:
one unit-``I0`` noise realisation per slice, rescaled to the dose, with ``I0_full`` calibrated per
series), a random crop with flips/rotations, and 2-5 freshly inserted virtual objects whose boxes and
classes are the labels. Optionally a share of built-in synthetic anatomical phantoms adds variety.

The lead mounts this module as ``qa-node train d2iqa``:

    add_arguments(parser)   # --data DIR... --out FILE [--epochs N | --minutes M] [--device auto] ...
    run(args) -> int        # exit status

Outputs: ``--out`` gets a weights-only file (``model_state_dict``, ``config``, ``meta``) that
``analysis.d2iqa.load_model`` reads; ``--out`` + ``.ckpt`` is the resumable checkpoint (model,
optimiser, step, elapsed time, RNG state), written every ``--checkpoint-minutes`` and at the end.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from analysis.d2iqa import STRIDE, D2IQANet, detection_loss, make_targets, n_parameters
from analysis.d2iqa_insert import InsertionConfig, insert_objects, placement_mask, sample_layout, window01
from analysis.mask import body_mask

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help="folders with CT DICOM series to train on (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE", help="weights file to write (a resumable checkpoint goes to FILE.ckpt)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=None, help="number of epochs of --steps-per-epoch steps")
    g.add_argument("--minutes", type=float, default=None, help="train for this many minutes (default 30)")
    parser.add_argument("--steps-per-epoch", type=int, default=200)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", metavar="CKPT", default=None, help="checkpoint (FILE.ckpt) to continue from")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256, help="training crop size in pixels (multiple of 16)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=24, help="network width (channels of the first stage)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (keep to the free cores)")
    parser.add_argument("--air-replace", type=float, default=0.5, help="probability of replacing in-body air by tissue values")
    parser.add_argument("--synthetic", type=float, default=0.15, help="share of samples from the crude built-in synthetic phantoms")
    parser.add_argument("--phantoms", type=int, default=0, metavar="N",
                        help="textured synthetic head/body phantoms (analysis.training.phantoms, 512 x 512, half each) in the pool")
    parser.add_argument("--phantom-share", type=float, default=0.6, help="share of samples from the --phantoms pool")
    parser.add_argument("--init", metavar="WEIGHTS", default=None,
                        help="start from these weights (fine-tune: fresh optimiser and schedule; --resume continues a run)")
    parser.add_argument("--min-dose", type=float, default=0.04, help="lowest simulated dose fraction (log-uniform up to 1)")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="SUBSTRING", help="skip files whose path contains any of these (held-out data)")
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--noise-cache", metavar="FILE", default=None,
                        help="npz cache of the per-slice unit noise (made on first use; saves minutes when resuming)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ------------------------------------------------------------------------------------------- data
@dataclass
class TrainSlice:
    hu: np.ndarray  # float32 (H, W), full dose
    spacing_mm: float
    i0_full: float
    source: str
    key: str = ""
    kind: str = ""  # "head"/"body" for a noise-free textured phantom (its full-dose noise is drawn per sample)
    _noise: np.ndarray | None = None
    _unit_sd: float | None = None
    _allowed: dict = field(default_factory=dict)


def _find_series(dirs: list[str], exclude: list[str]) -> dict[str, list[Path]]:
    import pydicom

    series: dict[str, list[Path]] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ValueError(f'Argument "--data": folder {d!r} does not exist')
        files = [root] if root.is_file() else [p for p in sorted(root.rglob("*")) if p.is_file()]
        for p in files:
            if any(s in str(p) for s in exclude):
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError):
                continue
            if str(getattr(ds, "Modality", "")) != "CT":
                continue
            series.setdefault(str(getattr(ds, "SeriesInstanceUID", p)), []).append(p)
    return series


def load_training_slices(dirs: list[str], exclude: list[str], rng: np.random.Generator) -> list[TrainSlice]:
    from analysis.training import dose_sim
    from analysis.results import SeriesSkipped
    from analysis.volume import load_series

    out: list[TrainSlice] = []
    for uid, paths in _find_series(dirs, exclude).items():
        try:
            vol = load_series(paths)
        except (SeriesSkipped, ValueError) as exc:
            log.warning("skipping a training series (%d files): %s", len(paths), exc)
            continue
        if vol.hu.shape[-1] < 128 or vol.hu.shape[-2] < 128:
            log.warning("skipping a training series with %s slices: too small", vol.hu.shape[-2:])
            continue
        ps = float(np.mean(vol.pixel_spacing_mm))
        try:
            i0 = dose_sim.calibrate_i0(vol.hu, pixel_spacing_mm=ps, rng=rng)
        except ValueError as exc:
            log.warning("I0 calibration failed (%s); using the default %.3g", exc, dose_sim.DEFAULT_I0_FULL)
            i0 = dose_sim.DEFAULT_I0_FULL
        log.info("training series %s: %d slices %s, %.3f mm, I0_full %.3g", paths[0].parent.name, vol.n_slices, vol.hu.shape[1:], ps, i0)
        for k in range(vol.n_slices):
            out.append(TrainSlice(vol.hu[k].astype(np.float32), ps, i0, f"{paths[0].parent.name}[{k}]", f"{uid}:{k}"))
    return out


def synthetic_phantom(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """A crude anatomical phantom in HU: an elliptical body (fat rim, soft tissue with low-frequency
    texture), a few organ-like ellipses, optional lung-like and bone-like regions."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = size / 2

    def ell(cx: float, cy: float, a: float, b: float, th: float) -> np.ndarray:
        x, y = xx - cx, yy - cy
        ct, st = math.cos(th), math.sin(th)
        return ((x * ct + y * st) / a) ** 2 + ((-x * st + y * ct) / b) ** 2 <= 1.0

    img = np.full((size, size), -1000.0, np.float32)
    a, b = rng.uniform(0.3, 0.46) * size, rng.uniform(0.25, 0.4) * size
    th = rng.uniform(-0.2, 0.2)
    body = ell(c, c, a, b, th)
    img[body] = -100.0
    inner = ell(c, c, a * 0.9, b * 0.88, th)
    tex = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), rng.uniform(6, 20))
    tex *= rng.uniform(8, 25) / (tex.std() + 1e-6)
    img[inner] = rng.uniform(20, 60) + tex[inner]
    for _ in range(int(rng.integers(2, 7))):
        e = ell(rng.uniform(c - a / 2, c + a / 2), rng.uniform(c - b / 2, c + b / 2), rng.uniform(15, 70), rng.uniform(15, 60), rng.uniform(0, math.pi)) & inner
        img[e] = rng.choice([-80.0, rng.uniform(10, 90), rng.uniform(10, 90)]) + tex[e]
    if rng.random() < 0.4:
        for sgn in (-1, 1):
            e = ell(c + sgn * a * 0.45, c - b * 0.1, a * 0.3, b * 0.45, 0.0) & inner
            img[e] = -850.0 + tex[e]
    if rng.random() < 0.6:
        e = ell(c, c + b * 0.6, rng.uniform(15, 30), rng.uniform(15, 30), 0.0) & inner
        img[e] = rng.uniform(300, 900)
    return ndimage.gaussian_filter(img, 1.0)


# Textured phantoms (analysis.training.phantoms) are noise free; each sample gets a full-dose noise SD drawn
# log-uniformly from this range (HU, soft tissue, 512 x 512), by kind. Routine head protocols measure
# about 3-5 HU and neck/abdomen about 10-15 HU here (N2Q card, analysis/training/n2q_train.py), 1 mm slices more.
PHANTOM_FULL_NOISE_HU = {"head": (2.5, 8.0), "body": (6.0, 25.0)}
# Seeds of the training phantoms: TRAIN_PHANTOM_SEED0 + k. bench/d2iqa_eval.py draws its held-out
# phantom series from HELDOUT_PHANTOM_SEED0 on, which no training run reaches (--phantoms is capped).
TRAIN_PHANTOM_SEED0 = 100_000
HELDOUT_PHANTOM_SEED0 = 900_000
MAX_PHANTOMS = HELDOUT_PHANTOM_SEED0 - TRAIN_PHANTOM_SEED0


def phantom_kind(k: int) -> str:
    return "head" if k % 2 else "body"


def make_training_phantoms(n: int, size: int = 512) -> list[TrainSlice]:
    """The ``n`` textured training phantoms (deterministic: phantom k uses seed TRAIN_PHANTOM_SEED0 + k)."""
    from analysis.training.phantoms import make_phantom

    if not 0 <= n <= MAX_PHANTOMS:
        raise ValueError(f'Argument "--phantoms" must be in [0, {MAX_PHANTOMS}], got {n}')
    out = []
    for k in range(n):
        kind = phantom_kind(k)
        hu, ps = make_phantom(kind, size, np.random.default_rng(TRAIN_PHANTOM_SEED0 + k))
        out.append(TrainSlice(hu, ps, float("nan"), f"phantom-{kind}-{TRAIN_PHANTOM_SEED0 + k}",
                              f"phantom:{TRAIN_PHANTOM_SEED0 + k}:{size}", kind=kind))
    return out


def tissue_sd(noise: np.ndarray, hu: np.ndarray) -> float:
    """SD of a noise image over the soft-tissue-like pixels of ``hu`` (-300..300 HU)."""
    m = (hu > -300) & (hu < 300)
    if m.sum() < 100:
        m = hu > -500
    return float(noise[m].std()) if m.any() else float(noise.std())


def _unit_noise(s: TrainSlice, rng: np.random.Generator) -> np.ndarray:
    if s._noise is None:
        from analysis.training import dose_sim

        s._noise = dose_sim.unit_noise(s.hu, pixel_spacing_mm=s.spacing_mm, rng=rng)[0].astype(np.float32)
    return s._noise


def fill_noise_cache(slices: list[TrainSlice], path: Path, rng: np.random.Generator) -> None:
    """Load the unit noise of every slice from ``path`` (npz, float16), computing and saving what is missing."""
    cached: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as z:
            cached = {k: z[k] for k in z.files}
    missing = [s for s in slices if s.key not in cached]
    for s in slices:
        if s.key in cached and cached[s.key].shape == s.hu.shape:
            s._noise = cached[s.key].astype(np.float32)
            if not np.isfinite(s._noise).all():
                s._noise = None
                missing.append(s)
    if not missing:
        log.info("noise cache %s: all %d slices cached", path, len(slices))
        return
    log.info("noise cache %s: computing unit noise for %d slices", path, len(missing))
    for s in missing:
        cached[s.key] = _unit_noise(s, rng)  # float32: a body's unit noise can pass float16's 65504
    tmp = Path(str(path) + ".tmp.npz")
    np.savez(tmp, **cached)
    os.replace(tmp, path)


def replace_air(hu: np.ndarray, rng: np.random.Generator, spacing_mm: float, target: float | None = None) -> np.ndarray:
    """In-body air (smoothed HU < -400) shifted to a tissue value, keeping its noise texture."""
    body = body_mask(hu, (spacing_mm, spacing_mm))
    air = body & (ndimage.uniform_filter(hu, 5) < -400.0)
    if not air.any():
        return hu
    target = float(rng.uniform(-60.0, 80.0)) if target is None else target
    out = hu.copy()
    out[air] = hu[air] + (target + 1000.0)
    return out


def _allowed(s: TrainSlice, img: np.ndarray, variant: int, config: InsertionConfig) -> np.ndarray:
    """Placement mask of slice ``s`` (variant 1: with its air replaced), computed once per slice. The
    air-replaced variant is computed at a mid-range tissue value; with smoothing and the footprint
    test it hardly depends on the value drawn."""
    if variant not in s._allowed:
        ref = img if variant == 0 else replace_air(s.hu, np.random.default_rng(0), s.spacing_mm, target=10.0)
        s._allowed[variant] = placement_mask(ref, config, pixel_spacing_mm=s.spacing_mm)
    return s._allowed[variant]


def make_sample(
    s: TrainSlice, rng: np.random.Generator, crop: int, config: InsertionConfig, air_replace: float, min_dose: float
) -> tuple[np.ndarray, tuple]:
    """One training crop (windowed, with objects) and its objects, or a crop with no objects."""
    variant = 0
    img = s.hu
    if not s.kind and air_replace > 0 and rng.random() < air_replace:
        img = replace_air(s.hu, rng, s.spacing_mm)
        variant = 1
    allowed = _allowed(s, img, variant, config)
    noise = _unit_noise(s, rng)
    dose = 1.0 if rng.random() < 0.15 else float(math.exp(rng.uniform(math.log(min_dose), 0.0)))
    if s.kind:  # noise-free phantom: full-dose noise of a random realistic SD, then the dose's share
        lo, hi = PHANTOM_FULL_NOISE_HU[s.kind]
        sd_full = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        if s._unit_sd is None:
            s._unit_sd = tissue_sd(noise, s.hu)
        i0_full = (s._unit_sd / sd_full) ** 2
        scale = math.sqrt(1.0 / (dose * i0_full))  # full-dose + added noise: variances add
    else:
        scale = 0.0 if dose >= 1.0 else math.sqrt((1.0 - dose) / (dose * s.i0_full))
    h, w = img.shape
    rr, cc = np.nonzero(allowed)
    if rr.size:
        k = int(rng.integers(rr.size))
        r0 = int(np.clip(rr[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, max(h - crop, 0)))
        c0 = int(np.clip(cc[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, max(w - crop, 0)))
    else:
        r0, c0 = int(rng.integers(0, max(h - crop, 0) + 1)), int(rng.integers(0, max(w - crop, 0) + 1))
    sl = (slice(r0, r0 + crop), slice(c0, c0 + crop))
    base = np.full((crop, crop), -1000.0, np.float32)
    nz = np.zeros((crop, crop), np.float32)
    al = np.zeros((crop, crop), bool)
    ph, pw = img[sl].shape
    base[:ph, :pw] = img[sl]
    nz[:ph, :pw] = noise[sl]
    al[:ph, :pw] = allowed[sl]
    # flips / rotations of the anatomy (the objects are drawn after, so their labels stay exact)
    kr = int(rng.integers(4))
    flip = bool(rng.integers(2))
    base, nz, al = (np.rot90(a, kr) for a in (base, nz, al))
    if flip:
        base, nz, al = (a[:, ::-1] for a in (base, nz, al))
    base, nz, al = (np.ascontiguousarray(a) for a in (base, nz, al))
    m = int(math.ceil(config.max_radius)) + 2
    al[:m], al[-m:], al[:, :m], al[:, -m:] = False, False, False, False
    objects = sample_layout(al, rng, config)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    noisy = base + np.float32(sign * scale) * nz
    return window01(insert_objects(noisy, objects, config.blur_sigma_px)), objects


# ------------------------------------------------------------------------------------------- train
def _resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError('Argument "--device cuda": CUDA is not available on this machine; use --device cpu or auto')
    return name


def run(args: argparse.Namespace) -> int:
    if args.crop % 16 or args.crop < 64:
        raise ValueError(f'Argument "--crop" must be a multiple of 16 and >= 64, got {args.crop}')
    torch.set_num_threads(max(1, int(args.threads)))
    device = _resolve_device(args.device)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = InsertionConfig()
    t_load = time.perf_counter()
    slices = load_training_slices(list(args.data), list(args.exclude), rng)
    n_real = len(slices)
    synth: list[TrainSlice] = []
    if args.synthetic > 0:
        from analysis.training import dose_sim

        for _ in range(16):
            synth.append(TrainSlice(synthetic_phantom(rng), 0.7, dose_sim.DEFAULT_I0_FULL * float(rng.uniform(0.3, 3.0)), "synthetic"))
    phantoms = make_training_phantoms(int(args.phantoms)) if args.phantoms else []
    if args.noise_cache:
        fill_noise_cache(slices + phantoms, Path(args.noise_cache), rng)
    if not slices and not synth and not phantoms:
        raise ValueError(f'Argument "--data": no CT slices found in {args.data}')
    log.info("training data: %d real slices, %d textured phantoms, %d crude synthetic phantoms (%.1f s to load)",
             n_real, len(phantoms), len(synth), time.perf_counter() - t_load)
    # real slices are drawn series-uniformly (a 140-slice phantom series must not drown a 1-slice patient)
    by_series: dict[str, list[TrainSlice]] = {}
    for sl in slices:
        by_series.setdefault(sl.key.rsplit(":", 1)[0], []).append(sl)
    series_lists = list(by_series.values())

    net = D2IQANet(width=args.width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    step, elapsed0 = 0, 0.0
    if args.init and args.resume:
        raise ValueError('Arguments "--init" and "--resume" exclude each other: --resume continues a run, --init starts a new one from weights')
    if args.init:
        blob = torch.load(args.init, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["model_state_dict"])
        log.info("initialised from %s (%s)", args.init, blob.get("meta", {}).get("steps", "?"))
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model_state_dict"])
        opt.load_state_dict(ck["optimizer_state_dict"])
        step, elapsed0 = int(ck["step"]), float(ck["elapsed_s"])
        rng = np.random.default_rng(ck.get("rng_seed", args.seed) + step)
        log.info("resumed from %s at step %d (%.1f min)", args.resume, step, elapsed0 / 60)
    total_steps = args.epochs * args.steps_per_epoch if args.epochs is not None else None
    total_s = None if total_steps is not None else 60.0 * (args.minutes if args.minutes is not None else 30.0)
    log.info("D2IQANet %d parameters on %s; %s", n_parameters(net), device,
             f"{total_steps} steps" if total_steps else f"{total_s / 60:.1f} min")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(str(out) + ".ckpt")
    meta = {
        "data": [str(d) for d in args.data], "exclude": list(args.exclude), "seed": args.seed, "crop": args.crop,
        "batch_size": args.batch_size, "lr": args.lr, "air_replace": args.air_replace, "synthetic": args.synthetic,
        "min_dose": args.min_dose, "n_real_slices": n_real, "device": device, "threads": args.threads,
        "phantoms": int(args.phantoms), "phantom_share": args.phantom_share, "phantom_seed0": TRAIN_PHANTOM_SEED0,
        "phantom_full_noise_hu": PHANTOM_FULL_NOISE_HU, "init": args.init,
        "torch": str(torch.__version__),
    }

    def save(final: bool) -> None:
        elapsed = elapsed0 + (time.perf_counter() - t0)
        blob = {"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "step": step,
                "elapsed_s": elapsed, "rng_seed": args.seed, "config": net.config, "meta": meta}
        tmp = Path(str(ckpt_path) + ".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, ckpt_path)
        if final:
            w = {"model_state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "config": net.config,
                 "meta": {**meta, "steps": step, "train_minutes": round(elapsed / 60, 2)}}
            tmp = Path(str(out) + ".tmp")
            torch.save(w, tmp)
            os.replace(tmp, out)

    try:
        from tqdm import tqdm

        bar = None if args.no_progress else tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    except ImportError:
        bar = None
    net.train()
    t0 = time.perf_counter()
    last_ckpt = t0
    ema = None
    while True:
        elapsed = elapsed0 + (time.perf_counter() - t0)
        if total_steps is not None and step >= total_steps:
            break
        if total_s is not None and elapsed >= total_s:
            break
        frac = step / total_steps if total_steps else elapsed / total_s
        lr = args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        imgs, objs = [], []
        for _ in range(args.batch_size):
            u = rng.random()
            if phantoms and (u < args.phantom_share or not (slices or synth)):
                s = phantoms[int(rng.integers(len(phantoms)))]
            elif synth and (not slices or rng.random() < args.synthetic):
                s = synth[int(rng.integers(len(synth)))]
            else:
                ser = series_lists[int(rng.integers(len(series_lists)))]
                s = ser[int(rng.integers(len(ser)))]
            im, ob = make_sample(s, rng, args.crop, config, args.air_replace, args.min_dose)
            imgs.append(im)
            objs.append(ob)
        x = torch.from_numpy(np.stack(imgs)[:, None]).to(device)
        targets = {k: v.to(device) for k, v in make_targets(objs, (args.crop // STRIDE, args.crop // STRIDE)).items()}
        loss, parts = detection_loss(net(x), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
        if step % 50 == 0:
            log.info("step %d  %.1f min  loss(ema) %.4f  heat %.4f size %.4f off %.4f  lr %.2e", step,
                     (elapsed0 + time.perf_counter() - t0) / 60, ema, parts["heat"], parts["size"], parts["offset"], lr)
        if time.perf_counter() - last_ckpt > 60.0 * args.checkpoint_minutes:
            save(final=False)
            last_ckpt = time.perf_counter()
    if bar is not None:
        bar.close()
    save(final=True)
    log.info("wrote %s after %d steps (%.1f min)", out, step, (elapsed0 + time.perf_counter() - t0) / 60)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m analysis.training.d2iqa_train``); the node mounts ``add_arguments``/``run``."""
    parser = argparse.ArgumentParser(prog="d2iqa-train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
