"""`fpn query`: DuckDB views over local and s3:// outputs, in table, csv and json, read-only over the output alone."""
import csv
import io
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.query import query
from pipeline.output import ERROR_SCHEMA, FRAME_SCHEMA, frame_id


def _box(x, y, s, score, label=1):
    return {"x1": x, "y1": y, "x2": x + s, "y2": y + s, "score": score, "label": label, "label_name": "Tree", "level": 2}


def _write(table: pa.Table, url: str, fs: fsspec.AbstractFileSystem) -> None:
    fs.makedirs(url.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(url, "wb") as f:
        pq.write_table(table, f)


def write_output(out: str, fs: fsspec.AbstractFileSystem | None = None, errors: list[dict] | None = None) -> None:
    """An output as a job writes it, with pyarrow alone: a 30 fps video of 150 s (one sampled frame a second),
    an image, and `errors` rows if any."""
    fs = fs or fsspec.filesystem("file")
    rows = []
    for i in range(150):
        dets = [_box(10.0 * k, 20.0, 16.0, 0.9 if k % 2 == 0 else 0.4) for k in range(i % 4)]
        rows.append({"frame_id": frame_id("v.mp4", i * 30), "source": "v.mp4", "source_kind": "video",
                     "frame_index": i * 30, "pts_s": float(i), "width": 640, "height": 360,
                     "num_detections": len(dets), "detections": dets, "model": "trees@x",
                     "window_x": 0, "window_y": 0, "window_width": 640, "window_height": 360})
    rows.append({"frame_id": frame_id("a.png", 0), "source": "a.png", "source_kind": "image", "frame_index": 0,
                 "pts_s": None, "width": 400, "height": 400, "num_detections": 0, "detections": [], "model": "trees@x",
                 "window_x": 0, "window_y": 0, "window_width": 400, "window_height": 400})
    table = pa.Table.from_pylist(rows, schema=FRAME_SCHEMA)
    _write(table.slice(0, 80), f"{out}/frames/part-a.parquet", fs)
    _write(table.slice(80), f"{out}/frames/part-b.parquet", fs)
    if errors:
        _write(pa.Table.from_pylist(errors, schema=ERROR_SCHEMA), f"{out}/errors/err-r0000-x.parquet", fs)


PER_MINUTE = ("SELECT floor(pts_s / 60)::INT AS minute, count(*) AS objects FROM detections "
              "WHERE source_kind = 'video' GROUP BY 1 ORDER BY 1")
IN_BOX = "SELECT count(*) AS n FROM detections WHERE score >= 0.5 AND x1 >= 0 AND x2 <= 25 AND y1 >= 20 AND y2 <= 40"


def expected_per_minute():
    per = {}
    for i in range(150):
        per[i // 60] = per.get(i // 60, 0) + i % 4
    return per


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_query_local_output_in_every_format(tmp_path):
    out = str(tmp_path / "out")
    write_output(out)
    r = CliRunner().invoke(cli, ["query", out, PER_MINUTE, "--format", "json"])
    assert r.exit_code == 0, r.output
    assert {row["minute"]: row["objects"] for row in json.loads(r.output)} == expected_per_minute()
    r = CliRunner().invoke(cli, ["query", out, IN_BOX, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(r.output)))
    # boxes at x = 0 and 10 (16 px wide) fit x <= 25; only k = 0 (score 0.9) of them qualifies, in frames with i % 4 >= 1
    assert rows == [{"n": str(sum(1 for i in range(150) if i % 4 >= 1))}]
    r = CliRunner().invoke(cli, ["query", out, "SELECT count(*) AS frames, sum(num_detections) AS d FROM frames"])
    assert r.exit_code == 0 and r.output.split() == ["frames", "d", "151", str(sum(i % 4 for i in range(150)))]
    # lists and structs in CSV as JSON (they were Python's repr: None, single quotes)
    r = CliRunner().invoke(cli, ["query", out, "SELECT detections FROM frames WHERE num_detections > 0 LIMIT 1",
                                 "--format", "csv"])
    cell = list(csv.DictReader(io.StringIO(r.output)))[0]["detections"]
    assert json.loads(cell)[0]["score"] > 0 and "None" not in cell
    # the table shows each number as it reads back: map coordinates were 4 significant digits (5e+05, -81),
    # every box of a scene the same place; a float32 score shows as itself, not its double expansion
    r = CliRunner().invoke(cli, ["query", out, "SELECT round(500027.834::DOUBLE, 2) AS e, 4399972.6::DOUBLE AS n, "
                                 "-80.996612::DOUBLE AS lon, "
                                 "max(score) AS s FROM detections"])
    assert r.exit_code == 0 and r.output.split()[4:] == ["500027.83", "4399972.6", "-80.996612", "0.9"], r.output


def test_query_errors_are_one_line(tmp_path):
    out = str(tmp_path / "out")
    write_output(out)
    r = CliRunner().invoke(cli, ["query", out, "SELECT nope FROM frames"])
    assert r.exit_code == 1 and "query failed" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["query", out, "  "])
    assert r.exit_code == 1 and "query failed: no SQL statement" in r.output
    r = CliRunner().invoke(cli, ["query", str(tmp_path / "missing"), "SELECT 1"])
    assert r.exit_code == 1 and "no frames/ directory" in r.output
    (tmp_path / "foreign" / "frames").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "foreign" / "frames" / "part-a.parquet")
    r = CliRunner().invoke(cli, ["query", str(tmp_path / "foreign"), "SELECT 1"])
    assert r.exit_code == 1 and "not readable as an fpn output" in r.output and "Traceback" not in r.output


