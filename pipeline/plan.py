"""The Ray Data plan: URIs -> work units -> decoded frame batches -> detector actors -> Parquet.

    plan_work(sources)                 Ray tasks: probe each new file (headers, indexes), cut videos at keyframes
                                       (the output records what they found: pipeline.known); the planned frame
                                       count is known up front
    from_arrow(units)                  a block per video segment or raster unit, images in runs
      .map_batches(decode)             CPU tasks: sampled uint8 frames, a generator of batches
      .map_batches(Detector, ...)      actor pool: model resident on its device
      .write_datasink(FrameSink)       atomic Parquet files, deterministic names, bundled to min rows

Ray Data's streaming executor provides the scheduling, backpressure and task retries of the work; the planning
round retries by hand only to find which file crashed a worker. Fractional CPU reservations let decoding and
detection run side by side on a small node. Failures of one file, segment or frame become rows in
`OUTPUT/errors/`. Nothing here imports torch: only the detector actors load a model.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa

from fpn_model.config import TileConfig, check_precision
from fpn_model.memory import keep_freed_memory_env
from fpn_model.weights import InputSpec  # torch-free: no model is built here

from .decode import Sampling, check_video_backend, decode_unit, probe, sample_indices, with_cpu_time
from .isolate import ChildTimeout, IsolationError, process_child
from .known import known_units, probe_key, record
from .output import Output, error_row, frame_id
from .raster import RasterPlan, RasterSettings, Stretch, aoi_geometry, open_rasters, plan_raster
from .sizing import WRITE_CPUS
from .sources import Source, WorkUnit
from .stac import check_search

__all__ = ["Plan", "Resources", "Planned", "detector_pool", "plan_units", "plan_work", "plan_known", "count_planned",
           "raster_summary", "unwritten", "build_dataset", "drop_duplicates", "execute"]

log = logging.getLogger(__name__)
# a run's detectors may exit this many times each after a device error, to be started anew (pipeline.detect)
DEVICE_EXITS_PER_DETECTOR = 3
PROBE_ERRORS_LOGGED = 10  # sources that cannot be read, one line each; then how many more
IMAGES_PER_BLOCK = 64  # the most images one decode task reads (see _unit_blocks)


@dataclass(frozen=True)
class Resources:
    """How the plan uses the cluster."""

    # detector actors (one model copy each); None: one per GPU when detectors get GPUs, else 1 (pipeline.sizing.fit)
    num_detectors: int | None = None
    # an autoscaling pool of num_detectors..max_detectors actors: Ray Data adds actors while work waits and the
    # cluster has room for them (GPUs that join), and lets idle ones go; None: a fixed pool
    max_detectors: int | None = None
    gpus_per_detector: float | None = None  # None: 1 on a cluster with GPUs, else 0 (the CPU)
    cpus_per_detector: float = 1.0
    decode_cpus: float = 0.5  # CPU reservation of each decode task (fractional: decode beside detect)
    max_batch: int = 16  # most images (tiles) per forward pass
    # exact | bf16 | int8 (CPU) | fp16 (GPU): fpn_model.predict.Predictor; None: the default the checkpoint records
    # for the detectors' device (fpn_model.weights.default_precision; jobs.runner resolves it), else exact
    precision: str | None = None
    calls_per_detector: int | None = None  # batches a detector runs at once (None: pipeline.sizing.fit decides)
    compile: bool = False  # torch.compile the backbone, neck and RPN head in each detector

    def __post_init__(self) -> None:
        if self.calls_per_detector is not None and self.calls_per_detector < 1:
            raise ValueError(f"calls_per_detector must be >= 1, got {self.calls_per_detector}")
        for name in ("num_detectors", "max_detectors"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if None not in (self.max_detectors, self.num_detectors) and self.max_detectors < self.num_detectors:
            raise ValueError(f"max_detectors must be >= num_detectors ({self.num_detectors}), got {self.max_detectors}")
        for name in ("gpus_per_detector", "cpus_per_detector", "decode_cpus"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.precision is not None:  # for the device once it is decided (pipeline.sizing.fit), if it is not
            check_precision(self.precision, self.device_type if self.gpus_per_detector is not None else None)

    @property
    def device_type(self) -> str:
        """Where the detectors run: "cuda" or "cpu"."""
        return "cuda" if self.gpus_per_detector else "cpu"


@dataclass(frozen=True)
class Plan:
    """One job: what to read, how to sample and tile, which model, where to write."""

    inputs: tuple[str, ...]
    output: str
    checkpoint: str
    model_id: str
    # keyed by protocol or URL prefix ({"s3": {...}, "s3://bucket/": {...}}): inputs, and the output unless
    # output_storage_options is given (pipeline.storage.options_for picks each URL's own set)
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    output_storage_options: dict[str, Any] | None = field(default=None, hash=False)
    sampling: Sampling = Sampling()
    tile: TileConfig | None = TileConfig()
    batch_size: int | str = 8  # frames per detector call, or "auto" (pipeline.sizing.auto_batch, once Ray is up)
    # fewest frames per Parquet file (detector output bundled before writing; the last file of a run may hold
    # fewer); None: pipeline.sink.rows_per_file (1/20 of the run's frames, at least a batch, at most 1000)
    min_rows_per_file: int | None = None
    segment_frames: int = 256
    raster_pixels: int = 64_000_000
    raster_window: int = 2048
    raster_margin: int = 128
    windows_per_unit: int = 4
    video_backend: str = "decord"  # decord | pyav | nvdec | module:Class (a VideoDecoder)
    decode_timeout_s: float = 300.0  # longest wait for the next decoded batch; a hung decoder is retried once
    # a source changed since a run wrote frames of it (size, ETag or mtime): "error" (a SourceChanged row; its old
    # frames stay) or "replace" (its old frames are removed and the new version processed)
    changed_sources: str = "error"
    # a source last written less than this many seconds before the run (a file still being written) is left for a
    # later run (`pipeline.sources.settled`); 0: every source is read
    min_age_s: float = 0.0
    resources: Resources = Resources()
    model_overrides: dict[str, Any] = field(default_factory=dict, hash=False)
    # rasters (pipeline.raster): bands (1-based) in the model's channel order (None: by band name, else the first
    # ones; names: STAC band assets combined); stretch (None: the model's recorded value range, uint8 as is, else 2-98 percentiles per raster);
    # gsd: metres per pixel to resample georeferenced rasters to (None: the model's training GSD), unless
    # resample is false; aoi: {bbox: [...], crs: ...} or {geometry: GeoJSON, crs: ...} limits the windows read
    bands: tuple[int | str, ...] | None = None
    stretch: Stretch | None = None
    gsd: float | None = None
    resample: bool = True
    aoi: dict[str, Any] | None = field(default=None, hash=False)
    stac_asset: str = "visual"  # the asset of each STAC item to read
    stac_search: dict[str, Any] | None = field(default=None, hash=False)  # {url, collections, bbox, datetime, limit}

    def __post_init__(self) -> None:
        if not self.inputs and not self.stac_search:
            raise ValueError("inputs: at least one input (or a stac_search) is required")
        if not self.output:
            raise ValueError("output: an output location is required")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            raise ValueError(f"batch_size must be a number >= 1 or auto, got {self.batch_size!r}")
        counts = ("segment_frames", "raster_window", "windows_per_unit", "raster_pixels")
        for name in counts if self.batch_size == "auto" else ("batch_size", *counts):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_rows_per_file is not None and self.min_rows_per_file < 1:
            raise ValueError(f"min_rows_per_file must be >= 1, got {self.min_rows_per_file}")
        check_video_backend(self.video_backend)
        if self.decode_timeout_s <= 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if self.changed_sources not in ("error", "replace"):
            raise ValueError(f"changed_sources must be error or replace, got {self.changed_sources!r}")
        if not 0 <= self.min_age_s < float("inf"):
            raise ValueError(f"min_age_s must be >= 0 (seconds), got {self.min_age_s}")
        if self.bands is not None:
            object.__setattr__(self, "bands", tuple(self.bands))
            numbers = all(isinstance(b, int) and b >= 1 for b in self.bands)
            if not self.bands or not (numbers or all(isinstance(b, str) and b for b in self.bands)):
                raise ValueError(f"bands must be raster band numbers (1, 2, ...) or STAC asset keys, got "
                                 f"{list(self.bands)}")
        if self.gsd is not None and not self.gsd > 0:
            raise ValueError(f"gsd must be > 0 (metres per pixel), got {self.gsd}")
        if self.aoi is not None:
            aoi_geometry(self.aoi)
        if self.stac_search is not None:
            check_search(self.stac_search)

    def raster_settings(self, model_input: InputSpec) -> RasterSettings:
        """The raster settings of this job for a model expecting `model_input`; ValueError when the bands
        chosen do not fit the model."""
        if self.bands is not None and len(self.bands) != len(model_input.bands):
            raise ValueError(f"bands {list(self.bands)}: the model takes {len(model_input.bands)} bands "
                             f"({', '.join(model_input.bands)})")
        return RasterSettings(window=self.raster_window, margin=self.raster_margin,
                              bands=None if self.asset_bands else self.bands,
                              stretch=self.stretch, target_gsd_m=(self.gsd or model_input.gsd_m) if self.resample else None,
                              model_bands=model_input.bands, model_value_range=model_input.value_range, aoi=self.aoi)

    @property
    def asset_bands(self) -> tuple[str, ...]:
        """The STAC band assets to combine (when `bands` names asset keys), else ()."""
        return tuple(self.bands) if self.bands and isinstance(self.bands[0], str) else ()

    @property
    def output_options(self) -> dict[str, Any]:
        """Storage options for the output's URLs."""
        return self.storage_options if self.output_storage_options is None else self.output_storage_options

    def identity(self, weights_sha256: str) -> dict[str, Any]:
        """The settings that change what a frame's row means (its detections; a raster window's id and pixels): an
        output holds frames of one identity only."""
        return {"model": self.model_id, "weights_sha256": weights_sha256,
                "model_overrides": dict(sorted(self.model_overrides.items())),
                "tile": None if self.tile is None else dataclasses.asdict(self.tile),
                "raster_pixels": self.raster_pixels, "raster_window": self.raster_window,
                "raster_margin": self.raster_margin, "bands": None if self.bands is None else list(self.bands),
                "stretch": None if self.stretch is None else json.loads(json.dumps(dataclasses.asdict(self.stretch))),
                "gsd": self.gsd, "resample": self.resample}


