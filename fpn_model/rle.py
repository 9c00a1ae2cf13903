"""COCO run-length encoding of a frame's instance masks without a Python step or a frame-sized copy per mask.

Before, each Mask R-CNN detection's mask was pasted into a frame-sized array of its own on the host and encoded
by its own pycocotools call: N Python steps per frame, and on a GPU all N x H x W mask bytes copied off the
device first (200 MB for 100 detections at 1080p). Now:

- on a GPU (`runs_to_rle`) the runs of each mask's columns are found where the masks are, with one difference
  along the rows of a chunk of masks at once; only the run boundaries (a few numbers per column a mask covers)
  come to the host, are shifted to frame positions and joined where a run ends at the bottom of the frame and
  the next column's starts at its top; pycocotools compresses all masks' counts in one call (`frPyObjects`);
- on a CPU (`chunks_to_rle`) pycocotools encodes a chunk of masks per call, from one column-major array: its C
  loop over the pixels is quicker there than the tensor passes above (`benchmarks/mask_rle.py`).

Both equal `pycocotools.mask.encode` of each mask pasted into the frame (tested).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where masks are encoded: `fpn render` decodes them (rle_columns) without it
    from torch import Tensor

__all__ = ["encode_masks", "chunks_to_rle", "runs_to_rle"]

CHUNK = 16  # masks encoded at once


def encode_masks(masks: Tensor, *, x0: int, y0: int, height: int, width: int) -> list[dict]:
    """COCO RLEs (`{"size": [h, w], "counts": str}`) of boolean `masks` `[N, th, tw]` whose top-left pixel sits at
    (`x0`, `y0`) of a `height` x `width` frame (the masks lie inside it). On a GPU the runs are found there and
    only their boundaries copied (`runs_to_rle`); on a CPU pycocotools encodes a chunk of masks per call
    (`chunks_to_rle`), which is quicker there."""
    n, th, tw = masks.shape
    if not (0 <= x0 and 0 <= y0 and x0 + tw <= width and y0 + th <= height):
        raise ValueError(f"masks of {th}x{tw} at ({x0}, {y0}) do not fit a {height}x{width} frame")
    if n == 0:
        return []
    encode = runs_to_rle if masks.device.type != "cpu" else chunks_to_rle
    return encode(masks, x0=x0, y0=y0, height=height, width=width)


def chunks_to_rle(masks: Tensor, *, x0: int, y0: int, height: int, width: int) -> list[dict]:
    """`encode_masks` by pycocotools, `CHUNK` masks per call: pasted into one column-major frame-sized array
    (the masks' own memory, transposed, when they fill the frame)."""
    from pycocotools import mask as mask_utils

    n, th, tw = masks.shape
    m = masks.numpy().view(np.uint8)
    rles = []
    for k in range(0, n, CHUNK):
        part = m[k:k + CHUNK]
        if (th, tw) == (height, width):
            frames = np.asfortranarray(part.transpose(1, 2, 0))
        else:
            frames = np.zeros((height, width, len(part)), np.uint8, order="F")
            frames[y0:y0 + th, x0:x0 + tw] = part.transpose(1, 2, 0)
        rles += mask_utils.encode(frames)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def runs_to_rle(masks: Tensor, *, x0: int, y0: int, height: int, width: int) -> list[dict]:
    """`encode_masks` from run boundaries: found where the masks are, for `CHUNK` masks at a time; only the
    boundaries are copied to the host (the module docstring)."""
    from pycocotools import mask as mask_utils

    import torch

    n = len(masks)
    found, signs = [], []
    for k in range(0, n, CHUNK):  # a chunk's working copies: 3 bytes a pixel per mask
        columns = torch.nn.functional.pad(masks[k:k + CHUNK].transpose(1, 2).to(torch.int8), (1, 1))  # column-major
        step = columns[..., 1:] - columns[..., :-1]  # +1 where a run starts, -1 one past where it ends
        at = step.nonzero()  # (mask, column, row), in that order
        signs.append(step[at[:, 0], at[:, 1], at[:, 2]].cpu().numpy())
        found.append(at.cpu().numpy() + [k, 0, 0])
    found, signs = np.concatenate(found), np.concatenate(signs)
    starts = found[signs == 1]
    ends = found[signs == -1, 2]  # the same runs' ends, in the same order (each column's runs close in it)
    mask_of = starts[:, 0]
    base = (x0 + starts[:, 1]).astype(np.int64) * height + y0
    first, last = base + starts[:, 2], base + ends  # frame positions, column-major: [first, last)
    # a run reaching the frame's bottom continues in the next column when that one's run starts at the top
    if len(first):
        joined = (mask_of[1:] == mask_of[:-1]) & (last[:-1] == first[1:])
        first, last, mask_of = first[np.r_[True, ~joined]], last[np.r_[~joined, True]], mask_of[np.r_[True, ~joined]]
    bounds = np.stack([first, last], 1).ravel()  # run k of a mask: zeros up to first_k, ones up to last_k
    per_mask = np.split(bounds, 2 * np.searchsorted(mask_of, np.arange(1, n)))
    total = height * width
    # zeros up to the first run, then each run and the zeros after it (none after a run that ends the frame)
    counts = [np.diff(b, prepend=0, append=[] if len(b) and b[-1] == total else total).tolist() for b in per_mask]
    rles = mask_utils.frPyObjects([{"size": [height, width], "counts": c} for c in counts], height, width)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def rle_columns(counts: str, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels a COCO RLE (compressed `counts` of a mask `height` rows tall) covers, as runs within columns:
    (column, first row, row past the last), one entry per column a run touches.

    Written by hand: pycocotools decodes a mask only into an array of the whole frame's size, and a raster's masks
    span the whole raster (10^8 pixels and more each), of which a picture shows a region."""
    runs, value, k = [], 0, 0
    for ch in counts:  # pycocotools' rleFrString: 5 bits a character, the 6th set while more follow
        c = ord(ch) - 48
        value |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:
            continue
        if c & 0x10:
            value |= -1 << (5 * k)
        if len(runs) > 2:
            value += runs[-2]  # from the third on, a run is stored as its difference from the one two before
        runs.append(value)
        value, k = 0, 0
    ends = np.cumsum(runs, dtype=np.int64)
    first, last = ends[0::2][:len(ends) // 2], ends[1::2]  # zeros first, then ones, zeros, ...
    if not len(first):
        return (np.empty(0, np.int64),) * 3
    col0, col1 = first // height, (last - 1) // height
    n = col1 - col0 + 1  # a run down to a column's bottom goes on at the next column's top
    cols = np.repeat(col0, n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    top = np.maximum(np.repeat(first, n), cols * height) - cols * height
    bottom = np.minimum(np.repeat(last, n), (cols + 1) * height) - cols * height
    return cols, top, bottom
