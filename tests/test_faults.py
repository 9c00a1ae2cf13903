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

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import GOP, REPO, SOAP, cut_video, index_frame
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


def file_rows(out) -> list[int]:
    """Rows of each frames file."""
    return [pq.ParquetFile(f).metadata.num_rows for f in sorted((Path(out) / "frames").glob("*.parquet"))]


def record_repairs(monkeypatch) -> list[int]:
    """The rows `Output.drop_duplicate_frames` (the backstop at the end of each run in this process) removed,
    one entry per run: a test of exactly once asserts they are all 0, so that it is not the backstop that
    made the output right."""
    seen: list[int] = []
    real = Output.drop_duplicate_frames

    def spy(self):
        stats = real(self)
        seen.append(stats["rows_removed"])
        return stats

    monkeypatch.setattr(Output, "drop_duplicate_frames", spy)
    return seen


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
    write_video((index_frame(i, 96, 128) for i in range(n)), path, 16.0, gop=GOP)
    return path


# -- the lease --------------------------------------------------------------------------------------
def _hold_lease(out: str, timeout_s: float, elsewhere: bool = False) -> subprocess.Popen:
    """A process holding `out`'s lease; `elsewhere`: as if on another machine (its PIDs are not this one's)."""
    code = ("import sys, time; import pipeline.output as o; from pipeline.output import Output; "
            + ("o._process_space = lambda: 'another machine'; " if elsewhere else "")
            + f"Output(sys.argv[1]).lease(owner='victim', timeout_s={timeout_s}).acquire(); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, out], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("holder_on", ["this machine", "another machine"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_holder_killed_with_sigkill_is_taken_over(where, holder_on, tmp_path, request):
    """A holder on another machine is taken over once its heartbeat is older than the timeout; one of this
    machine's processes at once when it no longer exists (a killed local run: `fpn status` said `running` and
    `fpn resume` was refused for two minutes)."""
    if where == "s3":
        fs, endpoint = request.getfixturevalue("s3")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        request.addfinalizer(lambda: os.environ.pop("AWS_ENDPOINT_URL_S3", None))
        out = f"s3://test/leased-{holder_on.split()[0]}"
    else:
        out = str(tmp_path / "leased")
    elsewhere = holder_on == "another machine"
    holder = _hold_lease(out, timeout_s=2, elsewhere=elsewhere)
    with pytest.raises(OutputBusyError, match=r"written by victim on .* \(pid \d+\)"):
        Output(out).lease(owner="second").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    if elsewhere:
        with pytest.raises(OutputBusyError):  # killed, but its heartbeat is still fresh
            Output(out).lease(owner="second").acquire()
        time.sleep(2.5)
    lease = Output(out).lease(owner="second").acquire()
    try:
        assert lease.took_over["owner"] == "victim" and lease.took_over["pid"] == holder.pid
        assert Output(out).lease().holder()["owner"] == "second"
        record(f"lease holder on {holder_on} SIGKILLed ({where} output)",
               "refused while fresh; taken over after the timeout" if elsewhere else "taken over at once", expected=None)
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
    assert codes == [0, 75], (ta, tb)  # 75: busy, try again later (it was 1, as a failed job)
    refused = ta if a.returncode == 75 else tb
    assert "is being written by" in refused and "Traceback" not in refused
    # each started its own Ray, as a user's `fpn run` does: without Ray's notice that it turned token auth on, nor
    # its core worker's error line about the detector's restarts (pipeline.raydata.spend_actor_restart_warning)
    assert "Token authentication" not in ta + tb, (ta, tb)
    assert "has constructor arguments in the object store" not in ta + tb, (ta, tb)
    assert_once(frames(out), 20)
    record("two `fpn run`s into one output at once", "one runs (exit 0), the other is refused naming the holder "
           "(exit 75)",
           expected=20, frames=frames(out), errors=0, exit_code=" / ".join(map(str, codes)))


# -- killed driver, killed actor ------------------------------------------------------------------------
def test_driver_sigkilled_mid_job_reads_as_interrupted_and_resume_writes_every_frame_once(ray_session, tmp_path,
                                                                                         monkeypatch):
    video = long_video(tmp_path)
    out = tmp_path / "out"
    repairs = record_repairs(monkeypatch)
    # files of >= 24 frames: each bundles two segments' blocks of 16, so the kill lands with a bundle half full
    p = fpn_process("run", video, "-o", out, "--segment-frames", 16, "--batch-size", 4, "--min-rows-per-file", 24)
    deadline = time.time() + 400
    while time.time() < deadline and not list((out / "frames").glob("part-*.parquet")):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    written = frames(out).num_rows
    assert 0 < written < 160
    assert_once(frames(out), written)  # what the killed run left, before any repair
    assert sum(n < 24 for n in file_rows(out)) <= 1, file_rows(out)  # files of whole bundles (and a remainder)
    r = invoke("status", out)  # at once: its driver, a process of this machine, is gone
    assert r.exit_code == 4 and "interrupted" in r.output, r.output
    r = invoke("resume", out)
    assert r.exit_code == 0 and f"-> {out}" in r.output.splitlines()[0], r.output  # its header, as fpn run's
    t = frames(out)
    record("driver SIGKILLed mid-job, then `fpn resume`",
           f"status `interrupted` (exit 4) with {written} frames; resume took the lease over and finished",
           expected=160, frames=t, errors=0, exit_code=r.exit_code)
    assert_once(t, 160)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(160))
    assert repairs == [0], repairs  # exactly once without the backstop: it found nothing to remove
    assert len(file_rows(out)) <= 160 // 24 + 2, file_rows(out)  # two runs, each with at most one short file
    job = json.loads((out / "_job.json").read_text())
    assert job["state"] == "succeeded" and job["runs"] == 2 and job["took_over_from"]["pid"] == p.pid
    assert not list((out / "_tmp").glob("*")) if (out / "_tmp").exists() else True


