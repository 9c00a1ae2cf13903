"""The fixed cost of a job: `fpn run` on one small image beside an embedded `ray.init()` and shutdown alone.

Alternating rounds (each a fresh process): `ray`: `python -c "import ray; ray.init(...); ray.shutdown()"`;
`fpn`: `fpn run SOAP_061.png -o OUT` with the bundled `trees` model (400x400: one forward); `null`: the same with
a model that returns nothing (benchmarks/null_model.py). Fixed cost = median(fpn) - median(ray): what a job costs
beyond Ray's own start. Then `cpu`: core seconds of each kind of process that one more `fpn` run starts (sampled
with psutil every 0.1 s), beside the machine's busy and idle core seconds over the run: on a small node the
start-up is CPU-bound, so this says where the fixed cost goes. `startup_s`: the medians of the `fpn` runs' own
record of where their start went (`_job.json`). `load`: `load_checkpoint` (which builds the model without drawing
the random weights it overwrites) beside building it with them and loading the same file (as it did before),
alternating, in this process, for the bundled model and two torchvision layouts (random weights saved here).
Writes benchmarks/results/startup.json.

`--demo BEFORE`: instead, `fpn demo` of this tree and of BEFORE (another source tree, e.g. a `git worktree` of an
older commit), alternating `--repeats` rounds, each into a fresh directory: wall, the driver's peak RSS (sampled
with the core seconds) and its `startup_s`. Writes benchmarks/results/startup_demo.json.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--demo BEFORE]
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


# process kinds by command line; the first pattern that matches names it
KINDS = (("detector actor", ("MapWorker(MapBatches(Detector",)),
         ("Ray Data helper actors", ("_StatsActor", "ActorLocationTracker", "AutoscalingCoordinator")),
         ("decoding child", ("multiprocessing",)),
         ("Ray daemons", ("gcs_server", "raylet", "monitor.py", "dashboard.py", "log_monitor.py", "DashboardAgent",
                          "RuntimeEnvAgent", "agent/main.py", "agent.py")),
         ("Ray task workers", ("ray::",)))


def cpu_by_process(cmd: list[str], cwd: Path = REPO) -> dict:
    """Run `cmd` in `cwd`; core seconds of it and each process under it, by kind (KINDS), and of the whole
    machine; the peak RSS of `cmd`'s own process, sampled."""
    import psutil

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + t.nice

    seen: dict[int, tuple[str, float]] = {}
    peak_rss = 0
    b0, i0, t0 = busy(), psutil.cpu_times().idle, time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for q in procs:
            try:
                with q.oneshot():
                    c = q.cpu_times()
                    seen[q.pid] = (" ".join(q.cmdline()), c.user + c.system)
                    if q.pid == proc.pid:
                        peak_rss = max(peak_rss, q.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.1)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    kinds: dict[str, float] = {}
    for pid, (line, cpu) in seen.items():
        kind = "driver (fpn run)" if pid == proc.pid else next(
            (k for k, pats in KINDS if any(p in line for p in pats)), "other")
        kinds[kind] = round(kinds.get(kind, 0.0) + cpu, 2)
    return {"wall_s": round(wall, 2), "core_s_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "core_s_tracked": round(sum(kinds.values()), 2), "machine_busy_core_s": round(busy() - b0, 2),
            "machine_idle_core_s": round(psutil.cpu_times().idle - i0, 2), "cores": psutil.cpu_count(),
            "driver_peak_rss_mib": round(peak_rss / 2**20, 1)}


