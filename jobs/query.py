"""SQL over an output with DuckDB, read-only and confined to that output.

Views: `frames` (one row per sampled frame), `detections` (one row per detection) and `errors`
(one row per failed input, segment or frame; empty with the error columns when nothing failed).
Local outputs are read by DuckDB directly; object-storage outputs through the same fsspec
filesystem the pipeline writes with (registered in DuckDB), so no DuckDB extension is needed.

`fpn query` runs whatever SQL a user types, and DuckDB's SQL can read any file
(`read_csv('/etc/passwd')`), write anywhere (`COPY ... TO`), install and load extensions,
attach databases and change its own settings. Two layers keep it to reading the output:

1. DuckDB's own sandbox, set before the user's SQL runs: `allowed_directories` is the output
   (with a trailing slash, so `out-other/` is not `out/`), `enable_external_access` is off (it
   cannot be turned back on), extension autoload/autoinstall and community extensions are off,
   and `lock_configuration` forbids every later SET, RESET or config PRAGMA. DuckDB applies
   `allowed_directories` to filesystems registered from fsspec too (an s3:// output's bucket
   and prefix; other buckets and prefixes are refused), so no fsspec wrapper is needed.
2. `allowed_directories` allows writing inside the output as well as reading, so statements
   are checked before they run: only reads and in-memory work (SELECT, EXPLAIN of those,
   CREATE/INSERT/UPDATE/DELETE/DROP on the in-memory catalog) pass. COPY, EXPORT, ATTACH,
   INSTALL/LOAD, SET, PRAGMA, CALL and the rest are refused. ATTACH being refused is what keeps
   CREATE and INSERT in memory: there is no other database to write to.
"""
from __future__ import annotations

import logging

import duckdb
import pyarrow as pa

from pipeline.output import ERROR_SCHEMA, ERRORS_DIR, FRAME_SCHEMA, FRAMES_DIR, Output
from pipeline.storage import join

__all__ = ["connect", "query"]

log = logging.getLogger(__name__)

# statement types that read, or change only the in-memory catalog of this connection
_ALLOWED = {
    duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.CREATE,
    duckdb.StatementType.INSERT, duckdb.StatementType.UPDATE, duckdb.StatementType.DELETE,
    duckdb.StatementType.DROP,
}
# applied in this order: allowed_directories cannot change once external access is off,
# and nothing can change once the configuration is locked
_LOCKDOWN = (
    "SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
    "SET allow_community_extensions = false", "SET python_enable_replacements = false",
    "SET enable_external_access = false", "SET lock_configuration = true",
)


def _literal(text: str) -> str:
    """`text` as a SQL string literal: quotes doubled, so a path like `it's/` stays one string."""
    return "'" + text.replace("'", "''") + "'"


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _scan(con: duckdb.DuckDBPyConnection, pattern: str, found: list[str], schema: pa.Schema) -> str:
    """SQL reading the Parquet files `pattern` matches, or, when none is there yet (`found` is the output's
    list of finished files), an empty relation with `schema`'s columns, so the view still answers."""
    if found:
        return f"SELECT * FROM read_parquet({_literal(pattern)})"
    rel = con.from_arrow(schema.empty_table())
    cols = ", ".join(f'NULL::{t} AS "{c}"' for c, t in zip(rel.columns, rel.types))
    return f"SELECT {cols} WHERE false"


def _create_views(con: duckdb.DuckDBPyConnection, root: str, out: Output) -> None:
    frames = _scan(con, f"{root}/{FRAMES_DIR}/*.parquet", out.frame_files(), FRAME_SCHEMA)
    con.execute(f"CREATE VIEW frames AS {frames}")
    # georeferenced rasters and STAC inputs: map boxes (in the raster's CRS) and the item; outputs written before
    # these columns existed have none
    types = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE frames)").fetchall())
    geo = ("d.map_x1, d.map_y1, d.map_x2, d.map_y2, f.crs, f.stac_item, f.datetime,"
           if "map_x1" in types.get("detections", "") and "crs" in types else "")
    geo += " d.mask," if " mask STRUCT(" in types.get("detections", "") else ""  # Mask R-CNN: COCO RLE
    con.execute(f"""
        CREATE VIEW detections AS
        SELECT f.frame_id, f.source, f.source_kind, f.frame_index, f.pts_s, f.width, f.height, f.model,
               d.x1, d.y1, d.x2, d.y2, d.score, d.label, d.label_name, d.level, {geo}
               (d.x2 - d.x1) AS box_width, (d.y2 - d.y1) AS box_height
        FROM frames f, unnest(f.detections) AS t(d)
    """)
    errors = _scan(con, f"{root}/{ERRORS_DIR}/*.parquet", out.error_files(), ERROR_SCHEMA)
    con.execute(f"CREATE VIEW errors AS {errors}")


