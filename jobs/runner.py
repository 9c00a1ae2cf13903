"""Run a `Plan` on embedded local Ray or on a cluster, and account for it in `OUTPUT/_job.json`.

The runner expands the inputs (failing before any work on a missing input), writes `_job.json`
(state `running`), reads the frame ids already in the output so a rerun or resume skips them,
executes the Ray Data plan, counts what was written and records the final state.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from fpn_model.weights import read_config
from fpn_model.zoo import model_id
from pipeline.plan import Plan, count_planned, execute, plan_work
from pipeline.record import read_job_json, write_job_json
from pipeline.sink import read_done_ids, write_empty_frames
from pipeline.sources import expand_inputs
from pipeline.storage import filesystem, join, parquet_files, redact

from .spec import plan_to_dict

__all__ = ["run", "init_ray", "count_output", "versions"]

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import torchvision

    from importlib.metadata import version

    return {"fpn-pipeline": version("fpn-pipeline"), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "ray": ray.__version__, "pyarrow": pyarrow.__version__}


def init_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start embedded local Ray; no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


def count_output(output: str, storage_options: dict | None = None) -> dict[str, int]:
    """Frames, detections and error rows under an output (reads two small columns)."""
    fs, path = filesystem(output, storage_options)
    counts = {"frames": 0, "detections": 0, "errors": 0}
    for sub, col in (("frames", "num_detections"), ("errors", None)):
        files = parquet_files(fs, join(path, sub))
        if not files:
            continue
        ds = pads.dataset(files, filesystem=fs, format="parquet")
        if col:
            t = ds.to_table(columns=[col])
            counts["frames"] = t.num_rows
            counts["detections"] = int(sum(v for v in t.column(col).to_pylist() if v))
        else:
            counts["errors"] = ds.count_rows()
    return counts


def run(plan: Plan, *, address: str | None = None, job_id: str | None = None) -> dict[str, Any]:
    """Execute `plan`; returns the summary that `_job.json` also records."""
    t0 = time.monotonic()
    uris = expand_inputs(list(plan.inputs), plan.storage_options)
    cfg, _ = read_config(plan.checkpoint)
    with_masks = cfg.arch == "mask_rcnn"
    _, digest = model_id(Path(plan.checkpoint))
    try:
        previous = read_job_json(plan.output, plan.storage_options)
    except (FileNotFoundError, OSError):
        previous = {}
    doc: dict[str, Any] = {
        "job_id": job_id or previous.get("job_id"),
        "state": "running",
        "spec": plan_to_dict(plan, redact_fn=redact),
        "model": {"id": plan.model_id, "sha256": digest, "arch": cfg.arch, "backbone": cfg.backbone,
                  "neck": cfg.neck, "levels": list(cfg.levels), "class_names": list(cfg.class_names)},
        "versions": versions(),
        "inputs": len(uris),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": previous.get("runs", 0) + 1,
    }
    write_job_json(plan.output, doc, plan.storage_options)
    done = frozenset(read_done_ids(plan.output, plan.storage_options))
    doc["skipped_frames"] = len(done)
    init_ray(address)
    try:
        units = plan_work(plan, uris)
        doc["planned_frames"] = count_planned(plan, units)
        doc["work_units"] = units.count()
        write_job_json(plan.output, doc, plan.storage_options)
        execute(plan, units, done, with_masks=with_masks)
    except BaseException as e:
        doc.update(state="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   wall_s=round(time.monotonic() - t0, 2), **count_output(plan.output, plan.storage_options))
        write_job_json(plan.output, doc, plan.storage_options)
        raise
    wall = time.monotonic() - t0
    counts = count_output(plan.output, plan.storage_options)
    if counts["frames"] == 0:  # every input failed or nothing was sampled: frames/ still holds the schema
        write_empty_frames(plan.output, plan.storage_options, with_masks=with_masks)
    new_frames = counts["frames"] - len(done)
    doc.update(state="succeeded", wall_s=round(wall, 2), frames_per_s=round(new_frames / wall, 3) if wall else None,
               finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **counts)
    write_job_json(plan.output, doc, plan.storage_options)
    return doc
