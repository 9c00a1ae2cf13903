"""SQL over an output with DuckDB: views `frames` and `detections` (one row per detection).

Local outputs are read by DuckDB directly; object-storage outputs through the same fsspec
filesystem the pipeline writes with (registered in DuckDB), so no DuckDB extension is needed.
"""
from __future__ import annotations

import duckdb

from pipeline.storage import filesystem

__all__ = ["connect", "query"]


def connect(output: str, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views `frames` and `detections` over `output`."""
    fs, path = filesystem(output, storage_options)
    frames = f"{output.rstrip('/')}/frames/*.parquet"
    if not fs.exists(f"{path.rstrip('/')}/frames"):
        raise FileNotFoundError(f"{output}: no frames/ directory (is it an fpn output?)")
    con = duckdb.connect()
    if "://" in output and not output.startswith("file://"):
        con.register_filesystem(fs)
    con.execute(f"CREATE VIEW frames AS SELECT * FROM read_parquet('{frames}')")
    con.execute("""
        CREATE VIEW detections AS
        SELECT f.frame_id, f.source, f.source_kind, f.frame_index, f.pts_s, f.width, f.height, f.model,
               d.x1, d.y1, d.x2, d.y2, d.score, d.label, d.label_name, d.level,
               (d.x2 - d.x1) AS box_width, (d.y2 - d.y1) AS box_height
        FROM frames f, unnest(f.detections) AS t(d)
    """)
    return con


def query(output: str, sql: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple]]:
    """Run `sql` against the output's views; returns (column names, rows)."""
    con = connect(output, storage_options)
    try:
        rel = con.execute(sql)
    except duckdb.Error as e:
        raise ValueError(f"query failed: {str(e).splitlines()[0]}") from e
    cols = [d[0] for d in rel.description] if rel.description else []
    return cols, rel.fetchall()
