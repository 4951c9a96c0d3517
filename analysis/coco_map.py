"""COCO-style box mAP in numpy (the metric of pycocotools' ``COCOeval(..., "bbox")``, stats[0]).

AP for one class = mean over IoU thresholds 0.50:0.05:0.95 of the 101-point interpolated precision
(recall thresholds 0, 0.01, ..., 1; precision made monotone from the right; 0 past the last recall
reached). mAP = mean of AP over the classes that have at least one ground-truth box. Matching follows
pycocotools exactly: per image and class, detections in descending score order (stable) take the
unmatched ground truth with the highest IoU >= threshold (ties go to the later ground truth); at most
``max_dets`` detections per image and class; no crowd or ignore regions; area range "all".

Boxes are COCO ``[x, y, w, h]`` in continuous pixel coordinates (IoU without the +1 of old VOC code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS: np.ndarray = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class ImageBoxes:
    """Ground truth (``scores`` None) or detections of one image."""

    boxes: np.ndarray  # (n, 4) float, [x, y, w, h]
    classes: np.ndarray  # (n,) int
    scores: np.ndarray | None = None  # (n,) float for detections

    def __post_init__(self) -> None:
        b = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        c = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        if b.shape[0] != c.shape[0]:
            raise ValueError(f'Arguments "boxes" ({b.shape[0]}) and "classes" ({c.shape[0]}) must have the same length')
        object.__setattr__(self, "boxes", b)
        object.__setattr__(self, "classes", c)
        if self.scores is not None:
            s = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if s.shape[0] != c.shape[0]:
                raise ValueError(f'Argument "scores" must have one value per box ({c.shape[0]}), got {s.shape[0]}')
            object.__setattr__(self, "scores", s)


@dataclass(frozen=True)
class CocoResult:
    map: float  # nan when no class has ground truth
    ap_per_class: np.ndarray  # (n_classes,), nan for classes without ground truth
    precision: np.ndarray  # (n_iou, 101, n_classes), -1 for classes without ground truth
    n_gt_per_class: np.ndarray  # (n_classes,)


def box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of [x, y, w, h] boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx1, by1 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.minimum(ax1[:, None], bx1[None, :]) - np.maximum(a[:, 0][:, None], b[:, 0][None, :])
    ih = np.minimum(ay1[:, None], by1[None, :]) - np.maximum(a[:, 1][:, None], b[:, 1][None, :])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def _match_image(ious: np.ndarray, n_thr: int, thresholds: np.ndarray) -> np.ndarray:
    """Greedy pycocotools matching for one image and class. ``ious`` (n_det sorted by score, n_gt).
    Returns dtm (n_thr, n_det) bool: detection matched at that threshold."""
    n_det, n_gt = ious.shape
    dtm = np.zeros((n_thr, n_det), dtype=bool)
    if n_det == 0 or n_gt == 0:
        return dtm
    gtm = np.zeros((n_thr, n_gt), dtype=bool)
    thr = np.minimum(thresholds, 1 - 1e-10)[:, None]  # (T, 1)
    rev = np.arange(n_gt)[::-1]
    for d in range(n_det):
        row = ious[d][None, :]  # (1, G)
        ok = (row >= thr) & ~gtm  # (T, G)
        cand = np.where(ok, row, -1.0)
        # argmax of the reversed array -> the LAST gt among equal maxima (pycocotools' tie rule)
        best_rev = np.argmax(cand[:, ::-1], axis=1)
        best = rev[best_rev]
        has = ok[np.arange(n_thr), best]
        t_idx = np.flatnonzero(has)
        gtm[t_idx, best[t_idx]] = True
        dtm[t_idx, d] = True
    return dtm


def coco_map(
    gts: Sequence[ImageBoxes],
    dets: Sequence[ImageBoxes],
    n_classes: int,
    *,
    max_dets: int = 100,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
) -> CocoResult:
    """COCO mAP over images ``gts[i]``/``dets[i]`` (same length, one entry per image)."""
    if len(gts) != len(dets):
        raise ValueError(f'Arguments "gts" ({len(gts)}) and "dets" ({len(dets)}) must list the same images')
    if n_classes < 1:
        raise ValueError(f'Argument "n_classes" must be >= 1, got {n_classes}')
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    n_thr, n_rec = thresholds.size, RECALL_THRESHOLDS.size
    precision = -np.ones((n_thr, n_rec, n_classes))
    n_gt_per_class = np.zeros(n_classes, dtype=np.int64)
    for k in range(n_classes):
        scores_all: list[np.ndarray] = []
        dtm_all: list[np.ndarray] = []
        n_gt = 0
        for gt, dt in zip(gts, dets):
            g = gt.boxes[gt.classes == k]
            sel = dt.classes == k
            d = dt.boxes[sel]
            if dt.scores is None:
                raise ValueError('Detections must carry "scores"')
            s = dt.scores[sel]
            order = np.argsort(-s, kind="mergesort")[:max_dets]
            d, s = d[order], s[order]
            n_gt += g.shape[0]
            if d.shape[0] == 0:
                continue
            dtm_all.append(_match_image(box_iou_xywh(d, g), n_thr, thresholds))
            scores_all.append(s)
        n_gt_per_class[k] = n_gt
        if n_gt == 0:
            continue
        if not scores_all:
            precision[:, :, k] = 0.0
            continue
        scores = np.concatenate(scores_all)
        dtm = np.concatenate(dtm_all, axis=1)
        order = np.argsort(-scores, kind="mergesort")
        dtm = dtm[:, order]
        tp = np.cumsum(dtm, axis=1, dtype=np.float64)
        fp = np.cumsum(~dtm, axis=1, dtype=np.float64)
        rc = tp / n_gt
        pr = tp / (tp + fp + np.spacing(1))
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        for t in range(n_thr):
            idx = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            valid = idx < rc.shape[1]
            q = np.zeros(n_rec)
            q[valid] = pr[t, idx[valid]]
            precision[t, :, k] = q
    ap = np.full(n_classes, np.nan)
    has = n_gt_per_class > 0
    ap[has] = precision[:, :, has].mean(axis=(0, 1))
    m = float(ap[has].mean()) if has.any() else float("nan")
    return CocoResult(map=m, ap_per_class=ap, precision=precision, n_gt_per_class=n_gt_per_class)
