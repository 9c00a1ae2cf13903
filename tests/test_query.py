"""`fpn query`: DuckDB views over local and s3:// outputs, in table, csv and json."""
import csv
import io
import json

import pyarrow as pa
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from pipeline.record import write_job_json
from pipeline.sink import FRAME_SCHEMA, _atomic_write, frame_id


def _box(x, y, s, score, label=1):
    return {"x1": x, "y1": y, "x2": x + s, "y2": y + s, "score": score, "label": label, "label_name": "Tree", "level": 2}


def write_output(out: str, storage_options=None) -> None:
    """An output as a job writes it: a 30 fps video of 150 s (one sampled frame a second) and an image."""
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
    _atomic_write(table.slice(0, 80), f"{out}/frames/part-a.parquet", storage_options)
    _atomic_write(table.slice(80), f"{out}/frames/part-b.parquet", storage_options)
    write_job_json(out, {"state": "succeeded"}, storage_options)


PER_MINUTE = ("SELECT floor(pts_s / 60)::INT AS minute, count(*) AS objects FROM detections "
              "WHERE source_kind = 'video' GROUP BY 1 ORDER BY 1")
IN_BOX = "SELECT count(*) AS n FROM detections WHERE score >= 0.5 AND x1 >= 0 AND x2 <= 25 AND y1 >= 20 AND y2 <= 40"


def expected_per_minute():
    per = {}
    for i in range(150):
        per[i // 60] = per.get(i // 60, 0) + i % 4
    return per


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
    assert r.exit_code == 0 and "FRAMES" in r.output and "151" in r.output


def test_query_errors_are_one_line(tmp_path):
    out = str(tmp_path / "out")
    write_output(out)
    r = CliRunner().invoke(cli, ["query", out, "SELECT nope FROM frames"])
    assert r.exit_code == 1 and "query failed" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["query", str(tmp_path / "missing"), "SELECT 1"])
    assert r.exit_code == 1 and "no frames/ directory" in r.output


@pytest.mark.slow
def test_query_s3_output(s3):
    fs, endpoint = s3
    write_output("s3://test/q", {"endpoint_url": endpoint})
    r = CliRunner().invoke(cli, ["query", "s3://test/q", PER_MINUTE, "--format", "json", "--endpoint-url", endpoint])
    assert r.exit_code == 0, r.output
    assert {row["minute"]: row["objects"] for row in json.loads(r.output)} == expected_per_minute()
