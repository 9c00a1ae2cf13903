"""Work unit -> batches of uint8 HWC frames, sampled inside the decoder.

Sampling (every Nth frame, a target fps, a time range, or keyframes only) is decided from frame indices
before decoding, so only sampled frames leave the decoder, and a resumed job skips frames already written
before decoding them. Frames stay uint8; conversion to float happens on the model's device.

Video goes through a small `VideoDecoder` interface: decord by default for local files (random access by
index, timestamps from the container), PyAV as the second backend, and PyAV for remote videos whichever is
asked for: decord reads a file object whole into memory (its `VideoReader(file)` calls `file.read()`), where
PyAV reads a seekable file object (`storage.open_ranged`: byte ranges, a small block cached) as FFmpeg asks:
the container's index once, then the packets it decodes. Both decode with FFmpeg to the same pixels
(tests/test_decode.py checks), so a remote video gives the frames a local copy would.

Frame counts and keyframes come from the container's index (MP4 `moov`, AVI `idx1`: read, never decoded);
a container without one (MPEG-TS, Matroska without complete cues) is demuxed once without decoding, which
reads the file once. Each decoder counts the frames it decodes on the way to the ones asked for (`decoded`):
it seeks to a keyframe only when the next wanted frame lies beyond the current group of pictures, so the
count is the wanted frames plus what precedes them in their groups; keyframes-only sampling decodes one frame
per sampled frame. The count reaches the frames rows as `decoded_frames`.

Images are read with PIL; rasters window by window with rasterio, as `pipeline.raster` plans them (bands,
stretch, resampling, nodata), by byte ranges when remote. Images too large for PIL (beyond its
decompression-bomb limit) and images of more than 8 bits a sample take the raster path.
"""
from __future__ import annotations

import bisect
import contextlib
import io
import math
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Mapping, Protocol, Sequence

import numpy as np

from .output import frame_id
from .raster import RasterPlan, open_raster, open_rasters, read_window
from .sources import WorkUnit, media_kind
from .storage import REMOTE_BLOCK, filesystem, local_copy, one_line, open_ranged, protocol_of, translate_error

__all__ = ["Sampling", "sample_indices", "probe", "decode_unit", "VideoDecoder", "open_video", "read_video",
           "MediaInfo", "PyAVVideo", "DecordVideo", "DecoderOutputError"]


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video are processed. Images and rasters are always processed. `keyframes`: only the
    video's keyframes (an archive scan that decodes one frame per sampled frame), within the time range."""

    every_n: int = 1
    fps: float | None = None  # target rate; frames are picked so that about `fps` per second remain
    start_s: float | None = None
    end_s: float | None = None
    keyframes: bool = False

    def __post_init__(self) -> None:
        if self.every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {self.every_n}")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"fps must be a number > 0, got {self.fps}")
        for name in ("start_s", "end_s"):
            if (v := getattr(self, name)) is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a number of seconds, got {v}")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        if self.keyframes and (self.every_n != 1 or self.fps is not None):
            raise ValueError("keyframes: sampling keyframes only cannot be combined with every_n or fps")
        if self.fps is not None and self.every_n != 1:
            raise ValueError(f"every_n ({self.every_n}) and fps ({self.fps:g}) are two ways to choose frames: give one")


def sample_indices(num_frames: int, video_fps: float, s: Sampling, start: int = 0, stop: int | None = None,
                   keyframes: Sequence[int] | None = None, times: Mapping[int, float] | None = None) -> list[int]:
    """Sampled frame indices within [start, stop) of a video; a pure function of the whole video, so
    segments agree at their borders. `keyframes`: the video's keyframe indices (those in [start, stop) suffice),
    needed when `s.keyframes`. `times`: a variable-rate video's frame times in seconds (frames start - 1 to
    stop), by which the time range and `fps` choose (the first frame of each 1/fps interval); without them frame
    i is at i / video_fps."""
    stop = num_frames if stop is None else min(stop, num_frames)
    if s.keyframes:
        if keyframes is None:
            raise ValueError("keyframes sampling needs the video's keyframes, and its decoder reports none")
        candidates: Sequence[int] = [k for k in keyframes if start <= k < stop]
    else:
        candidates = range(start, stop)
    out = []
    for i in candidates:
        t = times[i] if times is not None else i / video_fps if video_fps > 0 else 0.0
        if s.start_s is not None and t < s.start_s - 1e-9:
            continue
        if s.end_s is not None and t >= s.end_s - 1e-9:
            continue
        if s.fps is not None and times is not None:
            if i > 0 and math.floor(t * s.fps + 1e-6) == math.floor(times[i - 1] * s.fps + 1e-6):
                continue
        elif s.fps is not None and video_fps > 0:
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
    keyframes: tuple[int, ...] | None = None  # video: keyframe indices, when the decoder reports them
    times: tuple[float, ...] | None = None  # video: each frame's time (s), when the rate varies


