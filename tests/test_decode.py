"""Sources and decoding without Ray: sampling, segments, frame content and timestamps, bad files."""

import numpy as np
import pytest

from conftest import cut_video, index_frame, read_index
from pipeline.decode import PyAVVideo, Sampling, decode_unit, probe, sample_indices
from pipeline.output import frame_id
from pipeline.raster import RasterSettings
from pipeline.plan import plan_units
from pipeline.sources import WorkUnit, expand_inputs


def _frames(unit, sampling=Sampling(), backend="decord", done=frozenset()):
    rows = []
    for b in decode_unit(unit, sampling=sampling, batch_size=4, done=done, video_backend=backend):
        assert b["image"].dtype == np.uint8 and b["image"].ndim == 4
        for k in range(len(b["frame_index"])):
            rows.append((b["frame_index"][k], b["pts_s"][k], read_index(b["image"][k]), b["frame_id"][k],
                         b["decoded_frames"][k]))
    return rows


def gop_clip(path, frames: int, fps: float, gop: int, container: str = "mp4"):
    """An H.264 clip of `index_frame`s with a keyframe every `gop` frames exactly (x264, B-frames on), in an
    MP4 (an index with every frame) or another container (`mkv`, `ts`: none)."""
    from jobs.render import write_video

    path = path.with_suffix(f".{container}")
    write_video((index_frame(i) for i in range(frames)), path, fps, gop=gop)
    return str(path)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_segments_decode_the_right_frames_with_timestamps(tmp_path, backend):
    path = gop_clip(tmp_path / "idx40", 40, 10.0, 8)
    units = list(plan_units(path, path, segment_frames=16, raster_pixels=10**8, window=2048, windows_per_unit=4,
                            video_backend=backend))
    assert [(u.start, u.stop) for u in units] == [(0, 16), (16, 32), (32, 40)]
    rows = [r for u in units for r in _frames(u, Sampling(every_n=3), backend)]
    assert [r[0] for r in rows] == list(range(0, 40, 3))
    for index, pts, content, fid, _ in rows:
        assert content == index  # the decoded pixels are that frame's
        assert pts == pytest.approx(index / 10.0, abs=1e-3)
        assert fid == frame_id(path, index)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_segments_start_at_keyframes_and_decode_every_frame_once(tmp_path, backend):
    path = gop_clip(tmp_path / "gop10", 72, 10.0, 10)
    info = probe(path, video_backend=backend)
    assert (info.num_frames, info.keyframes) == (72, tuple(range(0, 72, 10)))
    units = list(plan_units(path, path, segment_frames=16, raster_pixels=10**8, windows_per_unit=4,
                            video_backend=backend))
    # each cut at the first keyframe at or after a multiple of 16: 20 (>= 16), 40 (>= 32), 50 (>= 48), 70 (>= 64)
    assert [(u.start, u.stop) for u in units] == [(0, 20), (20, 40), (40, 50), (50, 70), (70, 72)]
    assert [u.keyframe_indices() for u in units] == [[0, 10], [20, 30], [40], [50, 60], [70]]
    rows = [r for u in units for r in _frames(u, Sampling(), backend)]
    assert [r[0] for r in rows] == list(range(72)) and all(r[2] == r[0] for r in rows)
    assert sum(r[4] for r in rows) == 72  # every frame decoded once: no segment decodes another's frames


