"""The main job end to end on real Ray: every sampled frame exactly once, errors as rows, resume,
and detections equal to calling the model directly."""
import dataclasses
import json
import time

import duckdb
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import REPO, SOAP
from fpn_model.data import read_image
from fpn_model.predict import Predictor, TileConfig
from fpn_model.weights import load_checkpoint
from fpn_model.zoo import resolve
from jobs.runner import run
from jobs.spec import plan_from_dict
from pipeline.output import Output, frame_id

pytestmark = pytest.mark.slow


def frames_table(out):
    return pads.dataset(str(out / "frames"), format="parquet").to_table()


def errors_table(out):
    p = out / "errors"
    return pads.dataset(str(p), format="parquet").to_table() if p.exists() else None


def job(inputs, out, **fields):
    return run(plan_from_dict({"inputs": [str(i) for i in inputs], "output": str(out), **fields}))


def assert_exactly_once(t):
    ids = t.column("frame_id").to_pylist()
    assert len(ids) == len(set(ids))
    for fid, src, idx in zip(ids, t.column("source").to_pylist(), t.column("frame_index").to_pylist()):
        assert fid == frame_id(src, idx)


def test_every_n_over_segments_and_fps_sampling(ray_session, make_video, tmp_path):
    a = make_video("a45.mp4", 45, 15.0)
    b = make_video("b30.mp4", 30, 10.0)
    doc = job([a, b], tmp_path / "n", sampling={"every_n": 4}, segment_frames=8, batch_size=3)
    t = frames_table(tmp_path / "n")
    assert_exactly_once(t)
    got = {}
    for src, i, pts in zip(t.column("source").to_pylist(), t.column("frame_index").to_pylist(), t.column("pts_s").to_pylist()):
        got.setdefault(src, {})[i] = pts
    assert sorted(got[str(a)]) == list(range(0, 45, 4)) and sorted(got[str(b)]) == list(range(0, 30, 4))
    assert all(abs(p - i / 15.0) < 1e-3 for i, p in got[str(a)].items())
    assert all(abs(p - i / 10.0) < 1e-3 for i, p in got[str(b)].items())
    assert doc["state"] == "succeeded" and doc["frames"] == 12 + 8 and doc["errors"] == 0
    assert set(t.column("source_kind").to_pylist()) == {"video"}
    assert set(t.column("width").to_pylist()) == {96} and set(t.column("height").to_pylist()) == {64}

    job([a], tmp_path / "fps", sampling={"fps": 5.0}, segment_frames=16)
    t = frames_table(tmp_path / "fps")
    assert sorted(t.column("frame_index").to_pylist()) == list(range(0, 45, 3))


def test_bad_inputs_become_error_rows_and_good_ones_finish(ray_session, make_video, tmp_path, caplog):
    good = make_video("good12.mp4", 12, 6.0)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(12):
        (src / f"empty{k}.jpg").write_bytes(b"")
    (src / "zero.mp4").write_bytes(b"")
    (src / "junk.mp4").write_bytes(b"garbage" * 500)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    truncated = src / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    doc = job([good, src], tmp_path / "out", segment_frames=4)
    t, e = frames_table(tmp_path / "out"), errors_table(tmp_path / "out")
    assert_exactly_once(t)
    assert sorted(i for s, i in zip(t.column("source").to_pylist(), t.column("frame_index").to_pylist())
                  if s == str(good)) == list(range(12))
    failed = dict(zip(e.column("source").to_pylist(), e.column("message").to_pylist()))
    for name in ("zero.mp4", "junk.mp4", "broken.png"):
        assert str(src / name) in failed, failed
    assert "empty file" in failed[str(src / "zero.mp4")]
    assert set(e.column("stage").to_pylist()) <= {"probe", "decode"}
    # a truncated video either decodes what it holds or records why not: never silently dropped
    truncated_frames = [i for s, i in zip(t.column("source").to_pylist(), t.column("frame_index").to_pylist())
                        if s == str(truncated)]
    assert truncated_frames or str(truncated) in failed
    assert doc["errors"] == e.num_rows
    # the files that cannot be probed are one error file's rows, said one line each up to 10, then how many more
    probed = [pq.read_table(f).column("stage").to_pylist() for f in (tmp_path / "out" / "errors").iterdir()]
    assert sum("probe" in stages for stages in probed) == 1
    n = sum(len(stages) for stages in probed if "probe" in stages)
    assert n >= 15
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe failed for")]
    assert len(said) == 11 and said[-1].startswith(f"probe failed for {n - 10} more sources"), said