class VideoDecoder(Protocol):
    """What the pipeline needs of a video backend. `keyframes` and `decoded` are optional: without `keyframes`
    a video is cut at fixed frame counts and cannot be sampled by keyframes; without `decoded` each frame counts
    as one decoded frame."""

    num_frames: int
    fps: float
    width: int
    height: int
    keyframes: list[int] | None  # keyframe indices, ascending
    decoded: list[int]  # frames decoded for each frame of the last `frames` call (itself and those before it)

    def frames(self, indices: list[int]) -> np.ndarray:
        """`[len(indices), H, W, 3]` uint8 frames for sorted indices (`_checked_frames` holds a backend to it)."""

    def timestamps(self, indices: list[int]) -> np.ndarray:
        """Presentation time in seconds of each index."""

    def close(self) -> None: ...


def _evenly_spaced(timestamps: list[int]) -> bool:
    """Whether a video's frame times (an MP4 index's decode times, or a decoder's presentation times) are those of
    a constant frame rate: each within half a frame of the straight line from the first to the last."""
    if len(timestamps) < 3:
        return True
    t = np.asarray(timestamps, np.float64)
    step = (t[-1] - t[0]) / (len(t) - 1)
    return bool(step > 0 and np.abs(t - (t[0] + step * np.arange(len(t)))).max() <= step / 2)


def _keyframe_before(keyframes: list[int], i: int) -> int:
    """The last keyframe at or before frame `i` (0 when none is known)."""
    k = bisect.bisect_right(keyframes, i) - 1
    return keyframes[k] if k >= 0 else 0


def _decodes_on_to(keyframes: list[int], nxt: int | None, i: int) -> bool:
    """Whether a decoder whose next frame is `nxt` reaches frame `i` by decoding on, without a seek: `i` is not
    behind it and no keyframe lies between them."""
    return nxt is not None and nxt <= i and _keyframe_before(keyframes, i) <= nxt


def _seek_policy_counts(keyframes: list[int], nxt: int | None, indices: list[int]) -> tuple[list[int], int | None]:
    """Frames decoded for each of `indices` by a decoder that decodes on within a group of pictures and otherwise
    seeks to the keyframe before the wanted frame, its next frame being `nxt` at first, and its next frame after
    them: for backends that do not count (decord, NVDEC)."""
    counts = []
    for i in indices:
        counts.append(i - (nxt if _decodes_on_to(keyframes, nxt, i) else _keyframe_before(keyframes, i)) + 1)
        nxt = i + 1
    return counts, nxt


class DecordVideo:
    """decord over a local file. decord does not say what it decodes; `decoded` follows its seek policy
    (`VideoReader::SeekAccurate`: decode forward within a group of pictures, else seek to the keyframe before
    the wanted frame and decode from there), the same policy as `PyAVVideo`, which counts."""

    def __init__(self, path: str):
        # GDAL (rasterio) must be loaded before decord: decord's bundled libraries, loaded first, break GDAL's PNG
        # reader in the same process ("libpng: bad parameters to zlib"). Import order fixes it.
        import rasterio  # noqa: F401  isort: skip
        import decord

        self._vr = decord.VideoReader(path, num_threads=1)
        self.num_frames = len(self._vr)
        self.fps = float(self._vr.get_avg_fps())
        self.keyframes = [int(k) for k in self._vr.get_key_indices()]
        self.decoded: list[int] = []
        self._next = 0  # the frame decord decodes next without seeking
        self._size: tuple[int, int] | None = None

    def _shape(self) -> tuple[int, int]:
        if self._size is None:  # decord tells the size only by decoding a frame: only a probe asks
            self._size = self._vr[0].shape[:2] if self.num_frames else (0, 0)
            self._vr.seek(0)
            self._next = 0
        return self._size

    @property
    def height(self) -> int:
        return self._shape()[0]

    @property
    def width(self) -> int:
        return self._shape()[1]

    def frames(self, indices: list[int]) -> np.ndarray:
        out = self._vr.get_batch(indices).asnumpy()
        self.decoded, self._next = _seek_policy_counts(self.keyframes, self._next, indices)
        return out

    def timestamps(self, indices: list[int]) -> np.ndarray:
        # decord keeps times as float32: rounded to the microsecond, 0.4 reads as 0.4 (not 0.4000000059604645)
        return np.round(np.asarray(self._vr.get_frame_timestamp(indices))[:, 0].astype(np.float64), 6)

    def close(self) -> None:
        del self._vr


