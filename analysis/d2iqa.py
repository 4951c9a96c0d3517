"""D2IQA: a no-reference CT quality score from how well a detector finds faint virtual objects.

Method (../shared/REFERENCE.md section 1; Lee et al., the D2IQA paper):

1. Insert 2-5 lesion-like objects (``analysis.d2iqa_insert``) into a slice, at random positions inside
   the patient (the node's shared body mask, ``analysis.mask``), with random shape/size/contrast/rotation:
   one *trial*.
2. Run a small self-supervised detector (below) on the windowed trial image.
3. Score = COCO mAP (IoU 0.50:0.95, 101-point precision, mean over the four shape classes;
   ``analysis.coco_map``) **pooled** over ``T`` trials: the T trial images are evaluated together as
   one COCO data set (T "images"), which is far less noisy than the mean of T per-trial mAPs (one
   trial has only 2-5 objects, so its mAP is very coarse).
4. Series score = mean of the slice scores over a subset of slices (``[analysis.d2iqa] max_slices`` evenly
   spaced slices; all when 0).

Trials are seeded per slice (``seed + slice index``), so re-running a series, or scoring a lower-dose
version of the same slice, uses the same insertion layouts.

Detector: "D2IQANet", a CenterNet-style anchor-free detector in plain torch (~0.9 M parameters):
stride-2 stem, encoder to stride 16, a U-shaped decoder back to stride 4, and three heads: a per-class
centre heat map (4 classes, focal loss), box size and sub-cell offset. Detections = 3 x 3 max-pool
peaks of the heat map, top ``MAX_DETS`` per image. The detector sees only a crop around the region
where objects may be placed (the placement mask's bounding box plus a margin), which is where
all the objects are, and saves time on slices with much air.

Batches: the trial images of a slice go through the detector ``[analysis.d2iqa] batch`` at a time
(left out: 8 on the CPU, up to 64 on CUDA within the free GPU memory, i.e. all 50 default trials of a
slice in one pass). Slices are not batched together: their crops differ in size, and padding them to
one size would change the detections near the crop edge.

CUDA: ``[analysis.d2iqa] amp`` = fp16 (default), bf16 or off. The stem (the input layer) always
runs in fp32 and the rest under autocast: bf16 on the input layer changed per-slice scores by up to
0.13 in the issue's baseline study (objects of a few HU in a 1400 HU window). The fp16 result has not
been compared with fp32 on a GPU yet (tests/unit/test_batching.py does when CUDA is present).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.batching import amp_dtype, is_cuda, resolve_batch, run_batches
from analysis.coco_map import ImageBoxes, coco_map
from analysis.d2iqa_insert import (
    SHAPES,
    InsertionConfig,
    VirtualObject,
    insert_objects,
    placement_mask,
    sample_layout,
    window01,
)
from analysis.weights import load_cached

log = logging.getLogger(__name__)

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "d2iqa.pt"
STRIDE = 4
N_CLASSES = len(SHAPES)
MAX_DETS = 20  # detections kept per trial image (COCO allows 100; with 2-5 objects 20 is ample)
DEFAULT_SEED = 0
# the defaults of [analysis.d2iqa] (analysis/models/d2iqa.py declares the same; a test checks)
DEFAULT_TRIALS = 50  # bench/d2iqa_convergence.py: score SD ~0.023 at T=50 vs 0.038 at T=20 (model card)
DEFAULT_MAX_SLICES = 16
CROP_MARGIN_PX = 24


# --------------------------------------------------------------------------------------------- model
def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class D2IQANet(nn.Module):
    """CenterNet-style detector. Input (B, 1, H, W) windowed to [0, 1], H and W multiples of 16.
    Output: heat logits (B, 4, H/4, W/4), size (B, 2, H/4, W/4) in pixels / 4, offset (B, 2, ...)."""

    def __init__(self, width: int = 24, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "n_classes": n_classes}
        self.stem = nn.Sequential(_cbr(1, w, 2), _cbr(w, w))  # /2
        self.down4 = nn.Sequential(_cbr(w, 2 * w, 2), _cbr(2 * w, 2 * w))  # /4
        self.down8 = nn.Sequential(_cbr(2 * w, 4 * w, 2), _cbr(4 * w, 4 * w))  # /8
        self.down16 = nn.Sequential(_cbr(4 * w, 5 * w, 2), _cbr(5 * w, 5 * w))  # /16
        self.up8 = _cbr(5 * w + 4 * w, 4 * w)
        self.up4 = nn.Sequential(_cbr(4 * w + 2 * w, 3 * w), _cbr(3 * w, 3 * w))
        c = 3 * w

        def head(cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(c, cout, 1))

        self.heat = head(n_classes)
        self.size = head(2)
        self.offset = head(2)
        nn.init.constant_(self.heat[-1].bias, -2.19)  # prior 0.1, as in CenterNet

    def forward(self, x: torch.Tensor, amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``amp_dtype`` (inference on CUDA): everything after the stem under autocast to that dtype;
        the stem (the input layer) stays fp32, because the objects' contrast is a few HU in a 1400 HU
        window (bf16 on the input layer changed per-slice scores by up to 0.13 in the issue's baseline
        study). None: fp32 throughout (training, the CPU)."""
        x = x - 0.5
        if amp_dtype is None:
            s2 = self.stem(x)
            return self._body(s2)
        with torch.autocast(x.device.type, enabled=False):
            s2 = self.stem(x.float())
        with torch.autocast(x.device.type, dtype=amp_dtype):
            return self._body(s2)

    def _body(self, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s4 = self.down4(s2)
        s8 = self.down8(s4)
        s16 = self.down16(s8)
        u8 = self.up8(torch.cat([F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False), s8], 1))
        u4 = self.up4(torch.cat([F.interpolate(u8, size=s4.shape[-2:], mode="bilinear", align_corners=False), s4], 1))
        return self.heat(u4), self.size(u4), self.offset(u4)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ targets
