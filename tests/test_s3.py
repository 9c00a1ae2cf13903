"""Object storage end to end: inputs read from and output written to a real S3 API (moto's server)."""
import json
import os
import re
import sys
import threading
import time
import traceback
import warnings

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from conftest import SOAP
from faulttable import record
from served_bytes import start_counted_server
from jobs.runner import run
from jobs.spec import plan_from_dict

pytestmark = pytest.mark.slow


def test_run_from_s3_to_s3_and_read_back(ray_session, s3, make_video):
    fs, endpoint = s3
    video = make_video("s3clip.mp4", 20, 10.0)
    fs.put(str(video), "test/in/flights/clip.mp4")
    fs.put(str(SOAP), "test/in/tiles/soap.png")
    fs.pipe("test/in/flights/empty.mp4", b"")
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    doc = run(plan_from_dict({
        "inputs": ["s3://test/in/flights/*.mp4", "s3://test/in/tiles/soap.png"],
        "output": "s3://test/out/job1", "storage_options": opts,
        "sampling": {"every_n": 5}, "segment_frames": 8,
    }))
    assert doc["state"] == "finished_with_errors" and doc["frames"] == 4 + 1 and doc["errors"] == 1

    # read back with pyarrow (through s3fs) ...
    pafs = PyFileSystem(FSSpecHandler(fs))
    t = pads.dataset("test/out/job1/frames", filesystem=pafs, format="parquet").to_table()
    assert sorted(t.column("frame_index").to_pylist()) == [0, 0, 5, 10, 15]
    assert set(t.column("source").to_pylist()) == {"s3://test/in/flights/clip.mp4", "s3://test/in/tiles/soap.png"}
    e = pads.dataset("test/out/job1/errors", filesystem=pafs, format="parquet").to_table()
    assert e.column("source").to_pylist() == ["s3://test/in/flights/empty.mp4"]
    # ... and with DuckDB, given the same fsspec filesystem
    con = duckdb.connect()
    con.register_filesystem(fs)
    n, dets = con.sql("SELECT count(*), sum(num_detections) FROM read_parquet('s3://test/out/job1/frames/*.parquet')").fetchall()[0]
    assert n == 5 and dets == sum(t.column("num_detections").to_pylist())

    # credentials never reach the outputs
    job = json.loads(fs.cat("test/out/job1/_job.json"))
    opts = job["spec"]["storage_options"]["s3"]  # a flat mapping means options for s3
    assert opts["secret"] == "***" and opts["key"] == "***"
    assert "testing" not in fs.cat("test/out/job1/_job.json").decode()
    assert not [p for p in fs.find("test/out/job1") if "/." in p]  # no temporary objects left behind


def test_missing_object_fails_before_work_naming_it(ray_session, s3):
    fs, endpoint = s3
    with pytest.raises(FileNotFoundError, match="s3://test/nope.mp4"):
        run(plan_from_dict({"inputs": ["s3://test/nope.mp4"], "output": "s3://test/out/x",
                            "storage_options": {"endpoint_url": endpoint}}))
    assert not fs.exists("test/out/x")


@pytest.fixture(scope="module")
def counted_s3_server():
    """moto's S3 server in this process (ThreadedMotoServer on 127.0.0.1), counting the bytes it serves."""
    server, counter, endpoint = start_counted_server()
    yield endpoint, counter
    server.stop()


@pytest.fixture
def counted_s3(counted_s3_server, monkeypatch):
    """(s3fs filesystem, endpoint, counter) of `counted_s3_server`, with credentials in the environment."""
    import s3fs

    endpoint, counter = counted_s3_server
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True), endpoint, counter