def test_keyframes_sampling_decodes_only_keyframes(tmp_path):
    path = gop_clip(tmp_path / "keys", 72, 10.0, 10)
    units = list(plan_units(path, path, segment_frames=32, raster_pixels=10**8, windows_per_unit=4))
    by_backend = {}
    for backend in ("decord", "pyav"):
        rows = [r for u in units for r in _frames(u, Sampling(keyframes=True), backend)]
        assert [r[0] for r in rows] == list(range(0, 72, 10))
        assert all(r[2] == r[0] for r in rows) and all(r[4] == 1 for r in rows)  # one decoded per sampled frame
        by_backend[backend] = rows
    assert by_backend["decord"] == by_backend["pyav"]
    # with a time range; a pure function of the whole video, so segments agree at their borders
    keys = list(range(0, 72, 10))
    s = Sampling(keyframes=True, start_s=1.5, end_s=6.0)
    assert sample_indices(72, 10.0, s, keyframes=keys) == [20, 30, 40, 50]
    assert sample_indices(72, 10.0, s, 0, 35, keys) + sample_indices(72, 10.0, s, 35, 72, keys) == [20, 30, 40, 50]
    with pytest.raises(ValueError, match="keyframes"):
        Sampling(keyframes=True, every_n=2)


def test_decoded_frames_count_what_the_codec_decodes(tmp_path):
    """Every 7th frame of 10-frame groups: each sampled frame costs the frames from its group's keyframe (or from
    the previous sampled frame in the same group) to itself. PyAV counts what comes out of the codec; decord's
    count follows its seek policy, and agrees."""
    path = gop_clip(tmp_path / "sparse", 40, 10.0, 10)
    unit = next(plan_units(path, path, segment_frames=64, raster_pixels=10**8, windows_per_unit=4))
    # 0 | 1..7 (same group) | 10..14 (seek) | 20, 21 (seek) | 22..28 (same group) | 30..35 (seek)
    expected = {0: 1, 7: 7, 14: 5, 21: 2, 28: 7, 35: 6}
    for backend in ("decord", "pyav"):
        rows = _frames(unit, Sampling(every_n=7), backend)
        assert {r[0]: r[4] for r in rows} == expected, backend


@pytest.mark.parametrize("container", ["mkv", "ts"])
def test_frame_count_and_keyframes_without_a_container_index(tmp_path, container):
    """Matroska and MPEG-TS do not list every frame up front: PyAV demuxes the packets once (no decoding)."""
    path = gop_clip(tmp_path / "noindex", 30, 10.0, 8, container)
    v = PyAVVideo(path)
    assert (v.num_frames, v.keyframes) == (30, [0, 8, 16, 24])
    assert [read_index(f) for f in v.frames([3, 17, 29])] == [3, 17, 29]
    assert [read_index(f) for f in v.frames([8, 24])] == [8, 24] and v.decoded == [1, 1]  # keyframes alone
    assert [read_index(f) for f in v.frames([0, 1, 9])] == [0, 1, 9]
    v.close()


