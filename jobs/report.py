"""`fpn report`: one self-contained static HTML page about an output, to look before querying.

The page holds the job (inputs, model, frames planned and written, detections, errors, wall time, rate),
per video the detections over time per class and a strip of sampled frames with their boxes (decoded from
the source at their frame index), per image or raster a thumbnail with every box across its windows and,
for rasters and crowded images, a density map; object sizes by class and by the pyramid level that produced
them, the score distribution, and the error table (sources and messages redacted). Images are inlined as
base64 PNG and styles sit in the page: it makes no network request when opened, and has no script.

Everything is aggregated in DuckDB over the output's read-only views (`jobs.query.connect`): rows never
become Python lists, only aggregates and the boxes of the few frames drawn. Per-source sections are limited
to the sources with the most detections (`max_sources`), so the page stays small for any output size.
Charts are drawn with matplotlib, the page with a Jinja2 template (autoescaped).
"""
from __future__ import annotations

import base64
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from pipeline.decode import check_video_backend
from pipeline.output import ERRORS_QUERY, Output
from pipeline.plan import read_scale
from pipeline.storage import check_file_destination, first_line, redact, redact_text, redact_url, translate_error

from .query import connect
from .render import Region, boxes, colour, draw_boxes, of_frame, read_pixels, read_video_frames, unnested

__all__ = ["build_report", "Report"]

THUMB_SIDE = 640  # image/raster thumbnails, pixels
STRIP_WIDTH = 240  # each sampled video frame in a strip, pixels
MAX_BOXES = 20_000  # boxes drawn on one thumbnail; the density map shows the rest
DENSITY_MIN = 500  # an image with this many detections gets a density map too (rasters always do)
CHART_CLASSES = 10  # charts by class show the classes with most detections (a COCO model has 80)


@dataclass(frozen=True)
class Report:
    """What `build_report` wrote, and the figures the page shows (for the CLI's summary line and tests)."""

    path: Path
    bytes: int
    seconds: float
    frames: int
    detections: int
    errors: int
    classes: dict[str, int]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _image_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return _data_uri(buf.getvalue())


def _figure(w: float = 8.0, h: float = 2.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h))
    ax.grid(alpha=0.3)
    return fig, ax