def test_a_small_remote_image_costs_a_request_to_probe_and_one_to_decode(counted_s3, tmp_path, monkeypatch):
    """Its size comes from the listing: s3fs asked for it again before each read (3 HEADs and 2 GETs an image, a
    request a few ms even on loopback, for archives of 100,000 snapshots)."""
    import numpy as np
    import s3fs
    from PIL import Image

    from pipeline.decode import Sampling, decode_unit
    from pipeline.plan import plan_units
    from pipeline.sources import expand_inputs

    fs, endpoint, counter = counted_s3
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "snap.png")
    fs.mkdir("snaps")
    fs.put(str(tmp_path / "snap.png"), "snaps/cam/snap.png")
    opts = {"s3": {"endpoint_url": endpoint}}
    (src,) = expand_inputs(["s3://snaps/cam/"], opts)  # a listing: no request for the object itself
    counter.suffix = "/snaps/cam/snap.png"
    counter.take()
    s3fs.S3FileSystem.clear_instance_cache()  # probing and decoding run in other processes: no listing cached
    (unit,) = plan_units(src.url, src.canonical, segment_frames=8, raster_pixels=10**8, windows_per_unit=1,
                         storage_options=opts, size=src.size)
    time.sleep(0.2)  # the server counts a request once it has sent the answer
    assert counter.take()[1] == 1
    s3fs.S3FileSystem.clear_instance_cache()
    (batch,) = decode_unit(unit, sampling=Sampling(), batch_size=4, storage_options=opts)
    time.sleep(0.2)
    assert counter.take()[1] == 1 and np.array_equal(batch["image"][0], pixels)

    # a header past the first bytes the probe reads (a JPEG's application segments: 300 kB of them) is read on
    jpeg = (tmp_path / "snap.jpg")
    Image.fromarray(pixels).save(jpeg)
    data = jpeg.read_bytes()
    segments = b"".join(b"\xff\xef" + (60002).to_bytes(2, "big") + bytes(60000) for _ in range(5))
    fs.pipe("snaps/cam/big-exif.jpg", data[:2] + segments + data[2:])
    (unit,) = plan_units("s3://snaps/cam/big-exif.jpg", "s3://snaps/cam/big-exif.jpg", segment_frames=8,
                         raster_pixels=10**8, windows_per_unit=1, storage_options=opts)
    assert (unit.kind, unit.width, unit.height) == ("image", 64, 48)


