"""Batched inference on uint8 frames, with tiling, on the model's device.

`Predictor` is what the pipeline's detector actors and `fpn eval` call: it takes uint8 HWC frames,
moves them to the device as uint8, converts and normalises there, cuts large frames into tiles,
runs the tiles of all frames of the batch through the model, one forward pass per image shape (at most
`max_batch` images each: a frame's detections do not depend on its batch mates), and maps detections back
to frame pixels.

A torchvision-style detector runs the exact fast path by default (`fast_path`: RPN boxes decoded after the
top-n choice, the small and low-scoring boxes of the RPN and the candidates of the RoI heads chosen for the whole
batch at once instead of image by image; on a CPU also channels_last convolutions, the NMS and RoIAlign calls
spread over torch's threads, and `keep_freed_memory`: malloc reuses freed memory instead of page-faulting it in
again): the same detections as torchvision's eager forward within float rounding, on a CPU 1.5-1.9x as fast
(benchmarks/forward_speed.py). Approximate
paths are opt-in (`precision`: int8 dynamic quantisation of the Linear layers, or bf16 autocast), and so is
`compile` (torch.compile of the convolutional parts: a long first call per input shape).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format

from .config import PRECISIONS, TileConfig, check_precision
from .memory import keep_freed_memory
from .rle import encode_masks
from .selection import batched_nms_many, clip_batch, run_all, select_rows
from .tiling import merge_detections, plan_tiles

__all__ = ["Predictor", "TileConfig", "Detections", "ModelOutputError", "PRECISIONS", "OOM_ERRORS", "fast_path",
           "batched_nms_many", "detection_difference", "quantize_linear", "bf16_features", "compile_convolutions",
           "is_detector", "keep_freed_memory", "fold_norms"]


log = logging.getLogger(__name__)
OOM_ERRORS = (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError)  # the same class in recent torch


@dataclass
class Detections:
    """Detections of one frame, in frame pixels (numpy, on the host)."""

    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2
    scores: np.ndarray  # [N] float32
    labels: np.ndarray  # [N] int32
    levels: np.ndarray  # [N] int8
    masks: list | None = None  # COCO RLE dicts, Mask R-CNN only


class ModelOutputError(ValueError):
    """A model's output that breaks the detector contract (a list of one dict per image: boxes `[N, 4]` finite with
    x2 >= x1 and y2 >= y1, scores `[N]` in [0, 1], integer labels `[N]` in 0..num_classes - 1, levels `[N]`), named
    with the model. Raised for the whole call, so that a job's detector retries its frames one by one and only the
    frames the model gets wrong become error rows, instead of rows of whatever it returned."""


# -- the exact fast path -------------------------------------------------------------------------------
# Each piece computes what torchvision's eager forward computes, in a faster order or layout: the same
# detections within float rounding (tests/test_model.py checks 1e-4 on real frames).
#
# - channels_last (NHWC) weights, so every convolution (backbone, neck, RPN and RetinaNet heads) runs oneDNN's
#   NHWC kernels: about 2x faster on a CPU than NCHW, max pooling more still.
# - The RPN picks its top-n anchors per level before decoding, so only those boxes are decoded (torchvision
#   decodes every anchor and then discards most).
# - The NMS of every (image, pyramid level) of the RPN, and the RoIAlign of every level's RoIs (in chunks), run
#   on a pool of as many threads as torch has: both are single-threaded C++ that releases the GIL, and each call
#   (each RoI) is computed alone, so the results are the very same. RoIAlign reads NCHW: a level is made
#   contiguous once, not once per call.
# - GroupNorm on channels_last input with sums as precise as the NCHW kernel's (_ChannelsLastGroupNorm).
# The copy of the model that Predictor prepares is changed; training code never sees these classes.


class _Pool(ThreadPoolExecutor):
    """The thread pool of a prepared model's RPN and poolers; a copy of the model shares it."""

    def __deepcopy__(self, memo):
        return self


