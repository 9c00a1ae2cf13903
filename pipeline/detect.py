"""The detector actor: a Ray Data callable class holding one model on its device.

`__init__` loads the checkpoint once per actor onto its GPU (or the CPU, with as many torch threads
as the actor was allotted CPUs); `__call__` runs one batched forward per batch of uint8 frames
(tiles of large frames batched together) and returns the frame rows of the output contract.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from typing import Any, Iterator

import numpy as np
import psutil
import pyarrow as pa
import torch

from fpn_model.predict import OOM_ERRORS, Detections, Predictor, TileConfig
from fpn_model.weights import is_plugin, load_checkpoint

from .output import Output, error_row, frame_schema
from .raster import map_boxes
from .storage import one_line

__all__ = ["Detector", "detections_to_rows"]

log = logging.getLogger(__name__)


def _allotted(resource: str) -> float:
    import ray

    if not ray.is_initialized():  # outside Ray (get_runtime_context would start a local cluster)
        return 0.0
    try:
        return float(ray.get_runtime_context().get_assigned_resources().get(resource, 0.0))
    except AssertionError:  # a driver, not a worker: nothing is assigned to it
        return 0.0


class Detector:
    """Callable class for `Dataset.map_batches`.

    Args:
        checkpoint: path of an fpn-pipeline checkpoint.
        model_id: the name written into every row's `model` column.
        tile: TileConfig fields as a dict, or None.
        overrides: inference-time model config changes (score_thresh, scale, ...).
        max_batch: most images (tiles) per forward pass.
        output: where failed frames become error rows (an `Output`, or its URL with `storage_options`).
            None: a failing batch raises, as outside a job.
        threads: torch threads (a job's come from pipeline.sizing.fit); default: the floor of the actor's CPUs.
        calls: batches Ray Data runs at once in this actor (`max_concurrent_calls_per_actor`), each on its own thread
            with `threads // calls` torch threads (pipeline.sizing: batches side by side do not wait for each other).
        precision: "exact" (on a CPU the exact fast path: the same detections as torchvision's eager forward within
            float rounding), or the approximate "bf16" | "int8" (CPU) | "fp16" (GPU): `fpn_model.predict.Predictor`.
        compile: torch.compile the model's convolutional parts (a long first batch per input shape).
        counter: a `pipeline.counter.FrameCounter` told how many frames each batch detected (and the run's device
            errors).
        device_exits: how many times in a run the detectors may exit after a device error to be started anew
            (`_exit_for_a_new_device`); 0: never.

    A batch that fails is retried in parts: halves on out-of-memory (recursively, down to one frame; the predictor
    has already retried its forward passes in halves, down to one image each), else frame by frame (a model output
    that breaks the contract, `ModelOutputError`, is such a failure). A frame that fails alone becomes an error row
    (stage `detect`) and is left out of the returned rows, so it is not written to `frames/` and a resumed job
    tries it again; the rest of the batch goes on. A device error ends the process instead, so that Ray starts the
    detector anew and runs its batches again (at most `device_exits` times a run).
    """

    def __init__(self, checkpoint: str, *, model_id: str, tile: dict | None = None, overrides: dict | None = None,
                 max_batch: int = 16, output: Output | str | None = None, storage_options: dict | None = None,
                 threads: int | None = None, calls: int = 1, precision: str = "exact", compile: bool = False,
                 counter: Any = None, device_exits: int = 0):
        began = time.time()
        cpus = _allotted("CPU")
        threads = threads or (math.floor(cpus) if cpus >= 1 else None)
        if threads:
            torch.set_num_threads(max(1, threads // calls))  # the global value each call's thread starts with
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from actors not given one
        gpus = _allotted("GPU")
        if gpus and device == "cpu":  # it would detect on the CPU, a hundred times slower, without a word
            why = "it is built without CUDA" if torch.version.cuda is None else "it sees no CUDA device (the driver?)"
            raise RuntimeError(f"this detector was given {gpus:g} GPU(s), but torch {torch.__version__} here cannot "
                               f"use them: {why}; install a CUDA build of torch where the detectors run, or keep them "
                               "on CPUs (gpus_per_detector: 0)")
        model = load_checkpoint(checkpoint, map_location=device, **(overrides or {}))
        self.cfg = model.config
        self.predictor = Predictor(model, device=device, tile=TileConfig(**tile) if tile else None,
                                   precision=precision, compile=compile, max_batch=max_batch,
                                   name=os.path.basename(checkpoint) if is_plugin(checkpoint) else model_id)
        # CPU seconds of one call (the process's clock counts every call's) and, on a CPU, its torch threads
        self._share = _CallShare(self.predictor.model, threads) if calls > 1 and device == "cpu" and threads else None
        if self._share is not None:
            self._cpu_clock = self._share.clock
        elif calls == 1:
            self._cpu_clock = time.process_time
        else:  # a GPU's calls (or a CPU detector without a thread count): an even share of the process's
            self._cpu_clock = lambda: time.process_time() / calls
        self.counter = counter
        self.device_exits, self._past_exits, self._exit_lock = device_exits, False, threading.Lock()
        self.model_id = model_id
        self.schema = frame_schema(self.predictor.has_masks)
        self.output = Output(output, storage_options) if isinstance(output, str) else output
        log.info("detector on %s: %d call(s) at once of %d thread(s), precision %s%s", device, calls,
                 torch.get_num_threads(), precision, " on the fast path" if self.predictor.fast else "")
        # when its worker process started, when __init__ began (the worker had imported torch and this module),
        # when the model was ready: wall-clock times that the rows carry to the sink (the job's `startup_s`)
        self._times = {"t_detector_worker": psutil.Process().create_time(), "t_detector_init": began,
                       "t_detector_ready": time.time()}

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        with self._share.call() if self._share is not None else contextlib.nullcontext():
            return self._call(batch)

    def _call(self, batch: dict[str, Any]) -> pa.Table:
        images = list(batch["image"])
        skip = [bool(v) for v in batch.get("all_nodata", [False] * len(images))]  # raster windows without data
        todo = [im for im, s in zip(images, skip) if not s]
        if self.output is None:
            found = iter(self.predictor(todo) if todo else [])
            return detections_to_rows(batch, [_NONE if s else next(found) for s in skip], self.cfg.label_name,
                                      self.model_id, self.schema)
        arrived = time.time()
        t0 = self._cpu_clock()
        found = iter(self._predict(todo) if todo else [])
        results = [_NONE if s else next(found) for s in skip]
        failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
        if failed:
            self._record_failures(batch, {i: results[i] for i in failed})
            keep = [i for i in range(len(results)) if i not in failed]
            batch = {k: v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep] for k, v in batch.items()}
            results = [results[i] for i in keep]
        t1 = self._cpu_clock()
        rows = detections_to_rows(batch, results, self.cfg.label_name, self.model_id, self.schema)
        if self.counter is not None:  # frames detected, before a bundle of them is written (the job's watchdog)
            self.counter.add(rows.num_rows)
        return _with_costs(rows, batch, forward_s=t1 - t0, rows_s=self._cpu_clock() - t1,
                           times={**self._times, "t_batch": arrived})

    def _predict(self, images: list[np.ndarray]) -> list:
        """Detections per image, or the exception that image raised when predicted alone."""
        try:
            return list(self.predictor(images))
        except Exception as e:  # noqa: BLE001 - narrowed down below; a lone frame's error is its result
            if device_lost(e):
                self._exit_for_a_new_device(e)
            oom = isinstance(e, OOM_ERRORS)
            if oom and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(images) == 1:
                return [e]
            log.warning("detection of a batch of %d failed (%s: %s); retrying %s", len(images), type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", "in halves" if oom else "frame by frame")
            if oom:
                half = len(images) // 2
                return self._predict(images[:half]) + self._predict(images[half:])
            return [r for image in images for r in self._predict([image])]

    def _exit_for_a_new_device(self, e: BaseException) -> None:
        """After a device error this process cannot use its GPU again (CUDA's errors are sticky), so every frame it
        still had would become an error row: it exits instead, and Ray starts the detector anew, with a fresh
        device context, and runs its batches again (none of their rows was delivered). At most `device_exits`
        times in a run (a frame that breaks the device every time would otherwise restart detectors forever);
        after that, frames that fail are error rows as other errors make them. Returns when it does not exit."""
        if self.counter is None or not self.device_exits:
            return
        with self._exit_lock:  # the process's other calls fail too: one of them counts and exits, the rest wait
            try:
                n = self.counter.note("device_lost")
            except Exception as kv:  # noqa: BLE001 - without the run's count, no exit: an exit could repeat forever
                log.error("device error not counted (%s: %s); frames that fail become error rows",
                          type(kv).__name__, kv)
                return
            what = one_line(e)
            if n > self.device_exits:
                if not self._past_exits:  # once: every frame that fails after this comes here
                    self._past_exits = True
                    log.error("%s; %d device errors in this run, more than the %d detector restarts allowed: "
                              "frames that fail become error rows", what, n, self.device_exits)
                return
            log.error("%s; the detector's process exits, and Ray starts it anew and runs its batches again (restart "
                      "%d of at most %d in this run)", what, n, self.device_exits)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(DEVICE_LOST_EXIT)

    def _record_failures(self, batch: dict[str, Any], errors: dict[int, BaseException]) -> None:
        for i, e in errors.items():
            row = error_row(str(batch["source"][i]), "detect", e, int(batch["frame_index"][i]))
            log.warning("detection failed for %s frame %d: %s", row["source"], row["frame_index"], row["message"])
            self.output.write_errors([row], f"detect:{batch['frame_id'][i]}")


DEVICE_LOST_EXIT = 75  # a detector's exit status after a device error (EX_TEMPFAIL: Ray starts it again)
_DEVICE_ERRORS = tuple(getattr(torch, name) for name in ("AcceleratorError",) if hasattr(torch, name))  # torch>=2.8


def device_lost(e: BaseException) -> bool:
    """Whether `e` is an error of the accelerator itself (CUDA's illegal address, launch failure, uncorrectable ECC
    error, ...), after which the process's device context is unusable; out of memory is not one."""
    if isinstance(e, OOM_ERRORS):
        return False
    return isinstance(e, _DEVICE_ERRORS) or (isinstance(e, RuntimeError) and str(e).startswith("CUDA error"))


_NONE = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int8))


