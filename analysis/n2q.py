"""N2Q (Noise2Quality): a no-reference, pixel-wise CT image-quality map.

The model predicts, from a single slice, the SSIM map that slice would have against its (unseen)
full-dose twin (Gaussian 11 x 11, sigma 1.5, W300/L40 window to [0, 1], see ``analysis.ssim``).
Architecture (../shared/REFERENCE.md section 1): U-Net, encoder 16-32-64-128-256, each block
(conv3x3, norm, LeakyReLU 0.2) x 2 then dropout, norm = BatchNorm in the shipped v1.1 weights
(the reference's InstanceNorm caused the v1.0 defects, see ``N2QNet``); 4 max-pools; bilinear x2 decoder with skip
connections; 1 x 1 conv; tanh. Input: 2 channels = the windowed slice and its high-pass copy
(image minus its Gaussian-blurred, 2x down- and up-sampled version). An auxiliary head after the
bottleneck (global average pool + Linear(256, 5)) classifies the dose among 5, 10, 25, 50, 75 %.
The network output lives in [-1, 1] (``2 * SSIM - 1``); the node reports ``(out + 1) / 2``, i.e.
SSIM units in [0, 1] where 1 means "indistinguishable from full dose".

Node use: ``analysis.models.n2q.run`` resizes each slice to 256 x 256 (square-padded with
air), predicts in batches (``predict_quality``: resize, network and upsampling one batch at a time;
CUDA: all three on the GPU, the network under autocast), upsamples the map to the native matrix and
reports, over the body mask (``analysis.mask.volume_body_masks``, shared with the other models):

- ``n2q_mean_quality``: mean predicted SSIM quality inside the body, all slices;
- ``n2q_p05_quality``: its 5th percentile;
- ``n2q_low_fraction``: fraction of body pixels below ``[analysis.n2q] low_threshold``
  (default 0.8: on the held-out real slices of ``bench/n2q_eval.py`` the TRUE body-mean SSIM is
  0.70 at 5 % dose, 0.80 at 10 %, 0.91 at 25 % and 0.96-0.99 at 50-75 %, so 0.8 marks tissue degraded
  about as much as a 10 %-dose scan; a full-dose series should have a small fraction below it).

Options (``[analysis.n2q]``, ``analysis.models.n2q.Options``): ``weights`` (path, default
``analysis/weights/n2q.pt``), ``batch`` (left out: 1 on the CPU, up to 64 on CUDA within the free GPU
memory), ``amp`` (CUDA autocast: fp16 (default), bf16 or off; the CPU is always fp32),
``low_threshold`` (default 0.8); CPU threads are ``[analysis] torch_threads``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from analysis.batching import autocast, resolve_batch, run_batches, validate_amp
from analysis.ssim import window_hu
from analysis.weights import file_sha256, load_cached

log = logging.getLogger(__name__)

MODEL_SIZE = 256
DOSE_CLASSES: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50, 0.75)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "n2q.pt"
DEFAULT_LOW_THRESHOLD = 0.8


# ----------------------------------------------------------------------------------------- model
NORMS = ("instance", "batch")


def _norm(kind: str, c: int) -> nn.Module:
    return nn.InstanceNorm2d(c) if kind == "instance" else nn.BatchNorm2d(c)


def _block(cin: int, cout: int, dropout: float, norm: str = "instance") -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1),
        _norm(norm, cout),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        _norm(norm, cout),
        nn.LeakyReLU(0.2, inplace=True),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class N2QNet(nn.Module):
    """U-Net 16-32-64-128-256 with a dose-classification head; ``forward`` -> (map, dose_logits).

    ``norm="instance"`` is the reference architecture (InstanceNorm, no affine). ``norm="batch"``
    (BatchNorm; a fixed affine map at inference) is what the shipped weights use since v1.1:
    InstanceNorm divides every feature map by its own spatial SD, which throws away the absolute
    noise amplitude the map depends on; the network then learned to smuggle it past the
    normalisation with a strong localised spike at the bottleneck (the "droplet" artefact of
    Karras et al., StyleGAN2, 2020), seen as spurious quality-0 ellipses, and could not tell
    full-dose from 50-75 % slices (compressed high end). See the model card."""

    def __init__(self, in_channels: int = 2, n_doses: int = 5, dropout: float = 0.25, dose_head: bool = True,
                 norm: str = "instance"):
        super().__init__()
        if in_channels not in (1, 2):
            raise ValueError(f'Argument "in_channels" must be 1 or 2, got {in_channels}')
        if norm not in NORMS:
            raise ValueError(f'Argument "norm" must be one of {NORMS}, got {norm!r}')
        ch = (16, 32, 64, 128, 256)
        self.in_channels = in_channels
        self.norm = norm
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in ch:
            self.enc.append(_block(cin, c, dropout, norm))
            cin = c
        self.dec = nn.ModuleList(_block(ch[i + 1] + ch[i], ch[i], dropout, norm) for i in reversed(range(4)))
        self.out = nn.Conv2d(ch[0], 1, 1)
        self.dose_head = nn.Linear(ch[-1], n_doses) if dose_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        skips = []
        for i, blk in enumerate(self.enc):
            x = blk(x)
            if i < 4:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        logits = self.dose_head(x.mean(dim=(2, 3))) if self.dose_head is not None else None
        for blk in self.dec:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat((x, skip), dim=1))
        return torch.tanh(self.out(x)), logits


def high_pass(x: torch.Tensor) -> torch.Tensor:
    """x minus its Gaussian-blurred (sigma 1 px), 2x down- then up-sampled version. x: (B, 1, H, W)."""
    r = 3
    g = torch.exp(-0.5 * torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2)
    g = g / g.sum()
    xp = F.pad(x, (r, r, r, r), mode="replicate")
    blur = F.conv2d(F.conv2d(xp, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    low = F.interpolate(F.avg_pool2d(blur, 2), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x - low


def make_input(windowed: torch.Tensor, in_channels: int = 2) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) windowed slices in [0, 1] -> network input (B, in_channels, H, W)."""
    x = windowed.unsqueeze(1) if windowed.ndim == 3 else windowed
    if in_channels == 1:
        return x
    return torch.cat((x, high_pass(x)), dim=1)


