"""`fpn render`: any frame of any source with the boxes of that frame, a raster region across windows, clips.

The outputs here are written through `pipeline.output.Output` with known boxes (no detector run), over real
media: a video whose frames encode their index, a GeoTIFF written with rasterio.
"""
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from PIL import Image

from jobs.cli import cli
from jobs.render import colour
from pipeline.decode import open_video
from pipeline.output import FRAME_SCHEMA, Output, frame_id
from pipeline.storage import canonical_uri


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _row(source, kind, index, pts, w, h, dets, window=None):
    wx, wy, ww, wh = window or (0, 0, w, h)
    return {"frame_id": frame_id(source, index), "source": source, "source_kind": kind, "frame_index": index,
            "pts_s": pts, "width": w, "height": h, "num_detections": len(dets), "model": "synthetic",
            "detections": [{"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": s, "label": lb, "label_name": f"c{lb}",
                            "level": 2} for x1, y1, x2, y2, s, lb in dets],
            "window_x": wx, "window_y": wy, "window_width": ww, "window_height": wh}


# frame -> boxes (x1, y1, x2, y2, score, label): each processed frame has its own box at its own place
VIDEO_BOXES = {0: [(10, 10, 40, 30, 0.9, 1)], 4: [(50, 20, 90, 60, 0.8, 2)], 8: [(20, 30, 60, 60, 0.7, 3)]}


@pytest.fixture
def video_output(make_video, tmp_path):
    """A 12-frame video (12 fps, 96x64) processed at frames 0, 4 and 8."""
    video = make_video("render12.mp4", 12, 12.0)
    src = canonical_uri(str(video))
    rows = [_row(src, "video", i, i / 12.0, 96, 64, dets) for i, dets in VIDEO_BOXES.items()]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    return tmp_path / "out", video


def _outline_has(img: np.ndarray, box, rgb) -> bool:
    x1, y1, x2, y2 = (int(v) for v in box[:4])
    edges = np.concatenate([img[y1, x1:x2 + 1], img[y2, x1:x2 + 1], img[y1:y2 + 1, x1], img[y1:y2 + 1, x2]])
    return bool((edges == rgb).all())


def test_rendering_a_video_frame_draws_the_boxes_of_that_frame_only(video_output, tmp_path):
    out, video = video_output
    r = invoke("render", out, video, tmp_path / "f4.png", "--frame", 4, "--min-score", 0)
    assert r.exit_code == 0, r.output
    assert "1 detections drawn (frame 4 at 0.33 s)" in r.output
    drawn = np.asarray(Image.open(tmp_path / "f4.png").convert("RGB"))
    v = open_video(str(video))
    raw = v.frames([4])[0]
    assert drawn.shape == raw.shape
    assert _outline_has(drawn, VIDEO_BOXES[4][0], colour(2))
    for other in (0, 8):  # the other frames' boxes are not on this one
        assert not _outline_has(drawn, VIDEO_BOXES[other][0], colour(VIDEO_BOXES[other][0][5]))
    changed = np.any(drawn != raw, axis=2)
    x1, y1, x2, y2 = VIDEO_BOXES[4][0][:4]
    assert not changed[:y1].any() and not changed[y2 + 1:].any()  # nothing drawn outside the box
    assert not changed[y1 + 1:y2, x1 + 1:x2].any()  # the frame's own pixels inside the box
    # a region away from the box: none drawn, and none counted (the whole frame's count was reported)
    r = invoke("render", out, video, tmp_path / "corner.png", "--frame", 4, "--min-score", 0, "--region", 0, 0, 40, 16)
    assert r.exit_code == 0 and "0 detections drawn (frame 4 at 0.33 s)" in r.output, r.output