class PyAVVideo:
    """PyAV over a path or a seekable binary file object (a remote video: `storage.open_ranged`).

    The container stays open: frames are decoded forward while the next wanted frame is in the current group
    of pictures, and the decoder seeks to the keyframe before it otherwise (at the keyframe's own presentation
    time, so a seek never lands past the frame it is for). When every wanted frame of a call is a keyframe, each
    is decoded alone from its own packet, so only keyframes are read and decoded.

    Frame `i` is the i-th in presentation order, as decord numbers them: at a constant rate (an MP4's index with
    evenly spaced timestamps) from its presentation time and the rate; otherwise (a variable rate, a container
    without a full index) by its presentation time's rank among the stream's packets, and its timestamp is its
    own. A rotated stream (a display matrix, as phones write) is turned upright, as decord turns it."""

    def __init__(self, source: str | BinaryIO):
        import av

        self._c = av.open(source)
        try:
            st = self._st = self._c.streams.video[0]
            self.fps = float(st.average_rate or st.guessed_rate or 0)
            self._tb = float(st.time_base)
            self._start = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
            self._pts: list[int] | None = None  # presentation timestamps in frame order, when not a constant rate
            self.num_frames, self.keyframes, self._seek_ts = self._read_index()
            self._rank = None if self._pts is None else {p: k for k, p in enumerate(self._pts)}
        except BaseException:
            self._c.close()
            raise
        self._keyset = frozenset(self.keyframes)
        self.decoded: list[int] = []
        self._next: int | None = None  # the frame the decoder gives next without seeking; None: seek first
        self._frames: Iterator[Any] = iter(())
        self._turns: int | None = None  # quarter turns counterclockwise that make a frame upright; None: not known

    def _upright(self, frame) -> np.ndarray:
        img = frame.to_ndarray(format="rgb24")
        self._turns = round(getattr(frame, "rotation", 0) / 90) % 4
        return np.ascontiguousarray(np.rot90(img, self._turns)) if self._turns else img

    def _size(self) -> tuple[int, int]:
        """(width, height) upright: a rotated stream's rotation is on its frames, so a probe decodes the first."""
        import av

        cc = self._st.codec_context
        if self._turns is None:
            try:
                self._seek(0)
                self._upright(next(self._frames))
            except (StopIteration, av.error.FFmpegError):
                self._turns = 0
            self._next, self._frames = None, iter(())  # whatever comes next starts with a seek
        return (cc.height, cc.width) if self._turns % 2 else (cc.width, cc.height)

    @property
    def width(self) -> int:
        return self._size()[0]

    @property
    def height(self) -> int:
        return self._size()[1]

    def _read_index(self) -> tuple[int, list[int], dict[int, int]]:
        """(frame count, keyframe indices, keyframe index -> the timestamp a seek to it takes) from the
        container's index when it lists every frame at a constant rate (MP4, AVI: read with the header), else by
        demuxing the stream once without decoding (reads the file: MPEG-TS, Matroska, a variable rate), which
        also gives every frame's presentation time (`_pts`)."""
        st = self._st
        entries = [e for e in st.index_entries if not e.is_discard]
        if st.frames and len(entries) == st.frames and _evenly_spaced([e.timestamp for e in entries]):
            # decode order (an entry's timestamp is its decode time); with closed groups of pictures a keyframe's
            # position is its presentation index, and its presentation time that index's at the stream's rate
            keys = [k for k, e in enumerate(entries) if e.is_keyframe]
            return st.frames, keys, {k: round((k / self.fps + self._start) / self._tb) for k in keys}
        # Matroska seeks by its cues (presentation times); MPEG-TS and others without an index by decode times
        by_dts = "matroska" not in self._c.format.name
        packets = [(p.pts if p.pts is not None else p.dts, p.dts if by_dts and p.dts is not None else p.pts,
                    p.is_keyframe) for p in self._c.demux(st) if p.size]
        order = sorted(range(len(packets)), key=lambda k: (packets[k][0] is None, packets[k][0] or 0, k))
        rank = {k: r for r, k in enumerate(order)}
        keys = sorted(rank[k] for k, p in enumerate(packets) if p[2])
        if all(p[0] is not None for p in packets):
            self._pts = [packets[k][0] for k in order]
        return len(packets), keys, {rank[k]: p[1] for k, p in enumerate(packets) if p[2]}

    def _index(self, frame) -> int:
        """The frame index of a decoded frame or a packet: the rank of its presentation time among the stream's,
        when they are known, else from its presentation time at the constant rate."""
        ts = frame.pts if frame.pts is not None else frame.dts
        if self._rank is not None:
            k = self._rank.get(ts)
            return k if k is not None else bisect.bisect_left(self._pts, ts)
        return int(round((ts * self._tb - self._start) * self.fps))

    def _seek(self, i: int, earlier: int = 0) -> None:
        """Position the decoder at the keyframe before frame `i` (`earlier` keyframes before that one)."""
        k = bisect.bisect_right(self.keyframes, i) - 1 - earlier
        if k >= 0 and (ts := self._seek_ts.get(self.keyframes[k])) is not None:
            self._c.seek(ts, stream=self._st, backward=True, any_frame=False)
        else:  # no keyframe known: by time, from the start for a retry
            t = 0.0 if earlier or k < 0 else self.timestamps([i])[0]
            self._c.seek(int((t + self._start) / self._tb), stream=self._st, backward=True, any_frame=False)
        self._frames = self._c.decode(self._st)
        self._next = self.keyframes[k] if k >= 0 else 0

    def _frame(self, i: int) -> tuple[np.ndarray, int]:
        """Frame `i` and the frames decoded to reach it."""
        cost = 0
        for earlier in (0, 1):  # a seek that lands past the frame (an odd index, an open GOP): one keyframe earlier
            if earlier or not _decodes_on_to(self.keyframes, self._next, i):
                self._seek(i, earlier)
            for frame in self._frames:
                cost += 1
                j = self._index(frame)
                self._next = j + 1
                if j == i:
                    return self._upright(frame), cost
                if j > i:
                    break
            self._next = None
        raise ValueError(f"frame {i} not found after seeking (variable frame rate, or fewer frames than the "
                         f"container says: {self.num_frames})")

    def _keyframe(self, i: int) -> tuple[np.ndarray, int]:
        """Keyframe `i` alone: seek to it, decode its packet and drain the decoder (which would otherwise hold
        the frame back until later packets arrive, reading them). Packets before it (a seek that landed early)
        are read, not decoded."""
        cc = self._st.codec_context
        for earlier in (0, 1):
            self._seek(i, earlier)
            self._next = None  # drained: whatever comes next starts with a seek
            for packet in self._c.demux(self._st):
                if not packet.size or not packet.is_keyframe or packet.pts is None:
                    continue
                j = self._index(packet)
                if j < i:
                    continue
                if j > i:
                    break
                got = [*cc.decode(packet), *cc.decode(None)]
                cc.flush_buffers()
                for frame in got:
                    if self._index(frame) == i:
                        return self._upright(frame), len(got)
                break
        raise ValueError(f"keyframe {i} not found after seeking to it")

    def frames(self, indices: list[int]) -> np.ndarray:
        keys_only = all(i in self._keyset for i in indices)
        out, self.decoded = [], []
        for i in indices:
            img, cost = self._keyframe(i) if keys_only else self._frame(i)
            out.append(img)
            self.decoded.append(cost)
        return np.stack(out)

    def timestamps(self, indices: list[int]) -> np.ndarray:
        if self._pts is not None:
            return np.round(np.asarray([self._pts[i] for i in indices], np.float64) * self._tb - self._start, 6)
        return np.asarray(indices, dtype=np.float64) / self.fps

    def close(self) -> None:
        self._c.close()


