"""`fpn render --clip` of a Mask R-CNN output: seconds and mask decodes for a clip of a sampled video job.

A synthetic output of data/video/bikes.mp4 (250 frames, 640x272, 25 fps) as a job with `--every` processed it:
each processed frame with `--detections` Mask R-CNN detections (an ellipse inside each random box, COCO RLE over
the frame, as the pipeline writes them). `jobs.render.render_clip` of the whole video, in a fresh process per run,
of this tree and, with `--before TREE` (another source tree, e.g. a checkout of an older commit), of that one,
alternating `--rounds`: `clip_s` the whole call (the source decoded, the frames drawn, the MP4 encoded),
`draw_s` the same with the encoder replaced by a loop that only takes the frames, and `decodes` the masks decoded
(calls of `jobs.render.rle_columns`). Medians; `same_clip`: the two trees' MP4s decode to the same pixels.
Writes benchmarks/results/render_clip.json with `--before` (the comparison the README quotes), else
benchmarks/results/render_clip_this.json (this tree alone, as `make bench` runs it), or `--out`.

    .venv/bin/python benchmarks/render_clip.py [--every 10] [--detections 30] [--rounds 3] [--before /tmp/old]
        [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _meta import code_of, measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "data" / "video" / "bikes.mp4"
RESULTS = REPO / "benchmarks" / "results" / "render_clip.json"

# run in a fresh process with PYTHONPATH=<tree>: argv output, video, dest, mode (mp4 | draw)
CHILD = """
import json, sys, time
import jobs.render as render
output, video, dest, mode = sys.argv[1:]
calls = [0]
columns = render.rle_columns
def counted(counts, height):
    calls[0] += 1
    return columns(counts, height)
render.rle_columns = counted
if mode == "draw":
    render.write_video = lambda frames, path, fps: sum(1 for _ in frames)
t0 = time.perf_counter()
r = render.render_clip(output, video, dest, 0.0, 1e6)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 3), "decodes": calls[0], "frames": r.frames,
                  "boxes": r.boxes}))
"""


def write_output(out: Path, every: int, detections: int) -> int:
    """The synthetic Mask R-CNN output of bikes.mp4 at `out`; returns the processed frames."""
    import pyarrow as pa
    from pycocotools import mask as mask_utils

    from pipeline.decode import open_video
    from pipeline.output import Output, frame_id, frame_schema
    from pipeline.storage import canonical_uri

    v = open_video(str(VIDEO), "pyav")
    n, w, h, fps = v.num_frames, v.width, v.height, v.fps
    src, rng = canonical_uri(str(VIDEO)), np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    rows = []
    for i in range(0, n, every):
        dets = []
        for _ in range(detections):
            bw, bh = int(rng.integers(16, 160)), int(rng.integers(16, 120))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            m = ((xx - x1 - bw / 2) / (bw / 2)) ** 2 + ((yy - y1 - bh / 2) / (bh / 2)) ** 2 <= 1
            counts = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
            label = int(rng.integers(1, 10))
            dets.append({"x1": x1, "y1": y1, "x2": x1 + bw, "y2": y1 + bh, "score": 0.9, "label": label,
                         "label_name": f"c{label}", "level": 2, "mask": {"size": [h, w], "counts": counts}})
        rows.append({"frame_id": frame_id(src, i), "source": src, "source_kind": "video", "frame_index": i,
                     "pts_s": i / fps, "width": w, "height": h, "num_detections": len(dets), "model": "synthetic",
                     "detections": dets, "window_x": 0, "window_y": 0, "window_width": w, "window_height": h})
    Output(str(out)).write_frames(pa.Table.from_pylist(rows, schema=frame_schema(with_masks=True)))
    return len(rows)


def same_pixels(a: Path, b: Path) -> bool:
    from pipeline.decode import open_video

    va, vb = open_video(str(a), "pyav"), open_video(str(b), "pyav")
    if va.num_frames != vb.num_frames:
        return False
    chunks = [list(range(i, min(i + 50, va.num_frames))) for i in range(0, va.num_frames, 50)]
    return all((va.frames(idx) == vb.frames(idx)).all() for idx in chunks)


def run_once(tree: Path, output: Path, dest: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(output), str(VIDEO), str(dest), mode], cwd=tree, env=env,
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"render_clip in {tree} failed: {p.stdout[-1000:]}{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--detections", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another source tree to run alternately")
    ap.add_argument("--out", type=Path, help="where the JSON goes  [default: results/render_clip.json with --before, "
                    "else results/render_clip_this.json]")
    a = ap.parse_args()
    out = a.out or (RESULTS if a.before else RESULTS.with_name("render_clip_this.json"))
    trees = {"this": REPO, **({"before": a.before.resolve()} if a.before else {})}
    runs: dict[str, dict[str, list[dict]]] = {k: {"mp4": [], "draw": []} for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        processed = write_output(Path(tmp) / "out", a.every, a.detections)
        for _ in range(a.rounds):
            for mode in ("mp4", "draw"):
                for name, tree in trees.items():
                    runs[name][mode].append(run_once(tree, Path(tmp) / "out", Path(tmp) / f"{name}.mp4", mode))
                    print(name, mode, runs[name][mode][-1], flush=True)
        same = same_pixels(*(Path(tmp) / f"{name}.mp4" for name in trees)) if a.before else None
    summary = {name: {"clip_s": statistics.median(r["seconds"] for r in rs["mp4"]),
                      "draw_s": statistics.median(r["seconds"] for r in rs["draw"]),
                      "decodes": rs["mp4"][0]["decodes"], "frames": rs["mp4"][0]["frames"]}
               for name, rs in runs.items()}
    if "before" in summary:  # the medians' ratio, and the median of each round's (the host's speed drifts)
        for mode, key in (("mp4", "clip"), ("draw", "draw")):
            summary[f"{key}_this_over_before"] = round(summary["this"][f"{key}_s"] / summary["before"][f"{key}_s"], 3)
            summary[f"{key}_round_ratio"] = round(statistics.median(
                t["seconds"] / b["seconds"] for t, b in zip(runs["this"][mode], runs["before"][mode])), 3)
    doc = {**measured(), "video": "data/video/bikes.mp4", "every": a.every, "processed_frames": processed,
           "detections_per_frame": a.detections, "before": str(a.before) if a.before else None,
           "before_code": code_of(a.before) if a.before else None, "cpus": os.cpu_count(), "same_clip": same,
           "summary": summary, "runs": runs}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({**summary, "same_clip": same}, indent=1))


if __name__ == "__main__":
    main()