def test_time_picks_the_nearest_processed_frame_and_an_unprocessed_index_is_one_line(video_output, tmp_path):
    out, video = video_output
    r = invoke("render", out, video, tmp_path / "t.png", "--time", 0.6, "--min-score", 0)
    assert r.exit_code == 0 and "(frame 8 at 0.67 s)" in r.output, r.output
    assert _outline_has(np.asarray(Image.open(tmp_path / "t.png").convert("RGB")), VIDEO_BOXES[8][0], colour(3))
    r = invoke("render", out, video, tmp_path / "x.png", "--frame", 5)
    assert r.exit_code == 1 and "frame 5" in r.output and "nearest processed: 4, 8" in r.output
    r = invoke("render", out, video, tmp_path / "x.png", "--time", 99)  # drew the last frame without a word
    assert r.exit_code == 1 and "--time 99 s: the frames of" in r.output and "are from 0.00 to " in r.output, r.output
    assert "Traceback" not in r.output
    r = invoke("render", out, tmp_path / "other.mp4", tmp_path / "x.png")
    assert r.exit_code == 1 and "no frames of it" in r.output


def test_clip_is_an_mp4_of_the_range_with_the_held_boxes(video_output, tmp_path):
    out, video = video_output
    r = invoke("render", out, video, tmp_path / "clip.mp4", "--clip", 0.25, 0.75, "--min-score", 0)
    assert r.exit_code == 0, r.output
    assert "6 frames from 0.25 s" in r.output  # frames 3..8 at 12 fps
    clip = open_video(str(tmp_path / "clip.mp4"), "pyav")
    raw = open_video(str(video)).frames(list(range(3, 9)))
    assert (clip.num_frames, clip.width, clip.height, round(clip.fps)) == (6, 96, 64, 12)
    frames = clip.frames(list(range(6))).astype(int)

    def outline_diff(k, box):  # mean change along a box's outline between the clip and the source frame
        x1, y1, x2, y2 = box[:4]
        d = np.abs(frames[k] - raw[k]).sum(axis=2)
        return float(np.concatenate([d[y1, x1:x2], d[y2, x1:x2], d[y1:y2, x1], d[y1:y2, x2]]).mean())

    assert outline_diff(0, VIDEO_BOXES[0][0]) > 60  # frame 3 holds frame 0's box
    assert outline_diff(1, VIDEO_BOXES[4][0]) > 60  # frame 4 onwards: frame 4's box
    assert outline_diff(1, VIDEO_BOXES[0][0]) < 30  # and no longer frame 0's
    assert outline_diff(5, VIDEO_BOXES[8][0]) > 60