def plan_units(uri: str, source: str, *, segment_frames: int, raster_pixels: int, window: int | None = None,
               windows_per_unit: int, storage_options: dict | None = None, video_backend: str = "decord",
               raster: RasterSettings | None = None, stac_item: str = "", datetime: str = "",
               assets: tuple[str, ...] = (), size: int | None = None) -> Iterator[WorkUnit]:
    """Probe `uri` and yield its units. Raises on unreadable input (the caller records the error). `raster`:
    the job's raster settings (default: windows of `window` pixels, nothing else set); `assets`: band assets
    combined into one raster (`uri` is the first); `size`: its bytes, when the listing gave them.

    A video is cut at keyframes: each segment after the first starts at the first keyframe at or after a
    multiple of `segment_frames`, so every segment begins where decoding can begin and no two segments decode
    the same frames (a group of pictures longer than `segment_frames` makes a longer segment). The keyframes
    come from the container's index (`probe`); a decoder that reports none is cut every `segment_frames`."""
    info = probe(uri, storage_options, video_backend=video_backend, raster_pixels=raster_pixels, size=size)
    item = dict(stac_item=stac_item, datetime=datetime)
    if info.kind == "video":
        n, keys = info.num_frames, info.keyframes
        if keys is None:
            cuts = list(range(0, n, segment_frames))
        else:
            cuts = sorted({0} | {keys[k] for m in range(segment_frames, n, segment_frames)
                                 if (k := bisect.bisect_left(keys, m)) < len(keys)})
        for start, stop in zip(cuts, cuts[1:] + [n]):
            inside = "" if keys is None else ",".join(str(k) for k in keys[bisect.bisect_left(keys, start):
                                                                             bisect.bisect_left(keys, stop)])
            times = "" if info.times is None else ",".join(str(round(t * 1e6)) for t in
                                                             info.times[max(start - 1, 0):stop])
            yield WorkUnit(uri, source, "video", start, stop, n, info.fps, info.width, info.height,
                           keyframes=inside, times=times, **item)
    elif info.kind == "raster":
        settings = raster or RasterSettings(window=window or 2048)
        try:
            with open_rasters(list(assets or [uri]), storage_options) as datasets:
                plan = plan_raster(datasets[0], settings, band_assets=list(zip(assets, datasets)) if assets else None)
        except ValueError as e:
            raise ValueError(f"{uri}: {e}") from e
        n = len(plan.window_ids())
        if not n:
            raise NothingToRead(f"the aoi meets none of its {len(plan.windows())} windows: nothing read")
        for start in range(0, n, windows_per_unit):
            yield WorkUnit(uri, source, "raster", start, min(start + windows_per_unit, n), n, 0.0, info.width,
                           info.height, plan.to_json(), **item)
    else:
        yield WorkUnit(uri, source, "image", 0, 1, 1, 0.0, info.width, info.height, **item)


