"""Training Delta-IQA on a site's ratings (``qa-node train delta_iqa``), and synthetic ratings whose
truth is known for testing the machinery.

    add_arguments(parser)   # --ratings FILE --out PATH [--epochs N] [--seed S] ...
    run(args) -> int        # exit status (2: bad ratings file, listed line by line)

Recipe (analysis/delta_iqa.py for the network, as published): "fuzzy" labels (a score split between
its floor and ceiling class) with a soft-target cross-entropy, AdamW (weight decay 1e-3), dropout
0.5 / 0.3, augmentation by a random flip, a rotation of +/-15 degrees and a shift of +/-10 px per image
(nearest-neighbour, so the pixel noise the ratings are about is not smoothed). For a 2-core CPU (the
paper: lr 1e-5, batch 128, 80 epochs with early stopping): batch 8, peak lr DEFAULT_LR with a linear
warm-up over 10 % of the steps then cosine decay, DEFAULT_EPOCHS epochs, the last layer initialised
near 0, the training input standardised (folded into the first convolution when saved), bf16
autocast where the CPU has native bf16. ``--val`` keeps whole training series aside to choose the
epoch whose weights are kept (default: none, the last epoch). The held-out split is by series (every
slice of a held-out series is held out), so the held-out PLCC/SROCC/KROCC in the model card measure
images of series never seen in training; the held-out set is never used to choose anything.

Outputs: ``--out`` gets the weights (``analysis.delta_iqa.save_weights``) and ``<out stem>_MODEL_CARD.md``
beside it: the data (ratings file and its SHA-256, counts), the exact command, the held-out figures.

Synthetic ratings (``make_synthetic_ratings``; tests and bench/delta_iqa_synthetic.py only): real
slices degraded at 5 graded levels, as LDCTIQAC made its images (added noise and streaks). Added
noise (default "projection"): projection-domain noise from analysis/training/dose_sim.unit_noise
(Gaussian ray noise of variance exp(line integral), 180 parallel-beam views, Hann-windowed ramp FBP),
3 realisations per slice mixed with random unit weights per image (the same covariance, new values),
scaled to the level's SD; "image": image-domain Gaussian noise with a ramp x Hann noise power
spectrum confined to the body (the fast route, CI). Levels (default "absolute"): the TOTAL noise in
the body, as a rater sees it (level 0 as acquired, then ABSOLUTE_NOISE_HU: 50, 75, 105, 140 HU;
each slice's own noise measured with the node's global noise and topped up to the target; slices
already too noisy for level 0 are left out and listed); "relative" (the earlier definition): a
fixed SD added on top of each slice's own noise, so a noisy series at level 1 can look worse than a
quiet one at level 2. Streaks: thin lines of alternating sign through the body, more and stronger
per level. Each image is "rated" by its level (score = 4 - level). These are NOT
radiologist ratings: weights trained on them are synthetic-degradation weights (``--labels
synthetic``) and are carded as such.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from analysis import delta_iqa as dq

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 4
DEFAULT_LR = 5e-4
DEFAULT_BATCH = 8
DEFAULT_WARMUP = 0.1  # share of the steps with a linear learning-rate warm-up; then cosine to 0
DEFAULT_VAL = 0.0  # share of the training images (whole series) kept aside to pick the best epoch
WEIGHT_DECAY = 1e-3
ROTATION_DEG = 15.0
SHIFT_PX = 10.0
HEAD_INIT_SD = 0.01  # the last layer starts near 0: uniform class probabilities, loss ln 5
LABELS = {"site": "site raters' Likert scores", "synthetic": "SYNTHETIC degradation levels (not radiologist ratings)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratings", required=True, metavar="FILE",
                        help="ratings CSV (path,score[,rater,frame,sop_instance_uid]; see `qa-node ratings`)")
    parser.add_argument("--out", required=True, metavar="PATH", help="weights file to write; the model card goes beside it")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"passes over the training ratings (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the augmentation")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate (default {DEFAULT_LR:g}; paper 1e-5)")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of the ratings held out, by whole series (default 0.2; at least one series)")
    parser.add_argument("--labels", choices=sorted(LABELS), default="site",
                        help="what the scores are: site (raters' Likert scores) or synthetic (degradation levels, for tests)")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP,
                        help=f"share of the steps with a linear learning-rate warm-up, then cosine decay (default {DEFAULT_WARMUP:g})")
    parser.add_argument("--val", type=float, default=DEFAULT_VAL,
                        help="share of the training images (whole series) kept aside to choose the epoch whose weights "
                             f"are kept (default {DEFAULT_VAL:g}: the last epoch)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="CPU arithmetic of the training passes: bf16 autocast where the CPU has native bf16 "
                             "(AMX / AVX-512 BF16), else fp32 (default auto); evaluation is always fp32")
    parser.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)  # < 1 only for fast tests
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ------------------------------------------------------------------------------------- data
@dataclass
class RatedImages:
    x: np.ndarray  # float16 (n, 512, 512): network input in [0, 1]
    scores: np.ndarray  # (n,) float
    groups: list[str]  # per image: its series (SeriesInstanceUID, else the file's folder)
    paths: list[str] = field(default_factory=list)


def load_rated_images(rows: Sequence, progress: bool = False) -> RatedImages:
    """Decode each rated image (``node.ratings.RatingRow``) to the network input."""
    from analysis.volume import load_series

    x = np.empty((len(rows), dq.INPUT_SIZE, dq.INPUT_SIZE), dtype=np.float16)
    cache: dict[str, object] = {}
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="reading images", unit="img", dynamic_ncols=True)
    groups, paths = [], []
    for i, r in enumerate(it):
        key = str(r.path)
        vol = cache.get(key)
        if vol is None:
            vol = load_series([r.path])
            cache = {key: vol}  # one file at a time (multi-frame files are read once per run of rows)
        k = 0
        if r.frame is not None:
            k = [j for j, f in enumerate(vol.frame_numbers) if f == r.frame][0]
        x[i] = dq.prepare(vol.hu[k])[0, 0]
        groups.append(r.series_instance_uid or str(Path(r.path).parent))
        paths.append(key)
    return RatedImages(x=x, scores=np.array([float(r.score) for r in rows]), groups=groups, paths=paths)


def split_by_series(groups: Sequence[str], holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): whole series are held out (in a seeded random order) until they
    hold at least ``holdout`` of the images; at least one series on each side."""
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise ValueError(f"the ratings cover {len(uniq)} series: a held-out split by series needs at least 2")
    rng = np.random.default_rng(seed)
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    g = np.asarray(groups)
    held: list[str] = []
    for s in order[:-1]:
        if (np.isin(g, held).sum() / len(g)) >= holdout:
            break
        held.append(s)
    mask = np.isin(g, held)
    return np.nonzero(~mask)[0], np.nonzero(mask)[0]


