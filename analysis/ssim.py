"""SSIM maps as N2Q defines them (Wang et al. 2004 with a Gaussian window).

Gaussian window sigma 1.5 truncated at 3.5 sigma (11 x 11), K1 = 0.01, K2 = 0.03, population
(co)variances, on images windowed to [0, 1] (``data_range = 1``). Borders use half-sample
symmetric padding, so :func:`ssim_map` equals ``skimage.metrics.structural_similarity(a, b,
full=True, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)[1]``.

``window_hu(hu, level=40, width=300)`` maps HU to [0, 1] with the N2Q display window (W300/L40).
``ssim_map(a, b)`` (numpy, 2D or batched over leading axes) and ``ssim_map_torch(a, b)`` (torch,
(B, 1, H, W) or (B, H, W)) give the same map.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SIGMA = 1.5
TRUNCATE = 3.5
K1, K2 = 0.01, 0.03
WINDOW_LEVEL_HU = 40.0
WINDOW_WIDTH_HU = 300.0


def window_hu(hu: np.ndarray | torch.Tensor, level: float = WINDOW_LEVEL_HU, width: float = WINDOW_WIDTH_HU):
    """HU -> [0, 1] through the display window [level - width/2, level + width/2]."""
    if not width > 0:
        raise ValueError(f'Argument "width" must be > 0, got {width}')
    lo = level - width / 2.0
    if isinstance(hu, torch.Tensor):
        return ((hu - lo) / width).clamp(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / width, 0.0, 1.0).astype(np.float32)


def _check_pair(a, b) -> None:
    if a.shape != b.shape:
        raise ValueError(f'Arguments "a" and "b" must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}')
    if a.ndim < 2:
        raise ValueError(f'Arguments "a" and "b" must be at least 2D, got {a.ndim}D')


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Pixel-wise SSIM of two images (or stacks; the last two axes are the image). float64 inside."""
    _check_pair(a, b)
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    sig = [0.0] * (x.ndim - 2) + [SIGMA, SIGMA]

    def filt(z: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(z, sigma=sig, truncate=TRUNCATE, mode="reflect")

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.astype(np.float32)


def _gauss_kernel1d(device, dtype) -> torch.Tensor:
    r = int(TRUNCATE * SIGMA + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return (k / k.sum()).to(device=device, dtype=dtype)


def _sym_pad(x: torch.Tensor, r: int) -> torch.Tensor:
    """Half-sample symmetric padding of the last two axes (scipy 'reflect')."""
    top, bottom = x[..., :r, :].flip(-2), x[..., -r:, :].flip(-2)
    x = torch.cat((top, x, bottom), dim=-2)
    left, right = x[..., :, :r].flip(-1), x[..., :, -r:].flip(-1)
    return torch.cat((left, x, right), dim=-1)


def _gfilt(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    xp = _sym_pad(x, r)
    xp = F.conv2d(xp, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(xp, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map_torch(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Same as :func:`ssim_map` for torch tensors (B, H, W) or (B, C, H, W); differentiable."""
    _check_pair(a, b)
    squeeze = a.ndim == 3
    if squeeze:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    if a.ndim != 4:
        raise ValueError(f'Arguments "a" and "b" must be (B, H, W) or (B, C, H, W), got {tuple(a.shape)}')
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.to(work), b.to(work)
    k = _gauss_kernel1d(x.device, work)
    stacked = _gfilt(torch.cat((x, y, x * x, y * y, x * y), dim=1), k)
    c = x.shape[1]
    ux, uy, xx, yy, xy = stacked.split(c, dim=1)
    vx, vy, vxy = xx - ux * ux, yy - uy * uy, xy - ux * uy
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.squeeze(1) if squeeze else s


def window_size() -> int:
    """Side of the Gaussian window in pixels (11)."""
    return 2 * int(TRUNCATE * SIGMA + 0.5) + 1

