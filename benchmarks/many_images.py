"""An archive of many small images: `fpn run` over N snapshots with a model that costs nothing
(benchmarks/null_model.py), so what is measured is the pipeline's own cost per input: planning, decode tasks,
transfers, rows and writes.

N small RGB PNGs (160 x 120, noise, in 10 directories) are made once; then `fpn run DIR -o OUT -m null_model` of
this tree and, with `--before TREE` (another source tree, e.g. a `git worktree` of an older commit), of that one,
alternating `--repeats` rounds, each a fresh process into a fresh output. Each run's wall time, its own record of
frames/s and of where its start went (`_job.json` `frames_per_s`, `startup_s`). Writes
benchmarks/results/many_images.json with `--before` (the comparison the README quotes), else
benchmarks/results/many_images_this.json (this tree alone, as `make bench` runs it), or `--out`.

    .venv/bin/python benchmarks/many_images.py [--images 2000] [--repeats 2] [--before /tmp/old] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _meta import code_of, measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "many_images.json"


def make_images(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        d = root / f"cam{k % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (120, 160, 3), np.uint8)).save(d / f"snap{k:06d}.png")


def run_once(tree: Path, images: Path, out: Path) -> dict:
    """`fpn run` of `tree`'s code over `images` into `out`, in a fresh process: its wall time and its record."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(images), "-o", str(out), "-m",
           f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {p.stdout[-1000:]}{p.stderr[-2000:]}")
    job = json.loads((out / "_job.json").read_text())
    return {"wall_s": round(wall, 2), "frames": job["frames"], "frames_per_s": job.get("frames_per_s"),
            "startup_s": job.get("startup_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--before", type=Path, help="another source tree to run alternately (e.g. a git worktree)")
    ap.add_argument("--out", type=Path, help="where the JSON goes  [default: results/many_images.json with --before, "
                    "else results/many_images_this.json]")
    a = ap.parse_args()
    out = a.out or (RESULTS if a.before else RESULTS.with_name("many_images_this.json"))
    trees = {"this": REPO, **({"before": a.before.resolve()} if a.before else {})}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "snaps"
        make_images(images, a.images)
        for r in range(a.repeats):
            for name, tree in trees.items():
                runs[name].append(run_once(tree, images, Path(tmp) / f"out-{name}-{r}"))
                print(name, runs[name][-1], flush=True)
    summary = {name: {"wall_s": statistics.median(x["wall_s"] for x in rs),
                      "frames_per_s": statistics.median(x["frames_per_s"] or 0 for x in rs)}
               for name, rs in runs.items()}
    if "before" in summary:
        summary["wall_this_over_before"] = round(summary["this"]["wall_s"] / summary["before"]["wall_s"], 3)
    doc = {**measured(), "images": a.images, "image_size": [160, 120], "model": "benchmarks/null_model.py",
           "before": str(a.before) if a.before else None,
           "before_code": code_of(a.before) if a.before else None, "cpus": os.cpu_count(),
           "summary": summary, "runs": runs}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
