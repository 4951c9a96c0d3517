"""LDCTIQA: the MICCAI 2023 LDCTIQA challenge-winning Likert model (ldct-benchmark's multi-head Swin-T).

What it is: a Swin-T backbone (patch 4, embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7) whose
768-feature output feeds four linear heads of 21 ordinal classes (Likert 0.0, 0.2, ..., 4.0). The
model's output is the mean over the heads of their softmax. This module is a plain-torch
re-implementation (torchvision does not import beside this CPU torch build) that is
checkpoint-compatible with ldct-benchmark's ``MultiHeadSwin``: the state-dict keys and shapes are
exactly theirs (``model.features.*``, ``model.norm.*``, ``heads.{0..3}.weight|bias``; ``head`` is an
Identity, so it has no keys), so the published ``ldct-iqa.pt`` (``{"model_state_dict": ...}``)
loads with ``load_state_dict(strict=True)``. ``tests/unit/test_ldctiqa.py`` proves equal outputs
against torchvision's own ``swin_transformer.py`` wrapped like ``MultiHeadSwin``.

No weights ship with the node: the user supplies the published file (see
``analysis/weights/LDCTIQA_MODEL_CARD.md``). ``load_weights`` computes the file's SHA-256: the
published checksum loads silently, another one (e.g. a site's fine-tuned file) with one warning;
a missing file raises ``WeightsNotInstalled``.

Preprocessing (``preprocess``) follows ``ldctbench.evaluate.ldct_iqa`` exactly: HU + 1024, its
``apply_center_width`` with centre 724 and width 1400 (DICOM-style -0.5 offsets: lower 24, upper
1423, value = (x - 723.5) / 1399 + 0.5, i.e. HU -1000 -> 0 and HU 399 -> 1), grey repeated to 3
channels, ImageNet mean/std. The reference rejects matrices other than 512 x 512; here they are
resampled (bilinear, antialiased when shrinking; a non-square matrix is first padded with air to a
square so anatomy keeps its aspect ratio) and the result says so (``resampled``).

Per slice: ``ldctiqa_score`` = argmax of the mean softmax / 5 (the reference's value, steps of 0.2)
and ``ldctiqa_expected_score`` = sum_k p_k * k / 5 (continuous, better for trends). Series values
are the means over the scored slices (an evenly spaced subset of at most ``max_slices``).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from analysis.weights import WeightsNotInstalled, load_cached  # noqa: F401  (WeightsNotInstalled: part of this API)

log = logging.getLogger(__name__)

PUBLISHED_SHA256 = "4d7596a1638ebb1ccb8945f079b08b30791a1241965f1541dc842d48a0341bc2"
WEIGHTS_URL = "https://downloads.eeulig.com/ldct-benchmark/ldct-iqa.pt"  # where the user gets the file; never fetched here
MODEL_CARD = "analysis/weights/LDCTIQA_MODEL_CARD.md"

NUM_CLASSES = 21  # Likert 0..4 in steps of 0.2
NUM_HEADS = 4
INPUT_SIZE = 512
CENTER = 1024.0 - 300.0  # window centre in HU + 1024 (ldctbench CHECKPOINT["center"])
WIDTH = 1400.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AIR_HU = -1024.0

# A 300-slice series must stay under the 60 s CPU budget. On this 2-core machine one 512 x 512 slice
# costs 0.9-1.1 s of CPU on 1 torch thread (bench/models.py: 25.9 s of process CPU time for 24 slices;
# 0.91 s/slice wall when the machine was quiet), so 24 evenly spaced slices take ~22-26 s on a quiet
# core and stay under 60 s up to ~2.5 s per slice. The forward pass is ~65 % fp32 GEMMs (addmm):
# there is little left to gain on the CPU without leaving fp32. ([analysis.ldctiqa] max_slices: the spec,
# analysis/models/ldctiqa.py, declares the same default; a test checks.)
DEFAULT_MAX_SLICES = 24
DEFAULT_BATCH_CPU = 4
DEFAULT_BATCH_CUDA = 32


def not_installed_reason(path: str | Path | None) -> str:
    where = f" (looked for {path})" if path else ""
    return f"LDCTIQA weights not installed: see {MODEL_CARD}{where}"


# ----------------------------------------------------------------------------------- Swin-T
class _Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _relative_position_index(ws: int) -> torch.Tensor:
    """(ws^4,) int64: for each (query, key) token pair of a ws x ws window, its row in the bias table."""
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()])  # 2, N
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N: query minus key
    return ((rel[0] + ws - 1) * (2 * ws - 1) + (rel[1] + ws - 1)).flatten()


class WindowAttention(nn.Module):
    """(Shifted-)window multi-head self-attention with a learned relative position bias.

    The feature map is padded at the bottom/right to a multiple of the window, cyclically shifted by
    ``-shift`` (when the window is smaller than the padded map), cut into windows; tokens of
    different regions of the shifted map get -100 added to their attention logits. Padded tokens
    take part like any other (as in the reference)."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.dim, self.num_heads, self.window, self.shift = dim, num_heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window))  # persistent: in the file
        self._masks: dict[tuple, torch.Tensor] = {}

    def _shift_mask(self, hp: int, wp: int, sh: int, sw: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n_windows, N, N): 0 within a region of the shifted map, -100 across regions."""
        key = (hp, wp, sh, sw, device, dtype)
        mask = self._masks.get(key)
        if mask is None:
            ws = self.window
            label = torch.zeros(hp, wp)
            rows = ((0, hp - ws), (hp - ws, hp - sh), (hp - sh, hp))
            cols = ((0, wp - ws), (wp - ws, wp - sw), (wp - sw, wp))
            for i, (r0, r1) in enumerate(rows):
                for j, (c0, c1) in enumerate(cols):
                    label[r0:r1, c0:c1] = 3 * i + j
            label = label.view(hp // ws, ws, wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
            diff = label[:, None, :] - label[:, :, None]
            mask = torch.where(diff != 0, -100.0, 0.0).to(device=device, dtype=dtype)
            self._masks[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, H, W, C
        b, h, w, c = x.shape
        ws, nh = self.window, self.num_heads
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
        x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
        sh = self.shift if ws < hp else 0
        sw = self.shift if ws < wp else 0
        if sh or sw:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        nwh, nww = hp // ws, wp // ws
        n_win, n_tok = nwh * nww, ws * ws
        x = x.view(b, nwh, ws, nww, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b * n_win, n_tok, c)

        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(b * n_win, n_tok, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // nh) ** -0.5) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(n_tok, n_tok, nh).permute(2, 0, 1).unsqueeze(0)
        if sh or sw:
            mask = self._shift_mask(hp, wp, sh, sw, attn.device, attn.dtype)
            attn = attn.view(b, n_win, nh, n_tok, n_tok) + mask[None, :, None]
            attn = attn.view(b * n_win, nh, n_tok, n_tok)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b * n_win, n_tok, c)
        x = F.linear(x, self.proj.weight, self.proj.bias)

        x = x.view(b, nwh, nww, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh or sw:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, num_heads, window, shift)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        # indices 0 and 3 carry the weights, as in the reference's MLP (Linear, GELU, Dropout, Linear, Dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Identity(), nn.Linear(4 * dim, dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> channels (order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]),
    LayerNorm(4C), Linear(4C -> 2C, no bias). Odd sizes are padded at the bottom/right."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, H, W, C
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinT(nn.Module):
    """Swin-T backbone (torchvision ``swin_t`` layout, ``head`` = Identity): image -> 768 features."""

    def __init__(self, embed_dim: int = 96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window: int = 7, patch: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, embed_dim, kernel_size=patch, stride=patch), _Permute([0, 2, 3, 1]),
                          nn.LayerNorm(embed_dim, eps=1e-5))
        ]
        for i, (depth, nh) in enumerate(zip(depths, heads)):
            dim = embed_dim * 2**i
            layers.append(nn.Sequential(*[SwinBlock(dim, nh, window, 0 if j % 2 == 0 else window // 2) for j in range(depth)]))
            if i < len(depths) - 1:
                layers.append(PatchMerging(dim))
        self.features = nn.Sequential(*layers)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-5)
        self.head = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, 3, H, W -> B, 768
        x = self.norm(self.features(x))
        return self.head(x.mean(dim=(1, 2)))


class MultiHeadSwin(nn.Module):
    """``model`` (Swin-T) + ``heads`` (4 x Linear(768, 21)); forward -> mean over heads of the softmax."""

    def __init__(self, num_classes: int = NUM_CLASSES, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.num_classes, self.num_heads = num_classes, num_heads
        self.model = SwinT()
        self.heads = nn.ModuleList([nn.Linear(self.model.num_features, num_classes) for _ in range(num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(x)
        logits = torch.stack([hd(f) for hd in self.heads], dim=-2).float()  # B, heads, classes
        return logits.softmax(dim=-1).mean(dim=-2)


# ----------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class LoadedLDCTIQA:
    net: MultiHeadSwin
    sha256: str
    path: str
    device: str
    published: bool  # the file is the published ldct-iqa.pt (checksum matches)
    labels: str | None = None  # what the file was trained on: "site"/"synthetic" (qa-node train ldctiqa); None: not said


_LOCK = threading.Lock()
_WRAPPED: dict[int, LoadedLDCTIQA] = {}  # id(analysis.weights.Loaded) -> its LoadedLDCTIQA (same object per cache entry)


def _build(p: Path, device: str) -> MultiHeadSwin:
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign/corrupt file
        raise ValueError(f"LDCTIQA weights at {p} cannot be read: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("model_state_dict"), dict):
        raise ValueError(f"{p} is not an LDCTIQA checkpoint (expected a dict with 'model_state_dict')")
    with torch.device("meta"):  # no random initialisation of 27.6 M parameters that the file replaces (seconds)
        net = MultiHeadSwin()
    state = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in blob["model_state_dict"].items()}
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(f"{p} does not fit the LDCTIQA multi-head Swin-T: {' '.join(first[:3])[:300]}") from None
    labels = blob.get("labels")  # provenance written by qa-node train ldctiqa; ldct-benchmark's file has none
    net.weights_labels = labels if isinstance(labels, str) else None
    return net.eval().to(device)


def load_weights(path: str | Path | None, device: str = "cpu") -> LoadedLDCTIQA:
    """Load a ``{"model_state_dict": ...}`` file strictly into ``MultiHeadSwin`` (once per process per
    path/device/file version, through ``analysis.weights``). The published checksum loads silently,
    another one with one warning. Raises ``WeightsNotInstalled`` when there is no file, ``ValueError``
    with the path when the file is not an LDCTIQA checkpoint."""
    if not path:
        raise WeightsNotInstalled(not_installed_reason(None))
    p = Path(path).expanduser()
    loaded = load_cached("LDCTIQA", p, str(device), _build, missing=not_installed_reason(p),
                         published_sha256=PUBLISHED_SHA256)
    with _LOCK:
        wrapped = _WRAPPED.get(id(loaded))
        if wrapped is None or wrapped.sha256 != loaded.sha256:
            wrapped = LoadedLDCTIQA(loaded.model, loaded.sha256, loaded.path, loaded.device, bool(loaded.published),
                                    getattr(loaded.model, "weights_labels", None))
            _WRAPPED[id(loaded)] = wrapped
    return wrapped


# ------------------------------------------------------------------------------ preprocessing
def apply_center_width(x: np.ndarray, center: float = CENTER, width: float = WIDTH) -> np.ndarray:
    """ldctbench's windowing to [0, 1] (same float32 arithmetic): <= c - 0.5 - (w-1)/2 -> 0,
    > c - 0.5 + (w-1)/2 -> 1, else (x - (c - 0.5)) / (w - 1) + 0.5."""
    x = np.asarray(x, dtype=np.float32)
    center, width = float(center), float(width)
    lower = center - 0.5 - (width - 1) / 2.0
    upper = center - 0.5 + (width - 1) / 2.0
    res = np.empty(x.shape, dtype=np.float32)
    inside = (x > lower) & (x <= upper)
    res[x <= lower] = 0.0
    res[inside] = (x[inside] - (center - 0.5)) / (width - 1.0) + 0.5
    res[x > upper] = 1.0
    return res


def to_512(hu: np.ndarray) -> tuple[np.ndarray, bool]:
    """(n, H, W) HU -> (n, 512, 512) float32 and whether it was resampled. A non-square matrix is
    padded with air (-1024 HU) to a square first (centred), then resized bilinearly (antialiased
    when shrinking)."""
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    if hu.ndim != 3:
        raise ValueError(f"expected (n_slices, rows, cols) HU, got shape {hu.shape}")
    n, h, w = hu.shape
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return hu, False
    if h != w:
        s = max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        sq = np.full((n, s, s), AIR_HU, np.float32)
        sq[:, top:top + h, left:left + w] = hu
        hu = sq
    t = torch.from_numpy(np.ascontiguousarray(hu))[:, None]
    t = F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                      antialias=hu.shape[-1] > INPUT_SIZE)
    return t[:, 0].numpy(), True


def preprocess(hu: np.ndarray) -> tuple[torch.Tensor, bool]:
    """HU slices (n, H, W) or (H, W) -> network input (n, 3, 512, 512) float32, resampled flag."""
    hu512, resampled = to_512(hu)
    x = torch.from_numpy(apply_center_width(hu512 + np.float32(1024.0)))[:, None].repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std, resampled


# ------------------------------------------------------------------------------------ scoring
CLASS_SCORES = np.arange(NUM_CLASSES, dtype=np.float64) / 5.0  # 0.0, 0.2, ..., 4.0


def scores_from_probabilities(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 21) mean-over-heads probabilities -> (argmax / 5, sum_k p_k * k / 5), each (n,)."""
    p = np.asarray(probs, dtype=np.float64)
    return np.argmax(p, axis=-1) / 5.0, p @ CLASS_SCORES