def _is_mpeg_ts(path: str | BinaryIO) -> bool:
    """Whether `path` is an MPEG transport stream (188-byte packets, or 192 with a timecode: M2TS), by its sync
    bytes. decord numbers such a stream's frames wrongly after a seek (measured: frames 3, 17, 29 of a 30-frame
    clip came back as 11, 25, 27, "frames corrupted and recovered from nearest frames"), so "decord" reads
    them with PyAV."""
    if not isinstance(path, str):
        return False
    with open(path, "rb") as f:
        head = f.read(3 * 192 + 8)
    return any(len(head) > start + 2 * size and all(head[start + k * size] == 0x47 for k in range(3))
               for start, size in ((0, 188), (4, 192)))


def check_video_backend(backend: str) -> None:
    """Refuse a name `open_video` cannot take, before any work."""
    if backend not in ("decord", "pyav", "nvdec") and ":" not in backend:
        raise ValueError(f"video_backend must be decord, pyav, nvdec or module:Class, got {backend!r}")


def open_video(path: str | BinaryIO, backend: str = "decord") -> VideoDecoder:
    """Open `path` with a video backend: "decord" (PyAV for an MPEG-TS, and for a file decord's reader refuses
    and PyAV opens: a truncated MP4's frames before the cut), "pyav" (which also takes a seekable binary file object),
    "nvdec" (`pipeline.nvdec`: NVIDIA's decode engine, PyAV where there is none), or a plugin named
    "package.module:Class" (or "/path/to/plugin.py:Class", for a file not on the Python path of every worker)
    whose class takes the path and implements `VideoDecoder`: a decoder of your own, or a test double that hangs
    or crashes."""
    if backend == "decord":
        if _is_mpeg_ts(path):
            return PyAVVideo(path)
        try:
            return DecordVideo(path)
        except Exception as e:  # noqa: BLE001 - decord's reader refuses what FFmpeg's demuxer reads (a cut file)
            try:
                return PyAVVideo(path)
            except Exception:  # noqa: BLE001 - not a video PyAV reads either: decord's error says why
                raise e from None
    if backend == "pyav":
        return PyAVVideo(path)
    if backend == "nvdec":
        from .nvdec import NvdecVideo

        return NvdecVideo(path)
    check_video_backend(backend)
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


