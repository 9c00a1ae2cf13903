"""The fixed cost of a job: `fpn run` on one small image beside an embedded `ray.init()` and shutdown alone.

Alternating rounds (each a fresh process): `ray`: `python -c "import ray; ray.init(...); ray.shutdown()"`;
`fpn`: `fpn run SOAP_061.png -o OUT` with the bundled `trees` model (400x400: one forward); `null`: the same with
a model that returns nothing (benchmarks/null_model.py). Fixed cost = median(fpn) - median(ray): what a job costs
beyond Ray's own start. Writes benchmarks/results/startup.json.

    .venv/bin/python benchmarks/startup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "startup.json"
IMAGE = REPO / "data" / "aerial-trees" / "SOAP_061.png"
RAY = "import ray; ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False); ray.shutdown()"


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed: {p.stdout[-1000:]}{p.stderr[-2000:]}")
    return round(wall, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    runs: dict[str, list[float]] = {"ray": [], "fpn": [], "null": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            runs["ray"].append(timed([sys.executable, "-c", RAY]))
            runs["fpn"].append(timed([sys.executable, "-m", "jobs.cli", "run", str(IMAGE), "-o", f"{tmp}/f{rep}"]))
            runs["null"].append(timed([sys.executable, "-m", "jobs.cli", "run", str(IMAGE), "-o", f"{tmp}/n{rep}",
                                       "-m", null]))
            print(rep, {k: v[-1] for k, v in runs.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {k: {"median_s": round(med[k], 3), "min_s": min(v), "max_s": max(v), "runs": v} for k, v in runs.items()}
    result["fixed_cost_s"] = round(med["fpn"] - med["ray"], 3)
    result["fixed_cost_null_model_s"] = round(med["null"] - med["ray"], 3)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("fixed_cost_s", "fixed_cost_null_model_s")}),
          {k: result[k]["median_s"] for k in runs})


if __name__ == "__main__":
    main()
