"""Self-supervised N2Q training: ``qa-node train n2q --data DIR... --out FILE [--epochs N] ...``.

No labels are needed. Training pairs come from routine-dose slices alone:

1. a *pool* of base slices at the model resolution (256 x 256): real routine-dose CT slices found
   under ``--data`` (every CT file, recursively; ``--exclude`` glob patterns on file names keep
   held-out files out) and synthetic phantoms (``analysis.training.phantoms``: body and head, several sizes);
   for each base slice two projection-domain noise realisations at I0 = 1 are simulated once
   (``analysis.training.dose_sim.unit_noise``) and cached. The noise is simulated at the slice's own matrix
   (real slices: native, where I0_full is calibrated; phantoms: drawn at ``--sim-matrix``, 512) and
   slice and noise are then resized to 256 with the node's own ``resize_to_model``, so amplitude and
   texture are those of a real lower-dose scan fed to the node (simulating at 256 with the I0
   calibrated at 512 gave 1.6x too much noise with a whiter spectrum: fixed in v1.1);
2. each sample draws a base slice, a random flip/rotation, a dose class among 5, 10, 25, 50, 75 %
   (and with a small probability full dose, whose target map is all ones and which has no dose
   class), and forms ``full`` (the real slice, or phantom + noise at a random I0_full) and
   ``low = full + noise * 1/sqrt(I0_add)`` with ``I0_add = I0_full d / (1 - d)``. I0_full of a real
   series is calibrated against its measured noise (``dose_sim.calibrate_i0``);
3. the target is ``2 * SSIM_map(window(low), window(full)) - 1`` (``analysis.ssim``); the loss is
   MSE(map) (the paper's; ``--loss l1`` for the public code's L1) + alpha * CE(dose class), alpha = 0.01.

Deterministic for a given ``--seed`` (pool, sampling and initialisation are seeded; resume replays
the same per-epoch random streams). A checkpoint is written after every epoch (``--out`` + ``.ckpt``)
and ``--resume`` continues from one. Runs on CPU (``torch.set_num_threads`` = free cores unless
``--threads``) or CUDA (``--device auto`` picks CUDA when present); mixed precision: bf16 autocast on
CPU, fp16 on CUDA (``--no-amp`` to disable).

The lead mounts this as ``qa-node train n2q`` with :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from analysis.training import dose_sim
from analysis.n2q import DOSE_CLASSES, MODEL_SIZE, NORMS, N2QNet, make_input, resize_to_model, save_weights
from analysis.training.phantoms import make_phantom
from analysis.ssim import ssim_map_torch, window_hu

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="*", default=[], metavar="DIR", help="folders with routine-dose CT DICOM (searched recursively)")
    parser.add_argument("--out", required=True, metavar="FILE", help="weights file to write (e.g. analysis/weights/n2q.pt)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--samples-per-epoch", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=MODEL_SIZE, help="training resolution (default 256)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", metavar="CKPT", help="checkpoint to continue from")
    parser.add_argument("--init", metavar="WEIGHTS", help="start from these N2Q weights (fine-tuning / a second schedule)")
    parser.add_argument("--checkpoint", metavar="FILE", help="checkpoint path (default: OUT.ckpt)")
    parser.add_argument("--phantoms", type=int, default=240, help="synthetic phantom slices in the pool")
    parser.add_argument("--max-real-per-series", type=int, default=12, help="real slices taken per series (evenly spaced)")
    parser.add_argument("--real-fraction", type=float, default=0.3, help="share of samples drawn from real slices")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="file-name patterns never trained on")
    parser.add_argument("--pool-cache", metavar="FILE", help="npz to save/load the pool (reuse between runs)")
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--alpha", type=float, default=0.01, help="weight of the dose-class CE")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--full-dose-prob", type=float, default=0.1)
    parser.add_argument("--no-hpf", action="store_true", help="ablation: 1-channel input (no high-pass copy)")
    parser.add_argument("--no-dose-head", action="store_true", help="ablation: no auxiliary dose head")
    parser.add_argument("--no-amp", action="store_true", help="disable mixed precision")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the free cores)")
    parser.add_argument("--keep-epoch-weights", metavar="DIR", help="also write weights after every epoch into DIR")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this many minutes (0: no limit)")
    parser.add_argument("--norm", default="batch", choices=NORMS,
                        help="normalisation layers (default batch; instance = the reference, see analysis.n2q.N2QNet)")
    parser.add_argument("--loss", default="mse", choices=("mse", "l1"), help="map loss (default mse, the paper's)")
    parser.add_argument("--schedule", default="steps", choices=("steps", "time"),
                        help="one-cycle learning-rate schedule over the planned steps (default; deterministic) or "
                             "over the --max-minutes wall-clock budget (for a shared machine whose speed is unknown: "
                             "the schedule always completes, but the run is NOT reproducible step for step)")
    parser.add_argument("--sim-matrix", type=int, default=512,
                        help="matrix at which phantoms are drawn and their noise simulated before resizing to --size "
                             "like the node resizes a scan (0: simulate at --size, the pre-v1.1 behaviour); real "
                             "slices always get their noise at their native matrix")


# ------------------------------------------------------------------------------------------ pool
@dataclass
class Pool:
    """Base slices at the model resolution. ``real[i]`` True: ``hu`` is a routine-dose slice that
    already carries its noise; False: a noise-free phantom. ``noise`` is (N, 2, S, S) at I0 = 1."""

    hu: np.ndarray  # (N, S, S) float32
    noise: np.ndarray  # (N, 2, S, S) float32 (at I0 = 1 the values reach 1e4-1e5 HU: not float16)
    i0_full: np.ndarray  # (N,) calibrated I0 for real slices; nan for phantoms
    unit_sd: np.ndarray  # (N,) SD of the unit noise in the body (phantoms: to pick I0_full)
    real: np.ndarray  # (N,) bool
    names: list[str]


def _free_cores() -> int:
    n = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, int(round(n - load)))


def _read_ct_files(dirs: list[str], exclude: list[str], max_per_series: int) -> list[tuple[str, str, np.ndarray, float]]:
    """(series key, name, HU 2D, pixel spacing) for CT slices under ``dirs``, at most ``max_per_series`` per series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    by_series: dict[str, list[Path]] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ValueError(f'Argument "--data": folder {root} does not exist')
        for p in sorted(root.rglob("*")):
            if not p.is_file() or any(fnmatch.fnmatch(p.name, pat) for pat in exclude):
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError):
                continue
            if str(getattr(ds, "Modality", "")) != "CT" or int(getattr(ds, "Rows", 0) or 0) < 128:
                continue
            by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", p.parent)), []).append(p)
    out = []
    for uid, paths in sorted(by_series.items()):
        idx = np.linspace(0, len(paths) - 1, min(max_per_series, len(paths))).round().astype(int)
        for i in sorted(set(idx.tolist())):
            p = paths[i]
            try:
                ds = pydicom.dcmread(p)
                arr = ds.pixel_array.astype(np.float32)
            except (OSError, ValueError, RuntimeError, AttributeError, NotImplementedError) as exc:
                log.warning("skipping %s: cannot decode pixels (%s)", p.name, exc)
                continue
            frames = arr if arr.ndim == 3 else arr[None]
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
            ps = getattr(ds, "PixelSpacing", None)
            if ps is None:
                try:
                    ps = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
                except (AttributeError, IndexError):
                    ps = None
            if ps is None:
                log.warning("skipping %s: no PixelSpacing", p.name)
                continue
            for k, fr in enumerate(frames):
                if fr.shape[0] != fr.shape[1]:
                    continue
                out.append((uid, f"{p.name}#{k}", np.maximum(fr * slope + icpt, -1024.0), float(ps[0])))
    return out


