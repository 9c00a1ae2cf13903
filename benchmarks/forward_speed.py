"""Forward speed on a CPU: torchvision's eager forward beside the exact fast path and the opt-in approximate paths.

For the bundled `trees` model and torchvision's `fasterrcnn_mobilenet_v3_large_fpn` architecture (seeded random
weights: BatchNorm statistics calibrated on the frames, classifier weights scaled so that there are detections;
imported as `fpn import-torchvision` does), at each size (shorter side; longer side at most 1333, as
benchmarks/throughput.py), on the same batch of video frames and torch threads, it times `Predictor.__call__`:

- `eager`: `Predictor(model, fast=False)`, torchvision's forward as it is (the baseline);
- `exact`: `Predictor(model)`, the default on a CPU (fpn_model.predict.fast_path, keep_freed_memory);
- `int8`: `Predictor(model, precision="int8")`: fast path + dynamic int8 quantisation of the Linear layers;
- `bf16`: `Predictor(model, precision="bf16")`: fast path + bfloat16 autocast of the feature computation;
- `compile` (with `--compile`): fast path + torch.compile of backbone and RPN head; its first call (the compile)
  is reported apart as `compile_s`.

keep_freed_memory changes malloc for the whole process, one way, so the variants run in two kinds of worker
process, alternating: "plain malloc" (FPN_KEEP_FREED_MEMORY=0) times eager and the fast path without it; "kept
memory" (the default) times eager, exact and the opt-in variants. Inside a process the variants alternate call by
call (order rotated each round, after one warm-up call each); each figure pools its calls over the processes of
its kind: median, min, max. `speedup` = plain eager's median / the row's median; `speedup_within_process` gives
the median (min, max) of call-by-call ratios inside one process. Detections of each variant are compared with its
process's eager ones, frame by frame, order aside (fpn_model.predict.detection_difference): the largest box
difference in pixels and relative to the coordinate, the largest score difference, frames whose counts differ.
Page faults per call and peak RSS show what keeping freed memory does. The load average before and after is
recorded: on a shared machine the spread says how far to trust a figure.

    .venv/bin/python benchmarks/forward_speed.py [--rounds 3] [--processes 2] [--sizes 512 800] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "forward_speed.json"
VIDEO = REPO / "data" / "video" / "bikes.mp4"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fpn_model.predict import Predictor, detection_difference  # noqa: E402
from fpn_model.weights import load_checkpoint  # noqa: E402
from fpn_model.zoo import resolve  # noqa: E402
from throughput import scale_for  # noqa: E402  the torchvision resize rule, as throughput.py applies it

sys.path.insert(0, str(REPO / "tests"))
from forward_inputs import calibrated_mobilenet_v3_fpn, video_frames  # noqa: E402  what tests/test_model.py checks


def trees(size: int, frames: list[np.ndarray]) -> torch.nn.Module:
    h, w = frames[0].shape[:2]
    return load_checkpoint(resolve("trees"), scale=scale_for(size, h, w))


def mobilenet(size: int, frames: list[np.ndarray]) -> torch.nn.Module:
    return calibrated_mobilenet_v3_fpn(frames, size)


MODELS = {"trees": trees, "mobilenet_v3_fpn": mobilenet}
VARIANTS = {
    "eager": dict(fast=False),
    "exact": dict(),
    "int8": dict(precision="int8"),
    "bf16": dict(precision="bf16"),
    "compile": dict(compile=True),
}


def difference(ref: list, out: list) -> dict:
    diffs = [detection_difference(a, b) for a, b in zip(ref, out)]
    return {"box_px": max(d["box"] for d in diffs), "box_rel": max(d["box_rel"] for d in diffs),
            "score": max(d["score"] for d in diffs),
            "frames_with_other_counts": sum(d["count"][0] != d["count"][1] for d in diffs),
            "detections": [d["count"][0] for d in diffs], "detections_variant": [d["count"][1] for d in diffs]}


def stats(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "runs_s": [round(t, 4) for t in times]}


def worker(model_name: str, size: int, frames: list[np.ndarray], variants: list[str], rounds: int) -> dict:
    """In this process: the variants' seconds per call, alternating (order rotated each round), after a first call
    each; their detections against the first variant's (eager)."""
    import resource

    model = MODELS[model_name](size, frames)
    predictors, first = {}, {}
    for v in variants:
        t0 = time.perf_counter()
        predictors[v] = Predictor(model, **VARIANTS[v])
        t1 = time.perf_counter()
        out = predictors[v](frames)  # warm-up (and the compile)
        first[v] = {"build_s": round(t1 - t0, 3), "first_call_s": round(time.perf_counter() - t1, 3), "out": out}
    times: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            predictors[v](frames)
            times[v].append(time.perf_counter() - t0)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    ref = first[variants[0]]["out"]
    return {"input_hw": list(_input_shape(model, frames[0])), "max_rss_mb": round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "variants": {
        v: {"times_s": times[v], "page_faults": int(statistics.median(faults[v])), "build_s": first[v]["build_s"],
            "first_call_s": first[v]["first_call_s"], **({"vs_eager": difference(ref, first[v]["out"])} if i else {})}
        for i, v in enumerate(variants)}}


def _input_shape(model, frame) -> tuple[int, int]:
    with torch.inference_mode():
        images, _ = model.transform([torch.from_numpy(frame).permute(2, 0, 1).float().div(255)])
    return tuple(images.image_sizes[0])