def test_a_clip_decodes_the_masks_of_a_processed_frame_once_for_the_frames_it_holds(make_video, tmp_path,
                                                                                     monkeypatch):
    """A Mask R-CNN output's clip: the veil of a processed frame's masks is made once and drawn on each frame that
    holds its detections (each was decoded again for every frame shown: 4 times here), and each frame written is
    the one that frame drawn on its own gives, pixel for pixel."""
    from pycocotools import mask as mask_utils

    import jobs.render as render
    from jobs.query import connect
    from pipeline.output import frame_schema

    video = make_video("render12.mp4", 12, 12.0)
    src = canonical_uri(str(video))
    yy, xx = np.mgrid[:64, :96]
    rows = []
    for i, ((x1, y1, x2, y2, s, label),) in VIDEO_BOXES.items():
        row = _row(src, "video", i, i / 12.0, 96, 64, [(x1, y1, x2, y2, s, label), (5, 40, 30, 60, 0.5, 4)])
        for det, m in zip(row["detections"], ((xx - (x1 + x2) / 2) ** 2 / ((x2 - x1) / 2) ** 2
                                              + (yy - (y1 + y2) / 2) ** 2 / ((y2 - y1) / 2) ** 2 <= 1,
                                              (xx >= 5 + i) & (xx < 30) & (yy >= 40) & (yy < 60))):
            det["mask"] = {"size": [64, 96], "counts": mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))[
                "counts"].decode()}
        rows.append(row)
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=frame_schema(with_masks=True)))
    decoded, written = [], []
    columns = render.rle_columns
    monkeypatch.setattr(render, "rle_columns", lambda counts, height: decoded.append(counts) or columns(counts, height))
    monkeypatch.setattr(render, "write_video", lambda frames, path, fps: len(written.extend(frames) or written))
    r = render.render_clip(str(tmp_path / "out"), str(video), tmp_path / "clip.mp4", 0.0, 1.0)
    assert r.frames == 12 and len(written) == 12 and r.boxes == 24
    masks = [det["mask"]["counts"] for row in rows for det in row["detections"]]
    assert len(set(masks)) == 6 and sorted(decoded) == sorted(masks)  # each once
    raw = open_video(str(video)).frames(list(range(12)))
    with connect(str(tmp_path / "out")) as con:
        found = render.boxes(con, src, frames=list(VIDEO_BOXES))
    for j, frame in enumerate(written):
        alone = render.draw_boxes(raw[j], render.of_frame(found, j // 4 * 4))
        assert (frame == np.asarray(alone)).all(), j


# a 300x200 raster read as four 150x100 windows, one box in each (source pixels)
SCENE_BOXES = {0: (20, 20, 60, 50), 1: (200, 30, 240, 70), 2: (30, 130, 80, 170), 3: (160, 110, 190, 150)}


def _scene(path) -> np.ndarray:
    """Write a 3-band 300x200 GeoTIFF of noise to `path`; returns its `[3, 200, 300]` pixels."""
    import rasterio

    data = np.random.default_rng(0).integers(0, 120, (3, 200, 300), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=300, height=200, count=3, dtype="uint8", crs="EPSG:3857",
                       transform=rasterio.transform.from_origin(0, 200, 1, 1)) as ds:
        ds.write(data)
    return data


def _scene_rows(src: str) -> list[dict]:
    return [_row(src, "raster", k, None, 300, 200, [(*b, 0.9, 1)], ((k % 2) * 150, (k // 2) * 100, 150, 100))
            for k, b in SCENE_BOXES.items()]


def test_raster_region_draws_the_boxes_of_every_window_in_it(tmp_path):
    tif = tmp_path / "scene.tif"
    data = _scene(tif)
    boxes = SCENE_BOXES
    rows = _scene_rows(canonical_uri(str(tif)))
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    # a region across windows 1 and 3 (the right half)
    r = invoke("render", tmp_path / "out", tif, tmp_path / "right.png", "--region", 150, 0, 150, 200, "--min-score", 0)
    assert r.exit_code == 0 and "2 detections drawn" in r.output, r.output
    img = np.asarray(Image.open(tmp_path / "right.png").convert("RGB"))
    assert img.shape == (200, 150, 3)
    for k in (1, 3):
        x1, y1, x2, y2 = boxes[k]
        assert _outline_has(img, (x1 - 150, y1, x2 - 150, y2), colour(1))
    assert (img[80:100, 0:40] == data[:, 80:100, 150:190].transpose(1, 2, 0)).all()  # the raster's own pixels
    # the whole raster, scaled down: every window's box
    r = invoke("render", tmp_path / "out", tif, tmp_path / "all.png", "--max-side", 150, "--min-score", 0)
    assert r.exit_code == 0 and "4 detections drawn" in r.output, r.output
    assert Image.open(tmp_path / "all.png").size == (150, 100)
    r = invoke("render", tmp_path / "out", tif, tmp_path / "x.png", "--region", 400, 0, 10, 10)
    assert r.exit_code == 1 and "outside the 300x200 frame" in r.output


def test_mask_rcnn_masks_are_drawn_where_they_are_in_a_raster_region_and_scaled(tmp_path):
    """Mask R-CNN's masks (COCO RLEs over the whole raster) are veiled in their class's colour over exactly their
    pixels, in a region that shows part of them and in the whole raster scaled down; they were not drawn at all."""
    from pycocotools import mask as mask_utils

    from jobs.render import MASK_OPACITY
    from pipeline.output import frame_schema

    tif = tmp_path / "scene.tif"
    data = _scene(tif)
    src = canonical_uri(str(tif))
    yy, xx = np.mgrid[:200, :300]
    masks = [((xx - 140) / 30) ** 2 + ((yy - 60) / 20) ** 2 <= 1,  # across the windows' border at x = 150
             (xx >= 200) & (xx < 260) & (yy >= 130) & (yy < 170)]
    rows = []
    for k, (m, label) in enumerate(zip(masks, (1, 2))):
        ys, xs = np.nonzero(m)
        row = _row(src, "raster", k, None, 300, 200, [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.9, label)],
                   (k * 150, 0, 150, 200))
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        row["detections"][0]["mask"] = {"size": [200, 300], "counts": rle["counts"].decode()}
        rows.append(row)
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=frame_schema(with_masks=True)))
    raw = data.transpose(1, 2, 0).astype(float)

    def veiled(rgb):
        return np.round(raw * (1 - MASK_OPACITY / 255) + np.array(rgb) * MASK_OPACITY / 255)

    r = invoke("render", tmp_path / "out", tif, tmp_path / "right.png", "--region", 150, 0, 150, 200, "--min-score", 0)
    assert r.exit_code == 0 and "2 detections drawn" in r.output, r.output
    img = np.asarray(Image.open(tmp_path / "right.png").convert("RGB")).astype(float)
    box_free = np.ones((200, 150), bool)  # away from the boxes' outlines
    for m in masks:
        ys, xs = np.nonzero(m)
        x1, y1, x2, y2 = xs.min() - 150, ys.min(), xs.max() + 1 - 150, ys.max() + 1
        for a, b, c, d in ((x1, x2, y1, y1), (x1, x2, y2, y2), (x1, x1, y1, y2), (x2, x2, y1, y2)):
            if b + 2 > 0:
                box_free[max(c - 1, 0):d + 2, max(a - 1, 0):b + 2] = False
    for m, label in zip(masks, (1, 2)):
        inside = m[:, 150:] & box_free
        assert inside.sum() > 100
        assert np.abs(img[inside] - veiled(colour(label))[:, 150:][inside]).max() <= 1
    untouched = ~(masks[0] | masks[1])[:, 150:] & box_free
    assert (img[untouched] == raw[:, 150:][untouched]).all()
    # the whole raster at half size: the veil covers the masks' places there too
    r = invoke("render", tmp_path / "out", tif, tmp_path / "half.png", "--max-side", 150, "--min-score", 0)
    assert r.exit_code == 0, r.output
    half = np.asarray(Image.open(tmp_path / "half.png").convert("RGB")).astype(float)
    for y, x in ((70, 105), (75, 115), (80, 125)):  # inside the second mask, away from its box
        shrunk = raw[2 * y:2 * y + 2, 2 * x:2 * x + 2].reshape(-1, 3).mean(0)  # rasterio's average of 2x2
        expected = shrunk * (1 - MASK_OPACITY / 255) + np.array(colour(2)) * MASK_OPACITY / 255
        assert np.abs(half[y, x] - expected).max() <= 2
    assert np.abs(half[20, 10] - raw[40:42, 20:22].reshape(-1, 3).mean(0)).max() <= 1  # no mask there


def test_render_and_report_read_s3_outputs_and_sources_with_the_storage_flags(make_video, s3, tmp_path):
    fs, endpoint = s3
    video = make_video("render12.mp4", 12, 12.0)
    fs.put(str(video), "test/media/v.mp4")
    _scene(tmp_path / "scene.tif")
    fs.put(str(tmp_path / "scene.tif"), "test/media/scene.tif")
    src = "s3://test/media/v.mp4"
    rows = [_row(src, "video", i, i / 12.0, 96, 64, dets) for i, dets in VIDEO_BOXES.items()]
    rows += _scene_rows("s3://test/media/scene.tif")
    out = Output("s3://test/out", {"s3": {"endpoint_url": endpoint}})
    out.write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    r = invoke("render", "s3://test/out", src, tmp_path / "f8.png", "--frame", 8, "--min-score", 0,
               "--endpoint-url", endpoint)
    assert r.exit_code == 0, r.output
    assert _outline_has(np.asarray(Image.open(tmp_path / "f8.png").convert("RGB")), VIDEO_BOXES[8][0], colour(3))
    r = invoke("render", "s3://test/out", "s3://test/media/scene.tif", tmp_path / "left.png", "--region", 0, 0, 150,
               200, "--min-score", 0, "--endpoint-url", endpoint)  # the raster by byte ranges
    assert r.exit_code == 0 and "2 detections drawn" in r.output, r.output
    assert _outline_has(np.asarray(Image.open(tmp_path / "left.png").convert("RGB")), SCENE_BOXES[2], colour(1))
    r = invoke("report", "s3://test/out", "-o", tmp_path / "r.html", "--endpoint-url", endpoint)
    assert r.exit_code == 0 and "7 frames, 7 detections, 0 errors" in r.output, r.output
    html = (tmp_path / "r.html").read_text()
    assert html.count("<figcaption>frame ") == 3 and "not drawn" not in html  # video and raster read from S3
    assert "every box, across windows" in html and "detection density" in html
    r = invoke("render", "s3://test/nope", src, tmp_path / "x.png", "--endpoint-url", endpoint)
    assert r.exit_code == 1 and "s3://test/nope: no frames/ directory" in r.output and "Traceback" not in r.output


def test_a_clip_of_a_variable_frame_rate_video_takes_the_frames_of_its_time_range(tmp_path):
    """Frames were picked by time x average rate: on a camera that drops frames, --clip 1.0 1.6 held other
    frames than those shown at those times."""
    from conftest import index_frame, read_index
    from test_decode import _encode

    pts = [0]
    for i in range(1, 40):
        pts.append(pts[-1] + (10 if ((i - 1) // 10) % 2 == 0 else 100))  # bursts 10 ms apart, gaps of 100 ms
    video = _encode(tmp_path / "vfr.mp4", [index_frame(i) for i in range(40)], pts_ms=pts)
    src = canonical_uri(video)
    rows = [_row(src, "video", i, pts[i] / 1000, 96, 64, []) for i in (0, 10, 20, 30)]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    want = [i for i, t in enumerate(pts) if 1.0 <= t / 1000 < 1.6]
    for backend in ("decord", "pyav"):
        dest = tmp_path / f"clip-{backend}.mp4"
        r = invoke("render", tmp_path / "out", video, dest, "--clip", 1.0, 1.6, "--video-backend", backend)
        assert r.exit_code == 0 and f"{len(want)} frames from {pts[want[0]] / 1000:.2f} s" in r.output, r.output
        clip = open_video(str(dest), "pyav")
        assert [read_index(f) for f in clip.frames(list(range(clip.num_frames)))] == want, backend


def test_an_image_gone_or_damaged_since_the_job_is_one_line_naming_it(tmp_path):
    """`fpn render` of an image damaged since the job printed PIL's traceback ("UnidentifiedImageError: cannot
    identify image file <...LocalFileOpener object at 0x...>"), of one deleted "Error: [Errno 2] No such file ..."."""
    src = tmp_path / "snap.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(src)
    rows = [_row(canonical_uri(str(src)), "image", 0, None, 60, 40, [(5, 5, 20, 20, 0.9, 1)])]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    src.write_bytes(b"not a png any more")
    r = invoke("render", tmp_path / "out", src, tmp_path / "pic.png")
    assert r.exit_code == 1 and r.output == f"Error: {src}: not an image format PIL reads\n", r.output
    src.unlink()
    r = invoke("render", tmp_path / "out", src, tmp_path / "pic.png")
    assert r.exit_code == 1 and r.output == f"Error: {src} does not exist\n", r.output


def test_a_source_changed_since_the_job_read_it_is_said(make_video, tmp_path):
    """Its boxes are of the version the job read: drawn on other pixels without a word before."""
    import shutil

    video = tmp_path / "v.mp4"
    shutil.copy(make_video("render12.mp4", 12, 12.0), video)
    src, size = canonical_uri(str(video)), video.stat().st_size
    rows = [_row(src, "video", i, i / 12.0, 96, 64, dets) for i, dets in VIDEO_BOXES.items()]
    out = Output(str(tmp_path / "out"))
    out.write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    out.write_sources({src: {"size": size, "version": None, "first_run": 1}})
    r = invoke("render", tmp_path / "out", video, tmp_path / "same.png", "--frame", 4)
    assert r.exit_code == 0 and "changed since" not in r.output, r.output
    shutil.copy(make_video("other20.mp4", 20, 12.0), video)  # another video under the same name
    r = invoke("render", tmp_path / "out", video, tmp_path / "other.png", "--frame", 4)
    assert r.exit_code == 0 and "1 detections drawn" in r.output, r.output
    assert (f"warning: {video} changed since the job read it (size {size} -> {video.stat().st_size} bytes): the "
            "boxes drawn are of the version it read") in r.output
    # an image replaced by a smaller one: one line saying so (PIL: "box can't exceed original image size")
    image = tmp_path / "snap.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    Output(str(tmp_path / "img")).write_frames(pa.Table.from_pylist(
        [_row(canonical_uri(str(image)), "image", 0, None, 96, 64, [(10, 10, 40, 30, 0.9, 1)])], schema=FRAME_SCHEMA))
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    r = invoke("render", tmp_path / "img", image, tmp_path / "small.png")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"Error: {image} is 50x40 pixels now, smaller than when the job read it: it changed since" in r.output


def test_a_video_damaged_since_the_job_is_one_line_naming_it_without_the_decoders_log(make_video, tmp_path, capfd):
    """`fpn render` of a video cut short since the job (its index gone) was a traceback ending in decord's
    "RuntimeError: Error reading SRC...", under what decord and FFmpeg print on the standard error from C
    ("[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] moov atom not found", "[...] .../video_reader.cc:83: ERROR opening: ...")."""
    import shutil

    video = tmp_path / "v.mp4"
    shutil.copy(make_video("render12.mp4", 12, 12.0), video)
    rows = [_row(canonical_uri(str(video)), "video", i, i / 12.0, 96, 64, dets) for i, dets in VIDEO_BOXES.items()]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    video.write_bytes(video.read_bytes()[:video.stat().st_size // 2])
    capfd.readouterr()
    for args in ((tmp_path / "pic.png",), (tmp_path / "clip.mp4", "--clip", 0, 1)):
        r = invoke("render", tmp_path / "out", video, *args)
        assert (r.exit_code, r.output) == (1, f"Error: {video}: the video cannot be decoded (a damaged or truncated "
                                              "file?)\n"), r.output
    err = capfd.readouterr().err
    assert "moov atom" not in err and "video_reader" not in err, err


def test_only_the_decoders_lines_are_kept_off_the_standard_error_while_they_decode(capfd, caplog):
    """What decord and FFmpeg print from C goes to the debug log; any other line written on fd 2 meanwhile (a
    warning of our own, a library's) is still written out."""
    import logging
    import os

    from jobs.render import _native_stderr_logged

    with caplog.at_level(logging.DEBUG, logger="jobs.render"), _native_stderr_logged("/v.mp4"):
        os.write(2, b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55b5e578b1c0] moov atom not found\n"
                    b"[17:32:52] /github/workspace/src/video/video_reader.cc:83: ERROR opening: /v.mp4\n"
                    b"WARNING pipeline.x: a line of ours\n")
    assert capfd.readouterr().err == "WARNING pipeline.x: a line of ours\n"
    assert "moov atom not found" in caplog.text and "video_reader.cc:83" in caplog.text