# Remote reads when only keyframes are decoded: one packet per group of pictures, far apart, so a smaller block
# than REMOTE_BLOCK (benchmarks/ranged_reads.py, a 10-segment clip: keyframes only read 0.57x the object with
# 16 KiB blocks, 1.05x with 64 KiB; every frame decoded reads 1.24x and 1.34x, but in 3.4x the requests, so
# sequential reads keep REMOTE_BLOCK).
KEYFRAME_BLOCK = 1 << 14


@contextlib.contextmanager
def read_video(uri: str, storage_options: dict | None = None, backend: str = "decord", *,
               block_size: int = REMOTE_BLOCK) -> Iterator[VideoDecoder]:
    """The video at `uri` opened with `backend`, closed after the block. Local files go to the backend as paths;
    remote ones are read by byte ranges of `block_size` (`storage.open_ranged`) through PyAV, for "decord" too
    (see the module docstring). A plugin backend takes a path, so a remote video is copied for it
    (`storage.local_copy`)."""
    with contextlib.ExitStack() as stack:
        if protocol_of(uri) != "file" and backend in ("decord", "pyav"):
            # blocks kept (LRU): a segment's open reads the header block, the index (MP4 `moov`, often at the end)
            # and the header block again (FFmpeg's stream probe); a read-ahead cache holds one range only
            f = stack.enter_context(open_ranged(uri, storage_options, block_size=block_size, cache_type="blockcache"))
            v: VideoDecoder = PyAVVideo(f)
        else:  # a local file's own path
            v = open_video(stack.enter_context(local_copy(uri, storage_options)), backend)
        stack.callback(v.close)
        yield v


REMOTE_IMAGE_HEAD = 1 << 18  # the bytes a remote image's probe reads first: its header, where PIL finds its size


def _image_file(fs, path: str, uri: str) -> BinaryIO:
    """An image's bytes to decode: a local file as it is, a remote one by one GET (`fs.cat_file`). Opened as a file,
    s3fs first asks for the object's size and ETag: a small image cost a HEAD and a GET to decode, and with the
    probe's, 3 HEADs and 2 GETs, a request a few ms even on loopback."""
    if protocol_of(uri) == "file":
        return fs.open(path, "rb")
    return io.BytesIO(_whole(fs, path))