def resize_to_model(hu: np.ndarray, size: int = MODEL_SIZE, device: str = "cpu") -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """(B, H, W) HU -> (B, size, size) HU tensor on ``device``: padded to a square with air, then
    area-resized. Returns the tensor and (top, left, H, W) to undo the padding."""
    b, h, w = hu.shape
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)).to(device)
    if h != w:
        sq = torch.full((b, n, n), -1000.0, device=t.device)
        sq[:, top : top + h, left : left + w] = t
        t = sq
    if n != size:
        t = F.interpolate(t.unsqueeze(1), size=(size, size), mode="bilinear", antialias=True, align_corners=False)[:, 0]
    return t, (top, left, h, w)


def map_to_native(q: torch.Tensor, geom: tuple[int, int, int, int]) -> np.ndarray:
    """(B, size, size) map -> (B, H, W) at the native matrix (bilinear, padding removed)."""
    top, left, h, w = geom
    n = max(h, w)
    up = F.interpolate(q.unsqueeze(1).float(), size=(n, n), mode="bilinear", align_corners=False)[:, 0]
    return up[:, top : top + h, left : left + w].cpu().numpy()


# ------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class LoadedModel:
    net: N2QNet
    sha256: str
    config: dict
    path: str
    device: str


def build_from_config(config: dict) -> N2QNet:
    return N2QNet(
        in_channels=int(config.get("in_channels", 2)),
        n_doses=int(config.get("n_doses", 5)),
        dropout=float(config.get("dropout", 0.25)),
        dose_head=bool(config.get("dose_head", True)),
        norm=str(config.get("norm", "instance")),  # files written before v1.1 have no "norm": InstanceNorm
    )