def _name(source: str) -> str:
    return PurePosixPath(redact_url(source).split("?", 1)[0]).name or redact_url(source)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{int(s) // 60} min {int(s) % 60:02d} s"


# -- sections -----------------------------------------------------------------------------------------
def _job(out: Output, counts: dict[str, int]) -> dict[str, Any]:
    doc = redact(out.read_job(missing_ok=True))
    spec, model = doc.get("spec") or {}, doc.get("model") or {}
    levels = model.get("levels") or []
    return {
        "state": (doc.get("state") or "unknown").replace("_", " "), "output": redact_url(out.url),
        "inputs": [redact_text(str(i)) for i in spec.get("inputs", [])],
        "model": model.get("id") or spec.get("model") or "?",
        "arch": " + ".join(str(model[k]) for k in ("arch", "backbone", "neck") if model.get(k)),
        "levels": f"P{levels[0]}-P{levels[-1]}" if levels else "", "classes": ", ".join(model.get("class_names", [])),
        "planned": doc.get("planned_frames"), "frames": counts["frames"], "detections": counts["detections"],
        "errors": counts["errors"], "wall": _fmt_s(doc.get("wall_s")), "rate": doc.get("frames_per_s"),
        "started": doc.get("started_at"), "finished": doc.get("finished_at"), "runs": doc.get("runs"),
        "skipped": doc.get("skipped_frames"), "outside": doc.get("frames_outside_plan"),
        "video_backend": spec.get("video_backend"), "rasters": doc.get("rasters") or {},
        "sampling": ", ".join(f"{k} {v}" for k, v in (spec.get("sampling") or {}).items() if v is not None),
    }


def _video_section(con, row: tuple, labels: set[int], min_score: float, strip: int, storage_options,
                   video_backend) -> dict[str, Any]:
    source, frames, dets, t0, t1 = row
    span = max(0.0, (t1 or 0.0) - (t0 or 0.0))
    # per processed frame for a short clip, per second up to 10 minutes, per minute beyond
    bucket, unit = (0.0, "frame") if span <= 20 else (1.0, "s") if span <= 600 else (60.0, "min")
    series = con.execute(f"""
        SELECT d.label, any_value(d.label_name), CASE WHEN ? > 0 THEN floor(pts_s / ?) * ? ELSE pts_s END AS b,
               count(*)
        FROM {unnested("pts_s", where="source = ?")} WHERE d.score >= ? GROUP BY d.label, b ORDER BY ALL""",
                         [bucket, bucket or 1, bucket, source, min_score]).fetchall()
    fig, ax = _figure(8, 2.6)
    by_label: dict[int, tuple[str, list, list]] = {}
    for label, name, b, n in series:
        if label not in labels:
            continue
        by_label.setdefault(label, (name, [], []))
        by_label[label][1].append(b)
        by_label[label][2].append(n)
    for label, (name, xs, ys) in sorted(by_label.items()):
        ax.plot(xs, ys, drawstyle="steps-post" if bucket else "default", marker=None if bucket else ".",
                color=np.array(colour(label)) / 255, label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"detections / {unit}")
    ax.set_xlim(t0 or 0, max((t1 or 0) + bucket, (t0 or 0) + 1))
    ax.set_ylim(bottom=0)
    if by_label:
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no detections with score >= {min_score:g}", ha="center", transform=ax.transAxes)
    section = {"name": _name(source), "source": redact_url(source), "frames": frames, "detections": dets,
               "span": f"{t0:.1f}-{t1:.1f} s" if t0 is not None else "-", "timeline": _png(fig), "strip": [],
               "strip_error": None}
    picks = con.execute("""
        SELECT min(frame_index), min(pts_s) FROM (
            SELECT frame_index, pts_s, ntile(?) OVER (ORDER BY frame_index) AS g FROM frames WHERE source = ?)
        GROUP BY g ORDER BY 1""", [strip, source]).fetchall()
    try:
        pixels = read_video_frames(source, [int(i) for i, _ in picks], storage_options=storage_options,
                                   video_backend=video_backend)
    except Exception as e:  # noqa: BLE001 - a source gone or unreadable: the rest of the page stands
        section["strip_error"] = _why(e, source)
        return section
    found = boxes(con, source, frames=[int(i) for i, _ in picks], min_score=min_score)
    for (index, pts), frame in zip(picks, pixels):
        d = of_frame(found, index)
        scale = STRIP_WIDTH / frame.shape[1]
        small = np.asarray(_resize(frame, scale))
        section["strip"].append({"uri": _image_uri(draw_boxes(small, d, scale=scale, width=1)),
                                 "caption": f"frame {index} · {pts:.2f} s · {len(d['score'])} boxes"})
    return section


def _resize(frame: np.ndarray, scale: float) -> Image.Image:
    h, w = frame.shape[:2]
    return Image.fromarray(frame).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                         Image.Resampling.BILINEAR)


def _why(e: BaseException, source: str) -> str:
    """Why `source`'s pixels could not be drawn, in one redacted line that names it, without the exception's class
    ("FileNotFoundError: [Errno 2] ..."; the page is read by whoever ran the job): a file gone or forbidden as the
    pipeline's one-line errors say it (translate_error: "SOURCE does not exist"), an error that names the source
    as it is ("SOURCE is 50x40 pixels now, ...", `render.read_pixels`'s), any other after the source."""
    plain = translate_error(e, source)
    if plain is not e:
        return str(plain)
    why = first_line(e)
    return redact_text(why if source in why else f"{source}: {why}")


def _still_section(con, row: tuple, min_score: float, storage_options, rasters: dict) -> dict[str, Any]:
    source, kind, frames, dets, width, height, nodata = row
    section = {"name": _name(source), "source": redact_url(source), "kind": kind, "frames": frames,
               "detections": dets, "size": f"{width} x {height}", "thumb": None, "density": None, "error": None,
               "drawn": 0, "nodata": nodata, "geo": None}
    g = (rasters.get("georeferenced") or {}).get(source) or {}  # a raster's place and reading (the job's record)
    if kind == "raster":
        section["geo"] = (f"{g['crs']}, {g['gsd_m']:g} m/pixel, read at {read_scale(g)}" if g
                          else "no georeference: pixel coordinates only")
        if note := (rasters.get("notes") or {}).get(source):
            section["geo"] += f" ({note})"
    d = boxes(con, source, min_score=min_score, limit=MAX_BOXES)
    section["drawn"] = len(d["score"])
    try:
        pixels = read_pixels(source, kind, region=Region(0, 0, width, height), max_side=THUMB_SIDE,
                             bands=g.get("bands"), storage_options=storage_options)
        scale = pixels.shape[1] / width
        section["thumb"] = _image_uri(draw_boxes(pixels, d, scale=scale, width=1))
    except Exception as e:  # noqa: BLE001 - a source gone or unreadable: the rest of the page stands
        section["error"] = _why(e, source)
    if kind == "raster" or (dets or 0) >= DENSITY_MIN:
        section["density"] = _density(con, source, width, height, min_score)
    return section


