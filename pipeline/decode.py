"""Work unit -> batches of uint8 HWC frames, sampled inside the decoder.

Sampling (every Nth frame, a target fps, a time range) is decided from frame indices before
decoding, so only sampled frames leave the decoder, and a resumed job skips frames already written
before decoding them. Frames stay uint8; conversion to float happens on the model's device.

Video goes through a small `VideoDecoder` interface: decord by default (random access by index,
timestamps from the container), PyAV as the second backend. Images are read with PIL; rasters
window by window with rasterio, as `pipeline.raster` plans them (bands, stretch, resampling, nodata), by byte
ranges when remote. Images too large for PIL (beyond its decompression-bomb limit) take the raster path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np

# GDAL (rasterio) must be loaded before decord: decord's bundled libraries, loaded first, break
# GDAL's PNG reader in the same process ("libpng: bad parameters to zlib"). Import order fixes it.
import rasterio  # noqa: F401,E402  isort: skip

from .output import frame_id
from .raster import RasterPlan, open_raster, open_rasters, read_window
from .sources import WorkUnit, media_kind
from .storage import filesystem, local_copy, translate_error

__all__ = ["Sampling", "sample_indices", "probe", "decode_unit", "VideoDecoder", "open_video", "MediaInfo"]


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video are processed. Images and rasters are always processed."""

    every_n: int = 1
    fps: float | None = None  # target rate; frames are picked so that about `fps` per second remain
    start_s: float | None = None
    end_s: float | None = None

    def __post_init__(self) -> None:
        if self.every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {self.every_n}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")


def sample_indices(num_frames: int, video_fps: float, s: Sampling, start: int = 0, stop: int | None = None) -> list[int]:
    """Sampled frame indices within [start, stop) of a video; a pure function of the whole video, so
    segments agree at their borders."""
    stop = num_frames if stop is None else min(stop, num_frames)
    out = []
    for i in range(start, stop):
        t = i / video_fps if video_fps > 0 else 0.0
        if s.start_s is not None and t < s.start_s - 1e-9:
            continue
        if s.end_s is not None and t >= s.end_s - 1e-9:
            continue
        if s.fps is not None and video_fps > 0:
            step = video_fps / s.fps
            if step > 1 and math.floor(i / step) == math.floor((i - 1) / step) and i > 0:
                continue
        if i % s.every_n:
            continue
        out.append(i)
    return out


@dataclass(frozen=True)
class MediaInfo:
    kind: str
    width: int
    height: int
    num_frames: int = 1
    fps: float = 0.0


class VideoDecoder(Protocol):
    """What the pipeline needs of a video backend."""

    num_frames: int
    fps: float
    width: int
    height: int

    def frames(self, indices: list[int]) -> np.ndarray:
        """`[len(indices), H, W, 3]` uint8 frames for sorted indices."""

    def timestamps(self, indices: list[int]) -> np.ndarray:
        """Presentation time in seconds of each index."""

    def close(self) -> None: ...


class DecordVideo:
    def __init__(self, path: str):
        import decord

        self._vr = decord.VideoReader(path, num_threads=1)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        self.height, self.width = self._vr[0].shape[:2] if self.num_frames else (0, 0)
        self._vr.seek(0)

    def frames(self, indices: list[int]) -> np.ndarray:
        return self._vr.get_batch(indices).asnumpy()

    def timestamps(self, indices: list[int]) -> np.ndarray:
        return np.asarray(self._vr.get_frame_timestamp(indices))[:, 0].astype(np.float64)

    def close(self) -> None:
        del self._vr


