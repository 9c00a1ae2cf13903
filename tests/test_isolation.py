"""Failure isolation: a decoder that hangs or crashes costs one error row, not the job; a frame that breaks the
detector costs one error row, not its batch."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import fakes
from conftest import REPO, SOAP
from fpn_model.data import read_image
from fpn_model.zoo import resolve
from pipeline.isolate import ChildCrashed, ChildError, ChildTimeout, IsolatedChild
from pipeline.output import frame_id


NULL_MODEL = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"  # planning is what these tests look at


def read_table(path: Path):
    return pads.dataset(str(path), format="parquet").to_table()


# -- the child process on its own ---------------------------------------------------------------------------------

@pytest.fixture
def child():
    c = IsolatedChild(preload=("fakes",))
    yield c
    c.close()


def collect(stream, into: list):
    for item in stream:
        into.append(item)


def test_isolated_child_streams_items_and_is_reused(child):
    assert list(child.stream(fakes.count, 3, timeout_s=30)) == [0, 1, 2]
    first = child.pid
    assert list(child.stream(fakes.pid, timeout_s=30)) == [first] and first != os.getpid()


def test_hung_child_times_out_after_its_items_and_is_replaced(child):
    got: list = []
    with pytest.raises(ChildTimeout) as e:
        collect(child.stream(fakes.count_then_hang, 2, timeout_s=2), got)
    assert got == [0, 1] and e.value.timeout_s == 2 and "2 s" in str(e.value)
    assert child.pid is None  # killed; the next call starts a fresh child
    assert list(child.stream(fakes.count, 2, timeout_s=30)) == [0, 1]


def test_crashed_child_names_its_signal_and_is_replaced(child):
    got: list = []
    with pytest.raises(ChildCrashed) as e:
        collect(child.stream(fakes.count_then_crash, 2, timeout_s=30), got)
    assert got == [0, 1] and e.value.signal_name == "SIGSEGV" and "SIGSEGV" in str(e.value)
    assert list(child.stream(fakes.count, 2, timeout_s=30)) == [0, 1]


def test_exception_in_child_arrives_with_its_type_and_message_and_keeps_the_child(child):
    [before] = child.stream(fakes.pid, timeout_s=30)
    got: list = []
    with pytest.raises(ChildError) as e:
        collect(child.stream(fakes.count_then_raise, 1, timeout_s=30), got)
    assert got == [0] and e.value.error_type == "KeyError" and "no such frame" in e.value.message
    assert "count_then_raise" in e.value.child_traceback
    assert list(child.stream(fakes.pid, timeout_s=30)) == [before]


def test_a_frame_that_cannot_be_decoded_ends_its_unit_there_and_is_named_across_the_child(child, make_video):
    """decord on a truncated MP4: a failed batch left its reader failing, so the frames after the batch's first
    were lost (16 of 28 kept); the frame's index did not cross the child process (the error row said the unit's
    first frame)."""
    from pipeline.decode import Sampling, decode_unit
    from pipeline.plan import plan_units

    video = str(make_video("cut40.mp4", 40, 10.0))
    unit = next(iter(plan_units(video, video, segment_frames=64, raster_pixels=10**8, windows_per_unit=4)))
    got: list = []
    with pytest.raises(ChildError) as e:
        for b in child.stream(decode_unit, unit, sampling=Sampling(), batch_size=8,
                              video_backend="fakes:BreaksAfterABadBatch", timeout_s=60):
            got += b["frame_index"]
    assert got == list(range(28)), got
    assert (e.value.error_type, e.value.frame_index) == ("UndecodableFrame", 28)
    assert e.value.message.startswith(f"{video}: frame 28 cannot be decoded (damaged or truncated file?): "
                                      "RuntimeError: Check failed: avcodec_send_packet")


def test_child_that_died_between_calls_is_replaced(child):
    [first] = child.stream(fakes.pid, timeout_s=30)
    os.kill(first, signal.SIGKILL)
    while _alive(first):
        time.sleep(0.05)
    [second] = child.stream(fakes.pid, timeout_s=30)
    assert second != first


def _alive(pid: int) -> bool:
    """Whether any thread of process `pid` still runs (a zombie whose threads have all ended is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        return not zombie or len(os.listdir(f"/proc/{pid}/task")) > 1
    except FileNotFoundError:
        return False


def test_child_does_not_outlive_a_killed_parent():
    # a parent that starts a child which hangs, then is SIGKILLed (as Ray kills a worker): no cleanup runs in it
    script = (
        "import sys; sys.path[:0] = sys.argv[1:]\n"
        "import fakes\n"
        "from pipeline.isolate import IsolatedChild\n"
        "c = IsolatedChild(preload=('fakes',))\n"
        "s = c.stream(fakes.count_then_hang, 1, timeout_s=3600)\n"
        "next(s)\n"
        "print(c.pid, flush=True)\n"
        "next(s)\n"
    )
    tests, repo = Path(__file__).parent, Path(__file__).parents[1]
    parent = subprocess.Popen([sys.executable, "-c", script, str(tests), str(repo)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child_pid)


def test_child_does_not_run_the_parents_main_module_again(tmp_path):
    """spawn would import the parent's main module in the child: in a Ray worker that is Ray's default_worker.py,
    all of Ray imported again by every decoding child. Here the main module records each process that runs it."""
    runs = tmp_path / "runs"
    script = tmp_path / "main.py"
    script.write_text(
        "import os, sys\n"
        f"open({str(runs)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "if __name__ == '__main__':\n"
        f"    sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(REPO)!r}]\n"
        "    import fakes\n"
        "    from pipeline.isolate import IsolatedChild\n"
        "    c = IsolatedChild(preload=('fakes',))\n"
        "    print(list(c.stream(fakes.count, 3, timeout_s=60)), c.pid, os.getpid())\n"
        "    c.close()\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    items, child_pid, parent_pid = run.stdout.rsplit(" ", 2)
    assert items == "[0, 1, 2]" and child_pid != parent_pid.strip()
    assert runs.read_text().split() == [parent_pid.strip()]  # the parent ran it; the child did not


# -- the video backend plugin point ---------------------------------------------------------------------------------

def test_video_backend_plugin_by_module_or_file_and_a_clear_error_otherwise(make_video):
    from pipeline.decode import PyAVVideo, open_video

    path = str(make_video("good12.mp4", 12, 6.0))
    by_module = open_video(path, "pipeline.decode:PyAVVideo")
    by_file = open_video(path, fakes.backend(fakes.HangingVideo))
    assert isinstance(by_module, PyAVVideo) and type(by_file).__name__ == "HangingVideo"
    assert by_file.num_frames == 12 and by_file.frames([0, 1]).shape == (2, 64, 96, 3)
    for bad in ("no_such_module:Video", "pipeline.decode:NoSuchVideo", f"{fakes.FAKES.parent}/missing.py:Video"):
        with pytest.raises(ValueError, match="cannot be loaded") as e:
            open_video(path, bad)
        assert bad in str(e.value)


# -- decoding in a job: a hung or crashed decoder -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fake, name, error_type, says, timeout_s", [
    (fakes.HangingVideo, "hang12.mp4", "DecodeTimeout", "hung (no frames within 5 s)", 5.0),
    # a timeout the crash comes well within: the fresh decoder's start counts (over 5 s on a loaded 2-core host)
    (fakes.CrashingVideo, "crash12.mp4", "DecoderCrashed", "crashed (SIGSEGV)", 30.0),
])
def test_hung_or_crashed_decoder_costs_one_error_row_and_the_job_finishes(ray_session, make_video, tmp_path, fake,
                                                                          name, error_type, says, timeout_s):
    from jobs.runner import run
    from jobs.spec import plan_from_dict

    good, bad = make_video("good12.mp4", 12, 6.0), make_video(name, 12, 6.0)
    out = tmp_path / "out"
    # segments [0, 6) and [6, 12); batches of 2: the bad segment yields frames 6 and 7, then hangs (or
    # crashes) on frame 8, is retried in a fresh decoder from frame 8 on, and fails the same way again
    doc = run(plan_from_dict({
        "inputs": [str(good), str(bad)], "output": str(out), "video_backend": fakes.backend(fake),
        "decode_timeout_s": timeout_s, "segment_frames": 6, "batch_size": 2}))
    frames, errors = read_table(out / "frames"), read_table(out / "errors")
    ids = frames.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids))  # nothing twice: the retry skipped frames 6 and 7
    by_source: dict = {}
    for fid, src, i in zip(ids, frames.column("source").to_pylist(), frames.column("frame_index").to_pylist()):
        assert fid == frame_id(src, i)
        by_source.setdefault(Path(src.removeprefix("file://")).name, []).append(i)
    assert sorted(by_source["good12.mp4"]) == list(range(12))
    assert sorted(by_source[name]) == list(range(8))
    assert errors.num_rows == 1
    row = errors.to_pylist()[0]
    assert (row["stage"], row["error_type"], row["frame_index"]) == ("decode", error_type, 6)
    assert name in row["source"] and name in row["message"] and "[6, 12)" in row["message"] and says in row["message"]
    assert doc["frames"] == 20 and doc["errors"] == 1 and doc["state"] != "failed"
    from faulttable import record

    record(f"decoder {'hangs' if 'hang' in name else 'segfaults'} on frame 8 of one of 2 videos",
           f"retried once in a fresh process, then one {error_type} error row; the job finished",
           expected=20, frames=frames, errors=errors.num_rows, exit_code=3)


