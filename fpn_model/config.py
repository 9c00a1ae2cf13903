"""Model configuration: one frozen dataclass whose fields mirror the builders' arguments.

`ModelConfig` is what a checkpoint carries (as JSON) next to its weights, so a model can be rebuilt
anywhere from the file alone. `preset(name, **overrides)` gives the named starting points that
`fpn models` lists.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "preset", "ARCHS", "BACKBONES", "NECKS", "UPSAMPLES", "NORMS", "TileConfig"]

ARCHS = ("faster_rcnn", "retinanet", "mask_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
NECKS = ("fpn", "panet", "bifpn", "single")
UPSAMPLES = ("nearest", "bilinear", "deconv")
NORMS = ("frozen_bn", "bn", "gn", "none")
EXTRAS = ("pool", "p6p7", "p6p7_c5", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a detector.

    Pyramid levels are named by their log2 stride: level 2 is stride 4 (P2), level 6 is stride 64.
    `returned_layers` picks the backbone stages fed to the neck (ResNet: 1..4 = C2..C5).
    `anchor_sizes` holds one tuple of sizes (pixels) per pyramid level, lowest level first.
    `scale` fixes the input resize factor (1.0 = native resolution, 2.0 = upscale small objects);
    when it is None the torchvision rule (shorter side to `min_size`, longer at most `max_size`) applies.
    """

    arch: str = "faster_rcnn"
    backbone: str = "resnet50"
    neck: str = "fpn"
    num_classes: int = 91  # including background for the R-CNNs; foreground classes for RetinaNet
    class_names: tuple[str, ...] = ()
    out_channels: int = 256
    upsample: str = "nearest"
    norm: str = "frozen_bn"  # backbone normalisation
    neck_norm: str = "none"
    head_style: str = "v1"  # v1: the paper's heads; v2: torchvision's "_v2" heads (conv-norm)
    width: int = 64  # ResNet stem width (64 = standard); smaller widths make light models
    returned_layers: tuple[int, ...] = (1, 2, 3, 4)
    extra: str = "pool"  # pool: P6 by stride-2 subsampling of the top map; p6p7: two stride-2 3x3 convs
    trainable_layers: int = 3
    bifpn_repeats: int = 2
    single_level: int = 4  # the `single` neck's level (4 = C4-derived, 5 = C5-derived)
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 800
    max_size: int = 1333
    scale: float | None = None
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 2000
    box_batch_size_per_image: int = 512
    box_head_dim: int = 1024  # width of the box head's fully connected layers
    rpn_batch_size_per_image: int = 256
    rpn_score_thresh: float = 0.0
    giou_loss: bool = False
    extra_kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # reserved; in saved configs

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_choice("neck", self.neck, NECKS)
        _check_choice("upsample", self.upsample, UPSAMPLES)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("neck_norm", self.neck_norm, NORMS)
        _check_choice("head_style", self.head_style, ("v1", "v2"))
        _check_choice("extra", self.extra, EXTRAS)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.out_channels < 8:
            raise ValueError(f"out_channels must be >= 8, got {self.out_channels}")
        if self.scale is not None and not 0.1 <= self.scale <= 8:
            raise ValueError(f"scale must be between 0.1 and 8, got {self.scale}")
        if not 0 <= self.score_thresh <= 1:
            raise ValueError(f"score_thresh must be between 0 and 1, got {self.score_thresh}")
        if not 0 < self.nms_thresh <= 1:
            raise ValueError(f"nms_thresh must be above 0 and at most 1, got {self.nms_thresh}")
        if self.detections_per_img < 1:
            raise ValueError(f"detections_per_img must be >= 1, got {self.detections_per_img}")
        if not self.returned_layers:
            raise ValueError("returned_layers must name at least one backbone stage")
        if len(self.anchor_sizes) != self.num_levels:
            raise ValueError(
                f"anchor_sizes has {len(self.anchor_sizes)} levels but the pyramid has {self.num_levels} "
                f"(levels {self.levels}): give one list of sizes per level, e.g. --set \"anchor_sizes="
                f"{_anchor_example(self.anchor_sizes, self.levels)}\""
            )
        if self.class_names and len(self.class_names) not in (self.num_classes, self.num_classes - 1):
            raise ValueError(f"class_names has {len(self.class_names)} names for num_classes={self.num_classes}")

    # -- pyramid geometry ---------------------------------------------------------------------
    @property
    def backbone_levels(self) -> tuple[int, ...]:
        """Levels (log2 stride) of the backbone maps fed to the neck."""
        if self.backbone == "mobilenet_v3_large":
            # stage k of MobileNetV3-Large ends at stride 2**(k+1), except stage 5 (the last conv), stride 32
            return tuple(min(k + 1, 5) for k in self.returned_layers)
        return tuple(k + 1 for k in self.returned_layers)

    @property
    def levels(self) -> tuple[int, ...]:
        """Levels produced by the neck, lowest first (e.g. (2, 3, 4, 5, 6) for P2..P6)."""
        if self.neck == "single":
            return (self.single_level,)
        base = self.backbone_levels
        top = base[-1]
        n_extra = {"pool": 1, "p6p7": 2, "p6p7_c5": 2, "none": 0}[self.extra]
        if self.neck == "bifpn" and self.extra == "none":
            n_extra = 0
        return tuple(base) + tuple(top + i for i in range(1, n_extra + 1))

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def roi_levels(self) -> tuple[int, ...]:
        """Levels the RoI heads pool from (the pooled P6 is for the RPN only, as in the paper)."""
        if self.extra == "pool" and self.neck != "single":
            return self.levels[:-1]
        return self.levels

    def label_name(self, label: int) -> str:
        if not self.class_names:
            return str(label)
        offset = 1 if len(self.class_names) == self.num_classes - 1 else 0
        i = label - offset
        return self.class_names[i] if 0 <= i < len(self.class_names) else str(label)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_sizes"] = [list(s) for s in self.anchor_sizes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        d = dict(d)
        for key in ("class_names", "returned_layers", "aspect_ratios", "image_mean", "image_std"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        if "anchor_sizes" in d:
            d["anchor_sizes"] = tuple(tuple(s) for s in d["anchor_sizes"])
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _anchor_example(sizes, levels: tuple[int, ...]) -> str:
    """Anchor sizes for a pyramid of `levels`: all of `sizes` on one level, else the paper's 8 x stride a level."""
    if len(levels) == 1:
        return str([sorted({int(v) for a in sizes for v in a})])
    return str([[8 * 2 ** k] for k in levels])


def _paper(arch: str) -> ModelConfig:
    if arch == "retinanet":
        return ModelConfig(
            arch="retinanet", num_classes=91, returned_layers=(2, 3, 4), extra="p6p7",
            anchor_sizes=tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512)),
            detections_per_img=300,
        )
    return ModelConfig(arch=arch)