class NothingToRead(Exception):
    """A source with nothing the job asks for (a raster its aoi misses, a video its time range misses): no work
    unit, and no error."""


def _check_time_range(plan: Plan, units: list[dict[str, Any]]) -> None:
    """Raise NothingToRead when the plan's time range meets no frame of a video (its times count from its
    first frame)."""
    s = plan.sampling
    if not units or units[0]["kind"] != "video" or (s.start_s is None and s.end_s is None):
        return
    if any(_sampled(plan, u) for u in units):
        return
    last = WorkUnit(**units[-1])
    end = (last.frame_times() or {}).get(last.stop - 1, (last.stop - 1) / last.fps if last.fps else 0.0)
    span = f"{s.start_s or 0:g} s to {'the end' if s.end_s is None else f'{s.end_s:g} s'}"
    raise NothingToRead(f"the time range {span} meets none of its {last.num_frames} frames (0 to {end:.2f} s): "
                        "nothing read")


def _probe_sources(plan: Plan, raster: RasterSettings, rows: list[dict[str, Any]]) -> list[list[dict] | dict | str]:
    """A planning task: for each source row its work units (rows), its error row when it cannot be read, or why
    there is nothing to read in it (the time range is checked by `_planned`, on recorded units too)."""
    out: list[list[dict] | dict] = []
    for row in rows:
        try:
            out.append([u.to_row() for u in plan_units(
                row["uri"], row["source"], segment_frames=plan.segment_frames, raster_pixels=plan.raster_pixels,
                windows_per_unit=plan.windows_per_unit, storage_options=plan.storage_options,
                video_backend=plan.video_backend, raster=raster, stac_item=row["stac_item"],
                datetime=row["datetime"], assets=tuple(row["assets"]), size=row.get("size"))])
        except NothingToRead as e:
            out.append(str(e))
        except Exception as e:  # noqa: BLE001 - any failure of one input is that input's error row
            out.append(error_row(row["source"], "probe", e))
    return out


