"""FPN neck cost against its backbone at 800x800 on this CPU: wall time and multiply-accumulates.

For each neck (fpn, panet, bifpn) on ResNet-50 C2..C5 (d = 256, P6 included), measures
  - MACs of the backbone and of the neck (torch's FlopCounterMode; MACs = FLOPs / 2),
  - median wall time of the backbone forward and of the neck forward on precomputed C2..C5,
and writes benchmarks/results/neck_cost.json. Run: python benchmarks/neck_cost.py [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fpn_model.backbone import build_backbone
from fpn_model.config import ModelConfig
from fpn_model.fpn import build_neck


def macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "neck_cost.json"))
    a = ap.parse_args()
    x = torch.rand(1, 3, a.size, a.size)
    cfg = ModelConfig(backbone=a.backbone)
    body = build_backbone(cfg).eval()
    feats = body(x)
    result = {
        "input": [1, 3, a.size, a.size], "backbone": a.backbone, "out_channels": cfg.out_channels,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "backbone_macs": macs(lambda: body(x)), "backbone_s": median_time(lambda: body(x), a.repeats), "necks": {},
    }
    for neck_name in ("fpn", "panet", "bifpn"):
        neck = build_neck(cfg.replace(neck=neck_name), body.channels, body.names).eval()
        m = macs(lambda: neck(feats))
        t = median_time(lambda: neck(feats), a.repeats)
        result["necks"][neck_name] = {
            "params": sum(p.numel() for p in neck.parameters()), "macs": m, "seconds": t,
            "macs_vs_backbone": m / result["backbone_macs"], "time_vs_backbone": t / result["backbone_s"],
        }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"backbone {a.backbone}: {result['backbone_macs'] / 1e9:.1f} GMAC, {result['backbone_s'] * 1e3:.0f} ms")
    for k, v in result["necks"].items():
        print(f"{k:6s} {v['macs'] / 1e9:6.1f} GMAC ({v['macs_vs_backbone']:.0%} of backbone)  "
              f"{v['seconds'] * 1e3:6.0f} ms ({v['time_vs_backbone']:.0%} of backbone)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