@pytest.mark.slow
def test_a_file_that_crashes_the_probe_is_one_error_row_and_the_others_are_planned(ray_session, make_video, tmp_path):
    """Planning runs a few sources per Ray task: a decoder library that kills its worker on one file fails the
    task, and its sources are probed again one per task, so only that file becomes an error row."""
    from jobs.runner import run
    from jobs.spec import plan_from_dict

    goods = [make_video(f"good{k}.mp4", 4, 6.0) for k in range(11)]  # 12 sources, 8 tasks on 2 CPUs: some share
    bad = make_video("crashopen.mp4", 4, 6.0)
    out = tmp_path / "out"
    doc = run(plan_from_dict({"inputs": [str(p) for p in (*goods, bad)], "output": str(out),
                              "video_backend": fakes.backend(fakes.CrashingOpen), "model": NULL_MODEL}))
    frames, errors = read_table(out / "frames"), read_table(out / "errors").to_pylist()
    assert sorted(Path(s).name for s in set(frames.column("source").to_pylist())) == sorted(p.name for p in goods)
    assert frames.num_rows == 44 and doc["planned_frames"] == 44
    assert [(e["stage"], e["error_type"], Path(e["source"]).name) for e in errors] == [
        ("probe", "ProbeCrashed", "crashopen.mp4")]
    assert "probe crashed" in errors[0]["message"]