def demo_runs(before: Path, rounds: int, tmp: str) -> dict:
    """`fpn demo` of this tree and of `before`, alternating, each into a fresh directory (`--demo`)."""
    trees = {"after": REPO, "before": before.resolve()}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for rep in range(rounds):
        for name, tree in trees.items():
            out = f"{tmp}/{name}{rep}"
            # `python -m` puts its working directory first on sys.path: each tree runs its own jobs/ and pipeline/
            r = cpu_by_process([sys.executable, "-m", "jobs.cli", "demo", "--output", out], cwd=tree)
            start = json.loads(Path(out, "job", "_job.json").read_text())["startup_s"]
            runs[name].append({"wall_s": r["wall_s"], "driver_peak_rss_mib": r["driver_peak_rss_mib"],
                               "core_s_tracked": r["core_s_tracked"], "startup_s": start})
            print(rep, name, runs[name][-1], flush=True)
    med = {name: {k: statistics.median(run[k] for run in rs) for k in ("wall_s", "driver_peak_rss_mib",
                                                                       "core_s_tracked")}
           | {"before_run_s": statistics.median(run["startup_s"]["before_run"] for run in rs)}
           for name, rs in runs.items()}
    ratio = statistics.median(a["wall_s"] / b["wall_s"] for a, b in zip(runs["after"], runs["before"]))
    return {"median": med, "wall_ratio_after_before": round(ratio, 3), "runs": runs, "before_tree": str(before)}


def loading(repeats: int, tmp: str) -> dict:
    """Median seconds of `load_checkpoint` against a build that draws its random weights, then the same load."""
    import torch
    from safetensors.torch import load_file

    from fpn_model.config import preset
    from fpn_model.detectors import build_detector
    from fpn_model.weights import load_checkpoint, read_config, save_checkpoint
    from fpn_model.zoo import resolve

    torch.set_num_threads(2)
    models = {"trees": str(resolve("trees"))}
    for name in ("faster_rcnn_mobilenet_v3_fpn", "faster_rcnn_r50_fpn"):
        models[name] = str(save_checkpoint(build_detector(preset(name)), f"{tmp}/{name}.safetensors"))
    out = {}
    for name, path in models.items():
        times: dict[str, list[float]] = {"load_checkpoint": [], "drawing_weights": []}
        for _ in range(repeats):
            t0 = time.perf_counter()
            load_checkpoint(path)
            times["load_checkpoint"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            build_detector(read_config(path)[0]).load_state_dict(load_file(path))
            times["drawing_weights"].append(time.perf_counter() - t0)
        out[name] = {k: round(statistics.median(v), 4) for k, v in times.items()}
        out[name]["ratio"] = round(out[name]["load_checkpoint"] / out[name]["drawing_weights"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", type=Path, metavar="BEFORE", help="time `fpn demo` against this source tree's")
    a = ap.parse_args()
    if a.demo:
        with tempfile.TemporaryDirectory() as tmp:
            result = demo_runs(a.demo, a.repeats, tmp) | measured()
        dest = RESULTS.with_name("startup_demo.json")
        dest.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("median", "wall_ratio_after_before")}))
        return
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    runs: dict[str, list[float]] = {"ray": [], "fpn": [], "null": []}
    start: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            runs["ray"].append(timed([sys.executable, "-c", RAY]))
            runs["fpn"].append(timed([sys.executable, "-m", "jobs.cli", "run", str(IMAGE), "-o", f"{tmp}/f{rep}"]))
            start.append(json.loads(Path(f"{tmp}/f{rep}/_job.json").read_text())["startup_s"])
            runs["null"].append(timed([sys.executable, "-m", "jobs.cli", "run", str(IMAGE), "-o", f"{tmp}/n{rep}",
                                       "-m", null]))
            print(rep, {k: v[-1] for k, v in runs.items()}, flush=True)
        cpu = cpu_by_process([sys.executable, "-m", "jobs.cli", "run", str(IMAGE), "-o", f"{tmp}/cpu"])
        load = loading(max(5, a.repeats), tmp)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {k: {"median_s": round(med[k], 3), "min_s": min(v), "max_s": max(v), "runs": v} for k, v in runs.items()}
    result["fixed_cost_s"] = round(med["fpn"] - med["ray"], 3)
    result["fixed_cost_null_model_s"] = round(med["null"] - med["ray"], 3)
    result["cpu"] = cpu
    result["startup_s"] = {k: round(statistics.median(s[k] for s in start), 2) for k in start[0]}
    result["load"] = load
    result.update(measured())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("fixed_cost_s", "fixed_cost_null_model_s", "cpu", "startup_s", "load")}),
          {k: result[k]["median_s"] for k in runs})


if __name__ == "__main__":
    main()