def _body_sd(noise: np.ndarray, hu: np.ndarray) -> float:
    m = (hu > -300) & (hu < 300)
    if m.sum() < 100:
        m = hu > -500
    return float(noise[m].std()) if m.any() else float(noise.std())


I0_RANGE = (1.0e5, 1.0e7)  # plausible routine-dose I0_full in this geometry; calibrations outside are clamped


def _noise_like_node(hu: np.ndarray, ps: float, size: int, rng: np.random.Generator, n_realisations: int = 2):
    """(HU at ``size``, unit noise (n, size, size) at ``size``) for a square slice at its own matrix:
    the noise is simulated at that matrix and pixel spacing (where I0_full was calibrated), then slice
    and noise go through the node's own resize (``analysis.n2q.resize_to_model``). This is the path a
    real lower-dose scan takes through the node, so noise amplitude and texture match inference."""
    if hu.shape[0] != hu.shape[1]:
        raise ValueError(f"square slices only, got {hu.shape}")
    nz = dose_sim.unit_noise(hu, pixel_spacing_mm=ps, rng=rng, n_realisations=n_realisations)
    small = resize_to_model(hu[None], size)[0][0].numpy()
    nz_small = resize_to_model(nz.reshape(-1, *hu.shape), size)[0].numpy()  # square: no air padding involved
    return small.astype(np.float32), nz_small.astype(np.float32)


