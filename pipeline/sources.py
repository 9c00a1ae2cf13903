"""Inputs -> media URIs, and the units of work they are cut into.

`expand_inputs` turns paths, directories, globs (`s3://bucket/prefix/**.mp4`), any fsspec URL and
manifests (`*.txt` / `*.lst`: one URI a line) into `Source`s (read URL, identity, size, version).
`pipeline.plan.plan_units` probes one URI and cuts it into `WorkUnit`s:

- a video: segments of about `segment_frames` frames, so one long video decodes on many workers, cut at
  keyframes (each segment starts at the first keyframe at or after a multiple of `segment_frames`), so
  that no two segments decode the same frames;
- an image: one unit;
- a raster (GeoTIFF/COG, or any image larger than `raster_pixels`): groups of windows, read
  window by window with rasterio, never whole; its `RasterPlan` (bands, stretch, scale, windows,
  georeference: `pipeline.raster`) is made once here and travels with each unit.
"""
from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from .raster import RasterPlan
from .stac import DEFAULT_ASSET, is_stac, search_assets, stac_assets
from .storage import (canonical_uri, check_endpoint, filesystem, object_mtime, object_version, protocol_of,
                      translate_error)

log = logging.getLogger(__name__)

__all__ = ["Source", "WorkUnit", "expand_inputs", "settled", "ahead_of", "media_kind", "VIDEO_EXT", "IMAGE_EXT",
           "RASTER_EXT"]

VIDEO_EXT = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
RASTER_EXT = {".tif", ".tiff", ".jp2", ".vrt"}
MANIFEST_EXT = {".txt", ".lst", ".manifest"}
MANIFEST_THREADS = 32  # a manifest's entries looked up at once


@dataclass(frozen=True)
class WorkUnit:
    """One piece of decoding work. Video: frames [start, stop); raster: windows `window_ids()[start:stop]`."""

    uri: str  # the URL to read (a presigned URL keeps its signature here, and only here)
    source: str  # canonical URI: identity, frame ids, the `source` column
    kind: str  # image | video | raster
    start: int = 0
    stop: int = 1
    num_frames: int = 1  # video: frames in the file; raster: windows in the raster
    fps: float = 0.0
    width: int = 0
    height: int = 0
    raster: str = ""  # raster: its RasterPlan as JSON
    stac_item: str = ""  # the STAC item the source is an asset of, and the item's datetime (ISO 8601)
    datetime: str = ""
    # video: its keyframes in [start, stop), comma-separated ("" when the decoder reports none); a string, as
    # `raster` is, so that a unit is a row of scalars in Ray Data
    keyframes: str = ""
    # video whose rate varies: the times (microseconds) of frames start - 1 to stop, comma-separated (sampling by
    # time needs the frame before the unit's first); "" at a constant rate (frame i at i / fps)
    times: str = ""

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    def frame_times(self) -> dict[int, float] | None:
        """Frame index -> time (s) for frames start - 1 to stop of a variable-rate video; None at a constant rate."""
        if not self.times:
            return None
        first = max(self.start - 1, 0)
        return {first + k: int(us) / 1e6 for k, us in enumerate(self.times.split(","))}

    def keyframe_indices(self) -> list[int] | None:
        """The video's keyframes in [start, stop), or None when they are not known."""
        return [int(k) for k in self.keyframes.split(",")] if self.keyframes else None

    def frame_indices(self) -> list[int]:
        """The frame indices (video frames, raster window ids) the unit covers."""
        if self.kind == "raster":
            return RasterPlan.from_json(self.raster).window_ids()[self.start:self.stop]
        return list(range(self.start, self.stop))


def media_kind(uri: str) -> str | None:
    ext = os.path.splitext(uri.split("?", 1)[0])[1].lower()
    if ext in VIDEO_EXT:
        return "video"
    if ext in IMAGE_EXT:
        return "image"
    if ext in RASTER_EXT:
        return "raster"
    return None


