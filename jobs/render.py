"""Draw detections from an output onto the pixels they were found in: any frame of any source.

- a video frame, by index or by time (the processed frame nearest that time), decoded from the source with
  the pipeline's own decoders (`pipeline.decode.read_video`: a remote video by byte ranges, as the job read it);
- an image, or a region of a raster with the boxes of every window that touches it: rasterio reads only
  that region, decimated to at most `max_side` pixels, so a huge raster costs what its thumbnail costs;
- a short annotated MP4 of a video time range (`render_clip`, encoded with PyAV), each frame showing the
  boxes of the latest processed frame at or before it (a sampled job has no boxes for the frames between).

Detections come from the output's read-only DuckDB views (`jobs.query.connect`), as numpy columns; pixels
come from the source. `fpn report` draws its frame strips and thumbnails with the same functions.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from fpn_model.rle import rle_columns
from pipeline.decode import read_video
from pipeline.raster import open_raster, palette_of, read_palette, valid_values
from pipeline.output import Output
from pipeline.storage import canonical_uri, check_file_destination, filesystem, translate_error

from .query import connect

__all__ = ["Region", "Rendered", "render_frame", "render_clip", "write_video", "source_kind", "unnested", "boxes",
           "read_pixels", "read_video_frames", "draw_boxes", "mask_veil", "of_frame", "colour"]

log = logging.getLogger(__name__)

# one colour per class label (matplotlib's tab10, as the report's charts use)
_PICTURES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")  # what render_frame writes (.tif: GeoTIFF)
MASK_OPACITY = 110  # of 255: a mask's veil over the pixels
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour(label: int) -> tuple[int, int, int]:
    return _PALETTE[int(label) % len(_PALETTE)]


@dataclass(frozen=True)
class Region:
    """A rectangle of a source frame, in its pixels."""

    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1 or self.x < 0 or self.y < 0:
            raise ValueError(f"region {self.x} {self.y} {self.width} {self.height}: x, y must be >= 0 and "
                             "width, height >= 1")

    def clip(self, width: int, height: int) -> "Region":
        if self.x >= width or self.y >= height:
            raise ValueError(f"region starts at ({self.x}, {self.y}), outside the {width}x{height} frame")
        return Region(self.x, self.y, min(self.width, width - self.x), min(self.height, height - self.y))


@dataclass(frozen=True)
class Rendered:
    """What `render_frame`/`render_clip` wrote: the file, the frame drawn (video) and how many boxes."""

    path: Path
    boxes: int
    frame_index: int | None = None
    pts_s: float | None = None
    frames: int = 1
    changed: str | None = None  # how the source differs from the version the job read (its boxes are of that)


def source_changed(out: Output, source: str, storage_options: dict | None = None) -> str | None:
    """How `source` differs now (size, version) from the version the job that wrote `out` read, or None."""
    from pipeline.sources import expand_inputs

    recorded = out.read_sources().get(canonical_uri(source))
    if not recorded:
        return None
    return Output.source_change(recorded, expand_inputs([source], storage_options)[0].size_and_version())


# -- detections ---------------------------------------------------------------------------------------
def source_kind(con, source: str, output: str) -> tuple[str, int, int]:
    """(kind, width, height) of `source` (canonical) in the output; LookupError when it has no frames there."""
    row = con.execute("SELECT any_value(source_kind), max(width), max(height) FROM frames WHERE source = ?",
                      [source]).fetchone()
    if row[0] is None:
        raise LookupError(f"{source}: no frames of it in {output}")
    return row[0], int(row[1]), int(row[2])


def unnested(*columns: str, where: str = "true") -> str:
    """SQL for the output's detections as rows `(*columns, d)` (`d`: one detection struct) of the frames
    matching `where`. Frames are filtered before they are unnested: DuckDB does not push a filter on a frame
    column through the `detections` view's lateral join (a source's boxes took 15-20 s at 10^6 frames
    through the view, 0.2 s this way)."""
    return f"(SELECT {', '.join([*columns, 'unnest(detections) AS d'])} FROM frames WHERE {where})"


def boxes(con, source: str, *, frames: list[int] | None = None, region: Region | None = None,
          min_score: float = 0.0, limit: int | None = None) -> dict[str, np.ndarray]:
    """Detections of `source` as numpy columns frame_index, x1, y1, x2, y2, score, label (best first), and with a
    Mask R-CNN's, mask (its COCO RLE's counts) and mask_height: those of the given `frames` (one query for all), or
    of every row (raster windows) whose boxes touch `region`; at most `limit` of them."""
    rows, args = ["source = ?"], [source]
    if frames is not None:
        rows.append("list_contains(?::BIGINT[], frame_index)")
        args.append([int(i) for i in frames])
    dets = ["d.score >= ?"]
    args.append(min_score)
    if region is not None:
        dets.append("d.x2 >= ? AND d.x1 <= ? AND d.y2 >= ? AND d.y1 <= ?")
        args += [region.x, region.x + region.width, region.y, region.y + region.height]
    (detection,) = con.execute("SELECT column_type FROM (DESCRIBE frames) WHERE column_name = 'detections'").fetchone()
    masks = ", d.mask.counts AS mask, d.mask.size[1] AS mask_height" if " mask STRUCT(" in detection else ""
    sql = f"""SELECT frame_index, d.x1 AS x1, d.y1 AS y1, d.x2 AS x2, d.y2 AS y2, d.score AS score, d.label AS label
                     {masks}
              FROM {unnested("frame_index", where=' AND '.join(rows))} WHERE {' AND '.join(dets)}
              ORDER BY score DESC"""
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return con.execute(sql, args).fetchnumpy()


def _video_frame(con, source: str, output: str, frame_index: int | None, time_s: float | None) -> tuple[int, float]:
    """The processed frame asked for: `frame_index` exactly, the one nearest `time_s`, or else the first."""
    if frame_index is not None:
        row = con.execute("SELECT frame_index, pts_s FROM frames WHERE source = ? AND frame_index = ?",
                          [source, frame_index]).fetchone()
        if row is None:
            near = con.execute("SELECT frame_index FROM frames WHERE source = ? ORDER BY abs(frame_index - ?), "
                               "frame_index LIMIT 2", [source, frame_index]).fetchall()
            raise LookupError(f"frame {frame_index} of {source} was not processed into {output} (nearest processed: "
                              f"{', '.join(str(r[0]) for r in sorted(near))}); pass one of those, or --time")
        return int(row[0]), float(row[1])
    if time_s is not None:
        # past either end of the processed frames by more than their spacing: not a time of the video, or not one
        # the output holds (--time 99 on a 10 s clip drew its last frame without a word, where --frame 999 failed)
        first, last, spacing = con.execute(
            "SELECT min(pts_s), max(pts_s), coalesce(median(gap), 0) FROM (SELECT pts_s, pts_s - lag(pts_s) OVER "
            "(ORDER BY pts_s) AS gap FROM frames WHERE source = ?)", [source]).fetchone()
        if not first - spacing <= time_s <= last + spacing:
            raise LookupError(f"--time {time_s:g} s: the frames of {source} in {output} are from {first:.2f} to "
                              f"{last:.2f} s")
        row = con.execute("SELECT frame_index, pts_s FROM frames WHERE source = ? ORDER BY abs(pts_s - ?), "
                          "frame_index LIMIT 1", [source, time_s]).fetchone()
    else:
        row = con.execute("SELECT frame_index, pts_s FROM frames WHERE source = ? ORDER BY frame_index LIMIT 1",
                          [source]).fetchone()
    return int(row[0]), float(row[1])


# -- pixels ---------------------------------------------------------------------------------------------
def read_video_frames(source: str, indices: list[int], *, storage_options: dict | None = None,
                      video_backend: str = "decord") -> np.ndarray:
    """`[N, H, W, 3]` uint8 frames of a video at sorted `indices`, decoded as the pipeline decodes them; a video
    that cannot be decoded is one line naming it (`_decoding`)."""
    with _decoding(source), read_video(source, storage_options, video_backend) as v:
        return v.frames(indices)


@contextlib.contextmanager
def _decoding(source: str) -> Iterator[None]:
    """Around a video decoder's calls for a picture of `source` (`fpn render`, `fpn report`'s strips):

    - what decord and FFmpeg print from C on the process's standard error (fd 2: "[mov,mp4,m4a,3gp,3g2,mj2 @
      0x...] moov atom not found", "[17:32:52] .../video_reader.cc:83: ERROR opening: ...") stays off the user's
      terminal, where it stood above the command's own lines, and is logged at debug level (`fpn -vv`); the
      command's own errors come once fd 2 is back;
    - the decoders' own errors (decord's "Error reading SRC..." or its C++ checks' text, PyAV's) are one line
      naming `source` (ValueError): `fpn render` of a damaged video was a traceback, the report's strip showed
      decord's text. A file gone or forbidden is left as it is (an OSError: "SRC does not exist" once
      `translate_error` says it).

    One thread at a time: fd 2 is the process's."""
    try:
        with _native_stderr_logged(source):
            yield
    except Exception as e:
        if isinstance(e, OSError) or not (isinstance(e, RuntimeError) or type(e).__module__.partition(".")[0] in
                                          ("decord", "av")):
            raise
        raise ValueError(f"{source}: the video cannot be decoded (a damaged or truncated file?)") from e