def build_pool(args: argparse.Namespace, rng: np.random.Generator) -> Pool:
    size = args.size
    sim_matrix = int(getattr(args, "sim_matrix", 0) or 0)
    if sim_matrix and sim_matrix < size:
        raise ValueError(f'Argument "--sim-matrix" must be 0 or >= --size ({size}), got {sim_matrix}')
    hus, noises, i0s, sds, real, names = [], [], [], [], [], []
    slices = _read_ct_files(args.data, args.exclude, args.max_real_per_series) if args.data else []
    log.info("pool: %d real slices, %d phantoms", len(slices), args.phantoms)
    from tqdm import tqdm

    series_i0: dict[str, float] = {}
    for uid, name, hu, ps in tqdm(slices, desc="real slices"):
        if uid not in series_i0:  # I0_full is calibrated once per series, on its first usable slice
            meas = dose_sim.estimate_noise_hu(hu, ps)
            try:
                series_i0[uid] = dose_sim.calibrate_i0(hu, meas if math.isfinite(meas) else None, pixel_spacing_mm=ps, rng=rng, max_slices=1)
            except ValueError:
                series_i0[uid] = dose_sim.DEFAULT_I0_FULL
                log.info("%s: no soft tissue to measure noise; I0_full = %.3g", name, series_i0[uid])
            clamped = float(np.clip(series_i0[uid], *I0_RANGE))
            if clamped != series_i0[uid]:
                log.warning("series of %s: calibrated I0_full %.3g outside %s (denoised or unusual image?); using %.3g",
                            name, series_i0[uid], I0_RANGE, clamped)
                series_i0[uid] = clamped
            log.info("series of %s: noise %.1f HU -> I0_full %.3g", name, meas, series_i0[uid])
        i0 = series_i0[uid]
        if sim_matrix:
            small, nz = _noise_like_node(hu, ps, size, rng)
        else:  # pre-v1.1: resize first, simulate at --size with I0 calibrated at the native matrix (1.6x too noisy)
            t = torch.from_numpy(hu)[None, None]
            small = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
            nz = dose_sim.unit_noise(small, pixel_spacing_mm=ps * hu.shape[0] / size, rng=rng, n_realisations=2)
        hus.append(small.astype(np.float32)); noises.append(nz.astype(np.float32)); i0s.append(i0)
        sds.append(_body_sd(nz[0], small)); real.append(True); names.append(name)
    for k in tqdm(range(args.phantoms), desc="phantoms"):
        kind = "body" if k % 2 == 0 else "head"
        if sim_matrix:
            big, ps = make_phantom(kind, sim_matrix, rng)
            hu, nz = _noise_like_node(big, ps, size, rng)
        else:
            hu, ps = make_phantom(kind, size, rng)
            nz = dose_sim.unit_noise(hu, pixel_spacing_mm=ps, rng=rng, n_realisations=2)
        hus.append(hu); noises.append(nz.astype(np.float32)); i0s.append(float("nan"))
        sds.append(_body_sd(nz[0], hu)); real.append(False); names.append(f"phantom-{kind}-{k}")
    pool = Pool(np.stack(hus), np.stack(noises), np.array(i0s), np.array(sds), np.array(real), names)
    bad = [names[i] for i in range(len(names)) if not (np.isfinite(pool.hu[i]).all() and np.isfinite(pool.noise[i]).all())]
    if bad:
        raise ValueError(f"non-finite values in the training pool for {bad[:5]}; check those files")
    return pool