def test_a_rerun_over_an_unchanged_bucket_asks_for_no_input_object_and_starts_no_ray(
        ray_session, counted_s3, make_video, tmp_path, monkeypatch):
    """A daily rerun probed every object again (a ranged GET or more each, in Ray tasks: Ray started for them) to
    find what the output's record now holds (`pipeline.known`): with nothing new it lists the bucket, reads the
    output's record and frame ids, and asks for no input object."""
    from PIL import Image

    import jobs.runner
    from conftest import REPO

    fs, endpoint, counter = counted_s3
    fs.mkdir("daily")
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
        fs.put(str(tmp_path / f"{i}.png"), f"daily/in/cam/{i}.png")
    fs.put(str(make_video("daily16.mp4", 16, 8.0)), "daily/in/cam/clip.mp4")
    spec = plan_from_dict({"inputs": ["s3://daily/in/"], "output": "s3://daily/out",
                           "storage_options": {"s3": {"endpoint_url": endpoint}}, "segment_frames": 8,
                           "model": f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"})
    counter.suffix = (".png", ".mp4")
    counter.take()
    first = run(spec)
    time.sleep(0.2)  # the server counts a request once it has sent the answer
    assert first["state"] == "succeeded" and first["frames"] == 3 + 16
    assert counter.take()[1] >= 4 + 4  # each object probed and decoded

    monkeypatch.setattr(jobs.runner, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    again = run(spec)
    time.sleep(0.2)
    assert (again["state"], again["nothing_new"], again["inputs_known"], again["frames"]) == ("succeeded", True, 4, 19)
    assert counter.take() == (0, 0)


def test_an_objects_last_modified_time_decides_whether_it_waits_for_a_later_run(s3):
    """`min_age_s` on object storage: S3's LastModified (the server's clock) from the listing, the object's info and
    a manifest's lookups alike."""
    from pipeline.sources import expand_inputs, settled

    fs, endpoint = s3
    fs.pipe("test/cam/a.jpg", b"a")
    fs.pipe("test/list.txt", b"s3://test/cam/a.jpg\n")
    opts = {"s3": {"endpoint_url": endpoint}}
    for spelling in ("s3://test/cam/", "s3://test/cam/*.jpg", "s3://test/cam/a.jpg", "s3://test/list.txt"):
        (src,) = expand_inputs([spelling], opts)
        assert abs(src.modified - time.time()) < 120, spelling
        assert settled([src], 3600) == ([], [src]) and settled([src], 3600, now=src.modified + 3601) == ([src], [])


def test_a_manifests_remote_entries_are_looked_up_together(counted_s3, monkeypatch):
    """A manifest of objects on S3 asks for them MANIFEST_THREADS at a time (one after the other, 100,000 entries
    took 100,000 round trips before any work), and its Sources are the same, in order, a missing one among them."""
    import s3fs

    from pipeline.sources import MANIFEST_THREADS, expand_inputs

    fs, endpoint, counter = counted_s3
    fs.mkdir("listed")
    names = [f"s3://listed/cam{i % 3}/snap{i:03d}.jpg" for i in range(80)]
    for i, name in enumerate(names):
        fs.pipe(name, bytes(i + 1))
    fs.pipe("listed/list.txt", "\n".join(names + ["s3://listed/gone.jpg"]).encode())
    s3fs.S3FileSystem.clear_instance_cache()
    counter.latency, counter.most_in_flight = 0.05, 0
    try:
        sources = expand_inputs(["s3://listed/list.txt"], {"s3": {"endpoint_url": endpoint}})
    finally:
        counter.latency = 0.0
    assert [s.canonical for s in sources] == sorted(names + ["s3://listed/gone.jpg"])
    assert [s.size for s in sources] == [names.index(s.canonical) + 1 for s in sources[:-1]] + [None]
    assert MANIFEST_THREADS // 2 <= counter.most_in_flight <= MANIFEST_THREADS


def _noise_clip(path: Path, frames: int, gop: int) -> Path:
    """An H.264 MP4 of 320x240 noise (every frame about as large: a segment's share is its frame count's) with a
    keyframe every `gop` frames."""
    import numpy as np

    from jobs.render import write_video

    write_video((np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8) for i in range(frames)),
                path, 12, gop=gop)
    return path


def test_a_remote_video_is_read_by_ranges_each_segment_about_its_share(ray_session, counted_s3, tmp_path,
                                                                        monkeypatch):
    """Bytes served by the S3 server, counted at the server: the probe reads the header and index, each segment
    the packets it decodes (its share of the file, plus a few cache blocks), the whole job at most 1.5x the object
    (before: a whole download for the probe and for each segment, 5x here). A keyframes-only scan reads less."""
    import av
    import numpy as np

    from pipeline.decode import Sampling, decode_unit, probe
    from pipeline.plan import plan_units

    fs, endpoint, counter = counted_s3
    clip = _noise_clip(tmp_path / "noise.mp4", 96, 24)
    with av.open(str(clip)) as c:
        packet_sizes = [e.size for e in c.streams.video[0].index_entries]
    size = clip.stat().st_size
    fs.mkdir("ranged")
    fs.put(str(clip), "ranged/in/noise.mp4")
    url, opts = "s3://ranged/in/noise.mp4", {"s3": {"endpoint_url": endpoint}}
    counter.suffix = "/ranged/in/noise.mp4"
    counter.take()

    info = probe(url, opts)
    assert (info.num_frames, info.keyframes) == (96, (0, 24, 48, 72))
    assert counter.take()[0] < 0.1 * size  # header and index only
    units = list(plan_units(url, url, segment_frames=24, raster_pixels=10**8, windows_per_unit=1,
                            storage_options=opts))
    assert [(u.start, u.stop) for u in units] == [(0, 24), (24, 48), (48, 72), (72, 96)]
    counter.take()
    local = list(plan_units(str(clip), str(clip), segment_frames=24, raster_pixels=10**8, windows_per_unit=1))
    for u, lu in zip(units, local):
        remote_frames = np.concatenate([b["image"] for b in decode_unit(u, sampling=Sampling(every_n=5),
                                                                        batch_size=8, storage_options=opts)])
        served = counter.take()[0]
        own = sum(packet_sizes[u.start:u.stop])
        print(f"\nsegment [{u.start}, {u.stop}): served {served} bytes = {served / size:.3f} of the object "
              f"(its packets: {own / size:.3f})")
        assert served < own + 320 * 1024 and served < 0.45 * size, (served, own, size)
        local_frames = np.concatenate([b["image"] for b in decode_unit(lu, sampling=Sampling(every_n=5),
                                                                       batch_size=8)])  # decord, local file
        np.testing.assert_array_equal(remote_frames, local_frames)  # PyAV over ranges gives decord's pixels

    # a whole job: every 23rd frame, the last of each group of pictures, so every frame is read and decoded
    doc = run(plan_from_dict({"inputs": [url], "output": str(tmp_path / "out"), "storage_options": opts,
                              "sampling": {"every_n": 23}, "segment_frames": 24}))
    served = counter.take()[0]
    print(f"whole job: served {served} bytes = {served / size:.3f} of the object ({size} bytes)")
    assert doc["state"] == "succeeded" and doc["frames"] == 5 and doc["work_units"] == 4
    assert served <= 1.5 * size
    # decoded frames per sampled frame, in the summary and _job.json: frames 0 | 1..23 | 24..46 | 48..69 | 72..92
    assert doc["decoded_frames"] == 1 + 23 + 23 + 22 + 21
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["decoded_frames"] == 90 and job["decoded_per_sampled"] == doc["decoded_per_sampled"] == 18.0

    doc = run(plan_from_dict({"inputs": [url], "output": str(tmp_path / "keys"), "storage_options": opts,
                              "sampling": {"keyframes": True}, "segment_frames": 24}))
    served = counter.take()[0]
    print(f"keyframes only: served {served} bytes = {served / size:.3f} of the object")
    t = pads.dataset(str(tmp_path / "keys" / "frames"), format="parquet").to_table()
    assert sorted(t.column("frame_index").to_pylist()) == [0, 24, 48, 72]
    assert doc["decoded_per_sampled"] == 1.0 and served < 0.5 * size


def _stacks() -> str:
    """Where each thread of this process is (the job's, Ray Data's executor, the fault proxy's), for a test that
    found a job still running."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame)[-8:])
                     for ident, frame in sys._current_frames().items())


def _worker_stacks() -> str:
    """Where each Ray worker process (and each decoder child it started) is, by py-spy (ray[default] installs it):
    the driver's threads only show that Ray Data waits for a task, not which task hangs where."""
    import shutil
    import subprocess

    import psutil

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out, seen, deadline = [], set(), time.monotonic() + 90
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if not cmd.startswith("ray::") or re.match(r"ray::\w*(Agent|Dashboard)", cmd):  # a worker names its task
            continue
        for p in [proc, *proc.children(recursive=True)]:
            if p.pid in seen or time.monotonic() > deadline:
                continue
            seen.add(p.pid)
            try:
                dump = subprocess.run([spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True,
                                      timeout=max(1.0, min(20.0, deadline - time.monotonic())))
                busy = [t for t in re.split(r"\n(?=Thread )", dump.stdout) if "(idle)" not in t.split("\n")[0]
                        or "MainThread" in t.split("\n")[0]]  # py-spy marks threads waiting in a syscall idle
                out.append(f"=== {p.pid} {' '.join(p.cmdline())[:100].strip()}\n" + "\n".join(busy) + dump.stderr)
            except (OSError, subprocess.SubprocessError, psutil.Error) as e:
                out.append(f"=== {p.pid}: {e!r}")
    return "\n".join(out)


@pytest.mark.parametrize("mode", ["500", "restart"])
def test_s3_answering_500s_or_restarting_mid_job_loses_and_repeats_no_frame(ray_session, s3, tmp_path, mode):
    """The S3 server fails for a few seconds while the job reads and writes through it; the job retries (or,
    where retries run out, records error rows that a resume fixes): every frame exactly once in the end."""
    from faultproxy import FaultProxy
    from test_faults import assert_once, long_video

    fs, endpoint = s3
    fs.put(str(long_video(tmp_path, n=160)), "test/in/long.mp4")
    proxy = FaultProxy(endpoint)
    spec = {"inputs": ["s3://test/in/long.mp4"], "output": "s3://test/out/faulty",
            "storage_options": {"endpoint_url": proxy.url}, "sampling": {"every_n": 2}, "segment_frames": 16}
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run(plan_from_dict(spec))))
    job.start()
    deadline = time.monotonic() + 120
    while not fs.glob("test/out/faulty/frames/*.parquet") and time.monotonic() < deadline:
        time.sleep(0.2)
        fs.invalidate_cache()
    before = proxy.faulted
    proxy.fault(mode)
    time.sleep(3)
    proxy.heal()
    job.join(240)
    stalled = ""
    if job.is_alive():  # where everything waits, then the pipeline's own bound on a hung decoder (300 s) may act
        stalled = (f"Ray's free resources {ray_session.available_resources()} of {ray_session.cluster_resources()};"
                   f" its Ray workers:\n{_worker_stacks()}\nthis process's threads:\n{_stacks()}")
        job.join(360)
    assert not job.is_alive(), f"the job still runs 600 s after the fault ended; at 240 s {stalled}"
    if stalled:  # twice in CI (2026-11-27, -28) a job here outlived 300 s, never here: say where, once it ends
        warnings.warn(f"the job ended more than 240 s after a 3 s S3 fault; at 240 s {stalled}")
    assert proxy.faulted > before, "the fault hit no request: the test proved nothing"
    print(f"\nS3 fault {mode}: {proxy.faulted - before} connections faulted; first run {result.get('state')}, "
          f"{result.get('frames')} frames, {result.get('errors')} errors")
    first = result.get("state")
    if result.get("state") != "succeeded":  # retries ran out somewhere: the errors say where, a resume fixes it
        assert result["state"] in ("finished_with_errors", "failed"), result
        result = run(plan_from_dict(spec))
    proxy.close()
    assert result["state"] == "succeeded" and result["errors"] == 0, result
    fs.invalidate_cache()
    pafs = PyFileSystem(FSSpecHandler(fs))
    t = pads.dataset("test/out/faulty/frames", filesystem=pafs, format="parquet").to_table()
    record(f"S3 server {'answers 500' if mode == '500' else 'restarts (connections cut, refused)'} for 3 s mid-job",
           f"{first} ({proxy.faulted - before} connections faulted, retried)", expected=80, frames=t,
           errors=result["errors"], exit_code=0)
    assert_once(t, 80)
    assert not fs.glob("test/out/faulty/_tmp/**")


def test_a_heartbeat_landing_while_a_write_checks_the_lease_fails_nothing(s3, monkeypatch):
    """The fence check of a write task reads `_lease.json` while the driver's heartbeat replaces it: a
    replacement between s3fs's HEAD and its GET (If-Match on the ETag the HEAD saw) failed the read with
    PreconditionFailed, and the write task and the job with it (seen once in a 500-fault run, before any fault).
    Here every HEAD of the record is followed by a heartbeat; the write commits, `fpn status`'s read of
    `_job.json` (rewritten as the job goes) is checked the same way."""
    import s3fs

    from pipeline.output import Output

    head = s3fs.S3FileSystem._info
    armed = threading.Event()
    replacements = {"_lease.json": lambda: lease._body(),
                    "_job.json": lambda: json.dumps({"state": "running", "at": time.time()}).encode()}

    async def head_then_replace(self, path, *args, **kwargs):
        info = await head(self, path, *args, **kwargs)
        bucket, key, _ = self.split_path(path)
        body = replacements.get(key.rsplit("/", 1)[-1])
        if armed.is_set() and body is not None:
            await self._call_s3("put_object", Bucket=bucket, Key=key, Body=body())
        return info

    # before the filesystem is made: fsspec binds its blocking `info` to the `_info` an instance is made with
    monkeypatch.setattr(s3fs.S3FileSystem, "_info", head_then_replace)
    s3fs.S3FileSystem.clear_instance_cache()
    _, endpoint = s3
    out = Output("s3://test/out/fenced", {"endpoint_url": endpoint})
    lease = out.lease(owner="test").acquire()
    lease._stop.set()  # the test replaces the record instead, at the worst moment
    try:
        out.write_job({"state": "running"})
        armed.set()
        token = lease.record["token"]
        assert out.lease_token() == token
        assert out.read_job()["state"] == "running"
        assert out.write_frames(pa.table({"frame_id": ["a", "b"]}), fence=token) == 2
    finally:
        armed.clear()
        lease.release()
    assert len(out.frame_files()) == 1


def test_a_lease_write_whose_answer_was_lost_is_still_held(s3):
    """botocore retries a conditional PUT of `_lease.json` whose answer was lost (a connection cut after the
    write, a 500): when the first attempt landed, the retry's If-Match (heartbeat) or If-None-Match (acquire)
    fails against this lease's own record. Before, a heartbeat read that as a takeover and stopped the job, and
    an acquire named its own run as the writer holding the output."""
    from pipeline.output import Output

    _, endpoint = s3
    out = Output("s3://test/out/lost-answer", {"endpoint_url": endpoint})
    lease = out.lease(owner="first").acquire()
    lease._stop.set()  # the test beats
    out.fs.pipe_file(lease._key, lease._body())  # a heartbeat's first attempt landed; its answer never came
    assert lease.heartbeat() and not lease.lost
    assert lease.heartbeat()  # and the ETag it found serves the next one
    other = out.lease(owner="other")
    out.fs.pipe_file(other._key, other._body())  # a takeover (as after a stale heartbeat): the lease is lost
    assert not lease.heartbeat() and lease.lost
    lease.release()
    assert out.lease_token() == other.record["token"]  # a lost lease's release leaves the new holder's record
    out.fs.rm(other._key)

    second = out.lease(owner="second")
    out.fs.pipe_file(second._key, second._body())  # its create landed; the answer was lost
    second.acquire()
    try:
        assert second.took_over is None and out.lease_token() == second.record["token"]
    finally:
        second.release()


def test_files_other_processes_write_are_listed_and_counted(s3):
    """A job's driver lists `frames/` while other processes write it (the progress bar, the final counts, the
    duplicate check): s3fs answered every listing after the first from its cache, so a 600-frame job recorded
    192 frames and its state as succeeded."""
    import s3fs

    from pipeline.output import Output, frame_schema

    _, endpoint = s3
    out = Output("s3://test/out/listed", {"endpoint_url": endpoint})
    out.write_empty_frames()
    assert len(out.frame_files()) == 1 and out.counts()["frames"] == 0  # listed, as a progress poll lists
    writer = Output("s3://test/out/listed", {"endpoint_url": endpoint})
    writer.fs  # its path
    writer._fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
    row = {name: None for name in frame_schema().names}
    for k in range(3):  # another process (a write task) adds files
        writer.write_frames(pa.Table.from_pylist([{**row, "frame_id": f"f{k}", "source": "s", "frame_index": k,
                                                   "num_detections": 0}], schema=frame_schema()))
    writer.write_errors([{"source": "bad", "stage": "probe", "message": "m", "error_type": "E"}], "k")
    assert len(out.frame_files()) == 4 and out.done_ids() == {"f0", "f1", "f2"}
    assert out.counts()["frames"] == 3 and out.counts()["errors"] == 1


SECRETS = {"s3 key": "PLANTEDINKEY7", "s3 secret": "PLANTEDINSECRET8", "output key": "PLANTEDOUTKEY9",
           "output secret": "PLANTEDOUTSECRET0", "http token": "PLANTEDBEARER1", "signature": "PLANTEDSIGNATURE2",
           "credential": "PLANTEDCREDENTIAL3"}


@pytest.fixture
def http_server(tmp_path):
    """A plain HTTP file server on 127.0.0.1 that answers 403 without `Authorization: Bearer <http token>`."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "www"
    root.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def _authorised(self):
            if self.headers.get("Authorization") == f"Bearer {SECRETS['http token']}":
                return True
            self.send_error(403, "no token")
            return False

        def do_GET(self):
            if self._authorised():
                super().do_GET()

        def do_HEAD(self):
            if self._authorised():
                super().do_HEAD()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_job_mixing_s3_http_and_local_inputs_with_options_for_each_leaks_no_secret(s3, http_server, make_video,
                                                                                     tmp_path):
    """Inputs on s3 (its own keys), on an HTTP server that wants a bearer token, presigned-style URLs, and a
    local file; the output on s3 with other keys. The job runs as a user runs it (`fpn run spec.yaml`, its own
    embedded Ray whose logs go to a directory of this test) and every planted secret is searched for in all it
    printed, wrote and logged."""
    import subprocess
    import sys
    import tempfile

    import yaml

    from conftest import REPO

    fs, endpoint = s3
    www, http = http_server
    video = make_video("mixed.mp4", 12, 6.0)
    fs.put(str(video), "test/in/clip.mp4")
    (www / "clip.mp4").write_bytes(video.read_bytes())
    (www / "broken.mp4").write_bytes(b"not a video at all")
    signed = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SECRETS['credential']}&X-Amz-Signature={SECRETS['signature']}"
    spec = {
        "inputs": ["s3://test/in/clip.mp4", f"{http}/clip.mp4?{signed}", f"{http}/broken.mp4?{signed}", str(SOAP)],
        "output": "s3://test/out/mixed", "sampling": {"every_n": 3},
        "storage_options": {"s3": {"endpoint_url": endpoint, "key": SECRETS["s3 key"], "secret": SECRETS["s3 secret"]},
                            "http": {"headers": {"Authorization": f"Bearer {SECRETS['http token']}"}}},
        "output_storage_options": {"s3": {"endpoint_url": endpoint, "key": SECRETS["output key"],
                                          "secret": SECRETS["output secret"]}},
    }
    spec_path = tmp_path / "mixed.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/fpnr")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(spec_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    printed = p.stdout + p.stderr
    assert p.returncode == 3, printed  # finished with errors: broken.mp4
    fs.invalidate_cache()
    pafs = PyFileSystem(FSSpecHandler(fs))
    t = pads.dataset("test/out/mixed/frames", filesystem=pafs, format="parquet").to_table()
    assert sorted(set(t.column("source").to_pylist())) == sorted(
        ["s3://test/in/clip.mp4", f"{http}/clip.mp4", str(SOAP)])
    assert t.num_rows == 4 + 4 + 1
    e = pads.dataset("test/out/mixed/errors", filesystem=pafs, format="parquet").to_table()
    assert e.column("source").to_pylist() == [f"{http}/broken.mp4"]

    seen = {"printed": printed}
    for key in fs.find("test/out/mixed"):
        seen[key] = fs.cat(key).decode("latin-1")
    for f in Path(ray_tmp).rglob("*"):
        if f.is_file() and not f.is_symlink():
            seen[str(f)] = f.read_bytes().decode("latin-1")
    assert any("/logs/" in k for k in seen), "no Ray log was found to search"
    leaks = {(what, where) for where, text in seen.items() for what, s in SECRETS.items() if s in text}
    record("inputs on s3 (own keys), http (bearer token, presigned-style query) and local; output on s3 (other "
           "keys); 1 broken http input", f"finished with errors; {len(SECRETS)} planted secrets searched in "
           f"{len(seen)} files, logs and printed output", expected=9, frames=t, errors=e.num_rows,
           secrets_found=len(leaks), exit_code=p.returncode)
    assert not leaks, leaks
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)
