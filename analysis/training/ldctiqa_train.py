"""Fine-tuning LDCTIQA on a site's ratings (``qa-node train ldctiqa``).

    add_arguments(parser)   # --ratings FILE --init ldct-iqa.pt --out PATH [--epochs N] [--seed S] ...
    run(args) -> int        # exit status (2: bad ratings file, bad --init, bad options; nothing written)

Starts from ``--init``, a ``{"model_state_dict": ...}`` file that ``analysis.ldctiqa.load_weights``
accepts (ldct-benchmark's published ``ldct-iqa.pt``, or an earlier fine-tuned file), and fine-tunes
all of it with the LDCTIQAC-winning recipe (REFERENCE section 1):

- 21 ordinal classes (Likert 0.0, 0.2, ..., 4.0), 4 heads;
- loss = RPS (ranked probability score) of the softmax of the mean over the heads of the logits,
  plus the cross-entropy of each head, averaged over the heads and weighted by ``--ce-weight``
  (default 1). Targets are "fuzzy": a score between two classes (a mean over raters, e.g. 2.3) is
  split between the two nearest classes (2.2 and 2.4, by distance); a score on the grid is one-hot;
- NAdam, learning rate 1e-4, batch 8 (accumulated over micro-batches of ``--micro-batch`` images,
  default 2: the network has LayerNorm only, so this is the same gradient as one batch of 8, at a
  quarter of the memory), cosine annealing with warm restarts (one cycle per epoch, per step);
- augmentation per image: horizontal and vertical flips, a rotation by a multiple of 90 degrees and
  a small isotropic scaling (0.9-1.1; what falls outside is air).

Input preparation is the model's own (``analysis.ldctiqa``: to 512 x 512, ldct-benchmark's window,
3 channels, ImageNet mean/std), so the weights written are used at inference exactly as trained.

The held-out split is by series (``analysis.training.delta_iqa.split_by_series``: every slice of a
held-out series is held out; default 20 % of the images); the held-out set is used for nothing but
the figures in the model card: PLCC / SROCC / KROCC of the expected score (``ldctiqa_expected_score``)
against the ratings, for ``--init`` before fine-tuning and for the result. The last epoch's weights
are kept (no early stopping: a few hundred ratings leave no second validation set).

Outputs: ``--out`` gets ``{"model_state_dict": ..., "labels": "site" | "synthetic", ...}`` (loadable by
``analysis.ldctiqa.load_weights``, usable as ``[analysis.ldctiqa] weights``; the node reads
``labels`` and marks scores of synthetic-label weights in every SR) and ``<out stem>_MODEL_CARD.md``
beside it: the data, the exact command, the init file's SHA-256, the held-out figures, the CPU time
per image and step.

Cost on this 2-core CPU (bench/results/ldctiqa_finetune_cpu.json): one training image costs 2.8 s
per step on one torch thread on a quiet machine (forward and backward of the 27.6 M-parameter network
at 512 x 512; 5.2 s wall at load 6), about 2-3 times the inference forward pass; 300 ratings (240
training images x 3 epochs) are about 35 min on a quiet machine, about an hour at load 6.
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

from analysis import ldctiqa as lq
from analysis.delta_iqa import split_between_classes

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 3
DEFAULT_LR = 1e-4
DEFAULT_BATCH = 8
DEFAULT_MICRO_BATCH = 2
DEFAULT_CE_WEIGHT = 1.0
SCALE_RANGE = (0.9, 1.1)
CLASS_STEP = 0.2  # Likert points per class
LABELS = {"site": "site raters' Likert scores", "synthetic": "SYNTHETIC degradation levels (not radiologist ratings)"}
ARCHITECTURE = "ldctiqa_multihead_swin_t"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratings", required=True, metavar="FILE",
                        help="ratings CSV (path,score[,rater,frame,sop_instance_uid]; see `qa-node ratings`)")
    parser.add_argument("--init", required=True, metavar="FILE",
                        help="weights to start from: ldct-benchmark's ldct-iqa.pt ({'model_state_dict': ...}) "
                        "or an earlier fine-tuned file")
    parser.add_argument("--out", required=True, metavar="PATH", help="weights file to write; the model card goes beside it")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                        help=f"passes over the training ratings (default {DEFAULT_EPOCHS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the sample order and the augmentation")
    parser.add_argument("--batch", "--batch-size", dest="batch", type=int, default=DEFAULT_BATCH,
                        help=f"images per optimiser step (default {DEFAULT_BATCH})")
    parser.add_argument("--micro-batch", type=int, default=DEFAULT_MICRO_BATCH,
                        help=f"images per forward/backward pass; gradients are accumulated to --batch "
                        f"(default {DEFAULT_MICRO_BATCH}: about 2.5 GB of memory at 512 x 512)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"NAdam learning rate (default {DEFAULT_LR:g})")
    parser.add_argument("--ce-weight", type=float, default=DEFAULT_CE_WEIGHT,
                        help=f"weight of the per-head cross-entropy beside the RPS (default {DEFAULT_CE_WEIGHT:g})")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of the ratings held out, by whole series (default 0.2; at least one series)")
    parser.add_argument("--labels", choices=sorted(LABELS), default="site",
                        help="what the scores are: site (raters' Likert scores) or synthetic (degradation levels, for tests)")
    parser.add_argument("--size", type=int, default=lq.INPUT_SIZE, help=argparse.SUPPRESS)  # < 512 only for fast tests
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


# ------------------------------------------------------------------------------------- targets, loss
def fuzzy_targets(scores, num_classes: int = lq.NUM_CLASSES) -> np.ndarray:
    """(n, 21) soft targets: a score s (Likert, [0, 4]) sits at position s / 0.2 on the class grid and
    is split between the two nearest classes by distance (2.3 -> 0.5 on class 11 = 2.2, 0.5 on
    class 12 = 2.4); a score on the grid is one-hot."""
    pos = np.clip(np.asarray(scores, dtype=np.float64) / CLASS_STEP, 0.0, num_classes - 1.0)
    pos = np.round(pos, 9)  # 2.2 / 0.2 = 11.000000000000002: on the grid
    return split_between_classes(pos, num_classes)


def rps_loss(probs, target):
    """Ranked probability score, mean over the batch: sum over k < K of (cumulative p_k - cumulative
    t_k)^2 / (K - 1), for (B, K) probabilities and targets (torch)."""
    import torch

    cp = torch.cumsum(probs, dim=-1)[..., :-1]
    ct = torch.cumsum(target, dim=-1)[..., :-1]
    return ((cp - ct) ** 2).sum(dim=-1).div(probs.shape[-1] - 1).mean()


def head_logits(net, x):
    """(B, heads, classes) logits of ``MultiHeadSwin`` (its forward returns the mean softmax)."""
    import torch

    f = net.model(x)
    return torch.stack([hd(f) for hd in net.heads], dim=-2).float()


def recipe_loss(logits, target, ce_weight: float = DEFAULT_CE_WEIGHT):
    """RPS of softmax(mean over heads of the logits) + ce_weight * mean over heads of each head's
    soft-target cross-entropy. ``logits`` (B, heads, K), ``target`` (B, K)."""
    rps = rps_loss(logits.mean(dim=1).softmax(dim=-1), target)
    ce = -(target[:, None, :] * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    return rps + ce_weight * ce


# ------------------------------------------------------------------------------------- data
@dataclass
class RatedImages:
    x: np.ndarray  # float16 (n, size, size): the model's window, [0, 1] (before 3 channels and ImageNet normalisation)
    scores: np.ndarray  # (n,) float
    groups: list[str]  # per image: its series (SeriesInstanceUID, else the file's folder)
    paths: list[str] = field(default_factory=list)
    resampled: int = 0  # images whose matrix was not 512 x 512


class ImageError(ValueError):
    """Rated images that cannot be read as CT slices: ``errors`` holds one line per row ("line N: ...")."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors[:5]))


