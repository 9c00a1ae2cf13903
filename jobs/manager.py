"""Jobs on Ray clusters through the Ray Jobs API: submit, status, list, logs, cancel, resume.

A submitted job is `fpn run spec.yaml` running on the cluster (the spec travels in the job's
working directory); its metadata names it as an fpn job and records its output and spec, so
`status`/`list` can show progress from the output itself (frames written vs planned) and `resume`
can submit the same spec again: the runner skips every frame already written.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from pipeline.record import read_job_json
from pipeline.storage import filesystem, join, parquet_files


__all__ = ["client", "submit", "job_status", "list_jobs", "progress", "cancel", "logs", "resume", "TERMINAL"]

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
_FPN_KEY = "fpn_job"


def _auth_headers() -> dict[str, str]:
    """Ray >= 2.52 clusters use token auth: send the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token) when there is one. Passed as a header because Ray reads RAY_AUTH_MODE only
    once per process."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {str(e).splitlines()[0]}") from e


def _absolute_inputs(spec: dict, base: Path) -> dict:
    spec = dict(spec)
    ins = spec.get("inputs") or []
    ins = [ins] if isinstance(ins, str) else ins
    spec["inputs"] = [i if "://" in i or Path(i).is_absolute() else str((base / i).resolve()) for i in ins]
    out = spec.get("output")
    if isinstance(out, str) and "://" not in out and not Path(out).is_absolute():
        spec["output"] = str((base / out).resolve())
    return spec


def submit(spec_path: str, *, address: str | None, overrides: dict | None = None, job_id: str | None = None,
           entrypoint_num_cpus: float = 0.0) -> tuple[str, dict]:
    """Validate the spec here (fails before any work), then submit `fpn run` of it to the cluster.

    Returns `(job_id, spec)`.
    """
    from .spec import load_spec

    path = Path(spec_path)
    load_spec(path, **(overrides or {}))  # validation: a bad field fails here, naming it
    spec = yaml.safe_load(path.read_text()) or {}
    for k, v in (overrides or {}).items():
        if v is not None:
            spec[k] = v
    spec = _absolute_inputs(spec, path.parent.resolve())
    return _submit_spec(spec, address=address, job_id=job_id, entrypoint_num_cpus=entrypoint_num_cpus), spec


def resume(job_id: str, *, address: str | None) -> str:
    """Submit a job's recorded spec again (validated first); frames already written are skipped.
    Returns the new job id."""
    from .spec import plan_from_dict

    info = _job_info(job_id, address)
    md = info.metadata or {}
    if not md.get(_FPN_KEY) or not md.get("spec"):
        raise LookupError(f"job {job_id} was not submitted by fpn (no spec in its metadata)")
    spec = yaml.safe_load(md["spec"])
    plan_from_dict(spec)
    return _submit_spec(spec, address=address)


def _job_info(job_id: str, address: str | None) -> Any:
    try:
        return client(address).get_job_info(job_id)
    except RuntimeError as e:
        raise LookupError(f"job {job_id}: not found on {address or os.environ.get('RAY_ADDRESS')}") from e


def _submit_spec(spec: dict, *, address: str | None, job_id: str | None = None,
                 entrypoint_num_cpus: float = 0.0) -> str:
    """Submit `fpn run` of a validated spec whose local paths are absolute; the spec travels in the
    job's working directory and its metadata."""
    job_id = job_id or f"fpn-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    c = client(address)
    text = yaml.safe_dump(spec, sort_keys=False)
    with tempfile.TemporaryDirectory(prefix="fpn-submit-") as wd:
        Path(wd, "spec.yaml").write_text(text)
        c.submit_job(
            entrypoint=f"fpn run spec.yaml --job-id {job_id}",
            submission_id=job_id,
            runtime_env={"working_dir": wd},
            metadata={_FPN_KEY: "1", "output": str(spec["output"]), "spec": text},
            entrypoint_num_cpus=entrypoint_num_cpus,
        )
    return job_id


def _info_row(info: Any) -> dict[str, Any]:
    md = info.metadata or {}
    return {
        "job_id": info.submission_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "output": md.get("output"), "entrypoint": info.entrypoint, "message": info.message,
        "start_time": _ts(info.start_time), "end_time": _ts(info.end_time),
        "_start": info.start_time, "_end": info.end_time, "_spec": md.get("spec"),
    }


def _ts(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None


def progress(output: str, storage_options: dict | None = None, *, now_s: float | None = None) -> dict[str, Any]:
    """Frames written vs planned, rate and ETA, read from an output (Parquet footers and _job.json)."""
    import pyarrow.parquet as pq

    fs, path = filesystem(output, storage_options)
    try:
        doc = read_job_json(output, storage_options)
    except (FileNotFoundError, OSError):
        doc = {}
    def rows(sub: str) -> int:  # from the Parquet footers alone
        total = 0
        for f in parquet_files(fs, join(path, sub)):
            with fs.open(f, "rb") as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total

    written, errors = rows("frames"), rows("errors")
    planned = doc.get("planned_frames")
    started = doc.get("started_at")
    rate = eta = None
    if started and doc.get("state") == "running":
        t0 = time.mktime(time.strptime(started[:19], "%Y-%m-%dT%H:%M:%S"))
        elapsed = (now_s or time.time()) - t0
        new = written - doc.get("skipped_frames", 0)
        if elapsed > 0 and new > 0:
            rate = new / elapsed
            if planned:
                eta = max(0.0, (planned - written) / rate)
    elif doc.get("frames_per_s"):
        rate = doc["frames_per_s"]
    return {"state": doc.get("state"), "frames_done": written, "frames_planned": planned, "errors": errors,
            "frames_per_s": rate, "eta_s": eta, "runs": doc.get("runs")}


def job_status(job_id: str, *, address: str | None) -> dict[str, Any]:
    row = _info_row(_job_info(job_id, address))
    if row["output"]:
        try:
            row.update(progress(row["output"], _spec_storage(row["_spec"])))
        except (OSError, ValueError):
            pass
    row["state"] = row["status"]
    return row


def _spec_storage(spec_text: str | None) -> dict | None:
    if not spec_text:
        return None
    return (yaml.safe_load(spec_text) or {}).get("storage_options")


def list_jobs(*, address: str | None) -> list[dict[str, Any]]:
    """fpn jobs known to the cluster, newest first."""
    rows = [_info_row(j) for j in client(address).list_jobs() if (j.metadata or {}).get(_FPN_KEY)]
    return sorted(rows, key=lambda r: r["_start"] or 0, reverse=True)


def cancel(job_id: str, *, address: str | None, wait_s: float = 60) -> str:
    """Stop a job and wait until the cluster reports it ended; returns the final status."""
    c = client(address)
    c.stop_job(job_id)
    deadline = time.time() + wait_s
    status = str(c.get_job_status(job_id).value)
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(c.get_job_status(job_id).value)
    return status


def logs(job_id: str, *, address: str | None, follow: bool = False):
    """The job's driver log; with `follow`, yields chunks until the job ends."""
    c = client(address)
    if not follow:
        yield c.get_job_logs(job_id)
        return
    import asyncio

    async def _tail():
        async for chunk in c.tail_job_logs(job_id):
            yield chunk

    agen = _tail()
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()
