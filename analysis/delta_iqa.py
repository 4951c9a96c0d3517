"""Delta-IQA in plain torch: the published AlexNet-like Likert classifier (Jongsma, Walet, Mulder,
Dijkstra 2025; Keras code koenwalet/DeltaIQA), its input preparation, "fuzzy" labels and inference.

Architecture (512 x 512 x 1 input; valid first convolution):
conv 96 11x11 stride 4 -> ReLU -> max-pool 3/2 -> conv 256 5x5 (same) -> ReLU -> max-pool 3/2 ->
conv 384 3x3 -> conv 384 3x3 -> conv 256 3x3 (same, ReLU) -> max-pool 3/2 -> global average pool ->
dense 1024 -> ReLU -> dropout 0.5 -> dense 512 -> ReLU -> dropout 0.3 -> dense 5 (softmax).
Spatial sizes 512 -> 126 (conv1) -> 62 (pool1) -> 30 (pool2) -> 14 (pool3) before the pooling.

``width`` scales every channel count (1.0 = the published network); the trainer stores it in the
weights file. Smaller widths exist only for fast tests.

Score: the probability-weighted mean class, sum_k k * p_k, continuous in [0, 4].

Input: HU in the soft-tissue window W400 / L40 ([-160, 240] HU, what a rater of noise and streaks
looks at, and the rating page's default) mapped to [0, 1] and clipped. Delta-IQA publishes no
weights and its input convention is not stated in the sources at hand; the window is ours and is
stored in every weights file written here. A slice that is not
512 x 512 is resampled (bilinear) to 512 x 512, as the network takes only that shape.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

N_CLASSES = 5
INPUT_SIZE = 512
WINDOW_HU = (-160.0, 240.0)
ARCHITECTURE = "delta_iqa_alexnet_v1"


def fuzzy_labels(scores) -> np.ndarray:
    """(n, 5) soft targets: a score s is split between its floor and ceiling class, weights
    (1 - (s - floor)) and (s - floor); an integer score is one-hot."""
    return split_between_classes(np.clip(np.asarray(scores, dtype=np.float64), 0.0, N_CLASSES - 1.0), N_CLASSES)


def split_between_classes(pos: np.ndarray, num_classes: int) -> np.ndarray:
    """(n, num_classes) float32 soft targets for positions ``pos`` in [0, num_classes - 1] on a class
    grid: each split between its floor and ceiling class by distance (one-hot on the grid). Delta-IQA's
    5 classes and LDCTIQA's 21 (analysis.training.ldctiqa_train.fuzzy_targets) share it."""
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, num_classes - 1)
    frac = pos - lo
    out = np.zeros((pos.size, num_classes), dtype=np.float32)
    idx = np.arange(pos.size)
    out[idx, lo] += (1.0 - frac).astype(np.float32)
    out[idx, hi] += frac.astype(np.float32)
    return out


def prepare(hu: np.ndarray) -> np.ndarray:
    """(rows, cols) or (n, rows, cols) HU -> float32 (n, 1, 512, 512) network input in [0, 1]."""
    import torch
    import torch.nn.functional as F

    a = np.asarray(hu, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    lo, hi = WINDOW_HU
    x = np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)[:, None]
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(torch.from_numpy(x), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear",
                          align_corners=False).numpy()
    return x