@pytest.mark.parametrize("stop", ["none", "sigterm"])
def test_fpn_run_ends_every_process_it_started_by_the_time_it_returns(tmp_path, stop):
    """Embedded Ray's daemons, its workers and their decoder children end with `fpn run`, whether the job finishes
    or is stopped with SIGTERM (`fpn cancel`, `ray job stop`, kill: then recorded `cancelled`, exit 130)."""
    import psutil

    out = tmp_path / "out"
    p = fpn_process("run", long_video(tmp_path), "-o", out, "--segment-frames", 16, "--batch-size", 2)
    started, stopped = set(), False
    deadline = time.time() + 300
    while p.poll() is None and time.time() < deadline:
        try:
            started.update(psutil.Process(p.pid).children(recursive=True))
        except psutil.NoSuchProcess:  # it has just ended
            break
        if stop == "sigterm" and not stopped and list((out / "frames").glob("part-*.parquet")):
            p.send_signal(signal.SIGTERM)  # mid-job: the detector has written its first frames
            stopped = True
        time.sleep(0.1)
    output = p.communicate(timeout=60)[0]
    assert len(started) >= 5, started  # Ray's daemons and workers were seen
    _, alive = psutil.wait_procs([c for c in started if c.is_running()], timeout=2)
    alive = [c for c in alive if c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.name()) for c in alive]
    doc = json.loads((out / "_job.json").read_text())
    state = doc["state"]
    if stop == "sigterm":
        assert (p.returncode, state) == (130, "cancelled"), output
        assert doc["error"] == "stopped by signal SIGTERM"  # it said "_Stop: signal SIGTERM"
        assert f"continue with: fpn resume {out}" in output
        assert 0 < frames(out).num_rows < 160
    else:
        assert (p.returncode, state) == (0, "succeeded"), output


def test_detector_actor_sigkilled_mid_job_loses_no_frame(ray_session, tmp_path, monkeypatch):
    import psutil

    video = long_video(tmp_path, 120)
    out = tmp_path / "out"
    result = {}
    repairs = record_repairs(monkeypatch)

    def job():
        # files of >= 30 frames: each bundles the output of 3 detector tasks (12 frames each), so the actor dies
        # with blocks of the bundle being filled already delivered and others still to come from its retried task
        result["doc"] = run(plan_from_dict({"inputs": [str(video)], "output": str(out), "segment_frames": 12,
                                            "batch_size": 2, "min_rows_per_file": 30}))

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
    assert repairs == [0], repairs  # Ray delivered each block once: the backstop found nothing
    rows = file_rows(out)
    assert sum(rows) == 120 and sum(n < 30 for n in rows) <= 1, rows  # one short file at most: the remainder


@pytest.fixture
def device_errors():
    """`fakes.LosesDevice`'s budget: `device_errors(n)` makes its next n calls (in any process) raise CUDA's error."""
    import fakes

    def budget(n: int) -> None:
        fakes.DEVICE_ERRORS.mkdir(exist_ok=True)
        for k in range(n):
            (fakes.DEVICE_ERRORS / f"{k:04d}").touch()

    yield budget
    for f in fakes.DEVICE_ERRORS.glob("*"):
        f.unlink()


