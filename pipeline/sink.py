"""The Ray Data datasink of frame rows: `FrameSink` writes each block through `pipeline.output.Output`.

Ray's own Parquet sink writes files in place under names drawn from a per-write UUID, so a killed task can
leave a partial file that readers see, and a resumed job writes new names; `Output.write_frames` writes each
file complete (temporary name outside `frames/`, then a rename; one PUT on object storage) under a name that is
a hash of the frame ids it holds, so a retried task rewrites the same file.
"""
from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
from ray.data import Datasink

from .output import Output, frame_schema

__all__ = ["FrameSink"]


class FrameSink(Datasink):
    """Ray Data datasink writing frame rows to `OUTPUT/frames/`."""

    def __init__(self, output: Output, with_masks: bool = False):
        self.output, self.with_masks = output, with_masks

    def write(self, blocks: Iterable[Any], ctx: Any) -> int:
        schema = frame_schema(self.with_masks)
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t.select(schema.names).cast(schema) for t in tables if t.num_rows]
        return self.output.write_frames(pa.concat_tables(tables)) if tables else 0