class FastRPN(RegionProposalNetwork):
    """torchvision's RPN at inference: top-n anchors per level chosen before decoding, the small and low-scoring
    boxes of all images dropped at once (`select_rows`), the NMS of all images and levels on `executor`. Training runs
    torchvision's forward unchanged."""

    executor: ThreadPoolExecutor | None = None

    def forward(self, images, features, targets=None):
        if self.training:
            return super().forward(images, features, targets)
        features = list(features.values())
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness = objectness.reshape(num_images, -1)
        deltas = deltas.reshape(num_images, -1, 4)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=objectness.device)
                            for i, n in enumerate(num_anchors_per_level)])
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=objectness.device)[:, None]
        objectness = objectness[batch_idx, top_n_idx]
        levels = levels[top_n_idx]
        chosen = [a[i] for a, i in zip(anchors, top_n_idx)]
        proposals = self.box_coder.decode(deltas[batch_idx, top_n_idx].reshape(-1, 4), chosen).view(num_images, -1, 4)
        probs = torch.sigmoid(objectness)
        boxes = clip_batch(proposals, images.image_sizes)
        # torchvision's remove_small_boxes, then its score threshold (>=)
        keep = (boxes[..., 2] - boxes[..., 0] >= self.min_size) & (boxes[..., 3] - boxes[..., 1] >= self.min_size) \
            & (probs >= self.score_thresh)
        kept = [(*rows, self.nms_thresh) for rows in select_rows(keep.view(-1), [probs.shape[1]] * num_images,
                                                             boxes.view(-1, 4), probs.view(-1), levels.view(-1))]
        final = []
        for (boxes, _, _, _), keep in zip(kept, batched_nms_many(kept, self.executor)):
            final.append(boxes[keep[: self.post_nms_top_n()]])
        return final, {}


class FastRoIHeads(RoIHeads):
    """torchvision's RoI heads, their inference post-processing over the whole batch: boxes clipped and candidates
    chosen (score above the threshold, not empty) for all images at once (`select_rows`), the per-image NMS on
    `executor`. The same candidates in the same order as torchvision's loop over images, so the same detections."""

    executor: ThreadPoolExecutor | None = None

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        num_classes = class_logits.shape[-1]
        per_image = [len(p) for p in proposals]
        boxes = self.box_coder.decode(box_regression, proposals).reshape(len(class_logits), num_classes, 4)
        scores = F.softmax(class_logits, -1)
        boxes = clip_batch(boxes, image_shapes, per_image)
        labels = torch.arange(1, num_classes, device=class_logits.device).expand(len(boxes), -1)
        boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)  # background dropped
        # torchvision's score threshold (>), then its remove_small_boxes(min_size=1e-2)
        keep = (scores > self.score_thresh) & (boxes[:, 2] - boxes[:, 0] >= 1e-2) & (boxes[:, 3] - boxes[:, 1] >= 1e-2)
        chosen = select_rows(keep, [n * (num_classes - 1) for n in per_image], boxes, scores, labels.reshape(-1))
        out: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for (b, s, lab), k in zip(chosen, batched_nms_many([(*c, self.nms_thresh) for c in chosen], self.executor)):
            k = k[: self.detections_per_img]
            for acc, t in zip(out, (b, s, lab)):
                acc.append(t[k])
        return out


class _FastRoIAlign:
    """Mixed into a MultiScaleRoIAlign (PyramidRoIAlign included): each level's RoIs in chunks on `executor`. The
    first call goes through the pooler's own forward, which sets its scales and level mapper."""

    executor: ThreadPoolExecutor | None = None
    _ready = False

    def forward(self, x, boxes, image_shapes):
        if not self._ready or self.executor is None or torchvision._is_tracing():
            self._ready = True
            return super().forward(x, boxes, image_shapes)
        feats = [v.contiguous() for k, v in x.items() if k in self.featmap_names]
        rois = _convert_to_roi_format(boxes)
        if len(feats) == 1:
            parts = [(feats[0], self.scales[0], torch.arange(len(rois), device=rois.device))]
        else:
            levels = self.map_levels(boxes)
            parts = [(f, s, torch.where(levels == i)[0]) for i, (f, s) in enumerate(zip(feats, self.scales))]
        chunks = max(1, self.executor._max_workers)
        calls, where = [], []
        for feat, scale, idx in parts:
            for piece in idx.tensor_split(chunks if len(idx) >= 16 * chunks else 1):
                if len(piece):
                    calls.append(partial(roi_align, feat, rois[piece], self.output_size, scale, self.sampling_ratio))
                    where.append(piece)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for piece, pooled in zip(where, run_all(self.executor, calls)):
            out[piece] = pooled.to(out.dtype)
        return out


_FAST_POOLERS: dict[type, type] = {}