def make_targets(objects_per_image: Sequence[Sequence[VirtualObject]], out_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """CenterNet targets at stride 4 for a batch: Gaussian heat maps, and size/offset at the centre cell."""
    b = len(objects_per_image)
    h, w = out_hw
    heat = np.zeros((b, N_CLASSES, h, w), np.float32)
    size = np.zeros((b, 2, h, w), np.float32)
    offset = np.zeros((b, 2, h, w), np.float32)
    mask = np.zeros((b, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i, objs in enumerate(objects_per_image):
        for o in objs:
            x, y, bw, bh = o.bbox_xywh
            cx, cy = (x + bw / 2) / STRIDE, (y + bh / 2) / STRIDE
            ix, iy = int(cx), int(cy)
            if not (0 <= ix < w and 0 <= iy < h):
                continue
            sigma = max(0.6, (max(bw, bh) / STRIDE) / 6.0)
            g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma * sigma))
            np.maximum(heat[i, o.cls], g, out=heat[i, o.cls])
            size[i, :, iy, ix] = (bw / STRIDE, bh / STRIDE)
            offset[i, :, iy, ix] = (cx - ix, cy - iy)
            mask[i, iy, ix] = 1.0
    return {k: torch.from_numpy(v) for k, v in (("heat", heat), ("size", size), ("offset", offset), ("mask", mask))}


def detection_loss(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """CenterNet loss: penalty-reduced focal loss on the heat map + L1 on size (x0.1) and offset."""
    heat_logit, size, offset = outputs
    t_heat, t_size, t_off, m = targets["heat"], targets["size"], targets["offset"], targets["mask"]
    p = torch.sigmoid(heat_logit.float()).clamp(1e-4, 1 - 1e-4)
    pos = t_heat.eq(1.0).float()
    neg = 1.0 - pos
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - t_heat) ** 4 * neg
    n_pos = pos.sum().clamp(min=1.0)
    l_heat = -(pos_loss.sum() + neg_loss.sum()) / n_pos
    mm = m.unsqueeze(1)
    n_m = m.sum().clamp(min=1.0)
    l_size = (torch.abs(size.float() - t_size) * mm).sum() / n_m
    l_off = (torch.abs(offset.float() - t_off) * mm).sum() / n_m
    loss = l_heat + 0.1 * l_size + l_off
    return loss, {"heat": float(l_heat.detach()), "size": float(l_size.detach()), "offset": float(l_off.detach())}


# ------------------------------------------------------------------------------------------- decode
def decode(outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], max_dets: int = MAX_DETS) -> list[ImageBoxes]:
    """Peaks of the heat maps -> per-image boxes [x, y, w, h] in input-pixel coordinates."""
    heat_logit, size, offset = outputs
    heat = torch.sigmoid(heat_logit.float())
    peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat)
    b, c, h, w = peaks.shape
    k = min(max_dets, c * h * w)
    scores, idx = torch.topk(peaks.reshape(b, -1), k)
    cls = idx // (h * w)
    pix = idx % (h * w)
    ys, xs = pix // w, pix % w
    sz = size.float().reshape(b, 2, -1)
    of = offset.float().reshape(b, 2, -1)
    bw = torch.gather(sz[:, 0], 1, pix).clamp(min=0) * STRIDE
    bh = torch.gather(sz[:, 1], 1, pix).clamp(min=0) * STRIDE
    cx = (xs.float() + torch.gather(of[:, 0], 1, pix)) * STRIDE
    cy = (ys.float() + torch.gather(of[:, 1], 1, pix)) * STRIDE
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], dim=-1).cpu().numpy()
    scores_np, cls_np = scores.cpu().numpy(), cls.cpu().numpy()
    out = []
    for i in range(b):
        keep = scores_np[i] > 0
        out.append(ImageBoxes(boxes[i][keep], cls_np[i][keep], scores_np[i][keep]))
    return out