# ------------------------------------------------------------------------------------- training
def augment(x, gen):
    """Per image: a random left-right and up-down flip, a random rotation (+/-15 degrees) and shift
    (+/-10 px); outside = 0 (air). Nearest-neighbour resampling: bilinear resampling averages
    neighbouring pixels and lowers the pixel noise by up to a third, by an amount that depends on the
    angle and sub-pixel shift, which blurs exactly the noise differences the ratings are about."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(ROTATION_DEG)
    sh = (torch.rand(n, 2, generator=gen) * 2 - 1) * SHIFT_PX
    fx = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # output p samples the input at F R (p - s) (F: the flips): the content turns about the centre,
    # then moves by s px
    sx, sy = sh[:, 0] * 2 / w, sh[:, 1] * 2 / h
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, -(cos * sx - sin * sy)
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, -(sin * sx + cos * sy)
    theta[:, 0] *= fx[:, None]
    theta[:, 1] *= fy[:, None]
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def bf16_native() -> bool:
    """True where the CPU computes bf16 natively (AMX or AVX-512 BF16): bf16 autocast is then about
    twice as fast as fp32 for this network; elsewhere it would be slower."""
    import torch

    cpu = torch.cpu
    try:
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    except Exception:  # noqa: BLE001 - a torch without these probes: no bf16
        return False


def fold_input_normalisation(net, mean: float, sd: float) -> None:
    """Training sees (x - mean) / sd; fold that affine map into the first convolution so the saved
    network takes the plain [0, 1] window input. Exact, as the first convolution has no padding."""
    import torch

    conv = net[0]
    with torch.no_grad():
        w = conv.weight / sd
        conv.bias -= (mean / sd) * conv.weight.sum(dim=(1, 2, 3))
        conv.weight.copy_(w)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` share of the steps, then cosine decay to 0."""
    n_warm = max(1, int(round(warmup * total))) if warmup > 0 else 0
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, total - n_warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@dataclass
class TrainResult:
    net: object
    held_out: dict  # plcc/srocc/krocc/aggregate on the held-out images
    held_pred: np.ndarray
    held_true: np.ndarray
    train_idx: np.ndarray
    held_idx: np.ndarray
    seconds: float
    losses: list[float]
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    val_srocc: list[float] = field(default_factory=list)  # per epoch (empty without a validation split)
    kept_epoch: int = 0  # 1-based epoch whose weights were kept
    precision: str = "fp32"