def _density(con, source: str, width: int, height: int, min_score: float, cells: int = 64) -> str:
    """Box centres per cell of a grid over the frame, counted in DuckDB."""
    cell = max(width, height) / cells
    nx, ny = max(1, math.ceil(width / cell)), max(1, math.ceil(height / cell))
    grid = np.zeros((ny, nx))
    rows = con.execute(f"""
        SELECT least(floor((d.x1 + d.x2) / 2 / ?), ?)::INT, least(floor((d.y1 + d.y2) / 2 / ?), ?)::INT, count(*)
        FROM {unnested(where="source = ?")} WHERE d.score >= ? GROUP BY ALL""",
                       [cell, nx - 1, cell, ny - 1, source, min_score]).fetchnumpy()
    cx, cy, n = (rows[k] for k in list(rows))
    ok = (cx >= 0) & (cy >= 0)
    grid[cy[ok], cx[ok]] = n[ok]
    fig, ax = _figure(5, 5 * ny / nx)
    ax.grid(False)
    im = ax.imshow(grid, cmap="magma", extent=(0, width, height, 0), interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"detections per {cell:.0f} px cell", shrink=0.8)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    return _png(fig)


def _sizes(con, labels: set[int], min_score: float) -> dict[str, Any]:
    """Box side sqrt(w*h) in source pixels: a histogram per pyramid level and per class, and a table per level."""
    side = "sqrt((d.x2 - d.x1) * (d.y2 - d.y1))"
    hist = con.execute(f"""
        SELECT d.level, d.label, any_value(d.label_name), floor(log2(greatest({side}, 1)) * 2)::INT AS b, count(*)
        FROM {unnested()} WHERE d.score >= ? GROUP BY d.level, d.label, b ORDER BY ALL""", [min_score]).fetchall()
    table = con.execute(f"""
        SELECT d.level, count(*), quantile_cont({side}, [0.1, 0.5, 0.9])
        FROM {unnested()} WHERE d.score >= ? GROUP BY d.level ORDER BY 1""", [min_score]).fetchall()
    charts = []
    for key, title in ((0, "by pyramid level"), (1, "by class")):
        acc: dict[Any, dict[int, int]] = {}
        names: dict[Any, str] = {}
        for level, label, name, b, n in hist:
            if key == 1 and label not in labels:
                continue
            k = level if key == 0 else label
            names[k] = f"P{level}" if key == 0 else name
            acc.setdefault(k, {})
            acc[k][b] = acc[k].get(b, 0) + n
        fig, ax = _figure(6, 2.8)
        for i, (k, bins) in enumerate(sorted(acc.items(), key=lambda kv: (kv[0] is None, kv[0]))):
            xs = sorted(bins)
            c = np.array(colour(k)) / 255 if key == 1 else f"C{i}"
            ax.plot([2 ** ((x + 0.5) / 2) for x in xs], [bins[x] for x in xs], drawstyle="steps-mid", label=names[k], color=c)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("box side sqrt(w h) (source pixels)")
        ax.set_ylabel("detections")
        ax.set_title(f"object sizes {title}", fontsize=10)
        if acc:
            ax.legend(fontsize=8)
        charts.append(_png(fig))
    rows = [{"level": "-" if lv is None else f"P{lv}", "n": n, "p10": q[0], "p50": q[1], "p90": q[2]}
            for lv, n, q in table]
    return {"charts": charts, "levels": rows}


