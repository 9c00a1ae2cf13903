"""Exactly once under faults: the output's lease, killed drivers and actors, the same input
spelled three ways, settings that change frame ids, torn records. Every check reads the output with pyarrow
alone, as a user's tools would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from click.testing import CliRunner

from conftest import REPO, SOAP, index_frame
from faulttable import record
from jobs.cli import cli
from jobs.runner import run
from jobs.spec import plan_from_dict
from pipeline.output import Output, OutputBusyError

pytestmark = pytest.mark.slow


def frames(out) -> "pads.Dataset":
    return pads.dataset(str(Path(out) / "frames"), format="parquet").to_table()


def errors(out):
    p = Path(out) / "errors"
    return pads.dataset(str(p), format="parquet").to_table() if p.exists() and any(p.iterdir()) else None


def assert_once(t, expected: int):
    ids = t.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids)) == expected, (len(ids), len(set(ids)), expected)


def fpn_process(*args, env=None, **kw) -> subprocess.Popen:
    """`fpn ...` in its own process (and process group: its embedded Ray dies with it)."""
    e = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def long_video(tmp_path, n=160, name="long.mp4"):
    from jobs.demo import write_video

    path = tmp_path / name
    write_video((index_frame(i, 96, 128) for i in range(n)), path, 16.0)
    return path


# -- the lease --------------------------------------------------------------------------------------
def _hold_lease(out: str, timeout_s: float) -> subprocess.Popen:
    code = ("import sys, time; from pipeline.output import Output; "
            f"Output(sys.argv[1]).lease(owner='victim', timeout_s={timeout_s}).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, out], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_holder_killed_with_sigkill_is_taken_over_after_its_timeout(where, tmp_path, request):
    if where == "s3":
        fs, endpoint = request.getfixturevalue("s3")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        request.addfinalizer(lambda: os.environ.pop("AWS_ENDPOINT_URL_S3", None))
        out = "s3://test/leased"
    else:
        out = str(tmp_path / "leased")
    holder = _hold_lease(out, timeout_s=2)
    with pytest.raises(OutputBusyError, match=r"written by victim on .* \(pid \d+\)"):
        Output(out).lease(owner="second").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with pytest.raises(OutputBusyError):  # killed, but its heartbeat is still fresh
        Output(out).lease(owner="second").acquire()
    time.sleep(2.5)
    lease = Output(out).lease(owner="second").acquire()
    try:
        assert lease.took_over["owner"] == "victim" and lease.took_over["pid"] == holder.pid
        assert Output(out).lease().holder()["owner"] == "second"
        record(f"lease holder SIGKILLed ({where} output)", "refused while fresh; taken over after the timeout",
               expected=None)
    finally:
        lease.release()
    assert Output(out).lease().holder() is None


def test_two_runs_into_one_output_one_is_refused_and_nothing_is_written_twice(make_video, tmp_path):
    video = make_video("two40.mp4", 40, 10.0)
    out = tmp_path / "out"
    args = ["run", video, "-o", out, "--every-n", 2, "--segment-frames", 10]
    a, b = fpn_process(*args), fpn_process(*args)
    (ta, _), (tb, _) = a.communicate(timeout=600), b.communicate(timeout=600)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 1], (ta, tb)
    refused = ta if a.returncode == 1 else tb
    assert "is being written by" in refused and "Traceback" not in refused
    assert_once(frames(out), 20)
    record("two `fpn run`s into one output at once", "one runs (exit 0), the other is refused naming the holder",
           expected=20, frames=frames(out), errors=0, exit_code=" / ".join(map(str, codes)))


# -- killed driver, killed actor ------------------------------------------------------------------------
def test_driver_sigkilled_mid_job_reads_as_interrupted_and_resume_writes_every_frame_once(ray_session, tmp_path):
    video = long_video(tmp_path)
    out = tmp_path / "out"
    p = fpn_process("run", video, "-o", out, "--segment-frames", 16, "--batch-size", 4,
                    env={"FPN_LEASE_TIMEOUT_S": "3"})
    deadline = time.time() + 400
    while time.time() < deadline and not list((out / "frames").glob("part-*.parquet")):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    written = frames(out).num_rows
    assert 0 < written < 160
    time.sleep(3.5)
    r = invoke("status", out)
    assert r.exit_code == 4 and "interrupted" in r.output, r.output
    r = invoke("resume", out)
    assert r.exit_code == 0, r.output
    t = frames(out)
    record("driver SIGKILLed mid-job, then `fpn resume`",
           f"status `interrupted` (exit 4) with {written} frames; resume took the lease over and finished",
           expected=160, frames=t, errors=0, exit_code=r.exit_code)
    assert_once(t, 160)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(160))
    job = json.loads((out / "_job.json").read_text())
    assert job["state"] == "succeeded" and job["runs"] == 2 and job["took_over_from"]["pid"] == p.pid
    assert not list((out / "_tmp").glob("*")) if (out / "_tmp").exists() else True


def test_detector_actor_sigkilled_mid_job_loses_no_frame(ray_session, tmp_path):
    import psutil

    video = long_video(tmp_path, 120)
    out = tmp_path / "out"
    result = {}

    def job():
        result["doc"] = run(plan_from_dict({"inputs": [str(video)], "output": str(out), "segment_frames": 12,
                                            "batch_size": 2}))

    th = threading.Thread(target=job)
    th.start()
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and th.is_alive():
        # the actor's process title names its class (no dashboard in the test session for the state API)
        alive = [p.pid for p in psutil.process_iter(["cmdline"])
                 if "Detector" in " ".join(p.info["cmdline"] or []) and "ray::" in " ".join(p.info["cmdline"] or [])]
        if alive and list((out / "frames").glob("part-*.parquet")):
            killed = alive[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    th.join(600)
    assert killed, "no detector actor was seen alive while frames were being written"
    assert result["doc"]["state"] == "succeeded"
    record("detector actor SIGKILLed mid-job", "Ray restarted the actor and re-ran its batches; succeeded",
           expected=120, frames=frames(out), errors=result["doc"]["errors"], exit_code=0)
    assert_once(frames(out), 120)


# -- identity ---------------------------------------------------------------------------------------
def test_the_same_input_spelled_three_ways_adds_no_rows(ray_session, tmp_path, monkeypatch):
    vids = tmp_path / "vids"
    vids.mkdir()
    (vids / "soap.png").write_bytes(SOAP.read_bytes())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    for spelling in ("vids/soap.png", "./vids/soap.png", "vids/", str(vids) + "//soap.png"):
        doc = run(plan_from_dict({"inputs": [spelling], "output": str(out)}))
        assert doc["state"] == "succeeded"
    t = frames(out)
    record("one image spelled 4 ways (vids/x, ./vids/x, vids/, vids//x), 4 runs", "one canonical frame id; "
           "reruns skip it", expected=1, frames=t, errors=0, exit_code=0)
    assert_once(t, 1)
    assert t.column("source").to_pylist() == [str(vids / "soap.png")]
    assert doc["skipped_frames"] == 1


def test_a_rerun_with_settings_that_change_frame_ids_is_refused_naming_them(ray_session, tmp_path):
    out = tmp_path / "out"
    run(plan_from_dict({"inputs": [str(SOAP)], "output": str(out), "tile": {"size": 512, "overlap": 64}}))
    r = invoke("run", SOAP, "-o", out, "--tile", 256, "--score-thresh", 0.2)
    assert r.exit_code == 1 and "tile.size 512 -> 256" in r.output and "score_thresh" in r.output, r.output
    assert "Traceback" not in r.output
    assert json.loads((out / "_job.json").read_text())["state"] == "succeeded"  # untouched
    record("rerun with other tile size and score threshold", "refused before any work, naming each difference",
           expected=1, frames=frames(out), errors=0, exit_code=r.exit_code)


def test_a_changed_source_is_an_error_row_on_resume(ray_session, make_video, tmp_path):
    src = tmp_path / "clip.mp4"
    src.write_bytes(make_video("chg12.mp4", 12, 6.0).read_bytes())
    out = tmp_path / "out"
    run(plan_from_dict({"inputs": [str(src)], "output": str(out)}))
    src.write_bytes(make_video("chg20.mp4", 20, 6.0).read_bytes())
    doc = run(plan_from_dict({"inputs": [str(src)], "output": str(out)}))
    e = errors(out)
    assert doc["state"] == "finished_with_errors" and e.column("error_type").to_pylist() == ["SourceChanged"]
    assert "changed since run 1" in e.column("message")[0].as_py()
    record("source video replaced (12 -> 20 frames) before a rerun", "SourceChanged error row; old frames kept",
           expected=12, frames=frames(out), errors=e.num_rows, exit_code=3)
    assert_once(frames(out), 12)


def test_error_rows_fixed_by_a_resume_disappear(ray_session, make_video, tmp_path):
    src = tmp_path / "late.png"
    src.write_bytes(b"")  # not there yet: an empty file
    out = tmp_path / "out"
    doc = run(plan_from_dict({"inputs": [str(src), str(SOAP)], "output": str(out)}))
    assert doc["state"] == "finished_with_errors" and errors(out).num_rows == 1
    src.write_bytes(SOAP.read_bytes())  # changed, but the output holds no frame of its old version
    doc = run(plan_from_dict({"inputs": [str(src), str(SOAP)], "output": str(out)}))
    assert doc["state"] == "succeeded" and doc["errors"] == 0 and errors(out) is None
    record("empty image fixed before a rerun", "its error row is gone; the frame written once", expected=2,
           frames=frames(out), errors=0, exit_code=0)
    assert_once(frames(out), 2)


# -- honest outcomes ------------------------------------------------------------------------------------
def test_outcomes_and_exit_codes(ray_session, tmp_path):
    bad = tmp_path / "zero.mp4"
    bad.write_bytes(b"")
    r = invoke("run", bad, "-o", tmp_path / "a")
    assert r.exit_code == 1 and "failed: 0 frames, 0 detections, 1 errors" in r.output, r.output
    r = invoke("run", bad, SOAP, "-o", tmp_path / "b")
    assert r.exit_code == 3 and "finished with errors: 1 frames" in r.output, r.output
    record("the only input is an empty .mp4", "failed: 0 frames, 1 error row", expected=0, written=0,
           duplicates=0, errors=1, exit_code=1)
    record("an empty .mp4 beside a good image", "finished with errors", expected=1, frames=frames(tmp_path / "b"),
           errors=errors(tmp_path / "b").num_rows, exit_code=r.exit_code)
    r = invoke("status", tmp_path / "b")
    assert r.exit_code == 3 and "finished with errors" in r.output


def test_torn_job_record_and_corrupt_parquet_give_one_line_and_a_way_out(ray_session, tmp_path):
    out = tmp_path / "out"
    run(plan_from_dict({"inputs": [str(SOAP)], "output": str(out)}))
    (out / "_job.json").write_text('{"state": "runn')
    r = invoke("status", out)
    assert r.exit_code == 1 and "_job.json is not valid JSON" in r.output and "delete it" in r.output
    (out / "_job.json").unlink()
    (out / "frames" / "part-broken.parquet").write_bytes(b"PAR1 not really")
    r = invoke("run", SOAP, "-o", out)
    assert r.exit_code == 1 and "part-broken.parquet is not a readable Parquet file" in r.output
    assert "Traceback" not in r.output
    (out / "frames" / "part-broken.parquet").unlink()
    r = invoke("run", SOAP, "-o", out)
    assert r.exit_code == 0
    record("torn _job.json; a corrupt Parquet file in frames/", "one line each naming the file and the way out "
           "(exit 1); after that, a rerun adds nothing", expected=1, frames=frames(out), errors=0, exit_code=1)
    assert_once(frames(out), 1)


def test_a_bad_ray_address_fails_in_seconds_with_one_line_and_leaves_nothing_running(tmp_path):
    from conftest import _free_port

    out, port = tmp_path / "out", _free_port()  # nothing listens there
    t0 = time.monotonic()
    r = invoke("run", SOAP, "-o", out, "--address", f"127.0.0.1:{port}")
    assert r.exit_code == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in r.output, r.output
    assert "Traceback" not in r.output and time.monotonic() - t0 < 60  # ray.init alone retries for minutes
    job = out / "_job.json"
    assert not job.exists() or json.loads(job.read_text())["state"] != "running"
    r = invoke("status", out)
    assert "running" not in r.output
    record("unreachable Ray address", "one line naming it, in seconds; no job record left `running`", expected=0,
           written=0, duplicates=0, errors=0, exit_code=1)