# ------------------------------------------------------------------------------------------ weights
@dataclass(frozen=True)
class LoadedModel:
    net: D2IQANet
    device: str
    sha256: str
    path: Path


def _build(path: Path, device: str) -> D2IQANet:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "model_state_dict" not in blob:
        raise ValueError(f"{path} is not a D2IQA weights file (expected a dict with 'model_state_dict')")
    cfg = blob.get("config", {})
    net = D2IQANet(width=int(cfg.get("width", 24)), n_classes=int(cfg.get("n_classes", N_CLASSES)))
    net.load_state_dict({k: v.float() for k, v in blob["model_state_dict"].items()})
    return net.eval().to(device)


def load_model(path: str | Path = WEIGHTS_PATH, device: str = "cpu") -> LoadedModel:
    """Load the detector once per (path, device) per process (``analysis.weights``); raises
    ``WeightsNotInstalled`` without a file."""
    path = Path(path)
    loaded = load_cached("D2IQA", path, device, _build, missing=(
        f"D2IQA weights not found at {path}; train them with `qa-node train d2iqa` or set [analysis.d2iqa] weights"))
    return LoadedModel(loaded.model, device, loaded.sha256, path)


# ------------------------------------------------------------------------------------------ scoring
@dataclass(frozen=True)
class SliceScore:
    score: float  # pooled mAP over the trials, nan when no object fits the slice
    ap_per_class: np.ndarray
    n_trials: int
    n_objects: int


def crop_box(allowed: np.ndarray, margin: int = CROP_MARGIN_PX, multiple: int = 16) -> tuple[int, int, int, int]:
    """(row0, col0, rows, cols): the allowed region's bounding box plus objects and a margin, sizes a
    multiple of 16 (may run past the image; the caller pads)."""
    rr, cc = np.nonzero(allowed)
    r0, r1 = int(rr.min()) - margin, int(rr.max()) + 1 + margin
    c0, c1 = int(cc.min()) - margin, int(cc.max()) + 1 + margin
    h = int(math.ceil((r1 - r0) / multiple) * multiple)
    w = int(math.ceil((c1 - c0) / multiple) * multiple)
    return r0, c0, h, w