def test_a_device_error_restarts_the_detector_and_its_batches_run_again(ray_session, tmp_path, device_errors,
                                                                         monkeypatch):
    """After CUDA's illegal-memory-access error a process cannot use its GPU again; its frames would all become
    error rows. The detector's process exits instead; Ray starts it anew and runs its batches again."""
    import fakes

    video = long_video(tmp_path, 24)
    out = tmp_path / "out"
    repairs = record_repairs(monkeypatch)
    device_errors(1)
    doc = run(plan_from_dict({"inputs": [str(video)], "output": str(out), "model": fakes.backend(fakes.LosesDevice),
                              "batch_size": 4, "segment_frames": 12}))
    assert not list(fakes.DEVICE_ERRORS.glob("*"))  # the error was raised
    assert (doc["state"], doc["errors"], doc["device_errors"]) == ("succeeded", 0, 1), doc
    assert_once(frames(out), 24)
    assert repairs == [0] and errors(out) is None
    record("detector's GPU fails (CUDA illegal memory access) mid-job", "its process exits, Ray restarts it and "
           "runs its batches again; succeeded", expected=24, frames=frames(out), errors=0, exit_code=0)


def test_a_device_that_keeps_failing_restarts_detectors_a_bounded_number_of_times(ray_session, tmp_path,
                                                                                  device_errors):
    """A frame that broke the device every time would restart detectors forever: after 3 restarts per detector,
    frames that fail are error rows, the job ends, and a resume tries them again."""
    import fakes

    video = long_video(tmp_path, 8)
    out = tmp_path / "out"
    device_errors(1000)
    r = invoke("run", video, "-o", out, "-m", fakes.backend(fakes.LosesDevice), "--batch-size", 4)
    doc = json.loads((out / "_job.json").read_text())
    assert r.exit_code == 1 and doc["state"] == "failed" and doc["errors"] == 8, r.output
    assert doc["device_errors"] > 3 and "device errors:" in r.output  # 3 restarts, then the frames' own errors
    assert {e["error_type"] for e in errors(out).to_pylist()} == {"AcceleratorError"}
    for f in fakes.DEVICE_ERRORS.glob("*"):  # the device works again
        f.unlink()
    r = invoke("resume", out)
    assert r.exit_code == 0, r.output
    assert_once(frames(out), 8)
    record("detector's GPU fails on every call", "3 detector restarts, then 8 error rows (exit 1); a resume wrote "
           "all 8", expected=8, frames=frames(out), errors=0, exit_code=0)


# -- fewer, larger files: bundles of frames, still exactly once ------------------------------------------
def _rows(ids) -> pa.Table:
    from pipeline.output import FRAME_SCHEMA

    return pa.Table.from_pylist([{"frame_id": i, "source": "s", "source_kind": "image", "frame_index": k,
                                  "num_detections": 0, "detections": []} for k, i in enumerate(ids)],
                                schema=FRAME_SCHEMA)


def test_a_retried_write_task_writes_the_same_bundle_under_the_same_name(ray_session, tmp_path):
    """The first write task dies (its worker process exits) after seeing its bundle; Ray runs it again, and the
    retry gets the same blocks, so its file has the name the first attempt would have written."""
    import ray.data

    from pipeline.output import frames_file
    from pipeline.sink import FrameSink

    out, marker = Output(str(tmp_path / "out")), tmp_path / "attempts.jsonl"

    class DiesOnce(FrameSink):  # a local class: pickled by value (Ray workers do not import tests/)
        def write(self, blocks, ctx):
            blocks = list(blocks)
            ids = sorted(i for b in blocks for i in b.column("frame_id").to_pylist())
            first = not marker.exists()
            with open(marker, "a") as f:
                f.write(json.dumps(ids) + "\n")
            if first:
                os._exit(1)  # as a killed worker: no exception, no cleanup
            return super().write(blocks, ctx)

    blocks = [_rows([f"id{b:02d}{k}" for k in range(3)]) for b in range(10)]  # 10 blocks of 3 frames
    ray.data.from_arrow(blocks).write_datasink(DiesOnce(out, min_rows=7), ray_remote_args={"num_cpus": 0.1})
    attempts = [json.loads(line) for line in marker.read_text().splitlines()]
    killed = attempts[0]
    assert len(killed) >= 7 and attempts.count(killed) == 2, attempts  # the retry saw the very same frames
    names = {Path(f).name for f in out.frame_files()}
    assert Path(frames_file(killed)).name in names
    t = frames(tmp_path / "out")
    assert_once(t, 30)
    rows = file_rows(tmp_path / "out")
    assert len(rows) < 10 and sum(n < 7 for n in rows) <= 1, rows  # bundles of >= 7 frames, a remainder
    record("write task's worker killed (files of >= 7 frames)", "Ray retried it with the same bundle: the same "
           "file name", expected=30, frames=t, errors=0, exit_code=None)