def run_worker(args, model_name: str, size: int, mode: str, variants: list[str]) -> dict:
    env = {**os.environ, "FPN_KEEP_FREED_MEMORY": "0" if mode == "plain" else "1"}
    cmd = [sys.executable, __file__, "--worker", model_name, str(size), "--variants", *variants, "--rounds",
           str(args.rounds), "--threads", str(args.threads), "--frames", str(args.frames), "--every-n",
           str(args.every_n), "--video", args.video]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker {model_name}@{size} {mode} failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarise(plain: list[dict], kept: list[dict]) -> dict:
    """Pool each variant's times over its processes; ratios of medians."""
    def pool(runs, v):
        return [t for r in runs for t in r["variants"][v]["times_s"]]

    eager = statistics.median(pool(plain, "eager"))
    rows = {"eager": {**stats(pool(plain, "eager")), "speedup": 1.0, "process": "plain malloc",
                      "page_faults": plain[0]["variants"]["eager"]["page_faults"]}}
    rows["exact_plain_malloc"] = {**stats(pool(plain, "exact")), "process": "plain malloc",
                                  "page_faults": plain[0]["variants"]["exact"]["page_faults"],
                                  "vs_eager": plain[0]["variants"]["exact"]["vs_eager"]}
    for v in kept[0]["variants"]:
        key = "eager_kept_memory" if v == "eager" else v
        rows[key] = {**stats(pool(kept, v)), "process": "kept memory (the default)",
                     "page_faults": kept[0]["variants"][v]["page_faults"]}
        if v != "eager":
            rows[key]["vs_eager"] = kept[0]["variants"][v]["vs_eager"]
        if v == "compile":  # the first call less a compiled call, per process (the first is the coldest cache)
            rows[key]["compile_s"] = [round(r["variants"][v]["first_call_s"] - statistics.median(r["variants"][v][
                "times_s"]), 1) for r in kept]
    for k, row in rows.items():
        row["speedup"] = round(eager / row["median_s"], 3)
        row["frames_per_s"] = round(kept[0]["frames"] / row["median_s"], 3)
    # within one process, alternating call by call
    within = {"plain: exact / eager": _paired(plain, "exact"), "kept: exact / eager": _paired(kept, "exact")}
    for v in kept[0]["variants"]:
        if v not in ("eager", "exact"):
            within[f"kept: {v} / eager"] = _paired(kept, v)
            within[f"kept: {v} / exact"] = _paired(kept, v, "exact")
    return {"input_hw": kept[0]["input_hw"], "variants": rows, "speedup_within_process": within,
            "max_rss_mb": {"plain malloc": max(r["max_rss_mb"] for r in plain),
                           "kept memory": max(r["max_rss_mb"] for r in kept)}}


def _paired(runs: list[dict], v: str, base: str = "eager") -> dict:
    ratios = [b / t for r in runs for b, t in zip(r["variants"][base]["times_s"], r["variants"][v]["times_s"])]
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--frames", type=int, default=4, help="batch size (frames per forward)")
    ap.add_argument("--every-n", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds inside each process")
    ap.add_argument("--processes", type=int, default=2, help="processes of each kind per model and size")
    ap.add_argument("--variants", nargs="+", default=["int8", "bf16"], choices=list(VARIANTS),
                    help="opt-in variants measured beside eager and exact")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile variant (minutes of compiling)")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frames = video_frames(args.video, args.frames, args.every_n)
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), frames, args.variants, args.rounds)
        print(json.dumps({**res, "frames": len(frames)}, default=_plain))
        return
    kept_variants = list(dict.fromkeys(["eager", "exact", *args.variants, *(["compile"] if args.compile else [])]))
    doc = {
        "what": "seconds per forward of a batch of video frames (Predictor.__call__); variants alternate call by "
                "call inside a process; 'plain malloc' processes (FPN_KEEP_FREED_MEMORY=0: eager, and the fast "
                "path without keep_freed_memory) alternate with 'kept memory' processes (the default)",
        "video": os.path.relpath(args.video, REPO), "frames": len(frames), "frame_hw": list(frames[0].shape[:2]),
        "threads": args.threads, "rounds_per_process": args.rounds, "processes_per_kind": args.processes,
        "torch": torch.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
        "load_average_before": os.getloadavg(), "results": {},
    }
    t0 = time.monotonic()
    for name in args.models:
        for size in args.sizes:
            plain, kept = [], []
            for i in range(args.processes):
                for mode in (("plain", "kept") if i % 2 == 0 else ("kept", "plain")):
                    if mode == "plain":
                        plain.append(run_worker(args, name, size, "plain", ["eager", "exact"]))
                    else:
                        kept.append(run_worker(args, name, size, "kept", kept_variants))
            res = summarise(plain, kept)
            doc["results"][f"{name}@{size}"] = res
            print(name, size, res["input_hw"], " ".join(
                f"{v} {r['median_s']:.3f}s [{r['min_s']:.3f}-{r['max_s']:.3f}] x{r['speedup']:.2f}"
                + (f" (box {r['vs_eager']['box_px']:.1e} px, score {r['vs_eager']['score']:.1e})" if "vs_eager" in r
                   else "") for v, r in res["variants"].items()), flush=True)
    doc["load_average_after"] = os.getloadavg()
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(doc, indent=2, default=_plain) + "\n")
    print(f"wrote {args.output}")


def _plain(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