class PyAVVideo:
    """PyAV backend: seeks to the keyframe before the first wanted frame, then decodes forward."""

    def __init__(self, path: str):
        import av

        self._path = path
        with av.open(path) as c:
            st = c.streams.video[0]
            self.fps = float(st.average_rate or st.guessed_rate or 0)
            self.width, self.height = st.codec_context.width, st.codec_context.height
            self._tb = float(st.time_base)
            self._start = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
            n = st.frames
            if not n:
                n = sum(1 for _ in c.decode(video=0))
        self.num_frames = int(n)

    def _index(self, frame) -> int:
        return int(round((float(frame.pts * frame.time_base) - self._start) * self.fps))

    def frames(self, indices: list[int]) -> np.ndarray:
        import av

        want = set(indices)
        got: dict[int, np.ndarray] = {}
        with av.open(self._path) as c:
            st = c.streams.video[0]
            c.seek(int((indices[0] / self.fps + self._start) / self._tb), stream=st, backward=True, any_frame=False)
            for frame in c.decode(st):
                i = self._index(frame)
                if i in want:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= indices[-1]:
                    break
        missing = [i for i in indices if i not in got]
        if missing:
            raise ValueError(f"frames {missing[:5]} not found after seeking (variable frame rate?)")
        return np.stack([got[i] for i in indices])

    def timestamps(self, indices: list[int]) -> np.ndarray:
        return np.asarray(indices, dtype=np.float64) / self.fps

    def close(self) -> None:
        pass


def open_video(path: str, backend: str = "decord") -> VideoDecoder:
    """Open `path` with a video backend: "decord", "pyav", or a plugin named "package.module:Class" (or
    "/path/to/plugin.py:Class", for a file not on the Python path of every worker) whose class takes the path
    and implements `VideoDecoder`: a decoder of your own, or a test double that hangs or crashes."""
    if backend == "decord":
        return DecordVideo(path)
    if backend == "pyav":
        return PyAVVideo(path)
    if ":" not in backend:
        raise ValueError(f"unknown video backend {backend!r}; choose decord, pyav or module:Class")
    module, _, name = backend.rpartition(":")
    try:
        if module.endswith(".py"):
            import runpy

            cls = runpy.run_path(module)[name]
        else:
            import pkgutil

            cls = pkgutil.resolve_name(backend)
    except (ImportError, AttributeError, KeyError, OSError, ValueError) as e:
        raise ValueError(f"video backend {backend!r} cannot be loaded ({type(e).__name__}: {e})") from e
    return cls(path)


def _image_size(uri: str, storage_options: dict | None) -> tuple[int, int] | None:
    """(width, height) of an image, or None when it is beyond PIL's decompression-bomb limit (read as a raster)."""
    from PIL import Image

    fs, path = filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as f, Image.open(f) as im:
            return im.size
    except Image.DecompressionBombError:
        return None


