"""The Ray Data datasink of frame rows: `FrameSink` writes each bundle of blocks as one file through
`pipeline.output.Output`.

Ray's own Parquet sink writes files in place under names drawn from a per-write UUID, so a killed task can
leave a partial file that readers see, and a resumed job writes new names; `Output.write_frames` writes each
file complete (temporary name outside `frames/`, then a rename; one PUT on object storage) under a name that is
a hash of the frame ids it holds, so a retried task rewrites the same file.

Fewer, larger files: `min_rows_per_write` asks Ray Data to bundle detector output blocks until a bundle holds at
least `min_rows` frames (whole blocks: a bundle holds min_rows up to min_rows + one block - 1; the last bundle of
a job, the remainder, fewer). Ray Data's write operator makes the bundle when the blocks arrive, then submits
it as one task whose arguments are those block references: a retried write task (its worker died) gets the same
bundle, so the same rows and the same file name. Each block goes to one bundle only, and a retried detector task
(its actor killed) replays its output stream, whose objects already delivered are not delivered again. Ray 2.60
bundles by rows (or bytes) only, never by time: a file lands when its bundle is complete, which is why the
default (`rows_per_file`) scales with the job.

What bundling changes for exactly once: a frame that reached the sink twice used to be rewritten under the
same name when it came back in the same block; in a larger bundle it would land in a file of another name. Two
guards cover the ways that could happen: the fence (`Output.write_frames(fence=...)`: a write commits only while
its run's lease holds the output, so a writer that lost its lease to `fpn resume` cannot add frames the new
writer plans again) and `Output.drop_duplicate_frames`, run by `pipeline.plan.execute` when everything is
written, which finds a frame in two files, removes it from one and says so in the log.
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data import Datasink

from .output import Output, frame_schema

__all__ = ["FrameSink", "rows_per_file", "MAX_AUTO_ROWS_PER_FILE", "AUTO_FILES_PER_JOB"]

# CPU seconds per frame that the stages before the sink add as columns (not written): decode (the decoding child),
# transfer (the decode task and the detector moving the frames), forward (the model), rows (detections -> rows)
STAGES = ("cpu_decode_s", "cpu_transfer_s", "cpu_forward_s", "cpu_rows_s")
# wall-clock times the detectors add as columns (not written): when a detector's worker process started, its
# __init__ began and ended, a batch reached it; the sink keeps the earliest of each and when its first file landed
TIMES = ("t_detector_worker", "t_detector_init", "t_detector_ready", "t_batch")
MAX_AUTO_ROWS_PER_FILE = 1000  # the default never bundles more frames than this per file
AUTO_FILES_PER_JOB = 20  # the default aims at about this many files for a job of fewer than 20,000 frames


def rows_per_file(min_rows_per_file: int | None, *, frames: int, batch_size: int) -> int:
    """Fewest frames per file: `min_rows_per_file` when given, else 1/20 of the `frames` this run writes (so
    the progress bar moves in steps of about 5%, and a killed driver loses about 5% of the work), at least one
    detector batch and at most 1000 (a long job: one file per 1000 frames)."""
    if min_rows_per_file is not None:
        return min_rows_per_file
    return max(batch_size, min(MAX_AUTO_ROWS_PER_FILE, -(-max(frames, 0) // AUTO_FILES_PER_JOB)), 1)


class FrameSink(Datasink):
    """Ray Data datasink writing frame rows to `OUTPUT/frames/`: each write call (one bundle of at least
    `min_rows` frames, where given) is one file. `fence`: the lease token of the run writing (see
    `Output.write_frames`)."""

    def __init__(self, output: Output, with_masks: bool = False, *, min_rows: int | None = None,
                 fence: str | None = None):
        if min_rows is not None and min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        self.output, self.with_masks, self.min_rows, self.fence = output, with_masks, min_rows, fence
        self.cost: dict[str, float] = {}  # core milliseconds per frame by stage, once the write completes
        self.nvdec_frames = 0  # frames decoded by NVIDIA's engine (video_backend nvdec), once the write completes
        self.times: dict[str, float] = {}  # the earliest of each of TIMES and `t_file`, once the write completes

    @property
    def min_rows_per_write(self) -> int | None:
        return self.min_rows

    def write(self, blocks: Iterable[Any], ctx: Any) -> dict[str, float]:
        """Write the bundle as one file; returns its frames and the CPU seconds each stage spent on them (the
        `cpu_*` columns the stages added, which the file does not keep, and this write's own)."""
        t0 = time.process_time()
        schema = frame_schema(self.with_masks)
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        cost = {c: sum(float(pc.sum(t.column(c)).as_py() or 0) for t in tables if c in t.column_names) for c in STAGES}
        frames = self.output.write_frames(pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]),
                                          fence=self.fence) if tables else 0
        nvdec = sum(int(pc.sum(t.column("nvdec_frames")).as_py() or 0)
                    for t in tables if "nvdec_frames" in t.column_names)
        first = {c: min(pc.min(t.column(c)).as_py() for t in tables) for c in TIMES
                 if tables and all(c in t.column_names for t in tables)}
        landed = {"t_file": time.time()} if frames else {}  # a bundle without rows writes no file
        return {"frames": frames, **cost, "cpu_write_s": time.process_time() - t0, "nvdec_frames": nvdec, **first,
                **landed}

    def on_write_complete(self, write_result: Any) -> None:
        """In the driver, once everything is written: the job's core time per frame by stage (`cost`) and the
        earliest of the detectors' `times` and of the files' landing (`times`)."""
        returns = [r for r in write_result.write_returns if isinstance(r, dict)]
        frames = sum(r["frames"] for r in returns)
        self.nvdec_frames = sum(r.get("nvdec_frames", 0) for r in returns)
        self.times = {c: min(r[c] for r in returns if c in r) for c in (*TIMES, "t_file")
                      if any(c in r for r in returns)}
        self.cost = {c.removeprefix("cpu_").removesuffix("_s"): round(1000 * sum(r.get(c, 0.0) for r in returns)
                                                                      / frames, 2)
                     for c in (*STAGES, "cpu_write_s")} if frames else {}
