"""Inputs -> media URIs -> work units.

`expand_inputs` turns paths, directories, globs (`s3://bucket/prefix/**.mp4`), any fsspec URL and
manifests (`*.txt` / `*.lst`: one URI a line) into media URIs. `plan_units` (run in parallel as a
Ray Data stage) probes one URI and cuts it into units of work:

- a video: segments of `segment_frames` frames, so one long video decodes on many workers;
- an image: one unit;
- a raster (GeoTIFF/COG, or any image larger than `raster_pixels`): groups of windows, read
  window by window with rasterio, never whole.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from .storage import filesystem, translate_error

__all__ = ["WorkUnit", "expand_inputs", "media_kind", "plan_units", "VIDEO_EXT", "IMAGE_EXT", "RASTER_EXT"]

VIDEO_EXT = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
RASTER_EXT = {".tif", ".tiff", ".jp2", ".vrt"}
MANIFEST_EXT = {".txt", ".lst", ".manifest"}


@dataclass(frozen=True)
class WorkUnit:
    """One piece of decoding work. Video: frames [start, stop); raster: windows [start, stop)."""

    uri: str
    kind: str  # image | video | raster
    start: int = 0
    stop: int = 1
    num_frames: int = 1  # video: frames in the file; raster: windows in the raster
    fps: float = 0.0
    width: int = 0
    height: int = 0

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def media_kind(uri: str) -> str | None:
    ext = os.path.splitext(uri.split("?", 1)[0])[1].lower()
    if ext in VIDEO_EXT:
        return "video"
    if ext in IMAGE_EXT:
        return "image"
    if ext in RASTER_EXT:
        return "raster"
    return None


def _with_protocol(fs, path: str, original: str) -> str:
    if "://" not in original:
        return path
    return fs.unstrip_protocol(path)


def expand_inputs(inputs: list[str], storage_options: dict | None = None) -> list[str]:
    """Media URIs for `inputs`, sorted, without duplicates. Raises FileNotFoundError naming an input
    that matches nothing; a file with an unknown extension is kept (it fails later as an error row)."""
    out: list[str] = []
    for item in inputs:
        fs, path = filesystem(item, storage_options)
        ext = os.path.splitext(path)[1].lower()
        try:
            if any(ch in path for ch in "*?["):
                matches = [p for p in fs.glob(path) if media_kind(p) and not fs.isdir(p)]
                if not matches:
                    raise FileNotFoundError(f"input {item}: the pattern matches no media files")
                out.extend(_with_protocol(fs, p, item) for p in matches)
            elif fs.isdir(path):
                matches = [p for p in fs.find(path) if media_kind(p)]
                if not matches:
                    raise FileNotFoundError(f"input {item}: the directory holds no media files")
                out.extend(_with_protocol(fs, p, item) for p in matches)
            elif ext in MANIFEST_EXT:
                if not fs.exists(path):
                    raise FileNotFoundError(f"manifest {item} does not exist")
                with fs.open(path, "rt") as f:
                    lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
                out.extend(expand_inputs(lines, storage_options))
            elif fs.exists(path):
                out.append(item)
            else:
                raise FileNotFoundError(f"input {item} does not exist")
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as e:
            raise translate_error(e, f"input {item}") from e
    seen: set[str] = set()
    return [u for u in sorted(out) if not (u in seen or seen.add(u))]


def plan_units(uri: str, *, segment_frames: int, raster_pixels: int, window: int, windows_per_unit: int,
               storage_options: dict | None = None, video_backend: str = "decord") -> Iterator[WorkUnit]:
    """Probe `uri` and yield its units. Raises on unreadable input (the caller records the error)."""
    from .decode import probe

    info = probe(uri, storage_options, video_backend=video_backend, raster_pixels=raster_pixels)
    if info.kind == "video":
        for start in range(0, info.num_frames, segment_frames):
            yield WorkUnit(uri, "video", start, min(start + segment_frames, info.num_frames), info.num_frames,
                           info.fps, info.width, info.height)
    elif info.kind == "raster":
        n = len(raster_windows(info.width, info.height, window))
        for start in range(0, n, windows_per_unit):
            yield WorkUnit(uri, "raster", start, min(start + windows_per_unit, n), n, 0.0, info.width, info.height)
    else:
        yield WorkUnit(uri, "image", 0, 1, 1, 0.0, info.width, info.height)


def raster_windows(width: int, height: int, window: int) -> list[tuple[int, int, int, int]]:
    """Non-overlapping core windows `(x, y, w, h)` of a raster; decode pads each with a margin."""
    return [(x, y, min(window, width - x), min(window, height - y))
            for y in range(0, height, window) for x in range(0, width, window)]