def _scores(con, labels: set[int]) -> str:
    rows = con.execute(f"""
        SELECT d.label, any_value(d.label_name), least(floor(d.score * 40), 39)::INT AS b, count(*)
        FROM {unnested()} GROUP BY d.label, b ORDER BY ALL""").fetchall()
    acc: dict[int, tuple[str, dict[int, int]]] = {}
    for label, name, b, n in rows:
        if label in labels:
            acc.setdefault(label, (name, {}))[1][b] = n
    fig, ax = _figure(6, 2.8)
    for label, (name, bins) in sorted(acc.items()):
        xs = range(40)
        ax.plot([(x + 0.5) / 40 for x in xs], [bins.get(x, 0) for x in xs], drawstyle="steps-mid", label=name,
                color=np.array(colour(label)) / 255)
    ax.set_xlabel("score")
    ax.set_ylabel("detections")
    ax.set_xlim(0, 1)
    ax.set_title("score distribution (all detections)", fontsize=10)
    if acc:
        ax.legend(fontsize=8)
    return _png(fig)


def _errors(con, limit: int = 50) -> dict[str, Any]:
    """Error rows by stage and type, and the `limit` (source, stage, type) groups with most rows."""
    kinds = con.execute("""
        SELECT stage, error_type, count(*), count(DISTINCT source) FROM errors GROUP BY ALL ORDER BY 3 DESC, 1, 2
        """).fetchall()
    groups = con.execute("SELECT count(*) FROM (SELECT DISTINCT source, stage, error_type FROM errors)").fetchone()[0]
    rows = con.execute("""
        SELECT source, stage, error_type, any_value(message), count(*) AS n, min(frame_index)
        FROM errors GROUP BY source, stage, error_type ORDER BY n DESC, source LIMIT ?""", [limit]).fetchall()
    return {"kinds": [{"stage": st, "type": t, "n": n, "sources": ns} for st, t, n, ns in kinds], "groups": groups,
            "rows": [{"source": redact_url(s or ""), "stage": st, "type": t, "message": redact_text(m or ""), "n": n,
                      "frame": f} for s, st, t, m, n, f in rows]}


