"""The Ray Data plan: URIs -> work units -> decoded frame batches -> detector actors -> Parquet.

    from_items(uris)
      .flat_map(plan units)            CPU tasks: probe each file, cut videos into segments
      .materialize()                   the planned frame count is known up front
      .map_batches(decode)             CPU tasks: sampled uint8 frames, a generator of batches
      .map_batches(Detector, ...)      actor pool: model resident on its device
      .write_datasink(FrameSink)       atomic Parquet files, deterministic names

Ray Data's streaming executor provides the scheduling, backpressure and task retries; nothing
here queues or retries by hand. Fractional CPU reservations let decoding and detection run side
by side on a small node. Failures of one file, segment or frame become rows in `OUTPUT/errors/`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from fpn_model.predict import TileConfig

from .decode import Sampling, decode_unit, sample_indices
from .isolate import ChildTimeout, IsolationError, process_child
from .output import Output, error_row, frame_id
from .sink import FrameSink
from .sources import Source, WorkUnit, plan_units

__all__ = ["Plan", "Resources", "plan_work", "count_planned", "build_dataset", "execute"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    """How the plan uses the cluster."""

    num_detectors: int = 1  # detector actors (one model copy each)
    gpus_per_detector: float = 0.0
    cpus_per_detector: float = 1.0
    decode_cpus: float = 0.5  # CPU reservation of each decode task (fractional: decode beside detect)
    max_batch: int = 16  # most images (tiles) per forward pass
    amp: str | None = None  # bf16 | fp16 (GPU only)

    def __post_init__(self) -> None:
        if self.num_detectors < 1:
            raise ValueError(f"num_detectors must be >= 1, got {self.num_detectors}")
        for name in ("gpus_per_detector", "cpus_per_detector", "decode_cpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be bf16, fp16 or null, got {self.amp!r}")


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
    batch_size: int = 8
    segment_frames: int = 256
    raster_pixels: int = 64_000_000
    raster_window: int = 2048
    raster_margin: int = 128
    windows_per_unit: int = 4
    video_backend: str = "decord"  # decord | pyav | module:Class (a VideoDecoder)
    decode_timeout_s: float = 300.0  # longest wait for the next decoded batch; a hung decoder is retried once
    resources: Resources = Resources()
    model_overrides: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one input is required")
        if not self.output:
            raise ValueError("output: an output location is required")
        for name in ("batch_size", "segment_frames", "raster_window", "windows_per_unit", "raster_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.video_backend not in ("decord", "pyav") and ":" not in self.video_backend:
            raise ValueError(f"video_backend must be decord, pyav or module:Class, got {self.video_backend!r}")
        if self.decode_timeout_s <= 0:
            raise ValueError(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")

    @property
    def output_options(self) -> dict[str, Any]:
        """Storage options for the output's URLs."""
        return self.storage_options if self.output_storage_options is None else self.output_storage_options

    def identity(self, weights_sha256: str) -> dict[str, Any]:
        """The settings that change what a frame id means: an output holds frames of one identity only."""
        return {"model": self.model_id, "weights_sha256": weights_sha256,
                "model_overrides": dict(sorted(self.model_overrides.items())),
                "tile": None if self.tile is None else dataclasses.asdict(self.tile),
                "raster_pixels": self.raster_pixels, "raster_window": self.raster_window,
                "raster_margin": self.raster_margin}


class _PlanUnits:
    """flat_map: one source row -> its work units (errors recorded, nothing raised)."""

    def __init__(self, plan: Plan, out: Output):
        self.plan, self.out = plan, out

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        p = self.plan
        try:
            return [u.to_row() for u in plan_units(
                row["uri"], row["source"], segment_frames=p.segment_frames, raster_pixels=p.raster_pixels,
                window=p.raster_window, windows_per_unit=p.windows_per_unit, storage_options=p.storage_options,
                video_backend=p.video_backend)]
        except Exception as e:  # noqa: BLE001 - any failure of one input is that input's error row
            err = error_row(row["source"], "probe", e)
            log.warning("probe failed for %s: %s", row["source"], err["message"])
            self.out.write_errors([err], f"probe:{row['source']}")
            return []


