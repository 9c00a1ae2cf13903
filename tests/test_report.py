"""`fpn report` on a real output (made by `fpn run` with the bundled model): one offline HTML page whose figures
are the output's, opened in headless Chromium. Also the progress bar of that run."""
import io
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from browser import CHROMIUM, visit
from conftest import SOAP
from jobs.cli import cli

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make venv does)")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_output(ray_session, tmp_path_factory):
    """A flyover clip (12 frames, 6 fps) panned across the aerial image, the image itself and an empty video,
    run with the bundled model at every 3rd frame: 5 frames, one error row. Returns (output, result of run)."""
    from fpn_model.data import read_image
    from jobs.demo import make_flyover

    root = tmp_path_factory.mktemp("report")
    make_flyover(read_image(SOAP), root / "fly.mp4", size=160, frames=12, fps=6)
    (root / "empty.mp4").write_bytes(b"")
    r = invoke("run", root / "fly.mp4", SOAP, root / "empty.mp4", "-o", root / "out", "--every-n", 3)
    return root / "out", r


def _shown(html: str) -> tuple[dict, dict]:
    """The job figures (data-key) and the detections per class (data-class rows) as the page shows them."""
    keys = {k: int(v) for k, v in re.findall(r'<span data-key="(\w+)">(\d+)</span>', html)}
    classes = {c: int(n) for c, n in re.findall(r'<tr data-class="([^"]+)">.*?data-count="(\d+)"', html)}
    return keys, classes


def _query(out, sql, *flags):
    r = invoke("query", out, sql, "--format", "json", *flags)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.slow
def test_local_run_shows_one_progress_bar_instead_of_ray_operator_logs(run_output):
    _, r = run_output
    assert r.exit_code == 3, r.output  # finished with errors: the empty video
    assert re.search(r"frames: 5/5 .*frame/s, 1 errors\]", r.output), r.output
    assert "logging_progress" not in r.output and "Running Dataset" not in r.output
    assert "finished with errors: 5 frames" in r.output


@pytest.mark.slow
def test_report_figures_equal_fpn_query_answers(run_output, tmp_path):
    out, _ = run_output
    r = invoke("report", out, "-o", tmp_path / "report.html")
    assert r.exit_code == 0, r.output
    html = (tmp_path / "report.html").read_text()
    keys, classes = _shown(html)
    assert keys["frames"] == _query(out, "SELECT count(*) AS n FROM frames")[0]["n"] == 5
    assert keys["errors"] == _query(out, "SELECT count(*) AS n FROM errors")[0]["n"] == 1
    per_class = {row["label_name"]: row["n"] for row in
                 _query(out, "SELECT label_name, count(*) AS n FROM detections GROUP BY 1")}
    assert classes == per_class and sum(per_class.values()) == keys["detections"] > 0
    assert f"{keys['frames']} frames, {keys['detections']} detections, 1 errors" in r.output
    # the sections a person looks at: a frame strip of the clip (4 processed frames), the image, the error row
    assert html.count("<figcaption>frame ") == 4 and "fly.mp4" in html and "SOAP_061.png" in html
    assert "empty.mp4" in html and "empty file (0 bytes)" in html
    r = invoke("report", out, "-o", tmp_path / "other.html", "--video-backend", "nonsense")  # was a page, exit 0,
    assert r.exit_code == 1 and "video_backend must be decord, pyav" in r.output  # saying its frames were not drawn
    assert not (tmp_path / "other.html").exists()


@pytest.mark.slow
@needs_chromium
def test_report_opens_in_headless_chromium_offline_without_console_errors(run_output, tmp_path):
    out, _ = run_output
    assert invoke("report", out, "-o", tmp_path / "report.html").exit_code == 0
    seen = visit(tmp_path / "report.html")
    assert seen.console_errors == [] and seen.requests == []
    assert seen.images >= 8 and seen.broken_images == []  # timeline, 4 frames, thumbnail, size and score charts
    shot = np.asarray(Image.open(io.BytesIO(seen.screenshot)).convert("L"))
    assert shot.shape[1] > 1000 and shot.shape[0] > 2000 and shot.std() > 20  # a long page, not blank