def _extract(img: np.ndarray, r0: int, c0: int, h: int, w: int, fill: float) -> np.ndarray:
    out = np.full((h, w), fill, dtype=np.float32)
    rows, cols = img.shape
    a0, b0 = max(r0, 0), max(c0, 0)
    a1, b1 = min(r0 + h, rows), min(c0 + w, cols)
    out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = img[a0:a1, b0:b1]
    return out


def trial_layouts(
    allowed: np.ndarray, trials: int, seed: int, config: InsertionConfig = InsertionConfig()
) -> list[tuple[VirtualObject, ...]]:
    """The ``trials`` random layouts of one slice for a fixed ``seed`` (reuse them to compare doses)."""
    rng = np.random.default_rng(seed)
    return [sample_layout(allowed, rng, config) for _ in range(trials)]


# trial images per forward pass when [analysis.d2iqa] batch is left out: 8 on the CPU (what the node
# always ran), up to 64 on CUDA (all the trials of a slice at the default T = 50 in one pass) bounded
# by the free GPU memory at BYTES_PER_PIXEL of the crop per image (about 60 fp32 activations per input
# pixel through stem, encoder, decoder and heads, rounded up)
DEFAULT_BATCH_CPU = 8
DEFAULT_BATCH_CUDA = 64
BYTES_PER_PIXEL = 256


def batch_for(device: str, batch_size: int | None, image_hw: tuple[int, int]) -> int:
    """The batch ``detect`` runs with (``analysis.batching.resolve_batch``)."""
    return resolve_batch(batch_size, device, cpu_default=DEFAULT_BATCH_CPU, cuda_default=DEFAULT_BATCH_CUDA,
                         item_bytes=BYTES_PER_PIXEL * image_hw[0] * image_hw[1])


@torch.inference_mode()
def detect(model: LoadedModel, images01: np.ndarray, batch_size: int | None = DEFAULT_BATCH_CPU,
           amp: str = "off", channels_last: bool = False) -> list[ImageBoxes]:
    """Run the detector on (N, H, W) windowed images (H, W multiples of 16), ``batch_size`` at a time
    (None: the device's default; halved on a CUDA out-of-memory error). Each image's detections do
    not depend on the batch (tests/unit/test_batching.py). ``amp`` (CUDA only): fp16/bf16 autocast
    after the fp32 stem, or off; the CPU always runs fp32. ``channels_last``: the images (and so every
    convolution) in NHWC memory layout: faster on some CPUs, scores that differ from the default layout
    by float rounding (up to ~1e-5; off by default)."""
    bs = batch_for(model.device, batch_size, images01.shape[-2:])
    dtype = amp_dtype(model.device, amp)

    def one(i: int, j: int) -> list[ImageBoxes]:
        x = torch.from_numpy(np.ascontiguousarray(images01[i:j, None])).to(model.device, torch.float32)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return decode(model.net(x, dtype))

    return [boxes for part in run_batches(one, images01.shape[0], bs, model.device, "D2IQA") for boxes in part]


def trial_images(
    hu: np.ndarray, layouts: Sequence[Sequence[VirtualObject]], config: InsertionConfig = InsertionConfig()
) -> tuple[np.ndarray, list[ImageBoxes]]:
    """Windowed trial images (T, h, w) cropped around all object centres, and their ground truth
    (boxes in crop coordinates). Layouts must be non-empty."""
    region = np.zeros(hu.shape, dtype=bool)
    for lay in layouts:
        for o in lay:
            region[min(max(int(o.cy), 0), hu.shape[0] - 1), min(max(int(o.cx), 0), hu.shape[1] - 1)] = True
    r0, c0, h, w = crop_box(region, margin=int(math.ceil(config.max_radius)) + CROP_MARGIN_PX)
    base = _extract(hu.astype(np.float32), r0, c0, h, w, fill=-1000.0)
    imgs = np.empty((len(layouts), h, w), np.float32)
    gts = []
    for t, layout in enumerate(layouts):
        shifted = [VirtualObject(o.shape, o.cx - c0, o.cy - r0, o.radius, o.contrast, o.angle_rad) for o in layout]
        imgs[t] = window01(insert_objects(base, shifted, config.blur_sigma_px))
        gts.append(ImageBoxes(np.array([o.bbox_xywh for o in shifted]), np.array([o.cls for o in shifted])))
    return imgs, gts


