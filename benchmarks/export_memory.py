"""Peak memory of `fpn export` on outputs of 10^6 and 10^7 detections: it must not grow with the output's size.

Writes two synthetic outputs through `pipeline.output.Output` (georeferenced raster windows in EPSG:32633, 1000
detections a frame), exports each as GeoParquet with `fpn export` in a separate process, samples its RSS every
0.1 s, and writes benchmarks/results/export_memory.json with both peaks, wall times and the ratio of the peaks.

Run: python benchmarks/export_memory.py [--small 1000000] [--large 10000000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from pipeline.output import DETECTION_TYPE, FRAME_SCHEMA, Output, frame_id

PER_FRAME = 1000
FRAMES_PER_FILE = 200


def write_output(path: Path, detections: int) -> None:
    out = Output(str(path))
    rng = np.random.default_rng(0)
    frames = detections // PER_FRAME
    transform = [0.1, 0.0, 500_000.0, 0.0, -0.1, 5_300_000.0]
    for start in range(0, frames, FRAMES_PER_FILE):
        n = min(FRAMES_PER_FILE, frames - start)
        m = n * PER_FRAME
        xy = rng.uniform(0, 2000, (m, 2)).astype(np.float32)
        wh = rng.uniform(5, 40, (m, 2)).astype(np.float32)
        x1, y1, x2, y2 = xy[:, 0], xy[:, 1], xy[:, 0] + wh[:, 0], xy[:, 1] + wh[:, 1]
        fields = {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": rng.uniform(0, 1, m).astype(np.float32),
                  "label": np.ones(m, np.int32), "label_name": pa.array(["Tree"] * m), "level": np.full(m, 2, np.int8),
                  "map_x1": 500_000 + 0.1 * x1.astype(np.float64), "map_y1": 5_300_000 - 0.1 * y2.astype(np.float64),
                  "map_x2": 500_000 + 0.1 * x2.astype(np.float64), "map_y2": 5_300_000 - 0.1 * y1.astype(np.float64)}
        structs = pa.StructArray.from_arrays([pa.array(fields[f.name], f.type) for f in DETECTION_TYPE],
                                             fields=list(DETECTION_TYPE))
        dets = pa.ListArray.from_arrays(pa.array(np.arange(0, m + 1, PER_FRAME, dtype=np.int32)), structs)
        idx = list(range(start, start + n))
        cols = {"frame_id": [frame_id("/synthetic.tif", i) for i in idx], "source": ["/synthetic.tif"] * n,
                "source_kind": ["raster"] * n, "frame_index": idx, "pts_s": [None] * n, "width": [20000] * n,
                "height": [20000] * n, "num_detections": [PER_FRAME] * n, "detections": dets, "model": ["synthetic"] * n,
                "window_x": [0] * n, "window_y": [0] * n, "window_width": [2048] * n, "window_height": [2048] * n,
                "crs": ["EPSG:32633"] * n, "transform": [transform] * n, "all_nodata": [False] * n,
                "stac_item": [None] * n, "datetime": [None] * n}
        out.write_frames(pa.Table.from_pydict(cols, schema=FRAME_SCHEMA))


def peak_export(output: Path, dest: Path) -> tuple[int, float]:
    t0 = time.monotonic()
    proc = psutil.Popen([sys.executable, "-m", "jobs.cli", "export", str(output), "-o", str(dest)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    text = proc.stdout.read().decode()
    if proc.returncode:
        raise RuntimeError(text)
    print(text.strip())
    return peak, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--large", type=int, default=10_000_000)
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("small", a.small), ("large", a.large)):
            out = Path(tmp) / name
            write_output(out, n)
            peak, wall = peak_export(out, Path(tmp) / f"{name}.parquet")
            result[name] = {"detections": n, "peak_rss_mb": round(peak / 2**20, 1), "wall_s": round(wall, 1)}
            print(name, result[name])
    result["peak_ratio"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 3)
    dest = Path(__file__).parent / "results" / "export_memory.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
