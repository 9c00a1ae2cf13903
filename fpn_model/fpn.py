"""Necks: the FPN top-down pathway and its variants, behind one interface.

Every neck maps the backbone's ordered dict `{"c2": [B, C2, H/4, W/4], ..., "c5": ...}` to
`{"p2": [B, d, H/4, W/4], ..., "p6": [B, d, H/64, W/64]}` with `d = out_channels` on every level.

- `FPN`: Lin et al. 2017. 1x1 lateral convs to d channels, top-down 2x upsampling (nearest,
  bilinear or a learned 2x deconvolution) added element-wise, a 3x3 conv on every merged map.
- `PANet`: FPN followed by the bottom-up path augmentation of Liu et al. 2018.
- `BiFPN`: EfficientDet's repeated bidirectional layers with fast normalised weighted fusion.
- `SingleScale`: one map derived from C4 or C5 without a top-down path (ablation baseline).

Extra levels (P6, P7) come from an `ExtraLevels` block appended to any neck.
torchvision's `FeaturePyramidNetwork` covers only the first variant with nearest upsampling,
so the necks are written here; their convolution blocks are torchvision's.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from .backbone import level_names, norm_layer
from .config import ModelConfig

__all__ = ["ExtraLevels", "MaxPoolP6", "ConvP6P7", "FPN", "PANet", "BiFPN", "SingleScale", "build_neck"]

Norm = Callable[[int], nn.Module] | None


def _conv(cin: int, cout: int, k: int, norm: Norm, *, stride: int = 1, act: bool = False) -> Conv2dNormActivation:
    return Conv2dNormActivation(
        cin, cout, kernel_size=k, stride=stride, padding=(k - 1) // 2, norm_layer=norm,
        activation_layer=nn.ReLU if act else None,
    )


def _init(module: nn.Module) -> None:
    """torchvision's FPN initialisation: kaiming-uniform (a=1) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)


# -- extra levels -------------------------------------------------------------------------------
class ExtraLevels(nn.Module):
    """Base class of blocks that append coarser levels.

    `forward(results, inputs)` gets the neck's outputs (finest first) and the backbone maps it was
    fed, and returns `results` with the new levels appended. `num_levels` says how many it adds.
    """

    num_levels: int = 0

    def forward(self, results: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError


class MaxPoolP6(ExtraLevels):
    """P6 by stride-2 subsampling of the top output (Faster R-CNN's P6; used by the RPN only)."""

    num_levels = 1

    def forward(self, results: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
        return results + [F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)]


class ConvP6P7(ExtraLevels):
    """P6 and P7 by stride-2 3x3 convs (RetinaNet); from the top output, or from C5 if `from_c5`."""

    num_levels = 2

    def __init__(self, in_channels: int, out_channels: int, *, from_c5: bool = False):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        self.from_c5 = from_c5
        _init(self)

    def forward(self, results: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
        p6 = self.p6(inputs[-1] if self.from_c5 else results[-1])
        return results + [p6, self.p7(F.relu(p6))]


# -- necks --------------------------------------------------------------------------------------
class _Neck(nn.Module):
    """Shared plumbing: names in and out, extra levels, type checks."""

    def __init__(self, out_names: list[str], extra: ExtraLevels | None):
        super().__init__()
        if extra is not None and not isinstance(extra, ExtraLevels):
            raise TypeError(f"extra must be an ExtraLevels block or None, got {type(extra).__name__}")
        self.out_names = out_names
        self.extra = extra

    def _finish(self, results: list[Tensor], inputs: list[Tensor]) -> "OrderedDict[str, Tensor]":
        if self.extra is not None:
            results = self.extra(results, inputs)
        if len(results) != len(self.out_names):
            raise RuntimeError(f"neck produced {len(results)} maps for names {self.out_names}")
        return OrderedDict(zip(self.out_names, results))


class _Upsample(nn.Module):
    """2x upsampling of a coarser map to the size of the finer one."""

    def __init__(self, mode: str, channels: int):
        super().__init__()
        self.mode = mode
        self.deconv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1) if mode == "deconv" else None

    def forward(self, x: Tensor, size: torch.Size) -> Tensor:
        if self.deconv is not None:
            x = self.deconv(x)
            return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="nearest")
        if self.mode == "bilinear":
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return F.interpolate(x, size=size, mode="nearest")