def train(data: RatedImages, *, epochs: int = DEFAULT_EPOCHS, seed: int = 0, batch_size: int = DEFAULT_BATCH,
          lr: float = DEFAULT_LR, holdout: float = 0.2, width: float = 1.0, device: str = "cpu",
          progress: bool = True, split: tuple[np.ndarray, np.ndarray] | None = None,
          warmup: float = DEFAULT_WARMUP, val: float = DEFAULT_VAL, precision: str = "auto") -> TrainResult:
    import copy

    import torch

    t0 = time.perf_counter()
    tr, ho = split if split is not None else split_by_series(data.groups, holdout, seed)
    va = np.zeros(0, dtype=int)
    if val > 0 and len({data.groups[i] for i in tr}) >= 3:  # a validation split from the training series only
        sub_tr, sub_va = split_by_series([data.groups[i] for i in tr], val, seed + 1)
        tr, va = tr[sub_tr], tr[sub_va]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = dq.build_network(width)
    with torch.no_grad():
        torch.nn.init.normal_(net[-1].weight, std=HEAD_INIT_SD)
    use_bf16 = device == "cpu" and (precision == "bf16" or (precision == "auto" and bf16_native()))
    mem = torch.channels_last if use_bf16 else torch.contiguous_format
    net = net.to(device).to(memory_format=mem)
    # the training input is standardised with the training images' mean and SD (folded into conv1 at the end)
    sample = data.x[tr[:: max(1, len(tr) // 64)]].astype(np.float32)
    in_mean, in_sd = float(sample.mean()), float(sample.std()) or 1.0
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, foreach=True)
    targets = torch.from_numpy(dq.fuzzy_labels(data.scores))
    per_epoch = math.ceil(len(tr) / batch_size)
    steps = epochs * per_epoch
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="training", dynamic_ncols=True)
    losses: list[float] = []
    val_srocc: list[float] = []
    best: tuple[float, int, dict | None] = (-math.inf, epochs, None)
    step = 0
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(tr)
        total = 0.0
        for b in range(0, len(order), batch_size):
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, steps, warmup)
            idx = order[b:b + batch_size]
            x = torch.from_numpy(data.x[idx].astype(np.float32))[:, None].to(device)
            x = ((augment(x, gen) - in_mean) / in_sd).contiguous(memory_format=mem)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = net(x)
            logp = torch.log_softmax(logits.float(), dim=1)
            loss = -(targets[idx].to(device) * logp).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
        losses.append(total / max(1, len(tr)))
        if len(va):
            p = _predict(net, (data.x[va].astype(np.float32) - in_mean) / in_sd, device, use_bf16, mem)
            v = dq.correlations(p, data.scores[va])["srocc"]
            v = v if math.isfinite(v) else -1.0
            val_srocc.append(v)
            if v > best[0]:
                best = (v, epoch + 1, copy.deepcopy(net.state_dict()))
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", val_srocc=f"{v:.3f}")
    if bar is not None:
        bar.close()
    kept = epochs
    if best[2] is not None:
        net.load_state_dict(best[2])
        kept = best[1]
    net = net.to(memory_format=torch.contiguous_format)
    fold_input_normalisation(net, in_mean, in_sd)
    pred = predict_prepared(net, data.x[ho], device)
    return TrainResult(net=net, held_out=dq.correlations(pred, data.scores[ho]), held_pred=pred,
                       held_true=data.scores[ho], train_idx=tr, held_idx=ho, seconds=time.perf_counter() - t0,
                       losses=losses, val_idx=va, val_srocc=val_srocc, kept_epoch=kept,
                       precision="bf16 autocast" if use_bf16 else "fp32")


def _predict(net, x: np.ndarray, device: str, bf16: bool, mem, batch: int = 8) -> np.ndarray:
    import torch

    net.eval()
    out = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i:i + batch], dtype=np.float32))[:, None].to(device)
            out.append(torch.softmax(net(xb.contiguous(memory_format=mem)).float(), dim=1).cpu().numpy())
    net.train()
    return dq.expected_score(np.concatenate(out)) if out else np.zeros(0)


def predict_prepared(net, x: np.ndarray, device: str = "cpu", batch: int = 8) -> np.ndarray:
    """Scores of already prepared images (n, 512, 512)."""
    import torch

    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i:i + batch], dtype=np.float32))[:, None].to(device)
            out.append(torch.softmax(net(xb), dim=1).cpu().numpy())
    return dq.expected_score(np.concatenate(out)) if out else np.zeros(0)