def select_slices(n_slices: int, max_slices: int) -> np.ndarray:
    """Evenly spaced slice indices including the first and last (all when max_slices <= 0 or >= n)."""
    if max_slices <= 0 or max_slices >= n_slices:
        return np.arange(n_slices)
    return np.unique(np.linspace(0, n_slices - 1, max_slices).round().astype(int))


@torch.inference_mode()
def predict(net: MultiHeadSwin, hu: np.ndarray, device: str | torch.device = "cpu",
            batch_size: int | None = None) -> tuple[np.ndarray, bool]:
    """Mean-over-heads class probabilities (n, 21) float64 for HU slices (n, H, W), in batches;
    autocast (fp16) on CUDA only. Returns (probabilities, resampled)."""
    dev = torch.device(device)
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    bs = batch_size or (DEFAULT_BATCH_CUDA if dev.type == "cuda" else DEFAULT_BATCH_CPU)
    out, resampled = [], False
    for i in range(0, len(hu), bs):
        x, rs = preprocess(hu[i:i + bs])
        resampled |= rs
        x = x.to(dev)
        if dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                p = net(x)
        else:
            p = net(x)
        out.append(p.float().cpu().numpy().astype(np.float64))
    probs = np.concatenate(out) if out else np.zeros((0, NUM_CLASSES))
    return probs, resampled


