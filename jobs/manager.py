"""Jobs on Ray clusters through the Ray Jobs API: submit, status, list, logs, cancel, resume.

A submitted job is `fpn run spec.yaml` running on the cluster (the spec travels in the job's
working directory); its metadata names it as an fpn job and records its output and spec, so
`status`/`list` can show progress from the output itself (frames written vs planned) and `resume`
can submit the same spec again: the runner skips every frame already written.

Secrets never travel in the working directory, the metadata or the entrypoint: anyone who can list
jobs reads those. `split_secrets` takes out of a spec everything `pipeline.storage.redact` masks
(storage option secrets, signatures of presigned input URLs) and leaves placeholders; the secrets
travel as one environment variable of the job, `FPN_STORAGE_SECRETS` (`runtime_env={"env_vars": ...}`),
and `restore_secrets` puts them back on the cluster before the spec is loaded.

Ray writes a job's runtime env, environment included, to each node's `logs/runtime_env_agent.log` (INFO,
"Creating runtime env: ...") and returns it to Jobs API clients. So on a cluster with token auth (the
default of Ray >= 2.52 and of this project's cluster files) the variable is sealed (Fernet, from the
`cryptography` package) with a key derived from the cluster's auth token: the logs and the API hold
ciphertext, and only processes that hold the token, the submitter and the job's driver, can open it.
Whoever holds the token can run code on the cluster anyway. Without token auth the variable travels as
plain JSON, and `submit` warns that the logs will hold it. For long-lived keys prefer credentials the
cluster already has (instance roles, a Kubernetes Secret).
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import logging
import os
import re
import shlex
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from pipeline.output import Output
from pipeline.storage import REDACTED, drop_redacted, redact


__all__ = ["client", "submit", "job_status", "list_jobs", "cancel", "logs", "resume", "TERMINAL",
           "SECRETS_ENV", "split_secrets", "restore_secrets", "check_job_id"]

log = logging.getLogger(__name__)

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SECRETS_ENV = "FPN_STORAGE_SECRETS"
_FPN_KEY = "fpn_job"
_OPTION_FIELDS = ("storage_options", "output_storage_options")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Linux refuses to start a process with one environment string over 128 KiB (MAX_ARG_STRLEN)
_MAX_SECRETS_BYTES = 128 * 1024 - len(SECRETS_ENV) - 2


def check_job_id(job_id: str) -> str:
    """The job id itself when it is safe as a Ray submission id and a shell word; ValueError otherwise."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return job_id


# -- secrets: out of the spec on submit, back in on the cluster ---------------------------------------

def split_secrets(spec: dict[str, Any]) -> tuple[dict[str, Any], list[list[Any]]]:
    """`(redacted_spec, secrets)`: the spec with every secret replaced by a placeholder, and the
    secrets as `[path, value]` pairs (`path`: the keys and list indices leading to the value).

    What is secret is decided by `pipeline.storage.redact` alone, over the whole spec: values of
    secret-named keys in the storage options (nested per-location dicts or flat legacy ones, lists
    included), and URLs anywhere (inputs, output, model) whose signature or password it masks.
    Every leaf it changed is a secret, shipped whole.
    """
    redacted = redact(spec)
    return redacted, [[path, value] for path, value in _changed(spec, redacted, [])]


def restore_secrets(spec: dict[str, Any], env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The spec with the placeholders that `split_secrets` left filled from `env[SECRETS_ENV]`.

    Storage options left as `***` are dropped, so that credentials fall back to the environment
    (AWS_* variables, instance roles); anything else that stays redacted (a presigned input URL, an
    endpoint URL with a masked password) cannot be used at all and raises ValueError naming it.
    A spec without placeholders comes back unchanged.
    """
    spec = _fill(spec, _secrets_from(env))
    for field in _OPTION_FIELDS:
        if isinstance(spec.get(field), dict):
            spec[field] = drop_redacted(spec[field])
    left = list(_placeholder_paths(spec, []))
    if left:
        raise ValueError(f"spec field {_dotted(left[0])} is redacted and {SECRETS_ENV} does not hold its value")
    return spec


def _changed(original: Any, redacted: Any, path: list):
    """(path, original value) of every leaf that redaction changed (a whole dict or list that it
    replaced counts as one leaf)."""
    if isinstance(original, dict) and isinstance(redacted, dict):
        for k, v in original.items():
            yield from _changed(v, redacted.get(k), [*path, k])
    elif isinstance(original, (list, tuple)) and isinstance(redacted, (list, tuple)) and len(original) == len(redacted):
        for i, (a, b) in enumerate(zip(original, redacted)):
            yield from _changed(a, b, [*path, i])
    elif original != redacted:
        yield path, original


def _is_placeholder(value: Any) -> bool:
    """'***' itself, or a string that redaction marked (a URL whose signature reads '***')."""
    return isinstance(value, str) and REDACTED in unquote(value)


def _placeholder_paths(value: Any, path: list):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _placeholder_paths(v, [*path, k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _placeholder_paths(v, [*path, i])
    elif _is_placeholder(value):
        yield path


_SEALED = "fernet:"


def _cluster_token() -> str | None:
    """The Ray auth token of this process's cluster (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token: Ray's precedence), read afresh each time (Ray's own loader caches the first it finds per
    process), or None."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()
        token = path.read_text() if path.is_file() else None
    return token.strip() or None if token else None


