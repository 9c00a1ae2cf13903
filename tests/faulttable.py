"""The fault tests' outcomes as one table (issue 9's "must show"): each test that provokes a bad input or a fault
calls `record(...)` with what it saw, and `benchmarks/fault_table.py` runs them with FPN_FAULT_TABLE set to a
JSON-lines file and prints the table. Without FPN_FAULT_TABLE, `record` does nothing."""
from __future__ import annotations

import json
import os


def tally(table) -> tuple[int, int]:
    """(rows, duplicates) of a frames table: duplicates are rows whose frame_id another row already has."""
    ids = table.column("frame_id").to_pylist()
    return len(ids), len(ids) - len(set(ids))


def record(fault: str, did: str, *, expected: int | None, frames=None, written: int | None = None,
           duplicates: int | None = None, errors: int | None = None, exit_code: int | None = None,
           secrets_found: int | None = None) -> None:
    path = os.environ.get("FPN_FAULT_TABLE")
    if not path:
        return
    if frames is not None:
        written, duplicates = tally(frames)
    row = {"fault": fault, "did": did, "expected": expected, "written": written, "duplicates": duplicates,
           "errors": errors, "secrets_found": secrets_found, "exit_code": exit_code}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