def test_images_that_fail_to_decode_are_an_error_file_per_block_not_per_image(ray_session, tmp_path):
    """24 of 48 snapshots truncated after a valid header (the probe reads them, the decoder cannot): 24 error rows,
    each naming its file, in at most a file per decode task (a file each before: 5,000 damaged snapshots, 5,000
    files), and the good ones' frames once each."""
    import io

    import ray
    from PIL import Image

    from pipeline.plan import _unit_blocks

    src = tmp_path / "snaps"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(48):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()
        (src / f"s{k:02d}.jpg").write_bytes(data[:len(data) // 3] if k % 2 else data)
    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    doc = job([src], tmp_path / "out", model=null)
    t, e = frames_table(tmp_path / "out"), errors_table(tmp_path / "out")
    assert_exactly_once(t)
    assert sorted(t.column("source").to_pylist()) == [str(src / f"s{k:02d}.jpg") for k in range(0, 48, 2)]
    assert sorted(e.column("source").to_pylist()) == [str(src / f"s{k:02d}.jpg") for k in range(1, 48, 2)]
    assert set(e.column("stage").to_pylist()) == {"decode"} and doc["errors"] == 24
    blocks = len(_unit_blocks([{"kind": "image"}] * 48, ray.cluster_resources()["CPU"]))
    assert len(list((tmp_path / "out" / "errors").iterdir())) <= blocks < 24


def test_a_run_over_some_inputs_keeps_earlier_runs_errors_about_the_others(ray_session, tmp_path):
    """A daily run over the day's folder removed every earlier run's error rows (the archive's unreadable files
    vanished from `errors` and status said 0): only rows of sources the run read again go, an error file of
    several sources keeps the others' rows, and the run's state is of its own inputs."""
    from PIL import Image

    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    days = {d: tmp_path / d for d in ("day1", "day2")}
    for d, folder in days.items():
        folder.mkdir()
        Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(folder / "good.png")
        (folder / "bad.jpg").write_bytes(b"")  # fails its probe: one error file for both days' bad ones
    out = tmp_path / "out"
    first = job(list(days.values()), out, model=null)
    assert first["state"] == "finished_with_errors" and errors_table(out).num_rows == 2
    (days["day2"] / "bad.jpg").unlink()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(days["day2"] / "bad.jpg")  # re-uploaded, readable
    second = job([days["day2"]], out, model=null)
    assert errors_table(out).column("source").to_pylist() == [str(days["day1"] / "bad.jpg")]
    assert (second["state"], second["errors"], second["errors_of_other_inputs"]) == ("succeeded", 1, 1)
    status = Output(str(out)).progress()
    assert (status["state"], status["errors"], status["errors_of_other_inputs"]) == ("succeeded", 1, 1)
    third = job(list(days.values()), out, model=null)  # day 1's file read again, still bad: its row, this run's
    assert errors_table(out).column("source").to_pylist() == [str(days["day1"] / "bad.jpg")]
    assert (third["state"], third["errors"], third["errors_of_other_inputs"]) == ("finished_with_errors", 1, 0)
    assert frames_table(out).num_rows == 3


def test_rerun_skips_written_frames_and_never_duplicates(ray_session, make_video, tmp_path, capsys):
    v = make_video("r40.mp4", 40, 10.0)
    out = tmp_path / "out"
    job([v], out, sampling={"every_n": 2}, segment_frames=10)
    files = sorted(p.name for p in (out / "frames").glob("*.parquet"))
    # lose one file, as if a job died before writing it, then resume
    (out / "frames" / files[0]).unlink()
    lost = 20 - frames_table(out).num_rows
    assert lost > 0
    doc = job([v], out, sampling={"every_n": 2}, segment_frames=10)
    t = frames_table(out)
    assert_exactly_once(t)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(0, 40, 2))
    assert doc["skipped_frames"] == 20 - lost and doc["runs"] == 2
    assert 0 < doc["work_units_written_before"] < doc["work_units"] == 4  # the lost file's units ran again
    again = job([v], out, sampling={"every_n": 2}, segment_frames=10)  # nothing left: no decoder, no detector
    assert again["state"] == "succeeded" and again["skipped_frames"] == 20 and again["frames"] == 20
    assert again["work_units_written_before"] == again["work_units"] == 4
    assert frames_table(out).equals(t)
    # a sparser sampling: its 10 frames are among the 20 written; the other 10 are no part of this job's progress
    # (status said "frames: 20 / 10 (200%)" and the run "20 frames already written were skipped")
    sparse = job([v], out, sampling={"every_n": 4}, segment_frames=10)
    assert (sparse["planned_frames"], sparse["skipped_frames"], sparse["frames_outside_plan"]) == (10, 10, 10)
    p = Output(str(out)).progress()
    assert (p["frames_done"], p["frames_planned"], sparse["frames"]) == (10, 10, 20)
    from jobs.cli import _print_summary  # "20 frames" beside status's 10 / 10: the summary says why

    _print_summary(sparse)
    assert ("of the output's 20 frames, 10 are outside this run's plan of 10 (the frames fpn status counts): earlier "
            "runs' of other inputs, of another sampling, or of sources since changed or gone"
            ) in capsys.readouterr().out


def test_only_units_with_a_frame_to_write_run_again(tmp_path):
    """`unwritten`: a unit runs again when one of its sampled frames is missing, or when it samples none (a unit
    whose decode fails writes its error row again)."""
    from pipeline.output import frame_id
    from pipeline.plan import Plan, Sampling, count_planned, unwritten
    from pipeline.raster import RasterPlan
    from pipeline.sources import WorkUnit

    plan = Plan(inputs=("v.mp4",), output=str(tmp_path), checkpoint="m", model_id="m", sampling=Sampling(every_n=2))
    unit = WorkUnit("v.mp4", "/v.mp4", "video", 0, 10, num_frames=20, fps=10.0, keyframes="0").to_row()
    units = [unit, {**unit, "start": 10, "stop": 20, "keyframes": "10"}]
    first = frozenset(frame_id("/v.mp4", k) for k in range(0, 10, 2))
    assert count_planned(plan, units) == 10
    assert unwritten(plan, units, first) == units[1:]
    assert unwritten(plan, units, first - {frame_id("/v.mp4", 8)}) == units
    assert unwritten(plan, units, first | {frame_id("/v.mp4", k) for k in range(10, 20, 2)}) == []
    keyframes_only = dataclasses.replace(plan, sampling=Sampling(keyframes=True))
    no_index = [{**unit, "keyframes": ""}]  # sampled by keyframes, a unit without an index samples none
    assert count_planned(keyframes_only, no_index) == 0 and unwritten(keyframes_only, no_index, first) == no_index
    # a unit that samples no frame (a time range ending before it) has nothing to run: reruns started Ray for it
    first_second = dataclasses.replace(plan, sampling=Sampling(every_n=2, end_s=0.9))
    assert count_planned(first_second, units) == 5 and unwritten(first_second, units, first) == []
    # a raster's units: windows window_ids()[start:stop] (an area of interest keeps 1, 4, 6 and 7)
    raster = RasterPlan(width=40, height=30, crs=None, transform=(1, 0, 0, 0, -1, 0), bands=(1, 2, 3), low=(0,) * 3,
                        high=(255,) * 3, scale=1.0, window=10, margin=0, gsd_m=None, keep=(1, 4, 6, 7)).to_json()
    tiles = [WorkUnit("r.tif", "/r.tif", "raster", a, a + 2, num_frames=12, raster=raster).to_row() for a in (0, 2)]
    assert count_planned(plan, tiles) == 4
    assert unwritten(plan, tiles, frozenset({frame_id("/r.tif", 1), frame_id("/r.tif", 4)})) == tiles[1:]
    assert unwritten(plan, tiles, frozenset({frame_id("/r.tif", 0), frame_id("/r.tif", 1)})) == tiles


def test_a_source_is_planned_from_its_record_only_while_the_file_and_the_settings_are_the_same(tmp_path):
    """`pipeline.known`: an earlier probe's units stand for a source whose size and version are those recorded,
    cut under the same settings; read with the source's URL of now (a presigned one signed afresh)."""
    from pipeline.known import known_units, left_as_changed, left_at, probe_key, record
    from pipeline.plan import Plan
    from pipeline.raster import RasterSettings
    from pipeline.sources import Source, WorkUnit

    plan = Plan(inputs=("v.mp4",), output=str(tmp_path), checkpoint="m", model_id="m")
    key = probe_key(plan, RasterSettings())
    src = Source("s3://b/v.mp4?X-Amz-Signature=old", "s3://b/v.mp4", 1000, '"etag1"')
    units = [WorkUnit(src.url, src.canonical, "video", a, a + 8, 16, 8.0, 64, 48, keyframes=str(a)).to_row()
             for a in (0, 8)]
    rec = {"size": 1000, "version": '"etag1"', "first_run": 1, **record(units, key)}
    assert "Signature" not in rec["units"]
    signed_now = Source("s3://b/v.mp4?X-Amz-Signature=new", "s3://b/v.mp4", 1000, '"etag1"')
    assert known_units(signed_now, rec, key) == [{**u, "uri": signed_now.url} for u in units]
    assert known_units(Source(src.url, src.canonical, 1001, '"etag1"'), rec, key) is None  # size
    assert known_units(Source(src.url, src.canonical, 1000, '"etag2"'), rec, key) is None  # version
    assert known_units(Source(src.url, src.canonical), rec, key) is None  # nothing tells it is the same file
    assert known_units(src, rec, probe_key(dataclasses.replace(plan, segment_frames=64), RasterSettings())) is None
    assert known_units(src, rec, probe_key(plan, RasterSettings(window=512))) is None
    assert known_units(src, {"size": 1000, "version": '"etag1"', "first_run": 1}, key) is None  # an older output
    assert known_units(dataclasses.replace(src, assets=("s3://b/B04.tif",)), rec, key) is None
    missed = {"size": 1000, "version": '"etag1"', **record("the aoi meets none of its 4 windows", key)}
    assert known_units(src, missed, key) == "the aoi meets none of its 4 windows"
    # a changed source left so (a SourceChanged row): left while at the version seen, never planned from the record
    left = {**rec, **left_at({"size": 1200, "version": '"etag2"'}, 3)}
    seen = Source(src.url, src.canonical, 1200, '"etag2"')
    assert left_as_changed(seen, left) == "size 1000 -> 1200 bytes" and left_as_changed(seen, rec) is None
    assert left_as_changed(Source(src.url, src.canonical, 1200, '"etag3"'), left) is None  # changed again
    assert left_as_changed(src, left) is None and known_units(src, left, key) is None  # back: `_skip_changed` first


def test_a_rerun_probes_only_new_sources_and_with_nothing_new_starts_no_ray(ray_session, make_video, tmp_path,
                                                                           monkeypatch, capsys):
    """A daily run over a growing archive probed every file again, in Ray tasks, and started Ray for them (50 files:
    14.5 s with nothing new): the output records what each probe found (`_sources.parquet`), a rerun probes the new
    sources alone, and with nothing new it reads the record and the frame ids and ends, Ray never started. Its
    record keeps the figures of the last run that did work (`last_work`: one day with nothing new lost them), which
    fpn status shows."""
    import shutil

    import jobs.runner
    import pipeline.plan

    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(make_video("k24.mp4", 24, 8.0), archive / "clip.mp4")
    from PIL import Image

    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(archive / "a.png")
    shutil.copy(SOAP, archive / "big.png")  # 400 x 400, over raster_pixels: a raster of windows
    out = tmp_path / "out"
    spec = {"model": null, "segment_frames": 8, "raster_pixels": 100_000, "raster_window": 256,
            "windows_per_unit": 1}
    probed: list[list[str]] = []
    real_probe, real_init = pipeline.plan._probe, jobs.runner.init_ray

    def spy(plan, raster, rows, out):
        probed.append(sorted(r["source"].rsplit("/", 1)[1] for r in rows))
        return real_probe(plan, raster, rows, out)

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(pipeline.plan, "_probe", spy)
    first = job([archive], out, **spec)
    assert first["state"] == "succeeded" and first["inputs_known"] == 0 and probed == [["a.png", "big.png", "clip.mp4"]]
    units, t = first["work_units"], frames_table(out)
    assert units == 3 + 1 + 4  # the video's segments, the image, the raster's windows

    monkeypatch.setattr(jobs.runner, "init_ray", no_ray)
    again = job([archive], out, **spec)
    assert (again["state"], again["nothing_new"], again["inputs_known"], again["runs"]) == ("succeeded", True, 3, 2)
    assert (again["planned_frames"], again["skipped_frames"], again["work_units"]) == (t.num_rows, t.num_rows, units)
    assert probed == [["a.png", "big.png", "clip.mp4"]] and frames_table(out).equals(t)
    assert again["rasters"] == first["rasters"]
    work = again["last_work"]
    assert (work["runs"], work["state"], work["new_frames"]) == (1, "succeeded", t.num_rows)
    figures = ("started_at", "finished_at", "wall_s", "frames_per_s", "resources", "startup_s", "core_ms_per_frame",
               "min_rows_per_file", "work_units")
    assert {k: work[k] for k in figures} == {k: first[k] for k in figures}
    from jobs.cli import _print_summary

    _print_summary(again)
    assert "nothing new: every input was planned and written by earlier runs" in capsys.readouterr().out
    from click.testing import CliRunner

    from jobs.cli import cli

    status = CliRunner().invoke(cli, ["status", str(out)])
    assert status.exit_code == 0 and "last run: nothing new (every input known and written" in status.output
    assert (f"work:     run 1 (succeeded), ended {first['finished_at']}: {t.num_rows} new frames, "
            f"{first['frames_per_s']:.2f} frames/s") in status.output, status.output
    # a time range ending in the clip's first segment: its later segments sample no frame, and need no run
    early = job([archive], out, sampling={"end_s": 0.5}, **spec)
    assert early["nothing_new"] and early["planned_frames"] == 4 + 1 + 4 and early["work_units"] == units
    assert early["last_work"] == work  # carried by each run with nothing new
    # what a killed writer may leave, a frames file twice and a temporary file, goes as in any run
    first_file = sorted((out / "frames").glob("*.parquet"))[0]
    shutil.copy(first_file, out / "frames" / f"part-again-{first_file.name}")
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "left.parquet").write_bytes(b"half")
    tidy = job([archive], out, **spec)
    assert tidy["nothing_new"] and tidy["duplicate_rows_removed"] > 0 and tidy["frames"] == t.num_rows
    assert frames_table(out).sort_by("frame_id").equals(t.sort_by("frame_id"))
    assert not list((out / "_tmp").iterdir())
    # a record written before it kept changed sources left (pipeline.known.LEFT_FIELDS) reads as it is
    from pipeline.known import LEFT_FIELDS

    pq.write_table(pq.read_table(out / "_sources.parquet").drop_columns(list(LEFT_FIELDS)), out / "_sources.parquet")
    assert job([archive], out, **spec)["nothing_new"]
    # the record's units are sampled anew: a time range past the clip's end reads nothing of it, still no probe
    late = job([archive / "clip.mp4"], out, sampling={"start_s": 10.0}, **spec)
    assert "meets none of its 24 frames" in late["nothing_read"][str(archive / "clip.mp4")]
    assert late["nothing_new"] and probed == [["a.png", "big.png", "clip.mp4"]]

    monkeypatch.setattr(jobs.runner, "init_ray", real_init)
    shutil.copy(archive / "a.png", archive / "b.png")  # the day's new file
    day2 = job([archive], out, **spec)
    assert day2["state"] == "succeeded" and day2["inputs_known"] == 3 and probed[-1] == ["b.png"]
    assert "nothing_new" not in day2 and frames_table(out).num_rows == t.num_rows + 1
    other_cut = job([archive], out, **{**spec, "segment_frames": 16})  # other segments: every source probed
    assert other_cut["inputs_known"] == 0 and len(probed[-1]) == 4 and other_cut["work_units"] == units + 1 - 1
    later = job([archive], out, **{**spec, "segment_frames": 16})
    # the last run that wrote frames: day 2's (the other cut probed again and wrote none)
    assert other_cut["new_frames"] == 0 and other_cut["last_work"]["runs"] == day2["runs"]
    assert later["nothing_new"] and later["last_work"]["runs"] == day2["runs"] and later["last_work"]["new_frames"] == 1
    assert_exactly_once(frames_table(out))