def detect_trials(
    model: LoadedModel,
    hu: np.ndarray,
    layouts: Sequence[Sequence[VirtualObject]],
    config: InsertionConfig = InsertionConfig(),
    batch_size: int | None = DEFAULT_BATCH_CPU,
    amp: str = "off",
    channels_last: bool = False,
) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    """(ground truths, detections) of every non-empty trial layout on slice ``hu``."""
    layouts = [tuple(lay) for lay in layouts if len(lay) > 0]
    if not layouts:
        return [], []
    gts: list[ImageBoxes] = []
    dets: list[ImageBoxes] = []
    # trial images made this many at a time: bounds their memory; on CUDA a chunk of up to 64
    # (the default T = 50 in one) goes to the GPU as one batch when memory allows
    chunk = max(batch_size or (DEFAULT_BATCH_CUDA if is_cuda(model.device) else DEFAULT_BATCH_CPU), 32)
    for i in range(0, len(layouts), chunk):
        imgs, g = trial_images(hu, layouts[i : i + chunk], config)
        gts.extend(g)
        dets.extend(detect(model, imgs, batch_size, amp, channels_last))
    return gts, dets


def pooled_map(gts: Sequence[ImageBoxes], dets: Sequence[ImageBoxes]) -> float:
    """The D2IQA score of a set of trials: COCO mAP with the trials pooled as one data set."""
    if not gts:
        return float("nan")
    return coco_map(gts, dets, N_CLASSES, max_dets=MAX_DETS).map


def score_slice(
    model: LoadedModel,
    hu: np.ndarray,
    layouts: Sequence[Sequence[VirtualObject]] | None = None,
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = DEFAULT_SEED,
    allowed: np.ndarray | None = None,
    config: InsertionConfig = InsertionConfig(),
    batch_size: int | None = DEFAULT_BATCH_CPU,
    body: np.ndarray | None = None,
    amp: str = "off",
    channels_last: bool = False,
    pixel_spacing_mm: float | tuple[float, float] | None = None,
) -> SliceScore:
    """Pooled-mAP D2IQA score of one HU slice. Pass ``layouts`` (from :func:`trial_layouts`, computed on
    a reference image) to score several versions of a slice on identical insertions. Without layouts or
    ``allowed``, the placement needs the ``body`` mask or the ``pixel_spacing_mm`` to make it."""
    if hu.ndim != 2:
        raise ValueError(f'Argument "hu" must be a 2-D slice, got shape {hu.shape}')
    if layouts is None:
        if trials < 1:
            raise ValueError(f'Argument "trials" must be >= 1, got {trials}')
        if allowed is None:
            allowed = placement_mask(hu, config, body, pixel_spacing_mm=pixel_spacing_mm)
        layouts = trial_layouts(allowed, trials, seed, config) if allowed.any() else []
    gts, dets = detect_trials(model, hu, layouts, config, batch_size, amp, channels_last)
    if not gts:
        return SliceScore(float("nan"), np.full(N_CLASSES, np.nan), 0, 0)
    res = coco_map(gts, dets, N_CLASSES, max_dets=MAX_DETS)
    return SliceScore(res.map, res.ap_per_class, len(gts), sum(len(g.classes) for g in gts))


def select_slices(n_slices: int, max_slices: int) -> np.ndarray:
    """Evenly spaced slice indices (all when ``max_slices`` <= 0 or >= n_slices)."""
    if max_slices <= 0 or max_slices >= n_slices:
        return np.arange(n_slices)
    return np.unique(np.linspace(0, n_slices - 1, max_slices).round().astype(int))