def _whole(fs, path: str) -> bytes:
    """A remote file's bytes in one GET: s3fs asks for an object's size first to split a large one into
    concurrent parts, unless told not to."""
    return fs.cat_file(path, **({"max_concurrency": 1} if "s3" in fs.protocol else {}))


def _pil_size(f) -> tuple[int, int] | None:
    from PIL import Image

    with Image.open(f) as im:
        return None if im.mode.startswith(("I", "F")) else im.size


def _image_size(uri: str, storage_options: dict | None) -> tuple[int, int] | None:
    """(width, height) of an image, or None when it is read as a raster: beyond PIL's decompression-bomb limit, or
    of more than 8 bits a sample (16-bit or float PNGs: PIL's RGB conversion clips them, so a 16-bit PNG reached the
    model all white; as a raster it is stretched as a 16-bit TIFF is). A remote image's first `REMOTE_IMAGE_HEAD`
    bytes come in one GET, and the rest only when its header goes on past them."""
    from PIL import Image, UnidentifiedImageError

    fs, path = filesystem(uri, storage_options)
    try:
        if protocol_of(uri) == "file":
            with fs.open(path, "rb") as f:
                return _pil_size(f)
        head = fs.cat_file(path, start=0, end=REMOTE_IMAGE_HEAD)
        try:
            return _pil_size(io.BytesIO(head))
        except (OSError, SyntaxError, ValueError):  # no size in the first bytes (or no image: said with them all)
            if len(head) < REMOTE_IMAGE_HEAD:
                raise
        return _pil_size(io.BytesIO(_whole(fs, path)))
    except Image.DecompressionBombError:
        return None
    except UnidentifiedImageError:  # its text names the file object PIL was given, an address that changes
        raise ValueError("not an image format PIL reads") from None


def probe(uri: str, storage_options: dict | None = None, *, video_backend: str = "decord",
          raster_pixels: int = 64_000_000, size: int | None = None) -> MediaInfo:
    """Kind, size, frame count, rate and keyframes of a media file, from its headers and index (a remote video's
    by byte ranges); `size`: its bytes, when a listing gave them. Raises ValueError naming the cause."""
    fs, path = filesystem(uri, storage_options)
    try:
        size = fs.size(path) if size is None else size
    except Exception as e:
        raise translate_error(e, uri) from e
    if not size:
        raise ValueError(f"{uri}: empty file (0 bytes)")
    kind = media_kind(uri)
    if kind is None:
        raise ValueError(f"{uri}: not a supported media file (unknown extension)")
    if kind == "video":
        try:
            with read_video(uri, storage_options, video_backend) as v:
                keys = getattr(v, "keyframes", None)
                times = v.timestamps(list(range(v.num_frames))) if v.num_frames else []
                info = MediaInfo("video", v.width, v.height, v.num_frames, v.fps,
                                 None if keys is None else tuple(int(k) for k in keys),
                                 None if _evenly_spaced(times) else tuple(float(t) for t in times))
        except Exception as e:
            raise ValueError(f"{uri}: cannot decode video ({one_line(e)})") from e
        if info.num_frames <= 0:
            raise ValueError(f"{uri}: video has no frames")
        return info
    if kind == "image":
        try:
            dims = _image_size(uri, storage_options)
        except Exception as e:
            raise ValueError(f"{uri}: cannot read image ({one_line(e)})") from e
        if dims is not None and dims[0] * dims[1] <= raster_pixels:
            return MediaInfo("image", *dims)
    try:
        with open_raster(uri, storage_options) as ds:
            return MediaInfo("raster", ds.width, ds.height)
    except Exception as e:
        raise ValueError(f"{uri}: cannot open raster ({type(e).__name__}: {e})") from e