def test_inputs_still_being_written_wait_for_a_later_run(ray_session, tmp_path, monkeypatch, capsys):
    """A daily run over a folder a camera writes into read the file being written in part; the next day's run found
    it changed (a SourceChanged row, its frames of the half file kept). With `min_age_s` it waits for a run after
    it was last written, and the run says so."""
    import os

    from click.testing import CliRunner
    from PIL import Image

    import jobs.runner
    from jobs.cli import _print_summary, cli

    null = f"{REPO / 'benchmarks' / 'null_model.py'}:NullModel"
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    for i, name in enumerate(("done.png", "writing.png")):
        Image.fromarray(np.full((48, 64, 3), i, np.uint8)).save(archive / name)
    hour_ago = time.time() - 3600
    os.utime(archive / "done.png", (hour_ago, hour_ago))
    first = job([archive], out, model=null, min_age_s=600)
    assert first["state"] == "succeeded"
    assert frames_table(out).column("source").to_pylist() == [str(archive / "done.png")]
    assert first["not_settled"] == {"sources": 1, "min_age_s": 600.0, "first": [str(archive / "writing.png")],
                                    "dated_ahead": 0}
    _print_summary(first)
    assert ("waiting: 1 input(s) written within the last 10m (--min-age), left for a later run: "
            f"{archive / 'writing.png'}") in capsys.readouterr().out
    status = CliRunner().invoke(cli, ["status", str(out)])
    assert "left for a later run" in status.output

    real_init = jobs.runner.init_ray
    monkeypatch.setattr(jobs.runner, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert job([archive], out, model=null, min_age_s=600)["nothing_new"]  # the young file is no work of today's
    ahead = tmp_path / "camera-clock-ahead.png"  # copied with its times from a camera whose clock is 2 h ahead
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(ahead)
    os.utime(ahead, (time.time() + 7200,) * 2)
    fresh = job([archive / "writing.png", ahead], tmp_path / "fresh", model=null, min_age_s=600)  # every input waits
    assert (fresh["state"], fresh["nothing_new"], fresh["inputs"], fresh["frames"]) == ("succeeded", True, 0, 0)
    assert (fresh["not_settled"]["sources"], fresh["not_settled"]["dated_ahead"]) == (2, 1)
    _print_summary(fresh)
    said = capsys.readouterr().out
    assert "nothing to do yet: every input was left for a later run" in said
    assert ("1 input(s) written within the last 10m and 1 dated after this machine's clock (wrong clocks? --min-age 0 "
            "reads them) (--min-age), left for a later run") in said
    monkeypatch.setattr(jobs.runner, "init_ray", real_init)

    os.utime(archive / "writing.png", (hour_ago, hour_ago))  # written out: the next run reads it
    later = job([archive], out, model=null, min_age_s=600)
    assert later["state"] == "succeeded" and "not_settled" not in later and later["frames"] == 2
    assert "left for a later run" not in CliRunner().invoke(cli, ["status", str(out)]).output
    assert_exactly_once(frames_table(out))
    # read by a run without the age, and as it is now: nothing of it to wait for (it waited, and the output looked
    # empty: "frames 0 / 0")
    (archive / "again.png").write_bytes((archive / "done.png").read_bytes())
    job([archive / "again.png"], tmp_path / "read", model=null)
    known = job([archive / "again.png"], tmp_path / "read", model=null, min_age_s=600)
    assert known["nothing_new"] and known["inputs"] == 1 and "not_settled" not in known


def test_min_rows_per_file_writes_few_files_of_whole_bundles(ray_session, make_video, tmp_path):
    v = make_video("m40.mp4", 40, 10.0)
    out = tmp_path / "out"
    # a block per batch of 2 frames: without bundling, 20 files
    doc = job([v], out, segment_frames=4, batch_size=2, min_rows_per_file=16)
    rows = sorted(pq.ParquetFile(f).metadata.num_rows for f in (out / "frames").glob("*.parquet"))
    # bundles of whole blocks up to >= 16 frames (a block per batch), the remainder at the end
    assert sum(rows) == 40 and len(rows) <= 3 and sum(n < 16 for n in rows) <= 1, rows
    t = frames_table(out)
    assert_exactly_once(t)
    assert sorted(t.column("frame_index").to_pylist()) == list(range(40)) and doc["state"] == "succeeded"
    assert json.loads((out / "_job.json").read_text())["spec"]["min_rows_per_file"] == 16  # resume keeps it


def test_cpu_detectors_start_with_kept_freed_memory(ray_session, make_video, tmp_path, monkeypatch):
    """A CPU detector actor's process starts with fpn_model.memory's malloc environment (its model sees it), and
    without it when FPN_KEEP_FREED_MEMORY=0."""
    import fakes

    def scores(out):
        return {round(d["score"], 3) for ds in frames_table(out).column("detections").to_pylist() for d in ds}

    video = make_video("probe.mp4", 6, 10.0)
    doc = job([video], tmp_path / "kept", model=fakes.backend(fakes.MallocProbe), batch_size=2)
    assert doc["detections"] == 6 and scores(tmp_path / "kept") == {0.9}
    monkeypatch.setenv("FPN_KEEP_FREED_MEMORY", "0")
    job([video], tmp_path / "plain", model=fakes.backend(fakes.MallocProbe), batch_size=2)
    assert scores(tmp_path / "plain") == {0.1}


def test_one_units_batches_run_on_all_of_a_detectors_concurrent_calls(ray_session, make_video, tmp_path):
    """A unit's frames reach the detector a batch per call, so one long segment keeps both of a detector's calls
    busy (as one block it went to one call whole, and a job's last unit ran on one lane while the other idled)."""
    import fakes

    video = make_video("lanes.mp4", 16, 10.0)
    doc = job([video], tmp_path / "out", model=fakes.backend(fakes.LaneProbe), batch_size=2, segment_frames=16,
              resources={"calls_per_detector": 2})
    assert doc["work_units"] == 1 and doc["frames"] == 16
    t = frames_table(tmp_path / "out")
    lanes = [d[0]["label"] for d in t.column("detections").to_pylist()]
    assert sorted(set(lanes)) == [1, 2] and min(lanes.count(1), lanes.count(2)) >= 4, lanes


def test_pipeline_detections_equal_direct_model_call(ray_session, tmp_path):
    out = tmp_path / "out"
    doc = job([SOAP], out)
    t = frames_table(out)
    assert t.num_rows == 1 and t.column("source_kind")[0].as_py() == "image"
    row = t.to_pylist()[0]
    assert (row["width"], row["height"], row["pts_s"]) == (400, 400, None)
    direct = Predictor(load_checkpoint(resolve("trees")), tile=TileConfig())([read_image(SOAP)])[0]
    got = row["detections"]
    assert row["num_detections"] == len(got) == len(direct.boxes) > 0
    np.testing.assert_allclose([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in got], direct.boxes, atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in got], direct.scores, atol=1e-5)
    assert [d["level"] for d in got] == direct.levels.tolist()
    assert {d["label_name"] for d in got} == {"Tree"}
    meta = json.loads((out / "_job.json").read_text())
    assert meta["state"] == "succeeded" and meta["model"]["sha256"] and meta["versions"]["torch"]
    assert doc["model"]["id"].startswith("trees@")
    # where the start went, in the order it happens (the detector's worker may have started before the run)
    start = meta["startup_s"]
    steps = [start[k] for k in ("ray", "planned", "detector_init", "detector_ready", "batch", "file")]
    assert 0 <= steps[0] and steps == sorted(steps) and steps[-1] <= meta["wall_s"], start
    assert start["detector_worker"] <= start["detector_init"] and start["before_run"] > 0
    from click.testing import CliRunner

    from jobs.cli import cli

    status = CliRunner().invoke(cli, ["status", str(out)])  # fpn status says it too
    assert status.exit_code == 0 and f"start:    Ray ready {start['ray']:.1f} s, planned" in status.output, \
        status.output
    assert f"first file {start['file']:.1f} s" in status.output


