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

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from fpn_model.predict import TileConfig

from .decode import Sampling, decode_unit, sample_indices
from .sink import FrameSink, write_errors
from .sources import WorkUnit, plan_units

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
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)
    sampling: Sampling = Sampling()
    tile: TileConfig | None = TileConfig()
    batch_size: int = 8
    segment_frames: int = 256
    raster_pixels: int = 64_000_000
    raster_window: int = 2048
    raster_margin: int = 128
    windows_per_unit: int = 4
    video_backend: str = "decord"
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
        if self.video_backend not in ("decord", "pyav"):
            raise ValueError(f"video_backend must be decord or pyav, got {self.video_backend!r}")


def _error(uri: str, stage: str, e: BaseException, frame_index: int | None = None) -> dict:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return {"source": uri, "stage": stage, "frame_index": frame_index, "error_type": type(e).__name__, "message": msg}


class _PlanUnits:
    """flat_map: one URI row -> its work units (errors recorded, nothing raised)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        p = self.plan
        try:
            return [u.to_row() for u in plan_units(
                row["uri"], segment_frames=p.segment_frames, raster_pixels=p.raster_pixels, window=p.raster_window,
                windows_per_unit=p.windows_per_unit, storage_options=p.storage_options, video_backend=p.video_backend)]
        except Exception as e:  # noqa: BLE001 - any failure of one input is that input's error row
            log.warning("probe failed for %s: %s", row["uri"], e)
            write_errors(p.output, [_error(row["uri"], "probe", e)], f"probe:{row['uri']}", p.storage_options)
            return []


class _Decode:
    """map_batches (one unit per call): yields frame batches; a failure ends the unit with an error row."""

    def __init__(self, plan: Plan, done: frozenset[str]):
        self.plan, self.done = plan, done

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        p = self.plan
        for k in range(len(batch["uri"])):
            unit = WorkUnit(**{f: _scalar(batch[f][k]) for f in WorkUnit.__dataclass_fields__})
            try:
                yield from decode_unit(unit, sampling=p.sampling, batch_size=p.batch_size, done=self.done,
                                       window=p.raster_window, window_margin=p.raster_margin,
                                       storage_options=p.storage_options, video_backend=p.video_backend)
            except Exception as e:  # noqa: BLE001
                log.warning("decode failed for %s [%d, %d): %s", unit.uri, unit.start, unit.stop, e)
                write_errors(p.output, [_error(unit.uri, "decode", e, unit.start if unit.kind == "video" else None)],
                             f"decode:{unit.uri}:{unit.start}", p.storage_options)


def _scalar(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def plan_work(plan: Plan, uris: list[str]):
    """Probe every URI (parallel CPU tasks) and return its work units, materialised: the planned
    frame count is known before decoding starts (progress, ETA)."""
    import ray.data

    ds = ray.data.from_items([{"uri": u} for u in uris], override_num_blocks=max(1, len(uris)))
    units = ds.flat_map(_PlanUnits(plan), num_cpus=plan.resources.decode_cpus).materialize()
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


def build_dataset(plan: Plan, units, done: frozenset[str] = frozenset()):
    """The lazy Ray Dataset of frame rows for the work `units` (nothing runs until it is written)."""
    import ray.data

    from .detect import Detector

    r = plan.resources
    ds = units.map_batches(_Decode(plan, done), batch_size=1, num_cpus=r.decode_cpus)
    tile = None if plan.tile is None else {
        "size": plan.tile.size, "overlap": plan.tile.overlap, "merge": plan.tile.merge,
        "metric": plan.tile.metric, "threshold": plan.tile.threshold}
    return ds.map_batches(
        Detector,
        batch_size=plan.batch_size,
        compute=ray.data.ActorPoolStrategy(size=r.num_detectors),
        num_cpus=r.cpus_per_detector,
        num_gpus=r.gpus_per_detector or None,
        fn_constructor_kwargs=dict(checkpoint=plan.checkpoint, model_id=plan.model_id, tile=tile, amp=r.amp,
                                   overrides=plan.model_overrides, max_batch=r.max_batch),
        batch_format="numpy",
    )


def execute(plan: Plan, units, done: frozenset[str] = frozenset(), *, with_masks: bool = False) -> None:
    """Decode and detect the work `units`, writing `OUTPUT/frames/` (and `errors/`)."""
    # writing is I/O: a small CPU reservation, so files land while the detector actors hold the CPUs
    # (with the default of one CPU a write waits until detection of every frame has finished)
    build_dataset(plan, units, done).write_datasink(FrameSink(plan.output, plan.storage_options, with_masks),
                                                    ray_remote_args={"num_cpus": 0.1})
