"""`fpn`: run detection jobs over video and aerial archives, train and evaluate models.

Only this module prints. Library errors become one-line `click.ClickException`s (exit 1).
"""
from __future__ import annotations

import json
import logging
import sys
from functools import wraps
from pathlib import Path
from typing import Any

import click
import yaml

__all__ = ["cli"]


def _fail_cleanly(fn):
    """Turn the project's and storage's expected errors into one clear line (secrets redacted) and exit 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from fpn_model.weights import CheckpointError
        from pipeline.output import OutputBusyError
        from pipeline.storage import redact_text

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError, CheckpointError, LookupError, ConnectionError,
                OutputBusyError, TimeoutError) as e:
            raise click.ClickException(redact_text(str(e))) from e

    return wrapper


def _emit(rows: list[dict], fmt: str, columns: list[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if fmt == "csv":
        import csv

        w = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return
    widths = {c: max([len(c)] + [len(_cell(r.get(c))) for r in rows]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        click.echo("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


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


def _print_summary(doc: dict) -> None:
    state = doc["state"].replace("_", " ")
    click.echo(
        f"\n{state}: {doc.get('frames', 0)} frames, {doc.get('detections', 0)} detections, {doc.get('errors', 0)} "
        f"errors in {doc['wall_s']:.1f} s ({doc.get('frames_per_s') or 0:.2f} frames/s"
        + (f"; {doc['skipped_frames']} frames already written were skipped" if doc.get("skipped_frames") else "")
        + ")"
    )
    out = doc["spec"]["output"]
    click.echo(f"output: {out}")
    if doc.get("errors"):
        click.echo(f"errors: fpn query {out} \"SELECT source, stage, error_type, message FROM errors\"")
    click.echo(f"query it: fpn query {out} \"SELECT count(*) FROM detections\"")


def _run_and_exit(plan, **kwargs) -> None:
    """Run a plan, print the summary and exit with the state's code (pipeline.output.EXIT_CODES)."""
    from jobs.runner import run as run_plan
    from pipeline.output import EXIT_CODES

    try:
        doc = run_plan(plan, **kwargs)
    except KeyboardInterrupt:
        click.echo(f"\ncancelled: what was written stays; continue with: fpn resume {plan.output}", err=True)
        sys.exit(EXIT_CODES["cancelled"])
    _print_summary(doc)
    sys.exit(EXIT_CODES[doc["state"]])


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", help="Output directory or URL (OUTPUT/frames, errors, _job.json).")
@click.option("-m", "--model", help="Zoo name or checkpoint path.  [default: trees]")
@click.option("--batch-size", type=int, help="Frames per detector call.")
@click.option("--every-n", type=int, help="Process every Nth video frame.")
@click.option("--fps", type=float, help="Process about this many video frames per second.")
@click.option("--start", "start_s", type=float, help="Skip video before this time (s).")
@click.option("--end", "end_s", type=float, help="Stop video at this time (s).")
@click.option("--tile", type=int, help="Tile frames larger than this many pixels a side.")
@click.option("--tile-overlap", type=int, help="Overlap between tiles (pixels).")
@click.option("--no-tile", is_flag=True, help="Feed frames whole, however large.")
@click.option("--score-thresh", type=float, help="Drop detections scoring below this.")
@click.option("--scale", type=float, help="Resize frames by this factor on the device (2 = upscale tiny objects).")
@click.option("--segment-frames", type=int, help="Frames per video segment (decode parallelism).")
@click.option("--num-detectors", type=int, help="Detector actors (model copies).")
@click.option("--gpus-per-detector", type=float, help="GPUs per detector actor.")
@click.option("--cpus-per-detector", type=float, help="CPUs per detector actor (its torch threads).")
@click.option("--video-backend", help="Video decoder: decord (default), pyav, or module:Class of your own.")
@click.option("--decode-timeout", "decode_timeout_s", type=float,
              help="Seconds to wait for the next decoded batch before a decoder counts as hung.  [default: 300]")