def connect(output: str | Output, storage_options: dict | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only DuckDB connection with views `frames`, `detections` and `errors` over `output`: its URL, or
    the `Output.for_reading` a caller that reads more of it has already (its endpoint checked there, once).

    The connection can read files under `output` and nothing else, and cannot change its settings;
    DuckDB itself would still let it write inside `output` (COPY), so SQL from a user goes through
    `query`, which refuses such statements before they run.
    """
    if isinstance(output, Output):
        out, output = output, output.url
    else:  # an unreachable endpoint at once, not after retries (80 s)
        out = Output.for_reading(output, storage_options)
    fs, path = out.fs, out.path.rstrip("/")
    if not fs.exists(join(path, FRAMES_DIR)):
        raise FileNotFoundError(f"{output}: no {FRAMES_DIR}/ directory (is it an fpn output?)")
    local = _is_local(fs)
    root = path if local else fs.unstrip_protocol(path)
    con = duckdb.connect()
    con.execute(f"SET allowed_directories = [{_literal(root + '/')}]")
    if not local:
        con.register_filesystem(fs)
    try:
        _create_views(con, root, out)
    except duckdb.Error as e:  # views bind when created: files that are not an output's fail here
        con.close()
        raise ValueError(f"{output}: not readable as an fpn output ({str(e).splitlines()[0]})") from e
    for setting in _LOCKDOWN:
        con.execute(setting)
    log.debug("query connection on %s: read-only, configuration locked", root)
    return con


def _words(statement: str) -> list[tuple[int, str]]:
    """The tokens of `statement` without comments, as (position, text)."""
    tokens = duckdb.tokenize(statement)
    ends = [p for p, _ in tokens[1:]] + [len(statement)]
    return [(p, statement[p:end].strip()) for (p, kind), end in zip(tokens, ends)
            if kind != duckdb.token_type.comment]


def _inner(statement: str) -> str:
    """What an EXPLAIN statement explains: the text after `EXPLAIN [(options)] [ANALYZE]`.

    EXPLAIN ANALYZE runs its statement, so the inner statement is checked like any other."""
    words = _words(statement)
    i, depth = 1, 0  # words[0] is EXPLAIN
    while i < len(words) and (depth or words[i][1] == "("):
        depth += {"(": 1, ")": -1}.get(words[i][1], 0)
        i += 1
    if i < len(words) and words[i][1].upper() in {"ANALYZE", "ANALYSE"}:
        i += 1
    return statement[words[i][0]:] if i < len(words) else ""


def _check(sql: str) -> None:
    """Refuse any statement in `sql` that could write, reach outside the output or change settings."""
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise ValueError("query failed: no SQL statement given")
    for statement in statements:
        if statement.type == duckdb.StatementType.EXPLAIN:
            _check(_inner(statement.query))
        elif statement.type not in _ALLOWED:
            words = _words(statement.query)
            word = words[0][1].upper() if words else statement.type.name
            raise ValueError(f"query refused: {word} is not allowed (fpn query only reads the output)")


def query(output: str, sql: str, storage_options: dict | None = None) -> tuple[list[str], list[tuple]]:
    """Run `sql` against the output's views; returns (column names, rows).

    Raises ValueError "query refused: ..." for SQL that writes, reads outside the output or
    changes settings, and "query failed: ..." for SQL DuckDB cannot run."""
    with connect(output, storage_options) as con:
        try:
            _check(sql)
            rel = con.execute(sql)
            cols = [d[0] for d in rel.description] if rel.description else []
            return cols, rel.fetchall()
        except duckdb.PermissionException as e:
            raise ValueError(f"query refused: {str(e).splitlines()[0]}") from e
        except duckdb.Error as e:
            first = str(e).splitlines()[0]  # a locked setting is an InvalidInputException, told by its text
            verb = "refused" if "configuration has been locked" in first else "failed"
            raise ValueError(f"query {verb}: {first}") from e