def test_output_with_nothing_written_yet_answers_zero_rows(tmp_path):
    (tmp_path / "out" / "frames").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["query", str(tmp_path / "out"), "SELECT (SELECT count(*) FROM frames) AS f, "
                                 "(SELECT count(*) FROM detections) AS d, (SELECT count(*) FROM errors) AS e",
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"f": 0, "d": 0, "e": 0}]


def test_errors_view_has_a_row_per_failure(tmp_path):
    out = str(tmp_path / "out")
    write_output(out, errors=[
        {"source": "bad.mp4", "stage": "decode", "frame_index": None, "error_type": "DecodeError", "message": "eof"},
        {"source": "v.mp4", "stage": "detect", "frame_index": 30, "error_type": "RuntimeError", "message": "oom"},
    ])
    r = CliRunner().invoke(cli, ["query", out, "SELECT source, stage, frame_index, error_type FROM errors ORDER BY 1",
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [
        {"source": "bad.mp4", "stage": "decode", "frame_index": None, "error_type": "DecodeError"},
        {"source": "v.mp4", "stage": "detect", "frame_index": 30, "error_type": "RuntimeError"},
    ]


def test_errors_view_is_empty_with_the_error_columns_when_nothing_failed(tmp_path):
    out = str(tmp_path / "out")
    write_output(out)
    assert query(out, "SELECT * FROM errors") == (ERROR_SCHEMA.names, [])
    sql = "SELECT count(*) AS n FROM frames f LEFT JOIN errors e USING (source) WHERE e.stage IS NULL"
    assert query(out, sql) == (["n"], [(151,)])


def test_output_whose_path_has_a_quote_is_queried(tmp_path):
    out = str(tmp_path / "it's" / "out")
    write_output(out, errors=[{"source": "x", "stage": "decode", "frame_index": None, "error_type": "E",
                               "message": "m"}])
    r = CliRunner().invoke(cli, ["query", out, "SELECT (SELECT count(*) FROM frames) AS f, count(*) AS e FROM errors",
                                 "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"f": 151, "e": 1}]


def test_reads_inside_the_output_and_in_memory_work_are_allowed(tmp_path):
    out = str(tmp_path / "out")
    write_output(out)
    frames = f"{out}/frames/*.parquet"
    sql = (f"CREATE TABLE per_source AS SELECT source, count(*) AS n FROM read_parquet('{frames}') GROUP BY 1; "
           "INSERT INTO per_source VALUES ('extra', 1); SELECT source, n FROM per_source ORDER BY 1")
    assert query(out, sql)[1] == [("a.png", 1), ("extra", 1), ("v.mp4", 150)]
    assert query(out, "EXPLAIN SELECT count(*) FROM detections")[1]
    assert [r[0] for r in query(out, "DESCRIBE errors")[1]] == ERROR_SCHEMA.names


REFUSED = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('{tmp}/other/x.parquet')",
    "SELECT * FROM read_parquet('{out}-other/frames/*.parquet')",  # a sibling whose name starts with the output's
    "SELECT * FROM read_parquet('{out}/../other/x.parquet')",
    "SELECT * FROM glob('{tmp}/*')",
    "CREATE TABLE t AS SELECT * FROM read_csv('/etc/passwd')",
    "COPY (SELECT 1) TO '{tmp}/x.csv'",
    "COPY (SELECT 1) TO '{out}/x.csv'",
    "COPY frames TO '{out}/frames/part-z.parquet' (FORMAT parquet)",
    "SELECT 1; COPY (SELECT 1) TO '{out}/x.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}/x.csv'",
    "/* hidden */ EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 1) TO '{out}/x.csv'",
    "EXPORT DATABASE '{out}/db'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "ATTACH '{tmp}/x.db'",
    "ATTACH '{out}/x.db'",
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET lock_configuration",
    "PRAGMA threads = 1",
    "PRAGMA enable_profiling",
    "SELECT * FROM enable_logging(storage = 'file', storage_path = '{out}/log')",
    "CALL enable_logging(storage = 'file', storage_path = '{out}/log')",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_query_refuses_what_reads_outside_writes_or_reconfigures(tmp_path, sql):
    out = str(tmp_path / "out")
    write_output(out)
    write_output(str(tmp_path / "out-other"))
    (tmp_path / "other").mkdir()
    pq.write_table(pa.table({"secret": [1]}), tmp_path / "other" / "x.parquet")
    before = files_under(tmp_path)
    r = CliRunner().invoke(cli, ["query", out, sql.format(out=out, tmp=tmp_path)])
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: query refused: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    assert files_under(tmp_path) == before


@pytest.mark.slow
def test_query_s3_output(s3):
    fs, endpoint = s3
    write_output("s3://test/q", fs)
    r = CliRunner().invoke(cli, ["query", "s3://test/q", PER_MINUTE, "--format", "json", "--endpoint-url", endpoint])
    assert r.exit_code == 0, r.output
    assert {row["minute"]: row["objects"] for row in json.loads(r.output)} == expected_per_minute()


@pytest.mark.slow
@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_parquet('s3://other/x.parquet')",
    "SELECT * FROM read_parquet('s3://test/q2/x.parquet')",
    "SELECT * FROM read_parquet('s3://test/q/../q2/x.parquet')",
    "COPY (SELECT 1) TO 's3://test/q/x.csv'",
])
def test_s3_query_reads_its_output_and_refuses_other_buckets_and_prefixes(s3, monkeypatch, sql):
    fs, endpoint = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    write_output("s3://test/q", fs, errors=[{"source": "x", "stage": "decode", "frame_index": None,
                                             "error_type": "E", "message": "m"}])
    fs.makedirs("other", exist_ok=True)  # the fixture resets bucket `test` only
    for url in ("s3://other/x.parquet", "s3://test/q2/x.parquet"):
        _write(pa.table({"secret": [1]}), url, fs)
    before = set(fs.find("test")) | set(fs.find("other"))
    with pytest.raises(ValueError, match="^query refused: "):
        query("s3://test/q", sql)
    fs.invalidate_cache()
    assert set(fs.find("test")) | set(fs.find("other")) == before
    frames = "s3://test/q/frames/*.parquet"
    assert query("s3://test/q", f"SELECT count(*) FROM read_parquet('{frames}'), errors")[1] == [(151,)]


def test_a_reader_that_stops_early_gets_no_error_line(tmp_path):
    """`fpn query OUT SQL | head -2` printed 'Error: [Errno 32] Broken pipe' when head had what it wanted."""
    import subprocess
    import sys

    from pipeline.output import Output

    Output(str(tmp_path)).write_empty_frames()
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", "query", str(tmp_path), "SELECT * FROM range(300000)"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"range"
    p.stdout.close()  # as head does
    assert p.wait(60) in (0, 1) and p.stderr.read() == b""


def test_the_detections_view_has_mask_rcnn_masks(tmp_path):
    from pipeline.output import Output, frame_schema

    det = {"x1": 1.0, "y1": 1.0, "x2": 3.0, "y2": 3.0, "score": 0.9, "label": 1, "label_name": "t", "level": 2,
           "mask": {"size": [4, 4], "counts": "04L4"}}
    row = {"frame_id": frame_id("/a.png", 0), "source": "/a.png", "source_kind": "image", "frame_index": 0,
           "width": 4, "height": 4, "num_detections": 1, "detections": [det]}
    Output(str(tmp_path)).write_frames(pa.Table.from_pylist([row], schema=frame_schema(with_masks=True)))
    assert query(str(tmp_path), "SELECT mask FROM detections") == (["mask"], [(det["mask"],)])