def window01(hu: np.ndarray, size: int = lq.INPUT_SIZE) -> tuple[np.ndarray, bool]:
    """(n, H, W) HU -> (n, size, size) float32 in the model's window [0, 1] (analysis.ldctiqa)."""
    import torch
    import torch.nn.functional as F

    hu512, resampled = lq.to_512(hu)
    x = lq.apply_center_width(hu512 + np.float32(1024.0))
    if size != lq.INPUT_SIZE:
        x = F.interpolate(torch.from_numpy(x)[:, None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[:, 0].numpy()
    return x, resampled


def load_rated_images(rows: Sequence, size: int = lq.INPUT_SIZE, progress: bool = False) -> RatedImages:
    """Decode each rated image (``analysis.training.ratings_file.RatingRow``) to the model's window.
    Raises ``ImageError`` listing every row whose file is not a usable CT slice."""
    from analysis.results import SeriesSkipped
    from analysis.volume import load_series

    x = np.empty((len(rows), size, size), dtype=np.float16)
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="reading images", unit="img", dynamic_ncols=True)
    cache: dict[str, object] = {}
    groups, paths, errors, n_resampled = [], [], [], 0
    for i, r in enumerate(it):
        key = str(r.path)
        vol = cache.get(key)
        if vol is None:
            try:
                vol = load_series([r.path])
            except (SeriesSkipped, ValueError) as exc:
                vol = f"{Path(r.path).name}: not a usable CT slice ({exc})"
            cache = {key: vol}  # one file at a time (a multi-frame file is read once per run of its rows)
        if isinstance(vol, str):
            errors.append(f"line {r.line}: {vol}")
            continue
        k = 0
        if r.frame is not None:
            ks = [j for j, f in enumerate(vol.frame_numbers) if f == r.frame]
            if not ks:
                errors.append(f"line {r.line}: frame {r.frame} is not among the file's CT frames")
                continue
            k = ks[0]
        img, rs = window01(vol.hu[k:k + 1], size)
        x[i] = img[0]
        n_resampled += int(rs)
        groups.append(r.series_instance_uid or str(Path(r.path).parent))
        paths.append(key)
    if errors:
        raise ImageError(errors)
    return RatedImages(x=x, scores=np.array([float(r.score) for r in rows]), groups=groups, paths=paths,
                       resampled=n_resampled)


def to_input(x01):
    """(B, 1, S, S) window [0, 1] -> (B, 3, S, S) network input (grey x 3, ImageNet mean/std)."""
    import torch

    mean = torch.tensor(lq.IMAGENET_MEAN, dtype=torch.float32, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(lq.IMAGENET_STD, dtype=torch.float32, device=x01.device).view(1, 3, 1, 1)
    return (x01.expand(-1, 3, -1, -1) - mean) / std


def augment(x, gen):
    """Per image: random horizontal and vertical flip, rotation by k x 90 degrees, isotropic scale
    in SCALE_RANGE about the centre (outside = 0, i.e. air in the window). (B, 1, S, S) -> same."""
    import torch
    import torch.nn.functional as F

    out = []
    for img in x:
        if torch.rand(1, generator=gen).item() < 0.5:
            img = img.flip(-1)
        if torch.rand(1, generator=gen).item() < 0.5:
            img = img.flip(-2)
        img = torch.rot90(img, int(torch.randint(0, 4, (1,), generator=gen)), dims=(-2, -1))
        out.append(img)
    x = torch.stack(out)
    lo, hi = SCALE_RANGE
    s = lo + (hi - lo) * torch.rand(x.shape[0], generator=gen)
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s  # output samples the input at p / s: content scaled by s
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------- training
class InitError(ValueError):
    """--init is missing or not a MultiHeadSwin checkpoint."""


def load_init(path: str | Path):
    """(MultiHeadSwin in train mode on the CPU, SHA-256) from a file ``analysis.ldctiqa.load_weights``
    accepts (a dict with ``model_state_dict`` that fits the network strictly); ``InitError`` naming the
    file otherwise. A network of its own is built from the file (the load cache's network is shared
    with inference and must not be trained in place); it is built on the meta device and takes the
    file's tensors (no 27.6 M-parameter random initialisation that the file would overwrite)."""
    import torch

    from analysis.weights import file_sha256

    p = Path(path).expanduser()
    if not p.is_file():
        raise InitError(f"--init {p}: no such file (give ldct-benchmark's ldct-iqa.pt or an earlier fine-tuned file)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a foreign/corrupt file
        raise InitError(f"--init {p} cannot be read as a torch file: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("model_state_dict"), dict):
        raise InitError(f"--init {p} is not an LDCTIQA checkpoint (expected a dict with 'model_state_dict')")
    state = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in blob["model_state_dict"].items()}
    with torch.device("meta"):
        net = lq.MultiHeadSwin()
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])[:300]
        raise InitError(f"--init {p} does not fit the LDCTIQA multi-head Swin-T: {first}") from None
    return net.train(), file_sha256(p)


@dataclass
class TrainResult:
    net: object
    held_out: dict  # plcc/srocc/krocc/aggregate of the fine-tuned network on the held-out images
    held_out_init: dict  # the same for --init before fine-tuning
    held_pred: np.ndarray
    held_true: np.ndarray
    train_idx: np.ndarray
    held_idx: np.ndarray
    seconds: float  # wall time of the training steps
    image_steps: int  # training images passed forward and backward
    cpu_seconds: float  # process CPU time of the training steps
    losses: list[float]


def train(net, data: RatedImages, split: tuple[np.ndarray, np.ndarray], *, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
          batch: int = DEFAULT_BATCH, micro_batch: int = DEFAULT_MICRO_BATCH, lr: float = DEFAULT_LR,
          ce_weight: float = DEFAULT_CE_WEIGHT, device: str = "cpu", augmentation: bool = True,
          progress: bool = True, evaluate_init: bool = True) -> TrainResult:
    """Fine-tune ``net`` (in place) on ``data.x[split[0]]``; held-out figures on ``split[1]``."""
    import torch

    tr, ho = split
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = net.to(device)
    init_fig = correlations(predict_prepared(net, data.x[ho], device), data.scores[ho]) if evaluate_init and len(ho) else {}
    opt, sched = optimiser(net.parameters(), lr)
    steps_per_epoch = math.ceil(len(tr) / batch)
    targets = torch.from_numpy(fuzzy_targets(data.scores))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, unit="step", desc="fine-tuning", dynamic_ncols=True)
    losses: list[float] = []
    t0, c0, n_img = time.perf_counter(), time.process_time(), 0
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(tr)
        total = 0.0
        for step, b in enumerate(range(0, len(order), batch)):
            idx = order[b:b + batch]
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for m in range(0, len(idx), micro_batch):
                mi = idx[m:m + micro_batch]
                x = torch.from_numpy(data.x[mi].astype(np.float32))[:, None]
                if augmentation:
                    x = augment(x, gen)
                loss = recipe_loss(head_logits(net, to_input(x.to(device))), targets[mi].to(device), ce_weight)
                (loss * (len(mi) / len(idx))).backward()  # the batch mean, accumulated
                step_loss += float(loss.detach()) * len(mi)
            opt.step()
            sched.step(epoch + (step + 1) / steps_per_epoch)
            total += step_loss
            n_img += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss / len(idx):.3f}")
        losses.append(total / max(1, len(tr)))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if bar is not None:
        bar.close()
    pred = predict_prepared(net, data.x[ho], device)
    return TrainResult(net=net, held_out=correlations(pred, data.scores[ho]), held_out_init=init_fig, held_pred=pred,
                       held_true=data.scores[ho], train_idx=tr, held_idx=ho, seconds=seconds, image_steps=n_img,
                       cpu_seconds=cpu, losses=losses)