_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _row(unit: WorkUnit, index: int, pts: float | None, width: int, height: int, window=(0, 0, 0, 0),
         offset=(0, 0), scale=(1.0, 1.0), raster: RasterPlan | None = None, all_nodata: bool = False,
         decoded: int = 1) -> dict[str, Any]:
    """A frame's columns. `offset` (source pixels) and `scale` (image pixels per source pixel) map the decoded
    image's boxes back to the source; `transform` (affine, source pixels -> map) and `crs` place them;
    `decoded`: the frames decoded to produce this one (itself, and those before it since the unit's previous
    sampled frame)."""
    x, y, w, h = window if window[2] else (0, 0, width, height)
    return {
        "frame_id": frame_id(unit.source, index), "source": unit.source, "source_kind": unit.kind,
        "frame_index": index, "pts_s": pts, "width": width, "height": height,
        "window_x": x, "window_y": y, "window_width": w, "window_height": h,
        "offset_x": offset[0], "offset_y": offset[1], "scale_x": scale[0], "scale_y": scale[1],
        "crs": raster.crs if raster else None, "transform": raster.transform if raster and raster.crs else _IDENTITY,
        "all_nodata": all_nodata, "stac_item": unit.stac_item or None, "datetime": unit.datetime or None,
        "decoded_frames": decoded,
    }