def probe(uri: str, storage_options: dict | None = None, *, video_backend: str = "decord",
          raster_pixels: int = 64_000_000) -> MediaInfo:
    """Kind, size, frame count and rate of a media file. Raises ValueError naming the cause."""
    fs, path = filesystem(uri, storage_options)
    try:
        size = fs.size(path)
    except Exception as e:
        raise translate_error(e, uri) from e
    if not size:
        raise ValueError(f"{uri}: empty file (0 bytes)")
    kind = media_kind(uri)
    if kind is None:
        raise ValueError(f"{uri}: not a supported media file (unknown extension)")
    if kind == "video":
        try:
            with local_copy(uri, storage_options) as local:
                v = open_video(local, video_backend)
                info = MediaInfo("video", v.width, v.height, v.num_frames, v.fps)
                v.close()
        except Exception as e:
            raise ValueError(f"{uri}: cannot decode video ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        if info.num_frames <= 0:
            raise ValueError(f"{uri}: video has no frames")
        return info
    if kind == "image":
        try:
            size = _image_size(uri, storage_options)
        except Exception as e:
            raise ValueError(f"{uri}: cannot read image ({type(e).__name__}: {e})") from e
        if size is not None and size[0] * size[1] <= raster_pixels:
            return MediaInfo("image", *size)
    try:
        with open_raster(uri, storage_options) as ds:
            return MediaInfo("raster", ds.width, ds.height)
    except Exception as e:
        raise ValueError(f"{uri}: cannot open raster ({type(e).__name__}: {e})") from e


_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _row(unit: WorkUnit, index: int, pts: float | None, width: int, height: int, window=(0, 0, 0, 0),
         offset=(0, 0), scale=(1.0, 1.0), raster: RasterPlan | None = None, all_nodata: bool = False) -> dict[str, Any]:
    """A frame's columns. `offset` (source pixels) and `scale` (image pixels per source pixel) map the decoded
    image's boxes back to the source; `transform` (affine, source pixels -> map) and `crs` place them."""
    x, y, w, h = window if window[2] else (0, 0, width, height)
    return {
        "frame_id": frame_id(unit.source, index), "source": unit.source, "source_kind": unit.kind,
        "frame_index": index, "pts_s": pts, "width": width, "height": height,
        "window_x": x, "window_y": y, "window_width": w, "window_height": h,
        "offset_x": offset[0], "offset_y": offset[1], "scale_x": scale[0], "scale_y": scale[1],
        "crs": raster.crs if raster else None, "transform": raster.transform if raster and raster.crs else _IDENTITY,
        "all_nodata": all_nodata, "stac_item": unit.stac_item or None, "datetime": unit.datetime or None,
    }


def _batch(rows: list[dict], images: list[np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    out["image"] = np.stack(images)
    return out


def decode_unit(unit: WorkUnit, *, sampling: Sampling, batch_size: int, done: frozenset[str] | set[str] = frozenset(),
                storage_options: dict | None = None, video_backend: str = "decord") -> Iterator[dict[str, Any]]:
    """Yield batches (column dicts with an `image` column `[B, H, W, 3]` uint8) of the unit's sampled,
    not yet written frames. Exceptions propagate; the caller turns them into error rows."""
    if unit.kind == "video":
        wanted = [i for i in sample_indices(unit.num_frames, unit.fps, sampling, unit.start, unit.stop)
                  if frame_id(unit.source, i) not in done]
        if not wanted:
            return
        with local_copy(unit.uri, storage_options) as local:
            v = open_video(local, video_backend)
            for i in range(0, len(wanted), batch_size):
                idx = wanted[i:i + batch_size]
                frames = v.frames(idx)
                pts = v.timestamps(idx)
                if len(pts) > 1 and not np.all(np.diff(pts) > 0):
                    raise ValueError(f"{unit.source}: frame timestamps are not increasing around frames {idx[0]}-{idx[-1]}"
                                     " (broken index); try --video-backend pyav")
                rows = [_row(unit, j, float(p), frames.shape[2], frames.shape[1]) for j, p in zip(idx, pts)]
                yield _batch(rows, list(frames))
            v.close()
    elif unit.kind == "image":
        if frame_id(unit.source, 0) in done:
            return
        from PIL import Image

        fs, path = filesystem(unit.uri, storage_options)
        with fs.open(path, "rb") as f, Image.open(f) as im:
            img = np.asarray(im.convert("RGB"))
        yield _batch([_row(unit, 0, None, img.shape[1], img.shape[0])], [img])
    else:
        yield from _decode_raster(unit, done, storage_options)


def _decode_raster(unit: WorkUnit, done, storage_options) -> Iterator[dict[str, Any]]:
    """Each window of the unit as its raster plan says (margin, bands, stretch, scale); a window without one
    valid pixel is a row with `all_nodata` and a 1 x 1 image that the detector does not run on."""
    plan = RasterPlan.from_json(unit.raster)
    windows = plan.windows()
    with open_rasters(list(plan.assets or [unit.uri]), storage_options) as datasets:
        for k in unit.frame_indices():
            if frame_id(unit.source, k) in done:
                continue
            r = read_window(datasets, plan, k)
            yield _batch([_row(unit, k, None, unit.width, unit.height, windows[k], r.offset, r.scale, plan,
                               r.all_nodata)], [r.image])
