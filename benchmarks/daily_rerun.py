"""A daily `fpn run` over an archive that grows: the whole command (its Python, Ray's start, the listing, the plan,
the work, the output's bookkeeping) with nothing new, and with a few new files, on local files and on S3.

Each rerun is measured twice in turn: on the output as it is, whose `_sources.parquet` records what earlier probes
found (`pipeline.known`), and on the same output with that record cut to what outputs held before it (source,
size, version, first run), so that every input is probed again, in Ray tasks, as every rerun did before. The
record is cut before each such rerun (which writes it again). With new files, each rerun gets its own new files,
so both do the same detection work. `--latency` holds every request of moto's S3 server (in this process, on
127.0.0.1: tests/served_bytes.py) that long, a distant region's round trip; the server counts the requests of
each command. The first run writes files of about 1/100 of its frames, as if about 100 daily runs had written the
output. The detector is benchmarks/null_model.py (no model cost).

Then one source changes (an image rewritten) and is left as a SourceChanged row (no --replace-changed): after the
rerun that finds it, each rerun with nothing else new is measured on the output as it is, which records the source
as left at the version seen (`pipeline.known.LEFT_FIELDS`), and with those fields cut, as outputs held before,
so that the rerun finds it changed again, starts Ray to plan it and writes its row again, as every rerun did.
Writes benchmarks/results/daily_rerun.json (or --out).

    scripts/loopback-only .venv/bin/python benchmarks/daily_rerun.py [--images 1000] [--videos 4] [--new 5]
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from _meta import measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "daily_rerun.json"
NULL = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
CLIP = REPO / "data" / "video" / "bikes.mp4"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import s3fs  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.known import LEFT_FIELDS  # noqa: E402
from served_bytes import start_counted_server  # noqa: E402  the tests' moto server, with its latency

OLD_COLUMNS = ["source", "size", "version", "first_run"]  # what _sources.parquet held before pipeline.known


def fpn_run(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> tuple[float, dict]:
    """(wall seconds, the completed process) of one `fpn run` in its own process, which must exit with one of `ok`."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", *args], cwd=REPO, env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode not in ok:
        raise SystemExit(f"fpn run {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return wall, p


def image(path_or_file, i: int) -> None:
    Image.fromarray(np.full((48, 64, 3), i % 251, np.uint8)).save(path_or_file, format="PNG")


class Archive:
    """Inputs and output in one place: a local directory or an S3 bucket."""

    def __init__(self, root: str, fs=None):
        self.root, self.fs = root, fs

    def put(self, name: str, data: bytes) -> None:
        if self.fs is None:
            p = Path(self.root, "archive", name)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.fs.pipe(f"{self.root}/archive/{name}".removeprefix("s3://"), data)

    @property
    def inputs(self) -> str:
        return f"{self.root}/archive/"

    @property
    def output(self) -> str:
        return f"{self.root}/out"

    def _record(self) -> str:
        return f"{self.output}/_sources.parquet".removeprefix("s3://")

    def forget_probes(self) -> None:
        """Cut `_sources.parquet` to the columns outputs held before pipeline.known."""
        self._cut(lambda t: t.select(OLD_COLUMNS))

    def forget_left(self) -> None:
        """Cut from `_sources.parquet` what it says of changed sources left so (outputs held nothing of them)."""
        self._cut(lambda t: t.drop_columns(list(LEFT_FIELDS)))

    def job(self) -> dict:
        return json.loads(Path(self.output, "_job.json").read_text() if self.fs is None else
                          self.fs.cat_file(f"{self.output}/_job.json".removeprefix("s3://")))

    def _cut(self, how) -> None:
        if self.fs is None:
            pq.write_table(how(pq.read_table(self._record())), self._record())
        else:
            sink = pa.BufferOutputStream()
            pq.write_table(how(pq.read_table(pa.BufferReader(self.fs.cat_file(self._record())))), sink)
            self.fs.pipe_file(self._record(), sink.getvalue().to_pybytes())


def png_bytes(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    image(buf, i)
    return buf.getvalue()


def scenario(name: str, archive: Archive, a, env: dict[str, str], extra: list[str], counter=None) -> dict:
    clip = CLIP.read_bytes()
    for i in range(a.images):
        archive.put(f"cam{i % 10:02d}/snap{i:06d}.png", png_bytes(i))
    for v in range(a.videos):
        archive.put(f"drone/flight{v}.mp4", clip)
    args = [archive.inputs, "-o", archive.output, "-m", NULL, "--fps", "1", *extra]
    # files of ~1/100 of the frames: an output that about 100 daily runs wrote (each rerun reads every file)
    first, _ = fpn_run(args + ["--min-rows-per-file", str(max(1, (a.images + 10 * a.videos) // 100))], env)
    print(f"{name}: first run {first:.1f} s", flush=True)
    row: dict = {"scenario": name, "first_run_s": round(first, 2)}
    day = 0
    for new in (0, a.new):
        times: dict[str, list[float]] = {"probe_every_input": [], "record": []}
        requests: dict[str, list[int]] = {"probe_every_input": [], "record": []}
        ray: dict[str, list[bool]] = {"probe_every_input": [], "record": []}
        for _ in range(a.repeats):
            for how in ("probe_every_input", "record"):
                day += 1
                for k in range(new):
                    archive.put(f"day{day:03d}/new{k}.png", png_bytes(1000 + day * 10 + k))
                if how == "probe_every_input":
                    archive.forget_probes()
                if counter is not None:
                    counter.take()
                wall, _ = fpn_run(args, env)
                job = archive.job()
                assert job["state"] == "succeeded", job.get("state")
                assert job.get("inputs_known", 0) == (0 if how == "probe_every_input" else job["inputs"] - new), job
                times[how].append(round(wall, 2))
                ray[how].append("ray" in job["startup_s"])
                if counter is not None:
                    time.sleep(0.3)  # the server counts a request once it has sent the answer
                    requests[how].append(counter.take()[1])
        before, after = statistics.median(times["probe_every_input"]), statistics.median(times["record"])
        row[f"new_{new}"] = {"wall_s": times, "ray_started": ray, "ratio": round(after / before, 3),
                             **({"requests": requests} if counter is not None else {})}
        print(f"{name}, {new} new: {json.dumps(row[f'new_{new}'])}", flush=True)
    row["changed_1"] = changed(archive, a, args, env, counter)
    print(f"{name}, 1 changed: {json.dumps(row['changed_1'])}", flush=True)
    return row


def changed(archive: Archive, a, args: list[str], env: dict[str, str], counter=None) -> dict:
    """Reruns with one source changed and left (exit 3: its SourceChanged row), nothing else new: the output's
    record as it is against the same without what it says of sources left so (`Archive.forget_left`)."""
    archive.put("cam00/snap000000.png", png_bytes(250))  # other pixels: another size or ETag, another mtime
    fpn_run(args, env, ok=(3,))  # the run that finds it changed
    times: dict[str, list[float]] = {"forget_left": [], "record": []}
    requests: dict[str, list[int]] = {"forget_left": [], "record": []}
    ray: dict[str, list[bool]] = {"forget_left": [], "record": []}
    for _ in range(a.repeats):
        for how in ("forget_left", "record"):
            if how == "forget_left":
                archive.forget_left()
            if counter is not None:
                counter.take()
            wall, _ = fpn_run(args, env, ok=(3,))
            job = archive.job()
            assert job["state"] == "finished_with_errors" and job["errors"] == 1, job
            times[how].append(round(wall, 2))
            ray[how].append("ray" in job["startup_s"])
            if counter is not None:
                time.sleep(0.3)
                requests[how].append(counter.take()[1])
    return {"wall_s": times, "ray_started": ray,
            "ratio": round(statistics.median(times["record"]) / statistics.median(times["forget_left"]), 3),
            **({"requests": requests} if counter is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="small PNG snapshots in the archive")
    ap.add_argument("--videos", type=int, default=4, help="copies of data/video/bikes.mp4 in the archive")
    ap.add_argument("--new", type=int, default=5, help="new images a day, in the second measurement")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds before each S3 answer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["local", "s3"])
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="daily-rerun-"))
    try:
        if a.only in (None, "local"):
            rows.append(scenario("local", Archive(str(tmp / "local")), a, env, []))
        if a.only in (None, "s3"):
            server, counter, endpoint = start_counted_server(suffix="")  # every request counted
            try:
                fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
                fs.mkdir("bench")
                counter.latency = a.latency
                rows.append(scenario("s3", Archive("s3://bench", fs), a, env, ["--endpoint-url", endpoint],
                                     counter))
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {**measured(), "images": a.images, "videos": a.videos, "new_per_day": a.new, "s3_latency_s": a.latency,
           "repeats": a.repeats, "rows": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