@dataclass(frozen=True)
class Source:
    """One input object: `url` to read it with (a presigned URL keeps its signature), `canonical` its
    identity (`storage.canonical_uri`: frame ids and the `source` column), and `size` (bytes) and
    `version` (ETag on object storage and HTTP, else the modification time) from the same listing,
    so that a resumed job can tell that a source changed; `modified`: when it was last written (epoch seconds,
    None when the listing does not say), to leave a file still being written for a later run (`settled`)."""

    url: str
    canonical: str
    size: int | None = None
    version: str | None = None
    stac_item: str = ""  # a STAC input's item id and datetime (ISO 8601)
    datetime: str = ""
    assets: tuple[str, ...] = ()  # STAC band assets combined into one raster (`url` is the first)
    modified: float | None = None

    def size_and_version(self) -> dict[str, Any]:
        """What an output records of the file to tell, at a later run, that it changed (`Output.read_sources`)."""
        return {"size": self.size, "version": None if self.version is None else str(self.version)}


def _source(fs, name: str, info: dict, original: str) -> Source:
    """A Source from one listing entry; remote names get their protocol back, local ones stay paths. A local
    symlink is its target's size and time, as when it is named alone: fsspec's listing gives it the target's size
    but its own mtime, so a link to a file still being written counted as settled (`settled`), and the same file
    listed in a directory and named alone had two versions (a SourceChanged row for an unchanged file)."""
    local = protocol_of(original) == "file"
    if local and info.get("islink"):
        info = fs.info(name)
    url = name if local else fs.unstrip_protocol(name)
    return _listed(url, canonical_uri(url), info)


def _listed(url: str, canonical: str, info: dict) -> Source:
    """A Source with what its fsspec `info`/listing entry says of it: size, version, when it was last written."""
    size = info.get("size")
    return Source(url, canonical, int(size) if size is not None else None, object_version(info),
                  modified=object_mtime(info))


def _beside(manifest: str, entry: str) -> str:
    """A manifest's entry: a URL or an absolute path as it is, a relative path from the manifest's own directory
    (as a spec's inputs are from the spec's), wherever the command runs."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    folder = manifest.split("?", 1)[0].rpartition("/")[0]
    return f"{folder}/{entry}" if folder else entry


def _is_pattern(item: str, path: str) -> bool:
    """Glob characters in the path; an HTTP(S) URL is never a pattern (`?` starts its query)."""
    return protocol_of(item) not in ("http", "https") and any(ch in path for ch in "*?[")


def _recursive(pattern: str) -> str:
    """`**` starting a path component and followed by more of it (`flights/**.mp4`, as gsutil and many shells
    read it: files ending .mp4 at any depth) as fsspec spells it, `flights/**/*.mp4` (fsspec refuses a `**` that
    is not a whole component; its `**/` matches no directory too)."""
    return re.sub(r"(^|/)\*\*(?=[^/])", r"\1**/*", pattern)


def _stac_source(a) -> Source:
    """A STAC asset's Source; band assets combined are identified by their item."""
    return Source(a.href, canonical_uri(a.item_href if a.bands else a.href), stac_item=a.item, datetime=a.datetime,
                  assets=a.bands)


def _expand_one(item: str, storage_options: dict | None, stac_asset: str, stac_bands: tuple[str, ...]) -> list[Source]:
    """The Sources of one input: one listing call for a directory or pattern, one info call for a file; a STAC
    document's items' assets."""
    if is_stac(item):
        return [_stac_source(a) for a in stac_assets(item, storage_options, asset=stac_asset, bands=stac_bands)]
    fs, path = filesystem(item, storage_options)
    if _is_pattern(item, path):
        try:
            found = fs.glob(_recursive(path), detail=True)
        except ValueError as e:  # fsspec's "Invalid pattern: ..."
            raise ValueError(f"input {item}: {e}") from None
        out = [_source(fs, n, i, item) for n, i in found.items() if i.get("type") != "directory" and media_kind(n)]
        if not out:
            raise FileNotFoundError(f"input {item}: the pattern matches no media files")
        return out
    ext = os.path.splitext(path.split("?", 1)[0])[1].lower()
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise translate_error(e, f"{'manifest' if ext in MANIFEST_EXT else 'input'} {item}") from e
    if info.get("type") == "directory":
        found = fs.find(path, detail=True)
        out = [_source(fs, n, i, item) for n, i in found.items() if media_kind(n)]
        if not out:
            raise FileNotFoundError(f"input {item}: the directory holds no media files")
        return out
    if ext in MANIFEST_EXT:
        with fs.open(path, "rt") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        return _manifest_sources(item, [_beside(item, ln) for ln in lines], storage_options, stac_asset, stac_bands)
    return [_listed(_read_url(item), canonical_uri(item), info)]