@click.option("--endpoint-url", help="S3-compatible endpoint URL for s3:// inputs and outputs.")
@click.option("--profile", help="AWS profile for s3:// access.")
@click.option("--anon", is_flag=True, help="Anonymous access to public buckets.")
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join (default: embedded local Ray).")
@click.option("--job-id", help="Id recorded in OUTPUT/_job.json (set by fpn submit).")
@_fail_cleanly
def run(inputs, output, model, batch_size, every_n, fps, start_s, end_s, tile, tile_overlap, no_tile, score_thresh,
        scale, segment_frames, num_detectors, gpus_per_detector, cpus_per_detector, video_backend, decode_timeout_s, endpoint_url,
        profile, anon, address, job_id):
    """Detect objects in images, videos and rasters; one Parquet row per sampled frame.

    INPUTS are files, directories, globs, s3:// or other fsspec URLs, manifests (one URI a line),
    or a single job spec (.yaml) whose fields the flags override.

    Example: fpn run s3://bucket/flights/**.mp4 -o s3://bucket/out --fps 2 --endpoint-url http://127.0.0.1:9000
    """
    from jobs.spec import merge_fields, plan_from_dict, read_spec_file

    flags = _run_flags(output=output, model=model, batch_size=batch_size, score_thresh=score_thresh, scale=scale,
                       segment_frames=segment_frames, video_backend=video_backend,
                       decode_timeout_s=decode_timeout_s,
                       sampling=dict(every_n=every_n, fps=fps, start_s=start_s, end_s=end_s),
                       resources=dict(num_detectors=num_detectors, gpus_per_detector=gpus_per_detector,
                                      cpus_per_detector=cpus_per_detector),
                       tile=dict(size=tile, overlap=tile_overlap), no_tile=no_tile)
    flags.update(_storage_flags(endpoint_url, profile, anon))
    if len(inputs) == 1 and inputs[0].endswith((".yaml", ".yml")):
        from jobs.manager import restore_secrets  # secrets of a submitted spec travel in the job's environment

        plan = plan_from_dict(merge_fields(restore_secrets(read_spec_file(inputs[0])), flags))
    else:
        if not output:
            raise click.UsageError("--output is required (or give a job spec .yaml)")
        plan = plan_from_dict({"inputs": list(inputs), **flags})
    click.echo(f"running {plan.model_id} over {len(plan.inputs)} input(s) -> {plan.output}", err=True)
    _run_and_exit(plan, address=address, job_id=job_id)


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
    addr = address or "$RAY_ADDRESS"
    click.echo(f"submitted {jid} (output: {data['output']})\n")
    click.echo("next steps:")
    click.echo(f"  fpn status {jid} --address {addr}")
    click.echo(f"  fpn logs {jid} --follow --address {addr}")
    click.echo(f"  fpn cancel {jid} --address {addr}")
    click.echo(f"  fpn query {data['output']} \"SELECT label_name, count(*) FROM detections GROUP BY 1\"")


def _is_output(target: str) -> bool:
    return "://" in target or Path(target).exists()