def test_output_reads_with_duckdb_and_polars(ray_session, make_video, tmp_path):
    import polars as pl

    v = make_video("q16.mp4", 16, 8.0)
    out = tmp_path / "out"
    job([v, SOAP], out, sampling={"every_n": 2})
    glob = str(out / "frames" / "*.parquet")
    n, kinds = duckdb.sql(f"SELECT count(*), count(DISTINCT source_kind) FROM read_parquet('{glob}')").fetchall()[0]
    assert (n, kinds) == (9, 2)
    dets = duckdb.sql(f"SELECT count(*) FROM (SELECT unnest(detections) FROM read_parquet('{glob}'))").fetchall()[0][0]
    df = pl.read_parquet(glob)
    assert df.height == 9 and int(df["num_detections"].sum()) == dets


def test_large_raster_windows_give_each_object_once(ray_session, tmp_path):
    """A 'huge' image read window by window: detections land in raster pixels, one per object."""
    from PIL import Image

    img = read_image(SOAP)
    big = np.concatenate([np.concatenate([img, img], 1)] * 2, 0)  # 800 x 800, four copies of the scene
    path = tmp_path / "mosaic.png"
    Image.fromarray(big).save(path)
    out = tmp_path / "out"
    job([path], out, raster_pixels=200_000, raster_window=400, raster_margin=64, windows_per_unit=2)
    t = frames_table(out)
    assert t.num_rows == 4 and set(t.column("source_kind").to_pylist()) == {"raster"}
    assert set(t.column("width").to_pylist()) == {800}
    boxes = [d for ds in t.column("detections").to_pylist() for d in ds if d["score"] > 0.5]
    assert boxes and all(0 <= d["x1"] <= d["x2"] <= 800 and 0 <= d["y1"] <= d["y2"] <= 800 for d in boxes)
    quadrant = [d for d in boxes if d["x2"] < 380 and d["y2"] < 380]  # away from window borders
    shifted = [d for d in boxes if d["x1"] > 420 and d["y1"] > 420 and d["x2"] < 780 and d["y2"] < 780]
    # the copies sit in windows with other context (margins, GroupNorm statistics): confident boxes measured 14 and
    # 12 with the trees preset's limits, 14 and 11 with its sized ones; a lost or doubled copy is far outside this
    assert abs(len(quadrant) - len(shifted)) <= max(3, len(quadrant) // 4)


def test_output_of_a_job_whose_inputs_all_fail_still_has_the_schema(ray_session, tmp_path):
    from pipeline.output import FRAME_SCHEMA

    bad = tmp_path / "zero.mp4"
    bad.write_bytes(b"")
    doc = job([bad], tmp_path / "out")
    assert (doc["frames"], doc["errors"]) == (0, 1)
    t = frames_table(tmp_path / "out")
    assert t.num_rows == 0 and t.schema.names == FRAME_SCHEMA.names


def test_a_detector_made_in_a_driver_with_ray_running_takes_threads_as_outside_ray(ray_session):
    """A driver has no assigned resources (Ray asserts that only workers do): a Detector built there (tests,
    notebooks) runs with torch's own thread count."""
    from pipeline.detect import Detector

    det = Detector(str(resolve("trees")), model_id="trees", tile=None)
    assert det.predictor.device.type == "cpu"


@pytest.mark.slow
def test_a_job_counts_the_frames_nvidias_engine_decoded(ray_session, tmp_path):
    """`_job.json` says how many frames an nvdec job decoded on a GPU: every video frame when the engine decoded
    them (a stand-in that says it is the engine), none where PyAV decoded (no engine here); images never."""
    from pathlib import Path

    import fakes

    video = str(Path(__file__).resolve().parents[1] / "data" / "video" / "bikes.mp4")
    null = f"{Path(__file__).resolve().parents[1] / 'benchmarks' / 'null_model.py'}:NullModel"
    for backend, on_gpu in ((fakes.backend(fakes.EngineVideo), 5), ("nvdec", 0)):
        out = tmp_path / str(on_gpu)
        doc = run(plan_from_dict({"inputs": [video, str(SOAP)], "output": str(out), "model": null,
                                  "sampling": {"every_n": 50}, "video_backend": backend}))
        assert doc["state"] == "succeeded" and doc["frames"] == 6
        assert json.loads((out / "_job.json").read_text())["frames_decoded_on_gpu"] == on_gpu


def test_no_warning_that_the_job_will_hang_while_planning_tasks_return_their_cpus(ray_session, tmp_path, caplog,
                                                                               capfd, monkeypatch):
    """Ray Data warns "The Dataset job will hang unless more CPUs are freed up" when no CPU is free as it starts: a
    third of small jobs said so (and then succeeded) while the planning tasks' CPUs were being returned."""
    from pathlib import Path

    import ray
    import ray.util.debug
    from PIL import Image

    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(ray, "available_resources", lambda: {})  # as Ray Data saw it then
    monkeypatch.setattr(ray.util.debug, "_logged", set())  # as in a fresh process (Ray warns once a process)
    null = f"{Path(__file__).resolve().parents[1] / 'benchmarks' / 'null_model.py'}:NullModel"
    doc = job([tmp_path / "a.png"], tmp_path / "out", model=null)
    assert doc["frames"] == 1
    assert "available CPUs" not in caplog.text + "".join(capfd.readouterr())  # Ray Data's logger has its handler
