"""Peak memory of `fpn export` on outputs of 10^6 and 10^7 detections: it must not grow with the output's size.

Writes two synthetic outputs through `pipeline.output.Output` (georeferenced raster windows in EPSG:32633, 1000
detections a frame), exports each as GeoParquet with `fpn export` in a separate process, samples its RSS (with its
children's: the dedup sort) every 0.1 s, and writes benchmarks/results/export_memory.json with both peaks, wall
times and the ratio of the peaks.

`--dedup`: the same with `fpn export --dedup 0.5` over outputs of two overlapping "scenes": frames 2k and 2k+1 come
from two sources and hold the same boxes 1 px apart, so half the detections are duplicates (written to
export_memory_dedup.json). What grows with the output is one byte per detection (the drop mask); DuckDB's sort
runs in a child process, capped at 256 MB and spilling to disk.

Run: python benchmarks/export_memory.py [--small 1000000] [--large 10000000] [--dedup]
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


def write_output(path: Path, detections: int, pairs: bool = False) -> None:
    out = Output(str(path))
    rng = np.random.default_rng(0)
    frames = detections // PER_FRAME
    transform = [0.1, 0.0, 500_000.0, 0.0, -0.1, 5_300_000.0]
    for start in range(0, frames, FRAMES_PER_FILE):
        n = min(FRAMES_PER_FILE, frames - start)
        m = n * PER_FRAME
        xy = rng.uniform(0, 2000, (m, 2)).astype(np.float32)
        wh = rng.uniform(5, 40, (m, 2)).astype(np.float32)
        if pairs:  # frame 2k+1 repeats frame 2k's boxes 1 px to the right
            xy.reshape(n, PER_FRAME, 2)[1::2] = xy.reshape(n, PER_FRAME, 2)[0::2] + [1.0, 0.0]
            wh.reshape(n, PER_FRAME, 2)[1::2] = wh.reshape(n, PER_FRAME, 2)[0::2]
        x1, y1, x2, y2 = xy[:, 0], xy[:, 1], xy[:, 0] + wh[:, 0], xy[:, 1] + wh[:, 1]
        # with --dedup each pair of frames has its own place on the ground (300 m apart): duplicates only in pairs
        east = np.repeat(300.0 * (np.arange(start, start + n) // 2), PER_FRAME) if pairs else np.zeros(m)
        fields = {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": rng.uniform(0, 1, m).astype(np.float32),
                  "label": np.ones(m, np.int32), "label_name": pa.array(["Tree"] * m), "level": np.full(m, 2, np.int8),
                  "map_x1": 500_000 + east + 0.1 * x1.astype(np.float64), "map_y1": 5_300_000 - 0.1 * y2.astype(np.float64),
                  "map_x2": 500_000 + east + 0.1 * x2.astype(np.float64), "map_y2": 5_300_000 - 0.1 * y1.astype(np.float64)}
        structs = pa.StructArray.from_arrays([pa.array(fields[f.name], f.type) for f in DETECTION_TYPE],
                                             fields=list(DETECTION_TYPE))
        dets = pa.ListArray.from_arrays(pa.array(np.arange(0, m + 1, PER_FRAME, dtype=np.int32)), structs)
        idx = list(range(start, start + n))
        srcs = [f"/synthetic-{i % 2}.tif" if pairs else "/synthetic.tif" for i in idx]
        cols = {"frame_id": [frame_id(s, i) for s, i in zip(srcs, idx)], "source": srcs,
                "source_kind": ["raster"] * n, "frame_index": idx, "pts_s": [None] * n, "width": [20000] * n,
                "height": [20000] * n, "num_detections": [PER_FRAME] * n, "detections": dets, "model": ["synthetic"] * n,
                "window_x": [0] * n, "window_y": [0] * n, "window_width": [2048] * n, "window_height": [2048] * n,
                "crs": ["EPSG:32633"] * n,
                "transform": [[*transform[:2], transform[2] + (300.0 * (i // 2) if pairs else 0), *transform[3:]]
                              for i in idx], "all_nodata": [False] * n, "decoded_frames": [1] * n,
                "stac_item": [None] * n, "datetime": [None] * n}
        out.write_frames(pa.Table.from_pydict(cols, schema=FRAME_SCHEMA))


def peak_export(output: Path, dest: Path, extra: tuple = ()) -> tuple[int, int, float]:
    """(peak RSS of the export's process tree, of the export process alone, wall seconds)."""
    t0 = time.monotonic()
    proc = psutil.Popen([sys.executable, "-m", "jobs.cli", "export", str(output), "-o", str(dest), *extra],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = own = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss
            own, peak = max(own, rss), max(peak, rss + sum(p.memory_info().rss for p in proc.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.1)
    text = proc.stdout.read().decode()
    if proc.returncode:
        raise RuntimeError(text)
    print(text.strip())
    return peak, own, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--large", type=int, default=10_000_000)
    ap.add_argument("--dedup", action="store_true")
    a = ap.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("small", a.small), ("large", a.large)):
            out = Path(tmp) / name
            write_output(out, n, pairs=a.dedup)
            peak, own, wall = peak_export(out, Path(tmp) / f"{name}.parquet", ("--dedup", "0.5") if a.dedup else ())
            result[name] = {"detections": n, "peak_rss_mb": round(peak / 2**20, 1),
                            "peak_export_process_rss_mb": round(own / 2**20, 1), "wall_s": round(wall, 1)}
            print(name, result[name])
    result["peak_ratio"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 3)
    dest = Path(__file__).parent / "results" / f"export_memory{'_dedup' if a.dedup else ''}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
