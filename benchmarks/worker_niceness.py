"""The same forward in a Ray actor with Ray's default worker niceness (15) and at the driver's (0).

Ray starts worker processes at nice 15, below its daemons (GCS, raylet, agents) and the driver; on a node whose
cores a detector's torch threads fill, every wake-up of those preempts a thread, and its partner waits at the
next barrier. Alternating rounds, each a fresh embedded Ray (`RAY_worker_niceness`, as `fpn run`'s embedded Ray
sets it with `_system_config`): one actor runs `throughput.bare` (the Predictor alone over sampled frames of the
looped clip, 2 threads, batch 4, 512 px) and reports its wall time. Writes benchmarks/results/worker_niceness.json.

    .venv/bin/python benchmarks/worker_niceness.py [--repeats 3] [--loop 10]
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "worker_niceness.json"
ACTOR = """
import json, os, sys
import ray
from fpn_model.memory import keep_freed_memory_env
ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=1, runtime_env={"env_vars": keep_freed_memory_env()})
class Bare:
    def run(self, *args):
        sys.path.insert(0, os.path.join(%(repo)r, "benchmarks"))
        import throughput
        return {"nice": os.nice(0), **throughput.bare(*args)}

print(json.dumps(ray.get(Bare.remote().run.remote(%(video)r, 10, 4, %(scale)r, 2, "trees"))))
"""


def once(video: str, scale: float, niceness: int) -> dict:
    code = ACTOR % {"repo": str(REPO), "video": video, "scale": scale}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "RAY_worker_niceness": str(niceness)})
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import looped, video_shape

    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(REPO / "data" / "video" / "bikes.mp4"))
    ap.add_argument("--loop", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    _, h, w = video_shape(a.video)
    scale = round(512 / min(h, w), 4)
    load = os.getloadavg()
    runs: dict[str, list[dict]] = {"nice_15": [], "nice_0": []}
    with tempfile.TemporaryDirectory() as tmp:
        video = looped(a.video, a.loop, Path(tmp) / "looped.mp4")
        for rep in range(a.repeats):
            for name in runs:
                r = once(video, scale, int(name.split("_")[1]))
                assert r["nice"] == int(name.split("_")[1]), r
                runs[name].append(r)
                print(rep, name, r, flush=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    result = {"what": __doc__.split("\n\n")[0], "frames": runs["nice_0"][0]["frames"], "batch": 4, "threads": 2,
              "input_short_side": 512,
              **{k: {"median_s": round(med[k], 3), "min_s": min(r["wall_s"] for r in v),
                     "max_s": max(r["wall_s"] for r in v), "runs_s": [r["wall_s"] for r in v]}
                 for k, v in runs.items()},
              "speedup_nice_0": round(med["nice_15"] / med["nice_0"], 3),
              "load_average_before": load, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("nice_15", "nice_0", "speedup_nice_0")}))


if __name__ == "__main__":
    main()