# -- detection: a frame that breaks the detector ------------------------------------------------------------------

class FlakyPredictor:
    """The real predictor, except: out of memory for more than 2 frames at once, and an error on one frame."""

    def __init__(self, predictor, bad: np.ndarray):
        self.inner, self.bad, self.has_masks = predictor, bad, predictor.has_masks

    def __call__(self, images):
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(np.array_equal(im, self.bad) for im in images):
            raise ValueError("cannot read this frame")
        return self.inner(images)


def crops_batch(n: int = 5, size: int = 160) -> dict:
    """A decoded batch (the columns `pipeline.decode` yields) of `n` crops of the aerial image."""
    img = read_image(SOAP)
    src = str(SOAP)
    images = np.stack([img[40 * k:40 * k + size, 50 * k:50 * k + size] for k in range(n)])
    cols = {"frame_id": [frame_id(src, k) for k in range(n)], "source": [src] * n, "source_kind": ["image"] * n,
            "frame_index": list(range(n)), "pts_s": [np.nan] * n, "width": [size] * n, "height": [size] * n,
            "window_x": [0] * n, "window_y": [0] * n, "window_width": [size] * n, "window_height": [size] * n,
            "offset_x": [0] * n, "offset_y": [0] * n}
    return {**{k: np.array(v) for k, v in cols.items()}, "image": images}


def test_detector_leaves_out_a_failing_frame_as_an_error_row_and_keeps_the_rest(tmp_path):
    from pipeline.detect import Detector

    det = Detector(str(resolve("trees")), model_id="trees", tile=None, output=str(tmp_path))
    real = det.predictor
    batch = crops_batch()
    det.predictor = FlakyPredictor(real, bad=batch["image"][3])

    table = det(batch)

    # the contract's columns, then each stage's CPU time per frame for the sink to sum and the detector's start
    # times for the sink to keep the earliest of (neither written)
    from pipeline.sink import TIMES

    assert table.schema.names == [*det.schema.names, "cpu_forward_s", "cpu_rows_s", *TIMES]
    assert table.select(det.schema.names).schema == det.schema
    assert min(table.column("cpu_forward_s").to_pylist()) > 0
    assert table.column("frame_index").to_pylist() == [0, 1, 2, 4]
    expected = real([batch["image"][i] for i in (0, 1, 2, 4)])
    rows = table.to_pylist()
    assert sum(r["num_detections"] for r in rows) > 0
    for r, d in zip(rows, expected):
        assert r["num_detections"] == len(d.boxes)
        if len(d.boxes):
            np.testing.assert_allclose([[x["x1"], x["y1"], x["x2"], x["y2"]] for x in r["detections"]],
                                       d.boxes, atol=1e-2)
    errors = read_table(tmp_path / "errors").to_pylist()
    assert [(e["stage"], e["frame_index"], e["error_type"], e["message"]) for e in errors] == [
        ("detect", 3, "ValueError", "cannot read this frame")]
    from faulttable import record

    record("detector: out of memory above 2 frames, and raises on 1 of 5 frames", "batch halved on OOM, then frame "
           "by frame; 1 detect error row", expected=4, frames=table, errors=len(errors), exit_code=None)
    assert errors[0]["source"] == str(SOAP)


