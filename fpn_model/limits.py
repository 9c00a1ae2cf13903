"""A two-stage detector's per-image limits (RPN proposals, detections) sized from its training annotations.

torchvision's defaults (1000 proposals kept per level before NMS and 1000 after it, 100 detections) and the
presets' larger ones (`small`: 6000 / 2000 / 1000, `trees`: 3000 / 1000 / 500) are sized for any scene. A model
trained on one kind of scene knows how crowded its inputs get, and every proposal beyond what that needs costs
NMS and box-head work on every frame (the GPU issue's rasters: "the heads again"). torchvision has no such rule:

- `densest`: the most objects whose centres share one input-sized window of the training images (windows at a
  quarter-window stride: 2-D cumulative sums over a grid of centre counts);
- `sized_limits`: detections per image `margin` x that, rounded up to 50; proposals kept after NMS twice the
  detections; per level before NMS twice that again.

`fpn eval MODEL VAL --views 8 --limits-from TRAIN` compares the sized limits with the model's own by AP and, with
`--record`, writes them into the checkpoint when they keep its AP50 within the 8-view spread.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .config import ModelConfig
from .data import Annotated

__all__ = ["LIMIT_FIELDS", "densest", "input_window", "sized_limits"]

LIMIT_FIELDS = ("detections_per_img", "rpn_post_nms_top_n_test", "rpn_pre_nms_top_n_test")


def densest(items: Sequence[Annotated], window: float | None) -> int:
    """The most object centres inside one `window` x `window` square (image pixels) of any image in `items`,
    squares placed every `window / 4` pixels; `window` None: the most objects of any whole image."""
    best = 0
    for a in items:
        boxes = np.asarray(a.boxes, dtype=np.float64).reshape(-1, 4)
        if window is None or len(boxes) == 0:
            best = max(best, len(boxes))
            continue
        cell = window / 4
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        gx, gy = np.floor(cx / cell).astype(int), np.floor(cy / cell).astype(int)
        gx, gy = gx - gx.min(), gy - gy.min()
        grid = np.zeros((gy.max() + 4, gx.max() + 4), np.int64)  # padded: windows may stick out of the objects
        np.add.at(grid, (gy, gx), 1)
        c = np.pad(grid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        counts = c[4:, 4:] - c[:-4, 4:] - c[4:, :-4] + c[:-4, :-4]  # every 4 x 4-cell window
        best = max(best, int(counts.max()))
    return best


def input_window(cfg: ModelConfig, tile: int | None) -> float | None:
    """The side, in training-image pixels, of the largest input the model sees: a tile of `tile` model pixels at
    the model's fixed scale (None: frames are resized whole by the torchvision rule, or fed whole untiled)."""
    if cfg.scale is None or tile is None:
        return None
    return tile / cfg.scale


def sized_limits(items: Sequence[Annotated], cfg: ModelConfig, *, tile: int | None = 1024,
                 margin: float = 2.0) -> tuple[dict[str, int], int]:
    """The `LIMIT_FIELDS` of `cfg` sized from the training annotations `items` for inputs of `tile` pixels a side
    (see the module docstring), and the densest window's count they come from. Raises ValueError without any
    annotated object."""
    n = densest(items, input_window(cfg, tile))
    if n == 0:
        raise ValueError("the training annotations hold no object: nothing to size the limits from")
    detections = 50 * math.ceil(margin * n / 50)
    return {"detections_per_img": detections, "rpn_post_nms_top_n_test": 2 * detections,
            "rpn_pre_nms_top_n_test": 4 * detections}, n