# a line the native decoders print: FFmpeg's "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55b5e578b1c0] moov atom not found",
# decord's "[17:32:52] /github/workspace/src/video/video_reader.cc:83: ERROR opening: ..."
_DECODER_LINE = re.compile(r"\[[^]@]+ @ 0x[0-9a-f]+\] |\[\d\d:\d\d:\d\d\] \S+:\d+: ")


@contextlib.contextmanager
def _native_stderr_logged(source: str) -> Iterator[None]:
    """fd 2 into a temporary file while the block runs (`_decoding`); after it, the decoders' lines are logged at
    debug level and any other line (a Python warning, a log record) is written to the standard error as it was."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines()
            if theirs := [ln for ln in lines if _DECODER_LINE.match(ln)]:
                log.debug("%s: the video decoder printed: %s", source, "\n".join(theirs))
            if ours := [ln for ln in lines if ln.strip() and not _DECODER_LINE.match(ln)]:
                sys.stderr.write("\n".join(ours) + "\n")


def raster_bands(out: Output, source: str) -> list[int] | None:
    """The bands of raster `source` the job that wrote `out` fed its model, as its record says (None: not
    recorded): a picture of what the model saw, not of the file's first three bands (NIR first: false colour)."""
    job = out.read_job(missing_ok=True)
    return ((job.get("rasters") or {}).get("georeferenced") or {}).get(canonical_uri(source), {}).get("bands")