def build_network(width: float = 1.0):
    """The Delta-IQA network (a ``torch.nn.Sequential``); ``width`` 1.0 = the published channel counts."""
    import torch.nn as nn

    def c(n: int) -> int:
        return max(4, int(round(n * width)))

    net = nn.Sequential(
        nn.Conv2d(1, c(96), 11, stride=4), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c(96), c(256), 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(c(256), c(384), 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c(384), c(384), 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c(384), c(256), 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(c(256), c(1024)), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(c(1024), c(512)), nn.ReLU(inplace=True), nn.Dropout(0.3),
        nn.Linear(c(512), N_CLASSES),
    )
    # He initialisation for the ReLU layers (torch's default shrinks the signal layer by layer, and
    # eight layers without normalisation then barely train), zero biases
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def expected_score(probs) -> np.ndarray:
    """Probability-weighted mean class: (n, 5) -> (n,) in [0, 4]."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(N_CLASSES, dtype=np.float64)


def save_weights(path: str | Path, net, *, width: float, labels: str, extra: dict | None = None) -> None:
    import torch

    payload = {"architecture": ARCHITECTURE, "width": float(width), "labels": labels,
               "window_hu": list(WINDOW_HU), "model_state_dict": net.state_dict()}
    payload.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _build(path: Path, device: str):
    import torch

    payload = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(payload, dict) or payload.get("architecture") != ARCHITECTURE:
        raise ValueError(f"{path} is not a Delta-IQA weights file written by `qa-node train delta_iqa`")
    net = build_network(float(payload.get("width", 1.0)))
    net.load_state_dict(payload["model_state_dict"])
    net.to(device).eval()
    return net, str(payload.get("labels", "unknown"))


class LoadedModel:
    def __init__(self, net, labels: str, sha256: str, path: Path, device: str) -> None:
        self.net, self.labels, self.sha256, self.path, self.device = net, labels, sha256, path, device


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Load once per process (``analysis.weights``); raises ``WeightsNotInstalled`` without a file."""
    from analysis.weights import load_cached

    path = Path(path)
    loaded = load_cached("Delta-IQA", path, device, _build, missing=(
        f"Delta-IQA weights not found at {path}; train them with `qa-node train delta_iqa` on the site's ratings"))
    net, labels = loaded.model
    return LoadedModel(net, labels, loaded.sha256, path, device)


def predict_probs(net, hu: np.ndarray, device: str = "cpu", batch: int = 8) -> np.ndarray:
    """(n, rows, cols) HU -> (n, 5) class probabilities."""
    import torch

    a = np.asarray(hu, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    out = []
    net.eval()
    with torch.no_grad():
        for i in range(0, a.shape[0], max(1, batch)):
            x = torch.from_numpy(prepare(a[i:i + batch])).to(device)
            out.append(torch.softmax(net(x), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, N_CLASSES))


def correlations(pred, truth) -> dict[str, float]:
    """PLCC, SROCC, KROCC and their LDCTIQAC aggregate |PLCC| + |SROCC| + |KROCC| (nan when undefined)."""
    from scipy import stats

    p = np.asarray(pred, dtype=float)
    t = np.asarray(truth, dtype=float)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        nan = float("nan")
        return {"plcc": nan, "srocc": nan, "krocc": nan, "aggregate": nan}
    plcc = float(stats.pearsonr(p, t)[0])
    srocc = float(stats.spearmanr(p, t)[0])
    krocc = float(stats.kendalltau(p, t)[0])
    agg = abs(plcc) + abs(srocc) + abs(krocc)
    return {"plcc": plcc, "srocc": srocc, "krocc": krocc, "aggregate": agg if math.isfinite(agg) else float("nan")}


def predict_probs_many(net, hus: list[np.ndarray], device: str = "cpu", batch: int = 8) -> tuple[list[np.ndarray], int]:
    """Series batching: ``predict_probs`` over several series' slices in passes of exactly ``batch``
    slices that may span series (``analysis.batching.run_across``; a short last pass padded with
    zero inputs). Returns (n_i, 5) probabilities per series and the number of passes."""
    import torch

    from analysis.batching import run_across

    arrs = [np.asarray(h, dtype=np.float32) for h in hus]
    arrs = [a[None] if a.ndim == 2 else a for a in arrs]
    out = [np.zeros((a.shape[0], N_CLASSES), np.float32) for a in arrs]
    net.eval()

    def prep(v: int, i: int, j: int):
        return torch.from_numpy(prepare(arrs[v][i:j])).to(device)

    def forward(x):
        return (torch.softmax(net(x), dim=1),)

    def collect(v: int, i: int, j: int, outs) -> None:
        out[v][i:j] = outs[0].cpu().numpy()

    with torch.no_grad():
        passes = run_across([a.shape[0] for a in arrs], max(1, batch), device, prep, forward, collect, "Delta-IQA")
    return out, passes
