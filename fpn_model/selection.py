"""Boxes chosen for a whole batch of images at once, and the per-image NMS calls run together: what the exact fast
path of torchvision-style heads (fpn_model.predict.FastRPN, FastRoIHeads; FPNRetinaNet) is made of. Each gives
what torchvision's loops over the images give, bit for bit: the same rows in the same order, the same NMS
algorithm for each image."""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

__all__ = ["run_all", "batched_nms_many", "clip_batch", "select_rows"]


def run_all(executor: ThreadPoolExecutor | None, calls: list) -> list:
    """Results of the zero-argument `calls`, on `executor` when there is one and more than one call."""
    if executor is None or len(calls) < 2:
        return [c() for c in calls]

    def run(call):
        with torch.inference_mode():
            return call()

    return list(executor.map(run, calls))


def batched_nms_many(jobs: list[tuple[Tensor, Tensor, Tensor, float]],
                     executor: ThreadPoolExecutor | None = None) -> list[Tensor]:
    """`torchvision.ops.batched_nms(boxes, scores, idxs, threshold)` of each job, the NMS calls of all jobs run
    together on `executor`; the same algorithm torchvision picks for each job (per class above 4000 numbers on a
    CPU, else the coordinate offset trick), so the same result."""
    calls, plans = [], []
    for boxes, scores, idxs, thresh in jobs:
        if boxes.numel() > (4000 if boxes.device.type == "cpu" else 100_000):  # torchvision's _batched_nms_vanilla
            members = [torch.where(idxs == c)[0] for c in torch.unique(idxs)]
            first = len(calls)
            calls += [partial(box_ops.nms, boxes[m], scores[m], thresh) for m in members]
            plans.append(("vanilla", members, first))
        elif boxes.numel() == 0:
            plans.append(("empty", None, None))
        else:  # torchvision's _batched_nms_coordinate_trick
            # torchvision's `boxes.max() + torch.tensor(1).to(boxes)`, without its copy of the 1 to the device: on
            # a GPU that copy waits for the device, once per image and stage (the same sum: 1 is exact in any dtype)
            offsets = idxs.to(boxes) * (boxes.max() + 1)
            plans.append(("trick", None, len(calls)))
            calls.append(partial(box_ops.nms, boxes + offsets[:, None], scores, thresh))
    done = run_all(executor, calls)
    keeps = []
    for (kind, members, first), (_, scores, _, _) in zip(plans, jobs):
        if kind == "empty":
            keeps.append(torch.empty((0,), dtype=torch.int64, device=scores.device))
        elif kind == "trick":
            keeps.append(done[first])
        else:
            keep_mask = torch.zeros_like(scores, dtype=torch.bool)
            for m, k in zip(members, done[first:first + len(members)]):
                keep_mask.index_fill_(0, m[k], True)  # not `[m[k]] = True`: a tensor made of the True
            keep = torch.where(keep_mask)[0]
            keeps.append(keep[scores[keep].sort(descending=True)[1]])
    return keeps


def clip_batch(boxes: Tensor, image_sizes: list[tuple[int, int]], lengths: list[int] | None = None) -> Tensor:
    """Boxes (`[..., 4]`) of a batch's images clipped to each image's size (torchvision's `clip_boxes_to_image`):
    image by image along the first dimension, or `lengths` rows each; in one operation when the images have one
    size (a Predictor batch always has)."""
    if len(set(image_sizes)) == 1:
        return box_ops.clip_boxes_to_image(boxes, image_sizes[0])
    if lengths is None:
        return torch.stack([box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes, image_sizes)])
    return torch.cat([box_ops.clip_boxes_to_image(b, s) for b, s in zip(boxes.split(lengths), image_sizes)])


def select_rows(keep: Tensor, lengths: list[int], *tensors: Tensor, positions: bool = False
                ) -> list[tuple[Tensor, ...]]:
    """Rows of `tensors` where `keep` (one flat mask over the rows of a batch's images, `lengths` rows each), per
    image and in order (with `positions`, last, the rows' indices within their image): what torchvision's heads
    select image by image with boolean masks, chosen here for the whole batch at once. On a GPU each such selection
    waits for the device (it has to learn how many rows are left): two waits per batch here where the per-image
    loop takes two per image and filter."""
    if not lengths:
        return []
    if len(set(lengths)) == 1:
        counts = keep.view(len(lengths), -1).sum(1)
    else:
        counts = torch.stack([k.sum() for k in keep.split(lengths)])
    counts = counts.tolist()
    rows = torch.where(keep)[0]
    parts = [t[rows].split(counts) for t in tensors]
    if positions:  # where(keep) of each image's own mask
        parts.append([r - start for r, start in zip(rows.split(counts), itertools.accumulate([0, *lengths[:-1]]))])
    return list(zip(*parts))