@dataclass(frozen=True)
class SeriesScores:
    indices: np.ndarray  # scored slice indices into the series
    probabilities: np.ndarray  # (n_scored, 21)
    slice_score: np.ndarray  # (n_slices,) argmax / 5, nan where not scored
    slice_expected_score: np.ndarray  # (n_slices,) probability-weighted score, nan where not scored
    series_score: float  # mean of slice_score over the scored slices
    series_expected_score: float
    resampled: bool  # the matrix was not 512 x 512 and was resampled
    matrix: tuple[int, int]  # the series' own (rows, cols)


def score_series(net: MultiHeadSwin, hu: np.ndarray, device: str = "cpu", max_slices: int = DEFAULT_MAX_SLICES,
                 batch_size: int | None = None) -> SeriesScores:
    """Score an evenly spaced subset of a series' slices (HU, (n, rows, cols))."""
    hu = np.asarray(hu)
    if hu.ndim != 3 or hu.shape[0] == 0:
        raise ValueError(f"expected (n_slices, rows, cols) HU with at least one slice, got shape {hu.shape}")
    idx = select_slices(hu.shape[0], max_slices)
    probs, resampled = predict(net, hu[idx], device=device, batch_size=batch_size)
    s, e = scores_from_probabilities(probs)
    slice_s = np.full(hu.shape[0], np.nan)
    slice_e = np.full(hu.shape[0], np.nan)
    slice_s[idx], slice_e[idx] = s, e
    return SeriesScores(idx, probs, slice_s, slice_e, float(s.mean()), float(e.mean()), resampled,
                        (int(hu.shape[1]), int(hu.shape[2])))


