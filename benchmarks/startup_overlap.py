"""What overlapping the serial steps of a job's start would buy, before anyone builds it: `fpn run` on one image as
it is (`base`), and with one of two overlaps done from outside by a wrapper, no product code changed:

- `overlap`: Ray's start (`jobs.runner.init_ray`, on the main thread: `ray.init` sets signal handlers) while a
  thread imports Ray Data, which the driver otherwise imports first (the modules `ray.init` imports lazily are
  imported before, so the two threads never import the same module);
- `preload`: every worker of the embedded node also imports the detector's module (torch, torchvision) on a
  thread of its own as it starts (`_preload_detector.py`), so the detector actor, which starts after the plan,
  finds it imported;
- `both`.

Rounds alternate the variants (each a fresh process); medians of the wall time, of the time to the first frames
file (the command's own start + `startup_s.file`) and of each `startup_s` step. Neither paid where measured: on
the 2-core host wall 1.018 / 1.043 / 0.996 of the plain start (`benchmarks/results/startup_overlap.json`), on an
H200 node with 16 cores 1.085 / 1.127 / 1.055 (`GPU_OVERLAP=3 bash scripts/gpu-run`; `run2_startup_overlap` in
`benchmarks/results/gpu_h200_s32.json`).

    .venv/bin/python benchmarks/startup_overlap.py [--rounds 4] [--gpu] [-m MODEL] [--out FILE]
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

from _meta import measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
IMAGE = REPO / "data" / "aerial-trees" / "SOAP_061.png"
VARIANTS = ("base", "overlap", "preload", "both")

# argv: variant, then `fpn run`'s arguments
WRAPPER = """
import os, sys
variant, args = sys.argv[1], sys.argv[2:]
if variant in ("preload", "both"):
    import jobs.runner
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), {here!r}]))
    jobs.runner.EMBEDDED_SYSTEM_CONFIG["preload_python_modules"].append("_preload_detector")
if variant in ("overlap", "both"):
    import importlib, threading
    import ray
    for name in ("argparse", "ctypes.util", "gettext", "optparse", "ray._common.usage.usage_lib",
                 "ray._private.runtime_env.uv_runtime_env_hook", "ray._private.thirdparty.pynvml",
                 "ray.core.generated.usage_pb2"):
        importlib.import_module(name)
    thread = threading.Thread(target=importlib.import_module, args=("ray.data",))
    thread.start()
    from jobs.runner import init_ray
    init_ray()
    thread.join()
from jobs.cli import main
sys.argv = ["fpn", "run", *args]
main()
"""


def one(variant: str, out: str, extra: list[str]) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WRAPPER.format(here=str(HERE)), variant, str(IMAGE), "-o", out, *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    if p.returncode:
        raise RuntimeError(f"{variant} failed: {p.stderr[-3000:]}")
    start = json.loads(Path(out, "_job.json").read_text())["startup_s"]
    return {"wall_s": round(wall, 2), "first_file_s": round(start["before_run"] + start["file"], 2), "startup_s": start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-m", "--model", default="trees")
    ap.add_argument("--gpu", action="store_true", help="one GPU detector (as benchmarks/gpu.py's start-up)")
    ap.add_argument("--out", default=str(HERE / "results" / "startup_overlap.json"))
    a = ap.parse_args()
    extra = ["-m", a.model, "--no-tile"] + (["--num-detectors", "1", "--gpus-per-detector", "1",
                                             "--cpus-per-detector", "2"] if a.gpu else [])
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for v in VARIANTS:
                runs[v].append(one(v, f"{tmp}/{v}{r}", extra))
                print(r, v, runs[v][-1], flush=True)
    result: dict = {"args": vars(a), "runs": runs, "median": {}}
    for v, rs in runs.items():
        steps = {k: round(statistics.median(x["startup_s"][k] for x in rs), 2) for k in rs[0]["startup_s"]}
        result["median"][v] = {"wall_s": round(statistics.median(x["wall_s"] for x in rs), 2),
                               "first_file_s": round(statistics.median(x["first_file_s"] for x in rs), 2),
                               "startup_s": steps}
    base = result["median"]["base"]["wall_s"]
    result["wall_vs_base"] = {v: round(m["wall_s"] / base, 3) for v, m in result["median"].items()}
    result.update(measured())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median": result["median"], "wall_vs_base": result["wall_vs_base"]}))


if __name__ == "__main__":
    main()