def test_a_write_after_a_lease_takeover_commits_nothing(tmp_path):
    """A writer whose lease was taken over (its heartbeat went stale: a stalled or partitioned driver) cannot
    commit a file: `fpn resume` plans those frames again, and would write them under another name."""
    out = Output(str(tmp_path / "out"))
    first = out.lease(owner="first", timeout_s=1).acquire()
    token = out.lease_token()
    assert token == first.record["token"]
    out.write_frames(_rows(["a", "b"]), fence=token)  # while the lease holds: committed
    first._stop.set()  # its heartbeat stops, as in a driver that hangs
    first._thread.join()
    time.sleep(1.2)
    second = out.lease(owner="second", timeout_s=1).acquire()
    try:
        assert not first._lost and first.lost  # asked, it reads the record: another writer holds the output
        with pytest.raises(OutputBusyError, match="taken over by another writer"):
            out.write_frames(_rows(["c", "d"]), fence=token)
        out.write_frames(_rows(["c", "d"]), fence=second.record["token"])
    finally:
        second.release()
    assert_once(frames(tmp_path / "out"), 4)
    assert not list((tmp_path / "out" / "_tmp").iterdir())  # the fenced-off file's temporary copy is gone


def test_duplicate_frames_are_removed_keeping_each_frame_once(tmp_path):
    """The backstop run at the end of each job: whatever wrote a frame into two files, one keeps it."""
    from pipeline.output import frames_file

    out = Output(str(tmp_path / "out"))
    ids = [f"f{k:02d}" for k in range(14)]
    out.write_frames(_rows(ids[:10]))  # kept whole (largest)
    out.write_frames(_rows(ids[5:8]))  # all in the first: removed
    out.write_frames(_rows(ids[8:13]))  # 8, 9 in the first: rewritten with 10..12
    out.write_table(_rows([ids[13], ids[13]]), "frames/part-twice.parquet")  # one frame twice in one file
    stats = out.drop_duplicate_frames()
    assert stats == {"files_removed": 1, "files_rewritten": 2, "rows_removed": 6}, stats
    t = frames(tmp_path / "out")
    assert_once(t, 14)
    names = sorted(Path(f).name for f in out.frame_files())
    assert names == sorted(Path(frames_file(x)).name for x in (ids[:10], ids[10:13], ids[13:]))
    assert out.drop_duplicate_frames() == {"files_removed": 0, "files_rewritten": 0, "rows_removed": 0}
    assert out.counts()["frames"] == 14  # what it read of the files it rewrote or removed is not counted