def job_video_backend(out: Output) -> str:
    """The video backend the job that wrote `out` decoded with (decord when it does not say)."""
    job = out.read_job(missing_ok=True)
    return (job.get("spec") or {}).get("video_backend") or "decord"


def _fit(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    s = 1.0 if not max_side else min(1.0, max_side / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def read_pixels(source: str, kind: str, *, region: Region, max_side: int | None = None,
                storage_options: dict | None = None, bands: list[int] | None = None) -> np.ndarray:
    """`[h, w, 3]` uint8 pixels of `region` of an image or raster, at most `max_side` pixels a side. Rasters
    are read with rasterio, remote ones by byte ranges (`pipeline.raster.open_raster`): only the region,
    decimated on read (a cloud-optimised GeoTIFF's overviews answer a thumbnail), `bands` (the ones the job fed
    the model: `raster_bands`) or the first three; images with PIL."""
    w, h = _fit(region.width, region.height, max_side)
    if kind == "raster":
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        window = Window(region.x, region.y, region.width, region.height)
        with open_raster(source, storage_options) as ds:
            _within(source, region, ds.width, ds.height)
            if (palette := palette_of(ds)) is not None:  # colours, not index values
                return _display_rgb(read_palette(ds, 1, palette, window, (h, w), downsampling=True))
            chosen = list(bands) if bands and max(bands) <= ds.count else list(range(1, ds.count + 1))
            data = valid_values(ds.read(chosen, window=window, out_shape=(len(chosen), h, w),
                                        resampling=Resampling.average, masked=True))
        return _display_rgb(data)
    fs, path = filesystem(source, storage_options)
    try:
        with fs.open(path, "rb") as f, Image.open(f) as im:
            full = im.size
            _within(source, region, *full)
            im.draft("RGB", (w, h))  # JPEG: decode at a reduced scale when that is enough
            sx, sy = im.size[0] / full[0], im.size[1] / full[1]
            box = (region.x * sx, region.y * sy, (region.x + region.width) * sx, (region.y + region.height) * sy)
            return np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR, box=box))
    except UnidentifiedImageError:  # PIL names the file object it was given, an address, not the file
        raise ValueError(f"{source}: not an image format PIL reads") from None
    except OSError as e:  # gone, forbidden, unreachable: "SOURCE does not exist", not "[Errno 2] ..."
        raise translate_error(e, source) from e