class _Decode:
    """map_batches (a block of units per call: a video segment, a raster's windows or a run of images): yields
    frame batches, decoded in this worker's isolated child process (`pipeline.isolate`), which bounds each wait by
    `plan.decode_timeout_s` and survives a decoder crash.

    A hung or crashed decoder is replaced and its unit retried once, skipping the frames already yielded; when
    the retry fails the same way, or the decoder raises, the unit ends with one error row and the job goes on. The
    call's error rows are one file, written when its block is done (a file per failed unit made 5,000 damaged
    snapshots 5,000 files: a PUT each on S3, and a GET each for every status and query).
    """

    def __init__(self, plan: Plan, out: Output, done: frozenset[str]):
        self.plan, self.out, self.done = plan, out, done
        self.timeout_s = plan.decode_timeout_s

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        failed: list[tuple[WorkUnit, dict[str, Any]]] = []
        for k in range(len(batch["uri"])):
            yield from self._unit(WorkUnit(**{f: _scalar(batch[f][k]) for f in WorkUnit.__dataclass_fields__}), failed)
        if failed:  # named by the units that failed: a retried block with the same failures rewrites the file
            self.out.write_errors([row for _, row in failed],
                                  "decode:" + "\n".join(f"{u.source}:{u.start}" for u, _ in failed),
                                  scopes=[_scope(u) for u, _ in failed])

    def _unit(self, unit: WorkUnit, failed: list[tuple[WorkUnit, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        # only this unit's written ids go to the child: a resumed job's whole done set would be pickled per unit
        done = {i for i in (frame_id(unit.source, k) for k in unit.frame_indices()) if i in self.done}
        for attempt in (1, 2):
            try:
                for b in self._decode(unit, frozenset(done)):
                    done.update(b["frame_id"])  # a retry skips what was yielded
                    yield b
                return
            except IsolationError as e:
                if attempt == 1:
                    log.warning("decoder %s on %s; retrying in a fresh process", _hang_or_crash(e),
                                _unit_name(unit))
                    continue
                failed.append((unit, _failure(unit, f"{_unit_name(unit)}: decoder {_hang_or_crash(e)}, twice",
                                              "DecodeTimeout" if isinstance(e, ChildTimeout) else "DecoderCrashed")))
            except Exception as e:  # noqa: BLE001 - a decoder error ends its unit only (no retry: it would repeat)
                failed.append((unit, _failure(unit, e, getattr(e, "error_type", type(e).__name__))))
            return

    def _decode(self, unit: WorkUnit, done: frozenset[str]) -> Iterator[dict[str, Any]]:
        p = self.plan
        # this worker's own CPU time per batch (receiving it from the child, handing it to Ray) is the transfer
        return with_cpu_time(process_child(("pipeline.decode",)).stream(
            decode_unit, unit, timeout_s=self.timeout_s, sampling=p.sampling, batch_size=p.batch_size, done=done,
            storage_options=p.storage_options, video_backend=p.video_backend), "cpu_transfer_s")


def _failure(unit: WorkUnit, e: BaseException | str, error_type: str) -> dict[str, Any]:
    """The error row of a unit that could not be decoded: at the video frame that failed, or at a raster unit's first
    window (the id its frame rows have: raster units' rows were all null, and told no unit of a raster from another);
    an image's holds none."""
    if unit.kind == "video":
        at = getattr(e, "frame_index", unit.start)
    else:
        at = unit.frame_indices()[0] if unit.kind == "raster" else None
    row = error_row(unit.source, "decode", e, at, error_type=error_type)
    log.warning("decode failed: %s (%s)", row["message"], row["error_type"])
    return row


def _scope(unit: WorkUnit) -> range | frozenset[int] | None:
    """The frame indices an error row of `unit`'s decode can hold (`_failure`): a failure an earlier run's row
    at one of them records is that row's (`Output.write_errors`). None: an image's, whose rows hold none."""
    if unit.kind == "video":
        return range(unit.start, unit.stop)
    return frozenset(unit.frame_indices()) if unit.kind == "raster" else None


def _unit_name(unit: WorkUnit) -> str:
    """The source and the part of it a unit covers, for messages."""
    if unit.kind == "image":
        return unit.source
    return f"{unit.source} {'frames' if unit.kind == 'video' else 'windows'} [{unit.start}, {unit.stop})"


def _hang_or_crash(e: IsolationError) -> str:
    if isinstance(e, ChildTimeout):
        return f"hung (no frames within {e.timeout_s:g} s)"
    return f"crashed ({e.signal_name})" if getattr(e, "signal_name", None) else f"crashed ({e})"


class Detector:
    """The detector actors' callable (`MapBatches(Detector)` in Ray's views): `pipeline.detect.Detector`, imported
    in the actor, so the driver never loads torch (measured: in a Ray Jobs driver, torch loaded after GDAL and the
    decoders failed with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so")."""

    def __init__(self, **kwargs: Any):
        from .detect import Detector

        self.detector = Detector(**kwargs)

    def __call__(self, batch: dict[str, Any]):
        return self.detector(batch)


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


@dataclass
class Planned:
    """The work of a job's sources: `units` (rows, in the order of the sources), `unread` (sources with nothing to
    read, and why), `probed` (what this run's probes found, to record: `pipeline.known.record` by canonical source)
    and `known` (sources planned from the output's record, not probed)."""

    units: list[dict[str, Any]]
    unread: dict[str, str]
    probed: dict[str, dict[str, Any]]
    known: int


def plan_known(plan: Plan, raster: RasterSettings, sources: list[Source], recorded: dict[str, dict]) -> Planned | None:
    """The work of `sources` from what earlier runs recorded of them (`Output.read_sources`), with no probe and no
    Ray; None when a source must be probed (`pipeline.known.known_units`). `raster`: the job's raster settings
    (`Plan.raster_settings` for its model)."""
    key = probe_key(plan, raster)
    found = [known_units(s, recorded.get(s.canonical), key) for s in sources]
    if any(f is None for f in found):
        return None
    return _planned(plan, sources, found, {}, known=len(sources))


def plan_work(plan: Plan, raster: RasterSettings, out: Output, sources: list[Source],
              recorded: dict[str, dict] | None = None) -> Planned:
    """Probe the sources and return their work: the planned frame count is known before decoding starts (progress,
    ETA). A source whose units an earlier run recorded (`recorded`: `Output.read_sources`), unchanged since and cut
    under the same settings, is planned from the record (`pipeline.known`): a rerun over an archive probes what is
    new. `raster`: the job's raster settings (`Plan.raster_settings` for its model).

    Probing reads headers and indexes (by ranges on object storage), in plain Ray tasks, a few per CPU of the
    cluster, each over a share of the sources: one round of tasks is the whole fixed cost (a Ray Data stage, two
    materialisations and a repartition cost seconds more per job). A source whose probe fails becomes its error
    row; a task whose worker dies (a decoder library crashing on a hostile file) is run again one source per
    task, so only the file that crashes it becomes an error row ("probe crashed")."""
    key = probe_key(plan, raster)
    found = [known_units(s, (recorded or {}).get(s.canonical), key) for s in sources]
    todo = [i for i, f in enumerate(found) if f is None]
    rows = [{"uri": s.url, "source": s.canonical, "stac_item": s.stac_item, "datetime": s.datetime,
             "assets": [str(a) for a in s.assets], "size": None if s.assets else s.size}
            for s in (sources[i] for i in todo)]
    results = _probe(plan, raster, rows, out) if rows else []
    probed = {}
    for i, r in zip(todo, results):
        found[i] = r
        if not isinstance(r, dict):  # an error row: probed again next time
            probed[sources[i].canonical] = record(r, key)
    return _planned(plan, sources, found, probed, known=len(sources) - len(todo))


def _planned(plan: Plan, sources: list[Source], found: list, probed: dict[str, dict[str, Any]], *,
             known: int) -> Planned:
    """The job's work from each source's units, error row or reason to read nothing (`found`): the time range is
    checked here, on probed and recorded units alike."""
    units: list[dict[str, Any]] = []
    unread: dict[str, str] = {}
    for s, r in zip(sources, found):
        if isinstance(r, list):
            try:
                _check_time_range(plan, r)
            except NothingToRead as e:
                r = str(e)
        if isinstance(r, str):
            unread[s.canonical] = r
        elif isinstance(r, list):
            units += r
    return Planned(units, unread, probed, known)


def _probe(plan: Plan, raster: RasterSettings, rows: list[dict[str, Any]],
           out: Output) -> list[list[dict] | dict | str]:
    """Each source row's probe result (`_probe_sources`), run in Ray tasks; the error rows written, one file."""
    import ray

    task = ray.remote(_probe_sources).options(num_cpus=plan.resources.decode_cpus, max_retries=0)
    shares = min(len(rows), 4 * max(1, int(ray.cluster_resources().get("CPU", 1))))
    order = [list(range(k, len(rows), shares)) for k in range(shares)]  # interleaved: big files spread out
    results: list[list[dict] | dict | str | None] = [None] * len(rows)
    pending = {task.remote(plan, raster, [rows[i] for i in idx]): idx for idx in order}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        idx = pending.pop(ready[0])
        try:
            for i, r in zip(idx, ray.get(ready[0])):
                results[i] = r
        except ray.exceptions.RayError as e:
            if len(idx) > 1:  # which source crashed it: one task each
                pending.update({task.remote(plan, raster, [rows[i]]): [i] for i in idx})
            else:
                results[idx[0]] = error_row(rows[idx[0]]["source"], "probe", f"probe crashed ({type(e).__name__})",
                                            error_type="ProbeCrashed")
    failed = [r for r in results if isinstance(r, dict)]
    for r in failed[:PROBE_ERRORS_LOGGED]:
        log.warning("probe failed for %s: %s", r["source"], r["message"])
    if len(failed) > PROBE_ERRORS_LOGGED:
        log.warning("probe failed for %d more sources (OUTPUT/errors/ has each)", len(failed) - PROBE_ERRORS_LOGGED)
    # one file for them all: a file (an S3 PUT, and a GET for each later reading of the output) per row made 5,000
    # files of 1.8 KB for 5,000 empty files among an archive's images
    out.write_errors(failed, "probe:" + "\n".join(r["source"] for r in failed))
    return results


def count_planned(plan: Plan, units) -> int:
    """Frames (or raster windows) the units will produce under the plan's sampling."""
    return sum(len(_sampled(plan, u)) if u["kind"] == "video" else u["stop"] - u["start"] for u in units)


def count_written(plan: Plan, units, done: frozenset[str]) -> int:
    """Of the frames the units will produce under the plan's sampling, those already in `done` (an earlier run
    wrote them). The output may hold more: frames an earlier run's sampling took and this one's does not."""
    if not done:
        return 0
    return sum(frame_id(u["source"], k) in done for u in units for k in _sampled(plan, u))


@functools.lru_cache(maxsize=4)
def _window_ids(raster: str) -> tuple[int, ...]:
    """The window ids of a raster plan's JSON, parsed once for all the units that share it (each unit's
    `WorkUnit.frame_indices` would parse it and list every window of the raster again)."""
    return tuple(RasterPlan.from_json(raster).window_ids())


def _sampled(plan: Plan, u: dict[str, Any]) -> list[int]:
    """The frame indices (raster window ids) unit `u` gives under the plan's sampling: its frames' ids are
    `frame_id(source, index)`."""
    if u["kind"] == "raster":
        return list(_window_ids(u["raster"])[u["start"]:u["stop"]])
    unit = WorkUnit(**u)
    if unit.kind != "video":
        return unit.frame_indices()
    keys = unit.keyframe_indices()  # None: the unit's decode fails under keyframes sampling
    return sample_indices(unit.num_frames, unit.fps, plan.sampling, unit.start, unit.stop,
                          [] if keys is None and plan.sampling.keyframes else keys, unit.frame_times())


def unwritten(plan: Plan, units, done: frozenset[str]) -> list[dict[str, Any]]:
    """The units with a frame not in `done`, and those whose decode fails (sampled by keyframes, a video without
    an index: its error row is written again). A unit that samples no frame (a time range ending before it, a step
    longer than it) is not: it was run again by each rerun, which started Ray for it. A rerun of a finished job
    starts no decoder and no detector."""
    if not done:  # a first run: every unit
        return list(units)
    return [u for u in units if any(frame_id(u["source"], k) not in done for k in _sampled(plan, u))
            or (plan.sampling.keyframes and u["kind"] == "video" and not u["keyframes"])]


def raster_summary(units) -> dict[str, Any]:
    """What `_job.json` says of the job's rasters: which are georeferenced (CRS, GSD, resampling scale), which
    keep pixel coordinates only (no CRS or transform), and notes on some (a transform fitted to ground control
    points, or why not)."""
    rasters: dict[str, RasterPlan] = {}
    for u in units:
        if u["kind"] == "raster" and u["source"] not in rasters:
            rasters[u["source"]] = RasterPlan.from_json(u["raster"])
    georef = {s: {"crs": r.crs, "gsd_m": None if r.gsd_m is None else round(r.gsd_m, 6), "scale": round(r.scale, 6),
                  **({} if r.scale_y is None else {"scale_y": round(r.scale_y, 6)}),
                  "bands": list(r.bands), "low": list(r.low), "high": list(r.high), "windows": len(r.window_ids())}
              for s, r in sorted(rasters.items()) if r.crs}
    notes = {s: r.note for s, r in sorted(rasters.items()) if r.note}
    return {"georeferenced": georef, "pixel_coordinates_only": sorted(s for s, r in rasters.items() if not r.crs),
            **({"notes": notes} if notes else {})}


def read_scale(r: dict[str, Any]) -> str:
    """How a georeferenced raster of `raster_summary` was read: "2x", or per axis when its pixels are not square."""
    return f"{r['scale']:g}x" + (f" across and {r['scale_y']:g}x down (pixels not square)" if r.get("scale_y") else "")


def detector_pool(r: Resources, calls: int):
    """The Ray Data actor pool of a job's detectors: fixed at `num_detectors`, or autoscaling up to `max_detectors`;
    each actor runs `calls` batches at once on threads of its own."""
    import ray.data

    n = r.num_detectors or 1
    sizes = {"size": n} if r.max_detectors is None else {"min_size": n, "max_size": r.max_detectors}
    return ray.data.ActorPoolStrategy(**sizes, max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)


def _batch_blocks(ds, rows: int):
    """`ds` (a map_batches whose calls yield batches of `rows` frames) with a block per batch, so that each detector
    call gets one batch and a unit's batches spread over the detectors' concurrent calls. As a block per unit, a
    unit went to one call whole: the job's last unit ran on one of a detector's lanes while the other idled (the
    issue's 80-frame AVI with mobilenet_v3 at 512 px: 6 batches, 12.6 s of a 40.8 s job, on one lane).

    Ray Data's streaming repartition does this, but `Dataset.repartition` gives it default remote args (a whole
    CPU), and Ray Data fuses it into the map before it only when their remote args agree: with the decode's
    fraction of a CPU it became a stage of its own whose 1-CPU tasks never found a free CPU on a node that
    detectors fill (a hang). So the operator is built here with the map's own remote args (Ray 2.60's logical
    operator; tests/test_sizing.py checks that it fuses)."""
    from ray.data import Dataset
    from ray.data._internal.logical.interfaces import LogicalPlan
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    up = ds._logical_plan.dag
    op = StreamingRepartition(target_num_rows_per_block=rows, input_dependencies=[up],
                              ray_remote_args=dict(up.ray_remote_args))
    return Dataset._from_parent(ds, LogicalPlan(op, ds.context))


UNIT_SCHEMA = pa.schema([(f.name, {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}[f.type])
                         for f in dataclasses.fields(WorkUnit)])


def _unit_blocks(units: list[dict[str, Any]], cpus: float) -> list[list[dict[str, Any]]]:
    """The work units in the blocks of the job's dataset, each block one decode task. A video segment or a raster's
    windows are a block each: the segments of a video decode in parallel, and their frames reach the sink as soon
    as they are detected instead of with the rest of their video. Images come in runs, about 4 blocks per CPU of the
    cluster, up to `IMAGES_PER_BLOCK` images a block: as a block and a task each, 30,000 small images took 52 s of
    the driver's before any detection, and a task's overhead bounded the job at ~40 images/s whatever the model."""
    per = max(1, min(IMAGES_PER_BLOCK, math.ceil(sum(u["kind"] == "image" for u in units) / (4 * max(cpus, 1)))))
    blocks, images = [], []
    for u in units:
        if u["kind"] != "image":
            blocks.append([u])
        elif len(images) == per:
            blocks.append(images)
            images = [u]
        else:
            images.append(u)
    return blocks + ([images] if images else [])


def build_dataset(plan: Plan, out: Output, units, done: frozenset[str] = frozenset(), *, threads: int | None = None,
                  calls: int = 1, counter: Any = None, worker_env: dict[str, str] | None = None):
    """The lazy Ray Dataset of frame rows for the work `units` (nothing runs until it is written); `threads`: torch
    threads of each detector (pipeline.sizing.fit), else the floor of its CPU reservation, shared by its `calls`
    concurrent batches (Ray Data runs that many calls of one actor at once, each on its own thread);
    `worker_env`: environment variables the cluster's workers start with already (the embedded node's)."""
    import ray.data

    r = plan.resources
    blocks = _unit_blocks(units, ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_arrow([pa.Table.from_pylist(b, schema=UNIT_SCHEMA) for b in blocks] or
                             [UNIT_SCHEMA.empty_table()])
    ds = _batch_blocks(ds.map_batches(_Decode(plan, out, done), batch_size=None, num_cpus=r.decode_cpus),
                       plan.batch_size)
    tile = None if plan.tile is None else dataclasses.asdict(plan.tile)
    # a CPU detector's process keeps freed memory from its start: mallopt comes too late for the thread Ray runs
    # its calls on (fpn_model.memory); env_vars merge with a job's own runtime_env. A runtime_env of its own makes
    # Ray start the detector a fresh process: where the workers have the settings already, it takes one Ray started
    # ahead with the node
    env = {} if r.gpus_per_detector else {k: v for k, v in keep_freed_memory_env().items()
                                         if (worker_env or {}).get(k) != v}
    return ds.map_batches(
        Detector,
        batch_size=plan.batch_size,
        compute=detector_pool(r, calls),
        num_cpus=r.cpus_per_detector,
        num_gpus=r.gpus_per_detector or None,
        fn_constructor_kwargs=dict(checkpoint=plan.checkpoint, model_id=plan.model_id, tile=tile,
                                   overrides=plan.model_overrides, max_batch=r.max_batch, output=out,
                                   threads=threads, calls=calls, precision=r.precision or "exact", compile=r.compile,
                                   counter=counter, device_exits=DEVICE_EXITS_PER_DETECTOR * max(
                                       r.num_detectors or 1, r.max_detectors or 0)),
        batch_format="numpy",
        **({"runtime_env": {"env_vars": env}} if env else {}),
    )


def drop_duplicates(out: Output) -> dict[str, int]:
    """`Output.drop_duplicate_frames`, and a line when it found a frame written twice."""
    dups = out.drop_duplicate_frames()
    if dups["rows_removed"]:
        log.warning("a frame reached the output twice: removed %d duplicate row(s) (%d file(s) removed, %d "
                    "rewritten)", dups["rows_removed"], dups["files_removed"], dups["files_rewritten"])
    return dups


def execute(plan: Plan, out: Output, units, done: frozenset[str] = frozenset(), *, planned: int,
            fence: str | None = None, with_masks: bool = False, threads: int | None = None, calls: int = 1,
            counter: Any = None, worker_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Decode and detect the work `units`, writing `OUTPUT/frames/` (and `errors/`) in files of at least
    `rows_per_file` frames. `planned`: the frames the units give (`count_planned`, which the caller records);
    `fence`: the lease token of the run, if it holds the output's lease (a write after a takeover commits nothing:
    `Output.write_frames`). Returns what the write did: `rows_per_file`, what `Output.drop_duplicate_frames`
    found (0 unless a frame reached the output twice), `core_ms_per_frame` by stage (`FrameSink.cost`), the
    detectors' first `times` (`FrameSink.times`) and `units_written_before`: units whose every frame is in `done`,
    not run again (`unwritten`; with none left, no decoder or detector starts)."""
    from .sink import FrameSink, rows_per_file  # imports ray.data: not in planning tasks, which import this module

    # bundle size: 1/20 of the frames this run writes unless the plan says (pipeline.sink.rows_per_file)
    rows = rows_per_file(plan.min_rows_per_file, frames=planned - len(done), batch_size=plan.batch_size)
    sink = FrameSink(out, with_masks, min_rows=rows, fence=fence)
    todo = unwritten(plan, units, done)
    if len(todo) < len(units):
        log.info("%d of %d work units are written already", len(units) - len(todo), len(units))
    # writing is I/O: a small CPU reservation, so files land while the detector actors hold the CPUs
    # (with the default of one CPU a write waits until detection of every frame has finished)
    if todo:
        from ray.util.debug import log_once

        # spent here: Ray Data warns that "the Dataset job will hang" when no CPU is free as it starts, which a third
        # of small jobs met while the planning tasks' CPUs were being returned; the job's request was checked against
        # the cluster's resources before any work (pipeline.sizing.fit)
        log_once("cpu_warning")
        build_dataset(plan, out, todo, done, threads=threads, calls=calls, counter=counter,
                      worker_env=worker_env).write_datasink(sink, ray_remote_args={"num_cpus": WRITE_CPUS})
    dups = drop_duplicates(out)
    return {"rows_per_file": rows, **dups, "core_ms_per_frame": sink.cost, "nvdec_frames": sink.nvdec_frames,
            "times": sink.times, "units_written_before": len(units) - len(todo)}