def test_an_unreadable_source_record_is_one_line_naming_it_and_what_deleting_it_costs(tmp_path):
    out = Output(str(tmp_path / "out"))
    out.write_sources({"/a.mp4": {"size": 1, "version": "1", "first_run": 1}})
    assert out.read_sources()["/a.mp4"]["size"] == 1
    (tmp_path / "out" / "_sources.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError) as e:
        out.read_sources()
    said = str(e.value)
    assert "\n" not in said and said.startswith(f"{tmp_path / 'out' / '_sources.parquet'} is not a readable Parquet")
    assert "delete it and the next run probes every source again" in said and "write to a new output" in said


def test_a_run_reads_each_frames_file_once(tmp_path, monkeypatch):
    """The frame ids written at a run's start; the duplicate check and the counts at its end read only the files
    written since (each read every file again: on S3 an open's round trips per file, for every file of an
    archive's output); a run of the same output (`as_run`) shares what was read."""
    import fsspec.implementations.local as local

    ids = [f"f{k:02d}" for k in range(12)]
    for a in range(0, 9, 3):
        Output(str(tmp_path / "out")).write_frames(_rows(ids[a:a + 3]))
    opened: list[str] = []
    real = local.LocalFileSystem.open

    def spy(self, path, mode="rb", *a, **k):
        if mode == "rb" and "/frames/" in str(path):
            opened.append(Path(path).name)
        return real(self, path, mode, *a, **k)

    monkeypatch.setattr(local.LocalFileSystem, "open", spy)
    probe = Output(str(tmp_path / "out"))
    assert len(probe.done_ids()) == 9 and len(opened) == 3
    out = probe.as_run(2)
    assert len(out.done_ids()) == 9 and len(opened) == 3
    Output(str(tmp_path / "out"), run=2).write_frames(_rows(ids[9:]))  # a detector's write task
    assert out.drop_duplicate_frames()["rows_removed"] == 0 and len(opened) == 4
    assert out.counts()["frames"] == 12 and len(opened) == 4


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


def test_a_rerun_with_settings_that_change_frame_ids_is_refused_naming_them(ray_session, tmp_path, monkeypatch):
    """Before Ray starts: it was refused once Ray had started and the job planned, under a full progress bar of
    the earlier run's frames ("frames: 18/18"), as if it had run."""
    import jobs.runner

    out = tmp_path / "out"
    run(plan_from_dict({"inputs": [str(SOAP)], "output": str(out), "tile": {"size": 512, "overlap": 64}}))
    monkeypatch.setattr(jobs.runner, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    r = invoke("run", SOAP, "-o", out, "--tile", 256, "--score-thresh", 0.2)
    assert r.exit_code == 1 and "tile.size 512 -> 256" in r.output and "score_thresh" in r.output, r.output
    assert "Traceback" not in r.output and "frames: 1/1" not in r.output  # the earlier run's bar
    assert json.loads((out / "_job.json").read_text())["state"] == "succeeded"  # untouched
    record("rerun with other tile size and score threshold", "refused before any work, naming each difference",
           expected=1, frames=frames(out), errors=0, exit_code=r.exit_code)


def test_an_output_without_frames_takes_the_settings_of_the_next_run(ray_session, tmp_path):
    """A run that wrote no frame (here only an error row: its one input was an empty file) leaves nothing whose ids
    other settings would change: the next run, with other settings and inputs, writes there (it used to be refused
    for ever, naming the first run's settings), and its completion removes the first run's error row."""
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    out = tmp_path / "out"
    doc = run(plan_from_dict({"inputs": [str(bad)], "output": str(out), "tile": {"size": 512, "overlap": 64}}))
    assert doc["state"] == "failed" and errors(out).num_rows == 1 and frames(out).num_rows == 0
    r = invoke("run", SOAP, "-o", out, "--tile", 256)
    assert r.exit_code == 0, r.output
    job = json.loads((out / "_job.json").read_text())
    assert job["state"] == "succeeded" and job["spec"]["tile"]["size"] == 256 and job["runs"] == 2
    assert_once(frames(out), 1)
    assert errors(out) is None  # the first run's error row, removed as this one completed
    record("rerun with other settings into an output holding no frame", "runs with the new settings",
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


def test_a_changed_source_is_processed_again_with_replace_changed(ray_session, make_video, tmp_path):
    """--replace-changed: a source re-uploaded longer (a partial upload completed, a re-encode) loses its old
    frames and is processed again, once each; another source's frames in the same files stay; the earlier
    SourceChanged row goes. Without it the new frames were out of reach of that output for good."""
    src, other = tmp_path / "clip.mp4", tmp_path / "other.mp4"
    src.write_bytes(make_video("chg12.mp4", 12, 6.0).read_bytes())
    other.write_bytes(make_video("other8.mp4", 8, 6.0).read_bytes())
    out = tmp_path / "out"
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    spec = {"inputs": [str(src), str(other)], "output": str(out), "model": null, "segment_frames": 4,
            "min_rows_per_file": 20}
    run(plan_from_dict(spec))
    assert len(file_rows(out)) == 1  # both sources' frames in one file
    src.write_bytes(make_video("chg20.mp4", 20, 6.0).read_bytes())
    assert run(plan_from_dict(spec))["state"] == "finished_with_errors"  # SourceChanged, as before
    r = invoke("run", *spec["inputs"], "-o", out, "-m", null, "--segment-frames", 4, "--replace-changed")
    assert r.exit_code == 0, r.output
    t = frames(out)
    assert_once(t, 28)
    by_source = {s: sorted(i for s2, i in zip(t.column("source").to_pylist(), t.column("frame_index").to_pylist())
                           if s2 == s) for s in (str(src), str(other))}
    assert by_source == {str(src): list(range(20)), str(other): list(range(8))}
    assert errors(out) is None
    doc = json.loads((out / "_job.json").read_text())
    assert doc["state"] == "succeeded" and doc["spec"]["changed_sources"] == "replace"
    record("source video replaced (12 -> 20 frames) before a rerun with --replace-changed",
           "old frames removed, the new version processed; the other source's frames kept", expected=28,
           frames=t, errors=0, exit_code=0)


def test_a_changed_source_left_stays_left_and_a_rerun_with_nothing_else_new_starts_no_ray(ray_session, tmp_path,
                                                                                          monkeypatch):
    """A changed source left as its SourceChanged row was not recorded so: every later run found it changed again,
    started Ray (4-7 s a day over an archive with nothing else new) and wrote its row again. Recorded as left at
    the version seen, a rerun ends without Ray, its row (of the run that saw the change) kept and still this run's
    error; the summary and fpn status name it and how to process it. Changed again, it is reported again; back at
    the version its frames are of, processed as before; --replace-changed processes it."""
    import jobs.runner
    from PIL import Image

    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)).save(archive / f"s{i}.png")
    src, out = archive / "s1.png", tmp_path / "out"
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    spec = {"inputs": [str(archive)], "output": str(out), "model": null}
    t1 = src.stat().st_mtime

    def touch(t: float) -> None:  # a local file's version is its mtime
        os.utime(src, (t, t))

    def error_files() -> list[str]:
        return sorted(p.name for p in (out / "errors").iterdir())

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    assert run(plan_from_dict(spec))["state"] == "succeeded"
    touch(t1 + 60)
    seen = run(plan_from_dict(spec))
    assert seen["state"] == "finished_with_errors" and list(seen["changed_left"]) == [str(src)]
    rows = error_files()
    assert len(rows) == 1 and rows[0].startswith("err-r0002-")

    real_init = jobs.runner.init_ray
    monkeypatch.setattr(jobs.runner, "init_ray", no_ray)
    r = invoke("run", archive, "-o", out, "-m", null)
    assert r.exit_code == 3, r.output
    assert f"changed, left: {src} changed since run 1" in r.output and "--replace-changed" in r.output
    again = json.loads((out / "_job.json").read_text())
    assert again["nothing_new"] and again["runs"] == 3 and again["changed_left"] == seen["changed_left"]
    # the last run that wrote frames is the first: run 2 only found the change (its own record says so too)
    assert seen["last_work"]["runs"] == again["last_work"]["runs"] == 1
    assert again["state"] == "finished_with_errors" and (again["errors"], again["errors_of_other_inputs"]) == (1, 0)
    assert error_files() == rows  # its row stays, once: neither written again nor dropped as stale
    status = invoke("status", out)
    assert status.exit_code == 3 and f"changed, left: {src} changed since run 1" in status.output, status.output
    record("source image touched, then a rerun with nothing else new", "its SourceChanged row kept, once; Ray not "
           "started", expected=3, frames=frames(out), errors=again["errors"], exit_code=r.exit_code)

    monkeypatch.setattr(jobs.runner, "init_ray", real_init)
    touch(t1 + 120)  # changed again: reported again, the earlier row gone
    doc = run(plan_from_dict(spec))
    assert doc["state"] == "finished_with_errors" and doc["changed_left"] != seen["changed_left"]
    # one row, this run's (in the earlier row's file: a failure met again takes its earlier row's place)
    assert errors(out).column("message").to_pylist() == [doc["changed_left"][str(src)]]
    touch(t1)  # back at the version its frames are of: nothing to do, and no error
    back = run(plan_from_dict(spec))
    assert back["state"] == "succeeded" and back["changed_left"] == {} and errors(out) is None
    touch(t1 + 60)  # the version left at run 2 once more: a change since, reported again
    assert run(plan_from_dict(spec))["changed_left"] == seen["changed_left"] and len(errors(out)) == 1

    r = invoke("run", archive, "-o", out, "-m", null, "--replace-changed")
    assert r.exit_code == 0 and errors(out) is None, r.output
    assert_once(frames(out), 3)
    monkeypatch.setattr(jobs.runner, "init_ray", no_ray)
    assert run(plan_from_dict(spec))["state"] == "succeeded"  # processed: known as it is now


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


def test_a_detector_that_cannot_start_fails_the_job_with_its_cause_in_one_line(ray_session, tmp_path, capfd):
    """Ray Data reports a detector that died in its __init__ as an ActorDiedError holding the actor's whole traceback
    (it printed as 80 lines, and _job.json said only that an actor died): the job's error is the cause, and the
    terminal shows no traceback (Ray Data's internal-error report and Ray's error for each retried call to the dead
    actor printed ~90-100 lines of them)."""
    import fakes

    out = tmp_path / "out"
    r = invoke("run", SOAP, "-o", out, "-m", fakes.backend(fakes.FailsToStart))
    said = ("the detector could not start: RuntimeError: needs the nms_rotated kernel, which this build of "
            "torchvision lacks")
    assert r.exit_code == 1 and f"Error: {said}" in r.output.splitlines(), r.output[-2000:]
    time.sleep(1)  # Ray's error listener prints from its own thread, sometimes after the command has returned
    printed = r.output + "".join(capfd.readouterr())
    assert "Traceback" not in printed and "nms_rotated" not in printed.replace(f"Error: {said}", ""), printed[-3000:]
    doc = json.loads((out / "_job.json").read_text())
    assert (doc["state"], doc["error"]) == ("failed", said)
    record("the model cannot be built in the detector (its __init__ raises)", "failed in one line naming the cause "
           "(exit 1)", expected=0, written=0, duplicates=0, errors=0, exit_code=r.exit_code)


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
    assert "the next run detects its frames again" in r.output
    (out / "frames" / "part-broken.parquet").unlink()
    r = invoke("run", SOAP, "-o", out)
    assert r.exit_code == 0
    # an error file's way out says what comes back of it ("detects its frames again" was of frames files)
    (out / "errors").mkdir(exist_ok=True)
    (out / "errors" / "err-r0001-broken.parquet").write_bytes(b"PAR1 not really")
    r = invoke("run", SOAP, "-o", out)
    assert r.exit_code == 1 and "err-r0001-broken.parquet is not a readable Parquet file" in r.output, r.output
    assert "a complete run writes the rows of the failures that happen again" in r.output
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


# -- error rows across runs ---------------------------------------------------------------------------------
def _failing_inputs(folder: Path) -> None:
    """One input failing at each stage, and one that does not: an empty image (probe), a JPEG cut after its header
    (decode), a GeoTIFF cut short (decode, window by window), a video cut short (decode, at a frame), an image the
    model `fakes.OverscoresBrightFrames` gets wrong (detect)."""
    import io

    import numpy as np
    import rasterio
    from PIL import Image

    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.full((24, 32, 3), 255, np.uint8)).save(folder / "bright.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 3])
    tif = folder / "cut.tif"
    with rasterio.open(tif, "w", driver="GTiff", width=400, height=400, count=3, dtype="uint8") as ds:
        ds.write(np.random.default_rng(0).integers(0, 100, (3, 400, 400), np.uint8))
    tif.write_bytes(tif.read_bytes()[:150_000])
    cut_video(folder / "cut.mp4")


def _failures(t) -> list[tuple]:
    return sorted((r["source"], r["stage"], r["frame_index"] if r["frame_index"] is not None else -1, r["error_type"])
                  for r in t.to_pylist())


def test_a_rerun_stopped_before_its_end_leaves_one_error_row_per_failure(ray_session, tmp_path, monkeypatch):
    """A rerun (or `fpn resume`) does again every unit of work that has a frame to write, the failed ones among them,
    and wrote their error rows again: until it went through all its work (it removed the earlier runs' rows then),
    `errors` held each failure twice, and for good when it was stopped before (Ctrl-C, a kill, a lost node). Here it
    is stopped just before its end, when everything it does is done: each failure has one row, at each stage."""
    import fakes
    import pipeline.plan

    _failing_inputs(tmp_path / "in")
    out = tmp_path / "out"
    spec = {"inputs": [str(tmp_path / "in")], "output": str(out), "model": fakes.backend(fakes.OverscoresBrightFrames),
            "raster_window": 200, "raster_margin": 16, "windows_per_unit": 1, "tile": None}
    first = run(plan_from_dict(spec))
    failed = _failures(errors(out))
    assert first["state"] == "finished_with_errors" and first["errors"] == len(failed), first
    assert {stage for _, stage, _, _ in failed} == {"probe", "decode", "detect"}, failed

    seen = []

    def stopped_at_the_end(o):  # everything written, nothing completed: as a run that is stopped there
        seen.append(_failures(errors(out)))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.plan, "drop_duplicates", stopped_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        run(plan_from_dict(spec))
    assert json.loads((out / "_job.json").read_text())["state"] == "cancelled"
    assert seen == [failed]  # while it ran
    assert _failures(errors(out)) == failed  # and once it had stopped
    monkeypatch.undo()
    third = run(plan_from_dict(spec))
    assert _failures(errors(out)) == failed
    assert (third["state"], third["errors"], third["errors_of_other_inputs"]) == ("finished_with_errors",
                                                                                 len(failed), 0), third
    assert not list((out / "_recurring").glob("*"))  # its rows of the failures met again replaced the earlier ones
    windows = [f[2] for f in failed if f[0].endswith("cut.tif")]  # each unit's row at its first window, as frames
    assert len(windows) > 1 and len(set(windows)) == len(windows) and min(windows) >= 0, failed
    record("rerun of a job with failures at each stage, stopped before its end", "each failure one error row, "
           "while it ran and after", expected=first["frames"], frames=frames(out), errors=len(failed), exit_code=None)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failure_met_again_keeps_one_row_which_its_run_replaces_as_it_completes(where, tmp_path, request):
    """How `Output` keeps one row per failure across runs: a run writes to `errors/` only failures no earlier row
    records; the rows of those it meets again (the same source and stage, an earlier row's frame within the unit that
    failed) replace the earlier rows, in their files, when it completes; earlier rows of the sources it read that it
    did not meet again go, those of sources it did not read stay, and rows an older version wrote twice become one."""
    from pipeline.output import ERROR_SCHEMA, error_row

    if where == "s3":
        fs, endpoint = request.getfixturevalue("s3")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
        request.addfinalizer(lambda: os.environ.pop("AWS_ENDPOINT_URL_S3", None))
        url = "s3://test/errors-again"
    else:
        url = str(tmp_path / "out")

    def rows(o):
        t = pa.concat_tables([pq.read_table(f, filesystem=o.fs) for f in o.error_files()])
        return sorted((r["source"], r["stage"], r["frame_index"], r["message"]) for r in t.to_pylist())

    first = Output(url, run=1)
    first.write_errors([error_row("a.png", "probe", "empty file"), error_row("v.mp4", "decode", "frame 5", 5),
                        error_row("w.jpg", "decode", "truncated")], "block 1")
    first.write_errors([error_row("other.png", "probe", "empty file")], "block 2")
    twice = pa.Table.from_pylist([error_row("v.mp4", "decode", "frame 5", 5)], schema=ERROR_SCHEMA)
    first.write_table(twice, "errors/part-0.parquet")  # a file of a version before run numbers, a row again
    second = Output(url, run=2)
    read = {"a.png", "v.mp4", "w.jpg", "c.png"}
    second.recall_errors(read)
    second.write_errors([error_row("a.png", "probe", "still empty"), error_row("v.mp4", "decode", "frame 7", 7),
                         error_row("c.png", "probe", "not an image")], "block 3", scopes=[None, range(0, 10), None])
    assert rows(second) == [("a.png", "probe", None, "empty file"), ("c.png", "probe", None, "not an image"),
                            ("other.png", "probe", None, "empty file"), ("v.mp4", "decode", 5, "frame 5"),
                            ("v.mp4", "decode", 5, "frame 5"), ("w.jpg", "decode", None, "truncated")]
    assert second.settle_errors(read) == 1  # other.png's row, of a source this run did not read
    assert rows(second) == [("a.png", "probe", None, "still empty"), ("c.png", "probe", None, "not an image"),
                            ("other.png", "probe", None, "empty file"), ("v.mp4", "decode", 7, "frame 7")]
    assert not [f for f in second.error_files() if f.endswith("part-0.parquet")]  # all its rows went
    assert second.fs.glob(f"{second.path}/_recurring/*") == []


def _run_planned(out) -> dict:
    """The output's run number, and whether that run has planned its work (`_job.json` says how many frames)."""
    doc = json.loads((out / "_job.json").read_text())
    return {"runs": doc.get("runs"), "planned": "planned_frames" in doc}


def test_a_resume_killed_mid_job_leaves_each_failure_its_one_row(ray_session, make_video, tmp_path):
    """`fpn resume` SIGKILLed while it decodes, after it probed the sources again (an empty image fails its probe
    again) and maybe after it decoded the damaged JPEG again: each failure has its row, once; the next resume ends
    with the same rows."""
    import fakes

    _failing_inputs(tmp_path / "in")
    for name in ("cut.tif", "cut.mp4", "bright.png"):  # a probe error and a decode error are enough here
        (tmp_path / "in" / name).unlink()
    out = tmp_path / "out"
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    spec = {"inputs": [str(tmp_path / "in")], "output": str(out), "model": null, "decode_timeout_s": 60,
            "video_backend": fakes.backend(fakes.HangingVideo)}
    assert run(plan_from_dict(spec))["state"] == "finished_with_errors"
    failed = _failures(errors(out))
    assert [stage for _, stage, _, _ in failed] == ["decode", "probe"], failed
    hang = tmp_path / "in" / "hang.mp4"  # new since: its decode hangs at frame 8, two minutes before a row
    hang.write_bytes(make_video("hang16.mp4", 16, 8.0).read_bytes())
    p = fpn_process("resume", out)
    deadline = time.time() + 300
    while not {"runs": 2, "planned": True}.items() <= _run_planned(out).items():  # probed, planned: decoding
        assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "waited"
        time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert _failures(errors(out)) == failed
    hang.unlink()
    r = invoke("resume", out)
    assert r.exit_code == 3 and _failures(errors(out)) == failed, r.output
    record("`fpn resume` of a job with failures SIGKILLed mid-job, then resumed", "each failure one error row, "
           "after the kill and after the resume", expected=1, frames=frames(out), errors=len(failed), exit_code=3)