def save_pool(pool: Pool, path: str) -> None:
    np.savez(path, hu=pool.hu, noise=pool.noise, i0_full=pool.i0_full, unit_sd=pool.unit_sd, real=pool.real, names=np.array(pool.names))


def load_pool(path: str) -> Pool:
    z = np.load(path)
    return Pool(z["hu"], z["noise"], z["i0_full"], z["unit_sd"], z["real"], [str(s) for s in z["names"]])


# --------------------------------------------------------------------------------------- samples
# Full-dose noise SD (HU, at 256 x 256, log-uniform) given to phantoms, by kind. From the routine-dose
# training slices: head series measure about 3.4 HU and neck/abdomen about 12.5 HU at 512 (global
# noise), i.e. about half at 256. A head protocol is far less noisy than a body one; giving the
# phantoms that prior lets the model use the anatomy to tell full-dose from added noise.
PHANTOM_FULL_NOISE_HU = {"head": (1.0, 3.5), "body": (3.0, 10.0)}


def make_batch(pool: Pool, rng: np.random.Generator, batch: int, real_fraction: float, full_dose_prob: float):
    """-> (low HU (B,S,S), full HU (B,S,S), dose class (B,) with -1 for full dose)."""
    real_idx = np.flatnonzero(pool.real)
    ph_idx = np.flatnonzero(~pool.real)
    lows, fulls, cls = [], [], []
    for _ in range(batch):
        use_real = real_idx.size > 0 and (ph_idx.size == 0 or rng.random() < real_fraction)
        i = int(rng.choice(real_idx if use_real else ph_idx))
        r = int(rng.integers(2))
        n_full = pool.noise[i, r].astype(np.float32) * (1 if rng.random() < 0.5 else -1)
        n_add = pool.noise[i, 1 - r].astype(np.float32) * (1 if rng.random() < 0.5 else -1)
        if pool.real[i]:
            i0 = float(pool.i0_full[i]) * math.exp(rng.normal(0.0, 0.3))
            full = pool.hu[i]
        else:
            kind = "head" if "-head-" in pool.names[i] else "body"
            sd = math.exp(rng.uniform(*np.log(PHANTOM_FULL_NOISE_HU[kind])))
            i0 = (float(pool.unit_sd[i]) / sd) ** 2
            full = pool.hu[i] + n_full / math.sqrt(i0)
        if rng.random() < full_dose_prob:
            c, low = -1, full
        else:
            c = int(rng.integers(len(DOSE_CLASSES)))
            low = full + n_add / math.sqrt(dose_sim.added_i0(i0, DOSE_CLASSES[c]))
        k = int(rng.integers(4))
        flip = rng.random() < 0.5
        low, full = np.rot90(low, k), np.rot90(full, k)
        if flip:
            low, full = low[:, ::-1], full[:, ::-1]
        lows.append(np.ascontiguousarray(low)); fulls.append(np.ascontiguousarray(full)); cls.append(c)
    return torch.from_numpy(np.stack(lows)), torch.from_numpy(np.stack(fulls)), torch.tensor(cls)