@cli.command()
@click.argument("target")
@click.option("--endpoint-url", help="S3-compatible endpoint for an s3:// OUTPUT.")
@address_option
@format_option
@_fail_cleanly
def status(target, endpoint_url, address, fmt):
    """State and progress of a job: frames done / planned, frames/s, errors, ETA.

    TARGET is a submitted job's id (asks the --address cluster) or an OUTPUT directory/URL (reads it). The exit
    code follows the state: 0 running or succeeded, 1 failed, 3 finished with errors, 4 interrupted (the writer
    vanished: fpn resume continues), 130 cancelled. Example: fpn status fpn-20261124-120000-ab12cd
    """
    from pipeline.output import EXIT_CODES, Output

    if _is_output(target):
        row = {"output": target, **Output(target, _storage_flags(endpoint_url).get("storage_options")).progress()}
    else:
        from jobs.manager import job_status

        row = _public(job_status(target, address=address))
    if fmt == "json":
        click.echo(json.dumps(row, indent=2, default=str))
    else:
        done, planned = row.get("frames_done"), row.get("frames_planned")
        pct = f" ({100 * done / planned:.0f}%)" if planned and done is not None else ""
        if row.get("job_id"):
            click.echo(f"job:      {row['job_id']}\ncluster:  {row.get('status')}")
        click.echo(f"state:    {(row.get('state') or '?').replace('_', ' ')}")
        for key in ("message", "error"):
            if row.get(key):
                click.echo(f"{key + ':':<10}{row[key]}")
        click.echo(f"output:   {row.get('output')}")
        click.echo(f"frames:   {done if done is not None else '?'} / {planned if planned is not None else '?'}{pct}")
        click.echo(f"rate:     {row['frames_per_s']:.2f} frames/s" if row.get("frames_per_s") else "rate:     -")
        click.echo(f"errors:   {row.get('errors', 0)}")
        click.echo(f"eta:      {_fmt_s(row.get('eta_s')) or '-'}")
        if row.get("job_id"):
            click.echo(f"started:  {row.get('start_time')}  ended: {row.get('end_time') or '-'}")
    sys.exit(EXIT_CODES.get(row.get("state") or "", 0))


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
@click.option("--endpoint-url", help="S3-compatible endpoint for an s3:// OUTPUT.")
@address_option
@_fail_cleanly
def resume(target, endpoint_url, address):
    """Continue a failed or cancelled job, skipping every frame already written.

    TARGET is a job id (resubmitted to the --address cluster with the same spec) or an OUTPUT
    directory/URL (run again here, on embedded Ray, from its _job.json).

    Example: fpn resume fpn-20261124-120000-ab12cd --address http://head:8265
    """
    from jobs.manager import resume as resume_job
    from jobs.spec import plan_from_record
    from pipeline.output import Output

    is_output = "://" in target or Path(target).exists()
    if not is_output:
        jid = resume_job(target, address=address)
        click.echo(f"resubmitted {target} as {jid}: frames already written are skipped")
        click.echo(f"  fpn status {jid}")
        return
    flags = _storage_flags(endpoint_url)
    record = Output(target, flags.get("storage_options")).read_job()
    plan = plan_from_record(record["spec"], flags)
    _run_and_exit(plan, job_id=record.get("job_id"))


@cli.command()
@click.argument("output")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--endpoint-url", help="S3-compatible endpoint for an s3:// OUTPUT.")
@_fail_cleanly
def query(output, sql, fmt, endpoint_url):
    """Run read-only SQL (DuckDB) over an output: views `frames`, `detections` (one row per detection), `errors`.

    Only files under OUTPUT can be read, and nothing can be written.

    Example: fpn query out/ "SELECT source, count(*) FROM detections WHERE score > 0.5 GROUP BY 1"
    """
    from jobs.query import query as run_query

    cols, rows = run_query(output, sql, _storage_flags(endpoint_url).get("storage_options"))
    _emit([dict(zip(cols, r)) for r in rows], fmt, cols)


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
        cfg, extra = read_config(path)
        val = extra.get("val", {})
        rows.append({"name": name, "kind": "checkpoint", "arch": cfg.arch, "backbone": cfg.backbone, "neck": cfg.neck,
                     "levels": "P" + "-P".join(map(str, (cfg.levels[0], cfg.levels[-1]))),
                     "classes": ",".join(cfg.class_names), "AP50": val.get("AP50"),
                     "size_mb": round(path.stat().st_size / 2**20, 1), "description": str(path)})
    for name, (desc, cfg) in PRESETS.items():
        rows.append({"name": name, "kind": "preset", "arch": cfg.arch, "backbone": cfg.backbone, "neck": cfg.neck,
                     "levels": f"P{cfg.levels[0]}-P{cfg.levels[-1]}", "description": desc})
    for name in TORCHVISION_MODELS:
        rows.append({"name": name, "kind": "torchvision", "description": "COCO weights: fpn import-torchvision " + name})
    if fmt == "json":
        _emit(rows, fmt, [])
        return
    _emit(rows, fmt, ["name", "kind", "arch", "backbone", "neck", "levels", "AP50", "description"])
    click.echo(f"\narchitectures: {', '.join(ARCHS)}; backbones: {', '.join(BACKBONES)}; necks: {', '.join(NECKS)}; "
               f"upsampling: {', '.join(UPSAMPLES)}")


@cli.command("import-torchvision")
@click.argument("name")
@click.argument("dest")
@click.option("--state-dict", type=click.Path(exists=True, dir_okay=False),
              help="A local .pth state dict instead of downloading torchvision's COCO weights.")