def _fernet(token: str):
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(b"fpn storage secrets\0" + token.encode()).digest()))


def seal(text: str, token: str | None) -> str:
    """`text` sealed with a key derived from the cluster token (as `fernet:...`), or unchanged without a token."""
    return _SEALED + _fernet(token).encrypt(text.encode()).decode() if token else text


def _unseal(raw: str) -> str:
    if not raw.startswith(_SEALED):
        return raw
    from cryptography.fernet import InvalidToken

    token = _cluster_token()
    if not token:
        raise ValueError(f"{SECRETS_ENV} is sealed with the cluster's auth token and this process has none "
                         "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    try:
        return _fernet(token).decrypt(raw[len(_SEALED):].encode()).decode()
    except InvalidToken:
        raise ValueError(f"{SECRETS_ENV} was sealed with another auth token than this cluster's") from None


def _secrets_from(env: Mapping[str, str]) -> list[list[Any]]:
    raw = env.get(SECRETS_ENV)
    if not raw:
        return []
    raw = _unseal(raw)
    try:
        pairs = json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{SECRETS_ENV} is not valid JSON") from None  # the text itself is secret
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], list)
                                              for p in pairs):
        raise ValueError(f"{SECRETS_ENV} must be a JSON list of [path, value] pairs")
    return pairs


def _fill(spec: dict[str, Any], secrets: list[list[Any]]) -> dict[str, Any]:
    """A copy of the spec with each secret put where its path leads, only over a placeholder (a
    secret meant for another spec never overwrites a real value)."""
    spec = copy.deepcopy(spec)
    for path, value in secrets:
        parent = spec
        try:
            for step in path[:-1]:
                parent = parent[step]
            ok = path and _is_placeholder(parent[path[-1]])
        except (KeyError, IndexError, TypeError):
            ok = False
        if ok:
            parent[path[-1]] = value
        else:
            log.warning("%s: no placeholder at %s in the spec; that secret is not used", SECRETS_ENV, _dotted(path))
    return spec