class _ChannelsLastGroupNorm(nn.GroupNorm):
    """GroupNorm of a channels_last float32 input with NCHW's precision. PyTorch's channels_last GroupNorm kernel
    sums x and x^2 in plain float32 loops over whole groups: 30x the rounding error of its NCHW kernel, enough to
    move scores by 6e-5. Here the per-channel sums are torch.sum's (cascaded), combined per group in float64, and
    applied as one scale and shift per channel: about twice the native kernel's time, half of a round trip
    through NCHW (which a group whose mean dwarfs its spread still takes)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.dtype != torch.float32 or not x.is_contiguous(memory_format=torch.channels_last) \
                or x.is_contiguous():
            return super().forward(x)
        n, c, h, w = x.shape
        g = self.num_groups
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: channels_last memory is NHWC
        s1 = rows.sum(1).double().view(n, g, c // g).sum(2)
        s2 = rows.square().sum(1).double().view(n, g, c // g).sum(2)
        count = h * w * (c // g)
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp_min(0)
        if bool((mean * mean > 100 * var).any()):  # E[x^2] - E[x]^2 would cancel away digits: NCHW's kernel
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        rstd = (var + self.eps).rsqrt()
        scale = rstd.repeat_interleave(c // g, 1)
        shift = -mean.repeat_interleave(c // g, 1) * scale
        if self.affine:
            scale = scale * self.weight.double()
            shift = shift * self.weight.double() + self.bias.double()
        return torch.addcmul(shift.float()[:, :, None, None], x, scale.float()[:, :, None, None])


def fold_norms(model: nn.Module) -> int:
    """Fold every frozen batch norm (torchvision's `FrozenBatchNorm2d`, or `BatchNorm2d` in eval mode) into the
    convolution it follows, in place: `conv` then `norm` is one convolution with weights `w * s` and bias
    `b * s + t` (`s`, `t` the norm's scale and shift, computed in float64). The same function within float
    rounding, one pass over each activation fewer: the norm's multiply and add (two kernels, and under
    autocast a float32 result the next convolution casts back; torchvision's own detectors carry frozen norms).
    Pairs are a convolution and a norm side by side in a module that runs its children in order (Sequential,
    IntermediateLayerGetter) or a residual block's `convK` / `bnK`. Returns how many were folded.

    Predictor folds on GPUs (backbone+neck of torchvision's R50-FPN, 16 frames of 800 px on an H200: see
    benchmarks/gpu.py) and for the CPU's approximate precisions (torchvision's MobileNetV3 FPN, 4 street frames at
    512 px, 2 threads: int8 0.89x the time, bf16 0.85x; of 2,139 confident exact detections in 40 frames int8 kept
    2,033 folded against 2,029 unfolded, bf16 161 against 166). On a CPU's exact path the detections moved up to
    2e-4 of a coordinate with it (5% faster; the exact path promises 1e-4), so there it is not done."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.ops.misc import FrozenBatchNorm2d

    def frozen(norm) -> bool:
        return type(norm) is FrozenBatchNorm2d or (type(norm) is nn.BatchNorm2d and not norm.training
                                                   and norm.track_running_stats)

    folded = 0
    for parent in list(model.modules()):
        if isinstance(parent, (nn.Sequential, IntermediateLayerGetter)):
            kids = list(parent.named_children())
            pairs = [(a, b) for (a, _), (b, _) in zip(kids, kids[1:])]
        elif isinstance(parent, (BasicBlock, Bottleneck)):
            pairs = [(f"conv{k}", f"bn{k}") for k in (1, 2, 3) if hasattr(parent, f"bn{k}")]
        else:
            continue
        for a, b in pairs:
            conv, norm = getattr(parent, a), getattr(parent, b)
            if type(conv) is not nn.Conv2d or not frozen(norm) or norm.weight.numel() != conv.out_channels:
                continue
            with torch.no_grad():
                scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
                shift = norm.bias.double() - norm.running_mean.double() * scale
                if conv.bias is not None:
                    shift = shift + conv.bias.double() * scale
                w = conv.weight
                conv.weight = nn.Parameter((w.double() * scale[:, None, None, None]).to(w.dtype),
                                           requires_grad=False)
                conv.bias = nn.Parameter(shift.to(w.dtype), requires_grad=False)
            setattr(parent, b, nn.Identity())
            folded += 1
    return folded


def fast_path(model: nn.Module, executor: ThreadPoolExecutor | None, *, channels_last: bool = True) -> nn.Module:
    """`model` (a torchvision-style detector, changed in place) on the exact fast path: channels_last weights (if
    asked), and the RPN, RoI heads and RoI poolers above with `executor` (None: everything in the calling
    thread)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        for m in model.modules():
            if type(m) is nn.GroupNorm and on_cpu:  # the CPU kernel's rounding (above)
                m.__class__ = _ChannelsLastGroupNorm
    rpn = getattr(model, "rpn", None)
    if type(rpn) is RegionProposalNetwork:
        rpn.__class__ = FastRPN
        rpn.executor = executor
    heads = getattr(model, "roi_heads", None)
    if type(heads) is RoIHeads:
        heads.__class__ = FastRoIHeads
        heads.executor = executor
    if isinstance(model, RetinaNet) and hasattr(model, "executor"):  # FPNRetinaNet: its per-image NMS calls
        model.executor = executor
    for m in model.modules():
        if isinstance(m, MultiScaleRoIAlign):
            if not isinstance(m, _FastRoIAlign):
                base = type(m)
                m.__class__ = _FAST_POOLERS.setdefault(base, type(f"Fast{base.__name__}", (_FastRoIAlign, base), {}))
            m.executor = executor
    return model


# -- opt-in: approximate precisions, compilation -----------------------------------------------------------------
def quantize_linear(model: nn.Module) -> nn.Module:
    """`model` with its Linear layers (the R-CNN box head and predictor) dynamically quantised to int8: weights
    int8 per tensor, activations quantised per batch. Approximate: `fpn eval` tells what it costs in AP."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao, not yet removed
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


class _Autocast(nn.Module):
    """Runs `inner` under CPU bfloat16 autocast and hands float32 tensors on, so everything after it (box decoding,
    NMS, coordinates) stays float32."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.inner(*args, **kwargs)
        return _to_float(out)


def _to_float(out):
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, dict):
        return type(out)((k, _to_float(v)) for k, v in out.items())
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(v) for v in out)
    return out


def bf16_features(model: nn.Module) -> nn.Module:
    """`model` with its feature computation (backbone and neck, RPN head, R-CNN box head) in bfloat16 autocast;
    the box predictor, decoding and NMS stay float32. Approximate."""
    model.backbone = _Autocast(model.backbone)
    if hasattr(model, "rpn"):
        model.rpn.head = _Autocast(model.rpn.head)
        model.roi_heads.box_head = _Autocast(model.roi_heads.box_head)
    elif hasattr(model, "head"):
        model.head = _Autocast(model.head)
    return model


def compile_convolutions(model: nn.Module) -> nn.Module:
    """`model` with its backbone (and neck) and RPN head compiled by torch.compile (inductor). Each new input
    shape compiles on its first call; compiled code is cached on disk by inductor (`TORCHINDUCTOR_CACHE_DIR`)."""
    model.backbone = torch.compile(model.backbone)
    if hasattr(model, "rpn"):
        model.rpn.head = torch.compile(model.rpn.head)
    return model


def is_detector(model: nn.Module) -> bool:
    """Whether `model` is a torchvision detector (ours are), which the fast path and precisions know."""
    return isinstance(model, (GeneralizedRCNN, RetinaNet))


def detection_difference(a: Detections, b: Detections) -> dict:
    """How far two detection sets of one frame are apart, order aside (near-equal scores may swap places): each
    detection is paired with the nearest detection of its label in the other set (largest coordinate difference);
    `box` is the largest such distance in pixels, `box_rel` the largest coordinate difference relative to the
    coordinate (at least 1 px), `score` the largest score difference of a pair, all both ways; `count`: the two
    sizes. A detection with no partner of its label makes them infinite."""
    box = box_rel = score = 0.0
    for x, y in ((a, b), (b, a)):
        for label in np.unique(x.labels):
            mine, theirs = x.labels == label, y.labels == label
            if not theirs.any():
                return {"box": float("inf"), "box_rel": float("inf"), "score": float("inf"),
                        "count": (len(a.boxes), len(b.boxes))}
            dist = np.abs(x.boxes[mine][:, None, :] - y.boxes[theirs][None, :, :]).max(-1)
            nearest = dist.argmin(1)
            box = max(box, float(dist[np.arange(len(nearest)), nearest].max()))
            gap = np.abs(x.boxes[mine] - y.boxes[theirs][nearest]) / np.maximum(1.0, np.abs(x.boxes[mine]))
            box_rel = max(box_rel, float(gap.max()))
            score = max(score, float(np.abs(x.scores[mine] - y.scores[theirs][nearest]).max()))
    return {"box": box, "box_rel": box_rel, "score": score, "count": (len(a.boxes), len(b.boxes))}


class Staging:
    """One thread's pinned host buffer for its uploads to a GPU: a batch's frames are copied into it and from it to
    the device without blocking the host. One buffer, grown to the largest batch asked for, serves every shape; a
    buffer kept per shape (and per frame count) held pinned memory for every shape a job met, never freed: the
    windows of a raster archive come in many shapes, each batch up to gigabytes. `allocate` and `event` are CUDA's
    unless given (tests)."""

    def __init__(self, allocate=None, event=None):
        self._allocate = allocate or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._event = event or torch.cuda.Event
        self._buffer: Tensor | None = None
        self._copied = None  # recorded after the last copy out of the buffer

    def take(self, shape: tuple[int, ...]) -> Tensor:
        """A `shape` uint8 view of the buffer, once the previous copy out of it has finished."""
        if self._copied is not None:
            self._copied.synchronize()
        n = math.prod(shape)
        if self._buffer is None or self._buffer.numel() < n:
            self._buffer = None  # the old one goes back to the allocator's cache before the larger one is made
            self._buffer = self._allocate(n)
        return self._buffer[:n].view(shape)

    def copied(self) -> None:
        """Mark the copy just queued out of the buffer (on the current stream)."""
        if self._copied is None:
            self._copied = self._event()
        self._copied.record()


class Predictor:
    """Run `model` on batches of uint8 frames.

    Args:
        model: a detector from `build_detector`/`load_checkpoint` (moved to `device`, eval mode). What the options
            below change (layouts, quantised layers, compiled parts) is changed on a copy: `model` itself stays
            usable for training.
        device: where the model lives; frames are converted to float there.
        tile: sliced inference settings, or None to feed frames whole.
        channels_last: NHWC convolutions (weights, and the frames as they are uploaded). None: with `fast` on a CPU;
            off on CUDA: torchvision's eager model, NCHW, ran the same R50-FPN backbone and neck in 35 ms where the
            Predictor's NHWC took 61 ms (benchmarks/gpu.py on an H200: 16 frames of 1080p at 800 px, bf16; 51
            against 57 ms in fp32).
        fast: the exact fast path (`fast_path`) for torchvision-style detectors: on a CPU with a pool of torch's
            thread count for the NMS and RoIAlign calls; on CUDA its batch-wide choices of boxes, with a few waits
            for the device per batch where torchvision's heads wait several times per image. False: torchvision's
            eager forward as it is.
        precision: `exact`; or the approximate `bf16` (on a CPU bfloat16 autocast of the feature computation, on
            CUDA of the whole forward), `fp16` (CUDA: float16 autocast) or `int8` (CPU: dynamic int8 quantisation
            of the Linear layers, the R-CNN box head). `fpn eval --precision` tells what each costs in AP.
        compile: torch.compile the convolutional parts (backbone with neck, RPN head). Exact within float
            rounding, but each new input shape compiles first: about a minute on 2 cores (63 s for the
            mobilenet_v3 FPN at 800 px), 7 s once inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) holds it.
        keep_memory: with `fast`, `keep_freed_memory()` for this process (unless FPN_KEEP_FREED_MEMORY=0): no page
            faults for the large tensors each batch allocates again, for resident memory that stays at its peak
            (+10 % for the trees model, up to 2x for torchvision's mobilenet_v3 FPN at 800 px, batch 4).
        max_batch: most images (tiles) per forward pass; halved for good when a forward pass runs out of device
            memory (`_forward`).
        name: how errors name the model (a job's: the plugin's `file.py:Class`, else the model id); default: its
            class name.

    Every model's output is checked (`_checked`: its structure and shapes after each forward pass; `_flaws`: its
    values, once per call, brought back with the detections in their one copy) and raises ModelOutputError when it
    breaks the contract: a model plugin's output is the user's code, and an invalid box, score or label would
    otherwise be written as a detection. The model's `config.score_thresh` is applied to a plugin's detections as
    ours apply it in their heads (`>`); boxes are clipped to the frame, and those left without area (wholly outside
    it) are dropped, as are those of label 0 (the background).

    Frames of one shape go to the device in one copy (on CUDA from a pinned buffer, without blocking the host) and
    are converted, normalised and resized there as one batch; each thread calling the predictor (a detector
    actor's concurrent calls) has its own CUDA stream, so one call's copies and host work overlap another's
    kernels. Detections come back to the host in one copy per call.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", tile: TileConfig | None = None,
                 channels_last: bool | None = None, fast: bool = True, precision: str = "exact",
                 compile: bool = False, keep_memory: bool = True, max_batch: int = 16, name: str | None = None):
        self.device = torch.device(device)
        cfg = getattr(model, "config", None)  # ours and plugins have one
        self.name = name or type(model).__name__
        self.max_label = cfg.num_classes - 1 if cfg is not None else None  # label 0 is the background
        check_precision(precision, self.device.type)
        cpu = self.device.type == "cpu"
        model = model.to(self.device).eval()
        self.has_masks = getattr(model, "roi_heads", None) is not None and model.roi_heads.has_mask()
        detector = is_detector(model)
        # the threshold `_collect` applies: a plugin's; ours apply it in their heads, before their NMS, with the same >
        self.score_thresh = cfg.score_thresh if cfg is not None and not detector else None
        fast = fast and detector
        if channels_last is None:
            channels_last = fast and cpu
        if fast or channels_last or precision != "exact" or compile or not cpu:
            model = copy.deepcopy(model)  # the caller's model stays as it is (fpn train evaluates with a Predictor)
        if not cpu or precision != "exact":  # within float rounding, but not within the exact path's 1e-4 on a CPU
            fold_norms(model)
        self.executor = None
        if fast:
            if keep_memory and cpu:
                keep_freed_memory()
            threads = torch.get_num_threads() if cpu else 1
            self.executor = _Pool(threads, thread_name_prefix="fpn-predict") if threads > 1 else None
            fast_path(model, self.executor, channels_last=channels_last)
        elif channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.amp = None
        if precision == "int8":
            model = quantize_linear(model)
        elif precision != "exact" and cpu:
            if not detector:
                raise ValueError("precision bf16 needs a torchvision-style detector")
            model = bf16_features(model)
        elif precision != "exact":
            self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if compile:
            if not detector:
                raise ValueError("compile needs a torchvision-style detector")
            compile_convolutions(model)
        self.model = model
        self.channels_last = channels_last
        self.tile = tile
        self.precision = precision
        self.fast = fast
        self.max_batch = max_batch
        self._local = threading.local()  # per calling thread: CUDA stream, pinned buffers

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def _stream(self):
        """This thread's CUDA stream (a context), or a null context off CUDA."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if getattr(self._local, "stream", None) is None:
            self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._local.stream)

    def _upload(self, frames, members: list[int]) -> Tensor:
        """Frames `members` of `frames` (one shape) as a `[n, 3, H, W]` float tensor in [0, 1] on the device, in one
        copy: on CUDA through this thread's pinned buffer (`Staging`), asynchronously. Its memory is NHWC with
        `channels_last`, else NCHW."""
        if self.device.type != "cuda":
            if isinstance(frames, np.ndarray) and len(members) == len(frames):
                batch = torch.from_numpy(np.ascontiguousarray(frames))
            else:
                batch = torch.from_numpy(np.stack([np.asarray(frames[i]) for i in members]))
            return self._to_float(batch.to(self.device))
        pinned = self._local.__dict__.setdefault("pinned", Staging())
        staging = pinned.take((len(members), *np.shape(frames[members[0]])))
        for j, i in enumerate(members):
            staging[j].copy_(torch.from_numpy(np.asarray(frames[i])))
        batch = staging.to(self.device, non_blocking=True)
        pinned.copied()
        return self._to_float(batch)

    def _to_float(self, batch: Tensor) -> Tensor:
        """`[n, H, W, 3]` uint8 -> `[n, 3, H, W]` float in [0, 1], in the model's memory format."""
        x = batch.permute(0, 3, 1, 2)  # NHWC memory: channels_last strides
        return (x if self.channels_last else x.contiguous()).float().div_(255)

    @torch.inference_mode()
    def __call__(self, frames: list[np.ndarray] | np.ndarray) -> list[Detections]:
        """`frames`: `[B, H, W, 3]` uint8 array, or a list of `[H, W, 3]` arrays of any sizes."""
        sizes = [tuple(np.shape(fr)[:2]) for fr in frames]
        by_size: dict[tuple[int, int], list[int]] = {}
        for f, size in enumerate(sizes):
            by_size.setdefault(size, []).append(f)
        # forward passes of one image shape each (at most max_batch images): the model pads a batch to its largest
        # image, and padding changes what normalisation sees (GroupNorm statistics), so a frame's detections would
        # depend on its batch mates; frames of a size share their tile plan
        outputs: list[tuple[int, int, int, dict[str, Tensor]]] = []  # (frame, x offset, y offset, detections)
        with self._stream(), self._autocast():
            for members in by_size.values():
                for batch, owners in self._batches(self._upload(frames, members), members):
                    outputs += [(*owner, out) for owner, out in zip(owners, self._forward(batch))]
            return self._collect(outputs, sizes)

    def _forward(self, x: Tensor) -> list[dict[str, Tensor]]:
        """The model's output for the images `x`. Out of device memory, the forward's images run again in halves, and
        `max_batch` stays halved for this predictor's later calls (they bring the same shapes again, and its
        concurrent calls share the memory): a frame whose tiles did not fit at once is still detected, where it
        used to become an error row. One image that does not fit alone raises."""
        out: list[dict[str, Tensor]] = []
        step = len(x)
        while len(out) < len(x):
            step = min(step, self.max_batch)
            images = x[len(out):len(out) + step]
            try:
                got = self.model(images)
            except OOM_ERRORS:
                if step == 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                failed, step = step, step // 2
                if step < self.max_batch:
                    self.max_batch = step
                    log.warning("out of device memory at %d images of %dx%d per forward pass; %d from now on",
                                failed, x.shape[-1], x.shape[-2], step)
                continue
            out += self._checked(got, len(images))
        return out

    def _checked(self, got, n: int) -> list[dict[str, Tensor]]:
        """`got`, the model's output for `n` images, when it is one dict per image with tensors boxes `[N, 4]` and
        scores, labels (integers) and levels `[N]`; else ModelOutputError. Only what the host knows without waiting
        for the device (types and shapes); the values are `_flaws`'. A model returning fewer dicts than images
        (an empty list) made `_forward` call it again for the rest, forever."""
        if not isinstance(got, (list, tuple)) or len(got) != n or not all(isinstance(o, dict) for o in got):
            if got is None:
                what = "None"
            elif not isinstance(got, (list, tuple)):
                what = f"a {type(got).__name__}"
            else:
                what = f"{len(got)} outputs" if len(got) != n else "a list of other things than dicts"
            raise ModelOutputError(f"model {self.name} returned {what} for {n} image(s), expected a list of one dict "
                                   "per image")
        for o in got:
            missing = [k for k in ("boxes", "scores", "labels", "levels") if not isinstance(o.get(k), Tensor)]
            if missing:
                raise ModelOutputError(f"model {self.name} returned no {missing[0]!r} tensor (its dict has "
                                       f"{sorted(map(str, o))})")
            boxes = o["boxes"]
            if boxes.dim() != 2 or boxes.shape[1] != 4:
                raise ModelOutputError(f"model {self.name} returned boxes of shape {list(boxes.shape)}, expected "
                                       "[N, 4]")
            for k in ("scores", "labels", "levels"):
                if o[k].shape != (len(boxes),):
                    raise ModelOutputError(f"model {self.name} returned {k} of shape {list(o[k].shape)} for "
                                           f"{len(boxes)} boxes, expected [{len(boxes)}]")
            if o["labels"].is_floating_point() or o["labels"].is_complex() or o["labels"].dtype == torch.bool:
                raise ModelOutputError(f"model {self.name} returned labels of {o['labels'].dtype}, expected integers")
        return list(got)

    _FLAWS = ("boxes with a NaN or infinite coordinate", "boxes with x2 < x1 or y2 < y1",
              "scores outside [0, 1] or NaN", "labels outside 0..{max_label}")

    def _flaws(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        """Which of `_FLAWS` a frame's detections have, as `[len(_FLAWS)]` bools on the device: whole-tensor
        comparisons, no wait for the device and no step per detection."""
        flaws = [~torch.isfinite(boxes).all(), ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any(),
                 ~((scores >= 0) & (scores <= 1)).all()]  # NaN fails both comparisons
        bad = labels < 0
        if self.max_label is not None:
            bad |= labels > self.max_label
        return torch.stack([*flaws, bad.any()])

    def _batches(self, x: Tensor, members: list[int]):
        """(`[n, 3, h, w]` batch of at most max_batch images, (frame, x offset, y offset) of each) of the frames `x`:
        slices of `x`, or of its frames' tiles, each batch one tile shape, stacked a batch at a time (a raster
        window's tiles are not all copied at once)."""
        h, w = x.shape[-2:]
        step = self.max_batch
        if self.tile is None or (h <= self.tile.size and w <= self.tile.size):
            for k in range(0, len(x), step):
                yield x[k:k + step], [(f, 0, 0) for f in members[k:k + step]]
            return
        by_shape: dict[tuple[int, int], list] = {}  # tile shape -> (frame's row in x, frame, x0, y0, x1, y1)
        for j, f in enumerate(members):
            for x0, y0, x1, y1 in plan_tiles(h, w, self.tile.size, self.tile.overlap):
                by_shape.setdefault((y1 - y0, x1 - x0), []).append((j, f, x0, y0, x1, y1))
        for group in by_shape.values():
            for k in range(0, len(group), step):
                chunk = group[k:k + step]
                yield (torch.stack([x[j, :, y0:y1, x0:x1] for j, _, x0, y0, x1, y1 in chunk]),
                       [(f, x0, y0) for _, f, x0, y0, _, _ in chunk])

    def _collect(self, outputs, sizes) -> list[Detections]:
        """Detections per frame: checked (`_flaws`), tiles shifted to frame pixels and merged, boxes clipped to the
        frame, all frames' boxes, scores, labels and levels brought to the host in one copy, with each frame's
        flaws; there those above the score threshold and with an area in the frame are kept. ModelOutputError
        names the first frame's flaws."""
        per_frame: list[list[tuple[dict[str, Tensor], int, int]]] = [[] for _ in sizes]
        for f, x0, y0, out in outputs:
            per_frame[f].append((out, x0, y0))
        packed, masks, flaws = [], [], []
        for parts, (h, w) in zip(per_frame, sizes):
            boxes = torch.cat([_shifted(o["boxes"], x, y) for o, x, y in parts])
            scores = torch.cat([o["scores"].float() for o, _, _ in parts])
            labels = torch.cat([o["labels"] for o, _, _ in parts])
            levels = torch.cat([o["levels"] for o, _, _ in parts])
            flaws.append(self._flaws(boxes, scores, labels))
            frame_masks = self._masks(parts, h, w) if self.has_masks else None
            if len(parts) > 1 and self.score_thresh is not None:
                # before the merge, where a low score would join a group
                above = torch.where(scores > self.score_thresh)[0]
                boxes, scores, labels, levels = boxes[above], scores[above], labels[above], levels[above]
                if frame_masks is not None:
                    frame_masks = [frame_masks[i] for i in above.tolist()]
            if len(parts) > 1:
                keep, boxes = merge_detections(boxes, scores, labels, threshold=self.tile.threshold,
                                               method=self.tile.merge, metric=self.tile.metric)
                scores, labels, levels = scores[keep], labels[keep], levels[keep]
                if frame_masks is not None:
                    frame_masks = [frame_masks[i] for i in keep.tolist()]
            boxes = boxes.clamp(min=0)
            boxes[:, 0::2].clamp_(max=w)  # scalars, not a tensor of limits: a copy of one to a GPU waits for it
            boxes[:, 1::2].clamp_(max=h)
            packed.append(torch.cat([boxes, scores[:, None], labels[:, None].float(), levels[:, None].float()], 1))
            masks.append(frame_masks)
        if not packed:
            return []
        # labels and levels are small integers: exact in float32; the flaws ride along as rows of their own
        flawed = F.pad(torch.stack(flaws).float(), (0, packed[0].shape[1] - len(self._FLAWS)))
        host = torch.cat([*packed, flawed]).cpu().numpy()
        host, flawed = host[:-len(flaws)], host[-len(flaws):, :len(self._FLAWS)] > 0
        if flawed.any():
            first = flawed[np.flatnonzero(flawed.any(1))[0]]
            what = "; ".join(d.format(max_label=self.max_label) for d, bad in zip(self._FLAWS, first) if bad)
            raise ModelOutputError(f"model {self.name} returned {what}")
        bounds = np.cumsum([len(p) for p in packed])[:-1]
        found = []
        for a, m in zip(np.split(host, bounds), masks):
            # a box wholly outside the frame is clipped to none; label 0 is the background (torchvision's RetinaNet
            # scores it as a class), no detection
            keep = (a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1]) & (a[:, 5] > 0)
            if self.score_thresh is not None:
                keep &= a[:, 4] > self.score_thresh
            if not keep.all():
                a, m = a[keep], None if m is None else [m[i] for i in np.flatnonzero(keep)]
            found.append(Detections(np.ascontiguousarray(a[:, :4]), np.ascontiguousarray(a[:, 4]),
                                    a[:, 5].astype(np.int32), a[:, 6].astype(np.int8), m))
        return found

    @staticmethod
    def _masks(parts, h: int, w: int) -> list[dict]:
        """COCO RLE of each detection's mask (threshold 0.5) in frame pixels (`fpn_model.rle.encode_masks`: on a
        GPU from run boundaries found there, on a CPU by pycocotools a chunk of masks at a time)."""
        return [rle for o, x0, y0 in parts
                for rle in encode_masks(o["masks"][:, 0] > 0.5, x0=x0, y0=y0, height=h, width=w)]


def _shifted(boxes: Tensor, x: int, y: int) -> Tensor:
    """A tile's float32 boxes moved by its offset in the frame, with Python scalars: a tensor of offsets would be
    copied to the device, and on a GPU each such copy waits for it (once per tile)."""
    if not (x or y):
        return boxes.float()
    boxes = boxes.to(torch.float32, copy=True)
    boxes[:, 0::2] += x
    boxes[:, 1::2] += y
    return boxes
