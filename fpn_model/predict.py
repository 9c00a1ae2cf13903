"""Batched inference on uint8 frames, with tiling, on the model's device.

`Predictor` is what the pipeline's detector actors and `fpn eval` call: it takes uint8 HWC frames,
moves them to the device as uint8, converts and normalises there, cuts large frames into tiles,
runs the tiles of all frames of the batch through the model, one forward pass per image shape (at most
`max_batch` images each: a frame's detections do not depend on its batch mates), and maps detections back
to frame pixels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .tiling import merge_detections, plan_tiles

__all__ = ["Predictor", "TileConfig", "Detections"]


@dataclass(frozen=True)
class TileConfig:
    """Sliced inference for frames larger than `size` on either side."""

    size: int = 1024
    overlap: int = 128
    merge: str = "nms"  # nms | nmm
    metric: str = "ios"  # iou | ios
    threshold: float = 0.5

    def __post_init__(self) -> None:
        plan_tiles(self.size, self.size, self.size, self.overlap)  # validates size/overlap
        if self.merge not in ("nms", "nmm"):
            raise ValueError(f"tile merge must be nms or nmm, got {self.merge!r}")
        if self.metric not in ("iou", "ios"):
            raise ValueError(f"tile metric must be iou or ios, got {self.metric!r}")


@dataclass
class Detections:
    """Detections of one frame, in frame pixels (numpy, on the host)."""

    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int32
    levels: np.ndarray  # [N] int8
    masks: list | None = None  # COCO RLE dicts, Mask R-CNN only


class Predictor:
    """Run `model` on batches of uint8 frames.

    Args:
        model: a detector from `build_detector`/`load_checkpoint` (moved to `device`, eval mode).
        device: where the model lives; frames are converted to float there.
        tile: sliced inference settings, or None to feed frames whole.
        amp: autocast dtype on CUDA (torch.bfloat16 / torch.float16), or None.
        max_batch: most images (tiles) per forward pass.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", tile: TileConfig | None = None,
                 amp: torch.dtype | None = None, channels_last: bool = False, max_batch: int = 16):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.tile = tile
        self.amp = amp if self.device.type == "cuda" else None
        self.max_batch = max_batch
        self.has_masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray] | np.ndarray) -> list[Detections]:
        """`frames`: `[B, H, W, 3]` uint8 array, or a list of `[H, W, 3]` arrays of any sizes."""
        images: list[Tensor] = []
        owners: list[tuple[int, int, int]] = []  # (frame index, x offset, y offset) per image
        for f, frame in enumerate(frames):
            t = torch.as_tensor(np.ascontiguousarray(frame)).to(self.device, non_blocking=True)
            t = t.permute(2, 0, 1).float().div_(255)
            h, w = t.shape[-2:]
            if self.tile is None or (h <= self.tile.size and w <= self.tile.size):
                images.append(t)
                owners.append((f, 0, 0))
                continue
            for x0, y0, x1, y1 in plan_tiles(h, w, self.tile.size, self.tile.overlap):
                images.append(t[:, y0:y1, x0:x1])
                owners.append((f, x0, y0))
        # one shape per forward pass: the model pads a batch to its largest image, and padding changes what
        # normalisation sees (GroupNorm statistics), so a frame's detections would depend on its batch mates
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        outputs: list[dict[str, Tensor]] = [{}] * len(images)
        with self._autocast():
            for members in by_shape.values():
                for k in range(0, len(members), self.max_batch):
                    chunk = members[k:k + self.max_batch]
                    for i, out in zip(chunk, self.model([images[i] for i in chunk])):
                        outputs[i] = out
        return self._collect(len(frames), owners, outputs, [tuple(np.shape(fr)[:2]) for fr in frames])

    def _collect(self, n: int, owners, outputs, sizes) -> list[Detections]:
        per_frame: list[list[tuple[dict[str, Tensor], int, int]]] = [[] for _ in range(n)]
        for (f, x0, y0), out in zip(owners, outputs):
            per_frame[f].append((out, x0, y0))
        result = []
        for parts, (h, w) in zip(per_frame, sizes):
            shift = lambda o, x, y: o["boxes"].float() + torch.tensor([x, y, x, y], device=o["boxes"].device, dtype=torch.float32)
            boxes = torch.cat([shift(o, x, y) for o, x, y in parts])
            scores = torch.cat([o["scores"].float() for o, _, _ in parts])
            labels = torch.cat([o["labels"] for o, _, _ in parts])
            levels = torch.cat([o["levels"] for o, _, _ in parts])
            masks = self._masks(parts, h, w) if self.has_masks else None
            if len(parts) > 1:
                keep, boxes = merge_detections(boxes, scores, labels, threshold=self.tile.threshold,
                                               method=self.tile.merge, metric=self.tile.metric)
                scores, labels, levels = scores[keep], labels[keep], levels[keep]
                if masks is not None:
                    masks = [masks[i] for i in keep.tolist()]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            result.append(Detections(
                boxes.cpu().numpy().astype(np.float32), scores.cpu().numpy().astype(np.float32),
                labels.cpu().numpy().astype(np.int32), levels.cpu().numpy().astype(np.int8), masks,
            ))
        return result

    @staticmethod
    def _masks(parts, h: int, w: int) -> list[dict]:
        """COCO RLE of each detection's mask (threshold 0.5) in frame pixels."""
        from pycocotools import mask as mask_utils

        rles = []
        for o, x0, y0 in parts:
            m = (o["masks"][:, 0] > 0.5).cpu().numpy()
            for single in m:
                full = np.zeros((h, w), dtype=np.uint8, order="F")
                th, tw = single.shape
                full[y0:y0 + th, x0:x0 + tw] = single
                rle = mask_utils.encode(full)
                rle["counts"] = rle["counts"].decode("ascii")
                rles.append(rle)
        return rles