def _batch(rows: list[dict], images: list[np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {k: [r[k] for r in rows] for k in rows[0]}
    out["image"] = np.stack(images)
    return out


class _FrameError(ValueError):
    """An error at a video frame: its unit ends there, its error row names the frame (`frame_index`, which crosses
    the decoding child process with it), and the frames decoded before it are kept."""

    def __init__(self, message: str, frame_index: int):
        super().__init__(message)
        self.frame_index = frame_index

    def __reduce__(self):  # pickled from the decoding child process with its frame
        return type(self), (self.args[0], self.frame_index)


class UndecodableFrame(_FrameError):
    """A video frame the decoder cannot decode (a damaged or truncated file)."""

    error_type = "UndecodableFrame"


class DecoderOutputError(_FrameError):
    """Frames a video backend returned that are not what it promises (`VideoDecoder.frames`): another count than
    the indices asked for, not `[N, H, W, 3]` uint8, or (a plugin's) not of the size it declared; the frame named
    is the batch's first."""


def _checked_frames(frames: Any, idx: list[int], unit: WorkUnit, backend: str) -> np.ndarray:
    """`frames`, what the decoder returned for `idx`, as the `[len(idx), H, W, 3]` uint8 array the pipeline takes;
    else DecoderOutputError. Fewer frames made a batch whose columns Ray could not line up, failing the whole
    job; float frames in 0..1 were black once cast to uint8. The size is checked against what the decoder declared
    at the probe (the unit's) for a plugin only: the built-in decoders give each frame at its own size, which a
    stream may change midway, and a row records its frame's."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        why = f"frames of dtype {frames.dtype}, expected uint8 (0..255)"
    elif frames.ndim != 4 or frames.shape[3] != 3:
        why = f"an array of shape {list(frames.shape)}, expected [{len(idx)}, H, W, 3]"
    elif len(frames) != len(idx):
        why = f"{len(frames)} frames for the {len(idx)} asked for"
    elif ":" in backend and unit.width and (frames.shape[2], frames.shape[1]) != (unit.width, unit.height):
        why = f"frames of {frames.shape[2]}x{frames.shape[1]}, not the {unit.width}x{unit.height} it declared"
    else:
        return frames
    name = backend.rsplit("/", 1)[-1]  # a plugin file's name, not its whole path
    raise DecoderOutputError(f"{unit.source}: video backend {name} returned {why} (frames {idx[0]}-{idx[-1]})",
                             idx[0])


def _frames_before_failure(unit: WorkUnit, v: VideoDecoder, idx: list[int], e: Exception
                           ) -> tuple[list[int], np.ndarray | None, list[int], UndecodableFrame | None]:
    """After a batch failed to decode: its frames decoded one by one by `v` (a fresh decoder: decord's reader
    fails on after a failed batch) up to the first that fails (indices, frames, frames decoded for each), and the
    error for that one, None when each decodes alone (a truncated file lost a whole segment's decodable frames,
    its error row at the segment's start, in decord's C++ log text)."""
    if len(idx) == 1:
        return [], None, [], _undecodable(unit, idx[0], e)
    got: list[np.ndarray] = []
    costs: list[int] = []
    failed = None
    for j in idx:
        try:
            got.append(v.frames([j])[0])
            costs.append((getattr(v, "decoded", None) or [1])[0])
        except Exception as ej:  # noqa: BLE001
            failed = _undecodable(unit, j, ej)
            break
    return idx[:len(got)], np.stack(got) if got else None, costs, failed


def _undecodable(unit: WorkUnit, j: int, e: Exception) -> UndecodableFrame:
    """Frame `j`'s error, in one line without decord's log prefixes ("[07:20:14] .../threaded_decoder.cc:292: ")."""
    import re

    why = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", one_line(e)).strip()
    return UndecodableFrame(f"{unit.source}: frame {j} cannot be decoded (damaged or truncated file?): {why}", j)


def decode_unit(unit: WorkUnit, *, sampling: Sampling, batch_size: int, done: frozenset[str] | set[str] = frozenset(),
                storage_options: dict | None = None, video_backend: str = "decord") -> Iterator[dict[str, Any]]:
    """Yield batches (column dicts with an `image` column `[B, H, W, 3]` uint8) of the unit's sampled,
    not yet written frames, each row with `cpu_decode_s`: its share of the CPU time this process spent on the
    batch (reading and decoding, skipped frames included). Exceptions propagate; the caller turns them into error
    rows."""
    return with_cpu_time(_on_gpu_counted(_decode_unit(unit, sampling=sampling, batch_size=batch_size, done=done,
                                                      storage_options=storage_options, video_backend=video_backend)),
                         "cpu_decode_s")


def _on_gpu_counted(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """`batches`, each with `nvdec_frames` (1 for a frame NVIDIA's engine decoded, else 0: the sink sums it), on
    every batch of every kind, so that blocks of mixed units keep one schema."""
    for b in batches:
        b.setdefault("nvdec_frames", [0] * len(b["frame_id"]))
        yield b


def with_cpu_time(batches: Iterator[dict[str, Any]], column: str) -> Iterator[dict[str, Any]]:
    """`batches`, each with `column`: the CPU seconds of this process (all its threads) from the previous batch's
    hand-over to this one's, shared equally by its rows (a stage's core time per frame, summed by the sink)."""
    t = time.process_time()
    for b in batches:
        now = time.process_time()
        n = len(b["frame_id"])
        b[column] = [(now - t) / n] * n
        yield b
        t = time.process_time()


def _decode_unit(unit: WorkUnit, *, sampling: Sampling, batch_size: int, done, storage_options,
                 video_backend: str) -> Iterator[dict[str, Any]]:
    if unit.kind == "video":
        wanted = [i for i in sample_indices(unit.num_frames, unit.fps, sampling, unit.start, unit.stop,
                                            unit.keyframe_indices(), unit.frame_times())
                  if frame_id(unit.source, i) not in done]
        if not wanted:
            return
        block = KEYFRAME_BLOCK if sampling.keyframes else REMOTE_BLOCK
        with contextlib.ExitStack() as stack:
            v = stack.enter_context(read_video(unit.uri, storage_options, video_backend, block_size=block))
            for i in range(0, len(wanted), batch_size):
                idx = wanted[i:i + batch_size]
                try:
                    frames, failed = v.frames(idx), None
                    decoded = list(getattr(v, "decoded", None) or [1] * len(idx))
                except Exception as e:  # noqa: BLE001 - which frame: the ones before it are kept
                    stack.close()  # the failed decoder, for a fresh one that goes on if each frame decodes alone
                    v = stack.enter_context(read_video(unit.uri, storage_options, video_backend, block_size=block))
                    idx, frames, decoded, failed = _frames_before_failure(unit, v, idx, e)
                if not idx:
                    raise failed
                frames = _checked_frames(frames, idx, unit, video_backend)
                pts = v.timestamps(idx)
                if len(pts) > 1 and not np.all(np.diff(pts) > 0):
                    raise ValueError(f"{unit.source}: frame timestamps are not increasing around frames {idx[0]}-{idx[-1]}"
                                     " (broken index); try --video-backend pyav")
                rows = [_row(unit, j, float(p), frames.shape[2], frames.shape[1], decoded=d)
                        for j, p, d in zip(idx, pts, decoded)]
                batch = _batch(rows, list(frames))
                batch["nvdec_frames"] = [int(getattr(v, "backend", None) == "nvdec")] * len(idx)
                yield batch
                if failed is not None:
                    raise failed
    elif unit.kind == "image":
        if frame_id(unit.source, 0) in done:
            return
        from PIL import Image

        fs, path = filesystem(unit.uri, storage_options)
        with _image_file(fs, path, unit.uri) as f, Image.open(f) as im:
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
