"""COCO box metrics through pycocotools, with the small/medium/large split (AP_S ...).

Aerial frames hold hundreds of objects, so recall is measured with `maxDets = (1, 100, 1000)`
(COCO's default cap of 100 would truncate it); AP figures use the largest cap.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import Annotated, read_image
from .predict import Predictor

__all__ = ["coco_metrics", "evaluate", "METRIC_NAMES"]

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR100", "AR1000", "AR_S", "AR_M", "AR_L")
MAX_DETS = [1, 100, 1000]


def coco_metrics(items: list[Annotated], predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 *, num_classes: int | None = None) -> dict[str, float]:
    """COCO metrics of `predictions` (boxes, scores, labels per item) against `items`' ground truth."""
    labels = {int(label) for a in items for label in a.labels} | {int(label) for _, _, ls in predictions for label in ls}
    cats = [{"id": c, "name": str(c)} for c in sorted(labels or {1})]
    images, anns, dets = [], [], []
    for a, (boxes, scores, labs) in zip(items, predictions):
        h, w = read_image_size(a)
        images.append({"id": a.image_id, "width": w, "height": h})
        for b, label in zip(a.boxes, a.labels):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": a.image_id, "category_id": int(label),
                         "bbox": [float(b[0]), float(b[1]), bw, bh], "area": bw * bh, "iscrowd": 0})
        for b, s, label in zip(boxes, scores, labs):
            dets.append({"image_id": a.image_id, "category_id": int(label), "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not dets:
            return {k: 0.0 for k in METRIC_NAMES}
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = MAX_DETS
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # summarize() with maxDets [1, 100, 1000]: stats 0-5 use 1000; 6-8 are AR@1/100/1000; 9-11 AR_S/M/L @1000
    return {k: max(0.0, float(v)) for k, v in zip(METRIC_NAMES, ev.stats)}


def read_image_size(a: Annotated) -> tuple[int, int]:
    from PIL import Image

    with Image.open(a.image_path) as im:
        return im.height, im.width


def evaluate(predictor: Predictor, items: list[Annotated]) -> dict[str, float]:
    """Run `predictor` on every image of `items` (one at a time; large ones tiled) and score it."""
    preds = []
    for a in items:
        det = predictor([read_image(a.image_path)])[0]
        preds.append((det.boxes, det.scores, det.labels))
    return coco_metrics(items, preds)