def _read_url(item: str) -> str:
    return canonical_uri(item) if protocol_of(item) == "file" else item


def _manifest_sources(manifest: str, entries: list[str], storage_options: dict | None, stac_asset: str,
                      stac_bands: tuple[str, ...]) -> list[Source]:
    """The Sources of a manifest's entries. An entry naming nothing (a snapshot deleted since the list was made) is
    a Source all the same, whose probe fails: its error row says so, and the job goes on. A job over a manifest of
    100,000 entries stopped at the first missing one, naming it alone, once per run. A pattern that matches nothing
    or a directory without media fails the job, as on the command line.

    Entries are looked up `MANIFEST_THREADS` at a time: one after the other, a manifest of 100,000 objects on S3 took
    a request's round trip each (13.7 s for 2,000 on a server on this machine; tens of minutes at S3's latency)."""
    def expand(entry: str) -> list[Source] | None:
        try:
            return expand_inputs([entry], storage_options, stac_asset=stac_asset, stac_bands=stac_bands)
        except FileNotFoundError as e:
            fs, path = filesystem(entry, storage_options)
            if _is_pattern(entry, path) or fs.exists(path):
                raise FileNotFoundError(f"{e} (listed in manifest {manifest})") from None
            return None

    if entries:
        filesystem(entries[0], storage_options)  # made once, before the threads ask fsspec's cache for it
    with ThreadPoolExecutor(min(MANIFEST_THREADS, max(len(entries), 1))) as pool:
        found = list(pool.map(expand, entries))
    out, missing = [], []
    for entry, sources in zip(entries, found):
        if sources is None:
            missing.append(entry)
            sources = [Source(_read_url(entry), canonical_uri(entry))]
        out += sources
    if missing:
        log.warning("manifest %s lists %d input(s) that do not exist (%s%s): each is an error row", manifest,
                    len(missing), ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    return out


def expand_inputs(inputs: list[str], storage_options: dict | None = None, *,
                  stac_asset: str = DEFAULT_ASSET, stac_bands: tuple[str, ...] = (),
                  stac_search: dict | None = None) -> list[Source]:
    """The media objects `inputs` name, sorted by identity, one Source per object however often and
    however it was spelled (`vids/clip.mp4`, `./vids/clip.mp4`, `vids/`, an absolute path): the first
    spelling's URL is kept for reading. STAC documents (`.json`) and a STAC API search (`stac_search`, see
    `pipeline.stac.search_assets`) give their items' `stac_asset`, or their band assets `stac_bands` combined. Raises
    FileNotFoundError naming an input that matches nothing; a file with an unknown extension is kept (it fails
    later as an error row)."""
    by_identity: dict[str, Source] = {}
    for item in inputs:
        check_endpoint(item, storage_options, f"input {item}")  # at once, where botocore's retries took a minute
        try:
            found = _expand_one(item, storage_options, stac_asset, stac_bands)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as e:
            translated = translate_error(e, f"input {item}")
            if translated is e:
                raise
            raise translated from e
        for src in found:
            by_identity.setdefault(src.canonical, src)
    for a in search_assets(stac_search, asset=stac_asset, bands=stac_bands) if stac_search else []:
        src = _stac_source(a)
        by_identity.setdefault(src.canonical, src)
    return [by_identity[k] for k in sorted(by_identity)]


def settled(sources: list[Source], min_age_s: float, now: float | None = None) -> tuple[list[Source], list[Source]]:
    """`sources` split into those last written at least `min_age_s` seconds before `now` (default: this machine's
    clock) and those written since: a file a camera or an upload is still writing, which a run would read half of
    and a later run find changed (a SourceChanged row, or its frames replaced). A source whose listing gives no time
    (a STAC asset, some HTTP servers) counts as settled. On object storage the time is the server's; one dated after
    `now` (a clock behind, or a camera's ahead, copied with its times) waits too: `ahead_of` tells them apart."""
    if min_age_s <= 0:
        return sources, []
    limit = (time.time() if now is None else now) - min_age_s
    young = [s for s in sources if s.modified is not None and s.modified > limit]
    if not young:
        return sources, []
    left = {s.canonical for s in young}
    return [s for s in sources if s.canonical not in left], young


def ahead_of(sources: list[Source], now: float) -> list[Source]:
    """Those of `sources` dated after `now`: "written within the last 10m" would not be true of them."""
    return [s for s in sources if s.modified is not None and s.modified > now]