def _within(source: str, region: Region, width: int, height: int) -> None:
    """ValueError, in one line, when `region` (inside the frame as the job read it) lies outside `source` as it is
    now: the source was replaced by a smaller one since (PIL said "box can't exceed original image size")."""
    if region.x + region.width > width or region.y + region.height > height:
        raise ValueError(f"{source} is {width}x{height} pixels now, smaller than when the job read it: it changed "
                         "since, and its boxes are of the old version (process it into a new output)")


def _display_rgb(data: np.ma.MaskedArray) -> np.ndarray:
    """`[bands, h, w]` raster values (nodata masked) -> `[h, w, 3]` uint8 for a person to look at: the first three
    bands (one band as grey), 8-bit kept as is, other types stretched from the 2nd to 98th percentile of their valid
    values; nodata black. A picture only: the model's input is made by the pipeline's raster reader, with the
    job's own band and stretch settings."""
    data = data[:3] if data.shape[0] >= 3 else np.ma.concatenate([data[:1]] * 3)
    if data.dtype != np.uint8:
        valid = data.compressed()
        lo, hi = np.percentile(valid, [2, 98]) if valid.size else (0.0, 1.0)
        scaled = (np.ma.filled(data.astype(np.float32), lo) - lo) * (255.0 / max(float(hi - lo), 1e-9))
        data = np.ma.MaskedArray(np.clip(scaled, 0, 255).astype(np.uint8), np.ma.getmaskarray(data))
    return np.ascontiguousarray(np.ma.filled(data, 0).transpose(1, 2, 0))


