"""`fpn`: run detection jobs over video and aerial archives, train and evaluate models.

Only this module prints. Library errors become one-line `click.ClickException`s (exit 1).
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

from fpn_model.config import PRECISIONS  # torch-free

__all__ = ["cli"]


class _Busy(click.ClickException):
    """Another writer holds the output: exit 75 (sysexits' EX_TEMPFAIL, "try again later"), so that a cron job
    overlapping the last one can tell it from a failure (1)."""

    exit_code = 75


def _fail_cleanly(fn):
    """Turn the project's and storage's expected errors into one clear line (secrets redacted) and exit 1 (75 for
    an output another writer holds)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.output import OutputBusyError
        from pipeline.storage import redact_text

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # a reader that stopped early (`fpn query ... | head`): click ends quietly
            raise
        except OutputBusyError as e:
            raise _Busy(redact_text(str(e))) from e
        except (ValueError, FileNotFoundError, PermissionError, LookupError, ConnectionError,
                TimeoutError, IsADirectoryError, NotADirectoryError, FileExistsError,
                *_loaded(("fpn_model.weights", "CheckpointError"), ("jobs.runner", "DetectorStartError"))) as e:
            raise click.ClickException(redact_text(str(e))) from e
        except _loaded(("botocore.exceptions", "BotoCoreError")) as e:  # storage settings no library call named
            raise click.ClickException(_storage_error_line(e, kwargs.get("output") or kwargs.get("target"))) from e

    return wrapper


def _loaded(*errors: tuple[str, str]) -> tuple[type, ...]:
    """The exception classes `(module, name)` of the modules that are loaded: fpn_model.weights.CheckpointError
    imports torch (4 s, 800 MB here), jobs.runner.DetectorStartError Ray, botocore's errors botocore, which
    commands that never use them (status, query, report; local outputs) should not pay; unloaded, none was
    raised."""
    return tuple(getattr(sys.modules[m], name) for m, name in errors if m in sys.modules)


def _storage_error_line(e: BaseException, output: str | None) -> str:
    """A botocore error that reached a command (a missing AWS profile, an endpoint that cannot be reached) as one
    line about the command's output (pipeline.storage.translate_error)."""
    from pipeline.storage import one_line, redact_text, translate_error

    what = f"output {output}" if output else "storage"
    plain = translate_error(e, what)
    return str(plain) if plain is not e else redact_text(f"{what}: {one_line(e)}")


def _emit(rows: list[dict], fmt: str, columns: list[str], *, upper: bool = True) -> None:
    """Rows as JSON, CSV (lists and structs as JSON) or a table (headers upper-cased unless `upper` is False:
    a query's column names are SQL's, as csv and json give them)."""
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v for k, v in r.items()}
                    for r in rows)
        return
    widths = {c: max([len(c)] + [len(_cell(r.get(c))) for r in rows]) for c in columns}
    click.echo("  ".join((c.upper() if upper else c).ljust(widths[c]) for c in columns))
    for r in rows:
        click.echo("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))


def _cell(v: Any) -> str:
    """A value as a table shows it: floats as the shortest text that reads back as the same value (a single-
    precision one, such as a score, as a float32: 0.9, not 0.8999999761581421). Four significant digits showed
    every map coordinate of a scene as the same place (5e+05, 4.4e+06), even after round(x, 2)."""
    if isinstance(v, float):
        import numpy as np

        single = np.float32(v)
        if float(single) != v or not np.isfinite(single):
            return repr(v)
        return np.format_float_positional(single, trim="-") if v == 0 or 1e-4 <= abs(v) < 1e16 else str(single)
    return "" if v is None else str(v)


class _BatchSize(click.ParamType):
    """A whole number of frames, or auto."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a whole number nor auto", param, ctx)


_BATCH = _BatchSize()


class _Duration(click.ParamType):
    """Seconds, or a number with a unit: 90s, 10m, 2h, 1d (`jobs.spec.parse_duration`)."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        from jobs.spec import parse_duration

        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


format_option = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="Output format.")


