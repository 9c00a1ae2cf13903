"""Sliced inference: cut a large frame into overlapping tiles, merge tile detections back.

Objects cut by a tile border are seen whole by the neighbouring tile when the overlap exceeds the
object size, so after shifting boxes to frame coordinates the duplicates are merged:

- `nms` keeps the best box of each overlapping group (torchvision's batched NMS when the
  metric is IoU);
- `nmm` (non-maximum merging, as SAHI) replaces each group by the union of its boxes, keeping
  the best score, which repairs objects that no tile saw whole;
- metric `iou` (intersection over union) or `ios` (intersection over the smaller box), the latter
  catching a truncated box that lies inside the full one.

torchvision has IoU-NMS only; IoS and merging are written here.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

__all__ = ["plan_tiles", "merge_detections", "MERGE_METHODS", "MERGE_METRICS"]

from .config import MERGE_METHODS, MERGE_METRICS, check_tile
from .selection import batched_nms_many


def _starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tile windows `(x0, y0, x1, y1)` covering the frame; the last row/column is shifted inwards so
    every tile is whole (`tile` x `tile`) unless the frame itself is smaller."""
    check_tile(tile, overlap)
    stride = tile - overlap
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in _starts(height, tile, stride)
        for x in _starts(width, tile, stride)
    ]


def _pairwise(boxes: Tensor, metric: str) -> Tensor:
    if metric == "iou":
        return box_iou(boxes, boxes)
    lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = box_area(boxes)
    return inter / torch.min(area[:, None], area[None, :]).clamp(min=1e-6)


def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, *, threshold: float = 0.5,
                     method: str = "nms", metric: str = "iou") -> tuple[Tensor, Tensor]:
    """Merge duplicates among `[N, 4]` boxes of the same label.

    Returns `(keep, merged_boxes)`: indices of the representative detections (best score first)
    and their boxes after merging (equal to `boxes[keep]` for NMS).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    if metric not in MERGE_METRICS:
        raise ValueError(f"merge metric must be one of {MERGE_METRICS}, got {metric!r}")
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), boxes.reshape(0, 4)
    if method == "nms" and metric == "iou":
        keep = batched_nms_many([(boxes, scores, labels, threshold)])[0]  # torchvision's, one wait less on a GPU
        return keep, boxes[keep]
    order = scores.argsort(descending=True)
    b, lab = boxes[order], labels[order]
    # the pairwise test where the boxes are, the greedy pass on the host: one copy, where a loop over device
    # tensors waits for the device at every box (4,000 waits for a 4096-px raster's tiles on a GPU)
    over = ((_pairwise(b, metric) > threshold) & (lab[:, None] == lab[None, :])).cpu().numpy()
    suppressed = np.zeros(len(b), dtype=bool)
    keep, groups = [], []
    for i in range(len(b)):  # greedy, best score first (as NMS)
        if suppressed[i]:
            continue
        group = over[i] & ~suppressed
        group[i] = True
        suppressed |= group
        keep.append(i)
        groups.append(group)
    idx = torch.as_tensor(keep).to(b.device, non_blocking=True)  # a pageable copy: no wait for the device
    keep_t = order[idx]
    if method != "nmm":
        return keep_t, b[idx]
    hb = b.cpu().numpy()
    merged = np.stack([np.concatenate([hb[g, :2].min(0), hb[g, 2:].max(0)]) for g in groups])
    return keep_t, torch.from_numpy(merged).to(b.device)
