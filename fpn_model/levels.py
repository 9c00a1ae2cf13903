"""RoI-to-level assignment (Lin et al. 2017, eq. 1) and the RoI pooler that uses it.

    k = floor(k0 + log2(sqrt(w * h) / 224)),  k0 = 4, clamped to [k_min, k_max]

A 224x224 RoI (ImageNet's canonical size) lands on P4; halving its side moves it one level down.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.boxes import box_area
from torchvision.ops.poolers import _setup_scales

__all__ = ["assign_levels", "PyramidRoIAlign", "CANONICAL_SCALE", "CANONICAL_LEVEL"]

CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
_EPS = 1e-6  # as torchvision: a box of exactly 224 px maps to level 4 despite float rounding
# torchvision adds torch.tensor(eps, dtype=s.dtype): the same number, as a Python scalar (a forward pass makes no
# tensor from Python numbers per image; on a GPU most such tensors are copies that wait for it: tests/test_model.py)
_EPS_IN = {dt: torch.tensor(_EPS, dtype=dt).item()
           for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def assign_levels(
    boxes: Tensor,
    k_min: int,
    k_max: int,
    *,
    canonical_scale: int = CANONICAL_SCALE,
    canonical_level: int = CANONICAL_LEVEL,
) -> Tensor:
    """Pyramid level for each box.

    Args:
        boxes: `[N, 4]` boxes (x1, y1, x2, y2) in input-image pixels.
        k_min, k_max: the lowest and highest level the pyramid has (e.g. 2 and 5 for P2..P5).
    Returns:
        `[N]` int64 levels in `[k_min, k_max]`.
    """
    if k_min > k_max:
        raise ValueError(f"k_min ({k_min}) must not exceed k_max ({k_max})")
    s = torch.sqrt(box_area(boxes))
    k = torch.floor(canonical_level + torch.log2(s / canonical_scale) + _EPS_IN[s.dtype])
    return torch.clamp(k, min=k_min, max=k_max).to(torch.int64)


class _Mapper:
    """Adapter giving `assign_levels` the call signature of torchvision's LevelMapper."""

    def __init__(self, k_min: int, k_max: int):
        self.k_min, self.k_max = k_min, k_max

    def __call__(self, boxlists: list[Tensor]) -> Tensor:
        return assign_levels(torch.cat(boxlists), self.k_min, self.k_max) - self.k_min


class PyramidRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign with level assignment done by `assign_levels`.

    The pyramid levels are inferred from the feature maps on the first call (as torchvision does);
    the per-level RoIAlign is torchvision's own.
    """

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if self.scales is None or not isinstance(self.map_levels, _Mapper):
            feats = [v for k, v in x.items() if k in self.featmap_names]
            self.scales, mapper = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
            self.map_levels = _Mapper(mapper.k_min, mapper.k_max)
        return super().forward(x, boxes, image_shapes)