@click.group()
@click.version_option(package_name="fpn-pipeline")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Find small objects in video and aerial archives with Feature Pyramid Network detectors on Ray.

    Example: fpn run flights/*.mp4 --output results/ --every-n 5
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# -- run ------------------------------------------------------------------------------------------
def _storage_flags(endpoint_url=None, profile=None, anon=False) -> dict[str, Any]:
    """Spec fields from the storage flags: endpoint and profile for every s3:// URL, `--anon` for s3:// inputs
    only (read a public bucket, write a private output)."""
    s3 = {k: v for k, v in dict(endpoint_url=endpoint_url, profile=profile).items() if v}
    flags: dict[str, Any] = {}
    if s3 or anon:
        flags["storage_options"] = {"s3": {**s3, **({"anon": True} if anon else {})}}
    if s3 and anon:
        flags["output_storage_options"] = {"s3": s3}
    return flags


def storage_flags(fn):
    """`--endpoint-url`, `--profile` and `--anon`, as `run` takes them: one decorator for every command that
    reads outputs or sources (`status`, `report`, `render`: read-only, so `--anon` applies to outputs too)."""
    for option in reversed([
        click.option("--endpoint-url", help="S3-compatible endpoint URL for s3:// inputs and outputs."),
        click.option("--profile", help="AWS profile for s3:// access."),
        click.option("--anon", is_flag=True, help="Anonymous access to public buckets."),
    ]):
        fn = option(fn)
    return fn


def _read_options(endpoint_url=None, profile=None, anon=False) -> dict[str, Any] | None:
    """Storage options (per protocol) for a command that only reads, from the storage flags."""
    return _storage_flags(endpoint_url, profile, anon).get("storage_options")


# `_job.json`'s startup_s, as the summary says it (seconds from the run's start)
_START_NAMES = {"ray": "Ray ready", "planned": "planned", "detector_ready": "detector ready",
                "batch": "first batch in", "file": "first file"}


def _start_line(start: dict) -> str:
    return ", ".join(f"{name} {start[k]:.1f} s" for k, name in _START_NAMES.items() if k in start) \
        + (f" (the command's own start before that: {start['before_run']:.1f} s)" if "before_run" in start else "")


def _print_summary(doc: dict) -> None:
    from pipeline.plan import read_scale

    state = doc["state"].replace("_", " ")
    click.echo(
        f"\n{state}: {doc.get('frames', 0)} frames, {doc.get('detections', 0)} detections, {doc.get('errors', 0)} "
        f"errors in {doc['wall_s']:.1f} s ({doc.get('frames_per_s') or 0:.2f} frames/s"
        + (f"; {doc['skipped_frames']} frames already written were skipped" if doc.get("skipped_frames") else "")
        + ")"
    )
    out, flags = doc["spec"]["output"], _reading_flags(doc["spec"])
    if doc.get("nothing_new") and doc.get("inputs") == 0:
        click.echo("nothing to do yet: every input was left for a later run (Ray not started)")
    elif doc.get("nothing_new"):
        click.echo("nothing new: every input was planned and written by earlier runs (unchanged since"
                   + (", or changed and left as below" if doc.get("changed_left") else "")
                   + "; no probe, Ray not started)")
    for line in _changed_lines(doc.get("changed_left"), out, flags):
        click.echo(line)
    if doc.get("not_settled"):
        click.echo("waiting: " + _not_settled_line(doc["not_settled"]))
    if doc.get("frames_outside_plan"):  # "of them" read as of the inputs after "nothing new: every input ..."
        click.echo(f"of the output's {doc.get('frames', 0)} frames, {doc['frames_outside_plan']} are outside this "
                   f"run's plan of {doc.get('planned_frames')} (the frames fpn status counts): earlier runs' of other "
                   "inputs, of another sampling, or of sources since changed or gone")
    if doc.get("errors_of_other_inputs"):
        click.echo(f"of the errors, {doc['errors_of_other_inputs']} are earlier runs' about inputs this run did not "
                   "read (kept; this run's state is of its own inputs)")
    if doc.get("decoded_per_sampled") is not None:
        click.echo(f"decoded: {doc['decoded_frames']} frames for the output's {doc['frames']} sampled, all runs "
                   f"({doc['decoded_per_sampled']:.2f} per sampled frame)")
    if "frames_decoded_on_gpu" in doc:
        click.echo(f"nvdec: {doc['frames_decoded_on_gpu']} of this run's frames decoded on the GPU")
    if doc.get("device_errors"):
        from pipeline.plan import DEVICE_EXITS_PER_DETECTOR

        click.echo(f"device errors: {doc['device_errors']} (a detector restarted for each, its batches run again, "
                   f"up to {DEVICE_EXITS_PER_DETECTOR} times per detector; the detectors' logs say which)")
    if doc.get("core_ms_per_frame"):
        click.echo("CPU per frame: " + ", ".join(f"{k} {v:g} ms" for k, v in doc["core_ms_per_frame"].items()))
    if doc.get("startup_s"):
        click.echo("start: " + _start_line(doc["startup_s"]))
    click.echo(f"output: {out}")
    rasters = doc.get("rasters") or {}
    for src, r in (rasters.get("georeferenced") or {}).items():
        click.echo(f"raster {src}: {r['crs']}, {r['gsd_m']:g} m/pixel read at {read_scale(r)}, {r['windows']} windows")
    if rasters.get("pixel_coordinates_only"):
        click.echo(f"rasters without a georeference (pixel coordinates only): {len(rasters['pixel_coordinates_only'])}")
    for src, note in (rasters.get("notes") or {}).items():
        click.echo(f"raster {src}: {note}")
    for src, why in (doc.get("nothing_read") or {}).items():
        click.echo(f"{src}: {why}")
    if doc.get("nodata_windows"):
        click.echo(f"raster windows all nodata (skipped): {doc['nodata_windows']}")
    if doc.get("errors"):
        click.echo(f"errors: {_errors_query(out, flags)}")
    click.echo(f"query it: fpn query {out} \"SELECT count(*) FROM detections\"{flags}")


def _not_settled_line(left: dict) -> str:
    """What a run left for a later one (`_job.json` not_settled)."""
    from jobs.spec import duration_text

    n, first, ahead = left["sources"], left["first"], left.get("dated_ahead") or 0
    said = " and ".join(part for part in (
        f"{n - ahead} input(s) written within the last {duration_text(left['min_age_s'])}" if n > ahead else "",
        f"{ahead} dated after this machine's clock (wrong clocks? --min-age 0 reads them)" if ahead else "") if part)
    return f"{said} (--min-age), left for a later run: " + ", ".join(first[:3]) + (", ..." if n > 3 else "")


def _errors_query(output: str, flags: str) -> str:
    """The command that lists an output's error rows, as the run summary and `fpn status` print it (`flags`:
    `_reading_flags`)."""
    from pipeline.output import ERRORS_QUERY

    return f'fpn query {output} "{ERRORS_QUERY}"{flags}'


# changed sources a run left (`changed_left`) that the summary and fpn status name, a line each
CHANGED_SHOWN = 3


def _changed_lines(left: dict[str, str] | None, output: str, flags: str) -> list[str]:
    """A line for each changed source a run left (jobs.runner._skip_changed: `_job.json`'s `changed_left`, the
    message of its SourceChanged row, which says how to process it), the first CHANGED_SHOWN; the rest, a query
    that lists them."""
    left = left or {}
    lines = [f"changed, left: {msg}" for msg in list(left.values())[:CHANGED_SHOWN]]
    if len(left) > CHANGED_SHOWN:
        lines.append(f"changed, left: {len(left) - CHANGED_SHOWN} more (fpn query {output} \"SELECT source, message "
                     f"FROM errors WHERE error_type = 'SourceChanged'\"{flags})")
    return lines


def _work_line(work: dict) -> str:
    """`fpn status`'s line on the last run that did work (`_job.json`'s `last_work`, of a run with nothing new)."""
    rate = work.get("frames_per_s")
    return (f"run {work.get('runs', '?')} ({(work.get('state') or '?').replace('_', ' ')}), ended "
            f"{work.get('finished_at') or '?'}: {work.get('new_frames', '?')} new frames"
            + (f", {rate:.2f} frames/s" if rate is not None else ""))


def _reading_flags(spec: dict) -> str:
    """The storage flags (`storage_flags`) with which a command reads the output of `spec` as its run wrote it, as
    text to print after a command line: the output's s3 endpoint, profile and anon; the spec's other options
    (credentials, other protocols) come from the environment or a spec."""
    import shlex

    from pipeline.storage import options_for, protocol_of

    output = spec["output"]
    opts = options_for(output, spec.get("storage_options") if spec.get("output_storage_options") is None
                       else spec["output_storage_options"]) if protocol_of(output) == "s3" else {}
    return "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
                   for k, v in opts.items() if k in ("endpoint_url", "profile", "anon") and v)


def _progress(output: str, storage_options: dict | None = None):
    """One progress bar over a local run writing `output`, instead of Ray Data's operator lines (quieted by
    `_ray_data_setup`); `fpn -v` keeps those (and shows no bar)."""
    import contextlib

    from jobs.progress import RunProgress

    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return contextlib.nullcontext()
    return RunProgress(output, storage_options)


def _ray_data_setup() -> None:
    """Import Ray Data, quieted where the progress bar shows (`_progress`): `fpn run` runs this while Ray starts
    (jobs.runner.init_ray's `alongside`)."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        importlib.import_module("ray.data")  # now, beside Ray's start, not when the job first needs it
    else:
        from jobs.progress import quiet_ray_data

        quiet_ray_data()


def _sources_read(sources: int, inputs: int) -> str:
    """What a run reads, as its first line says it: the sources its inputs name ("2 sources from 1 input": a
    directory, a glob or a manifest is one input), not the inputs themselves (it said "over 1 input(s)" of a
    directory of images)."""
    said = f"{sources} source{'' if sources == 1 else 's'}"
    return said if sources == inputs else f"{said} from {inputs} input{'' if inputs == 1 else 's'}"


def _run_and_exit(plan, **kwargs) -> None:
    """Run a plan (`fpn run`, `fpn resume OUTPUT`), print the summary and exit with the state's code
    (pipeline.output.EXIT_CODES). The model is read first (a plugin's file run, its class found), and the inputs
    expanded: a model that cannot be loaded, or an input that does not exist, is its one-line error alone, not one
    under a header and a planning bar of a job that never starts."""
    from fpn_model.weights import read_config
    from jobs.runner import plan_sources
    from jobs.runner import run as run_plan
    from jobs.runner import stop_ray
    from pipeline.output import EXIT_CODES

    read_config(plan.checkpoint)
    try:
        try:
            sources = plan_sources(plan)
            click.echo(f"running {plan.model_id} over {_sources_read(len(sources), len(plan.inputs))} -> "
                       f"{plan.output}", err=True)
            with _progress(plan.output, plan.output_options):
                doc = run_plan(plan, alongside_ray=_ray_data_setup, sources=sources, **kwargs)
        except KeyboardInterrupt:
            from pipeline.output import Output

            if Output(plan.output, plan.output_options).read_job(missing_ok=True):
                click.echo(f"\ncancelled: what was written stays; continue with: fpn resume {plan.output}", err=True)
            else:  # stopped before the job was recorded: there is no output to resume
                click.echo("\ncancelled before the job started: nothing was written", err=True)
            sys.exit(EXIT_CODES["cancelled"])
        _print_summary(doc)
    finally:
        stop_ray()  # the embedded Ray's processes end with the command, not seconds after it
    sys.exit(EXIT_CODES[doc["state"]])


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output directory or URL (OUTPUT/frames, errors, _job.json).")
@click.option("-m", "--model", help="Zoo name (fpn models), checkpoint path, or a model plugin "
              "path/to/file.py:Class (see README: Models).  [default: trees]")
@click.option("--batch-size", type=_BATCH, help="Frames per detector call, or auto (by the GPU memory of a detector; "
              "8 on CPUs).")
@click.option("--min-rows-per-file", type=int, help="Fewest frames per Parquet file (a file lands when it is full; "
              "the last may hold fewer).  [default: 1/20 of the job's frames, at least a batch, at most 1000]")
@click.option("--every-n", type=int, help="Process every Nth video frame.")
@click.option("--fps", type=float, help="Process about this many video frames per second.")
@click.option("--start", "start_s", type=float, help="Skip video before this time (s).")
@click.option("--end", "end_s", type=float, help="Stop video at this time (s).")
@click.option("--keyframes", is_flag=True, help="Process only video keyframes (an archive scan: one frame decoded "
              "per frame sampled).")
@click.option("--tile", type=int, help="Tile frames larger than this many pixels a side.  [default: 1024]")
@click.option("--tile-overlap", type=int, help="Overlap between tiles (pixels).  [default: 128]")
@click.option("--no-tile", is_flag=True, help="Feed frames whole, however large.")
@click.option("--score-thresh", type=float, help="Drop detections scoring below this.")
@click.option("--scale", type=float, help="Resize frames by this factor on the device (2 = upscale tiny objects).")
@click.option("--segment-frames", type=int, help="Frames per video segment (decode parallelism; each segment "
              "after the first starts at the first keyframe at or after a multiple of this).  [default: 256]")
@click.option("--num-detectors", type=int, help="Detector actors (model copies)  [default: one per GPU when they "
              "get GPUs, else 1].")
@click.option("--max-detectors", type=int, help="Let the pool of detectors grow to this many while work waits and "
              "the cluster has room (GPUs that join), from --num-detectors.")
@click.option("--gpus-per-detector", type=float, help="GPUs per detector actor; 0: run on CPUs  [default: 1 on a "
              "cluster with GPUs, else 0].")
@click.option("--cpus-per-detector", type=float, help="CPUs each detector actor reserves; on a GPU also its torch "
              "threads; on a CPU it runs as many threads as its node has cores that decoding does not reserve "
              "(_job.json resources.detector_threads).  [default: 1]")
@click.option("--calls-per-detector", type=int, help="Batches each detector runs at once, sharing its torch threads "
              "[default on a CPU: up to 4, one per thread; on a GPU: 2].")
@click.option("--precision", type=click.Choice(PRECISIONS), help="exact: the model's own detections "
              "(on a CPU the exact fast path); approximate and faster: bf16, int8 (CPU), fp16 (GPU); check what "
              "they cost with fpn eval --precision.  [default: what fpn eval --record chose for the device and "
              "recorded in the checkpoint, else exact]")
@click.option("--compile", "compile_model", is_flag=True, default=None,
              help="torch.compile the model's backbone, neck and RPN head in each detector: faster batches after a "
                   "compile of a minute or more per input shape (cached on disk by inductor).")
@click.option("--video-backend", help="Video decoder: decord (default), pyav, nvdec (NVIDIA GPUs; PyAV where "
              "there is none), or a class of your own: module:Class or path/to/file.py:Class (see README: "
              "Models).")
@click.option("--decode-timeout", "decode_timeout_s", type=float,
              help="Seconds to wait for the next decoded batch before a decoder counts as hung.  [default: 300]")
@click.option("--min-age", "min_age_s", type=_Duration(), help="Leave inputs written less than this long ago (files a "
              "camera or an upload is still writing) for a later run: 90s, 10m, 2h.  [default: 0, read them all]")
@click.option("--replace-changed", is_flag=True, default=None,
              help="A source changed since a run wrote frames of it (size, ETag or mtime): remove its old frames "
                   "and process it again.  [default: an error row (SourceChanged); its old frames stay]")
@storage_flags
@click.option("--bands", help="Raster bands (1-based) in the model's channel order, e.g. 4,3,2; or STAC band "
              "assets to combine, e.g. B04,B03,B02.")
@click.option("--stretch", help="Raster values onto 0..255: percentiles LOW,HIGH (default 2,98) or a fixed range "
              "min:MIN,MAX, once per raster.")
@click.option("--gsd", type=float, help="Resample georeferenced rasters to this many metres per pixel "
              "[default: the model's training GSD].")
@click.option("--no-resample", is_flag=True, help="Read rasters at their own resolution.")
@click.option("--aoi", help="Area of interest: minx,miny,maxx,maxy in EPSG:4326, or a GeoJSON file (its CRS: "
              "EPSG:4326); only raster windows meeting it are read.")
@click.option("--address", help="Ray cluster to join by its Ray (GCS) address, HOST:6379  [default: RAY_ADDRESS, "
              "else embedded local Ray].")
@click.option("--job-id", help="Id recorded in OUTPUT/_job.json (set by fpn submit).")
@_fail_cleanly
def run(inputs, output, model, batch_size, min_rows_per_file, every_n, fps, start_s, end_s, keyframes, tile,
        tile_overlap, no_tile, score_thresh, scale, segment_frames, num_detectors, max_detectors, gpus_per_detector,
        cpus_per_detector, calls_per_detector, precision, compile_model, video_backend, decode_timeout_s,
        min_age_s, replace_changed, endpoint_url, profile, anon, bands, stretch, gsd, no_resample, aoi, address,
        job_id):
    """Detect objects in images, videos and rasters; one Parquet row per sampled frame.

    INPUTS are files, directories, globs, s3:// or other fsspec URLs, manifests (.txt: one URI a line, relative
    paths from the manifest's directory), or a single job spec (.yaml) whose fields the flags override.

    Example: fpn run s3://bucket/flights/**.mp4 -o s3://bucket/out --fps 2 --endpoint-url http://127.0.0.1:9000
    """
    from jobs.spec import merge_fields, plan_from_dict, read_spec_file

    flags = _run_flags(output=output, model=model, batch_size=batch_size, score_thresh=score_thresh, scale=scale,
                       min_rows_per_file=min_rows_per_file, segment_frames=segment_frames, video_backend=video_backend,
                       decode_timeout_s=decode_timeout_s, changed_sources="replace" if replace_changed else None,
                       min_age_s=min_age_s,
                       sampling=dict(every_n=every_n, fps=fps, start_s=start_s, end_s=end_s,
                                     keyframes=keyframes or None),
                       resources=dict(num_detectors=num_detectors, max_detectors=max_detectors,
                                      gpus_per_detector=gpus_per_detector,
                                      cpus_per_detector=cpus_per_detector, calls_per_detector=calls_per_detector,
                                      precision=precision, compile=compile_model),
                       tile=dict(size=tile, overlap=tile_overlap), no_tile=no_tile)
    flags.update(_storage_flags(endpoint_url, profile, anon))
    flags.update(_raster_flags(bands, stretch, gsd, no_resample, aoi))
    specs = [i for i in inputs if i.endswith((".yaml", ".yml"))]
    if specs and len(inputs) > 1:  # a spec among media became an error row ("not a supported media file")
        raise click.UsageError(f"a job spec is the only input of fpn run: list the others in its inputs field "
                               f"(given: {', '.join(inputs[:4])}{', ...' if len(inputs) > 4 else ''})")
    if specs:
        from jobs.manager import restore_secrets  # secrets of a submitted spec travel in the job's environment

        plan = plan_from_dict(merge_fields(restore_secrets(read_spec_file(inputs[0])), flags))
    else:
        if not output:
            raise click.UsageError("--output is required (or give a job spec .yaml)")
        plan = plan_from_dict({"inputs": list(inputs), **flags})
    _run_and_exit(plan, address=address, job_id=job_id)


def _numbers(flag: str, text: str, kind=float) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=flag) from None


def _raster_flags(bands, stretch, gsd, no_resample, aoi) -> dict[str, Any]:
    """Spec fields of the raster flags the user gave (`--stretch min:0,3000` is `stretch: {min: 0, max: 3000}`)."""
    flags: dict[str, Any] = {}
    if bands:  # band numbers, or STAC asset keys to combine
        flags["bands"] = _numbers("--bands", bands, int) if bands.replace(",", "").isdigit() else bands.split(",")
    if stretch:
        fixed = stretch.startswith("min:")
        v = _numbers("--stretch", stretch[4:] if fixed else stretch)
        if len(v) != 2:
            raise click.BadParameter("give two numbers", param_hint="--stretch")
        flags["stretch"] = {"min": v[0], "max": v[1]} if fixed else {"percentiles": v}
    if gsd is not None:
        flags["gsd"] = gsd
    if no_resample:
        flags["resample"] = False
    if aoi:
        if os.path.isfile(aoi):
            with open(aoi) as f:
                g = json.load(f)
            g = g["features"][0]["geometry"] if g.get("type") == "FeatureCollection" else g.get("geometry", g)
            flags["aoi"] = {"geometry": g, "crs": "EPSG:4326"}
        else:
            flags["aoi"] = {"bbox": _numbers("--aoi", aoi), "crs": "EPSG:4326"}
    return flags


def _run_flags(*, tile, no_tile, **fields) -> dict[str, Any]:
    """The spec fields the user gave as flags (None = not given; nested ones keep their given keys); `--no-tile`
    is an explicit `tile: null`."""
    flags: dict[str, Any] = {}
    for k, v in fields.items():
        if isinstance(v, dict):
            v = {kk: vv for kk, vv in v.items() if vv is not None} or None
        if v is not None:
            flags[k] = v
    if no_tile:
        if any(v is not None for v in tile.values()):
            raise click.UsageError("--no-tile feeds frames whole: give it or --tile/--tile-overlap, not both")
        flags["tile"] = None
    elif any(v is not None for v in tile.values()):
        flags["tile"] = {k: v for k, v in tile.items() if v is not None}
    return flags


# -- cluster jobs ---------------------------------------------------------------------------------
address_option = click.option("--address", envvar="RAY_ADDRESS", help="Ray dashboard, e.g. http://HEAD:8265 "
                              "(or RAY_ADDRESS).")


def _fmt_s(s: float | None) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


@cli.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", help="Override the spec's output.")
@click.option("--job-id", help="Submission id (default: fpn-DATE-TIME-RANDOM).")
@address_option
@_fail_cleanly
def submit(spec, output, job_id, address):
    """Submit a job spec to a Ray cluster through the Ray Jobs API.

    The spec is validated here first; the cluster runs `fpn run` on it.

    Example: fpn submit flights.yaml --address http://head:8265
    """
    from jobs.manager import submit as submit_job

    jid, data = submit_job(spec, address=address, overrides={"output": output}, job_id=job_id)
    at = _address_flag(address)
    click.echo(f"submitted {jid} (output: {data['output']})\n")
    click.echo("next steps:")
    click.echo(f"  fpn status {jid}{at}")
    click.echo(f"  fpn logs {jid} --follow{at}")
    click.echo(f"  fpn cancel {jid}{at}")
    click.echo(f"  fpn query {data['output']} \"SELECT label_name, count(*) FROM detections GROUP BY 1\""
               f"{_reading_flags(data)}")


def _address_flag(address: str | None) -> str:
    """` --address A` for a printed next step about a job, unless A came from RAY_ADDRESS (which it reads too)."""
    from click.core import ParameterSource

    given = click.get_current_context().get_parameter_source("address") is not ParameterSource.ENVIRONMENT
    return f" --address {address}" if address and given else ""


def _is_output(target: str, address: str | None) -> bool:
    """Whether `target` is an output (a URL or an existing path) rather than a submitted job's id; a path that
    does not exist (it has a '/', which no job id has), or a name with no cluster to ask, fails in one line."""
    if "://" in target or Path(target).exists():
        return True
    if "/" in target:
        raise FileNotFoundError(f"output {target} does not exist")
    if not address:
        raise FileNotFoundError(f"{target}: no output of that name here, and no cluster to ask for a job of that id "
                                "(--address or RAY_ADDRESS)")
    return False


@contextmanager
def _nor_an_output(target: str):
    """A TARGET that is neither an output here nor a job on the cluster says both (a mistyped output name
    reaches the cluster as a job id)."""
    from jobs.manager import JobNotFound

    try:
        yield
    except JobNotFound as e:
        raise JobNotFound(f"{e}, and there is no output {target} here") from e


@cli.command()
@click.argument("target")
@storage_flags
@address_option
@format_option
@_fail_cleanly
def status(target, endpoint_url, profile, anon, address, fmt):
    """State and progress of a job: frames done / planned, frames/s, errors, ETA, where its start-up went.

    TARGET is a submitted job's id (asks the --address cluster) or an OUTPUT directory/URL (reads it). The exit
    code follows the state: 0 running or succeeded, 1 failed, 3 finished with errors, 4 interrupted (the writer
    vanished: fpn resume continues), 130 cancelled.

    Example: fpn status fpn-20261124-120000-ab12cd; fpn status s3://bucket/out --endpoint-url http://127.0.0.1:9000
    """
    from pipeline.output import EXIT_CODES, Output

    options = _read_options(endpoint_url, profile, anon)
    if _is_output(target, address):
        # no _job.json: one line, not "state: ?"
        row = {"output": target, **Output.for_reading(target, options).progress(missing_ok=False)}
    else:
        from jobs.manager import job_status

        with _nor_an_output(target):
            row = _public(job_status(target, address=address))
    if fmt == "json":
        click.echo(json.dumps(row, indent=2, default=str))
    else:
        if row.get("job_id"):
            click.echo(f"job:      {row['job_id']}\ncluster:  {row.get('status')}")
        click.echo(f"state:    {(row.get('state') or '?').replace('_', ' ')}")
        for key in ("message", "error"):
            if row.get(key):
                click.echo(f"{key + ':':<10}{row[key]}")
        click.echo(f"output:   {row.get('output')}")
        click.echo(f"frames:   {_frames_line(row, options)}")
        click.echo(f"rate:     {row['frames_per_s']:.2f} frames/s" if row.get("frames_per_s") else "rate:     -")
        others = row.get("errors_of_other_inputs")
        click.echo(f"errors:   {row.get('errors', 0)}"
                   + (f" ({others} of them earlier runs', about inputs the last run did not read)" if others else ""))
        click.echo(f"eta:      {_fmt_s(row.get('eta_s')) or '-'}")
        if row.get("not_settled"):
            click.echo(f"waiting:  {_not_settled_line(row['not_settled'])}")
        if row.get("nothing_new") and row.get("inputs") == 0:
            click.echo("last run: nothing to do yet (every input left for a later run; Ray not started)")
        elif row.get("nothing_new"):  # its start line would read as a run that did nothing else
            click.echo("last run: nothing new (every input known and written; no probe, Ray not started)")
            if row.get("last_work"):
                click.echo(f"work:     {_work_line(row['last_work'])} (the last run that wrote frames)")
        elif row.get("startup_s"):
            click.echo(f"start:    {_start_line(row['startup_s'])}")
        if row.get("output"):
            flags = _reading_flags({"output": row["output"], "storage_options": options})
            for line in _changed_lines(row.get("changed_left"), row["output"], flags):
                click.echo(line)
        if row.get("job_id"):
            click.echo(f"started:  {row.get('start_time')}  ended: {row.get('end_time') or '-'}")
    sys.exit(EXIT_CODES.get(row.get("state") or "", 0))


def _frames_line(row: dict, options: dict | None) -> str:
    """`fpn status`'s frames written of planned: with the share done for a job under way or one that `fpn resume`
    continues (cancelled, interrupted); for a finished job that left frames unwritten, how many and why, not a
    share ("150 / 300 (50%)" read as a job half done): it stopped, or they are behind its error rows. No count of
    those frames by row: a row may stand for a frame, a segment or a whole source."""
    done, planned = row.get("frames_done"), row.get("frames_planned")
    if done is None or not planned:
        return f"{'?' if done is None else done} / {'?' if planned is None else planned}"
    if row.get("state") not in ("succeeded", "finished_with_errors", "failed") or done >= planned:
        return f"{done} / {planned} ({100 * done / planned:.0f}%)"
    why = ""
    # it stopped: its error (the `error:` line above) is recorded only then, and a run that went through its work
    # fails only when it wrote no frame (pipeline.output.final_state); a cluster's driver that died records neither
    if row.get("error") or row["state"] == "failed" and done:
        why = " (the job stopped before them: fpn resume continues it)"
    elif row.get("errors", 0) > row.get("errors_of_other_inputs", 0) and row.get("output"):
        flags = _reading_flags({"output": row["output"], "storage_options": options})
        why = f" (error rows: {_errors_query(row['output'], flags)})"
    return f"{done} / {planned} written, {planned - done} not{why}"


@cli.command("list")
@address_option
@format_option
@_fail_cleanly
def list_cmd(address, fmt):
    """The jobs fpn submitted to the cluster, newest first.

    Example: fpn list --format json
    """
    from jobs.manager import list_jobs

    rows = [_public(r) for r in list_jobs(address=address)]
    _emit(rows, fmt, ["job_id", "status", "state", "start_time", "end_time", "output"])


@cli.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@address_option
@_fail_cleanly
def logs(job_id, follow, address):
    """Print a submitted job's driver log.

    Example: fpn logs fpn-20261124-120000-ab12cd --follow
    """
    from jobs.manager import logs as job_logs

    for chunk in job_logs(job_id, address=address, follow=follow):
        click.echo(chunk, nl=False)


@cli.command()
@click.argument("job_id")
@click.option("--wait", "wait_s", type=float, default=60, show_default=True,
              help="Seconds to wait for the job to stop; exit 1 if it has not.")
@address_option
@_fail_cleanly
def cancel(job_id, wait_s, address):
    """Stop a submitted job; what it wrote stays, and `fpn resume` continues it.

    Example: fpn cancel fpn-20261124-120000-ab12cd
    """
    from jobs.manager import cancel as cancel_job

    click.echo(f"{job_id}: {cancel_job(job_id, address=address, wait_s=wait_s)}")


@cli.command()
@click.argument("target")
@storage_flags
@address_option
@_fail_cleanly
def resume(target, endpoint_url, profile, anon, address):
    """Continue a failed or cancelled job, skipping every frame already written.

    TARGET is a job id (resubmitted to the --address cluster with the same spec) or an OUTPUT
    directory/URL (run again here, on embedded Ray, from its _job.json).

    Example: fpn resume fpn-20261124-120000-ab12cd --address http://head:8265
    """
    from jobs.manager import resume as resume_job
    from jobs.spec import plan_from_record
    from pipeline.output import Output

    if not _is_output(target, address):
        with _nor_an_output(target):
            jid = resume_job(target, address=address)
        click.echo(f"resubmitted {target} as {jid}: frames already written are skipped")
        click.echo(f"  fpn status {jid}{_address_flag(address)}")
        return
    flags = _storage_flags(endpoint_url, profile, anon)
    record = Output.for_reading(target, flags.get("storage_options")).read_job()
    plan = plan_from_record(record["spec"], flags)
    _run_and_exit(plan, job_id=record.get("job_id"))


@cli.command()
@click.argument("output")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@storage_flags
@_fail_cleanly
def query(output, sql, fmt, endpoint_url, profile, anon):
    """Run read-only SQL (DuckDB) over an output: views `frames`, `detections` (one row per detection), `errors`.

    Only files under OUTPUT can be read, and nothing can be written.

    Example: fpn query out/ "SELECT source, count(*) FROM detections WHERE score > 0.5 GROUP BY 1"
    """
    from jobs.query import query as run_query

    cols, rows = run_query(output, sql, _read_options(endpoint_url, profile, anon))
    _emit([dict(zip(cols, r)) for r in rows], fmt, cols, upper=False)


@cli.command()
@click.argument("output")
@click.option("-o", "--out", "dest", required=True, help="File (path or URL) to write.")
@click.option("--format", "fmt", type=click.Choice(["geoparquet", "geojson", "coco", "csv"]),
              help="Format of FILE.  [default: what its name says (.parquet, .geojson, .csv), else geoparquet]")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Leave out detections scoring below.")
@click.option("--crs", help="Reproject map geometries (geoparquet) or map boxes (csv) to this CRS (e.g. EPSG:3857); "
                            "GeoJSON is always EPSG:4326.")
@click.option("--dedup", "dedup_iou", type=float,
              help="Merge detections of overlapping scenes, or of neighbouring windows of a raster, whose map boxes "
                   "overlap by more than this IoU.")
@click.option("--categories", type=click.Path(exists=True, dir_okay=False), metavar="ANNOTATIONS.json",
              help="COCO results: the category_id of each detection is this COCO JSON's id of the category named as "
                   "its label (ignoring case); a label name it lacks is refused. Default: the model's label.")
@storage_flags
@_fail_cleanly
def export(output, dest, fmt, min_score, crs, dedup_iou, categories, endpoint_url, profile, anon):
    """Export an output's detections, one record each: GeoParquet 1.1 (map polygons, CRS, bbox columns), GeoJSON
    (EPSG:4326), COCO results JSON or CSV. Streams in batches: any size of output, bounded memory.

    COCO results' category_id is the model's label: 1..N for a model trained here (its classes in its training
    data's order), COCO's ids for an imported COCO detector. To score them against a dataset that numbers its
    categories otherwise, give its COCO JSON with --categories: ids are then matched by class name.

    Example: fpn export results/ -o trees.parquet --format geoparquet --min-score 0.5
    """
    from jobs.export import export as run_export

    s = run_export(output, dest, fmt=fmt, storage_options=_read_options(endpoint_url, profile, anon),
                   min_score=min_score, crs=crs, dedup_iou=dedup_iou, categories=categories)
    click.echo(f"{s.detections} detections -> {s.destination} ({s.format}, "
               f"{s.crs or 'pixel coordinates'})")
    if s.left_out:
        click.echo(f"{s.left_out} detections without map coordinates left out (of images, videos and rasters without a "
                   "georeference)")
    if s.duplicates:
        click.echo(f"{s.duplicates} duplicates merged (overlapping scenes, neighbouring windows)")


# -- models ---------------------------------------------------------------------------------------
@cli.command()
@format_option
@_fail_cleanly
def models(fmt):
    """List bundled checkpoints, presets and importable torchvision models.

    Example: fpn models --format json
    """
    from fpn_model.config import ARCHS, BACKBONES, NECKS, PRESETS, UPSAMPLES
    from fpn_model.weights import TORCHVISION_MODELS, read_config
    from fpn_model.zoo import bundled

    rows = []
    for name, path in bundled().items():
        cfg, _ = read_config(path)
        rows.append({"name": name, "kind": "checkpoint", "arch": cfg.arch, "backbone": cfg.backbone, "neck": cfg.neck,
                     "levels": "P" + "-P".join(map(str, (cfg.levels[0], cfg.levels[-1]))),
                     "classes": ",".join(cfg.class_names), **_recorded_ap50(path),
                     "size_mb": round(path.stat().st_size / 2**20, 1), "description": str(path)})
    for name, (desc, cfg) in PRESETS.items():
        rows.append({"name": name, "kind": "preset", "arch": cfg.arch, "backbone": cfg.backbone, "neck": cfg.neck,
                     "levels": f"P{cfg.levels[0]}-P{cfg.levels[-1]}", "description": desc})
    for name in TORCHVISION_MODELS:
        rows.append({"name": name, "kind": "torchvision", "description": "COCO weights: fpn import-torchvision " + name})
    if fmt == "json":
        _emit(rows, fmt, [])
        return
    marked = [{**r, "AP50": f"{r['AP50']} *"} if r.get("AP50_from") == "training" else r for r in rows]
    _emit(marked, fmt, ["name", "kind", "arch", "backbone", "neck", "levels", "AP50", "description"])
    click.echo("\nAP50: the mean over 8 views of the held-out images that fpn eval --views 8 --record measured"
               + ("; *: the training's own figure, on the image that chose the checkpoint (flattering)"
                  if any(r.get("AP50_from") == "training" for r in rows) else ""))
    click.echo(f"\narchitectures: {', '.join(ARCHS)}; backbones: {', '.join(BACKBONES)}; necks: {', '.join(NECKS)}; "
               f"upsampling: {', '.join(UPSAMPLES)}")


def _recorded_ap50(path) -> dict[str, Any]:
    """A checkpoint's AP50 as `fpn models` shows it: an evaluation recorded in it (`fpn eval --views 8 --record`:
    the mean over 8 flips/rotations, with its spread, at the limits and exact precision the checkpoint runs with),
    else its training's validation figure, marked as such: measured on the image that chose the checkpoint among
    those saved, it flatters (trees: 0.424 against 0.355 over 8 views)."""
    from fpn_model.weights import read_config, read_limits, read_precision

    evaluated = read_precision(path).get("evaluated", {})
    for m in (read_limits(path).get("evaluated", {}).get("sized", {}), evaluated.get("cpu/exact", {}),
              evaluated.get("cuda/exact", {})):
        if m.get("AP50") is not None:
            return {"AP50": m["AP50"], "AP50_sd": m.get("AP50_sd"), "AP50_from": "fpn eval --views 8"}
    val = read_config(path)[1].get("val", {}).get("AP50")
    return {} if val is None else {"AP50": val, "AP50_from": "training"}


@cli.command("import-torchvision")
@click.argument("name")
@click.argument("dest")
@click.option("--state-dict", type=click.Path(exists=True, dir_okay=False),
              help="A local .pth state dict instead of downloading torchvision's COCO weights.")
@_fail_cleanly
def import_torchvision_cmd(name, dest, state_dict):
    """Convert a torchvision COCO detector into an fpn checkpoint.

    The checkpoint names its classes as torchvision does (label k is COCO's category id k: 1 person, 3 car; "N/A"
    for the ids COCO left unused), with or without --state-dict.

    Example: fpn import-torchvision fasterrcnn_resnet50_fpn models/frcnn-coco.safetensors
    """
    from fpn_model.weights import import_torchvision, save_checkpoint
    from pipeline.storage import check_file_destination

    check_file_destination(dest, "model.safetensors")  # before the download
    model = import_torchvision(name, state_dict)
    click.echo(f"wrote {save_checkpoint(model, dest)}")


# -- train / eval ---------------------------------------------------------------------------------
def _parse_sets(sets: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for s in sets:
        if "=" not in s:
            raise click.BadParameter(f"{s!r}: expected FIELD=VALUE", param_hint="--set")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _model_config(preset_name: str, sets: tuple[str, ...]):
    from fpn_model.config import ModelConfig, preset

    base = preset(preset_name)
    changes = _parse_sets(sets)
    return ModelConfig.from_dict({**base.to_dict(), **changes})


@cli.command()
@click.option("--train", "train_paths", multiple=True, required=True, help="VOC XML / COCO JSON file or directory.")
@click.option("--val", "val_paths", multiple=True, help="Validation annotations (COCO metrics during training).")
@click.option("--preset", "preset_name", default="trees", show_default=True, help="Model preset (fpn models).")
@click.option("--set", "sets", multiple=True, help="Override a model config field, e.g. --set neck=panet.")
@click.option("--single-class", help="Count every object as this one class (e.g. Tree).")
@click.option("-o", "--output", default="runs/model.safetensors", show_default=True, help="Checkpoint to write.")
@click.option("--steps", type=int, default=2000, show_default=True)
@click.option("--minutes", type=float, help="Train for this long instead (the schedule follows the clock).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--crop", type=int, default=320, show_default=True, help="Training crop side (pixels).")
@click.option("--scale-min", type=float, default=0.5, show_default=True)
@click.option("--scale-max", type=float, default=1.3, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--eval-every", type=int, default=150, show_default=True)
@click.option("--val-views", type=click.Choice(["1", "8"]), default="8", show_default=True,
              help="Validation metrics (and the best-checkpoint choice) averaged over 8 flips/rotations, or 1.")
@click.option("--threads", type=int,
              help="torch CPU threads (with --workers: each worker's; default: its node's CPUs shared by the workers there).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init", "init", help="Start from this checkpoint's weights (fine-tuning; same architecture).")
@click.option("--colour", type=float, default=0.3, show_default=True, help="Colour jitter strength.")
@click.option("--grey", type=float, default=0.1, show_default=True, help="Fraction of greyscale crops.")
@click.option("--saturation-min", type=float,
              help="Lowest saturation factor of the colour jitter (default 1 - colour); e.g. 0.25 for duller imagery.")
@click.option("--rare", type=float, default=0.0, show_default=True,
              help="Fraction of crops centred on the least saturated 5% of objects (e.g. dead trees among green).")
@click.option("--ema", type=float, default=0.0, show_default=True,
              help="Evaluate and save an exponential moving average of the weights with this decay (e.g. 0.998).")
@click.option("--size-limits/--no-size-limits", default=True, show_default=True,
              help="With --val: size the model's per-image limits (RPN proposals, detections) from the training "
              "annotations and record them in the checkpoint when they keep AP50 on --val within its spread over 8 "
              "views, as `fpn eval --limits-from --record` does.")
@click.option("--address", help="Ray cluster for --workers, HOST:6379  [default: RAY_ADDRESS, else embedded local "
              "Ray].")
@click.option("--workers", type=int, default=0,
              help="Ray Train workers (DDP; each reserves 1 CPU; every option as in one process; --val shared by the "
              "workers; nodes need share no files); 0 trains in this process.")
@click.option("--use-gpu", is_flag=True, help="With --workers: one GPU per worker (DDP over nccl).")
@_fail_cleanly
def train(train_paths, val_paths, preset_name, sets, single_class, output, steps, minutes, batch_size, crop, scale_min,
          scale_max, lr, eval_every, val_views, threads, seed, init, colour, grey, saturation_min, rare, ema,
          size_limits, address, workers, use_gpu):
    """Train a detector on Pascal-VOC or COCO annotations; writes a checkpoint.

    Example: fpn train --train data/aerial-trees/SOAP_061.xml --single-class Tree --steps 200 -o runs/soap.safetensors
    (the repository's one annotated image, to try the command; --val VAL.xml adds COCO metrics during training)
    """
    from fpn_model.train import TrainConfig
    from fpn_model.train import train as run_train
    from pipeline.storage import check_file_destination

    check_file_destination(output, "model.safetensors")  # not after the training: it failed at the first save
    tc = TrainConfig(model=_model_config(preset_name, sets), train=train_paths, val=val_paths, output=output,
                     single_class=single_class, steps=steps, minutes=minutes, batch_size=batch_size, crop=crop,
                     scale_range=(scale_min, scale_max), lr=lr, eval_every=eval_every, threads=threads, seed=seed,
                     init=init, colour=colour, grey=grey, saturation_min=saturation_min, rare=rare, ema=ema,
                     val_views=int(val_views))

    def show(rec: dict) -> None:
        if rec["event"] == "step":
            click.echo(f"step {rec['step']:>6}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                       f"{rec['s_per_step']:.2f} s/step  {rec['elapsed_min']:.1f} min", err=True)
        else:
            click.echo(f"eval @ {rec['step']}: AP {rec['AP']:.3f}  AP50 {rec['AP50']:.3f}  AP75 {rec['AP75']:.3f}  "
                       f"AP_S {rec['AP_S']:.3f}  AR1000 {rec['AR1000']:.3f}", err=True)

    if workers:
        from jobs.train_dist import train_distributed

        summary = train_distributed(tc, workers=workers, address=address, use_gpu=use_gpu, log_fn=show)
    else:
        summary = run_train(tc, log_fn=show)
    chosen = f"best AP50 {summary['best']['AP50']} at step {summary['best']['step']}" if summary["history"] else \
        "no validation: the last weights"
    click.echo(f"checkpoint: {summary['checkpoint']} ({chosen}); "
               f"last: {summary['last']}; {summary['steps']} steps in {summary['minutes']} min"
               + (f" on {summary['workers']} worker{'s' * (summary['workers'] != 1)}" if workers else ""))
    if size_limits and val_paths:
        _size_trained_limits(summary["checkpoint"], train_paths, val_paths, single_class)


def _size_trained_limits(checkpoint: str, train_paths, val_paths, single_class: str | None) -> None:
    """`fpn train --val`: `fpn eval CHECKPOINT VAL --views 8 --limits-from TRAIN --record` on what it wrote, keeping
    the preset's limits (and saying so) when the sized ones cost AP."""
    import torch

    items = _eval_items(checkpoint, val_paths, single_class)
    _eval_limits(checkpoint, checkpoint, val_paths, items, train_paths, single_class=single_class, overrides={},
                 tile=1024, views=8, precision="exact", device="cuda" if torch.cuda.is_available() else "cpu",
                 record=True, json_out=None, fmt="table", strict=False)


@cli.command("eval")
@click.argument("model")
@click.argument("annotations", nargs=-1, required=True)
@click.option("--single-class", help="Count every object as this one class.")
@click.option("--score-thresh", type=float, help="Override the model's score threshold.")
@click.option("--scale", type=float, help="Override the model's input scale (upscaling).")
@click.option("--tile", type=int, default=1024, show_default=True, help="Tile images larger than this.")
@click.option("--views", type=click.Choice(["1", "8"]), default="1", show_default=True,
              help="8: average the metrics over the 8 flips/90-degree rotations of each image (steadier on few "
                   "objects; adds AP50_sd).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="exact", show_default=True,
              help="As fpn run's: an approximate forward (bf16, int8 on a CPU, fp16 on a GPU), to see what it "
                   "costs in AP.")
@click.option("--device", default="cpu", show_default=True, help="Where the model runs: cpu, cuda, cuda:N.")
@click.option("--limits-from", "limits_from", multiple=True, help="Training annotations to size the model's "
              "per-image limits (RPN proposals, detections) from (fpn_model.limits): evaluates the model with its own "
              "limits and with the sized ones.")
@click.option("--record", is_flag=True, help="With --views 8: record in the checkpoint the sized limits "
              "(--limits-from) when they keep AP50 within the spread over the views (AP50_sd); else evaluate every "
              "precision the device has and record them, with the default fpn run uses there: the approximate "
              "precision of the best AP50 among those within exact's spread, else exact.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics as JSON.")
@format_option
@_fail_cleanly
def eval_cmd(model, annotations, single_class, score_thresh, scale, tile, views, precision, device, limits_from,
             record, json_out, fmt):
    """COCO box metrics (AP, AP50, AP75, AP_S/M/L, AR) of MODEL on annotated images.

    The model's classes are matched to the annotations' by name (ignoring case), whatever numbers the files give
    them; a model without class names (torchvision's COCO detectors imported before they had them) is taken to
    answer COCO JSON's own category ids. Annotations none of whose classes the model has are refused; with
    --single-class, a model of one class is that class.

    Example: fpn eval trees data/aerial-trees/SOAP_061.xml --single-class Tree
    """
    import torch

    from fpn_model.config import check_precision, precisions_on
    from fpn_model.evaluate import choose_precision, evaluate
    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import is_plugin, load_checkpoint, read_precision, record_precision
    from fpn_model.zoo import resolve

    path = resolve(model)
    if record and (views != "8" or is_plugin(path)):
        raise click.UsageError("--record needs --views 8 (the spread it compares with) and a checkpoint file")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: torch {torch.__version__} sees no CUDA device here")
    kind = torch.device(device).type
    check_precision(precision, kind)
    overrides = {k: v for k, v in dict(score_thresh=score_thresh, scale=scale).items() if v is not None}
    items = _eval_items(path, annotations, single_class)
    if limits_from:
        _eval_limits(path, model, annotations, items, limits_from, single_class=single_class, overrides=overrides,
                     tile=tile, views=int(views), precision=precision, device=device, record=record,
                     json_out=json_out, fmt=fmt)
        return
    net = load_checkpoint(path, **overrides)
    runs = list(precisions_on(kind)) if record else [precision]
    results = {p: evaluate(Predictor(net, device=device, tile=TileConfig(size=tile, overlap=tile // 8), precision=p),
                           items, views=int(views)) for p in runs}
    if record:
        chosen = choose_precision(results)
        done = read_precision(path)
        record_precision(path, {
            "default": {**done.get("default", {}), kind: chosen},
            "evaluated": {**done.get("evaluated", {}),
                          **{f"{kind}/{p}": {k: round(m[k], 4) for k in ("AP", "AP50", "AP50_sd")}
                             for p, m in results.items()}},
            "how": f"fpn eval {model} {' '.join(annotations)} --views 8 --device {device}"
                   f"{' on ' + torch.cuda.get_device_name(device) if kind == 'cuda' else ''}"})
        click.echo(f"recorded in {path}: {chosen} by default on {kind}", err=True)
    metrics = results[runs[0]] if len(runs) == 1 else {f"{p}/{k}": v for p, m in results.items() for k, v in m.items()}
    _emit_metrics(metrics, fmt, json_out, {"model": str(model), "images": len(items),
                                           "precision": runs[0] if len(runs) == 1 else runs, "device": device})


def _eval_items(path, annotations, single_class: str | None) -> list:
    """The annotated images `fpn eval` scores the model at `path` on, their labels the model's for the same class
    names (`fpn_model.evaluate.aligned_to_model`)."""
    from fpn_model.data import load_annotations
    from fpn_model.evaluate import aligned_to_model
    from fpn_model.weights import read_config

    items = load_annotations(list(annotations), single_class=single_class)
    return aligned_to_model(items, read_config(path)[0], single_class=single_class)


def _emit_metrics(metrics: dict[str, float], fmt: str, json_out: str | None, about: dict[str, Any]) -> None:
    """`fpn eval`'s metrics as a table or JSON, and into `json_out` (with `about` the run) when given."""
    if json_out:
        Path(json_out).write_text(json.dumps({**about, **metrics}, indent=2))
    if fmt == "json":
        click.echo(json.dumps(metrics, indent=2))
    else:
        _emit([{"metric": k, "value": round(v, 4)} for k, v in metrics.items()], "table", ["metric", "value"])


def _eval_limits(path, model, annotations, items, limits_from, *, single_class, overrides, tile, views, precision,
                 device, record, json_out, fmt, strict=True) -> None:
    """`fpn eval --limits-from`: the model's metrics and seconds per image with its own limits and with the ones
    sized from the training annotations, side by side; `record`: write the sized ones into the checkpoint when
    their AP50 is no lower than the model's own minus its spread over the views (else an error, or with `strict`
    off a line saying that the model keeps its own)."""
    import time

    from fpn_model.data import load_annotations
    from fpn_model.evaluate import evaluate
    from fpn_model.limits import LIMIT_FIELDS, sized_limits
    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import load_checkpoint, read_config, record_limits

    cfg = read_config(path)[0].replace(**overrides)
    train = load_annotations(list(limits_from), single_class=single_class, images=False)  # their boxes alone
    sized, n = sized_limits(train, cfg, tile=tile)
    variants = {"own": {f: getattr(cfg, f) for f in LIMIT_FIELDS}, "sized": sized}
    results = {}
    for name, limits in variants.items():
        predictor = Predictor(load_checkpoint(path, **overrides, **limits), device=device, precision=precision,
                              tile=TileConfig(size=tile, overlap=tile // 8))
        t0 = time.perf_counter()
        results[name] = {**evaluate(predictor, items, views=views),
                         "s_per_image": (time.perf_counter() - t0) / (views * len(items))}
    own, new = results["own"], results["sized"]
    kept = new["AP50"] >= own["AP50"] - own.get("AP50_sd", 0.0)
    click.echo(f"limits {variants['own']} -> sized {sized} (densest window of the training annotations: "
               f"{n} objects): AP50 {own['AP50']:.4f} -> {new['AP50']:.4f}, "
               f"{own['s_per_image']:.3f} -> {new['s_per_image']:.3f} s per image", err=True)
    if record and not kept:
        why = (f"not recorded: the sized limits' AP50 {new['AP50']:.4f} is below the model's {own['AP50']:.4f} minus "
               f"its spread {own['AP50_sd']:.4f}")
        if strict:
            raise click.ClickException(why)
        click.echo(f"{why}; {path} keeps its own limits", err=True)
    elif record:
        record_limits(path, sized, {
            "from": list(limits_from), "densest": n, "tile": tile,
            "evaluated": {k: {m: round(v[m], 4) for m in ("AP", "AP50", "AP50_sd", "s_per_image")}
                          for k, v in results.items()},
            "how": f"fpn eval {model} {' '.join(annotations)}{' --single-class ' + single_class if single_class else ''}"
                   f" --views 8 --limits-from {' '.join(limits_from)} --device {device}"})
        click.echo(f"recorded in {path}: {sized}", err=True)
    _emit_metrics({f"{k}/{m}": v for k, r in results.items() for m, v in r.items()}, fmt, json_out,
                  {"model": str(model), "images": len(items), "limits": variants, "device": device})


# -- demo / render ----------------------------------------------------------------------------------
@cli.command()
@click.option("-o", "--output", default="demo-output", show_default=True, help="Where the demo writes.")
@_fail_cleanly
def demo(output):
    """Run the bundled tree-crown model over the bundled aerial image and a flyover clip made from it, then write
    the report.

    Writes OUTPUT/job (the job's Parquet output), OUTPUT/flyover.mp4 and OUTPUT/report.html, and prints a summary.
    The bundled model is for showing the pipeline on imagery like its training image; for real work import a
    COCO detector (fpn import-torchvision) or train one on your data (fpn train).

    Example: fpn demo -o demo-output
    """
    from jobs.demo import run_demo

    with _progress(str(Path(output) / "job")):
        doc, report, stats = run_demo(output, alongside_ray=_ray_data_setup)
    _print_summary(doc)
    for line in stats:
        click.echo(line)
    click.echo(f"\nreport: {report.resolve()} (open it in a browser; it needs no network)")


@cli.command()
@click.argument("output")
@click.argument("source")
@click.argument("dest")
@click.option("--frame", "--frame-index", "frame", type=int, help="Video: this frame index (a processed one).")
@click.option("--time", "time_s", type=float, help="Video: the processed frame nearest this time (seconds).")
@click.option("--clip", nargs=2, type=float, metavar="START END",
              help="Video: write an annotated MP4 of this time range (seconds) to DEST.")
@click.option("--region", nargs=4, type=int, metavar="X Y W H",
              help="Draw only this region (source pixels); of a raster, with the boxes of every window in it.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.3, show_default=True)
@click.option("--max-side", type=click.IntRange(min=16), help="Scale the picture down to at most this many pixels a side "
              "[default: full size; 4096 for a whole raster].")
@click.option("--video-backend", help="Video decoder: decord or pyav.  [default: the job's]")
@storage_flags
@_fail_cleanly
def render(output, source, dest, frame, time_s, clip, region, min_score, max_side, video_backend, endpoint_url,
           profile, anon):
    """Draw the detections OUTPUT holds for SOURCE onto its pixels: a PNG of a frame, or an MP4 clip.

    A video frame by --frame or --time, an image, or a raster (whole, scaled down, or a --region across its
    windows); --clip START END writes a short annotated MP4 of a video. A DEST ending in .tif of a georeferenced
    raster is a GeoTIFF in the raster's CRS (an overview with the boxes, to lay beside the scene in a GIS).

    Example: fpn render results/ flights/a.mp4 a-12s.png --time 12; fpn render results/ ortho.tif part.png
    --region 4096 4096 1024 1024; fpn render results/ flights/a.mp4 a.mp4 --clip 10 14
    """
    from jobs.render import Region, render_clip, render_frame

    opts = _read_options(endpoint_url, profile, anon)
    if clip:
        if frame is not None or time_s is not None or region:
            raise click.UsageError("--clip takes no --frame, --time or --region")
        r = render_clip(output, source, dest, clip[0], clip[1], min_score=min_score, storage_options=opts,
                        video_backend=video_backend)
        click.echo(f"{dest}: {r.frames} frames from {r.pts_s:.2f} s, {r.boxes} boxes drawn")
        _say_changed(source, r.changed)
        return
    r = render_frame(output, source, dest, frame_index=frame, time_s=time_s, region=Region(*region) if region else None,
                     min_score=min_score, max_side=max_side, storage_options=opts, video_backend=video_backend)
    where = f" (frame {r.frame_index} at {r.pts_s:.2f} s)" if r.frame_index is not None else ""
    click.echo(f"{dest}: {r.boxes} detections drawn{where}")
    _say_changed(source, r.changed)


def _say_changed(source: str, changed: str | None) -> None:
    if changed:
        click.echo(f"warning: {source} changed since the job read it ({changed}): the boxes drawn are of the "
                   "version it read", err=True)


@cli.command()
@click.argument("output")
@click.option("-o", "--output-file", "dest", default="report.html", show_default=True, help="The HTML page to write.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Draw and chart per source only detections scoring at least this.")
@click.option("--max-sources", type=click.IntRange(min=1), default=8, show_default=True,
              help="Videos, and images/rasters, shown one by one (those with the most detections).")
@click.option("--video-backend", help="Video decoder for the frame strips: decord or pyav.  [default: the job's]")
@storage_flags
@_fail_cleanly
def report(output, dest, min_score, max_sources, video_backend, endpoint_url, profile, anon):
    """Write one self-contained HTML page about OUTPUT: the job, detections over time, frames with their boxes,
    object sizes by pyramid level, scores, errors. It opens offline (images inlined, no script).

    Example: fpn report s3://bucket/out -o out.html --endpoint-url http://127.0.0.1:9000
    """
    from jobs.report import build_report

    r = build_report(output, dest, storage_options=_read_options(endpoint_url, profile, anon), min_score=min_score,
                     max_sources=max_sources, video_backend=video_backend)
    click.echo(f"{r.path}: {r.frames} frames, {r.detections} detections, {r.errors} errors "
               f"({r.bytes / 2**20:.1f} MB, {r.seconds:.1f} s)")


def main() -> None:
    """The `fpn` command (`cli` in a process of its own). On the way out, the interpreter's last garbage collection
    walks every object that Ray, Ray Data and pyarrow made: 0.45 s after a job on a 2-core node. The process ends
    here, so its objects are frozen out of that collection (`gc.freeze`); what holds files or locks is closed
    before, by the commands themselves."""
    try:
        cli()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()