class _Decode:
    """map_batches (one unit per call): yields frame batches, decoded in this worker's isolated child process
    (`pipeline.isolate`), which bounds each wait by `plan.decode_timeout_s` and survives a decoder crash.

    A hung or crashed decoder is replaced and its unit retried once, skipping the frames already yielded; when
    the retry fails the same way, or the decoder raises, the unit ends with one error row and the job goes on.
    """

    def __init__(self, plan: Plan, out: Output, done: frozenset[str]):
        self.plan, self.out, self.done = plan, out, done
        self.timeout_s = plan.decode_timeout_s

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for k in range(len(batch["uri"])):
            yield from self._unit(WorkUnit(**{f: _scalar(batch[f][k]) for f in WorkUnit.__dataclass_fields__}))

    def _unit(self, unit: WorkUnit) -> Iterator[dict[str, Any]]:
        # only this unit's written ids go to the child: a resumed job's whole done set would be pickled per unit
        done = {i for i in (frame_id(unit.source, k) for k in range(unit.start, unit.stop)) if i in self.done}
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
                self._fail(unit, f"{_unit_name(unit)}: decoder {_hang_or_crash(e)}, twice",
                           "DecodeTimeout" if isinstance(e, ChildTimeout) else "DecoderCrashed")
            except Exception as e:  # noqa: BLE001 - a decoder error ends its unit only (no retry: it would repeat)
                self._fail(unit, e, getattr(e, "error_type", type(e).__name__))
            return

    def _decode(self, unit: WorkUnit, done: frozenset[str]) -> Iterator[dict[str, Any]]:
        p = self.plan
        return process_child(("pipeline.decode",)).stream(
            decode_unit, unit, timeout_s=self.timeout_s, sampling=p.sampling, batch_size=p.batch_size, done=done,
            window=p.raster_window, window_margin=p.raster_margin, storage_options=p.storage_options,
            video_backend=p.video_backend)

    def _fail(self, unit: WorkUnit, e: BaseException | str, error_type: str) -> None:
        row = error_row(unit.source, "decode", e, unit.start if unit.kind == "video" else None, error_type=error_type)
        log.warning("decode failed: %s (%s)", row["message"], row["error_type"])
        self.out.write_errors([row], f"decode:{unit.source}:{unit.start}")


def _unit_name(unit: WorkUnit) -> str:
    """The source and the part of it a unit covers, for messages."""
    if unit.kind == "image":
        return unit.source
    return f"{unit.source} {'frames' if unit.kind == 'video' else 'windows'} [{unit.start}, {unit.stop})"


def _hang_or_crash(e: IsolationError) -> str:
    if isinstance(e, ChildTimeout):
        return f"hung (no frames within {e.timeout_s:g} s)"
    return f"crashed ({e.signal_name})" if getattr(e, "signal_name", None) else f"crashed ({e})"


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def plan_work(plan: Plan, out: Output, sources: list[Source]):
    """Probe every source (parallel CPU tasks) and return its work units, materialised: the planned
    frame count is known before decoding starts (progress, ETA)."""
    import ray.data

    rows = [{"uri": s.url, "source": s.canonical} for s in sources]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    units = ds.flat_map(_PlanUnits(plan, out), num_cpus=plan.resources.decode_cpus).materialize()
    # one block per unit: each segment decodes in its own task (in parallel), and its frames reach
    # the sink as soon as they are detected instead of with the rest of their video
    return units.repartition(max(1, units.count())).materialize()


def count_planned(plan: Plan, units) -> int:
    """Frames (or raster windows) the units will produce under the plan's sampling."""
    total = 0
    for u in units.iter_rows():
        if u["kind"] == "video":
            total += len(sample_indices(u["num_frames"], u["fps"], plan.sampling, u["start"], u["stop"]))
        else:
            total += u["stop"] - u["start"]
    return total


def build_dataset(plan: Plan, out: Output, units, done: frozenset[str] = frozenset()):
    """The lazy Ray Dataset of frame rows for the work `units` (nothing runs until it is written)."""
    import ray.data

    from .detect import Detector

    r = plan.resources
    ds = units.map_batches(_Decode(plan, out, done), batch_size=1, num_cpus=r.decode_cpus)
    tile = None if plan.tile is None else dataclasses.asdict(plan.tile)
    return ds.map_batches(
        Detector,
        batch_size=plan.batch_size,
        compute=ray.data.ActorPoolStrategy(size=r.num_detectors),
        num_cpus=r.cpus_per_detector,
        num_gpus=r.gpus_per_detector or None,
        fn_constructor_kwargs=dict(checkpoint=plan.checkpoint, model_id=plan.model_id, tile=tile, amp=r.amp,
                                   overrides=plan.model_overrides, max_batch=r.max_batch, output=out),
        batch_format="numpy",
    )


def execute(plan: Plan, out: Output, units, done: frozenset[str] = frozenset(), *, with_masks: bool = False) -> None:
    """Decode and detect the work `units`, writing `OUTPUT/frames/` (and `errors/`)."""
    # writing is I/O: a small CPU reservation, so files land while the detector actors hold the CPUs
    # (with the default of one CPU a write waits until detection of every frame has finished)
    build_dataset(plan, out, units, done).write_datasink(FrameSink(out, with_masks), ray_remote_args={"num_cpus": 0.1})