def target_map(low: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Training target in [-1, 1]: 2 * SSIM(window(low), window(full)) - 1, (B, 1, S, S)."""
    return 2.0 * ssim_map_torch(window_hu(low), window_hu(full)).unsqueeze(1).float() - 1.0


# ----------------------------------------------------------------------------------------- train
def _one_cycle_lr(max_lr: float, frac: float, pct_start: float = 0.05) -> float:
    """OneCycleLR's cosine shape (start max_lr/25, end max_lr/25/1e4) at a fraction of the run."""
    lo, end = max_lr / 25.0, max_lr / 25.0 / 1e4
    if frac < pct_start:
        return lo + (max_lr - lo) * 0.5 * (1 - math.cos(math.pi * frac / pct_start))
    t = min(1.0, (frac - pct_start) / (1 - pct_start))
    return end + (max_lr - end) * 0.5 * (1 + math.cos(math.pi * t))


def _is_norm_key(net: torch.nn.Module, key: str) -> bool:
    mod = net.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d))


def _config(args: argparse.Namespace) -> dict:
    return {
        "in_channels": 1 if args.no_hpf else 2,
        "n_doses": len(DOSE_CLASSES),
        "dropout": args.dropout,
        "dose_head": not args.no_dose_head,
        "size": args.size,
        "window": [40.0, 300.0],
        "dose_classes": list(DOSE_CLASSES),
        "norm": args.norm,
    }


