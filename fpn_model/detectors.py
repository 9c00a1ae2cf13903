"""Detector builders: Faster R-CNN, RetinaNet and Mask R-CNN on any backbone x neck.

`build_detector(cfg)` is the one place that reads a `ModelConfig`: backbone -> neck -> torchvision
heads (RPN, RoI heads, RetinaNet head, mask head), anchor generator and RoI pooler.

In eval mode the models return torchvision's per-image dicts (`boxes` `[N, 4]` in input-image
pixels, `scores`, `labels`, `masks` for Mask R-CNN) plus `levels` `[N]`: the pyramid level that
produced each box (RetinaNet: the level of its anchor; R-CNNs: the level its box pools from,
`assign_levels`).
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import boxes as box_ops

from .backbone import build_backbone, group_norm, level_names, norm_layer
from .config import ModelConfig
from .fpn import build_neck
from .levels import PyramidRoIAlign, assign_levels
from .selection import batched_nms_many, select_rows

__all__ = ["BackboneWithNeck", "build_detector", "count_parameters"]


class BackboneWithNeck(nn.Module):
    """Bottom-up pathway + neck: `[B, 3, H, W]` -> `{"p2": [B, d, H/4, W/4], ...}`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.body = build_backbone(cfg)
        self.neck = build_neck(cfg, self.body.channels, self.body.names)
        self.out_channels = cfg.out_channels
        self.names = level_names("p", cfg.levels)
        self.strides = [2 ** level for level in cfg.levels]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.neck(self.body(x))


class FPNTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform with an optional fixed resize factor and level tagging.

    `scale=None` keeps torchvision's rule (shorter side to `min_size`); `scale=1.0` runs at native
    resolution, `2.0` upsamples (for tiny objects). Before boxes are mapped back to the original
    image, R-CNN detections get their pyramid `levels` (assignment needs input-image sizes).
    """

    def __init__(self, cfg: ModelConfig, roi_levels: tuple[int, ...] | None):
        super().__init__(cfg.min_size, cfg.max_size, list(cfg.image_mean), list(cfg.image_std))
        self.scale = cfg.scale
        self.roi_levels = roi_levels
        self._stats: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}  # (mean, std) as tensors

    def forward(self, images, targets=None):
        """torchvision's transform; a `[B, 3, H, W]` batch at inference is normalised, resized and padded in one
        operation each (torchvision loops over the images: a dozen small kernels per image on a GPU). The same
        operations on each image, so the same values."""
        if not (isinstance(images, Tensor) and images.dim() == 4 and targets is None and not self.training):
            return super().forward(images, targets)
        x = self._normalized(images)
        h, w = x.shape[-2:]
        factor = self.scale if self.scale is not None else \
            min(float(self.min_size[-1]) / min(h, w), float(self.max_size) / max(h, w))
        if self.scale != 1.0:  # torchvision's rule resizes even at factor 1 (an identity)
            x = torch.nn.functional.interpolate(x, scale_factor=factor, mode="bilinear",
                                                recompute_scale_factor=True, align_corners=False)
        h, w = x.shape[-2:]
        stride = self.size_divisible
        pad_h, pad_w = -h % stride, -w % stride
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h))
        return ImageList(x, [(h, w)] * len(x)), None

    def _normalized(self, images: Tensor) -> Tensor:
        """torchvision's `normalize`, over a batch, with its mean and std made as tensors once per dtype and device,
        not at every call: on a GPU each is a copy that waits for it."""
        if not images.is_floating_point():
            return self.normalize(images)  # torchvision's TypeError
        key = (images.dtype, images.device)
        if key not in self._stats:
            mean, std = (torch.as_tensor(v, dtype=images.dtype, device=images.device)[:, None, None]
                         for v in (self.image_mean, self.image_std))
            self._stats[key] = (mean, std)
        mean, std = self._stats[key]
        return (images - mean) / std

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None):
        if self.scale is None:
            return super().resize(image, target)
        if self.scale == 1.0:
            return image, target
        h, w = image.shape[-2:]
        image = torch.nn.functional.interpolate(
            image[None], scale_factor=self.scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
        )[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "masks" in target:
                target["masks"] = torch.nn.functional.interpolate(
                    target["masks"][:, None].float(), size=image.shape[-2:]
                )[:, 0].byte()
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        """torchvision's: detections back to each image's original size (R-CNN detections tagged with their levels
        first). Its `resize_boxes` makes the two ratios device tensors from Python numbers: four copies to the
        device per image, and on a GPU each waits for it (64 waits for a batch of 16). Here the ratios are Python
        numbers of the same value (float32 division, rounded to the boxes' dtype as the device would round
        them), so the same boxes."""
        if self.training:
            return result
        for r, size, original in zip(result, image_shapes, original_image_sizes):
            if self.roi_levels is not None and "levels" not in r:
                r["levels"] = assign_levels(r["boxes"], self.roi_levels[0], self.roi_levels[-1])
            r["boxes"] = _resized(r["boxes"], size, original)
            if "masks" in r:
                r["masks"] = paste_masks_in_image(r["masks"], r["boxes"], original)
        return result


def _resized(boxes: Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """torchvision's `resize_boxes(boxes, size, new_size)` with its ratios as Python numbers (see
    `FPNTransform.postprocess`)."""
    ratio_h, ratio_w = (_scalar(np.float32(n) / np.float32(o), boxes.dtype) for n, o in zip(new_size, size))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


class FPNRetinaNet(RetinaNet):
    """torchvision's RetinaNet that also reports the pyramid level of each detection.

    `postprocess_detections` is torchvision's, with the level of each kept anchor carried along (torchvision drops
    it when it concatenates the levels), and the candidates above the score threshold chosen for all images at once,
    level by level (`select_rows`: on a GPU two waits for the device per level, where torchvision's loop takes two
    per image and level); the per-image NMS calls run on `executor` when the fast path gives one
    (fpn_model.predict.fast_path). The same candidates in the same order, so the same detections.
    """

    pyramid_levels: tuple[int, ...] = ()
    executor: ThreadPoolExecutor | None = None

    def postprocess_detections(self, head_outputs, anchors, image_shapes):
        cls_logits, regressions = head_outputs["cls_logits"], head_outputs["bbox_regression"]  # per level [n, A, *]
        n, num_classes = len(image_shapes), cls_logits[0].shape[-1]
        per_level = []  # for each level, each image's (scores, indices) above the threshold
        for logits in cls_logits:
            scores = torch.sigmoid(logits).reshape(-1)
            per_level.append(select_rows(scores > self.score_thresh, [logits[0].numel()] * n, scores, positions=True))
        top = [[None] * len(self.pyramid_levels) for _ in image_shapes]  # [image][level]: (scores, indices, boxes)
        for j in range(len(self.pyramid_levels)):
            chosen = []
            for i in range(n):
                level_scores, topk_idxs = per_level[j][i]
                level_scores, idxs = level_scores.topk(min(self.topk_candidates, len(topk_idxs)))
                chosen.append((level_scores, topk_idxs[idxs]))
            anchor_idxs = [torch.div(t, num_classes, rounding_mode="floor") for _, t in chosen]
            # the level's boxes of all images decoded at once (row by row, so as image by image): torchvision's
            # decode_single makes two tensors of its 0.5 on the device, each a wait on a GPU
            decoded = self.box_coder.decode_single(torch.cat([regressions[j][i][a] for i, a in enumerate(anchor_idxs)]),
                                                   torch.cat([anchors[i][j][a] for i, a in enumerate(anchor_idxs)]))
            for i, (c, boxes) in enumerate(zip(chosen, decoded.split([len(a) for a in anchor_idxs]))):
                top[i][j] = (*c, boxes)
        jobs, levels = [], []
        for per_image, image_shape in zip(top, image_shapes):
            jobs.append((torch.cat([box_ops.clip_boxes_to_image(b, image_shape) for _, _, b in per_image]),
                         torch.cat([s for s, _, _ in per_image]), torch.cat([t % num_classes for _, t, _ in per_image]),
                         self.nms_thresh))
            levels.append(torch.cat([torch.full_like(t, lv) for (_, t, _), lv in zip(per_image, self.pyramid_levels)]))
        detections = []
        for (boxes, scores, labels, _), lvl, keep in zip(jobs, levels, batched_nms_many(jobs, self.executor)):
            keep = keep[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                               "levels": lvl[keep]})
        return detections


def _anchors(cfg: ModelConfig) -> AnchorGenerator:
    return AnchorGenerator(cfg.anchor_sizes, (tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))


def _head_norm(cfg: ModelConfig) -> Any:
    """Normalisation of the v2 heads: the neck's choice, else BatchNorm as torchvision's v2 models."""
    return norm_layer(cfg.neck_norm) or nn.BatchNorm2d


def _rcnn_kwargs(cfg: ModelConfig, backbone: BackboneWithNeck) -> dict[str, Any]:
    anchors = _anchors(cfg)
    d = cfg.out_channels
    roi_names = level_names("p", cfg.roi_levels)
    dim = cfg.box_head_dim
    kwargs: dict[str, Any] = dict(
        box_head=TwoMLPHead(d * 7 * 7, dim),
        box_predictor=FastRCNNPredictor(dim, cfg.num_classes),
        rpn_anchor_generator=anchors,
        box_roi_pool=PyramidRoIAlign(featmap_names=roi_names, output_size=7, sampling_ratio=2),
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        box_detections_per_img=cfg.detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_score_thresh=cfg.rpn_score_thresh,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
    )
    if cfg.head_style == "v2":
        kwargs["rpn_head"] = RPNHead(d, anchors.num_anchors_per_location()[0], conv_depth=2)
        kwargs["box_head"] = FastRCNNConvFCHead((d, 7, 7), [256, 256, 256, 256], [dim], norm_layer=_head_norm(cfg))
    if cfg.arch == "mask_rcnn":
        kwargs["mask_roi_pool"] = PyramidRoIAlign(featmap_names=roi_names, output_size=14, sampling_ratio=2)
        kwargs["mask_predictor"] = MaskRCNNPredictor(256, 256, cfg.num_classes)
        if cfg.head_style == "v2":
            kwargs["mask_head"] = MaskRCNNHeads(d, [256, 256, 256, 256], 1, norm_layer=_head_norm(cfg))
    return kwargs


def build_detector(cfg: ModelConfig) -> nn.Module:
    """Faster R-CNN, RetinaNet or Mask R-CNN for `cfg` (random initialisation)."""
    backbone = BackboneWithNeck(cfg)
    if cfg.arch == "retinanet":
        anchors = _anchors(cfg)
        head_norm = partial(nn.GroupNorm, 32) if cfg.head_style == "v2" and cfg.neck_norm != "gn" else None
        if cfg.neck_norm == "gn":
            head_norm = group_norm
        head = RetinaNetHead(cfg.out_channels, anchors.num_anchors_per_location()[0], cfg.num_classes,
                             norm_layer=head_norm)
        if cfg.giou_loss or cfg.head_style == "v2":
            head.regression_head._loss_type = "giou"
        model: nn.Module = FPNRetinaNet(
            backbone, cfg.num_classes, anchor_generator=anchors, head=head, score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
        )
        model.pyramid_levels = cfg.levels
        roi_levels = None
    else:
        cls = MaskRCNN if cfg.arch == "mask_rcnn" else FasterRCNN
        model = cls(backbone, **_rcnn_kwargs(cfg, backbone))
        roi_levels = cfg.roi_levels
    model.transform = FPNTransform(cfg, roi_levels)
    model.config = cfg
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _scalar(x: np.float32, dtype: torch.dtype) -> float:
    """`x` as a Python number with the value a float32 device tensor holding it has in `dtype`'s arithmetic
    (rounded to half precision; float32 and float64 keep it)."""
    return float(x) if dtype in (torch.float32, torch.float64) else torch.tensor(float(x)).to(dtype).item()
