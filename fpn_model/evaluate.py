"""COCO box metrics through pycocotools, with the small/medium/large split (AP_S ...).

Aerial frames hold hundreds of objects, so recall is measured with `maxDets = (1, 100, 1000)`
(COCO's default cap of 100 would truncate it); AP figures use the largest cap.

A validation set of one image and a few dozen objects gives a noisy figure. Aerial imagery has no
"up", so `evaluate(..., views=8)` scores the model on each of the 8 flips/90-degree rotations of
every image and averages: a steadier estimate of the same quality (the spread is reported as
`AP50_sd`), and a fairer criterion for choosing a checkpoint than the one orientation.

Annotations number their classes their own way (VOC XML by name in alphabetical order, COCO JSON by its category
ids) and a model its own (its training data's order; an imported COCO detector by COCO's sparse ids), so
`aligned_to_model` renumbers the annotations as the model's labels, matching classes by name, before scoring.
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import replace
from typing import Iterable

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .config import ModelConfig
from .data import Annotated, dihedral, read_image
from .predict import Predictor

__all__ = ["aligned_to_model", "coco_metrics", "evaluate", "view_predictions", "view_metrics", "mean_over_views",
           "choose_precision", "METRIC_NAMES"]

METRIC_NAMES = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "AR1", "AR100", "AR1000", "AR_S", "AR_M", "AR_L")
MAX_DETS = [1, 100, 1000]


def aligned_to_model(items: list[Annotated], cfg: ModelConfig, *, single_class: str | None = None) -> list[Annotated]:
    """`items` with their labels renumbered to the labels `cfg`'s model gives the same classes, matched by name
    (ignoring case; a name the model gives several labels, as COCO's "N/A", matches none).

    An annotated class the model lacks gets a label past the model's: its objects count as missed. A model without
    class names is taken to answer the annotations' own category ids (an imported COCO detector's labels are
    COCO's ids). With `single_class` (every object made that one class), a model of one class is that class
    whatever its name. ValueError naming both lists when no class can be matched."""
    if not cfg.class_names:
        if any(not a.category_ids for a in items):
            raise ValueError("the model has no class names and VOC XML has no category ids to match its labels to: "
                             "give --single-class NAME, or COCO JSON whose category ids are the model's labels")
        return [replace(a, labels=np.array([a.category_ids[k - 1] for k in a.labels], np.int64)) for a in items]
    named = [(k, cfg.label_name(k)) for k in range(1, cfg.num_classes)]  # label 0 is the background
    counts = Counter(n.lower() for _, n in named)
    by_name = {n.lower(): k for k, n in named if counts[n.lower()] == 1}
    if single_class and len(by_name) == 1:
        by_name = {single_class.lower(): next(iter(by_name.values()))}
    wanted = sorted({n for a in items for n in a.class_names})
    if not any(n.lower() in by_name for n in wanted):
        raise ValueError(f"no class of the annotations ({', '.join(wanted)}) is one of the model's "
                         f"({', '.join(n for _, n in named if counts[n.lower()] == 1)}): classes are matched by name")
    extra = iter(range(cfg.num_classes, cfg.num_classes + len(wanted)))
    label_of = {n: by_name[n.lower()] if n.lower() in by_name else next(extra) for n in wanted}
    return [replace(a, labels=np.array([label_of[a.class_names[k - 1]] for k in a.labels], np.int64)) for a in items]


def coco_metrics(items: list[Annotated], predictions: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                 *, sizes: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """COCO metrics of `predictions` (boxes, scores, labels per item) against `items`' ground truth.

    `sizes`: (height, width) of each image, if not to be read from the image files."""
    labels = {int(label) for a in items for label in a.labels} | {int(label) for _, _, ls in predictions for label in ls}
    cats = [{"id": c, "name": str(c)} for c in sorted(labels or {1})]
    images, anns, dets = [], [], []
    for i, (a, (boxes, scores, labs)) in enumerate(zip(items, predictions)):
        h, w = sizes[i] if sizes else read_image_size(a)
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


def evaluate(predictor: Predictor, items: list[Annotated], *, views: int = 1,
             images: list[np.ndarray] | None = None) -> dict[str, float]:
    """Run `predictor` on every image of `items` (one at a time; large ones tiled) and score it.

    `views` 8: the mean of each metric over the 8 flips/rotations of the images (plus `AP50_sd`). `images`: the
    items' pixels `[H, W, 3]` uint8 where they are already in memory (else read from their paths).
    """
    predicted = view_predictions(predictor, items, views=views, images=images)
    return mean_over_views(view_metrics(predicted, len(items), range(views)))


def view_predictions(predictor: Predictor, items: list[Annotated], *, views: int = 1,
                     images: list[np.ndarray] | None = None, units: Iterable[int] | None = None) -> dict[int, tuple]:
    """`evaluate`'s forward passes, by unit: unit `k * len(items) + i` is item i turned by view k, and maps to
    (the item with its boxes turned, the turned image's (height, width), the predicted (boxes, scores, labels)).
    `units`: only these (a share of the work: data-parallel ranks each run theirs and share the scoring by view,
    `view_metrics`); default all. Only the images those units need are read."""
    if views not in (1, 8):
        raise ValueError(f"views must be 1 or 8, got {views}")
    n = len(items)
    units = range(n * views) if units is None else units
    chw: dict[int, torch.Tensor] = {}
    out = {}
    for u in units:
        k, i = divmod(u, n)
        if i not in chw:
            a = images[i] if images is not None else read_image(items[i].image_path)
            chw[i] = torch.from_numpy(a).permute(2, 0, 1)
        pixels, boxes = dihedral(chw[i], torch.from_numpy(items[i].boxes).reshape(-1, 4), k)
        det = predictor([pixels.permute(1, 2, 0).numpy()])[0]
        out[u] = (replace(items[i], boxes=boxes.numpy()), tuple(pixels.shape[-2:]), (det.boxes, det.scores, det.labels))
    return out


def view_metrics(predicted: dict[int, tuple], n_items: int, views: Iterable[int]) -> dict[int, dict[str, float]]:
    """The COCO metrics of each of `views` (view k: units `k * n_items + i` of `view_predictions`, from one call
    or merged from several), by view."""
    out = {}
    for k in views:
        turned, sizes, preds = zip(*(predicted[k * n_items + i] for i in range(n_items))) if n_items else ((), (), ())
        out[k] = coco_metrics(list(turned), list(preds), sizes=list(sizes))
    return out


def mean_over_views(per_view: dict[int, dict[str, float]]) -> dict[str, float]:
    """One view's metrics as they are; of 8, each metric's mean and the spread of AP50 (`AP50_sd`)."""
    if len(per_view) == 1:
        return next(iter(per_view.values()))
    out = {k: float(np.mean([m[k] for m in per_view.values()])) for k in METRIC_NAMES}
    out["AP50_sd"] = float(np.std([m["AP50"] for m in per_view.values()]))
    return out


def choose_precision(evaluated: dict[str, dict[str, float]]) -> str:
    """The precision to run by default, from 8-view metrics per precision on one device (`evaluate(views=8)`,
    keyed by precision, `exact` among them): of the approximate ones whose AP50 is no lower than exact's minus
    exact's spread over the views (AP50_sd), the one with the highest AP50; exact when none is."""
    exact = evaluated["exact"]
    floor = exact["AP50"] - exact["AP50_sd"]
    kept = {p: m["AP50"] for p, m in evaluated.items() if p != "exact" and m["AP50"] >= floor}
    return max(kept, key=kept.get) if kept else "exact"