def run(args: argparse.Namespace) -> int:
    """Train; returns a process exit status (0 on success)."""
    for name in ("epochs", "samples_per_epoch", "batch", "size"):
        if getattr(args, name) < 1:
            raise ValueError(f'Argument "--{name.replace("_", "-")}" must be >= 1, got {getattr(args, name)}')
    if args.size % 16:
        raise ValueError(f'Argument "--size" must be a multiple of 16, got {args.size}')
    if args.schedule == "time" and not args.max_minutes > 0:
        raise ValueError('Argument "--schedule time" needs "--max-minutes" > 0')
    if args.schedule == "time" and args.resume:
        raise ValueError('Argument "--resume" is not supported with "--schedule time"')
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError('Argument "--device cuda": no CUDA device is available; use --device auto or cpu')
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    threads = args.threads or _free_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    from tqdm import tqdm

    t_start = time.time()
    if args.pool_cache and Path(args.pool_cache).is_file():
        pool = load_pool(args.pool_cache)
        log.info("pool loaded from %s (%d slices)", args.pool_cache, len(pool.names))
    else:
        pool = build_pool(args, np.random.default_rng([args.seed, 1]))
        if args.pool_cache:
            save_pool(pool, args.pool_cache)
    t_pool = time.time() - t_start
    log.info("pool ready: %d slices (%d real) in %.0f s", len(pool.names), int(pool.real.sum()), t_pool)

    cfg = _config(args)
    net = N2QNet(cfg["in_channels"], cfg["n_doses"], cfg["dropout"], cfg["dose_head"], cfg["norm"]).to(device)
    if args.init:
        blob = torch.load(args.init, map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()}
        # InstanceNorm weights into a BatchNorm net: the convolutions carry over, the norm layers start fresh
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in list(missing) + list(unexpected) if "running_" not in k and "num_batches" not in k
               and not (cfg["norm"] == "batch" and k.rsplit(".", 1)[-1] in ("weight", "bias") and _is_norm_key(net, k))]
        if bad:
            raise ValueError(f'Argument "--init": {args.init} does not fit this architecture ({bad[:4]})')
        log.info("initialised from %s (%d norm tensors fresh)", args.init, len(missing))
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, args.samples_per_epoch // args.batch)
    total_steps = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.05)
    start_epoch, train_seconds, history = 0, 0.0, []
    ckpt_path = Path(args.checkpoint or (str(args.out) + ".ckpt"))
    if args.resume:
        ck = torch.load(args.resume, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"]); sched.load_state_dict(ck["sched"])
        start_epoch, train_seconds, history = int(ck["epoch"]), float(ck["train_seconds"]), list(ck["history"])
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at epoch %d", args.resume, start_epoch)
    amp = not args.no_amp
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device == "cuda")
    stopped_early = False
    n_steps = 0
    for epoch in range(start_epoch, args.epochs):
        rng = np.random.default_rng([args.seed, 2, epoch])
        net.train()
        t0 = time.time()
        sums = np.zeros(3)
        ep_steps = 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for _ in bar:
            if args.schedule == "time":
                frac = (train_seconds + time.time() - t0) / (args.max_minutes * 60.0)
                if frac >= 1.0:
                    break
                for g in opt.param_groups:
                    g["lr"] = _one_cycle_lr(args.lr, frac)
            low, full, cls = make_batch(pool, rng, args.batch, args.real_fraction, args.full_dose_prob)
            tgt = target_map(low, full).to(device)
            x = make_input(window_hu(low).to(device), cfg["in_channels"])
            cls = cls.to(device)
            with torch.autocast(device, dtype=amp_dtype, enabled=amp):
                pred, logits = net(x)
            err = pred.float() - tgt
            map_loss = (err * err).mean() if args.loss == "mse" else err.abs().mean()
            ce = torch.zeros((), device=device)
            if logits is not None and (cls >= 0).any():
                ce = F.cross_entropy(logits.float(), cls, ignore_index=-1)
            loss = map_loss + args.alpha * ce
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite training loss at epoch {epoch + 1} (map {float(map_loss)}, CE {float(ce)})")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if args.schedule == "steps":
                sched.step()
            n_steps += 1
            ep_steps += 1
            acc = float((logits.argmax(1) == cls)[cls >= 0].float().mean()) if logits is not None and (cls >= 0).any() else float("nan")
            sums += (float(map_loss.detach()), float(ce.detach()), acc)
            bar.set_postfix(loss=f"{float(map_loss.detach()):.4f}", ce=f"{float(ce.detach()):.3f}")
        train_seconds += time.time() - t0
        done_steps = ep_steps
        mean = sums / max(done_steps, 1)
        history.append({"epoch": epoch + 1, "loss": args.loss, "map_loss": float(mean[0]), "ce": float(mean[1]), "dose_acc": float(mean[2]),
                        "seconds": round(train_seconds, 1), "steps": int(done_steps)})
        log.info("epoch %d: map %s %.4f CE %.3f dose acc %.2f (%.0f s so far)", epoch + 1, args.loss, *mean, train_seconds)
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1,
                    "train_seconds": train_seconds, "history": history, "torch_rng": torch.get_rng_state(),
                    "config": cfg}, ckpt_path)
        if args.keep_epoch_weights:
            save_weights(net, Path(args.keep_epoch_weights) / f"epoch{epoch + 1:02d}.pt", cfg, {"epoch": epoch + 1, "train_seconds": train_seconds})
        if args.schedule == "time" and train_seconds >= args.max_minutes * 60:
            log.info("time schedule complete after epoch %d (%d steps)", epoch + 1, n_steps)
            break
        if args.max_minutes and train_seconds > args.max_minutes * 60 and epoch + 1 < args.epochs:
            log.warning("stopping after epoch %d: --max-minutes %.0f reached", epoch + 1, args.max_minutes)
            stopped_early = True
            break
    meta = {
        "seed": args.seed, "epochs_done": len(history), "epochs_planned": args.epochs, "batch": args.batch,
        "samples_seen": sum(h.get("steps", steps_per_epoch) for h in history) * args.batch,
        "schedule": args.schedule, "train_seconds": round(train_seconds, 1),
        "pool_seconds": round(t_pool, 1), "threads": threads, "device": device, "amp": amp,
        "pool_slices": len(pool.names), "pool_real": int(pool.real.sum()), "stopped_early": stopped_early,
        "init": args.init,
        "history": history, "argv": sys.argv[1:],
    }
    sha = save_weights(net.cpu(), args.out, cfg, meta)
    log.info("wrote %s (sha256 %s), %.0f s training", args.out, sha, train_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m analysis.training.n2q_train``) for the same arguments."""
    parser = argparse.ArgumentParser(prog="n2q-train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
