"""What changing the serial steps of a job's start would buy, before anyone builds it: `fpn run` on one image as it
is (`base`), and with a change done from outside by a wrapper, no product code changed:

- `preload`: every worker of the embedded node also imports the detector's module (torch, torchvision) on a
  thread of its own as it starts (`_preload_detector.py`), so the detector actor, which starts after the plan,
  finds it imported;
- `prestartN`: the raylet starts at most N workers ahead, not PRESTART_WORKERS (jobs.runner; one per CPU at most);
- `batch8`: `--batch-size 8` instead of `auto`, which asks a GPU task for the GPU's memory while the job plans;
- `before`: `base` from another source tree (`--before DIR`: the code before a change, for before -> after).

Rounds alternate the variants (each a fresh process; `wall_vs_base`: of the first variant listed); medians of the
wall time, of the time to the first frames file (the command's own start + `startup_s.file`) and of each
`startup_s` step; `--logs DIR` keeps the Ray logs of each variant's first round (the raylet's, the agents', the
driver's, and when each port file was written) for a timeline of the node's start.

Measured so (`benchmarks/README.md`, start-up): variants since built into jobs.runner (`overlap`: Ray Data imported
on a thread while `ray.init` runs; `envport`: the runtime-env agent's port given to the raylet; `prestart4`), and
`preload`, which did not pay: 1.043 of the plain start's wall time on the 2-core host
(`benchmarks/results/startup_overlap.json`), 1.127 on an H200 node with 16 cores (`run2_startup_overlap` in
`benchmarks/results/gpu_h200_s32.json`).

    .venv/bin/python benchmarks/startup_overlap.py [--rounds 4] [--variants base,preload] [--gpu] [--before DIR]
        [--logs DIR] [-m MODEL] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
VARIANTS = ("base", "preload")  # the default set

# argv: variant, then `fpn run`'s arguments
WRAPPER = """
import os, sys
variant, args = sys.argv[1], sys.argv[2:]
if variant == "preload":
    import jobs.runner
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), {here!r}]))
    jobs.runner.EMBEDDED_SYSTEM_CONFIG["preload_python_modules"].append("_preload_detector")
if variant.startswith("prestart"):
    import jobs.runner
    jobs.runner.PRESTART_WORKERS = int(variant[8:])
if variant == "batch8":
    args += ["--batch-size", "8"]
from jobs.cli import main
sys.argv = ["fpn", "run", *args]
main()
"""
RAY_LOGS = ("raylet.out", "gcs_server.out", "dashboard_agent.log", "runtime_env_agent.log", "python-core-driver-*")


def one(variant: str, out: str, extra: list[str], before: Path | None, logs: Path | None) -> dict:
    tree = before if variant == "before" else REPO  # the wrapper's imports come from its working directory first
    ray_tmp = Path(tempfile.mkdtemp(prefix="fpnso-", dir="/tmp"))  # its Ray's own (short: sockets go there), so
    # the logs kept are this run's, not those of another Ray started on the machine meanwhile
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
           "RAY_TMPDIR": str(ray_tmp)}
    try:
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", WRAPPER.format(here=str(HERE)), variant, str(IMAGE), "-o", out,
                            *extra], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - t0
        if p.returncode:
            raise RuntimeError(f"{variant} failed: {p.stderr[-3000:]}")
        if logs is not None and not (logs / variant).exists():
            keep_ray_logs(ray_tmp / "ray" / "session_latest", logs / variant)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    start = json.loads(Path(out, "_job.json").read_text())["startup_s"]
    return {"wall_s": round(wall, 2), "first_file_s": round(start["before_run"] + start["file"], 2), "startup_s": start}


def keep_ray_logs(session: Path, dest: Path) -> None:
    """The Ray session's logs that time its start, and when each port file was written (`ports.txt`)."""
    session = session.resolve()
    dest.mkdir(parents=True)
    for pattern in RAY_LOGS:
        for f in (session / "logs").glob(pattern):
            shutil.copy(f, dest / f.name)
    ports = sorted(session.glob("*_port_*"), key=lambda f: f.stat().st_mtime)
    (dest / "ports.txt").write_text("".join(f"{f.stat().st_mtime:.3f} {f.name} {f.read_text().strip()}\n"
                                            for f in ports))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("-m", "--model", default="trees")
    ap.add_argument("--gpu", action="store_true", help="one GPU detector (as benchmarks/gpu.py's start-up)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of those in the docstring")
    ap.add_argument("--before", type=Path, help="source tree of the `before` variant")
    ap.add_argument("--logs", type=Path, help="keep each variant's Ray logs of its first round here")
    ap.add_argument("--out", default=str(HERE / "results" / "startup_overlap.json"))
    a = ap.parse_args()
    variants = a.variants.split(",")
    if "before" in variants and a.before is None:
        ap.error("the before variant needs --before DIR")
    model = str(REPO / "fpn_model" / "checkpoints" / f"{a.model}.safetensors") if a.model == "trees" else a.model
    # the bundled model by its path: a `before` tree may hold no weights
    extra = ["-m", model, "--no-tile"] + (["--num-detectors", "1", "--gpus-per-detector", "1", "--cpus-per-detector",
                                           "2"] if a.gpu else [])
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for v in variants:
                runs[v].append(one(v, f"{tmp}/{v}{r}", extra, a.before, a.logs))
                print(r, v, runs[v][-1], flush=True)
    result: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}, "runs": runs,
                    "median": {}}
    for v, rs in runs.items():
        steps = {k: round(statistics.median(x["startup_s"][k] for x in rs), 2) for k in rs[0]["startup_s"]}
        result["median"][v] = {"wall_s": round(statistics.median(x["wall_s"] for x in rs), 2),
                               "first_file_s": round(statistics.median(x["first_file_s"] for x in rs), 2),
                               "startup_s": steps}
    base = result["median"][variants[0]]["wall_s"]
    result["wall_vs_base"] = {v: round(m["wall_s"] / base, 3) for v, m in result["median"].items()}
    result.update(measured())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median": result["median"], "wall_vs_base": result["wall_vs_base"]}))


if __name__ == "__main__":
    main()
