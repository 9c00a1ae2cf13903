"""Bytes a video job reads from object storage: per segment and per job, as a share of the object's size.

Starts moto's S3 server (ThreadedMotoServer) on 127.0.0.1 with its WSGI app wrapped so that it counts the body
bytes of every response it serves for the video's key (the server side: what a bill would say), puts a clip there
(bikes.mp4's frames played forward and back to --frames frames at 640x360, H.264 by PyAV with x264's defaults:
keyframes at scene changes and at most every 250 frames), and measures with the pipeline's own code:

- the probe (`pipeline.decode.probe`: container header and index) alone;
- each segment of `plan_units` at --segment-frames (keyframe-aligned), decoded by `decode_unit` under three
  samplings (every frame, every 40th, keyframes only), beside the segment's own share of the file (the bytes of
  its packets, from the container index) and the largest group of pictures;
- the same segments through `storage.local_copy`, the path every segment took before (a whole download each);
- segments cut as before (every --segment-frames frames, not at keyframes), read by ranges: the frames decoded
  and bytes read that keyframe alignment saves;
- the segments read with other cache block sizes (8 to 128 KiB), for the choice of `storage.REMOTE_BLOCK` and
  `decode.KEYFRAME_BLOCK`;
- a whole `fpn run` (embedded Ray, the null model, every frame) of the object: every byte the job read.

Bytes are deterministic for a given clip and FFmpeg build: one run of each, no repeats. Writes
benchmarks/results/ranged_reads.json.

Run: python benchmarks/ranged_reads.py [--frames 2500] [--segment-frames 256] [--no-job]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

import rasterio  # noqa: F401  GDAL before decord (see pipeline.decode)

from pipeline.decode import Sampling, decode_unit, probe, read_video, sample_indices
from pipeline.plan import plan_units
from pipeline.storage import local_copy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from served_bytes import start_counted_server  # noqa: E402  the tests' counting moto server

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ranged_reads.json"
BIKES = REPO / "data" / "video" / "bikes.mp4"
BUCKET, KEY = "bench", "archive/loop.mp4"


def make_clip(path: Path, frames: int, fps: float = 25.0) -> None:
    """bikes.mp4 forward then backward (no cut at the loop point), resized to 640x360, x264 `veryfast`."""
    import av
    from PIL import Image

    with av.open(str(BIKES)) as src:
        loop = [np.asarray(Image.fromarray(f.to_ndarray(format="rgb24")).resize((640, 360), Image.BILINEAR))
                for f in src.decode(video=0)]
    order = loop + loop[::-1]
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000), options={"preset": "veryfast"})
        st.width, st.height, st.pix_fmt = 640, 360, "yuv420p"
        for i in range(frames):
            for p in st.encode(av.VideoFrame.from_ndarray(order[i % len(order)], format="rgb24")):
                out.mux(p)
        for p in st.encode():
            out.mux(p)


def packet_bytes(path: Path) -> tuple[list[int], list[int]]:
    """Per frame (decode order) compressed bytes, and the keyframe indices, from the container index."""
    import av

    with av.open(str(path)) as c:
        entries = list(c.streams.video[0].index_entries)
    return [e.size for e in entries], [k for k, e in enumerate(entries) if e.is_keyframe]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2500)
    ap.add_argument("--segment-frames", type=int, default=256)
    ap.add_argument("--no-job", action="store_true", help="skip the whole `fpn run` (Ray start-up and all)")
    a = ap.parse_args()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)

    tmp = Path(tempfile.mkdtemp(prefix="fpn-ranged-"))
    clip = tmp / "loop.mp4"
    t0 = time.monotonic()
    make_clip(clip, a.frames)
    print(f"clip: {a.frames} frames, {clip.stat().st_size} bytes, made in {time.monotonic() - t0:.1f} s", flush=True)
    sizes, keys = packet_bytes(clip)
    size = clip.stat().st_size

    server, counter, endpoint = start_counted_server(KEY)
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(BUCKET)
    fs.put(str(clip), f"{BUCKET}/{KEY}")
    url = f"s3://{BUCKET}/{KEY}"
    opts = {"s3": {"endpoint_url": endpoint}}
    counter.take()

    info = probe(url, opts)
    probe_bytes, probe_requests = counter.take()
    units = list(plan_units(url, url, segment_frames=a.segment_frames, raster_pixels=10**8, windows_per_unit=1,
                            storage_options=opts))
    counter.take()  # plan_units probes again: counted above
    gops = [sum(sizes[s:e]) for s, e in zip(keys, keys[1:] + [len(sizes)])]
    samplings = {"every_frame": Sampling(), "every_40th": Sampling(every_n=40), "keyframes": Sampling(keyframes=True)}
    segments = []
    for u in units:
        row = {"start": u.start, "stop": u.stop, "own_bytes": sum(sizes[u.start:u.stop])}
        row["own_share"] = round(row["own_bytes"] / size, 4)
        for name, s in samplings.items():
            sampled = decoded = 0
            for b in decode_unit(u, sampling=s, batch_size=8, storage_options=opts):
                sampled += len(b["frame_index"])
                decoded += sum(b["decoded_frames"])
            got, requests = counter.take()
            row[name] = {"bytes": got, "requests": requests, "of_object": round(got / size, 4),
                         "sampled": sampled, "decoded": decoded,
                         "decoded_per_sampled": round(decoded / sampled, 3) if sampled else None}
        with local_copy(url, opts):
            pass
        row["before_local_copy"] = {"bytes": counter.take()[0]}
        row["before_local_copy"]["of_object"] = round(row["before_local_copy"]["bytes"] / size, 4)
        segments.append(row)
        print(f"[{u.start}, {u.stop}): own {row['own_share']:.3f}, read {row['every_frame']['of_object']:.3f} "
              f"(every 40th {row['every_40th']['of_object']:.3f}, keyframes {row['keyframes']['of_object']:.3f}) "
              f"of the object", flush=True)

    result = {
        "object_bytes": size, "frames": info.num_frames, "fps": info.fps, "width": info.width, "height": info.height,
        "keyframe_count": len(keys), "largest_gop_bytes": max(gops), "largest_gop_of_object": round(max(gops) / size, 4),
        "segment_frames": a.segment_frames, "segments": len(units),
        "probe": {"bytes": probe_bytes, "requests": probe_requests, "of_object": round(probe_bytes / size, 4)},
        "per_segment": segments,
    }
    for name in samplings:
        per = [s[name]["of_object"] for s in segments]
        excess = [s[name]["bytes"] - s["own_bytes"] for s in segments]
        result[name] = {
            "segment_of_object_median": round(float(np.median(per)), 4), "segment_of_object_max": max(per),
            "segment_excess_over_own_bytes_median": int(np.median(excess)),
            "segments_total_of_object": round(sum(s[name]["bytes"] for s in segments) / size, 4),
            "with_probe_of_object": round((probe_bytes + sum(s[name]["bytes"] for s in segments)) / size, 4),
            "decoded_per_sampled": round(sum(s[name]["decoded"] for s in segments)
                                         / max(1, sum(s[name]["sampled"] for s in segments)), 3),
        }
    result["before_local_copy_of_object"] = round((size + sum(s["before_local_copy"]["bytes"] for s in segments))
                                                  / size, 4)

    # the segments as they were cut before (every --segment-frames frames, wherever the keyframes are), read by
    # ranges too: what keyframe alignment itself saves, in frames decoded and bytes read
    fixed = [dataclasses.replace(units[0], start=start, stop=min(start + a.segment_frames, info.num_frames),
                                 keyframes="") for start in range(0, info.num_frames, a.segment_frames)]
    result["fixed_cuts"] = {"segments": len(fixed)}
    for name in ("every_frame", "every_40th"):
        sampled = decoded = 0
        for u in fixed:
            for b in decode_unit(u, sampling=samplings[name], batch_size=8, storage_options=opts):
                sampled += len(b["frame_index"])
                decoded += sum(b["decoded_frames"])
        got = counter.take()[0]
        result["fixed_cuts"][name] = {"segments_total_of_object": round(got / size, 4), "decoded": decoded,
                                      "sampled": sampled, "decoded_per_sampled": round(decoded / sampled, 3)}
        print("fixed cuts", name, result["fixed_cuts"][name], flush=True)

    # the block size: all segments opened and read as decode_unit does, with other blocks
    sweep = []
    for block in (8 << 10, 16 << 10, 64 << 10, 128 << 10):
        for name in ("every_frame", "keyframes"):
            s = samplings[name]
            for u in units:
                wanted = sample_indices(u.num_frames, u.fps, s, u.start, u.stop, u.keyframe_indices(), u.frame_times())
                with read_video(url, opts, block_size=block) as v:
                    for i in range(0, len(wanted), 8):
                        v.frames(wanted[i:i + 8])
            got, requests = counter.take()
            sweep.append({"block": block, "sampling": name, "segments_total_of_object": round(got / size, 4),
                          "requests_per_segment": round(requests / len(units), 1)})
            print("block sweep", sweep[-1], flush=True)
    result["block_sweep"] = sweep

    if not a.no_job:
        from jobs.runner import run
        from jobs.spec import plan_from_dict

        out = tmp / "out"
        t0 = time.monotonic()
        doc = run(plan_from_dict({"inputs": [url], "output": str(out), "storage_options": opts,
                                  "model": f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel",
                                  "segment_frames": a.segment_frames, "batch_size": 8, "tile": None}))
        got, requests = counter.take()
        result["job"] = {"state": doc["state"], "frames": doc["frames"], "work_units": doc.get("work_units"),
                         "bytes": got, "requests": requests, "of_object": round(got / size, 4),
                         "decoded_frames": doc.get("decoded_frames"),
                         "decoded_per_sampled": doc.get("decoded_per_sampled"),
                         "wall_s": round(time.monotonic() - t0, 1)}
        print(f"job: {doc['state']}, {doc['frames']} frames, read {got} bytes = {got / size:.3f} of the object",
              flush=True)
        import ray

        ray.shutdown()

    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    server.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    ef = result["every_frame"]
    print(f"per segment (every frame): median {ef['segment_of_object_median']:.3f} of the object "
          f"(own share ~{1 / len(units):.3f}, largest GOP {result['largest_gop_of_object']:.3f}); segments + probe "
          f"{ef['with_probe_of_object']:.3f}; before (local copies) {result['before_local_copy_of_object']:.2f}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
