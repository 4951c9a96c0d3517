"""analysis.coco_map against pycocotools on randomised detections, and on hand-made cases."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from analysis.coco_map import ImageBoxes, box_iou_xywh, coco_map


def _random_case(rng: np.random.Generator, n_images: int, n_classes: int):
    gts, dets = [], []
    for _ in range(n_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 200, size=(n, 2))
        wh = rng.uniform(8, 30, size=(n, 2))
        gb = np.hstack([xy, wh])
        gc = rng.integers(0, n_classes, size=n)
        gts.append(ImageBoxes(gb, gc))
        # detections: jittered copies of some gts (some with the wrong class) plus random boxes
        keep = rng.random(n) < 0.8
        jit = gb[keep] + rng.normal(0, 3, size=(int(keep.sum()), 4)) * np.array([1, 1, 0.5, 0.5])
        jit[:, 2:] = np.clip(jit[:, 2:], 1, None)
        jc = np.where(rng.random(int(keep.sum())) < 0.85, gc[keep], rng.integers(0, n_classes, int(keep.sum())))
        m = int(rng.integers(0, 8))
        rb = np.hstack([rng.uniform(0, 200, (m, 2)), rng.uniform(5, 30, (m, 2))])
        rc = rng.integers(0, n_classes, size=m)
        db = np.vstack([jit, rb])
        dc = np.concatenate([jc, rc])
        ds = rng.random(db.shape[0])
        dets.append(ImageBoxes(db, dc, ds))
    return gts, dets


def _pycocotools_map(gts, dets, n_classes):
    pytest.importorskip("pycocotools", reason="pycocotools (test extra) is not installed")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, res = [], [], []
    aid = 1
    for i, (g, d) in enumerate(zip(gts, dets)):
        images.append({"id": i + 1, "width": 256, "height": 256})
        for b, c in zip(g.boxes, g.classes):
            anns.append({"id": aid, "image_id": i + 1, "category_id": int(c) + 1, "bbox": [float(v) for v in b],
                         "area": float(b[2] * b[3]), "iscrowd": 0})
            aid += 1
        for b, c, s in zip(d.boxes, d.classes, d.scores):
            res.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [float(v) for v in b], "score": float(s)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(n_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(res)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.eval["precision"][:, :, :, 0, 2]


@pytest.mark.parametrize("seed", range(12))
def test_matches_pycocotools_on_random_detections(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_classes = 4
    gts, dets = _random_case(rng, n_images=int(rng.integers(3, 40)), n_classes=n_classes)
    if sum(len(d.classes) for d in dets) == 0 or sum(len(g.classes) for g in gts) == 0:
        pytest.skip("degenerate draw")
    ref_map, ref_prec = _pycocotools_map(gts, dets, n_classes)
    ours = coco_map(gts, dets, n_classes)
    assert abs(ours.map - ref_map) < 1e-6
    np.testing.assert_allclose(ours.precision, ref_prec, atol=1e-6)


def test_perfect_detections_give_map_one() -> None:
    g = ImageBoxes(np.array([[10, 10, 20, 20], [60, 60, 15, 15]]), np.array([0, 2]))
    d = ImageBoxes(g.boxes.copy(), g.classes.copy(), np.array([0.9, 0.8]))
    r = coco_map([g], [d], 4)
    assert r.map == pytest.approx(1.0)
    assert np.isnan(r.ap_per_class[1]) and np.isnan(r.ap_per_class[3])


def test_missed_class_scores_zero_and_wrong_class_is_false_positive() -> None:
    g = ImageBoxes(np.array([[10, 10, 20, 20], [60, 60, 15, 15]]), np.array([0, 1]))
    d = ImageBoxes(np.array([[10, 10, 20, 20], [60, 60, 15, 15]]), np.array([0, 0]), np.array([0.9, 0.8]))
    r = coco_map([g], [d], 2)
    assert r.ap_per_class[0] == pytest.approx(1.0)
    assert r.ap_per_class[1] == 0.0
    assert r.map == pytest.approx(0.5)


def test_iou_threshold_sweep() -> None:
    # a box shifted so that IoU = 0.6 counts for thresholds 0.50, 0.55, 0.60 only -> AP = 3/10
    g = ImageBoxes(np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([0]))
    shift = 10 * (1 - 0.6) / (1 + 0.6)  # IoU(w=10, overlap 10-s) = (10-s)/(10+s) = 0.6
    d = ImageBoxes(np.array([[shift, 0.0, 10.0, 10.0]]), np.array([0]), np.array([1.0]))
    assert box_iou_xywh(d.boxes, g.boxes)[0, 0] == pytest.approx(0.6)
    assert coco_map([g], [d], 1).map == pytest.approx(0.3)