# ------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    import torch

    from analysis.training.ratings_file import RatingsFileError, print_problems, read_ratings_csv
    from analysis.weights import file_sha256

    if (args.epochs < 1 or args.batch_size < 1 or not 0 < args.holdout < 1 or args.lr <= 0
            or not 0 <= args.warmup < 1 or not 0 <= args.val < 1):
        print("qa-node train delta_iqa: --epochs and --batch-size must be >= 1, --holdout in (0, 1), --lr > 0, "
              "--warmup and --val in [0, 1)", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("qa-node train delta_iqa: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    try:
        rows = read_ratings_csv(args.ratings)
    except RatingsFileError as exc:
        print_problems(exc.path, exc.errors, "nothing trained")
        return 2
    try:
        data = load_rated_images(rows, progress=not args.no_progress)
        split = split_by_series(data.groups, args.holdout, args.seed)
    except ValueError as exc:
        print(f"qa-node train delta_iqa: {exc}", file=sys.stderr)
        return 2
    log.info("delta_iqa: %d ratings of %d series; %d train / %d held out (%d series held out)", len(rows),
             len(set(data.groups)), len(split[0]), len(split[1]), len({data.groups[i] for i in split[1]}))
    res = train(data, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr, width=args.width,
                device=args.device, progress=not args.no_progress, split=split, warmup=args.warmup, val=args.val,
                precision=args.precision)
    out = Path(args.out)
    dq.save_weights(out, res.net, width=args.width, labels=args.labels,
                    extra={"held_out": res.held_out, "trained_at": datetime.now(timezone.utc).isoformat()})
    card = card_path(out)
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    prog = "qa-node" if prog in ("__main__.py", "qa-node", "-m") else prog
    command = shlex.join([prog, *sys.argv[1:]]) if prog else "(library call)"
    card.write_text(model_card(args, rows, data, res, command=command, ratings_sha=file_sha256(args.ratings),
                               weights_sha=file_sha256(out),
                               synthetic_info=synthetic_levels_info(args.ratings) if args.labels == "synthetic" else None),
                    encoding="utf-8")
    h = res.held_out
    print(f"held-out ({len(res.held_idx)} images of {len({data.groups[i] for i in res.held_idx})} series): "
          f"PLCC {h['plcc']:.3f}  SROCC {h['srocc']:.3f}  KROCC {h['krocc']:.3f}  ({res.seconds:.0f} s)")
    print(f"weights: {out}\nmodel card: {card}")
    return 0


def card_path(weights: Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + "_MODEL_CARD.md")


def synthetic_levels_info(ratings: str | Path) -> dict | None:
    """What ``make_synthetic_ratings`` wrote beside its ratings file (``synthetic_levels.json``: the
    level definition, the noise, the source slices with their base noise), or None."""
    import json

    f = Path(ratings).parent / SYNTHETIC_INFO
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _synthetic_card_lines(info: dict | None) -> list[str]:
    if not info:
        return ["- How the levels were made is not recorded beside the ratings file (no "
                f"`{SYNTHETIC_INFO}`)."]
    streak = ", ".join(f"{n} x {a:g} HU" if n else "none" for n, a in info["streaks"])
    used = [s for s in info["sources"] if s["used"]]
    left = [s for s in info["sources"] if not s["used"]]
    if info["levels"] == "absolute":
        lines = ["- Levels 0-4 are defined by the TOTAL noise in the body (what the image looks like): level 0 the "
                 "slice as acquired, levels 1-4 " + ", ".join(f"{v:g}" for v in info["absolute_noise_hu"][1:])
                 + " HU (added noise SD sqrt(target^2 - base^2) over the base noise measured on each slice), "
                 f"{info['noise']}-domain noise; streaks per level: {streak}."]
    else:
        lines = ["- Levels 0-4 are a fixed noise SD ADDED on top of each slice's own noise ("
                 + ", ".join(f"{v:g}" for v in info["added_noise_hu"]) + f" HU, {info['noise']}-domain; the earlier, "
                 "'relative' definition: the same level looks different on a quiet and a noisy series, so a "
                 f"level is not a function of the image alone); streaks per level: {streak}."]
    lines.append(f"- {len(used)} of {len(info['sources'])} source slices used"
                 + ("; left out: " + "; ".join(f"{Path(s['source']).parent.name}/{Path(s['source']).name} "
                                               f"(base noise {s['base_noise_hu']:.1f} HU: {s['why_not']})" for s in left)
                    if left else "") + ".")
    if info["levels"] == "absolute":
        lines.append("- The node's global noise measures the very quantity that defines these levels, so it ranks "
                     "such images about as well as any model can; a high held-out figure here shows that the "
                     "network, labels, training and split work, not that the model agrees with radiologists.")
    return lines


def model_card(args, rows, data: RatedImages, res: TrainResult, *, command: str, ratings_sha: str,
               weights_sha: str, synthetic_info: dict | None = None) -> str:
    synthetic = args.labels == "synthetic"
    raters = sorted({r.rater for r in rows if r.rater})
    hist = np.histogram(data.scores, bins=[0, 0.5, 1.5, 2.5, 3.5, 4.01])[0]
    h = res.held_out
    lines = [
        "# Delta-IQA model card" + (" — SYNTHETIC-DEGRADATION WEIGHTS (not radiologist ratings)" if synthetic else ""),
        "",
        f"Written by `qa-node train delta_iqa` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Labels",
        f"- {LABELS[args.labels]}.",
    ]
    if synthetic:
        lines += ["- These weights score how strongly synthetic noise/streaks were added, nothing a radiologist said. "
                  "Do not enable them as a Likert model ([analysis.delta_iqa] weights) for clinical QA."]
        lines += _synthetic_card_lines(synthetic_info)
    else:
        lines += ["- Valid only for images like the rated ones (Delta-IQA's own card: not for other patient groups "
                  "without prior local validation)."]
    lines += [
        "",
        "## Data",
        f"- ratings file: `{args.ratings}` (SHA-256 {ratings_sha})",
        f"- {len(rows)} ratings of {len(set(r.path for r in rows))} images, {len(set(data.groups))} series, "
        f"{len(raters)} named rater(s){': ' + ', '.join(raters) if raters else ''}",
        f"- scores (rounded to a class): 0: {hist[0]}, 1: {hist[1]}, 2: {hist[2]}, 3: {hist[3]}, 4: {hist[4]}",
        f"- split by series (seed {args.seed}): {len(res.train_idx)} training images "
        f"({len({data.groups[i] for i in res.train_idx})} series), {len(res.held_idx)} held out "
        f"({len({data.groups[i] for i in res.held_idx})} series, never seen in training, used for nothing else)",
        "",
        "## Command",
        f"    {command}",
        "",
        "## Training",
        f"- architecture: Delta-IQA (analysis/delta_iqa.py), width {args.width:g}"
        + (" (the published network)" if args.width == 1.0 else " (REDUCED width: a test network, not the published one)"),
        f"- {args.epochs} epochs, batch {args.batch_size}, AdamW peak lr {args.lr:g} (linear warm-up over "
        f"{getattr(args, 'warmup', DEFAULT_WARMUP):g} of the steps, then cosine), weight decay {WEIGHT_DECAY:g}, "
        f"fuzzy labels, flips, rotation +/-{ROTATION_DEG:g} degrees, shift +/-{SHIFT_PX:g} px (nearest-neighbour)",
        (f"- validation: {len(res.val_idx)} images of {len({data.groups[i] for i in res.val_idx})} training series "
         f"kept aside; epoch {res.kept_epoch} kept (validation SROCC per epoch: "
         + ", ".join(f"{v:.3f}" for v in res.val_srocc) + ")") if len(res.val_idx) else
        f"- no validation split; the last epoch ({res.kept_epoch}) kept",
        f"- device {args.device} ({res.precision}), {res.seconds:.0f} s; training loss per epoch: "
        + ", ".join(f"{v:.3f}" for v in res.losses),
        f"- weights file SHA-256: {weights_sha}",
        "",
        "## Held-out agreement (images of held-out series)",
        "| PLCC | SROCC | KROCC | PLCC+SROCC+KROCC |",
        "|---|---|---|---|",
        f"| {h['plcc']:.4f} | {h['srocc']:.4f} | {h['krocc']:.4f} | {h['aggregate']:.4f} |",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- synthetic ratings
def ct_like_noise(shape: tuple[int, int], sd: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with a ramp x Hann noise power spectrum (a filtered-back-projection texture),
    scaled to standard deviation ``sd`` HU."""
    if sd <= 0:
        return np.zeros(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    f = np.hypot(fy, fx)
    fc = 0.35  # cycles/pixel: Hann cut-off (a soft body kernel)
    amp = np.sqrt(f * np.where(f < fc, 0.5 * (1 + np.cos(np.pi * f / fc)), 0.0))
    n = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amp).real
    return (n * (sd / n.std())).astype(np.float32)


def streaks(shape: tuple[int, int], amplitude: float, n: int, rng: np.random.Generator,
            body: np.ndarray | None = None) -> np.ndarray:
    """``n`` thin straight streaks (Gaussian profile, sigma 0.8 px) of alternating sign and random
    angle through points inside ``body``, peak ``amplitude`` HU."""
    out = np.zeros(shape, dtype=np.float32)
    if n <= 0 or amplitude <= 0:
        return out
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    pts = np.argwhere(body) if body is not None and body.any() else None
    for k in range(n):
        if pts is not None:
            cy, cx = pts[rng.integers(len(pts))]
        else:
            cy, cx = rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.3, 0.7) * shape[1]
        th = rng.uniform(0, np.pi)
        d = (xx - cx) * np.sin(th) - (yy - cy) * np.cos(th)
        sign = 1.0 if k % 2 == 0 else -1.0
        out += sign * amplitude * rng.uniform(0.6, 1.0) * np.exp(-0.5 * (d / 0.8) ** 2)
    return out


# level 0 = as acquired (score 4) ... level 4 = worst (score 0): added noise SD (HU), streaks (count, HU).
# The added SD is used by the "relative" level definition only (a fixed SD added on top of the slice's
# own noise, so the same level looks different on a quiet and a noisy series); the streaks are used
# by both definitions.
LEVELS = ((0.0, 0, 0.0), (20.0, 4, 40.0), (45.0, 8, 80.0), (80.0, 12, 120.0), (130.0, 16, 180.0))
# "absolute" levels (the default): the TOTAL noise in the body at levels 1-4 (HU, the node's global
# noise scale); noise of SD sqrt(target^2 - base^2) is added to a slice whose own (base) noise is
# ``base``. Level 0 is the slice as acquired; only slices whose base noise is below LEVEL_1 / 1.2 are
# used (a slice already as noisy as level 1 cannot be "as acquired" and level 1 at once).
ABSOLUTE_NOISE_HU = (None, 50.0, 75.0, 105.0, 140.0)
BASE_MARGIN = 1.2  # a source's base noise must be below ABSOLUTE_NOISE_HU[1] / BASE_MARGIN
LEVEL_DEFINITIONS = ("absolute", "relative")
SYNTHETIC_INFO = "synthetic_levels.json"  # written by make_synthetic_ratings beside its ratings.csv
MIN_FALLBACK_PIXELS = 500  # soft-tissue pixels the fallback base-noise estimate needs
PROJECTION_VIEWS = 180  # views of the projection-domain noise (dose_sim's parallel-beam geometry)
PROJECTION_BASES = 3  # independent projection-noise realisations per slice, mixed per image


def projection_noise_bases(hu: np.ndarray, pixel_spacing_mm, rng: np.random.Generator,
                           n: int = PROJECTION_BASES, n_views: int = PROJECTION_VIEWS) -> np.ndarray:
    """(n, rows, cols) independent projection-domain noise realisations of this slice at I0 = 1 HU
    (analysis/training/dose_sim.unit_noise: Gaussian ray noise of variance exp(line integral),
    Hann-windowed ramp FBP): non-stationary like a scanner's noise, larger behind dense anatomy and
    along long paths, with the streaky texture of photon-poor rays."""
    from analysis.training.dose_sim import unit_noise

    return unit_noise(hu, pixel_spacing_mm=pixel_spacing_mm, rng=rng, n_realisations=n, n_views=n_views)


def mix_bases(bases: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fresh realisation from independent Gaussian realisations of the same covariance: a random
    unit-norm combination has exactly that covariance again (cheap new noise, no new FBP)."""
    w = rng.standard_normal(len(bases))
    w /= np.linalg.norm(w)
    return np.tensordot(w, bases, axes=1).astype(np.float32)


def base_noise_hu(vol, body: np.ndarray | None = None) -> tuple[float, str]:
    """(noise SD in HU, method) of the first slice of ``vol`` (an ``analysis.volume.CTVolume``) as
    acquired: the node's global noise of the slice (analysis/classical.py: Christianson mode of the
    6 mm local SD over soft tissue, peak-corrected); where that is not measurable (too little soft
    tissue, no noise peak: e.g. a lossy-compressed, smoothed slice), the median 6 mm local SD over
    body pixels whose whole kernel lies in -300..400 HU and whose local mean is in 0..150 HU (at least
    MIN_FALLBACK_PIXELS of them; anatomy edges make this read high, never low); else
    (nan, "not measurable")."""
    from analysis import classical
    from analysis.mask import body_mask, box_erode
    from analysis.results import RunContext

    hu = vol.hu[0]
    if body is None:
        body = body_mask(hu, vol.pixel_spacing_mm)
    if vol.n_slices == 1:
        vol.body_masks = body[None]
    g = float(classical.run(vol, RunContext()).slice_metrics["global_noise_hu"][0])
    if math.isfinite(g):
        return g, "global noise"
    k = classical.noise_kernel_px(vol.pixel_spacing_mm)
    mean, sd = classical.local_mean_sd(hu, k)
    core = body & box_erode((hu > -300) & (hu < 400), (k[0] | 1, k[1] | 1)) & (mean >= 0) & (mean <= 150)
    if int(core.sum()) >= MIN_FALLBACK_PIXELS:
        return float(np.median(sd[core])), "median local SD"
    return float("nan"), "not measurable"


def added_noise_sd(level: int, base: float, definition: str = "absolute") -> float:
    """SD (HU) of the noise added at ``level``: LEVELS[level][0] ("relative"), or
    sqrt(ABSOLUTE_NOISE_HU[level]^2 - base^2) ("absolute"; 0 at level 0)."""
    if definition == "relative":
        return LEVELS[level][0]
    if definition != "absolute":
        raise ValueError(f"level definition must be one of {LEVEL_DEFINITIONS}, not {definition!r}")
    target = ABSOLUTE_NOISE_HU[level]
    if target is None:
        return 0.0
    if not base < target:
        raise ValueError(f"base noise {base:.1f} HU is not below the level-{level} total of {target:g} HU")
    return math.sqrt(target * target - base * base)


def degrade(hu: np.ndarray, level: int, rng: np.random.Generator, body: np.ndarray | None = None,
            bases: np.ndarray | None = None, *, noise_sd: float | None = None,
            scale_mask: np.ndarray | None = None) -> np.ndarray:
    """``hu`` at degradation ``level``: added noise of SD ``noise_sd`` HU (default ``LEVELS[level][0]``)
    plus the level's streaks. With ``bases`` (``projection_noise_bases``) the noise is projection-domain
    noise, its SD over ``scale_mask`` (default: the body) scaled to ``noise_sd`` (its non-stationarity
    kept, in the air too, as in a scan); without, image-domain ramp-spectrum noise confined to the body
    (the fast route, for tests)."""
    _, n_streaks, amp = LEVELS[level]
    sd = LEVELS[level][0] if noise_sd is None else float(noise_sd)
    hu = hu.astype(np.float32)
    st = streaks(hu.shape, amp, n_streaks, rng, body)
    if bases is not None:
        if sd <= 0:
            return hu + st
        n = mix_bases(bases, rng)
        m = scale_mask if scale_mask is not None and scale_mask.any() else body
        ref = n[m] if m is not None and m.any() else n
        return hu + n * (sd / float(ref.std())) + st
    out = hu + ct_like_noise(hu.shape, sd, rng) + st
    if body is not None:  # noise and streaks in the patient; the air around stays (mostly) air
        out = np.where(body, out, hu + 0.2 * (out - hu))
    return out


# real single-frame 512 x 512 slices with anatomy in the soft-tissue window, one series each (paths under
# the shared data folder; the dicom2nifti corpus series hold blanked pixels and are not usable here).
# The head phantom (last) has almost no soft tissue: bench/delta_iqa_synthetic.py keeps it in training.
SYNTHETIC_SOURCES = (
    "corpus/dcmqi/GE_LightSpeedUltra_3slice",
    "corpus/cornerstone3D/GE_HiSpeedCTi_TS_LittleEndianExplicit",
    "corpus/pydicom-data/Anon_pancreas_explicitVR_UN",
    "corpus/pylibjpeg-data/GE_coreload_693_J2K_lossy",
    "corpus/pylibjpeg-data/Hitachi_Supria_J2K_pixrep_tilt",
    "corpus/pylibjpeg-data/Toshiba_Aquilion_J2K_OpenJPEGv2",
    "corpus/pylibjpeg-data/Toshiba_Aquilion_J2K_lossy",
    "corpus/dicompyler-core/Anon_dicompyler_ct",
    "corpus/pydicom-data/Siemens_Definition_bad_sequence",
    "dicom/wg04/CT1_UNC",
    "dicom/wg04/CT2_UNC",
    "ct/philips_head_phantom/S2010_5mm",
)


def synthetic_source_files(shared_data: Path, max_per_series: int = 3) -> list[Path]:
    """The files of SYNTHETIC_SOURCES (at most ``max_per_series`` evenly spaced files of a folder)."""
    out: list[Path] = []
    for rel in SYNTHETIC_SOURCES:
        p = Path(shared_data) / rel
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.name not in ("LICENSE", "README.md"))
        if len(files) > max_per_series:
            files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, max_per_series).round().astype(int))]
        out.extend(files)
    return out


