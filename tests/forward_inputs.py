"""Inputs for the forward-speed comparisons: real video frames, and torchvision's fasterrcnn_mobilenet_v3_large_fpn
with seeded random weights made usable. Shared by tests/test_model.py (the fast path's exactness) and
benchmarks/forward_speed.py and throughput.py (its speed), so that the tests check what the benchmarks time."""
from __future__ import annotations

import numpy as np
import torch


def video_frames(video: str, n: int | None = None, every_n: int = 1) -> list[np.ndarray]:
    """Every `every_n`th frame of `video` from the first (RGB uint8), at most `n` of them (None: all)."""
    import av

    frames = []
    with av.open(str(video)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i % every_n == 0:
                frames.append(f.to_ndarray(format="rgb24"))
                if len(frames) == n:
                    break
    return frames


def calibrated_mobilenet_v3_state_dict(frames: list[np.ndarray], *, seed: int = 0,
                                       boost: float = 6.0) -> dict[str, torch.Tensor]:
    """torchvision's fasterrcnn_mobilenet_v3_large_fpn state dict with seeded random weights made usable, as
    torchvision's COCO weights would come: BatchNorm statistics from `frames` (else the random features vanish),
    class logits scaled by `boost` so that some detections pass the 0.05 score threshold."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    torch.manual_seed(seed)
    tv = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91).eval()
    for bn in (m for m in tv.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batch
        bn.train()
    with torch.inference_mode():
        images, _ = tv.transform([torch.from_numpy(f).permute(2, 0, 1).float().div(255) for f in frames])
        tv.backbone(images.tensors)
    tv.eval()
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(boost)
    return tv.state_dict()


def calibrated_mobilenet_v3_fpn(frames: list[np.ndarray], min_size: int, *, seed: int = 0,
                                boost: float = 6.0) -> torch.nn.Module:
    """`calibrated_mobilenet_v3_state_dict` imported as `fpn import-torchvision` does."""
    from fpn_model.weights import import_torchvision

    return import_torchvision("fasterrcnn_mobilenet_v3_large_fpn",
                              calibrated_mobilenet_v3_state_dict(frames, seed=seed, boost=boost), min_size=min_size)