def resolved_batch(batch_size: int | None, device: str | torch.device) -> int:
    """Slices per forward pass of ``predict`` (the given batch, or the device's default)."""
    return batch_size or (DEFAULT_BATCH_CUDA if torch.device(device).type == "cuda" else DEFAULT_BATCH_CPU)


def score_many(net: MultiHeadSwin, hus: list[np.ndarray], device: str = "cpu", max_slices: int = DEFAULT_MAX_SLICES,
               batch_size: int | None = None) -> tuple[list[SeriesScores], int]:
    """Series batching: ``score_series`` over several series, each one's evenly spaced slices chosen
    first, all of them through passes of exactly the batch (``analysis.batching.run_across``; a
    short last pass padded with zero inputs). Returns the scores per series and the passes run."""
    from analysis.batching import run_across

    dev = torch.device(device)
    arrs = [np.asarray(h) for h in hus]
    for hu in arrs:
        if hu.ndim != 3 or hu.shape[0] == 0:
            raise ValueError(f"expected (n_slices, rows, cols) HU with at least one slice, got shape {hu.shape}")
    idxs = [select_slices(hu.shape[0], max_slices) for hu in arrs]
    chosen = [np.asarray(hu[idx], dtype=np.float32) for hu, idx in zip(arrs, idxs)]
    probs = [np.zeros((len(idx), NUM_CLASSES)) for idx in idxs]
    resampled = [False] * len(arrs)

    def prepare(v: int, i: int, j: int) -> torch.Tensor:
        x, rs = preprocess(chosen[v][i:j])
        resampled[v] |= rs
        return x.to(dev)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor]:
        if dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return (net(x),)
        return (net(x),)

    def collect(v: int, i: int, j: int, outs: tuple[torch.Tensor, ...]) -> None:
        probs[v][i:j] = outs[0].float().cpu().numpy().astype(np.float64)

    with torch.inference_mode():
        passes = run_across([len(idx) for idx in idxs], resolved_batch(batch_size, dev), dev, prepare, forward,
                            collect, "LDCTIQA")
    scores = []
    for hu, idx, p, rs in zip(arrs, idxs, probs, resampled):
        s, e = scores_from_probabilities(p)
        slice_s = np.full(hu.shape[0], np.nan)
        slice_e = np.full(hu.shape[0], np.nan)
        slice_s[idx], slice_e[idx] = s, e
        scores.append(SeriesScores(idx, p, slice_s, slice_e, float(s.mean()), float(e.mean()), rs,
                                   (int(hu.shape[1]), int(hu.shape[2]))))
    return scores, passes