PRESETS: dict[str, tuple[str, ModelConfig]] = {
    "faster_rcnn_r50_fpn": ("Faster R-CNN, ResNet-50-FPN P2-P6, as Lin et al. / torchvision", _paper("faster_rcnn")),
    "retinanet_r50_fpn": ("RetinaNet, ResNet-50-FPN P3-P7, as torchvision", _paper("retinanet")),
    "mask_rcnn_r50_fpn": ("Mask R-CNN, ResNet-50-FPN P2-P6, as torchvision", _paper("mask_rcnn")),
    "faster_rcnn_mobilenet_v3_fpn": (
        "Faster R-CNN, MobileNetV3-Large-FPN, as torchvision's fasterrcnn_mobilenet_v3_large_fpn",
        ModelConfig(
            backbone="mobilenet_v3_large", returned_layers=(4, 5), min_size=800, max_size=1333,
            anchor_sizes=((32, 64, 128, 256, 512),) * 3, rpn_score_thresh=0.05,
        ),
    ),
    "small": (
        "Faster R-CNN tuned for 8-32 px objects: P2 used, anchors from 8 px, native resolution, "
        "1000 detections per image",
        ModelConfig(
            arch="faster_rcnn", backbone="resnet50", anchor_sizes=((8, 16), (24, 32), (48, 64), (96, 128), (192, 256)),
            scale=1.0, detections_per_img=1000, rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=2000,
            box_batch_size_per_image=512, score_thresh=0.05,
        ),
    ),
    "trees": (
        "Tree-crown detector trained from scratch (the bundled model): Faster R-CNN, ResNet-18 (width 32) with "
        "GroupNorm, FPN P2-P6 with 64 channels, anchors 12-320 px, native resolution",
        ModelConfig(
            arch="faster_rcnn", backbone="resnet18", width=32, norm="gn", neck_norm="gn", out_channels=64,
            trainable_layers=5, anchor_sizes=((12, 20), (28, 40), (56, 80), (112, 160), (224, 320)),
            aspect_ratios=(0.7, 1.0, 1.4), scale=1.0, detections_per_img=500, rpn_pre_nms_top_n_train=1000,
            rpn_post_nms_top_n_train=500, rpn_pre_nms_top_n_test=3000, rpn_post_nms_top_n_test=1000,
            box_batch_size_per_image=128, box_head_dim=512, score_thresh=0.05,
        ),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset with `overrides` applied (any ModelConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name][1].replace(**overrides)


MERGE_METHODS = ("nms", "nmm")  # how overlapping tiles' detections are merged (fpn_model.tiling)
MERGE_METRICS = ("iou", "ios")
PRECISIONS = ("exact", "int8", "bf16", "fp16")  # fpn_model.predict.Predictor
_ONLY_ON = {"int8": "cpu", "fp16": "cuda"}  # the precisions of one device type


def precisions_on(device_type: str) -> tuple[str, ...]:
    """The precisions a forward on `device_type` ("cpu", "cuda") can run."""
    return tuple(p for p in PRECISIONS if _ONLY_ON.get(p, device_type) == device_type)


def check_precision(precision: str, device_type: str | None) -> None:
    """ValueError unless `precision` runs on `device_type` ("cpu", "cuda"): int8 is a CPU path, fp16 a GPU one;
    None (a device not decided yet): unless it is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if device_type is not None and precision not in precisions_on(device_type):
        others = " or ".join(p for p in precisions_on(device_type) if p != "exact")
        where = "CPUs" if _ONLY_ON[precision] == "cpu" else "GPUs"
        raise ValueError(f"precision {precision} is for {where}; on {'a CPU' if device_type == 'cpu' else device_type}"
                         f" use {others}")


def check_tile(size: int, overlap: int) -> None:
    """ValueError unless `size` x `size` tiles overlapping by `overlap` pixels can cover a frame."""
    if size <= 0:
        raise ValueError(f"tile must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {size}")


@dataclass(frozen=True)
class TileConfig:
    """Sliced inference for frames larger than `size` on either side (`fpn_model.tiling` plans and merges)."""

    size: int = 1024
    overlap: int = 128
    merge: str = "nms"  # nms | nmm
    metric: str = "ios"  # iou | ios
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_tile(self.size, self.overlap)
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"tile merge must be nms or nmm, got {self.merge!r}")
        if self.metric not in MERGE_METRICS:
            raise ValueError(f"tile metric must be iou or ios, got {self.metric!r}")