def optimiser(params, lr: float = DEFAULT_LR):
    """NAdam and cosine annealing with warm restarts, one cycle per epoch: ``sched.step(epoch + (k + 1) /
    steps_per_epoch)`` after step k of an epoch; each epoch starts at ``lr``."""
    import torch

    opt = torch.optim.NAdam(params, lr=lr)
    return opt, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=1)


def predict_prepared(net, x: np.ndarray, device: str = "cpu", batch: int = 4) -> np.ndarray:
    """Expected scores (sum_k p_k * k / 5 of the mean softmax, i.e. ``ldctiqa_expected_score``) of
    already windowed images (n, S, S)."""
    import torch

    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i:i + batch], dtype=np.float32))[:, None].to(device)
            out.append(net(to_input(xb)).double().cpu().numpy())
    net.train(was_training)
    return np.concatenate(out) @ lq.CLASS_SCORES if out else np.zeros(0)


def correlations(pred, truth) -> dict[str, float]:
    from analysis.delta_iqa import correlations as corr

    return corr(pred, truth)


def save_weights(path: Path, net, *, labels: str, extra: dict) -> None:
    """``{"model_state_dict": ...}`` as ``analysis.ldctiqa.load_weights`` reads it, plus provenance
    (``labels``, the init file's SHA-256, ...). Written to a temporary name, then renamed."""
    import torch

    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {"model_state_dict": state, "architecture": ARCHITECTURE, "labels": labels}
    payload.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------- CLI