def save_weights(net: N2QNet, path: str | Path, config: dict, meta: dict | None = None, fp16: bool = True) -> str:
    """Store a model for inference (fp16 by default). Returns the file's SHA-256."""
    # BatchNorm running statistics stay float32 (tiny, and a small running_var must not underflow)
    state = {k: (v.detach().cpu().half() if fp16 and v.is_floating_point() and ".running_" not in k else v.detach().cpu())
             for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    # meta/config go through JSON so the file holds only plain types and loads with weights_only=True
    plain = json.loads(json.dumps({"config": dict(config), "meta": dict(meta or {})}, default=float))
    torch.save({"format": "n2q-weights-1", **plain, "state_dict": state}, tmp)
    tmp.replace(path)
    return file_sha256(path)


def _build(p: Path, device: str) -> tuple[N2QNet, dict]:
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as exc:
        raise ValueError(f"N2Q weights at {p} cannot be read: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != "n2q-weights-1":
        raise ValueError(f"{p} is not an N2Q weights file (format n2q-weights-1)")
    net = build_from_config(blob["config"])
    net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()})
    net.eval().to(device)
    return net, dict(blob["config"])


def load_model(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Load (once per process and device, ``analysis.weights``) the weights file; raises
    ``WeightsNotInstalled`` without a file, ValueError with the path for a file that is not N2Q's."""
    p = Path(path) if path else DEFAULT_WEIGHTS
    loaded = load_cached("N2Q", p, device, _build, missing=(
        f"N2Q weights not found at {p}; train them with `qa-node train n2q` or set [analysis.n2q] weights"))
    net, config = loaded.model
    return LoadedModel(net, loaded.sha256, config, loaded.path, device)


# ----------------------------------------------------------------------------------- inference
# slices per forward pass when [analysis.n2q] batch is left out: 1 on the CPU (bench/models.py on
# this 2-core CPU: batch 1 was 1.1-1.25 x faster than batches of 4 or 8, the same map bit for bit;
# the 8 the node ran before outgrows the caches), up to 64 on CUDA bounded by the free GPU memory at
# ITEM_BYTES per slice (fp32 activations of one 256 x 256 slice through the U-Net with its skips,
# about 40 MB, rounded up)
DEFAULT_BATCH_CPU = 1
DEFAULT_BATCH_CUDA = 64
ITEM_BYTES = 64 << 20


def _forward(net: N2QNet, hu_model: torch.Tensor, device: str, amp: str,
             channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of HU at model resolution -> (raw map (b, S, S) float32, dose probs (b, 5) float32),
    on ``device``; autocast on CUDA per ``amp``, fp32 on the CPU. ``channels_last``: the input (and so
    every convolution) in NHWC memory layout, faster on this CPU, with maps that differ from the default
    layout by float rounding (up to ~1e-5; bench/models.py)."""
    x = make_input(window_hu(hu_model.to(device)), net.in_channels)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        m, lg = net(x)
    probs = (torch.softmax(lg.float(), dim=1) if lg is not None
             else torch.full((m.shape[0], len(DOSE_CLASSES)), float("nan"), device=m.device))
    return m[:, 0].float(), probs


def predict_model_res(net: N2QNet, hu_model: torch.Tensor, device: str = "cpu", batch: int = DEFAULT_BATCH_CPU,
                      amp: str = "fp16") -> tuple[np.ndarray, np.ndarray]:
    """HU at model resolution (B, S, S) -> (raw map in [-1, 1] (B, S, S) float32, dose probs (B, 5))."""
    with torch.inference_mode():
        parts = run_batches(lambda i, j: tuple(t.cpu() for t in _forward(net, hu_model[i:j], device, amp)),
                            hu_model.shape[0], batch, device, "N2Q")
    return torch.cat([m for m, _ in parts]).numpy(), torch.cat([p for _, p in parts]).numpy()


def predict_quality(
    hu: np.ndarray, *, weights: str | Path | None = None, device: str = "cpu", batch: int | None = None,
    amp: str = "fp16", channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, str]:
    """HU slices (B, H, W) or (H, W) -> (quality map in SSIM units at the native matrix, dose probs, sha256).

    Slices go through resize, network and upsampling ``batch`` at a time (None: the device's default,
    ``analysis.batching.resolve_batch``), so memory holds one batch at model and native resolution
    besides the result. On the CPU every step is fp32 and the result does not depend on ``batch``
    beyond float rounding of the convolutions (tests/unit/test_batching.py); on CUDA the resize and
    the upsampling run on the GPU and the network under autocast (``amp``: fp16, bf16, off).
    ``channels_last``: see ``_forward`` (off by default: the default layout is what the recorded
    outputs were made with)."""
    arr = np.asarray(hu, dtype=np.float32)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f'Argument "hu" must be (H, W) or (B, H, W), got shape {arr.shape}')
    if batch is not None and batch < 1:
        raise ValueError(f'Argument "batch" must be >= 1, got {batch}')
    validate_amp(amp)
    model = load_model(weights, device)
    bs = resolve_batch(batch, device, cpu_default=DEFAULT_BATCH_CPU, cuda_default=DEFAULT_BATCH_CUDA,
                       item_bytes=ITEM_BYTES)
    q = np.empty(arr.shape, np.float32)
    probs = np.empty((arr.shape[0], len(DOSE_CLASSES)), np.float32)

    def one(i: int, j: int) -> None:
        t, geom = resize_to_model(arr[i:j], device=device)
        raw, p = _forward(model.net, t, device, amp, channels_last)
        q[i:j] = map_to_native((raw + 1.0) / 2.0, geom)
        probs[i:j] = p.cpu().numpy()

    with torch.inference_mode():
        run_batches(one, arr.shape[0], bs, device, "N2Q")
    return (q[0] if single else q), (probs[0] if single else probs), model.sha256


def summarise(quality: np.ndarray, body: np.ndarray, threshold: float) -> tuple[float | None, float | None, float | None]:
    """(mean, 5th percentile, fraction below threshold) of quality over the body pixels."""
    vals = quality[body]
    if vals.size == 0:
        return None, None, None
    return float(vals.mean()), float(np.percentile(vals, 5)), float((vals < threshold).mean())


def resolved_batch(batch: int | None, device: str) -> int:
    """The slices per pass ``predict_quality`` runs with (``[analysis.n2q] batch`` or the device's default)."""
    return resolve_batch(batch, device, cpu_default=DEFAULT_BATCH_CPU, cuda_default=DEFAULT_BATCH_CUDA,
                         item_bytes=ITEM_BYTES)


def predict_quality_many(
    hus: list[np.ndarray], *, weights: str | Path | None = None, device: str = "cpu", batch: int | None = None,
    amp: str = "fp16", channels_last: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray], str, int]:
    """Series batching: ``predict_quality`` over several series' HU slices (each (n_i, H_i, W_i)),
    in passes of exactly ``batch`` slices that may span series (``analysis.batching.run_across``; a
    short last pass padded with zero images). Each series' slices are resized to model resolution
    with its own geometry and its maps brought back to its own matrix, so series of different
    matrices share a pass. Returns (quality maps, dose probs) per series, the weights' sha256 and
    the number of passes."""
    from analysis.batching import run_across

    arrs = [np.asarray(h, dtype=np.float32) for h in hus]
    for a in arrs:
        if a.ndim != 3:
            raise ValueError(f'Argument "hu" must be (B, H, W) per series, got shape {a.shape}')
    validate_amp(amp)
    model = load_model(weights, device)
    bs = resolved_batch(batch, device)
    qs = [np.empty(a.shape, np.float32) for a in arrs]
    probs = [np.empty((a.shape[0], len(DOSE_CLASSES)), np.float32) for a in arrs]
    geoms: dict[int, tuple[int, int, int, int]] = {}

    def prepare(v: int, i: int, j: int) -> torch.Tensor:
        t, geoms[v] = resize_to_model(arrs[v][i:j], device=device)
        return t

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(model.net, x, device, amp, channels_last)

    def collect(v: int, i: int, j: int, outs: tuple[torch.Tensor, ...]) -> None:
        raw, p = outs
        qs[v][i:j] = map_to_native((raw + 1.0) / 2.0, geoms[v])
        probs[v][i:j] = p.cpu().numpy()

    with torch.inference_mode():
        passes = run_across([a.shape[0] for a in arrs], bs, device, prepare, forward, collect, "N2Q")
    return qs, probs, model.sha256, passes
