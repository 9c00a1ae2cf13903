"""How long a manifest of objects on S3 takes to become the job's inputs: `pipeline.sources.expand_inputs` of a
`.txt` listing N objects, the entries looked up one after the other (`MANIFEST_THREADS = 1`, as before) and
`MANIFEST_THREADS` at a time (as now), alternating `--repeats` rounds in one process.

moto's S3 server runs in this process on 127.0.0.1 (tests/served_bytes.py's ThreadedMotoServer), answering every
request after `--latency` seconds (a distant region's round trip; S3 in the same region answers a small request in
~10-30 ms) and as fast as it can with `--latency 0`. Each round looks up the same N entries with a fresh s3fs
(no cached listing). Writes benchmarks/results/manifest_lookup.json.

    scripts/loopback-only .venv/bin/python benchmarks/manifest_lookup.py [--entries 1000] [--latency 0 0.02]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from _meta import measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "manifest_lookup.json"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import s3fs  # noqa: E402

import pipeline.sources as sources  # noqa: E402
from served_bytes import start_counted_server  # noqa: E402  the tests' moto server, with its latency


def lookup(manifest: str, endpoint: str, threads: int) -> tuple[float, int]:
    """(seconds, Sources) of expanding `manifest` with `threads` lookups at a time, nothing cached."""
    sources.MANIFEST_THREADS = threads
    s3fs.S3FileSystem.clear_instance_cache()
    t = time.perf_counter()
    found = sources.expand_inputs([manifest], {"s3": {"endpoint_url": endpoint}})
    return time.perf_counter() - t, len(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--latency", type=float, nargs="+", default=[0.0, 0.02], help="seconds before each answer")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    now = sources.MANIFEST_THREADS
    server, counter, endpoint = start_counted_server()
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
        fs.mkdir("archive")
        names = [f"s3://archive/cam{i % 10:02d}/snap{i:06d}.jpg" for i in range(a.entries)]
        fs.pipe({n: b"\xff\xd8" + bytes(i % 97) for i, n in enumerate(names)})
        fs.pipe("archive/list.txt", "\n".join(names).encode())
        rows = []
        for latency in a.latency:
            counter.latency = latency
            times: dict[int, list[float]] = {1: [], now: []}
            for _ in range(a.repeats):
                for threads in (1, now):
                    seconds, n = lookup("s3://archive/list.txt", endpoint, threads)
                    assert n == a.entries, n
                    times[threads].append(round(seconds, 3))
            serial, together = statistics.median(times[1]), statistics.median(times[now])
            rows.append({"latency_s": latency, "one_at_a_time_s": times[1], f"{now}_at_a_time_s": times[now],
                         "ratio": round(together / serial, 3)})
            print(json.dumps(rows[-1]))
    finally:
        server.stop()
    doc = {**measured(), "entries": a.entries, "threads": now, "repeats": a.repeats, "rows": rows}
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