@_fail_cleanly
def import_torchvision_cmd(name, dest, state_dict):
    """Convert a torchvision COCO detector into an fpn checkpoint.

    Example: fpn import-torchvision fasterrcnn_resnet50_fpn models/frcnn-coco.safetensors
    """
    from fpn_model.weights import import_torchvision, save_checkpoint

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
@click.option("--threads", type=int, help="torch CPU threads.")
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
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster for --workers (default: embedded local Ray).")
@click.option("--workers", type=int, default=0, help="Ray Train workers (DDP); 0 trains in this process.")
@click.option("--use-gpu", is_flag=True, help="With --workers: one GPU per worker (DDP over nccl).")
@_fail_cleanly
def train(train_paths, val_paths, preset_name, sets, single_class, output, steps, minutes, batch_size, crop, scale_min,
          scale_max, lr, eval_every, val_views, threads, seed, init, colour, grey, saturation_min, rare, ema, address,
          workers, use_gpu):
    """Train a detector on Pascal-VOC or COCO annotations; writes a checkpoint.

    Example: fpn train --train data/trees/big.xml --val data/trees/val.xml --single-class Tree --minutes 30
    """
    from fpn_model.train import TrainConfig
    from fpn_model.train import train as run_train

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

        result = train_distributed(tc, workers=workers, address=address, use_gpu=use_gpu)
        click.echo(f"checkpoint: {result['checkpoint']} ({result.get('step')} steps on {result.get('workers')} "
                   f"workers, final loss {result.get('loss', float('nan')):.4f})")
        return
    summary = run_train(tc, log_fn=show)
    click.echo(f"checkpoint: {summary['checkpoint']} (best AP50 {summary['best'].get('AP50')}); "
               f"last: {summary['last']}; {summary['steps']} steps in {summary['minutes']} min")


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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the metrics as JSON.")
@format_option
@_fail_cleanly
def eval_cmd(model, annotations, single_class, score_thresh, scale, tile, views, json_out, fmt):
    """COCO box metrics (AP, AP50, AP75, AP_S/M/L, AR) of MODEL on annotated images.

    Example: fpn eval trees data/aerial-trees/SOAP_061.xml --single-class Tree
    """
    from fpn_model.data import load_annotations
    from fpn_model.evaluate import evaluate
    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    overrides = {k: v for k, v in dict(score_thresh=score_thresh, scale=scale).items() if v is not None}
    net = load_checkpoint(resolve(model), **overrides)
    items = load_annotations(list(annotations), single_class=single_class)
    metrics = evaluate(Predictor(net, tile=TileConfig(size=tile, overlap=tile // 8)), items, views=int(views))
    if json_out:
        Path(json_out).write_text(json.dumps({"model": str(model), "images": len(items), **metrics}, indent=2))
    if fmt == "json":
        click.echo(json.dumps(metrics, indent=2))
    else:
        _emit([{"metric": k, "value": round(v, 4)} for k, v in metrics.items()], "table", ["metric", "value"])


# -- demo / render ----------------------------------------------------------------------------------
@cli.command()
@click.option("-o", "--output", default="demo-output", show_default=True, help="Where the demo writes.")
@_fail_cleanly
def demo(output):
    """Run the bundled tree-crown model over the bundled aerial image, a flyover clip and a street video.

    Writes OUTPUT/job (the job's Parquet output) and OUTPUT/detections.png, and prints a summary.
    """
    from jobs.demo import run_demo

    doc, png, stats = run_demo(output)
    _print_summary(doc)
    click.echo(f"aerial detections drawn on: {png}")
    for line in stats:
        click.echo(line)


@cli.command()
@click.argument("output")
@click.argument("source")
@click.argument("png")
@click.option("--frame-index", type=int, default=0, show_default=True)
@click.option("--min-score", type=float, default=0.3, show_default=True)
@_fail_cleanly
def render(output, source, png, frame_index, min_score):
    """Draw one image's detections from OUTPUT onto it and save PNG.

    Example: fpn render results/ data/aerial-trees/SOAP_061.png trees.png
    """
    from jobs.render import render_frame

    n = render_frame(output, source, png, frame_index=frame_index, min_score=min_score)
    click.echo(f"{png}: {n} detections drawn")


if __name__ == "__main__":  # pragma: no cover
    cli()