def _fail(msg: str) -> int:
    print(f"qa-node train ldctiqa: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from analysis.training.delta_iqa import split_by_series
    from analysis.training.ratings_file import RatingsFileError, print_problems, read_ratings_csv
    from analysis.weights import file_sha256

    if args.epochs < 1 or args.batch < 1 or args.micro_batch < 1 or not 0 < args.holdout < 1 or args.lr <= 0 \
            or args.ce_weight < 0 or not 32 <= args.size <= lq.INPUT_SIZE:
        return _fail("--epochs, --batch and --micro-batch must be >= 1, --holdout in (0, 1), --lr > 0, --ce-weight >= 0")
    out = Path(args.out)
    if out.resolve() == Path(args.init).expanduser().resolve():
        return _fail(f"--out {out} is the --init file: write the fine-tuned weights to a new file")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but CUDA is not available")
    try:
        rows = read_ratings_csv(args.ratings)
    except RatingsFileError as exc:
        print_problems(exc.path, exc.errors, "nothing trained")
        return 2
    try:
        net, init_sha = load_init(args.init)
    except InitError as exc:
        return _fail(f"{exc}; nothing trained")
    try:
        data = load_rated_images(rows, size=args.size, progress=not args.no_progress)
    except ImageError as exc:
        print_problems(args.ratings, exc.errors, "nothing trained")
        return 2
    try:
        split = split_by_series(data.groups, args.holdout, args.seed)
    except ValueError as exc:
        return _fail(str(exc))
    log.info("ldctiqa: %d ratings of %d series; %d train / %d held out (%d series held out)", len(rows),
             len(set(data.groups)), len(split[0]), len(split[1]), len({data.groups[i] for i in split[1]}))
    res = train(net, data, split, epochs=args.epochs, seed=args.seed, batch=args.batch, micro_batch=args.micro_batch,
                lr=args.lr, ce_weight=args.ce_weight, device=args.device, progress=not args.no_progress)
    save_weights(out, res.net, labels=args.labels,
                 extra={"init_sha256": init_sha, "held_out": res.held_out, "input_size": args.size,
                        "trained_at": datetime.now(timezone.utc).isoformat()})
    card = card_path(out)
    argv = sys.argv[1:]
    if argv[:2] == ["train", "ldctiqa"]:  # qa-node train ldctiqa ... (or python -m node train ldctiqa ...)
        command = shlex.join(["qa-node", *argv])
    else:  # a library call or python -m analysis.training.ldctiqa_train: the equivalent command
        command = shlex.join(["qa-node", "train", "ldctiqa", *_argv_of(args)]) + "    (equivalent; not run from qa-node)"
    card.write_text(model_card(args, rows, data, res, command=command, ratings_sha=file_sha256(args.ratings),
                               init_sha=init_sha, weights_sha=file_sha256(out)), encoding="utf-8")
    h, h0 = res.held_out, res.held_out_init
    print(f"held-out ({len(res.held_idx)} images of {len({data.groups[i] for i in res.held_idx})} series): "
          f"PLCC {h['plcc']:.3f}  SROCC {h['srocc']:.3f}  KROCC {h['krocc']:.3f}  "
          f"(init: PLCC {h0['plcc']:.3f}  SROCC {h0['srocc']:.3f}  KROCC {h0['krocc']:.3f}); "
          f"{res.seconds:.0f} s, {res.seconds / max(1, res.image_steps):.2f} s per image and step")
    print(f"weights: {out}\nmodel card: {card}")
    return 0


def _argv_of(args) -> list[str]:
    a = ["--ratings", str(args.ratings), "--init", str(args.init), "--out", str(args.out), "--epochs", str(args.epochs),
         "--seed", str(args.seed), "--batch", str(args.batch), "--lr", f"{args.lr:g}"]
    if args.micro_batch != DEFAULT_MICRO_BATCH:
        a += ["--micro-batch", str(args.micro_batch)]
    if args.ce_weight != DEFAULT_CE_WEIGHT:
        a += ["--ce-weight", f"{args.ce_weight:g}"]
    if args.holdout != 0.2:
        a += ["--holdout", f"{args.holdout:g}"]
    if args.labels != "site":
        a += ["--labels", args.labels]
    if args.size != lq.INPUT_SIZE:
        a += ["--size", str(args.size)]
    return a


def card_path(weights: Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + "_MODEL_CARD.md")


def _fig_row(name: str, h: dict) -> str:
    return f"| {name} | {h['plcc']:.4f} | {h['srocc']:.4f} | {h['krocc']:.4f} | {h['aggregate']:.4f} |"


def model_card(args, rows, data: RatedImages, res: TrainResult, *, command: str, ratings_sha: str, init_sha: str,
               weights_sha: str) -> str:
    synthetic = args.labels == "synthetic"
    raters = sorted({r.rater for r in rows if r.rater})
    hist = np.histogram(data.scores, bins=[0, 0.5, 1.5, 2.5, 3.5, 4.01])[0]
    published = init_sha == lq.PUBLISHED_SHA256
    per_img = res.seconds / max(1, res.image_steps)
    cpu_img = res.cpu_seconds / max(1, res.image_steps)
    import torch

    threads = torch.get_num_threads()
    lines = [
        "# LDCTIQA fine-tuned model card" + (" — SYNTHETIC-DEGRADATION WEIGHTS (not radiologist ratings)" if synthetic else ""),
        "",
        f"Written by `qa-node train ldctiqa` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
        "Architecture, input and the original training data: analysis/weights/LDCTIQA_MODEL_CARD.md.",
        "",
        "## Labels",
        f"- {LABELS[args.labels]} (`labels = {args.labels}` in the weights file).",
    ]
    if synthetic:
        lines += ["- These weights score how strongly synthetic noise/streaks were added, nothing a radiologist said. "
                  "Do not enable them as a Likert model ([analysis.ldctiqa] weights) for clinical QA; if enabled, "
                  "every SR says `labels=synthetic`."]
    else:
        lines += ["- Valid only for images like the rated ones, as judged by these raters."]
    lines += [
        "",
        "## Starting point",
        f"- --init `{args.init}`, SHA-256 {init_sha}"
        + (" (ldct-benchmark's published ldct-iqa.pt)" if published else " (NOT the published ldct-iqa.pt checksum)"),
        "",
        "## Data",
        f"- ratings file: `{args.ratings}` (SHA-256 {ratings_sha})",
        f"- {len(rows)} ratings of {len(set(r.path for r in rows))} images, {len(set(data.groups))} series, "
        f"{len(raters)} named rater(s){': ' + ', '.join(raters) if raters else ''}; "
        f"{data.resampled} image(s) resampled to 512 x 512",
        f"- scores (rounded to a Likert point): 0: {hist[0]}, 1: {hist[1]}, 2: {hist[2]}, 3: {hist[3]}, 4: {hist[4]}",
        f"- split by series (seed {args.seed}): {len(res.train_idx)} training images "
        f"({len({data.groups[i] for i in res.train_idx})} series), {len(res.held_idx)} held out "
        f"({len({data.groups[i] for i in res.held_idx})} series, never seen in training, used for nothing else)",
        "",
        "## Command",
        f"    {command}",
        "",
        "## Training",
        f"- all layers; {args.epochs} epoch(s), batch {args.batch} (micro-batches of {args.micro_batch}), NAdam lr "
        f"{args.lr:g}, cosine annealing with warm restarts (one cycle per epoch); loss = RPS of the mean-head "
        f"logits' softmax + {args.ce_weight:g} x mean per-head cross-entropy; fuzzy targets on the 21 classes; "
        f"flips, rotations by 90 degrees, scale {SCALE_RANGE[0]:g}-{SCALE_RANGE[1]:g}; last epoch kept",
    ]
    if args.size != lq.INPUT_SIZE:
        lines += [f"- REDUCED input size {args.size} x {args.size} (a test run, not the model's 512 x 512 input)"]
    lines += [
        f"- device {args.device}, {threads} torch thread(s): {res.image_steps} image steps in {res.seconds:.0f} s, "
        f"{per_img:.2f} s wall and {cpu_img:.2f} s CPU per training image and step (forward + backward, "
        f"{args.size} x {args.size})",
        "- training loss per epoch: " + ", ".join(f"{v:.4f}" for v in res.losses),
        f"- weights file SHA-256: {weights_sha}",
        "",
        "## Held-out agreement (expected score vs rating, images of held-out series)",
        "| weights | PLCC | SROCC | KROCC | PLCC+SROCC+KROCC |",
        "|---|---|---|---|---|",
        _fig_row("fine-tuned", res.held_out),
    ]
    if res.held_out_init:
        lines += [_fig_row("init (before)", res.held_out_init)]
    lines += [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.training.ldctiqa_train")
    add_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
