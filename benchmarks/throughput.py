"""Frames per second of `fpn run` beside its own bare forward and Ray Data's documented recipe, side by side.

For each input size (the torchvision rule: shorter side to SIZE, longer side at most 1333) and the same frames,
model, batch and threads, it runs in turn (alternating, `--repeats` rounds, each a fresh process):

- `bare`: the Predictor alone on frames decoded beforehand (the model's own ceiling), one batch at a time;
- `bare_calls`: the same with batches side by side as `fpn run`'s detector runs them (2 of 1 thread on 2 cores);
- `fpn`: `fpn run VIDEO --every-n N --batch-size B --no-tile --scale S` (its embedded Ray included);
- `recipe`: benchmarks/ray_data_recipe.py with the best batch size / num_cpus / threads / concurrency of a
  recorded sweep (`--sweep`, run once at the first size);
- `null`: `fpn run` with a model that returns nothing (benchmarks/null_model.py): the pipeline's ceiling;
- `fpn2`: `fpn run` with 2 detector actors (first size only);
- `fpn_1call`: `fpn run --calls-per-detector 1`: one batch at a time over both threads, as before detectors ran
  a batch per thread (first size only).

The input is `--video` played `--loop` times (forwards, then backwards, and so on: no cut at the joins; PyAV
writes it), so that a job runs long enough for its fixed start-up cost (benchmarks/startup.py) to be part of it
and not all of it. Ratios are of medians measured in the same run: `efficiency` = fpn / bare,
`ray_data_ratio` = fpn / recipe, all from whole wall times (start-up included); `*_per_round`: the same ratio
of each round's two runs, which ran one after the other (steadier when the host's speed drifts). `fpn` rows
also give the time to the first frames file and `steady_fps`: the frames of the files that came after the
first (by more than 1 s) over the time between the first and the last file (the pipeline once running).
Writes benchmarks/results/throughput.json.

    .venv/bin/python benchmarks/throughput.py [--video data/video/bikes.mp4] [--loop 10] [--every-n 10] [--sweep]

`--configs bare,fpn` runs only those (a longer clip, where the fixed cost weighs less: `--loop 30 --sizes 512
--configs bare,bare_calls,fpn --out benchmarks/results/throughput_long.json`). `--street`: the issue's own
scenario instead (benchmarks/street_inputs.py: 80 frames of a 768x576 AVI, torchvision's mobilenet_v3 FPN
imported; `--sweep --out benchmarks/results/throughput_street.json` tunes the recipe for that model).
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

from _meta import measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "throughput.json"
FPN = [sys.executable, "-m", "jobs.cli"]


def video_shape(video: str) -> tuple[int, int, int]:
    import av

    with av.open(video) as c:
        s = c.streams.video[0]
        return s.frames, s.codec_context.height, s.codec_context.width


def looped(video: str, times: int, dest: Path) -> str:
    """`video` played `times` times, alternately forwards and backwards, written to `dest` (25 fps, x264)."""
    import av

    from jobs.render import write_video

    if times <= 1:
        return video
    with av.open(video) as c:
        rate = float(c.streams.video[0].average_rate or 25)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    write_video((f for k in range(times) for f in (frames if k % 2 == 0 else frames[::-1])), dest, rate)
    return str(dest)


def scale_for(size: int, h: int, w: int, max_size: int = 1333) -> float:
    return round(min(size / min(h, w), max_size / max(h, w)), 4)


def bare(video: str, every_n: int, batch: int, scale: float, threads: int, checkpoint: str, calls: int = 1) -> dict:
    """In this process: decode the sampled frames first, then time the Predictor alone over them; `calls` batches
    side by side on as many threads, `threads // calls` torch threads each (as a CPU detector runs them)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fpn_model.predict import Predictor
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    sys.path.insert(0, str(REPO / "tests"))
    from forward_inputs import video_frames

    torch.set_num_threads(max(1, threads // calls))
    frames = video_frames(video, every_n=every_n)
    p = Predictor(load_checkpoint(resolve(checkpoint), scale=scale), tile=None)
    p(frames[:1])  # warm-up, as a detector actor's first batch pays it too
    t0 = time.monotonic()
    batches = [frames[i:i + batch] for i in range(0, len(frames), batch)]
    if calls == 1:
        dets = sum(len(d.boxes) for b in batches for d in p(b))
    else:  # the process started with FPN_KEEP_FREED_MEMORY's environment, as an actor does (run_bare)
        with ThreadPoolExecutor(calls) as pool:
            dets = sum(len(d.boxes) for ds in pool.map(p, batches) for d in ds)
    return {"frames": len(frames), "detections": dets, "wall_s": round(time.monotonic() - t0, 3), "calls": calls}


def run_fpn(video: str, every_n: int, batch: int, scale: float, model: str, extra=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [*FPN, "run", video, "-o", str(out), "-m", model, "--every-n", str(every_n), "--batch-size",
               str(batch), "--no-tile", "--scale", str(scale), *extra]
        t0 = time.monotonic()
        seen: dict[Path, float] = {}  # each frames file and when it appeared
        with open(Path(tmp) / "log", "w+") as log:
            p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
            while p.poll() is None:
                for f in (out / "frames").glob("part-*.parquet"):
                    seen.setdefault(f, time.monotonic() - t0)
                time.sleep(0.05)
            wall = time.monotonic() - t0
            if p.returncode != 0:
                log.seek(0)
                raise RuntimeError(f"fpn run failed ({p.returncode}): {log.read()[-2000:]}")
        job = json.loads((out / "_job.json").read_text())
        files = sorted((t, f) for f, t in seen.items() if f.exists())  # (a regrouped bundle's file may go again)
        # files that land with the first (several detectors finish their first units together) were made before it
        # too: only files that came later count
        later = [(t, f) for t, f in files if t > files[0][0] + 1.0]
        steady = None
        if later:
            import pyarrow.parquet as pq

            rows = sum(pq.ParquetFile(f).metadata.num_rows for _, f in later)
            steady = round(rows / (later[-1][0] - files[0][0]), 3)
        return {"frames": job["frames"], "detections": job["detections"], "wall_s": round(wall, 3),
                "first_frame_s": round(files[0][0], 3) if files else None, "files": len(files),
                "steady_fps": steady, "core_ms_per_frame": job.get("core_ms_per_frame")}


def run_recipe(video: str, every_n: int, scale: float, model: str, cfg: dict, timeout_s: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(REPO / "benchmarks" / "ray_data_recipe.py"), video, str(Path(tmp) / "out"),
               "--checkpoint", model, "--scale", str(scale), "--every-n", str(every_n),
               *[x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
        t0 = time.monotonic()
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"recipe failed: {p.stderr[-2000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        return {**res, "wall_s": round(wall, 3), "inner_wall_s": res["wall_s"]}


def run_bare(video: str, every_n: int, batch: int, scale: float, threads: int, model: str, calls: int = 1) -> dict:
    from fpn_model.memory import keep_freed_memory_env

    # side by side, the calls' threads allocate from arenas of their own: the environment a CPU detector starts with
    env = {**os.environ, **keep_freed_memory_env()} if calls > 1 else None
    p = subprocess.run([sys.executable, __file__, "--bare-once", video, "--every-n", str(every_n), "--batch",
                        str(batch), "--scale", str(scale), "--threads", str(threads), "--model", model,
                        "--calls", str(calls)], cwd=REPO, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"bare failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def detector_calls() -> int:
    """The batches `fpn run`'s detector runs side by side on this machine (pipeline.sizing.fit, embedded Ray)."""
    from pipeline.plan import Resources
    from pipeline.sizing import fit

    return fit(Resources(), [{"CPU": float(os.cpu_count())}]).calls


def fps(r: dict) -> float:
    return r["frames"] / r["wall_s"]


def per_round(num: list[dict], den: list[dict]) -> dict:
    """The fps ratio num / den of each round (the two runs ran one after the other), its median and range: on a
    host whose speed drifts over the minutes of a benchmark, steadier than the ratio of medians."""
    rounds = [fps(a) / fps(b) for a, b in zip(num, den)]
    return {"median": round(statistics.median(rounds), 3), "min": round(min(rounds), 3),
            "max": round(max(rounds), 3), "rounds": [round(r, 3) for r in rounds]}


def summary(runs: list[dict]) -> dict:
    f = [fps(r) for r in runs]
    out = {"fps_median": round(statistics.median(f), 3), "fps_min": round(min(f), 3), "fps_max": round(max(f), 3),
           "runs": runs}
    firsts = [r["first_frame_s"] for r in runs if r.get("first_frame_s") is not None]
    if firsts:
        out["first_frame_s_median"] = round(statistics.median(firsts), 3)
    steady = [r["steady_fps"] for r in runs if r.get("steady_fps")]
    if steady:
        out["steady_fps_median"] = round(statistics.median(steady), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(REPO / "data" / "video" / "bikes.mp4"))
    ap.add_argument("--loop", type=int, default=10, help="play the video this many times (1: as it is)")
    ap.add_argument("--every-n", type=int, default=10)
    ap.add_argument("--sweep-every-n", type=int, default=20, help="sampling of the recipe sweep's runs")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="trees")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    ap.add_argument("--sweep", action="store_true", help="tune the recipe (else its best recorded config)")
    ap.add_argument("--configs", default="bare,bare_calls,fpn,recipe,null,fpn2,fpn_1call",
                    help="which runs (bare,bare_calls,fpn,recipe,null,fpn2,fpn_1call; the last two at the first "
                         "size only)")
    ap.add_argument("--street", action="store_true",
                    help="the issue's own scenario (benchmarks/street_inputs.py): a 795-frame 768x576 AVI as it is "
                         "and torchvision's mobilenet_v3 FPN imported (--video, --loop and --model ignored)")
    ap.add_argument("--bare-once", metavar="VIDEO")
    ap.add_argument("--scale", type=float)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--calls", type=int, default=1, help="--bare-once: batches side by side")
    a = ap.parse_args()
    if a.bare_once:
        print(json.dumps(bare(a.bare_once, a.every_n, a.batch, a.scale, a.threads, a.model, a.calls)))
        return

    tmp = tempfile.TemporaryDirectory()
    if a.street:
        from street_inputs import street_inputs

        video, model = street_inputs(Path(tmp.name))
        source, a.video, a.model, a.loop = REPO / "benchmarks" / "street_inputs.py", str(video), str(model), 1
    else:
        source, a.video = a.video, looped(a.video, a.loop, Path(tmp.name) / "looped.mp4")
    n, h, w = video_shape(a.video)
    recorded = a.out if a.out.exists() else RESULTS  # the recipe's configuration from its last sweep
    previous = json.loads(recorded.read_text()) if recorded.exists() else {}
    recipe_cfg = previous.get("recipe_config", {"batch": a.batch, "num_cpus": 1.0, "threads": 1, "concurrency": 1})
    sweep = previous.get("recipe_sweep")
    if a.sweep:
        scale = scale_for(a.sizes[0], h, w)
        sweep = []
        # every configuration leaves a CPU to read_videos' tasks: a class holding both CPUs of this node (num_cpus
        # 2, or 2 actors of 1) waits forever for its input
        for batch in (4, 8):
            for num_cpus, threads, conc in ((1, 1, 1), (1, 2, 1), (0.5, 1, 2)):
                cfg = {"batch": batch, "num_cpus": num_cpus, "threads": threads, "concurrency": conc}
                try:
                    r = run_recipe(a.video, a.sweep_every_n, scale, a.model, cfg, timeout_s=600)
                    sweep.append({**cfg, "fps": round(fps(r), 3), "wall_s": r["wall_s"]})
                except (subprocess.TimeoutExpired, RuntimeError) as e:
                    sweep.append({**cfg, "fps": 0.0, "failed": type(e).__name__})
                print("sweep", sweep[-1], flush=True)
        best = max(sweep, key=lambda s: s["fps"])
        recipe_cfg = {k: best[k] for k in ("batch", "num_cpus", "threads", "concurrency")}

    null_model = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    sizes = {}
    for size in a.sizes:
        scale = scale_for(size, h, w)
        configs = {
            "bare": lambda: run_bare(a.video, a.every_n, a.batch, scale, os.cpu_count(), a.model),
            "bare_calls": lambda: run_bare(a.video, a.every_n, a.batch, scale, os.cpu_count(), a.model,
                                           calls=detector_calls()),
            "fpn": lambda: run_fpn(a.video, a.every_n, a.batch, scale, a.model),
            "recipe": lambda: run_recipe(a.video, a.every_n, scale, a.model, recipe_cfg),
            "null": lambda: run_fpn(a.video, a.every_n, a.batch, scale, null_model),
        }
        if size == a.sizes[0]:
            configs["fpn2"] = lambda: run_fpn(a.video, a.every_n, a.batch, scale, a.model,
                                              ("--num-detectors", "2", "--cpus-per-detector", "0.7"))
            configs["fpn_1call"] = lambda: run_fpn(a.video, a.every_n, a.batch, scale, a.model,
                                                   ("--calls-per-detector", "1"))
        wanted = a.configs.split(",")
        configs = {k: v for k, v in configs.items() if k in wanted}
        runs: dict[str, list] = {k: [] for k in configs}
        for rep in range(a.repeats):
            for name, fn in configs.items():
                runs[name].append(fn())
                print(size, rep, name, runs[name][-1], flush=True)
        s = {k: summary(v) for k, v in runs.items()}
        med = {k: v["fps_median"] for k, v in s.items()}
        sizes[str(size)] = {"scale": scale, "input_hw": [round(h * scale), round(w * scale)], **s}
        if "fpn" in med and "bare_calls" in med:
            sizes[str(size)]["efficiency_same_calls"] = round(med["fpn"] / med["bare_calls"], 3)
        if "fpn" in med and "bare" in med:
            sizes[str(size)].update(efficiency=round(med["fpn"] / med["bare"], 3),
                                    efficiency_steady=round(s["fpn"]["steady_fps_median"] / med["bare"], 3),
                                    efficiency_per_round=per_round(runs["fpn"], runs["bare"]))
        if "fpn" in med and "recipe" in med:
            sizes[str(size)].update(ray_data_ratio=round(med["fpn"] / med["recipe"], 3),
                                    ray_data_ratio_per_round=per_round(runs["fpn"], runs["recipe"]))
        if "null" in med:
            sizes[str(size)]["null_ceiling_fps"] = med["null"]
        sizes[str(size)]["same_detections"] = len({r[0]["detections"] for k, r in runs.items() if k != "null"}) == 1
    result = {"video": os.path.relpath(source, REPO), "loop": a.loop, "frames_total": n, "height": h, "width": w,
              "every_n": a.every_n, "batch": a.batch, "model": a.model, "cpus": os.cpu_count(),
              "recipe_config": recipe_cfg, "recipe_sweep": sweep, "sweep_every_n": a.sweep_every_n, "sizes": sizes,
              **measured()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    for size, s in sizes.items():
        fps_medians = {k: v["fps_median"] for k, v in s.items() if isinstance(v, dict) and "fps_median" in v}
        print(f"{size}px:", fps_medians, {k: s.get(k) for k in ("efficiency", "efficiency_steady", "ray_data_ratio")})
    tmp.cleanup()


if __name__ == "__main__":
    main()