# -- the page -------------------------------------------------------------------------------------------
def build_report(output: str, dest: str | Path = "report.html", *, storage_options: dict | None = None,
                 min_score: float = 0.0, max_sources: int = 8, strip: int = 6,
                 video_backend: str | None = None) -> Report:
    """Write the HTML report of `output` to `dest` (a local file).

    `min_score` filters what is drawn and charted by source (the job's own threshold already applies);
    `max_sources` bounds the videos and the images/rasters shown one by one (those with most detections);
    `strip` is the number of frames sampled per video, decoded with `video_backend` (default: the job's)."""
    t0 = time.monotonic()
    check_file_destination(str(dest), "report.html")
    if video_backend is not None:
        check_video_backend(video_backend)
    out = Output.for_reading(output, storage_options)
    counts = out.counts()
    job = _job(out, counts)
    video_backend = video_backend or job.pop("video_backend") or "decord"
    rasters = job.pop("rasters")
    with connect(out) as con:
        classes = con.execute(f"SELECT d.label, any_value(d.label_name), count(*) FROM {unnested()} GROUP BY 1 "
                              "ORDER BY 3 DESC, 1").fetchall()
        kinds = dict(con.execute("SELECT source_kind, count(DISTINCT source) FROM frames GROUP BY 1").fetchall())
        videos = con.execute("""
            SELECT source, count(*), sum(num_detections), min(pts_s), max(pts_s) FROM frames
            WHERE source_kind = 'video' GROUP BY source ORDER BY 3 DESC, 1 LIMIT ?""", [max_sources]).fetchall()
        labels = {lb for lb, _, _ in classes[:CHART_CLASSES]}
        nodata = ("count(*) FILTER (WHERE all_nodata)" if "all_nodata" in
                  {c for c, in con.execute("SELECT column_name FROM (DESCRIBE frames)").fetchall()} else "0")
        stills = con.execute(f"""
            SELECT source, any_value(source_kind), count(*), sum(num_detections), max(width), max(height), {nodata}
            FROM frames WHERE source_kind <> 'video' GROUP BY source ORDER BY 4 DESC, 1 LIMIT ?""",
                             [max_sources]).fetchall()
        page = {
            "job": job,
            "classes": [{"label": lb, "name": name, "n": n, "colour": "#%02x%02x%02x" % colour(lb)}
                        for lb, name, n in classes],
            "kinds": kinds, "min_score": min_score,
            "videos": [_video_section(con, r, labels, min_score, strip, storage_options, video_backend)
                       for r in videos],
            "stills": [_still_section(con, r, min_score, storage_options, rasters) for r in stills],
            "hidden_videos": max(0, kinds.get("video", 0) - len(videos)),
            "hidden_stills": max(0, kinds.get("image", 0) + kinds.get("raster", 0) - len(stills)),
            "sizes": _sizes(con, labels, min_score) if counts["detections"] else None,
            "scores": _scores(con, labels) if counts["detections"] else None,
            "charted_classes": len(labels) if len(classes) > len(labels) else None,
            "errors": _errors(con), "errors_query": ERRORS_QUERY, "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
    html = _TEMPLATE.render(**page)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(html, encoding="utf-8")
    return Report(dest, dest.stat().st_size, round(time.monotonic() - t0, 2), counts["frames"],
                  counts["detections"], counts["errors"], {name: n for _, name, n in classes})


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>fpn report: {{ job.output }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 16px 40px; color: #222; }
h1 { font-size: 22px; margin: 20px 0 4px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; margin-top: 28px; }
h3 { font-size: 15px; margin: 18px 0 6px; } .muted { color: #666; } code { font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0; } td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
th { color: #555; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; } figcaption { font-size: 12px; color: #555; }
.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; }
.state { padding: 1px 8px; border-radius: 8px; background: #eef; } .err td { font-size: 12px; }
img { max-width: 100%; }
</style></head><body>
<h1>fpn report</h1>
<div class="muted"><code>{{ job.output }}</code> · generated {{ generated }}</div>

<h2>Job</h2>
<table id="job">
<tr><th>state</th><td><span class="state">{{ job.state }}</span></td></tr>
<tr><th>model</th><td>{{ job.model }}{% if job.arch %} ({{ job.arch }}{% if job.levels %}, {{ job.levels }}{% endif %}){% endif %}{% if job.classes %}; classes: {{ job.classes }}{% endif %}</td></tr>
<tr><th>inputs</th><td>{% for i in job.inputs[:20] %}<code>{{ i }}</code><br>{% endfor %}{% if job.inputs|length > 20 %}… and {{ job.inputs|length - 20 }} more{% endif %}</td></tr>
{% if job.sampling %}<tr><th>sampling</th><td><code>{{ job.sampling }}</code></td></tr>{% endif %}
<tr><th>frames</th><td><span data-key="frames">{{ job.frames }}</span> written{% if job.planned is not none %} of {{ job.planned }} planned{% endif %}{% if job.skipped %} ({{ job.skipped }} by earlier runs){% endif %}{% if job.outside %}; {{ job.outside }} more that earlier runs sampled and this job does not{% endif %}</td></tr>
<tr><th>sources</th><td>{% for k, n in kinds|dictsort %}{{ n }} {{ k }}{{ "s" if n != 1 }}{{ ", " if not loop.last }}{% endfor %}</td></tr>
<tr><th>detections</th><td><span data-key="detections">{{ job.detections }}</span></td></tr>
<tr><th>errors</th><td><span data-key="errors">{{ job.errors }}</span></td></tr>
<tr><th>wall time</th><td>{{ job.wall }}{% if job.rate %} · {{ "%.2f"|format(job.rate) }} frames/s{% endif %}{% if job.runs %} · run {{ job.runs }}{% endif %}</td></tr>
<tr><th>started</th><td>{{ job.started or "-" }}{% if job.finished %} · finished {{ job.finished }}{% endif %}</td></tr>
</table>

<h3>Detections per class</h3>
<table id="classes"><tr><th>class</th><th>detections</th></tr>
{% for c in classes %}<tr data-class="{{ c.name }}"><td><span class="swatch" style="background: {{ c.colour }}"></span>{{ c.name }}</td><td class="n" data-count="{{ c.n }}">{{ c.n }}</td></tr>
{% else %}<tr><td colspan="2" class="muted">no detections</td></tr>{% endfor %}
</table>
{% if min_score %}<p class="muted">Per-source charts and drawings show detections with score &ge; {{ min_score }}.</p>{% endif %}
{% if charted_classes %}<p class="muted">Charts by class show the {{ charted_classes }} classes with most detections.</p>{% endif %}

{% if videos %}<h2>Videos</h2>
{% for v in videos %}<h3>{{ v.name }}</h3>
<div class="muted"><code>{{ v.source }}</code> · {{ v.frames }} frames processed · {{ v.detections }} detections · {{ v.span }}</div>
<img alt="detections over time in {{ v.name }}" src="{{ v.timeline }}">
{% if v.strip_error %}<p class="muted">frames not drawn: {{ v.strip_error }}</p>{% endif %}
<div class="grid">{% for f in v.strip %}<figure><img alt="{{ f.caption }}" src="{{ f.uri }}"><figcaption>{{ f.caption }}</figcaption></figure>{% endfor %}</div>
{% endfor %}
{% if hidden_videos %}<p class="muted">{{ hidden_videos }} more videos not shown (fewer detections): fpn query, fpn render.</p>{% endif %}
{% endif %}

{% if stills %}<h2>Images and rasters</h2>
{% for s in stills %}<h3>{{ s.name }}</h3>
<div class="muted"><code>{{ s.source }}</code> · {{ s.kind }} {{ s.size }} px · {{ s.frames }} {{ "windows" if s.kind == "raster" else "frame" }} · {{ s.detections }} detections{% if s.drawn < s.detections %} ({{ s.drawn }} drawn){% endif %}</div>
{% if s.geo %}<div class="muted" data-raster>{{ s.geo }}{% if s.nodata %} · {{ s.nodata }} windows all nodata (skipped){% endif %}</div>{% endif %}
<div class="grid">
{% if s.thumb %}<figure><img alt="{{ s.name }} with its boxes" src="{{ s.thumb }}"><figcaption>every box, across windows</figcaption></figure>{% endif %}
{% if s.density %}<figure><img alt="density of detections in {{ s.name }}" src="{{ s.density }}"><figcaption>detection density</figcaption></figure>{% endif %}
</div>
{% if s.error %}<p class="muted">image not drawn: {{ s.error }}</p>{% endif %}
{% endfor %}
{% if hidden_stills %}<p class="muted">{{ hidden_stills }} more images/rasters not shown (fewer detections): fpn query, fpn render.</p>{% endif %}
{% endif %}

{% if sizes %}<h2>Object sizes</h2>
<p class="muted">Box side sqrt(w&middot;h) in source pixels, by the pyramid level that produced each box (R-CNN: k = floor(4 + log2(side / 224)) on the model's input, clamped to its levels) and by class.</p>
<div class="grid">{% for c in sizes.charts %}<img alt="object sizes" src="{{ c }}">{% endfor %}</div>
<table id="levels"><tr><th>level</th><th>detections</th><th>side p10</th><th>median</th><th>p90</th></tr>
{% for r in sizes.levels %}<tr><td>{{ r.level }}</td><td class="n">{{ r.n }}</td><td class="n">{{ "%.1f"|format(r.p10) }}</td><td class="n">{{ "%.1f"|format(r.p50) }}</td><td class="n">{{ "%.1f"|format(r.p90) }}</td></tr>{% endfor %}
</table>
<h2>Scores</h2>
<img alt="score distribution" src="{{ scores }}">
{% endif %}

<h2>Errors</h2>
{% if errors.rows %}<table id="error-kinds"><tr><th>stage</th><th>type</th><th>rows</th><th>sources</th></tr>
{% for k in errors.kinds %}<tr><td>{{ k.stage }}</td><td>{{ k.type }}</td><td class="n">{{ k.n }}</td><td class="n">{{ k.sources }}</td></tr>{% endfor %}
</table>
{% if errors.groups > errors.rows|length %}<p class="muted">The {{ errors.rows|length }} sources with most error rows, of {{ errors.groups }}; all of them: <code>fpn query {{ job.output }} "{{ errors_query }}"</code></p>{% endif %}
<table id="errors" class="err"><tr><th>source</th><th>stage</th><th>type</th><th>rows</th><th>message</th></tr>
{% for e in errors.rows %}<tr><td><code>{{ e.source }}</code>{% if e.frame is not none %} (frame {{ e.frame }}){% endif %}</td><td>{{ e.stage }}</td><td>{{ e.type }}</td><td class="n">{{ e.n }}</td><td>{{ e.message }}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">none</p>{% endif %}
<p class="muted">Made by <code>fpn report</code>. Query the rows: <code>fpn query {{ job.output }} "SELECT ..."</code>; draw any frame: <code>fpn render</code>.</p>
</body></html>
""")
