"""Peak memory of `fpn run` on a video and on one 10x longer: it must not grow with video length.

Writes two synthetic videos (N and 10N frames, same content rate), runs `fpn run` on each as a
separate process (its own embedded Ray), samples the summed RSS of the whole process tree (driver,
raylet, workers) every 0.1 s, and writes benchmarks/results/video_memory.json with both peaks and
their ratio (target <= 1.2).

Run: python benchmarks/video_memory.py [--frames 240] [--every-n 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from jobs.render import write_video

LONGER = 10  # the long video has this many times the frames of the short one


def frames(n: int, h: int = 360, w: int = 480):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h * 2, w * 2, 3), dtype=np.uint8)
    for i in range(n):  # a slow pan over a textured scene: realistic inter-frame compression
        x, y = (i * 3) % w, (i * 2) % h
        yield base[y:y + h, x:x + w]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss(cmd: list[str]) -> tuple[int, float, int]:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.1)
    out = proc.stdout.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    return peak, time.monotonic() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--every-n", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "video_memory.json"))
    a = ap.parse_args()
    fpn = str(Path(sys.executable).parent / "fpn")
    result = {"frames_short": a.frames, "frames_long": LONGER * a.frames, "every_n": a.every_n, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("short", a.frames), ("long", LONGER * a.frames)):
            video = Path(tmp) / f"{name}.mp4"
            write_video(frames(n), video, 25.0)
            peak, wall, _ = peak_rss([fpn, "run", str(video), "-o", str(Path(tmp) / f"out-{name}"),
                                      "--every-n", str(a.every_n), "--segment-frames", "128"])
            out = json.loads((Path(tmp) / f"out-{name}" / "_job.json").read_text())
            result["runs"][name] = {"video_frames": n, "frames_written": out["frames"], "peak_rss_mb": round(peak / 2**20, 1),
                                    "wall_s": round(wall, 1)}
            print(f"{name}: {n} frames, {out['frames']} sampled, peak RSS {peak / 2**20:.0f} MiB, {wall:.0f} s")
    ratio = result["runs"]["long"]["peak_rss_mb"] / result["runs"]["short"]["peak_rss_mb"]
    result["peak_ratio_long_over_short"] = round(ratio, 3)
    result["target"] = "<= 1.2"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(f"peak RSS ratio ({LONGER}x longer / short): {ratio:.2f} (target <= 1.2); wrote {a.out}")


if __name__ == "__main__":
    main()