def test_a_model_plugins_invalid_output_is_that_frames_error_row_naming_the_plugin(tmp_path):
    """The frames a model gets wrong (here a score above 1) are error rows of one line naming the plugin; the
    batch's other frames are written (the batch is retried frame by frame, as when a model raises)."""
    from pipeline.detect import Detector

    det = Detector(fakes.backend(fakes.OverscoresBrightFrames), model_id="bad@test", tile=None, output=str(tmp_path))
    batch = crops_batch(3)
    batch["image"][1] = 255
    table = det(batch)
    assert table.column("frame_index").to_pylist() == [0, 2]
    assert [r["detections"][0]["score"] for r in table.to_pylist()] == pytest.approx([0.9, 0.9])
    errors = read_table(tmp_path / "errors").to_pylist()
    assert [(e["stage"], e["frame_index"], e["error_type"], e["message"]) for e in errors] == [
        ("detect", 1, "ModelOutputError", "model fakes.py:OverscoresBrightFrames returned scores outside [0, 1] or NaN")]


def test_detector_outside_a_job_still_raises():
    from pipeline.detect import Detector

    det = Detector(str(resolve("trees")), model_id="trees", tile=None)
    batch = crops_batch(3)
    det.predictor = FlakyPredictor(det.predictor, bad=batch["image"][1])
    with pytest.raises(torch.OutOfMemoryError):
        det(batch)


def test_only_errors_of_the_device_itself_count_as_a_lost_device():
    """What ends a detector's process to be started anew (pipeline.detect): CUDA's sticky errors, not out of
    memory (the predictor halves its batch) nor a frame's own error (an error row)."""
    from pipeline.detect import device_lost

    assert device_lost(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert device_lost(RuntimeError("CUDA error: unspecified launch failure"))  # torch before AcceleratorError
    assert not device_lost(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_lost(ValueError("cannot read this frame")) and not device_lost(RuntimeError("shape mismatch"))


def test_the_driver_prints_no_retry_of_calls_to_an_actor_that_died_starting_but_other_errors_from_ray(capsys):
    """Ray publishes an error to the driver for each retry of a call to an actor whose `__init__` raised (Ray Data
    asks its actors where they run, retrying for ever), each with the actor's traceback, and Ray Data reports the
    death as an internal error with its own traceback; the job says the cause in one line instead. What else Ray
    and Ray Data report still prints."""
    import logging

    from ray._private import worker
    from ray.exceptions import ActorDiedError, RayTaskError

    from pipeline.raydata import quiet_actor_init_deaths

    def record(msg: str) -> logging.LogRecord:
        return logging.getLogger("ray.data.exceptions").makeRecord("ray.data.exceptions", logging.ERROR, __file__, 1,
                                                                   msg, (), None)

    died = ActorDiedError(RayTaskError("__init__", "Traceback ...\nRuntimeError: no kernel", RuntimeError("no kernel")))
    with quiet_actor_init_deaths():
        consoles = [h for h in logging.getLogger("ray.data").handlers if h.filters and "Plain" in type(h).__name__]
        assert consoles
        try:
            raise RuntimeError("Ray Data's execution failed") from died
        except RuntimeError:
            assert not any(h.filter(record("Exception occurred in Ray Data or Ray Core internal code"))
                           for h in consoles)
        try:
            raise RuntimeError("a block failed")
        except RuntimeError:
            assert all(h.filter(record("a block failed")) for h in consoles)
    try:
        raise died
    except ActorDiedError:
        assert all(h.filter(record("Full stack trace")) for h in consoles)  # the filter went with the block
    retry = ("Task MapWorker(MapBatches(Detector)).get_location failed. There are infinite retries remaining, so the "
             "task will be retried. Error: Traceback ...\nray.exceptions.ActorDiedError: The actor died because of an "
             "error raised in its creation task, ...")
    killed = "Task was killed due to the node running low on memory."
    for line in (retry, killed):
        worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printed = capsys.readouterr().out
    assert "get_location" not in printed and killed in printed
    installed = worker.print_to_stdstream
    with quiet_actor_init_deaths():  # installed once: the printer is not wrapped again
        assert worker.print_to_stdstream is installed


def test_a_detector_given_a_gpu_that_torch_cannot_use_says_so_instead_of_running_on_the_cpu(monkeypatch):
    """A CPU-only torch on a GPU node (or a driver torch cannot use): the detector would run on the CPU, a hundred
    times slower, and say nothing."""
    import pipeline.detect
    from pipeline.detect import Detector

    monkeypatch.setattr(pipeline.detect, "_allotted", lambda resource: 1.0 if resource == "GPU" else 2.0)
    with pytest.raises(RuntimeError, match=r"given 1 GPU\(s\), but torch .* cannot use them: .*gpus_per_detector: 0"):
        Detector(str(resolve("trees")), model_id="trees", tile=None)
