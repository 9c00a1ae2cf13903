"""`OUTPUT/_job.json`: the job's record (spec, model, versions, state, counts).

Kept apart from the Parquet sink so that reading a job's state (`fpn status`) imports neither
torch nor Ray Data.
"""
from __future__ import annotations

import json

from .storage import filesystem, join

__all__ = ["write_job_json", "read_job_json"]


def write_job_json(output: str, doc: dict, storage_options: dict | None = None) -> None:
    fs, path = filesystem(output, storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(join(path, "_job.json"), json.dumps(doc, indent=2, default=str).encode())


def read_job_json(output: str, storage_options: dict | None = None) -> dict:
    fs, path = filesystem(output, storage_options)
    with fs.open(join(path, "_job.json"), "rb") as f:
        return json.loads(f.read())
