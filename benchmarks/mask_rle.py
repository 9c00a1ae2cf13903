"""Seconds to encode one frame's Mask R-CNN masks as COCO RLE on a CPU, three ways: as before (each mask pasted into
a frame-sized array and encoded by its own `pycocotools.mask.encode` call), `fpn_model.rle.chunks_to_rle` (a
chunk of masks per pycocotools call: what a CPU detector runs) and `fpn_model.rle.runs_to_rle` (run boundaries
found by tensor operations: what a GPU detector runs, timed here on the CPU). Masks as Mask R-CNN's postprocess gives them: frame-sized,
each an ellipse inside its box. Alternating, medians; results equal (checked). Writes
benchmarks/results/mask_rle.json.

    .venv/bin/python benchmarks/mask_rle.py [--detections 100] [--height 1080 --width 1920]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from fpn_model.rle import chunks_to_rle, runs_to_rle

RESULTS = Path(__file__).resolve().parent / "results" / "mask_rle.json"


def masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        bw, bh = rng.integers(8, 200), rng.integers(8, 200)
        cx, cy = rng.integers(0, w), rng.integers(0, h)
        out[i] = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
    return torch.from_numpy(out)


def one_by_one(m: torch.Tensor, h: int, w: int) -> list[dict]:
    """The encoding before fpn_model.rle (Predictor._masks at 55f8452)."""
    rles = []
    for single in m.numpy():
        full = np.zeros((h, w), dtype=np.uint8, order="F")
        full[:single.shape[0], :single.shape[1]] = single
        rle = mask_utils.encode(full)
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detections", type=int, default=100)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    m = masks(a.detections, a.height, a.width)
    frame = dict(x0=0, y0=0, height=a.height, width=a.width)
    ways = {"one_by_one": lambda: one_by_one(m, a.height, a.width), "chunks": lambda: chunks_to_rle(m, **frame),
            "runs": lambda: runs_to_rle(m, **frame)}
    expected = ways["one_by_one"]()
    assert all(fn() == expected for fn in ways.values()), "the encodings differ"
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(a.rounds):
        for k, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(round(time.perf_counter() - t0, 4))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"detections": a.detections, "frame_hw": [a.height, a.width], "threads": 1,
              "seconds": {k: {"median": med[k], "runs": times[k]} for k in ways},
              "speedup": {k: round(med["one_by_one"] / med[k], 2) for k in ("chunks", "runs")}, "same_rles": True,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "speedup")}))


if __name__ == "__main__":
    main()