def of_frame(dets: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    """The detections of one frame among `boxes(..., frames=[...])`."""
    keep = dets["frame_index"] == index
    return {c: v[keep] for c, v in dets.items()}


def draw_boxes(image: np.ndarray | Image.Image, dets: dict[str, np.ndarray], *, scale: float = 1.0,
               offset: tuple[float, float] = (0.0, 0.0), width: int | None = None,
               veil: Image.Image | None = None) -> Image.Image:
    """`image` with `dets` (source-frame pixels) drawn as rectangles coloured by class, and their masks, if they
    have any, as a veil of the same colour: a box at (x, y) lands at ((x - offset_x) * scale, (y - offset_y) *
    scale). `veil`: the masks' layer `mask_veil` made of these `dets` for a canvas of this size at this scale
    and offset, drawn instead of making it again (a clip reuses the one of the processed frame it holds)."""
    canvas = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(image)
    if veil is None:
        veil = mask_veil(canvas.size, dets, scale, offset)
    if veil is not None:
        canvas = Image.alpha_composite(canvas.convert("RGBA"), veil).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = width or max(1, round(max(canvas.size) / 400))
    ox, oy = offset
    for x1, y1, x2, y2, label in zip(dets["x1"], dets["y1"], dets["x2"], dets["y2"], dets["label"]):
        draw.rectangle([(x1 - ox) * scale, (y1 - oy) * scale, (x2 - ox) * scale, (y2 - oy) * scale],
                       outline=colour(label), width=width)
    return canvas


def mask_veil(size: tuple[int, int], dets: dict[str, np.ndarray], scale: float = 1.0,
              offset: tuple[float, float] = (0.0, 0.0)) -> Image.Image | None:
    """The RGBA layer `draw_boxes` lays over a canvas of `size` (width, height): each detection's mask in its
    class's colour at `MASK_OPACITY`, elsewhere clear; None when `dets` have no masks. The RLE's runs
    (`rle_columns`) are painted where they land on the canvas, clipped to it, with no array of the whole frame."""
    if "mask" not in dets or not len(dets["mask"]):
        return None
    width, height = size
    veil = np.zeros((height, width, 4), np.uint8)
    ox, oy = offset
    for counts, mask_height, label in zip(dets["mask"], dets["mask_height"], dets["label"]):
        if counts is None:
            continue
        cols, top, bottom = rle_columns(counts, int(mask_height))
        x0 = np.floor((cols - ox) * scale).astype(np.int64)
        x1 = np.maximum(np.floor((cols + 1 - ox) * scale).astype(np.int64), x0 + 1)
        y0 = np.floor((top - oy) * scale).astype(np.int64)
        y1 = np.maximum(np.ceil((bottom - oy) * scale).astype(np.int64), y0 + 1)
        rgba = (*colour(int(label)), MASK_OPACITY)
        for a, b, c, d in zip(np.clip(x0, 0, width), np.clip(x1, 0, width), np.clip(y0, 0, height),
                              np.clip(y1, 0, height)):
            veil[c:d, a:b] = rgba
    return Image.fromarray(veil, "RGBA")


# -- commands -------------------------------------------------------------------------------------------
def render_frame(output: str, source: str, dest: str | Path, *, frame_index: int | None = None,
                 time_s: float | None = None, region: Region | None = None, min_score: float = 0.0,
                 max_side: int | None = None, storage_options: dict | None = None,
                 video_backend: str | None = None) -> Rendered:
    """Draw the detections (score >= `min_score`) of one frame of `source` from `output` into the image `dest`.

    Video: frame `frame_index`, or the processed frame nearest `time_s`, or the first processed one. Image or
    raster: `region` (default: all of it) with the boxes of every window touching it. `max_side` bounds the
    picture (default: full resolution for a region or an image, 4096 px for a whole raster). `video_backend`:
    default, the job's."""
    check_file_destination(str(dest), "frame.png")
    if Path(dest).suffix.lower() not in _PICTURES:
        raise ValueError(f"{dest}: name the picture with an image extension ({', '.join(_PICTURES[:4])}, ...)")
    if frame_index is not None and time_s is not None:
        raise ValueError("give a frame index or a time, not both")
    src = canonical_uri(source)
    out = Output.for_reading(output, storage_options)
    with connect(out) as con:
        kind, width, height = source_kind(con, src, output)
        region = (region or Region(0, 0, width, height)).clip(width, height)
        if kind == "video":
            index, pts = _video_frame(con, src, output, frame_index, time_s)
            dets = boxes(con, src, frames=[index], region=region, min_score=min_score)  # those the picture shows
        else:
            if frame_index is not None or time_s is not None:
                raise ValueError(f"{source} is {'an' if kind == 'image' else 'a'} {kind}: --frame and --time are "
                                 "for videos (use --region for part of it)")
            index, pts = None, None
            dets = boxes(con, src, region=region, min_score=min_score)
    if max_side is None and kind == "raster" and (region.width, region.height) == (width, height):
        max_side = 4096
    if kind == "video":
        pixels = read_video_frames(source, [index], storage_options=storage_options,
                                   video_backend=video_backend or job_video_backend(out))[0]
        pixels = pixels[region.y:region.y + region.height, region.x:region.x + region.width]
        w, h = _fit(region.width, region.height, max_side)
        picture = Image.fromarray(pixels).resize((w, h)) if (w, h) != (region.width, region.height) else pixels
    else:
        picture = read_pixels(source, kind, region=region, max_side=max_side, storage_options=storage_options,
                              bands=raster_bands(out, source) if kind == "raster" else None)
    scale = _fit(region.width, region.height, max_side)[0] / region.width
    canvas = draw_boxes(picture, dets, scale=scale, offset=(region.x, region.y))
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    if Path(dest).suffix.lower() in (".tif", ".tiff"):
        _save_geotiff(canvas, source, kind, region, dest, storage_options)
    else:
        canvas.save(dest)
    return Rendered(Path(dest), len(dets["score"]), index, pts, changed=source_changed(out, source, storage_options))


def _save_geotiff(canvas: Image.Image, source: str, kind: str, region: Region, dest: str | Path,
                  storage_options: dict | None) -> None:
    """The drawing as a GeoTIFF over the raster's own CRS: the region's place on the Earth, at the picture's
    resolution (a scaled-down overview of a whole scene opens in QGIS beside the scene and the exported boxes)."""
    import rasterio
    from rasterio.transform import Affine

    if kind != "raster":
        raise ValueError(f"{source} is {'an' if kind == 'image' else 'a'} {kind}: a GeoTIFF needs a georeferenced "
                         "raster (write .png)")
    with open_raster(source, storage_options) as ds:
        crs, transform = ds.crs, ds.transform
    if crs is None or transform.is_identity:
        raise ValueError(f"{source} has no georeference: write .png")
    w, h = canvas.size
    at = transform * Affine.translation(region.x, region.y) * Affine.scale(region.width / w, region.height / h)
    pixels = np.asarray(canvas).transpose(2, 0, 1)
    with rasterio.open(dest, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs, transform=at,
                       compress="deflate", photometric="RGB") as out:
        out.write(pixels)


def render_clip(output: str, source: str, dest: str | Path, start_s: float, end_s: float, *, min_score: float = 0.0,
                storage_options: dict | None = None, video_backend: str | None = None, chunk: int = 32) -> Rendered:
    """An MP4 of `source`'s frames whose times lie from `start_s` to `end_s`, at the video's average frame rate,
    each frame with the boxes of the latest processed frame at or before it (frames before the first processed
    one have none); a Mask R-CNN's masks of a processed frame are decoded into their veil once, for all the frames
    that hold it. `video_backend`: default, the job's."""
    if end_s <= start_s:
        raise ValueError(f"--clip {start_s:g} {end_s:g}: the end must be after the start")
    check_file_destination(str(dest), "clip.mp4")
    if Path(dest).suffix.lower() != ".mp4":
        raise ValueError(f"{dest}: a clip is written as MP4 (name it .mp4)")
    src = canonical_uri(source)
    out = Output.for_reading(output, storage_options)
    with connect(out) as con:
        kind, _, _ = source_kind(con, src, output)
        if kind != "video":
            raise ValueError(f"{source} is {'an' if kind == 'image' else 'a'} {kind}: --clip is for videos")
        processed = con.execute("SELECT frame_index FROM frames WHERE source = ? AND pts_s < ? ORDER BY frame_index "
                                "DESC LIMIT 1", [src, start_s]).fetchall()
        inside = con.execute("SELECT frame_index FROM frames WHERE source = ? AND pts_s >= ? AND pts_s < ? "
                             "ORDER BY frame_index", [src, start_s, end_s]).fetchnumpy()["frame_index"]
        keys = [int(r[0]) for r in processed] + [int(i) for i in inside]
        found = boxes(con, src, frames=keys, min_score=min_score)
    dets = {k: of_frame(found, k) for k in keys}
    drawn = 0
    backend = video_backend or job_video_backend(out)
    with contextlib.ExitStack() as stack:
        with _decoding(source):
            v = stack.enter_context(read_video(source, storage_options, backend))
            times = v.timestamps(list(range(v.num_frames)))  # a variable rate's own times
        first, stop = (int(np.searchsorted(times, t - 1e-6)) for t in (start_s, end_s))
        if first >= stop:
            raise ValueError(f"--clip {start_s:g} {end_s:g}: no frame of {source} in that range "
                             f"({v.num_frames} frames at {v.fps:g} fps)")

        def annotated() -> Iterator[np.ndarray]:
            nonlocal drawn
            held = None  # (processed frame, canvas size, its masks' veil): made once, drawn on every frame it holds
            for i in range(first, stop, chunk):
                idx = list(range(i, min(stop, i + chunk)))
                with _decoding(source):
                    frames = v.frames(idx)
                for j, frame in zip(idx, frames):
                    k = bisect.bisect_right(keys, j)
                    d = dets[keys[k - 1]] if k else {c: np.empty(0) for c in ("x1", "y1", "x2", "y2", "label")}
                    size = (frame.shape[1], frame.shape[0])
                    if held is None or held[:2] != (k, size):
                        held = (k, size, mask_veil(size, d))
                    drawn += len(d["x1"])
                    yield np.asarray(draw_boxes(frame, d, veil=held[2]))

        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        n = write_video(annotated(), dest, v.fps)
    return Rendered(Path(dest), drawn, first, float(times[first]), frames=n,
                    changed=source_changed(out, source, storage_options))


def write_video(frames: Iterable[np.ndarray], path: str | Path, fps: float, *, codec: str = "libx264",
                gop: int | None = None) -> int:
    """Encode `[H, W, 3]` uint8 frames to `path` (PyAV, constant frame rate, cropped to even sides as yuv420p
    needs); returns the frame count. `gop`: a keyframe every `gop` frames exactly (x264 only; default: x264's
    own choice, at most every 250 frames)."""
    import av

    n = 0
    opts = {"preset": "veryfast", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"} if gop else {}
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=opts)
        st.pix_fmt = "yuv420p"
        for frame in frames:
            if n == 0:
                st.height, st.width = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2
            frame = np.ascontiguousarray(frame[:st.height, :st.width])
            for packet in st.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(packet)
            n += 1
        for packet in st.encode():
            c.mux(packet)
    return n
