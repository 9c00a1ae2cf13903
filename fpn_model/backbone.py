"""Bottom-up pathway: ResNet-18/34/50/101 or MobileNetV3-Large returning C2..C5.

`build_backbone(cfg)` returns a `Body` whose forward maps an image batch `[B, 3, H, W]` to an
ordered dict `{"c2": [B, C2, H/4, W/4], ..., "c5": [B, C5, H/32, W/32]}` (the stages named in
`cfg.returned_layers`) and publishes `channels` and `strides` per output, as detectron2's
`output_shape()` does.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import ModelConfig

__all__ = ["Body", "build_backbone", "norm_layer", "level_names"]

_RESNET_LAYERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 8 channels a group, at most 32 groups (GN paper's default for 256 channels)."""
    groups = max(1, min(32, channels // 8))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def norm_layer(kind: str) -> Callable[[int], nn.Module] | None:
    """The normalisation layer factory for `kind` (frozen_bn | bn | gn | none)."""
    return {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": group_norm, "none": None}[kind]


def level_names(prefix: str, levels: tuple[int, ...]) -> list[str]:
    """`c2`, `c3`, ... (or `p2`, ...) for the given levels; a repeated level gets a suffix (`p5b`)."""
    names: list[str] = []
    for level in levels:
        name = f"{prefix}{level}"
        while name in names:
            name += "b"
        names.append(name)
    return names


class _ResNet(ResNet):
    """torchvision's ResNet with a selectable stem width (64 = torchvision's exact layout).

    torchvision hard-codes 64 channels in the stem; narrow models (width 32) train from scratch
    several times faster on a CPU, so the width is a parameter here. Stages and blocks are
    torchvision's own (`_make_layer`), so state dicts of the standard width load unchanged.
    """

    def __init__(self, block: type[nn.Module], layers: tuple[int, ...], *, width: int, norm: Callable[[int], nn.Module]):
        nn.Module.__init__(self)
        self._norm_layer = norm
        self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


class Body(nn.Module):
    """Backbone trunk returning named feature maps with known channels and strides."""

    def __init__(self, trunk: nn.Module, return_layers: dict[str, str], channels: list[int], strides: list[int]):
        super().__init__()
        self.trunk = IntermediateLayerGetter(trunk, return_layers=return_layers)
        self.names = list(return_layers.values())
        self.channels = channels
        self.strides = strides

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        return self.trunk(x)


def _freeze(trunk: nn.Module, trainable: list[str]) -> None:
    for name, p in trunk.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)


def build_backbone(cfg: ModelConfig) -> Body:
    """ResNet or MobileNetV3 trunk for `cfg`, with the first `5 - cfg.trainable_layers` stages frozen."""
    norm = norm_layer(cfg.norm) or nn.Identity
    names = level_names("c", cfg.backbone_levels)
    if cfg.backbone in _RESNET_LAYERS:
        block, layers = _RESNET_LAYERS[cfg.backbone]
        trunk = _ResNet(block, layers, width=cfg.width, norm=norm)
        if not 0 <= cfg.trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be 0..5 for ResNet, got {cfg.trainable_layers}")
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_layers]
        if cfg.trainable_layers == 5:
            trainable.append("bn1")
        _freeze(trunk, trainable)
        if any(k not in (1, 2, 3, 4) for k in cfg.returned_layers):
            raise ValueError(f"returned_layers for ResNet must be within 1..4, got {cfg.returned_layers}")
        expansion = block.expansion
        channels = [cfg.width * 2 ** (k - 1) * expansion for k in cfg.returned_layers]
        return_layers = {f"layer{k}": n for k, n in zip(cfg.returned_layers, names)}
        return Body(trunk, return_layers, channels, [2 ** level for level in cfg.backbone_levels])

    # MobileNetV3-Large, staged as torchvision's _mobilenet_extractor: the stages end where stride grows
    trunk = mobilenet_v3_large(weights=None, norm_layer=norm if cfg.norm != "bn" else partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)).features
    stage_indices = [0] + [i for i, b in enumerate(trunk) if getattr(b, "_is_cn", False)] + [len(trunk) - 1]
    num_stages = len(stage_indices)
    if any(not 1 <= k < num_stages for k in cfg.returned_layers):
        raise ValueError(f"returned_layers for mobilenet_v3_large must be within 1..{num_stages - 1}")
    if not 0 <= cfg.trainable_layers <= num_stages:
        raise ValueError(f"trainable_layers must be 0..{num_stages} for MobileNetV3, got {cfg.trainable_layers}")
    freeze_before = stage_indices[num_stages - cfg.trainable_layers] if cfg.trainable_layers < num_stages else 0
    for b in trunk[:freeze_before]:
        for p in b.parameters():
            p.requires_grad_(False)
    return_layers = {str(stage_indices[k]): n for k, n in zip(cfg.returned_layers, names)}
    channels = [trunk[stage_indices[k]].out_channels for k in cfg.returned_layers]
    return Body(trunk, return_layers, channels, [2 ** level for level in cfg.backbone_levels])

