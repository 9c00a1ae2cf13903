"""Time, peak memory and page size of `fpn report` on a large output (the target: 10^6 frames in under a
minute, under 2 GiB, a page under 20 MB).

Writes a synthetic output through `pipeline.output.Output` (the same files `fpn run` writes): `--videos` real
video files (small frames, so they encode fast) with one row per frame, Poisson(`--boxes`) detections per
frame over five classes with log-uniform sizes and the pyramid level the R-CNN assignment gives them, one
real GeoTIFF with `--windows` rows (raster windows), and `--errors` error rows whose messages hold a signed URL
(the page must not show the signature). Then runs `fpn report` on it as a separate process under
/usr/bin/time -v, and writes benchmarks/results/report_scale.json.

Run: python benchmarks/report_scale.py [--frames 10000] [--work DIR] (DIR keeps the media and output between
runs of the same size).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs.render import write_video
from pipeline.output import DETECTION_TYPE, FRAME_SCHEMA, Output
from pipeline.storage import canonical_uri

CLASSES = ["car", "person", "boat", "tree", "roof"]
FPS = 25.0
CHUNK = 100_000  # rows per frames file


def _video(path: Path, n: int, seed: int) -> None:
    """A 64x48 clip of `n` frames: a bar moving over a dark background (encodes at thousands of frames/s)."""
    base = np.full((48, 64, 3), 30 + 20 * seed, np.uint8)

    def frames():
        for i in range(n):
            f = base.copy()
            f[:, (i // 5) % 64] = 230
            yield f

    write_video(frames(), path, FPS)


def _raster(path: Path, side: int) -> None:
    import rasterio

    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (3, side // 16, side // 16), dtype=np.uint8).repeat(16, 1).repeat(16, 2)
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", tiled=True,
                       crs="EPSG:3857", transform=rasterio.transform.from_origin(0, side, 0.25, 0.25)) as ds:
        ds.write(data)


def _detections(rng, n_frames: int, mean: float, width: int, height: int, origin=(0, 0)) -> tuple[pa.Array, np.ndarray]:
    """Per-frame lists of detections (Arrow, built from numpy columns) and the count per frame; `origin`: per-frame
    offsets of the frame in its source (raster windows)."""
    counts = rng.poisson(mean, n_frames).astype(np.int32)
    total = int(counts.sum())
    side = np.exp(rng.uniform(np.log(4), np.log(min(width, height) / 2), total)).astype(np.float32)
    aspect = rng.uniform(0.6, 1.6, total).astype(np.float32)
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x1 = rng.uniform(0, 1, total).astype(np.float32) * (width - bw) + np.repeat(np.broadcast_to(origin[0], n_frames), counts).astype(np.float32)
    y1 = rng.uniform(0, 1, total).astype(np.float32) * (height - bh) + np.repeat(np.broadcast_to(origin[1], n_frames), counts).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), total).astype(np.int32)
    level = np.clip(np.floor(4 + np.log2(np.sqrt(bw * bh) / 224)), 2, 5).astype(np.int8)
    given = {"x1": x1, "y1": y1, "x2": x1 + bw, "y2": y1 + bh, "score": rng.beta(2, 3, total).astype(np.float32),
             "label": labels, "label_name": np.array(CLASSES)[labels], "level": level}
    structs = pa.StructArray.from_arrays(_columns(given, DETECTION_TYPE, total), fields=list(DETECTION_TYPE))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, structs, type=pa.list_(DETECTION_TYPE)), counts


def _columns(given: dict, fields, n: int) -> list[pa.Array]:
    """Arrow columns for every field of `fields` (a schema or struct type): given ones, nulls for the rest."""
    return [pa.array(given[f.name], f.type) if f.name in given else pa.nulls(n, f.type) for f in fields]


def _frames_table(source: str, kind: str, index: np.ndarray, pts, width: int, height: int, dets: pa.Array,
                  counts: np.ndarray, windows=None) -> pa.Table:
    from pipeline.output import frame_id

    n = len(index)
    wx, wy, ww, wh = windows if windows is not None else (np.zeros(n), np.zeros(n), np.full(n, width),
                                                          np.full(n, height))
    given = {"frame_id": [frame_id(source, int(i)) for i in index], "source": [source] * n, "source_kind": [kind] * n,
             "frame_index": index, "pts_s": pts, "width": np.full(n, width), "height": np.full(n, height),
             "num_detections": counts, "model": ["synthetic"] * n, "window_x": wx, "window_y": wy,
             "window_width": ww, "window_height": wh}
    cols = _columns(given, FRAME_SCHEMA, n)
    cols[FRAME_SCHEMA.get_field_index("detections")] = dets
    return pa.Table.from_arrays(cols, schema=FRAME_SCHEMA)


def make_output(root: Path, frames: int, videos: int, windows: int, errors: int, boxes: float) -> dict:
    """The synthetic output under root/out (media under root/media); returns what it holds."""
    out_dir, media = root / "out", root / "media"
    marker = root / f"made-{frames}-{videos}-{windows}-{errors}-{boxes}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = Output(str(out_dir))
    per_video = (frames - windows) // videos
    det_total = 0
    t0 = time.monotonic()
    for v in range(videos):
        path = media / f"video{v}.mp4"
        _video(path, per_video, v)
        src = canonical_uri(str(path))
        for start in range(0, per_video, CHUNK):
            idx = np.arange(start, min(per_video, start + CHUNK))
            dets, counts = _detections(rng, len(idx), boxes, 1920, 1080)  # rows as a 1080p video would have them
            det_total += int(counts.sum())
            out.write_frames(_frames_table(src, "video", idx, idx / FPS, 1920, 1080, dets, counts))
    side = 64 * math.ceil(math.sqrt(windows))
    tif = media / "scene.tif"
    _raster(tif, side)
    src = canonical_uri(str(tif))
    k = np.arange(windows)
    per_row = side // 64
    wx, wy = (k % per_row) * 64, (k // per_row) * 64
    dets, counts = _detections(rng, windows, boxes, 64, 64, origin=(wx, wy))
    det_total += int(counts.sum())
    out.write_frames(_frames_table(src, "raster", k, [None] * windows, side, side, dets, counts,
                                   (wx, wy, np.full(windows, 64), np.full(windows, 64))))
    for e in range(0, errors, 1000):
        rows = [{"source": f"s3://archive/cam{i}.mp4", "stage": "decode", "frame_index": i, "error_type": "ValueError",
                 "message": f"https://archive.s3.amazonaws.com/cam{i}.mp4?X-Amz-Signature=deadbeefsecret{i} timed out"}
                for i in range(e, min(errors, e + 1000))]
        out.write_errors(rows, f"bench-{e}")
    made = {"frames": frames - (frames - windows) % videos, "detections": det_total, "errors": errors,
            "videos": videos, "raster_windows": windows, "made_in_s": round(time.monotonic() - t0, 1)}
    marker.write_text(json.dumps(made))
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--windows", type=int, default=1024, help="raster windows among the frames")
    ap.add_argument("--errors", type=int, default=2000)
    ap.add_argument("--boxes", type=float, default=4.0, help="mean detections per frame")
    ap.add_argument("--work", help="keep media and output here (default: a temporary directory)")
    ap.add_argument("--result", default=str(Path(__file__).parent / "results" / "report_scale.json"))
    a = ap.parse_args()
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="fpn-report-scale-")
    root = Path(a.work or tmp.name)
    made = make_output(root, a.frames, a.videos, a.windows, a.errors, a.boxes)
    page = root / "report.html"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "jobs.cli", "report", str(root / "out"), "-o", str(page)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall = time.monotonic() - t0
    if p.returncode:
        sys.exit(f"fpn report failed ({p.returncode}): {p.stdout}{p.stderr}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    html = page.read_text()
    result = {
        "output": made, "report_wall_s": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
        "page_mb": round(page.stat().st_size / 2**20, 2), "cli_line": p.stdout.strip(),
        "signatures_on_page": html.count("deadbeefsecret"),
        "targets": {"wall_s": "< 60 at 10^6 frames", "peak_rss_mb": "< 2048", "page_mb": "< 20"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": " ".join(["python benchmarks/report_scale.py", *sys.argv[1:]]),
    }
    Path(a.result).parent.mkdir(parents=True, exist_ok=True)
    Path(a.result).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