class _CallShare:
    """The torch threads and the CPU time of the calls a CPU detector runs side by side (Ray Data runs `calls`
    batches of one actor at once, each on a thread of its own).

    Threads: torch's thread count belongs to the thread that calls it (OpenMP's), so each call sets its own, as it
    enters each of the model's modules down to `DEPTH` levels (the blocks of a backbone's stages), to an even share
    of the detector's `threads` among the calls running at that moment. A batch alone (a job's last, or one while
    decoding lags) gets them all instead of 1 of 2 (the mobilenet_v3 FPN street batch of 4 at 512 px on 2 cores:
    2.3 -> 1.4 s); two side by side run as before, 1 each.
    CPU time: torch's threads of a call are not the calling thread, so a thread's clock misses them; the
    process's CPU time between any two events (a call starting, ending or reading its clock) is shared evenly by
    the calls running then."""

    DEPTH = 5

    def __init__(self, model: torch.nn.Module, threads: int):
        self.threads = threads
        self._lock = threading.Lock()
        self._cpu: dict[int, float] = {}  # the running calls' CPU seconds so far, by thread
        self._mark = time.process_time()
        for name, module in model.named_modules():
            if bool(name) + name.count(".") <= self.DEPTH:  # the model itself at 0
                module.register_forward_pre_hook(self._adjust)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            self._settle()
            self._cpu[me] = 0.0
        try:
            yield
        finally:
            with self._lock:
                self._settle()
                del self._cpu[me]

    def clock(self) -> float:
        """The CPU seconds of the calling thread's call so far."""
        with self._lock:
            self._settle()
            return self._cpu.get(threading.get_ident(), 0.0)

    def _settle(self) -> None:
        now = time.process_time()
        for k in self._cpu:
            self._cpu[k] += (now - self._mark) / len(self._cpu)
        self._mark = now

    def _adjust(self, module: torch.nn.Module, args: Any) -> None:
        n = max(1, self.threads // max(1, len(self._cpu)))
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _with_costs(rows: pa.Table, batch: dict[str, Any], *, forward_s: float, rows_s: float,
                times: dict[str, float]) -> pa.Table:
    """`rows` with each stage's CPU seconds per frame (`pipeline.sink.STAGES`; the sink sums them, the files do not
    keep them): the decoder's and the transfer's from the batch, this actor's forward (all its torch threads) and
    row building shared equally by the batch's frames; and the detector's `times` (`pipeline.sink.TIMES`, wall
    clock; the sink keeps the earliest of each)."""
    n = rows.num_rows
    for name in ("cpu_decode_s", "cpu_transfer_s"):
        if name in batch:
            rows = rows.append_column(name, pa.array([float(v) for v in batch[name]], pa.float64()))
    for name, total in (("cpu_forward_s", forward_s), ("cpu_rows_s", rows_s)):
        rows = rows.append_column(name, pa.array([total / max(n, 1)] * n, pa.float64()))
    for name, t in times.items():
        rows = rows.append_column(name, pa.array([t] * n, pa.float64()))
    if "nvdec_frames" in batch:  # frames decoded on a GPU (pipeline.decode), counted by the sink
        rows = rows.append_column("nvdec_frames", pa.array([int(v) for v in batch["nvdec_frames"]], pa.int64()))
    return rows


def _masks_in_source(rles: list[dict], scale, offset, width: int, height: int) -> list[dict]:
    """A raster window's masks, COCO RLEs over the image the model saw (the window resampled by `scale`, its first
    pixel at source pixel `offset`, padded past the raster's edge), as RLEs over the whole raster, where its boxes
    are: each source pixel takes the mask's value at its centre (nearest). Only the part a mask covers is made,
    and it is encoded in place (`fpn_model.rle.runs_to_rle`): a raster-sized array per mask would be gigabytes.
    Written by hand: pycocotools has no translate or resize of an RLE."""
    from pycocotools import mask as mask_utils

    from fpn_model.rle import runs_to_rle

    (sx, sy), (ox, oy) = (float(v) for v in scale), (float(v) for v in offset)
    out = []
    for rle in rles:
        m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        x0, y0 = (max(0, math.floor(c[0] / s + o)) if len(c) else 0 for c, s, o in ((cols, sx, ox), (rows, sy, oy)))
        x1, y1 = (min(n, math.ceil((c[-1] + 1) / s + o)) if len(c) else 0
                  for c, s, o, n in ((cols, sx, ox, width), (rows, sy, oy, height)))
        if x1 <= x0 or y1 <= y0:  # nothing of it on the raster: an empty mask
            x0, y0, x1, y1 = 0, 0, 1, 1
            part = np.zeros((1, 1), bool)
        else:
            xs = np.clip(((np.arange(x0, x1) + 0.5 - ox) * sx).astype(np.int64), 0, m.shape[1] - 1)
            ys = np.clip(((np.arange(y0, y1) + 0.5 - oy) * sy).astype(np.int64), 0, m.shape[0] - 1)
            part = m[np.ix_(ys, xs)].astype(bool)
        out += runs_to_rle(torch.from_numpy(part)[None], x0=x0, y0=y0, height=height, width=width)
    return out


def detections_to_rows(batch: dict[str, Any], dets: list, label_name, model_id: str, schema: pa.Schema) -> pa.Table:
    """Frame rows (the output contract) from a decoded batch and its detections. Raster windows keep only
    detections whose centre lies in the window's core, mapped to raster pixels (undoing the resampling) and,
    for georeferenced rasters, to map coordinates. The detections column is built from whole arrays (one numpy
    operation per frame, none per detection; masks aside, which are already one dict each)."""
    n = len(dets)
    crs = [_text(c) for c in batch.get("crs", [None] * n)]
    parts = {k: [] for k in ("boxes", "scores", "labels", "levels", "mapped", "georef")}
    masks, counts = [], []
    for i, d in enumerate(dets):
        scale = np.array([batch["scale_x"][i], batch["scale_y"][i]] * 2, dtype=np.float32) if "scale_x" in batch else 1
        boxes = d.boxes / scale + np.array([batch["offset_x"][i], batch["offset_y"][i]] * 2, dtype=np.float32)
        keep = slice(None)
        if batch["source_kind"][i] == "raster":
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            x, y = batch["window_x"][i], batch["window_y"][i]
            w, h = batch["window_width"][i], batch["window_height"][i]
            keep = np.flatnonzero((cx >= x) & (cx < x + w) & (cy >= y) & (cy < y + h))
        boxes = boxes[keep]
        parts["boxes"].append(boxes)
        parts["scores"].append(d.scores[keep])
        parts["labels"].append(d.labels[keep])
        parts["levels"].append(d.levels[keep])
        georef = bool(crs[i])
        parts["mapped"].append(map_boxes(boxes, tuple(np.asarray(batch["transform"][i], dtype=np.float64)))
                               if georef else np.zeros((len(boxes), 4)))
        parts["georef"].append(np.full(len(boxes), georef))
        if d.masks is not None:
            kept = [d.masks[j] for j in np.arange(len(d.boxes))[keep]]
            masks += kept if batch["source_kind"][i] != "raster" else _masks_in_source(
                kept, (batch["scale_x"][i], batch["scale_y"][i]), (batch["offset_x"][i], batch["offset_y"][i]),
                int(batch["width"][i]), int(batch["height"][i]))
        counts.append(len(boxes))
    flat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    detection_type = schema.field("detections").type.value_type
    boxes, mapped, georef = flat["boxes"].reshape(-1, 4), flat["mapped"].reshape(-1, 4), flat["georef"].astype(bool)
    labels = flat["labels"].astype(np.int32)
    names, inverse = np.unique(labels, return_inverse=True)
    fields = {c: pa.array(np.ascontiguousarray(boxes[:, j]), pa.float32())
              for j, c in enumerate(("x1", "y1", "x2", "y2"))}
    fields.update(score=pa.array(flat["scores"], pa.float32()), label=pa.array(labels, pa.int32()),
                  label_name=pa.array([label_name(int(v)) for v in names], pa.string()).take(inverse.reshape(-1)),
                  level=pa.array(flat["levels"], pa.int8()))
    fields.update({f"map_{c}": pa.array(np.ascontiguousarray(mapped[:, j]), pa.float64(), mask=~georef)
                   for j, c in enumerate(("x1", "y1", "x2", "y2"))})
    if detection_type.get_field_index("mask") >= 0:
        fields["mask"] = pa.array(masks, detection_type.field("mask").type)
    struct = pa.StructArray.from_arrays([fields[f.name] for f in detection_type], fields=list(detection_type))
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
    detections_col = pa.ListArray.from_arrays(offsets, struct, type=schema.field("detections").type)
    cols = {name: batch[name] for name in ("frame_id", "source", "source_kind", "frame_index", "pts_s", "width",
                                           "height", "window_x", "window_y", "window_width", "window_height")}
    cols = {k: list(v) for k, v in cols.items()}
    cols["pts_s"] = [None if p is None or p != p else float(p) for p in cols["pts_s"]]  # NaN = no timestamp
    cols.update(num_detections=counts, detections=detections_col, model=[model_id] * n, crs=crs,
                transform=[[float(v) for v in batch["transform"][i]] if crs[i] else None for i in range(n)],
                all_nodata=[bool(v) for v in batch["all_nodata"]] if "all_nodata" in batch else [False] * n,
                stac_item=[_text(s) for s in batch.get("stac_item", [None] * n)],
                decoded_frames=[int(v) for v in batch.get("decoded_frames", [1] * n)])
    stamps = pa.array([_text(t) for t in batch.get("datetime", [None] * n)], pa.string())
    cols["datetime"] = stamps.cast(pa.timestamp("us", tz="UTC"))
    return pa.Table.from_pydict(cols, schema=schema)


def _text(v: Any) -> str | None:
    """A string column's value from a batch; Ray Data turns a column of only None into NaN."""
    return str(v) if isinstance(v, str) and v else None