class FPN(_Neck):
    """Feature Pyramid Network (Lin et al. 2017).

    Args:
        in_channels_list: channels of each backbone map, finest first.
        out_channels: d, the channels of every output level.
        out_names: names of the outputs (the inputs' levels, then the extra levels).
        upsample: nearest | bilinear | deconv.
        extra: block adding coarser levels, or None.
        norm: normalisation after each conv, or None (the paper).
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        *,
        out_names: list[str],
        upsample: str = "nearest",
        extra: ExtraLevels | None = None,
        norm: Norm = None,
    ):
        super().__init__(out_names, extra)
        if any(c <= 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list must be positive, got {in_channels_list}")
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1, norm) for c in in_channels_list)
        self.output = nn.ModuleList(_conv(out_channels, out_channels, 3, norm) for _ in in_channels_list)
        self.upsample = nn.ModuleList(_Upsample(upsample, out_channels) for _ in in_channels_list[1:])
        _init(self)

    def top_down(self, inputs: list[Tensor]) -> list[Tensor]:
        """Merged and smoothed maps P_k for every input level, finest first."""
        last = self.lateral[-1](inputs[-1])
        results = [self.output[-1](last)]
        for i in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral[i](inputs[i])
            last = lateral + self.upsample[i](last, lateral.shape[-2:])
            results.insert(0, self.output[i](last))
        return results

    def forward(self, x: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        inputs = list(x.values())
        return self._finish(self.top_down(inputs), inputs)


class PANet(FPN):
    """FPN plus bottom-up path augmentation (Liu et al. 2018, PANet).

    N_finest = P_finest; N_{k+1} = ReLU(conv3x3(ReLU(conv3x3_stride2(N_k)) + P_{k+1})).
    """

    def __init__(self, in_channels_list: list[int], out_channels: int, *, norm: Norm = None, **kwargs):
        super().__init__(in_channels_list, out_channels, norm=norm, **kwargs)
        n = len(in_channels_list) - 1
        self.down = nn.ModuleList(_conv(out_channels, out_channels, 3, norm, stride=2, act=True) for _ in range(n))
        self.fuse = nn.ModuleList(_conv(out_channels, out_channels, 3, norm, act=True) for _ in range(n))
        _init(self)

    def forward(self, x: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        inputs = list(x.values())
        p = self.top_down(inputs)
        n = [p[0]]
        for i in range(1, len(p)):
            down = self.down[i - 1](n[-1])
            if down.shape[-2:] != p[i].shape[-2:]:
                down = F.interpolate(down, size=p[i].shape[-2:], mode="nearest")
            n.append(self.fuse[i - 1](down + p[i]))
        return self._finish(n, inputs)


class _WeightedFusion(nn.Module):
    """EfficientDet's fast normalised fusion: sum(relu(w_i) * x_i) / (sum(relu(w_i)) + eps), then a conv."""

    def __init__(self, n_inputs: int, channels: int, norm: Norm):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(n_inputs))
        self.conv = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),  # depthwise
            _conv(channels, channels, 1, norm),  # pointwise
        )

    def forward(self, xs: list[Tensor]) -> Tensor:
        w = F.relu(self.weights)
        w = w / (w.sum() + 1e-4)
        return self.conv(F.silu(sum(wi * xi for wi, xi in zip(w, xs))))


class BiFPN(_Neck):
    """BiFPN (Tan et al. 2020): 1x1 laterals, then `repeats` bidirectional weighted-fusion layers."""

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        *,
        out_names: list[str],
        repeats: int = 2,
        extra: ExtraLevels | None = None,
        norm: Norm = None,
        upsample: str = "nearest",
    ):
        super().__init__(out_names, extra)
        if repeats < 1:
            raise ValueError(f"bifpn_repeats must be >= 1, got {repeats}")
        n = len(in_channels_list)
        self.lateral = nn.ModuleList(_conv(c, out_channels, 1, norm) for c in in_channels_list)
        self.top_down_fusion = nn.ModuleList(
            nn.ModuleList(_WeightedFusion(2, out_channels, norm) for _ in range(n - 1)) for _ in range(repeats)
        )
        self.bottom_up_fusion = nn.ModuleList(
            nn.ModuleList(_WeightedFusion(3 if i < n - 1 else 2, out_channels, norm) for i in range(1, n))
            for _ in range(repeats)
        )
        self.upsample = _Upsample("bilinear" if upsample == "bilinear" else "nearest", out_channels)
        _init(self)

    def forward(self, x: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        inputs = list(x.values())
        feats = [lat(c) for lat, c in zip(self.lateral, inputs)]
        n = len(feats)
        for td, bu in zip(self.top_down_fusion, self.bottom_up_fusion):
            mid = list(feats)
            for i in range(n - 2, -1, -1):
                mid[i] = td[i]([feats[i], self.upsample(mid[i + 1], feats[i].shape[-2:])])
            out = [mid[0]]
            for i in range(1, n):
                down = F.adaptive_max_pool2d(out[-1], feats[i].shape[-2:])
                fused = [feats[i], mid[i], down] if i < n - 1 else [feats[i], down]
                out.append(bu[i - 1](fused))
            feats = out
        return self._finish(feats, inputs)


class SingleScale(_Neck):
    """One map (C4- or C5-derived) with a 1x1 lateral and a 3x3 conv, no top-down path."""

    def __init__(self, in_channels: int, out_channels: int, *, source: str, out_name: str, norm: Norm = None):
        super().__init__([out_name], None)
        self.source = source
        self.lateral = _conv(in_channels, out_channels, 1, norm)
        self.output = _conv(out_channels, out_channels, 3, norm)
        _init(self)

    def forward(self, x: dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        return self._finish([self.output(self.lateral(x[self.source]))], [])


def build_neck(cfg: ModelConfig, in_channels: list[int], in_names: list[str]) -> _Neck:
    """The neck named by `cfg.neck`, with `cfg.extra` levels appended."""
    norm = norm_layer(cfg.neck_norm)
    out_names = level_names("p", cfg.levels)
    d = cfg.out_channels
    if cfg.neck == "single":
        source = f"c{cfg.single_level}"
        if source not in in_names:
            raise ValueError(f"single_level={cfg.single_level} needs backbone map {source}; backbone gives {in_names}")
        return SingleScale(in_channels[in_names.index(source)], d, source=source, out_name=out_names[0], norm=norm)
    extra: ExtraLevels | None = {
        "pool": lambda: MaxPoolP6(),
        "p6p7": lambda: ConvP6P7(d, d),
        "p6p7_c5": lambda: ConvP6P7(in_channels[-1], d, from_c5=True),
        "none": lambda: None,
    }[cfg.extra]()
    if cfg.neck == "bifpn":
        return BiFPN(in_channels, d, out_names=out_names, repeats=cfg.bifpn_repeats, extra=extra, norm=norm,
                     upsample=cfg.upsample)
    cls = PANet if cfg.neck == "panet" else FPN
    return cls(in_channels, d, out_names=out_names, upsample=cfg.upsample, extra=extra, norm=norm)