def make_synthetic_ratings(sources: Sequence[Path], out_dir: Path, *, per_slice_levels: Sequence[int] = range(5),
                           seed: int = 0, max_slices_per_series: int = 0, realisations: int = 1,
                           noise: str = "projection", levels: str = "absolute") -> Path:
    """Write degraded copies of real single-frame slices (one DICOM file per slice, level and noise
    realisation; the source's SeriesInstanceUID kept so a split by series keeps every version of a
    series together) and ``out_dir/ratings.csv`` rating each by its level (score = 4 - level, rater
    ``synthetic``). ``noise``: "projection" (projection-domain noise, ``degrade``; about 2 s of FBP per
    slice on 2 cores) or "image" (image-domain ramp-spectrum noise, milliseconds).

    ``levels``: "absolute" (default): a level is the TOTAL noise in the body (ABSOLUTE_NOISE_HU; the
    image alone decides its level): each slice's own noise is measured (``base_noise_hu``; a slice
    where it is not measurable takes the median of its series' measurable slices), the added noise
    is sqrt(target^2 - base^2) (projection noise: its SD scaled over the slice's soft tissue, 0..150 HU
    in the body, where global noise is measured; image-domain noise is stationary), and a slice whose base noise is not below ABSOLUTE_NOISE_HU[1] /
    BASE_MARGIN, or not measurable in its series at all, is left out. "relative": the fixed added SD
    of LEVELS on top of each slice's own noise, scaled over the body (the earlier definition, kept to
    reproduce earlier runs). Either way ``out_dir/sources.csv`` lists every source slice with its base
    noise, the method and whether it was used."""
    if noise not in ("projection", "image"):
        raise ValueError(f"noise must be 'projection' or 'image', not {noise!r}")
    if levels not in LEVEL_DEFINITIONS:
        raise ValueError(f"levels must be one of {LEVEL_DEFINITIONS}, not {levels!r}")
    import csv
    import json

    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from analysis.mask import body_mask
    from analysis.training.ratings_file import is_valid_uid
    from analysis.volume import load_series

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    source_rows: list[tuple] = []
    by_series: dict[str, list[Path]] = {}
    for f in sources:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        uid = str(ds.SeriesInstanceUID)
        if not is_valid_uid(uid):  # (bad_sequence.dcm) a valid stand-in, the same for every slice of the series
            uid = generate_uid(entropy_srcs=[uid])
        by_series.setdefault(uid, []).append(Path(f))
    for s_i, (series_uid, files) in enumerate(sorted(by_series.items())):
        files = sorted(files)
        if max_slices_per_series and len(files) > max_slices_per_series:
            pick = np.unique(np.linspace(0, len(files) - 1, max_slices_per_series).round().astype(int))
            files = [files[i] for i in pick]
        measured = []
        for f in files:
            vol = load_series([f])
            body = body_mask(vol.hu[0], vol.pixel_spacing_mm)
            base, how = base_noise_hu(vol, body)
            measured.append((f, vol, body, base, how))
        finite = [m[3] for m in measured if math.isfinite(m[3])]
        for f, vol, body, base, how in measured:
            if not math.isfinite(base) and finite:
                base, how = float(np.median(finite)), "median of the series' measurable slices"
            limit = ABSOLUTE_NOISE_HU[1] / BASE_MARGIN
            use = levels == "relative" or (math.isfinite(base) and base < limit)
            why = ("" if use else "base noise not measurable" if not math.isfinite(base)
                   else f"base noise >= {limit:.1f} HU (level 1 total {ABSOLUTE_NOISE_HU[1]:g} HU / {BASE_MARGIN:g})")
            source_rows.append((str(f), series_uid, f"{base:.2f}", how, "yes" if use else "no", why))
            if not use:
                continue
            hu = vol.hu[0]
            tissue = body & (hu >= 0) & (hu <= 150)
            scale = tissue if levels == "absolute" and tissue.sum() >= MIN_FALLBACK_PIXELS else body
            bases = projection_noise_bases(hu, vol.pixel_spacing_mm, rng) if noise == "projection" else None
            src = pydicom.dcmread(f)
            for level, rep in ((lv, r) for lv in per_slice_levels for r in range(realisations)):
                img = degrade(hu, int(level), rng, body, bases, noise_sd=added_noise_sd(int(level), base, levels),
                              scale_mask=scale)
                ds = pydicom.Dataset()
                for kw in ("SOPClassUID", "StudyInstanceUID", "Modality", "PixelSpacing",
                           "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "KVP",
                           "Manufacturer", "InstanceNumber"):
                    if kw in src:
                        setattr(ds, kw, src.data_element(kw).value)
                ds.SeriesInstanceUID = series_uid
                if not is_valid_uid(str(ds.get("StudyInstanceUID", ""))):
                    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(ds.get("StudyInstanceUID", series_uid))])
                ds.SOPInstanceUID = generate_uid()
                ds.Modality = "CT"
                ds.SeriesDescription = f"synthetic degradation level {level}"
                ds.file_meta = pydicom.dataset.FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.set_pixel_data(np.clip(np.round(img), -1024, 3071).astype(np.int16), "MONOCHROME2", 16)
                ds.RescaleIntercept, ds.RescaleSlope = 0, 1
                name = out_dir / f"s{s_i:02d}_{f.stem}_L{level}_r{rep}.dcm"
                ds.save_as(name, enforce_file_format=True)
                rows.append((name.name, 4 - int(level), "synthetic", ds.SOPInstanceUID))
    csv_path = out_dir / "ratings.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "score", "rater", "sop_instance_uid"])
        w.writerows(rows)
    with (out_dir / "sources.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "series_instance_uid", "base_noise_hu", "method", "used", "why_not"])
        w.writerows(source_rows)
    info = {"levels": levels, "noise": noise, "seed": seed, "realisations": realisations,
            "absolute_noise_hu": list(ABSOLUTE_NOISE_HU), "base_margin": BASE_MARGIN,
            "added_noise_hu": [v[0] for v in LEVELS], "streaks": [[v[1], v[2]] for v in LEVELS],
            "sources": [{"source": r[0], "base_noise_hu": float(r[2]), "method": r[3], "used": r[4] == "yes",
                         "why_not": r[5]} for r in source_rows]}
    (out_dir / SYNTHETIC_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return csv_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.training.delta_iqa")
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
