"""Synthetic anatomical CT phantoms (noise-free HU slices) for self-supervised training and tests.

``make_phantom(kind, size_px, rng) -> (hu2d float32 (size_px, size_px), pixel_spacing_mm)``

``kind="body"``: an abdomen/thorax-like cross-section: elliptical (irregular) outline with skin,
subcutaneous fat of random thickness, muscle wall and paraspinal muscles, a vertebra (cortical
shell, trabecular core, spinal canal), ribs, liver, spleen, kidneys, bowel loops with gas and
contents, aorta and IVC with contrast, small enhancing vessels, fat stranding, and a patient table.
``kind="head"``: scalp, skull (diploe + cortical tables), grey/white matter, ventricles, sulci with
CSF, falx, optional sinuses/air cells, small vessels and calcifications.

Every tissue carries smooth, spatially correlated texture (a few to ~20 HU) so that flat regions
are not perfectly flat, and edges are slightly blurred (partial volume). Patient size varies
(body 24-46 cm lateral width, head 13-19 cm) while the reconstructed field of view is chosen like a
scanner would (object fills 65-92 % of it), so the pixel spacing varies as in real series. The
phantoms have NO noise: add it with ``analysis.training.dose_sim``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

KINDS = ("body", "head")


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, ang: float = 0.0) -> np.ndarray:
    c, s = math.cos(ang), math.sin(ang)
    x, y = xx - cx, yy - cy
    u = (x * c + y * s) / a
    v = (-x * s + y * c) / b
    return u * u + v * v <= 1.0


def _ellipse_r(xx, yy, cx, cy, a, b, ang=0.0) -> np.ndarray:
    c, s = math.cos(ang), math.sin(ang)
    x, y = xx - cx, yy - cy
    u = (x * c + y * s) / a
    v = (-x * s + y * c) / b
    return np.sqrt(u * u + v * v)


def _texture(shape: tuple[int, int], rng: np.random.Generator, sigma_px: float, amp: float) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px)
    sd = float(t.std()) or 1.0
    return t * (amp / sd)


def _irregular_outline(xx, yy, cx, cy, a, b, rng, wobble=0.04, ang=0.0) -> np.ndarray:
    """Ellipse with a smooth random radial perturbation (Fourier harmonics 2..6)."""
    r = _ellipse_r(xx, yy, cx, cy, a, b, ang)
    theta = np.arctan2(yy - cy, xx - cx)
    pert = np.zeros_like(theta)
    for k in range(2, 7):
        pert += rng.normal(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return r <= 1.0 + pert


def _body(n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    width_mm = rng.uniform(240.0, 460.0)
    fov = width_mm / rng.uniform(0.65, 0.92)
    ps = fov / n
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = n / 2 + rng.normal(0, 0.02 * n), n / 2 + rng.normal(0, 0.02 * n)
    a = 0.5 * width_mm / ps
    b = a * rng.uniform(0.62, 0.85)
    img = np.full((n, n), -1000.0, dtype=np.float32)
    ang = rng.normal(0, 0.03)
    outer = _irregular_outline(xx, yy, cx, cy, a, b, rng, 0.03, ang)
    fat_mm = rng.uniform(5.0, 45.0)
    fat_px = fat_mm / ps
    inner = _irregular_outline(xx, yy, cx, cy + 0.05 * fat_px, a - fat_px, b - 0.8 * fat_px, rng, 0.04, ang)
    muscle_px = rng.uniform(6.0, 18.0) / ps
    cavity = _ellipse(xx, yy, cx, cy - 0.05 * b, a - fat_px - muscle_px, b - 0.8 * fat_px - muscle_px, ang)
    fat_hu = rng.uniform(-120, -80)
    muscle_hu = rng.uniform(35, 65)
    img[outer] = fat_hu
    img[inner] = muscle_hu
    # visceral fat background inside the cavity with stranding
    img[cavity] = fat_hu + 10 + _texture((n, n), rng, 3.0 / ps, 25.0)[cavity]
    # skin
    skin = outer & ~ndimage.binary_erosion(outer, iterations=max(1, int(round(2.0 / ps))))
    img[skin] = muscle_hu
    ca, cb = a - fat_px - muscle_px, b - 0.8 * fat_px - muscle_px
    # vertebra (posterior midline): image y grows downwards = posterior
    vx, vy = cx + rng.normal(0, 0.02 * ca), cy + 0.55 * cb
    vr = rng.uniform(15.0, 22.0) / ps
    body_v = _ellipse(xx, yy, vx, vy, vr * 1.1, vr)
    # paraspinal muscles
    for side in (-1, 1):
        m = _ellipse(xx, yy, vx + side * 1.9 * vr, vy + 1.1 * vr, 1.3 * vr, 1.0 * vr)
        img[m & inner] = muscle_hu + rng.normal(0, 5)
    img[body_v] = rng.uniform(180, 300)
    cortex = body_v & ~ndimage.binary_erosion(body_v, iterations=max(1, int(round(1.8 / ps))))
    img[cortex] = rng.uniform(600, 1000)
    canal = _ellipse(xx, yy, vx, vy + 1.45 * vr, 0.5 * vr, 0.45 * vr)
    ring = _ellipse(xx, yy, vx, vy + 1.45 * vr, 0.8 * vr, 0.75 * vr) & ~canal
    img[ring] = rng.uniform(400, 800)
    img[canal] = rng.uniform(10, 30)
    thorax = rng.random() < 0.35
    if thorax:
        # lungs instead of abdominal organs
        for side in (-1, 1):
            lung = _irregular_outline(xx, yy, cx + side * 0.45 * ca, cy - 0.05 * cb, 0.42 * ca, 0.8 * cb, rng, 0.05)
            lung &= cavity
            img[lung] = rng.uniform(-880, -800) + _texture((n, n), rng, 1.5 / ps, 30.0)[lung]
            # lung vessels
            for _ in range(int(rng.integers(15, 40))):
                px, py = rng.uniform(-1, 1, 2)
                r = rng.uniform(1.0, 4.0) / ps
                v = _ellipse(xx, yy, cx + side * 0.45 * ca + px * 0.35 * ca, cy + py * 0.6 * cb, r, r)
                img[v & lung] = rng.uniform(0, 60)
        heart = _ellipse(xx, yy, cx - 0.1 * ca, cy - 0.15 * cb, 0.35 * ca, 0.45 * cb, rng.uniform(-0.6, -0.2))
        img[heart & cavity] = rng.uniform(30, 60)
        lum = _ellipse(xx, yy, cx - 0.05 * ca, cy - 0.1 * cb, 0.18 * ca, 0.25 * cb)
        img[lum & cavity] = rng.uniform(120, 300)
    else:
        organs = []
        # liver (patient right = image left), spleen, kidneys
        organs.append((_irregular_outline(xx, yy, cx - 0.38 * ca, cy - 0.12 * cb, 0.6 * ca, 0.72 * cb, rng, 0.06, rng.normal(0, 0.3)), rng.uniform(50, 110)))
        organs.append((_irregular_outline(xx, yy, cx + 0.55 * ca, cy + 0.1 * cb, 0.22 * ca, 0.35 * cb, rng, 0.06, rng.normal(0, 0.3)), rng.uniform(45, 100)))
        for side in (-1, 1):
            k = _irregular_outline(xx, yy, vx + side * 3.2 * vr, vy - 0.2 * vr, 1.3 * vr, 2.0 * vr, rng, 0.05, side * 0.4)
            organs.append((k, rng.uniform(120, 200)))
        for mask, hu in organs:
            mask &= cavity
            img[mask] = hu + _texture((n, n), rng, 2.0 / ps, rng.uniform(4, 12))[mask]
        # bowel loops
        for _ in range(int(rng.integers(4, 12))):
            bx = cx + rng.uniform(-0.5, 0.5) * ca
            by = cy + rng.uniform(-0.6, 0.25) * cb
            r = rng.uniform(8, 22) / ps
            loop = _ellipse(xx, yy, bx, by, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)) & cavity
            wall = loop & ~ndimage.binary_erosion(loop, iterations=max(1, int(round(2.5 / ps))))
            content = rng.choice([-1000.0, rng.uniform(0, 40), rng.uniform(150, 350)], p=[0.35, 0.45, 0.2])
            img[loop] = content + (0 if content < -500 else 1) * _texture((n, n), rng, 1.5 / ps, 15.0)[loop]
            img[wall] = rng.uniform(40, 90)
        # aorta and IVC
        ar = rng.uniform(9, 14) / ps
        aorta = _ellipse(xx, yy, vx + 0.3 * vr, vy - 1.6 * vr, ar, ar)
        img[aorta] = rng.uniform(120, 350)
        ivc = _ellipse(xx, yy, vx - 1.8 * vr, vy - 1.5 * vr, 1.2 * ar, 0.8 * ar)
        img[ivc & cavity] = rng.uniform(80, 200)
        # small vessels in organs
        for _ in range(int(rng.integers(10, 30))):
            px, py = cx + rng.uniform(-0.8, 0.8) * ca, cy + rng.uniform(-0.8, 0.6) * cb
            r = rng.uniform(1.5, 5.0) / ps
            v = _ellipse(xx, yy, px, py, r, r * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)) & cavity
            img[v] = rng.uniform(100, 250)
        # a few lesions
        for _ in range(int(rng.integers(0, 4))):
            px, py = cx + rng.uniform(-0.6, 0.6) * ca, cy + rng.uniform(-0.6, 0.4) * cb
            r = rng.uniform(3.0, 15.0) / ps
            v = _ellipse(xx, yy, px, py, r, r * rng.uniform(0.7, 1.0)) & cavity
            img[v] += rng.uniform(-40, 40)
    # ribs in the body wall
    for _ in range(int(rng.integers(4, 12))):
        t = rng.uniform(-np.pi * 0.95, -np.pi * 0.05) if rng.random() < 0.6 else rng.uniform(0.1, 0.9) * np.pi
        rx = cx + (ca + 0.5 * muscle_px) * math.cos(t)
        ry = cy + (cb + 0.5 * muscle_px) * math.sin(t)
        r = rng.uniform(4.0, 8.0) / ps
        rib = _ellipse(xx, yy, rx, ry, r, 0.6 * r, t + np.pi / 2) & inner
        img[rib] = rng.uniform(250, 500)
        rim = rib & ~ndimage.binary_erosion(rib, iterations=1)
        img[rim] = rng.uniform(600, 1100)
    # muscle texture, fat texture
    musc = (img > 20) & (img < 80) & inner
    img[musc] += _texture((n, n), rng, 1.5 / ps, rng.uniform(3, 10))[musc]
    fat = (img > -150) & (img < -50)
    img[fat] += _texture((n, n), rng, 1.0 / ps, rng.uniform(4, 12))[fat]
    # patient table below the body
    if rng.random() < 0.7:
        ty = cy + b + rng.uniform(3, 15) / ps
        th = rng.uniform(4, 10) / ps
        table = (yy > ty) & (yy < ty + th) & (np.abs(xx - cx) < 0.45 * fov / ps)
        img[table] = rng.uniform(-300, 100)
    return img, ps


def _head(n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    width_mm = rng.uniform(130.0, 190.0)
    fov = width_mm / rng.uniform(0.7, 0.92)
    ps = fov / n
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = n / 2 + rng.normal(0, 0.02 * n), n / 2 + rng.normal(0, 0.02 * n)
    b = 0.5 * width_mm / ps * rng.uniform(1.1, 1.3)  # anterior-posterior is longer
    a = 0.5 * width_mm / ps
    ang = rng.normal(0, 0.08)
    img = np.full((n, n), -1000.0, dtype=np.float32)
    outer = _irregular_outline(xx, yy, cx, cy, a, b, rng, 0.02, ang)
    img[outer] = rng.uniform(20, 50) + _texture((n, n), rng, 1.0 / ps, 8.0)[outer]
    scalp = rng.uniform(3, 8) / ps
    skull_t = rng.uniform(4, 9) / ps
    skull = _irregular_outline(xx, yy, cx, cy, a - scalp, b - scalp, rng, 0.015, ang)
    brain = _irregular_outline(xx, yy, cx, cy, a - scalp - skull_t, b - scalp - skull_t, rng, 0.015, ang)
    fat = outer & ~skull & (_ellipse_r(xx, yy, cx, cy, a, b, ang) > 0.985)
    img[fat & ~ndimage.binary_erosion(outer, iterations=max(1, int(round(1.5 / ps))))] = 40.0
    img[skull] = rng.uniform(300, 700) + _texture((n, n), rng, 1.0 / ps, 80.0)[skull]  # diploe
    inner_table = skull & ~ndimage.binary_erosion(skull, iterations=max(1, int(round(1.8 / ps))))
    img[inner_table] = rng.uniform(1000, 1600)
    outer_shell = brain | ~ndimage.binary_erosion(skull | brain, iterations=0)
    tab2 = ndimage.binary_dilation(brain, iterations=max(1, int(round(1.8 / ps)))) & skull
    img[tab2] = rng.uniform(1000, 1600)
    del outer_shell
    wm_hu, gm_hu = rng.uniform(22, 30), rng.uniform(34, 42)
    img[brain] = gm_hu + _texture((n, n), rng, 1.2 / ps, 3.0)[brain]
    ba, bb = a - scalp - skull_t, b - scalp - skull_t
    wm = _irregular_outline(xx, yy, cx, cy, 0.78 * ba, 0.8 * bb, rng, 0.08, ang) & brain
    img[wm] = wm_hu + _texture((n, n), rng, 1.2 / ps, 2.5)[wm]
    # sulci (CSF) near the cortex
    theta = np.arctan2(yy - cy, xx - cx)
    r = _ellipse_r(xx, yy, cx, cy, ba, bb, ang)
    n_sulci = int(rng.integers(14, 30))
    phase = rng.uniform(0, 2 * np.pi)
    sulci = (np.cos(n_sulci * theta + phase + 3 * np.sin(3 * theta)) > rng.uniform(0.75, 0.93)) & (r > rng.uniform(0.8, 0.9)) & brain
    img[sulci] = rng.uniform(0, 12)
    # ventricles
    vw = rng.uniform(0.05, 0.16) * ba
    for side in (-1, 1):
        v = _ellipse(xx, yy, cx + side * rng.uniform(0.8, 1.5) * vw, cy - rng.uniform(0, 0.15) * bb, vw, rng.uniform(0.25, 0.45) * bb, side * rng.uniform(0.05, 0.3))
        img[v & brain] = rng.uniform(2, 12)
    # falx
    falx = (np.abs(xx - cx - (yy - cy) * math.tan(ang)) < max(0.6, 0.8 / ps)) & (r > 0.55) & brain
    img[falx] = rng.uniform(60, 90)
    # calcifications / vessels
    for _ in range(int(rng.integers(2, 10))):
        px, py = cx + rng.uniform(-0.6, 0.6) * ba, cy + rng.uniform(-0.6, 0.6) * bb
        rr = rng.uniform(0.8, 3.0) / ps
        v = _ellipse(xx, yy, px, py, rr, rr) & brain
        img[v] = rng.uniform(60, 400)
    # sinuses / mastoid air cells near the front or skull base
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 4))):
            px, py = cx + rng.uniform(-0.4, 0.4) * a, cy - rng.uniform(0.75, 0.95) * b
            rr = rng.uniform(4, 12) / ps
            v = _ellipse(xx, yy, px, py, rr, 0.7 * rr) & outer
            img[v] = -1000.0 + rng.uniform(0, 100)
    # head holder
    if rng.random() < 0.6:
        holder = (_ellipse_r(xx, yy, cx, cy + 0.1 * b, a * 1.15, b * 1.05) < 1.0) & (_ellipse_r(xx, yy, cx, cy + 0.1 * b, a * 1.1, b * 1.0) >= 1.0) & (yy > cy + 0.3 * b)
        img[holder] = rng.uniform(-200, 200)
    return img, ps


def make_phantom(
    kind: str, size_px: int = 256, rng: np.random.Generator | int | None = None, *, blur_mm: float = 0.6
) -> tuple[np.ndarray, float]:
    """One noise-free phantom slice. Returns (HU float32 (size_px, size_px), pixel spacing in mm).

    kind: "body" or "head". size_px: matrix size (>= 64). rng: Generator or seed. blur_mm: Gaussian
    sigma of the partial-volume / system blur applied at the end."""
    if kind not in KINDS:
        raise ValueError(f'Argument "kind" must be one of {KINDS}, got {kind!r}')
    if not isinstance(size_px, (int, np.integer)) or size_px < 64:
        raise ValueError(f'Argument "size_px" must be an integer >= 64, got {size_px!r}')
    gen = _rng(rng)
    img, ps = (_body if kind == "body" else _head)(int(size_px), gen)
    if blur_mm > 0:
        img = ndimage.gaussian_filter(img, blur_mm / ps)
    return img.astype(np.float32), float(ps)
