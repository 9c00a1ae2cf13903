"""Object storage end to end: inputs read from and output written to a real S3 API (moto's server)."""
import json

import duckdb
import pyarrow.dataset as pads
import pytest
from pyarrow.fs import FSSpecHandler, PyFileSystem

from conftest import SOAP
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