def _dotted(path: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


# -- the Jobs API --------------------------------------------------------------------------------------

def _auth_headers() -> dict[str, str]:
    """Ray >= 2.52 clusters use token auth: send the token when there is one. Passed as a header because Ray
    reads RAY_AUTH_MODE only once per process."""
    token = _cluster_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at `address` (or RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient

    given, address = bool(address), address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:  # Ray would take it for a GCS address and ask the GCS there, 40 s, for its dashboard
        raise ValueError(f"Ray dashboard address {address}: it needs http:// (http://{address})")
    # Ray's client takes RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, over the address it is given: --address
    # http://a:8265 with RAY_ADDRESS=http://b:8265 asked b. Without them while it starts, the flag wins.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if given and k in os.environ}
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except (ConnectionError, RuntimeError) as e:
        raise ConnectionError(f"cannot reach the Ray dashboard at {address}: {str(e).splitlines()[0]}") from e
    finally:
        os.environ.update(hidden)


def submit(spec_path: str, *, address: str | None, overrides: dict | None = None, job_id: str | None = None,
           entrypoint_num_cpus: float = 0.0) -> tuple[str, dict]:
    """Validate the spec here (fails before any work), then submit `fpn run` of it to the cluster.

    Returns `(job_id, spec)`, the spec as the cluster records it: secrets replaced by placeholders.
    """
    from .spec import local_absolute, merge_fields, plan_from_dict, read_spec_file

    if job_id is not None:
        check_job_id(job_id)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(overrides.get("output"), str):  # `-o rel/out`: from here, as the spec's own paths are from its
        overrides["output"] = local_absolute(overrides["output"], Path.cwd())  # file (it went to the cluster as is)
    spec = merge_fields(read_spec_file(spec_path), overrides)
    plan_from_dict(spec)  # validation: a bad field fails here, naming it
    return _submit_spec(spec, address=address, job_id=job_id, entrypoint_num_cpus=entrypoint_num_cpus)


def resume(job_id: str, *, address: str | None, env: Mapping[str, str] = os.environ) -> str:
    """Submit a finished job's recorded spec again (validated first); frames already written are
    skipped. Returns the new job id.

    Refused (ValueError) while the job still runs: two writers on one output. The recorded spec is
    the redacted one, and the secrets the old job had lived only in its environment, so they are
    gone: placeholders are filled from `env[SECRETS_ENV]` (the same JSON list of `[path, value]`
    pairs that `submit` sends) and sent on the same way; if any stays unfilled, resume refuses and
    names it, rather than run with other credentials than the job had. Resubmitting the original
    spec file (`fpn submit`) to the same output does the same work: written frames are skipped.
    """
    from .spec import plan_from_dict

    info = _job_info(job_id, address)  # checks the id
    md = info.metadata or {}
    if not md.get(_FPN_KEY) or not md.get("spec"):
        raise LookupError(f"job {job_id} was not submitted by fpn (no spec in its metadata)")
    status = _status(info)
    if status not in TERMINAL:
        raise ValueError(f"job {job_id} is still {status}: cancel it first (fpn cancel {job_id}) or wait")
    spec = _fill(yaml.safe_load(md["spec"]), _secrets_from(env))
    missing = [_dotted(p) for p in _placeholder_paths(spec, [])]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"job {job_id} had secrets that were not recorded ({', '.join(missing[:3])}{more}): set "
                         f"{SECRETS_ENV} or resubmit its spec with fpn submit (written frames are skipped)")
    plan_from_dict(spec)
    return _submit_spec(spec, address=address)[0]


class JobNotFound(LookupError):
    """No job of that id on the cluster asked."""


def _job_info(job_id: str, address: str | None) -> Any:
    return _job_client(job_id, address)[1]


def _job_client(job_id: str, address: str | None) -> tuple[Any, Any]:
    """A client of the cluster at `address` and the job's info there; JobNotFound when it has no job of that id
    (the Jobs API's own answer to logs or stop of one is a RuntimeError carrying the HTTP 404)."""
    check_job_id(job_id)
    c = client(address)
    try:
        return c, c.get_job_info(job_id)
    except RuntimeError as e:
        raise JobNotFound(f"job {job_id}: not found on {_named(address)}") from e


def _named(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "the cluster"


def _refusal(e: RuntimeError) -> str:
    """Why the Jobs API refused a request: the last line of its answer (a server-side traceback comes before it,
    and the client adds a '.' line after it), without the exception's type."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip(" .")]
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1]) if lines else type(e).__name__


def _status(info: Any) -> str:
    return str(info.status.value if hasattr(info.status, "value") else info.status)


def _submit_spec(spec: dict, *, address: str | None, job_id: str | None = None,
                 entrypoint_num_cpus: float = 0.0) -> tuple[str, dict]:
    """Submit `fpn run` of a validated spec whose local paths are absolute. The redacted spec travels
    in the job's working directory and its metadata, the secrets in its environment only.
    Returns `(job_id, redacted spec)`."""
    job_id = check_job_id(job_id or f"fpn-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    redacted, secrets = split_secrets(spec)
    runtime_env: dict[str, Any] = {}
    if secrets:
        token = _cluster_token()
        if not token:
            log.warning("the cluster has no auth token here: the job's storage secrets travel unsealed, and Ray "
                        "writes them to each node's runtime_env_agent.log")
        value = seal(json.dumps(secrets), token)
        if len(value.encode()) > _MAX_SECRETS_BYTES:
            raise ValueError(f"the spec's secrets ({len(secrets)} values, {len(value.encode())} bytes) do not fit "
                             f"in one environment variable (128 KiB): use storage credentials instead of that "
                             f"many presigned URLs")
        runtime_env["env_vars"] = {SECRETS_ENV: value}
    c = client(address)
    text = yaml.safe_dump(redacted, sort_keys=False)
    with tempfile.TemporaryDirectory(prefix="fpn-submit-") as wd:
        Path(wd, "spec.yaml").write_text(text)
        try:
            c.submit_job(
                entrypoint=f"fpn run spec.yaml --job-id {shlex.quote(job_id)}",
                submission_id=job_id,
                runtime_env={"working_dir": wd, **runtime_env},
                metadata={_FPN_KEY: "1", "output": str(redacted["output"]), "spec": text},
                entrypoint_num_cpus=entrypoint_num_cpus,
            )
        except RuntimeError as e:  # a job id taken already, a cluster without room for the entrypoint, ...
            raise ValueError(f"{_named(address)} refused job {job_id}: {_refusal(e)}") from e
    return job_id, redacted


def _info_row(info: Any) -> dict[str, Any]:
    md = info.metadata or {}
    return {
        "job_id": info.submission_id, "status": _status(info),
        "output": md.get("output"), "entrypoint": info.entrypoint, "message": info.message,
        "start_time": _ts(info.start_time), "end_time": _ts(info.end_time),
        "_start": info.start_time, "_end": info.end_time, "_spec": md.get("spec"),
    }


def _ts(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else None


_RAY_STATES = {"PENDING": "running", "RUNNING": "running", "SUCCEEDED": "succeeded", "STOPPED": "cancelled",
               "FAILED": "failed"}


def _with_output_state(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the output's progress and state (pipeline.output.STATES); the cluster's status decides
    when the output cannot be read (no access from here, or nothing written yet)."""
    row["state"] = _RAY_STATES.get(row["status"], row["status"].lower())
    if row["output"]:
        try:
            p = Output(row["output"], _spec_storage(row["_spec"])).progress()
        except (OSError, ValueError):
            return row
        recorded, writer = p.pop("state"), p.pop("job_id", None)
        if writer not in (None, row["job_id"]):  # a later job (a resume) writes the output now: it was listed
            # with that job's state and frames (a cancelled job read "succeeded" once its resume had finished)
            row["message"] = f"its output is job {writer}'s now (fpn status {writer})"
            return row
        # the cluster knows whether the driver lives; the output knows how a finished one ended (a driver killed
        # before recording its end leaves "running"/"interrupted" there: the cluster's word stands)
        if row["status"] in TERMINAL and recorded not in (None, "running", "interrupted"):
            row["state"] = recorded
        row.update(p)
    return row


def job_status(job_id: str, *, address: str | None) -> dict[str, Any]:
    return _with_output_state(_info_row(_job_info(job_id, address)))


def _spec_storage(spec_text: str | None) -> dict | None:
    """The recorded spec's options for its output, placeholders dropped: progress is read with the
    caller's own credentials (environment), never with secrets the job had."""
    if not spec_text:
        return None
    spec = yaml.safe_load(spec_text) or {}
    options = spec.get("output_storage_options") or spec.get("storage_options")
    return drop_redacted(options) if isinstance(options, dict) else None


def list_jobs(*, address: str | None) -> list[dict[str, Any]]:
    """fpn jobs known to the cluster, newest first."""
    rows = [_with_output_state(_info_row(j)) for j in client(address).list_jobs() if (j.metadata or {}).get(_FPN_KEY)]
    return sorted(rows, key=lambda r: r["_start"] or 0, reverse=True)


def cancel(job_id: str, *, address: str | None, wait_s: float = 60) -> str:
    """Stop a job and wait until the cluster reports it ended; returns the final status.

    Raises TimeoutError when it has not ended within `wait_s`: the caller must not report a stop
    that has not happened (a resume now would race the still-running job)."""
    c, _ = _job_client(job_id, address)
    c.stop_job(job_id)
    deadline = time.time() + wait_s
    status = str(c.get_job_status(job_id).value)
    while status not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        status = str(c.get_job_status(job_id).value)
    if status not in TERMINAL:
        raise TimeoutError(f"job {job_id} did not stop within {wait_s:g}s (status: {status})")
    return status


def logs(job_id: str, *, address: str | None, follow: bool = False):
    """The job's driver log; with `follow`, yields chunks until the job ends."""
    c, _ = _job_client(job_id, address)
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