@needs_chromium
def test_the_browser_check_sees_console_errors_and_network_requests(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!doctype html><p>x</p><img alt="far" src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom")</script>')
    seen = visit(page)
    assert "boom" in seen.console_errors and seen.requests == ["http://127.0.0.1:9/x.png"]
    assert seen.broken_images == ["far"]


@pytest.mark.slow
def test_report_and_status_of_an_s3_output_take_the_storage_flags(run_output, s3, tmp_path):
    fs, endpoint = s3
    out, _ = run_output
    fs.put(f"{out}/", "test/out/", recursive=True)
    r = invoke("report", "s3://test/out", "-o", tmp_path / "s3.html", "--endpoint-url", endpoint)
    assert r.exit_code == 0, r.output
    keys, classes = _shown((tmp_path / "s3.html").read_text())
    per_class = {row["label_name"]: row["n"] for row in _query(
        "s3://test/out", "SELECT label_name, count(*) AS n FROM detections GROUP BY 1", "--endpoint-url", endpoint)}
    assert keys["frames"] == 5 and keys["errors"] == 1 and classes == per_class
    assert keys["detections"] == sum(per_class.values()) == _query(out, "SELECT count(*) AS n FROM detections")[0]["n"]
    r = invoke("status", "s3://test/out", "--endpoint-url", endpoint, "--format", "json")
    assert r.exit_code == 3 and json.loads(r.output)["frames_done"] == 5, r.output
    r = invoke("report", "s3://test/missing", "-o", tmp_path / "x.html", "--endpoint-url", endpoint)
    assert r.exit_code == 1 and "Traceback" not in r.output and "s3://test/missing" in r.output


def test_a_source_that_cannot_be_drawn_is_said_as_a_plain_cause_naming_it(tmp_path):
    """Sources moved, replaced or damaged since the job: "image not drawn: FileNotFoundError: [Errno 2] No such
    file or directory: '...'", "ValueError: ... is 20x10 pixels now", "UnidentifiedImageError: cannot identify
    image file <fsspec...LocalFileOpener object at 0x...>"."""
    import pyarrow as pa

    from pipeline.output import FRAME_SCHEMA, Output, frame_id
    from pipeline.storage import canonical_uri

    gone, small, damaged, video = (tmp_path / n for n in ("gone.png", "small.png", "damaged.png", "gone.mp4"))
    rows = [{"frame_id": frame_id(canonical_uri(str(p)), 0), "source": canonical_uri(str(p)), "source_kind": kind,
             "frame_index": 0, "pts_s": 0.0 if kind == "video" else None, "width": 96, "height": 64,
             "num_detections": 0, "detections": [], "window_x": 0, "window_y": 0, "window_width": 96,
             "window_height": 64} for p, kind in ((gone, "image"), (small, "image"), (damaged, "image"),
                                                  (video, "video"))]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(small)
    damaged.write_bytes(b"not a png")
    r = invoke("report", tmp_path / "out", "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    said = re.findall(r"not drawn: ([^<]*)</p>", (tmp_path / "r.html").read_text().replace("&#39;", "'"))
    assert sorted(said) == sorted([
        f"{gone} does not exist", f"{video} does not exist", f"{damaged}: not an image format PIL reads",
        f"{small} is 20x10 pixels now, smaller than when the job read it: it changed since, and its boxes are of "
        "the old version (process it into a new output)"]), said


def test_a_video_damaged_since_the_job_is_a_plain_cause_and_its_decoders_log_stays_off_the_terminal(make_video,
                                                                                                    tmp_path, capfd):
    """The strip of a video cut short since the job read "not drawn: Error reading SRC..." (decord's text), and
    decord and FFmpeg printed "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x...] moov atom not found" and "[...] .../video_reader.cc:83:
    ERROR opening: ..." on the terminal of `fpn report`."""
    import shutil

    import pyarrow as pa

    from pipeline.output import FRAME_SCHEMA, Output, frame_id
    from pipeline.storage import canonical_uri

    video = tmp_path / "v.mp4"
    shutil.copy(make_video("report12.mp4", 12, 12.0), video)
    src = canonical_uri(str(video))
    rows = [{"frame_id": frame_id(src, i), "source": src, "source_kind": "video", "frame_index": i, "pts_s": i / 12,
             "width": 96, "height": 64, "num_detections": 0, "detections": []} for i in (0, 4, 8)]
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    video.write_bytes(video.read_bytes()[:video.stat().st_size // 2])
    capfd.readouterr()
    r = invoke("report", tmp_path / "out", "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    said = re.findall(r"not drawn: ([^<]*)</p>", (tmp_path / "r.html").read_text())
    assert said == [f"{video}: the video cannot be decoded (a damaged or truncated file?)"], said
    err = capfd.readouterr().err
    assert "moov atom" not in err and "video_reader" not in err, err


def test_progress_bar_counts_what_the_output_holds(tmp_path):
    """The bar reads the output as `fpn status` does: frames written of planned, and error rows."""
    import pyarrow as pa

    from jobs.progress import RunProgress
    from pipeline.output import FRAME_SCHEMA, Output, frame_id

    out = Output(str(tmp_path / "out"))
    out.write_job({"state": "running", "planned_frames": 10, "started_at": "2026-01-01T00:00:00"})
    rows = [{"frame_id": frame_id("/v.mp4", i), "source": "/v.mp4", "source_kind": "video", "frame_index": i,
             "num_detections": 0, "detections": []} for i in range(3)]
    out.write_frames(pa.Table.from_pylist(rows, schema=FRAME_SCHEMA))
    out.write_errors([{"source": "/w.mp4", "stage": "probe", "frame_index": None, "error_type": "ValueError",
                       "message": "empty file"}], "probe:/w.mp4")
    text = io.StringIO()
    out.write_job({"state": "cancelled", "planned_frames": 10})  # a resume planning: the record is the last run's
    bar = RunProgress(out.url, file=text, interval_s=60)
    bar.update()  # its frames are no progress of this run ('planning: 2520/? 167.78frame/s')
    assert bar.bar.total is None and bar.bar.n == 0 and "planning: 0/? " in text.getvalue().split("\r")[-1]
    out.write_job({"state": "running", "planned_frames": 10, "started_at": "2026-01-01T00:00:00"})
    with out.lease(), bar:  # a live writer: state running
        bar.update()
        assert bar.bar.total == 10 and bar.bar.n == 3
    assert "frames: 3/10" in text.getvalue() and "1 errors" in text.getvalue()


@pytest.mark.slow
def test_demo_starts_afresh_over_an_earlier_demo_made_with_another_model(ray_session, tmp_path, caplog):
    """`make demo` after an update of the bundled model: the earlier demo's output (other weights) is made again,
    where `fpn run` refuses to add to an output made with other settings."""
    import json

    from jobs.demo import run_demo
    from pipeline.output import OutputSettingsError

    run_demo(tmp_path)
    clip = (tmp_path / "flyover.mp4").stat().st_mtime_ns
    again, _, _ = run_demo(tmp_path)  # skips what it wrote (the clip was written again: a changed source, an error)
    assert (again["state"], again["skipped_frames"], again["runs"]) == ("succeeded", 25, 2)
    assert (tmp_path / "flyover.mp4").stat().st_mtime_ns == clip and not list(tmp_path.glob(".new-*"))
    doc_path = tmp_path / "job" / "_job.json"
    doc = json.loads(doc_path.read_text())
    doc["identity"]["weights_sha256"] = "0" * 64  # as if an older bundled model had made it
    doc_path.write_text(json.dumps(doc))
    doc, _, _ = run_demo(tmp_path)
    assert doc["state"] == "succeeded" and doc["frames"] == 25 and doc["runs"] == 1
    assert "earlier demo's output: starting it afresh" in caplog.text
    doc = json.loads(doc_path.read_text())
    doc["spec"]["inputs"] = ["mine.mp4"]  # not the demo's: left alone
    doc["identity"]["weights_sha256"] = "0" * 64
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(OutputSettingsError, match="made with other settings"):
        run_demo(tmp_path)


@pytest.mark.slow
def test_demo_runs_the_bundled_model_on_imagery_it_knows_and_writes_the_report(ray_session, tmp_path):
    r = invoke("demo", "-o", tmp_path / "demo")
    assert r.exit_code == 0, r.output
    assert "succeeded: 25 frames" in r.output  # the aerial image and 24 sampled frames of the flyover
    assert f"report: {tmp_path / 'demo' / 'report.html'}" in r.output
    html = (tmp_path / "demo" / "report.html").read_text()
    keys, classes = _shown(html)
    assert keys["frames"] == 25 and keys["errors"] == 0 and set(classes) == {"Tree"}
    assert "flyover.mp4" in html and "SOAP_061.png" in html and "bikes.mp4" not in html
    assert html.count("<figcaption>frame ") == 6


def test_ray_datas_issue_advice_stays_off_the_console_and_in_its_log():
    """Ray Data's issue detectors printed 12 lines per operator every 30 s of a job over the bar ("Operator 'Write'
    uses 306.8MiB of memory per worker ... consider setting `memory=...`"); its other warnings still show, and its
    log file keeps both."""
    import logging

    from jobs.progress import quiet_ray_data

    quiet_ray_data()
    quiet_ray_data()  # twice, one filter

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, "Operator 'Write' uses ...", None, None)

    advice = record("ray.data._internal.issue_detection.issue_detector_manager")
    other = record("ray.data._internal.execution.streaming_executor")
    handlers = logging.getLogger("ray.data").handlers
    console = [h for h in handlers if isinstance(h, logging.StreamHandler)]
    logs = [h for h in handlers if not isinstance(h, logging.StreamHandler)]
    assert console and logs
    assert all(sum(type(f).__name__ == "_NoIssueAdvice" for f in h.filters) == 1 for h in console)
    assert not any(h.filter(advice) for h in console) and all(h.filter(other) for h in console)
    assert all(h.filter(advice) and h.filter(other) for h in logs)  # the session's ray-data.log
