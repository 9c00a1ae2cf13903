"""The output contract: Parquet schemas, frame ids, atomic file writes, resume state.

    OUTPUT/frames/*.parquet   one row per sampled frame (detections nested), exactly once
    OUTPUT/errors/*.parquet   one row per input, segment or frame that failed
    OUTPUT/_job.json          spec, model, versions, state and counts (pipeline/record.py)

`FrameSink` is a Ray Data datasink. Ray's own Parquet sink writes files in place under names drawn
from a per-write UUID, so a killed task can leave a partial file that readers see, and a resumed job
writes new names; here every file is written under a temporary name and renamed (one PUT on object
storage), and its name is a hash of the frame ids it holds, so a retried task rewrites the same file.
"""
from __future__ import annotations

import hashlib
import uuid
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from .storage import filesystem, join, parquet_files

__all__ = [
    "DETECTION_TYPE", "FRAME_SCHEMA", "ERROR_SCHEMA", "frame_id", "FrameSink", "write_errors",
    "read_done_ids", "write_empty_frames",
]

DETECTION_TYPE = pa.struct([
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("score", pa.float32()), ("label", pa.int32()), ("label_name", pa.string()), ("level", pa.int8()),
])
MASKED_DETECTION_TYPE = pa.struct(list(DETECTION_TYPE) + [pa.field("mask", pa.struct([
    ("size", pa.list_(pa.int32())), ("counts", pa.string())]))])

FRAME_SCHEMA = pa.schema([
    ("frame_id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()),
    ("frame_index", pa.int64()), ("pts_s", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("num_detections", pa.int32()), ("detections", pa.list_(DETECTION_TYPE)), ("model", pa.string()),
    # window of a large raster this row covers (the whole frame otherwise)
    ("window_x", pa.int32()), ("window_y", pa.int32()), ("window_width", pa.int32()), ("window_height", pa.int32()),
])
ERROR_SCHEMA = pa.schema([
    ("source", pa.string()), ("stage", pa.string()), ("frame_index", pa.int64()),
    ("error_type", pa.string()), ("message", pa.string()),
])


def frame_schema(with_masks: bool = False) -> pa.Schema:
    if not with_masks:
        return FRAME_SCHEMA
    i = FRAME_SCHEMA.get_field_index("detections")
    return FRAME_SCHEMA.set(i, pa.field("detections", pa.list_(MASKED_DETECTION_TYPE)))


def frame_id(source: str, frame_index: int) -> str:
    """Deterministic id of a sampled frame (or raster window): a pure function of source and index."""
    return hashlib.sha1(f"{source}\x00{frame_index}".encode()).hexdigest()[:24]


def write_empty_frames(output: str, storage_options: dict | None = None, *, with_masks: bool = False) -> None:
    """A zero-row frames file, so readers of an output without frames still find the schema."""
    _atomic_write(frame_schema(with_masks).empty_table(), join(output, "frames", "part-empty.parquet"), storage_options)


def _atomic_write(table: pa.Table, url: str, storage_options: dict | None) -> None:
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if url.startswith("file://") or "://" not in url:
        tmp = join(parent, f".tmp-{uuid.uuid4().hex}.parquet")
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        fs.mv(tmp, path)
    else:  # object storage: one PUT of the finished bytes, never a visible partial object
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        fs.pipe_file(path, sink.getvalue().to_pybytes())


def _name(ids: Iterable[str]) -> str:
    h = hashlib.sha1()
    for i in sorted(ids):
        h.update(i.encode())
    return f"part-{h.hexdigest()[:20]}.parquet"


class FrameSink(Datasink):
    """Ray Data datasink writing frame rows to `OUTPUT/frames/` (atomic, deterministic names)."""

    def __init__(self, output: str, storage_options: dict | None = None, with_masks: bool = False):
        self.output, self.storage_options, self.with_masks = output, storage_options, with_masks

    def write(self, blocks: Iterable[Any], ctx: Any) -> int:
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return 0
        schema = frame_schema(self.with_masks)
        table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
        _atomic_write(table, join(self.output, "frames", _name(table.column("frame_id").to_pylist())),
                      self.storage_options)
        return table.num_rows


def write_errors(output: str, rows: list[dict], key: str, storage_options: dict | None = None) -> None:
    """Write error rows for one unit of work under a name derived from `key` (idempotent)."""
    if not rows:
        return
    table = pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)
    name = f"err-{hashlib.sha1(key.encode()).hexdigest()[:20]}.parquet"
    _atomic_write(table, join(output, "errors", name), storage_options)


def read_done_ids(output: str, storage_options: dict | None = None) -> set[str]:
    """Frame ids already written under `OUTPUT/frames` (reads one column)."""
    fs, path = filesystem(output, storage_options)
    done: set[str] = set()
    for f in parquet_files(fs, join(path, "frames")):
        with fs.open(f, "rb") as fh:
            done.update(pq.read_table(fh, columns=["frame_id"]).column("frame_id").to_pylist())
    return done