def _encode(path, frames, *, pts_ms=None, rotation=None, gop=8):
    """H.264 (B-frames on) of `frames` with presentation times `pts_ms` (a variable rate; default 10 fps) and a
    display rotation (`degrees` counterclockwise, as phones record)."""
    import fractions

    import av

    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=10, options={"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})
        st.height, st.width = frames[0].shape[:2]
        st.pix_fmt = "yuv420p"
        if pts_ms is not None:
            st.time_base = st.codec_context.time_base = fractions.Fraction(1, 1000)
        if rotation is not None:
            st.set_display_rotation(rotation)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for packet in st.encode(frame):
                c.mux(packet)
        for packet in st.encode():
            c.mux(packet)
    return str(path)


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_a_variable_frame_rate_video_gives_the_same_frames_and_times_with_both_backends(tmp_path, container):
    """Bursts 10 ms apart, then gaps of 100 ms (a camera that drops frames). PyAV (every remote video) numbered
    frames by time x average rate: frame 10 held frame 13 and the MP4 failed ("frame 30 not found")."""
    pts = []
    for i in range(40):
        pts.append(0 if not i else pts[-1] + (10 if ((i - 1) // 10) % 2 == 0 else 100))
    path = _encode(tmp_path / f"vfr.{container}", [index_frame(i) for i in range(40)], pts_ms=pts)
    for backend in ("decord", "pyav"):
        units = list(plan_units(path, path, segment_frames=16, raster_pixels=10**8, windows_per_unit=4,
                                video_backend=backend))
        assert sum(u.stop - u.start for u in units) == 40, backend
        rows = [r for u in units for r in _frames(u, Sampling(every_n=3), backend)]
        assert [r[0] for r in rows] == list(range(0, 40, 3)), backend
        assert [r[2] for r in rows] == [r[0] for r in rows], backend  # the pixels are that frame's
        assert [r[1] for r in rows] == [pts[i] / 1000 for i in range(0, 40, 3)], backend  # its own time, exactly
        # by time, not by index / average rate: the first frame of each 0.2 s, and the frames from 1.0 to 1.2 s
        by_time = {(5.0, None, None): [i for i in range(40) if i == 0 or pts[i] // 200 != pts[i - 1] // 200],
                   (None, 1.0, 1.2): [i for i in range(40) if 1000 <= pts[i] < 1200]}
        for (fps, start_s, end_s), want in by_time.items():
            s = Sampling(fps=fps, start_s=start_s, end_s=end_s)
            assert [r[0] for u in units for r in _frames(u, s, backend)] == want, (backend, fps)


def test_a_rotated_video_is_turned_upright_by_both_backends(tmp_path):
    """A display matrix (a phone held upright) turns the picture: decord applied it and PyAV (every remote video)
    did not, so the same file gave other pixels, sizes and boxes by where it was stored."""
    frames = [index_frame(i) for i in range(12)]  # 96 x 64, bars vertical
    path = _encode(tmp_path / "rot.mp4", frames, rotation=-90)  # shown turned a quarter clockwise
    for backend in ("decord", "pyav"):
        info = probe(path, video_backend=backend)
        assert (info.width, info.height) == (64, 96), backend
        unit = next(iter(plan_units(path, path, segment_frames=16, raster_pixels=10**8, windows_per_unit=4,
                                    video_backend=backend)))
        got = [b["image"] for b in decode_unit(unit, sampling=Sampling(every_n=5), batch_size=4,
                                                video_backend=backend)]
        images = np.concatenate(got)
        assert images.shape == (3, 96, 64, 3), backend
        upright = [np.rot90(images[k], 1) for k in range(3)]  # turned back: the bars vertical again
        assert [read_index(im) for im in upright] == [0, 5, 10], backend


def test_an_mpeg_ts_read_with_decord_gives_its_own_frames(tmp_path):
    """decord numbered an MPEG-TS's frames wrongly after a seek (3, 17, 29 came back as 11, 25, 27): the default
    backend reads transport streams with PyAV."""
    path = gop_clip(tmp_path / "cctv", 30, 10.0, 8, "ts")
    unit = next(iter(plan_units(path, path, segment_frames=64, raster_pixels=10**8, windows_per_unit=4)))
    rows = _frames(unit, Sampling(every_n=7))
    assert [r[0] for r in rows] == [r[2] for r in rows] == [0, 7, 14, 21, 28]
    assert [r[1] for r in rows] == pytest.approx([0.0, 0.7, 1.4, 2.1, 2.8])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_a_truncated_video_keeps_the_frames_before_the_damage_and_names_the_first_it_cannot_decode(tmp_path,
                                                                                                 backend):
    """Its index at the front (faststart), its data cut: a batch holding an undecodable frame lost every frame of
    its segment, its error row at the segment's start, in decord's C++ log text; decord's reader refused some
    such files whole ("av_read_frame failed"), which PyAV reads up to the cut."""
    import re

    from pipeline.decode import UndecodableFrame

    path = cut_video(tmp_path / "cut.mp4")
    unit = next(iter(plan_units(str(path), str(path), segment_frames=64, raster_pixels=10**8, windows_per_unit=4,
                                video_backend=backend)))
    assert (unit.start, unit.stop) == (0, 40)  # the index still lists every frame
    rows = []
    with pytest.raises(UndecodableFrame) as failed:
        for b in decode_unit(unit, sampling=Sampling(every_n=3), batch_size=8, video_backend=backend):
            rows += [(i, read_index(im)) for i, im in zip(b["frame_index"], b["image"])]
    sampled = list(range(0, 40, 3))
    assert len(rows) >= 4 and [i for i, _ in rows] == sampled[:len(rows)] and all(i == k for i, k in rows), rows
    k = failed.value.frame_index
    assert k == sampled[len(rows)], (k, rows)
    message = str(failed.value)
    assert message.startswith(f"{path}: frame {k} cannot be decoded (damaged or truncated file?)"), message
    assert not re.search(r"\[\d\d:\d\d:\d\d\]|\.cc:\d+", message), message


def test_fps_sampling_and_time_range():
    assert sample_indices(50, 25.0, Sampling(fps=5)) == list(range(0, 50, 5))
    assert sample_indices(30, 30.0, Sampling(fps=12)) == [i for i in range(30) if i == 0 or int(i / 2.5) != int((i - 1) / 2.5)]
    assert sample_indices(100, 10.0, Sampling(start_s=2.0, end_s=4.0)) == list(range(20, 40))
    # segment borders do not change what is sampled
    whole = sample_indices(100, 30.0, Sampling(fps=7, every_n=1))
    parts = sample_indices(100, 30.0, Sampling(fps=7), 0, 33) + sample_indices(100, 30.0, Sampling(fps=7), 33, 100)
    assert whole == parts


def test_already_written_frames_are_skipped_before_decoding(make_video):
    path = str(make_video("idx20.mp4", 20, 10.0))
    unit = WorkUnit(path, path, "video", 0, 20, 20, 10.0, 96, 64)
    done = {frame_id(path, i) for i in range(0, 10)}
    assert [r[0] for r in _frames(unit, done=done)] == list(range(10, 20))


@pytest.mark.parametrize("fake, says", [
    ("FewerFrames", "returned 1 frames for the 4 asked for"),
    ("FloatFrames", "returned frames of dtype float32, expected uint8 (0..255)"),
    ("HalfSizeFrames", "returned frames of 48x32, not the 96x64 it declared"),
])
def test_a_video_backend_returning_other_frames_than_asked_ends_its_unit_there_naming_the_backend(make_video, fake,
                                                                                                 says):
    """Checked as the frames leave the decoder: fewer frames failed the whole job (Ray could not line the batch's
    columns up), float frames were black once cast, frames of another size went on as if right."""
    import fakes
    from pipeline.decode import DecoderOutputError

    path = str(make_video("idx20.mp4", 20, 10.0))
    unit = WorkUnit(path, path, "video", 0, 20, 20, 10.0, 96, 64)
    got = []
    with pytest.raises(DecoderOutputError) as e:
        for b in decode_unit(unit, sampling=Sampling(), batch_size=4, video_backend=fakes.backend(getattr(fakes, fake))):
            got += b["frame_index"]
    assert got == list(range(fakes.BAD_FRAME))  # the batches before it are kept
    assert str(e.value) == f"{path}: video backend fakes.py:{fake} {says} (frames 8-11)" and e.value.frame_index == 8


def test_image_unit_and_probe_errors(tmp_path):
    from conftest import SOAP

    assert [u.kind for u in plan_units(str(SOAP), str(SOAP), segment_frames=8, raster_pixels=10**8, window=2048,
                                       windows_per_unit=4)] == ["image"]
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        probe(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="cannot decode video"):
        probe(str(junk))
    text = tmp_path / "notes.csv"
    text.write_text("a,b")
    with pytest.raises(ValueError, match="not a supported media file"):
        probe(str(text))


def test_large_image_becomes_raster_windows(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(img).save(path)
    units = list(plan_units(str(path), str(path), segment_frames=8, raster_pixels=100_000, windows_per_unit=5,
                            raster=RasterSettings(window=256, margin=32)))
    assert {u.kind for u in units} == {"raster"} and units[-1].stop == 12  # 4 x 3 windows
    batches = [b for u in units for b in decode_unit(u, sampling=Sampling(), batch_size=4)]
    assert len(batches) == 12
    b = batches[5]  # window (1, 1): x 256..512, y 256..512, padded by 32
    assert (b["window_x"][0], b["window_y"][0], b["offset_x"][0], b["offset_y"][0]) == (256, 256, 224, 224)
    np.testing.assert_array_equal(b["image"][0], img[224:544, 224:544])


def test_sources_written_within_min_age_are_left_for_a_later_run(tmp_path):
    """A file a camera or an upload is still writing was read in part, and the next run found it changed: with
    `min_age_s`, a source last written less long ago than that waits, whichever way it was named."""
    import os
    import time

    from pipeline.sources import Source, ahead_of, settled

    (tmp_path / "a").mkdir()
    for name in ("old.png", "new.png"):
        (tmp_path / "a" / name).write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(tmp_path / "a" / "old.png", (hour_ago, hour_ago))
    (tmp_path / "list.txt").write_text("a/old.png\na/new.png\n")
    for spelling in ("a", "a/*.png", "list.txt"):
        found = expand_inputs([str(tmp_path / spelling)])
        assert [s.modified for s in found] == [os.stat(s.url).st_mtime for s in found], spelling
        ready, young = settled(found, 600)
        assert ([s.canonical for s in ready], [s.canonical for s in young]) == (
            [str(tmp_path / "a" / "old.png")], [str(tmp_path / "a" / "new.png")]), spelling
    one = expand_inputs([str(tmp_path / "a" / "new.png")])
    assert settled(one, 600)[0] == [] and settled(one, 0) == (one, [])
    assert settled(one, 600, now=time.time() + 601) == (one, [])
    unknown = [Source("https://h/x.png", "https://h/x.png")]  # no time in the listing: read
    assert settled(unknown, 600) == (unknown, [])
    # a link to a file being written: its target's time and size however it is named (a directory's listing gave
    # the link's own mtime, so it counted as settled, and another version than the link named alone)
    os.symlink(tmp_path / "a" / "new.png", tmp_path / "a" / "latest.png")
    os.utime(tmp_path / "a" / "latest.png", (hour_ago, hour_ago), follow_symlinks=False)
    listed = {s.canonical: s for s in expand_inputs([str(tmp_path / "a")])}
    link = listed[str(tmp_path / "a" / "latest.png")]
    assert link == expand_inputs([str(tmp_path / "a" / "latest.png")])[0]
    assert link.modified == os.stat(tmp_path / "a" / "new.png").st_mtime and settled([link], 600)[1] == [link]
    # dated after the clock (a camera's clock ahead, its files copied with their times): waiting, and told apart
    future = time.time() + 7200
    os.utime(tmp_path / "a" / "old.png", (future, future))
    ready, young = settled(expand_inputs([str(tmp_path / "a")]), 600)
    assert not ready and [s.canonical for s in ahead_of(young, time.time())] == [str(tmp_path / "a" / "old.png")]


def test_expand_inputs_globs_directories_manifests(tmp_path, make_video):
    v = make_video("idx40.mp4", 40, 10.0)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    (tmp_path / "a" / "readme.txt").write_text("not media")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# flights\n{v}\n{tmp_path / 'a' / 'x.png'}\n")
    assert [s.url for s in expand_inputs([str(tmp_path / "a")])] == [str(tmp_path / "a" / "x.png")]
    assert [s.url for s in expand_inputs([str(manifest)])] == sorted([str(v), str(tmp_path / "a" / "x.png")])
    assert [s.url for s in expand_inputs([str(tmp_path / "a" / "*.png")])] == [str(tmp_path / "a" / "x.png")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.mp4")])
    # relative entries are read from the manifest's directory, wherever the command runs (they were read from the
    # working directory: "input x.png does not exist", naming no manifest)
    (tmp_path / "a" / "rel.txt").write_text("x.png\nsub/y.png\n")
    assert [s.url for s in expand_inputs([str(tmp_path / "a" / "rel.txt")])] == [
        str(tmp_path / "a" / "sub" / "y.png"), str(tmp_path / "a" / "x.png")]  # y.png's probe makes its error row
    # an entry naming nothing is a source whose probe fails (the job stopped at the first, naming it alone); a
    # pattern matching nothing fails as on the command line
    (tmp_path / "a" / "glob.txt").write_text("x.png\nsub/*.png\n")
    with pytest.raises(FileNotFoundError, match=r"sub/\*.png: the pattern matches no media files \(listed in manifest "
                                                r".*a/glob.txt\)"):
        expand_inputs([str(tmp_path / "a" / "glob.txt")])
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "y.png").write_bytes(b"y")
    assert [s.url for s in expand_inputs([str(tmp_path / "a" / "rel.txt")])] == [
        str(tmp_path / "a" / "sub" / "y.png"), str(tmp_path / "a" / "x.png")]
    with pytest.raises(FileNotFoundError, match="matches no media"):
        expand_inputs([str(tmp_path / "*.mkv")])
    # `**.png` as the README writes it (fsspec: "Invalid pattern: '**' can only be an entire path component"):
    # at any depth, the top directory's too; a pattern fsspec cannot read names the input
    assert [s.url for s in expand_inputs([str(tmp_path / "**.png")])] == [
        str(tmp_path / "a" / "sub" / "y.png"), str(tmp_path / "a" / "x.png")]
    assert [s.url for s in expand_inputs([str(tmp_path / "a" / "**.png")])] == [
        str(tmp_path / "a" / "sub" / "y.png"), str(tmp_path / "a" / "x.png")]
    with pytest.raises(ValueError, match=r"^input .*/a\*\*/\*.png: Invalid pattern"):
        expand_inputs([str(tmp_path / "a**" / "*.png")])


def test_planning_tasks_import_no_model_and_no_ray_data():
    """A planning task imports pipeline.plan (and the frame counter it may unpickle, pipeline.counter): neither
    loads torch or ray.data (seconds of CPU in each new process, beside the detectors starting)."""
    import subprocess
    import sys

    code = ("import sys, pipeline.plan, pipeline.counter; "
            "print(','.join(m for m in ('torch', 'torchvision', 'ray.data') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == ""


@pytest.mark.parametrize("missing", ["module", "device"])
def test_nvdec_falls_back_to_pyav_with_one_line(tmp_path, monkeypatch, caplog, missing):
    """`video_backend: nvdec` where NVDEC cannot run (no PyNvVideoCodec; or no CUDA device, a stand-in module
    installed) decodes with PyAV: the same frames, the same decode counts, and one warning naming the cause."""
    import sys
    import types

    from pipeline import nvdec

    if missing == "module":
        monkeypatch.setitem(sys.modules, "PyNvVideoCodec", None)  # import fails
    else:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
        monkeypatch.setitem(sys.modules, "PyNvVideoCodec", types.ModuleType("PyNvVideoCodec"))
    monkeypatch.setattr(nvdec, "_said", set())
    path = gop_clip(tmp_path / "c", 20, 10.0, gop=5)
    unit = WorkUnit(path, path, "video", 0, 20, 20, 10.0, 96, 64)
    with caplog.at_level("WARNING", logger="pipeline.nvdec"):
        got = _frames(unit, Sampling(every_n=3), backend="nvdec")
        again = _frames(unit, Sampling(every_n=3), backend="nvdec")
    assert got == again == _frames(unit, Sampling(every_n=3), backend="pyav")
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeline.nvdec"]
    cause = "PyNvVideoCodec is not installed" if missing == "module" else "no CUDA device is visible"
    assert line.startswith("nvdec unavailable: " + cause) and line.endswith("decoding on the CPU with PyAV")


def test_a_local_nvdec_job_says_before_any_work_when_nvdec_cannot_run_here(tmp_path, monkeypatch, caplog):
    import importlib.util

    from jobs.runner import nvdec_note
    from jobs.spec import plan_from_dict

    plan = plan_from_dict({"inputs": [str(tmp_path / "v.mp4")], "output": str(tmp_path / "o"), "model": "trees",
                           "video_backend": "nvdec"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PyNvVideoCodec"
                        else real(name, *a))
    with caplog.at_level("WARNING", logger="jobs.runner"):
        note = nvdec_note(plan)
    assert note == "nvdec unavailable: PyNvVideoCodec is not installed; videos decode on the CPU with PyAV"
    assert note in caplog.text
    assert nvdec_note(plan_from_dict({"inputs": [str(tmp_path / "v.mp4")], "output": str(tmp_path / "o"),
                                      "model": "trees", "video_backend": "pyav"})) is None


def test_a_time_range_that_misses_a_video_is_said_not_silent(tmp_path):
    """--start 5.2 on a 2 s video ended "succeeded: 0 frames" without a word."""
    from fpn_model.weights import read_input_spec
    from jobs.spec import plan_from_dict
    from pipeline.plan import _planned, _probe_sources
    from pipeline.sources import Source

    path = gop_clip(tmp_path / "short", 20, 10.0, 8)
    row = {"uri": path, "source": path, "stac_item": None, "datetime": None, "assets": []}

    def probed(**sampling):  # why nothing is read, or the units (the time range is checked on units recorded too)
        plan = plan_from_dict({"inputs": [path], "output": str(tmp_path / "o"), "sampling": sampling})
        found = _probe_sources(plan, plan.raster_settings(read_input_spec(plan.checkpoint)), [row])
        planned = _planned(plan, [Source(str(path), str(path))], found, {}, known=0)
        return planned.unread.get(str(path), planned.units)

    assert probed(start_s=5.2) == "the time range 5.2 s to the end meets none of its 20 frames (0 to 1.90 s): nothing read"
    assert probed(start_s=0.51, end_s=0.58) == ("the time range 0.51 s to 0.58 s meets none of its 20 frames (0 to "
                                                "1.90 s): nothing read")
    assert probed(start_s=1.5) and isinstance(probed(every_n=5), list)  # frames to read


def test_a_16_bit_png_is_stretched_as_the_same_pixels_in_a_tiff_are(tmp_path):
    """PIL's RGB conversion clips 16-bit samples at 255: a 16-bit PNG reached the model all white."""
    import rasterio
    from PIL import Image

    grey = (1000 + 3000 * np.linspace(0, 1, 96 * 128).reshape(96, 128)).astype(np.uint16)
    png, tif = tmp_path / "g16.png", tmp_path / "g16.tif"
    Image.fromarray(grey).save(png)
    assert Image.open(png).mode.startswith("I;16")
    with rasterio.open(tif, "w", driver="GTiff", width=128, height=96, count=1, dtype="uint16") as ds:
        ds.write(grey, 1)
    images = {}
    for path in (png, tif):
        (unit,) = plan_units(str(path), str(path), segment_frames=8, raster_pixels=10**8, windows_per_unit=4)
        assert unit.kind == "raster"
        (batch,) = decode_unit(unit, sampling=Sampling(), batch_size=4)
        images[path.suffix] = batch["image"][0]
    assert np.array_equal(images[".png"], images[".tif"])
    assert images[".png"].min() < 20 and images[".png"].max() > 235  # stretched, not clipped


def test_a_file_that_is_no_image_is_said_in_words_the_same_each_time(tmp_path):
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ValueError) as e:
        probe(str(fake))
    assert str(e.value) == f"{fake}: cannot read image (ValueError: not an image format PIL reads)"
