"""Object storage end to end: inputs read from and output written to a real S3 API (moto's server)."""
import json
import os
import threading
import time

from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from conftest import SOAP
from faulttable import record
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
    job.join(300)
    assert not job.is_alive()
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
