"""`fpn run` with the idle workers its embedded node keeps (jobs.runner.kept_workers) against Ray's default (one per
CPU), where the pipeline, not the model, sets the pace (as on a GPU node).

Ray's raylet ends any worker idle for a second while the node runs more workers than its `num_workers_soft_limit`
(default: its CPUs). A job's decode tasks hold half a CPU each and its writes a tenth, so a node runs more workers than
CPUs, and without a higher limit each pause ends some and the next tasks wait for fresh ones, which import Ray Data
again. Alternating rounds, each `fpn run` a fresh process and embedded node: bikes.mp4 played `--loop` times (every
frame), the model that finds nothing (benchmarks/null_model.py), batch 4, for each `--segment-frames` (the default
256, and 16: many short decode tasks); `ray_default` runs with RAY_num_workers_soft_limit=-1 (Ray's own rule, which
`fpn run` then leaves alone), `kept` as `fpn run` runs. Reports the job's wall time (`_job.json`) and the worker
processes the raylet started (its log). Writes benchmarks/results/idle_workers.json.

    .venv/bin/python benchmarks/idle_workers.py [--loop 5] [--repeats 3] [--segment-frames 256,16]
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

from _meta import measured  # benchmarks/ is this script's directory
from throughput import looped

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "idle_workers.json"
NULL_MODEL = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
VARIANTS = {"ray_default": {"RAY_num_workers_soft_limit": "-1"}, "kept": {}}


def once(video: str, out: Path, segment_frames: int, env_extra: dict[str, str], ray_tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_num_workers_soft_limit")}
    env.update(env_extra, RAY_TMPDIR=str(ray_tmp))
    cmd = [sys.executable, "-m", "jobs.cli", "run", video, "-o", str(out), "-m", NULL_MODEL, "--batch-size", "4",
           "--segment-frames", str(segment_frames)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    job = json.loads((out / "_job.json").read_text())
    raylet = ray_tmp / "ray" / "session_latest" / "logs" / "raylet.out"
    return {"wall_s": job["wall_s"], "frames": job["frames"],
            "workers_started": raylet.read_text().count("Started worker process")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", default=str(REPO / "data" / "video" / "bikes.mp4"))
    ap.add_argument("--loop", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--segment-frames", default="256,16")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    sizes = [int(s) for s in a.segment_frames.split(",")]
    runs: dict[str, dict[str, list[dict]]] = {str(s): {v: [] for v in VARIANTS} for s in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = looped(a.video, a.loop, tmp / "looped.mp4")
        for rep in range(a.repeats):
            for seg in sizes:
                for name, env in VARIANTS.items():
                    ray_tmp = tmp / f"ray-{seg}-{name}-{rep}"
                    ray_tmp.mkdir()
                    r = once(video, tmp / f"out-{seg}-{name}-{rep}", seg, env, ray_tmp)
                    runs[str(seg)][name].append(r)
                    print(rep, seg, name, r, flush=True)
    result = {"what": __doc__.split("\n\n")[0], **measured(), "cpus": os.cpu_count(), "loop": a.loop,
              "frames": runs[str(sizes[0])]["kept"][0]["frames"], "model": "benchmarks/null_model.py", "batch": 4}
    for seg, by_variant in runs.items():
        row = {}
        for name, rs in by_variant.items():
            row[name] = {"median_wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
                         "wall_s": [r["wall_s"] for r in rs], "workers_started": [r["workers_started"] for r in rs]}
        row["wall_ratio_kept"] = round(row["kept"]["median_wall_s"] / row["ray_default"]["median_wall_s"], 3)
        row["wall_ratio_kept_per_round"] = [round(k["wall_s"] / d["wall_s"], 3)
                                            for k, d in zip(by_variant["kept"], by_variant["ray_default"])]
        result[f"segment_frames_{seg}"] = row
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("segment_frames")}))


if __name__ == "__main__":
    main()
