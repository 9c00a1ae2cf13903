"""Run a `Plan` on embedded local Ray or on a cluster, and account for it in `OUTPUT/_job.json`.

The runner expands the inputs (failing before any work on a missing input or a missing output bucket), takes
the output's single-writer lease, refuses an output written with other settings, records the job (state
`running`), turns sources that changed since an earlier run into error rows, reads the frame ids already
written so a rerun or resume skips them, executes the Ray Data plan and records the final state (one of
`pipeline.output.STATES`), whatever happens: SIGINT/SIGTERM end as `cancelled`, any error as `failed`. A rerun
with nothing new records itself without Ray, and carries the figures of the last run that did work (`last_work`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import os
import platform
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from fpn_model.memory import keep_freed_memory_env
from fpn_model.weights import default_precision, read_config, read_input_spec
from fpn_model.zoo import model_id
from pipeline.known import LEFT_FIELDS, left_as_changed, left_at
from pipeline.output import Output, OutputSettingsError, check_output_location, error_row, final_state
from pipeline.counter import FrameCounter
from pipeline.plan import (Plan, Planned, Resources, count_planned, count_written, drop_duplicates, execute,
                           plan_known, plan_work, raster_summary, unwritten)
from pipeline.raydata import (actor_init_death, environ, one_node_execution, patched, quiet_actor_init_deaths,
                              spend_actor_restart_warning, start_ray_data_helpers)
from pipeline.sizing import ask_detector_gpu_memory, auto_batch, cluster_nodes, fit, model_input_mpx
from pipeline.sources import ahead_of, expand_inputs, settled
from pipeline.storage import one_line, redact_text

from .spec import plan_to_dict
from .watchdog import Watchdog

__all__ = ["run", "plan_sources", "init_ray", "stop_ray", "check_address", "versions"]

log = logging.getLogger(__name__)
NOT_SETTLED_NAMED = 20  # sources left for a later run (`min_age_s`) that `_job.json` names


def versions() -> dict[str, str]:
    """Versions of what made the output, from the installed distributions (the driver imports no torch)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
            return None

    return {"fpn-pipeline": of("fpn-pipeline"), "python": platform.python_version(),
            **{name: of(name) for name in ("torch", "torchvision", "ray", "pyarrow")}}


def check_address(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail in seconds with one line when a `host:port` or `ray://host:port` Ray address does not answer: `ray.init`
    itself retries an unreachable GCS for minutes (measured: over 2 minutes) before it gives up. `address` None:
    RAY_ADDRESS's, and the line says so. A dashboard's http:// address (what `fpn submit` takes) is refused:
    Ray's own refusal took three lines and named neither."""
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    if address.split("://", 1)[0].lower() in ("http", "https"):
        raise ValueError(f"{given} {address} is a Ray dashboard's address (fpn submit's): fpn run (and fpn train "
                         "--workers) joins a cluster by its Ray (GCS) address, host:6379"
                         + ("; unset RAY_ADDRESS to run on the embedded local Ray" if given == "RAY_ADDRESS" else ""))
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port or ray://host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} "
                              "(is it running? is the address right?)") from None


# The embedded node (Ray's system config, `ray.init(_system_config=...)`):
# - worker_niceness 0: Ray starts its workers at nice 15, below its own daemons and the driver; a detector's torch
#   threads then lose their core to every wake-up of those (benchmarks/worker_niceness.py: the same forward in an
#   actor, 1.025x as fast at 0);
# - enable_worker_prestart: the raylet starts workers (one per CPU, at most PRESTART_WORKERS) as it starts, not once
#   the driver has connected, so they boot while `ray.init` finishes: a job's first task and its detector find one
#   ready;
# - preload_python_modules: what every worker of a job imports on its first call (Ray Data's workers, the planning
#   task, the detector class), imported by the workers Ray starts ahead, while the job plans (pipeline/preload.py);
#   measured on the 2-core node: the detector's `__init__` 1.1 -> 0.35 s after the execution starts.
# - enable_metrics_collection off: no Prometheus to scrape (`_lean_local_node`); its dashboard agent then binds no
#   metrics port and polls no process's stats.
# - num_workers_soft_limit (set as it starts: `kept_workers`): how many workers the raylet keeps when idle.
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_worker_prestart": True,
                          "preload_python_modules": ["pipeline.preload"], "enable_metrics_collection": False}


def kept_workers(cpus: float, decode_cpus: float = Resources.decode_cpus) -> int:
    """Workers a node's raylet should keep alive while idle (Ray's `num_workers_soft_limit`): one per decode task its
    CPUs hold at once, plus 4 for a detector, writes and the planning task.

    Ray's default is one per CPU: while a node runs more workers than that, the raylet ends each that has been idle
    for a second (its worker pool's TryKillingIdleWorkers), and with decode tasks holding half a CPU and writes a
    tenth, a job's next task then waits for a fresh worker, which imports Ray Data again. benchmarks/idle_workers.py
    (a model that finds nothing: the pipeline's pace, as on a GPU; 1250 frames, 2 CPUs): `fpn run` started 11-12
    workers and took 41.1 s (median of 3), with these 7 and 34.8 s (0.85x); with 16-frame segments 9-10 and 39.1 s,
    4-5 and 32.4 s (0.83x). A detector-bound job (`trees`) ran as fast either way. cluster/ starts its worker nodes
    with the same rule."""
    return math.ceil(cpus / decode_cpus) + 4


def _embedded_system_config() -> dict[str, Any]:
    """EMBEDDED_SYSTEM_CONFIG with the workers kept for the CPUs the embedded node gets, unless
    RAY_num_workers_soft_limit is set (a system config would override it: the user's own setting wins, and
    benchmarks/idle_workers.py sets Ray's default so)."""
    if "RAY_num_workers_soft_limit" in os.environ:
        return dict(EMBEDDED_SYSTEM_CONFIG)
    return {**EMBEDDED_SYSTEM_CONFIG, "num_workers_soft_limit": kept_workers(_node_cpus())}


def _node_cpus() -> float:
    """The CPUs `ray.init` gives a node it starts: Ray's own count, a container's CPU quota where there is one
    (os.cpu_count() counts the host's, and a 2-CPU pod on a 64-core host would keep 132 idle workers)."""
    try:
        from ray._private.utils import get_num_cpus

        return get_num_cpus(override_docker_cpu_warning=True)
    except (ImportError, TypeError):  # another Ray
        return os.cpu_count() or 1


_embedded = threading.Event()  # set while the local Ray that init_ray started in this process runs
_worker_env: dict[str, str] = {}  # the environment variables its processes started with
_ray_threads: list[threading.Thread] = []  # threads of this process that call Ray: stop_ray waits for them


def embedded_node() -> bool:
    """Whether this process runs on the local Ray node `init_ray` started (a fixed size: nothing scales it)."""
    return _embedded.is_set()


# Modules that `ray.init` imports only as it runs and that importing Ray Data imports too: imported before the two
# run side by side (init_ray's `alongside`), so that no module is imported on both threads at once (Ray Data's
# circular imports on two threads end in Python's import deadlock detection; pipeline/preload.py).
# tests/test_sizing.py checks that the two import nothing else in common.
RAY_INIT_IMPORTS = ("argparse", "ctypes.util", "gettext", "optparse", "ray._common.usage.usage_lib",
                    "ray._private.runtime_env.uv_runtime_env_hook", "ray._private.thirdparty.pynvml",
                    "ray.core.generated.usage_pb2")


def init_ray(address: str | None = None, alongside: Callable[[], Any] | None = None) -> None:
    """Join `address` (or RAY_ADDRESS), else start embedded local Ray (workers at the driver's priority; `stop_ray`
    stops it); no-op when already connected. `alongside`: run on a thread of its own while the embedded node
    starts (its exception raised here; after `ray.init` where Ray is joined): that start is mostly `ray.init`
    waiting for the node's processes (the first driver's registration waits for the workers the node starts
    ahead), and the CLI imports Ray Data meanwhile (benchmarks/startup_overlap.py: `overlap`, 0.85 of the wall
    time of a job on one image on an H200 node, medians of 5)."""
    import ray

    # joining a cluster (or joined): no node to wait for
    if alongside is None or ray.is_initialized() or address or os.environ.get("RAY_ADDRESS"):
        _init_ray(ray, address)
        if alongside is not None:
            alongside()
        spend_actor_restart_warning()
        return
    for name in RAY_INIT_IMPORTS:
        importlib.import_module(name)
    failed: list[BaseException] = []

    def run_alongside():
        try:
            alongside()
        except BaseException as e:  # noqa: BLE001 - raised on the caller's thread below
            failed.append(e)

    thread = threading.Thread(target=run_alongside, name="fpn-beside-ray-init", daemon=True)
    thread.start()
    try:
        _init_ray(ray, address)
    finally:
        thread.join()
    if failed:
        raise failed[0]
    spend_actor_restart_warning()  # its imports (pydantic, ...) not beside Ray Data's on the other thread


def _init_ray(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        check_address(address)
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # the node's processes start with the CPU detectors' malloc settings (fpn_model.memory), so its workers
        # have them too: a detector then needs no runtime_env of its own and takes one of the workers Ray starts
        # with the node instead of a fresh process (pipeline.plan.build_dataset)
        env = keep_freed_memory_env()
        with _ctrl_c_after():
            with _lean_local_node(), environ(env), _quiet_auth_notice():
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                         _system_config=_embedded_system_config())
            _worker_env.clear()
            _worker_env.update(env)
            _embedded.set()


@contextlib.contextmanager
def _ctrl_c_after():
    """Ctrl-C (SIGINT) on the main thread held until the block ends, then raised: one that interrupted `ray.init`
    left Ray half started, unknown to `stop_ray`, and the process ended in a segfault (exit 139, 3 of 5 runs
    stopped 1.5 s in) with the node's daemons orphaned for minutes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet_auth_notice():
    """While `ray.init` starts the embedded node: without Ray's warning that it turned token authentication on
    ("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out..."), the first
    line every local `fpn run` printed. The node is the run's own and is gone with it; token authentication stays
    on (Ray's default, a token made once in ~/.ray/auth_token). Ray's errors from that module still print."""
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = auth.level
    auth.setLevel(logging.ERROR)
    try:
        yield
    finally:
        auth.setLevel(level)


@contextlib.contextmanager
def _lean_local_node():
    """While `ray.init` starts the embedded one-node cluster: without the three Python daemons that serve only
    other clients of a cluster, its autoscaler monitor (a one-node local cluster has nothing to scale), its log
    monitor (streams workers' output to drivers: `log_to_driver` is off) and its API server (with the dashboard off
    it loads only the usage-stats module, and `ray.init` waits for it before it even starts the raylet).

    Measured on the 2-core node: `ray.init()` 4.2 -> 2.0 s, the cluster's processes 5.0 -> 3.0 core-seconds in
    their first 6 s, the start of a job's detector no longer competing with them. Its dashboard agent runs as in a
    minimal Ray install (`pip install ray` without the dashboard's dependencies): no HTTP server and no metrics
    export (no dashboard to serve, no Prometheus to scrape), and the driver does not import those dependencies to
    decide (0.26 s): `ray.init()` and a first task 2.3 -> 2.0 s (medians of 4). What stays: the GCS, the raylet,
    its dashboard and runtime-env agents, and the workers. `ray.init` has no options for these (`ray start` has
    some), so the switch is Ray's internals (Ray is pinned): if they move, this is a plain `ray.init()`. Set
    FPN_RAY_FULL_NODE=1 for Ray's full set (`ray status` against an embedded cluster needs the monitor).

    The raylet is started so that it waits for none of its agents before it starts workers and registers the node
    (`_raylet_without_waits`), and with at most PRESTART_WORKERS workers started ahead.
    """
    try:
        from ray._private import node, parameter, services, utils

        params_init = parameter.RayParams.__init__
        start_raylet = services.start_raylet
        utils.get_dashboard_dependency_error, node.Node.start_api_server  # all there, or none patched
        services.start_ray_process, services.RAYLET_EXECUTABLE
    except (ImportError, AttributeError) as e:
        log.debug("Ray's daemons not trimmed: %s: %s", type(e).__name__, e)
        params_init = None
    if params_init is None or os.environ.get("FPN_RAY_FULL_NODE") == "1":
        yield
        return

    def no_api_server(self, **_):
        self._webui_url = None

    def without_monitors(self, *args, **kwargs):
        kwargs.setdefault("no_monitor", True)
        kwargs.setdefault("include_log_monitor", False)
        params_init(self, *args, **kwargs)

    def minimal_agent():
        return ImportError("the embedded node's dashboard agent runs minimal (jobs.runner._lean_local_node)")

    with patched(node.Node, "start_api_server", no_api_server), \
            patched(parameter.RayParams, "__init__", without_monitors), \
            patched(utils, "get_dashboard_dependency_error", minimal_agent), \
            patched(services, "start_raylet", _raylet_without_waits(services, start_raylet)):
        yield


# what the raylet would otherwise wait for its dashboard agent to write (a port file each)
_AGENT_PORTS = ("metrics_agent_port", "metrics_export_port", "dashboard_agent_listen_port")
# Workers the embedded node starts ahead, at most (Ray: one per CPU). What a small job needs at once (its probe task,
# its detector, a decode task, a GPU's memory question) is there; more start when a job asks for them. On a node of
# 16 CPUs, 16 workers importing Ray Data at once slowed the start of a job on one image (benchmarks/
# startup_overlap.py: `prestart4`, 0.80 of the wall time of 16 on an H200 node, medians of 2).
PRESTART_WORKERS = 4


def _raylet_without_waits(services, start_raylet):
    """`services.start_raylet`, with the raylet given the ports its agents would otherwise report in files that it
    waits for before it starts any worker or registers the node (and `ray.init` waits for that):

    - the dashboard agent's gRPC server, metrics export and HTTP server: -1 (none), which a minimal agent with
      metrics collection off (EMBEDDED_SYSTEM_CONFIG) runs none of. It writes the last of those files only once
      it has imported and loaded every dashboard module: 1 s of a 2-core node's start. Ray's Python passes no
      `--dashboard_agent_listen_port` to the raylet (a flag it has), so it is added to the raylet's command;
    - the runtime-env agent's port: a free one picked here (`_free_port`), as Ray picked its ports before its
      agents reported them, so that the raylet does not wait for that Python process to start (benchmarks/
      startup_overlap.py: `envport`, 0.79 of the wall time on an H200 node, medians of 2).

    and with at most PRESTART_WORKERS workers started ahead (`--num_prestart_python_workers`)."""

    def without_waits(*args, **kwargs):
        kwargs.update(dict.fromkeys(_AGENT_PORTS, -1))
        if not kwargs.get("runtime_env_agent_port"):
            kwargs["runtime_env_agent_port"] = _free_port()
        start_process = services.start_ray_process

        def start(command, *a, **kw):
            if command and command[0] == services.RAYLET_EXECUTABLE:
                command = [_fewer_prestarted(arg) for arg in command] + ["--dashboard_agent_listen_port=-1"]
            return start_process(command, *a, **kw)

        with patched(services, "start_ray_process", start):
            return start_raylet(*args, **kwargs)

    return without_waits


def _fewer_prestarted(arg: str) -> str:
    flag = "--num_prestart_python_workers="
    if arg.startswith(flag) and arg[len(flag):].isdigit():
        return f"{flag}{min(int(arg[len(flag):]), PRESTART_WORKERS)}"
    return arg


def _free_port() -> int:
    """A TCP port that no socket of this machine holds, below the kernel's range of ports for outgoing connections
    (so that none of the connections the node's processes open as it starts takes it before the agent binds it);
    any free port where that range is unknown."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    first = 20000  # above the worker ports of clusters `ray start` starts (10002-19999)
    for port in random.sample(range(first, low), min(50, low - first)) if low > first else []:
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def stop_ray() -> None:
    """Stop the embedded local Ray that `init_ray` started in this process, at once, once this process's threads
    that call Ray (`_ray_threads`) have ended; no-op otherwise (a cluster joined, or a Ray that someone else
    started).

    Left to Ray's exit hook, stopping takes 1.7 s after the last row of a job (2-core node): the hook sleeps 0.5 s,
    then stops Ray's processes one at a time, and its autoscaler monitor ignores SIGTERM for the whole second Ray
    allows before SIGKILL. The embedded cluster starts without that monitor (`_lean_local_node`); where it has one
    (FPN_RAY_FULL_NODE=1), it has nothing to finish, so it is killed first and `ray.shutdown()` stops the rest in
    Ray's order (0.4 s). The process list is Ray's internal (Ray is pinned): if it moves, this is a plain
    `ray.shutdown()`. Ray is not imported here (0.4 s) unless a run started it: a rerun with nothing new does not."""
    while _ray_threads:  # a Ray call after the shutdown ends the process (a job refused at once, say)
        _ray_threads.pop().join(30)
    if not _embedded.is_set():
        return
    _embedded.clear()
    _worker_env.clear()
    import ray

    try:
        from ray._private import ray_constants, worker

        for info in worker._global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
            info.process.kill()
            info.process.wait(1)
    except Exception as e:  # noqa: BLE001 - only quicker: ray.shutdown() stops the monitor too
        log.debug("Ray's monitor not stopped ahead: %s: %s", type(e).__name__, e)
    ray.shutdown()


def _settings_differ(record: dict[str, Any], identity: dict[str, Any]) -> str | None:
    """How the settings an output's record (`_job.json`) holds differ from `identity` ("field old -> new; ..."), or
    None."""
    previous = record.get("identity")
    return "; ".join(_identity_diff(previous, identity)) if previous and previous != identity else None


def _identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


class _Stop(KeyboardInterrupt):
    """SIGTERM (`fpn cancel`, `ray job stop`, kill) raised in the main thread, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Stop(f"signal {signal.Signals(signum).name}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def nvdec_note(plan: Plan) -> str | None:
    """For `video_backend: nvdec` on the machine the job runs on: why NVDEC cannot decode here, said once as a
    warning (and recorded in `_job.json`), or None."""
    if plan.video_backend != "nvdec":
        return None
    from pipeline.nvdec import nvdec_missing_here

    why = nvdec_missing_here()
    if why is None:
        return None
    note = f"nvdec unavailable: {why}; videos decode on the CPU with PyAV"
    log.warning(note)
    return note


def ask_batch(plan: Plan, cfg, *, calls: int) -> Callable[[], tuple[Plan, dict[str, Any] | None]]:
    """A function that returns `plan` with `batch_size: auto` decided (pipeline.sizing.auto_batch: by the memory of
    the GPU a detector gets, asked of the cluster now, its answer awaited when the function is called; on CPUs
    AUTO_BATCH_CPU), and what it was decided from, for `_job.json`."""
    if plan.batch_size != "auto":
        return lambda: (plan, None)
    r = plan.resources
    memory_answer = ask_detector_gpu_memory(r.gpus_per_detector) if r.gpus_per_detector else lambda: None

    def decided() -> tuple[Plan, dict[str, Any]]:
        memory = memory_answer()
        if r.gpus_per_detector and memory is None:
            log.warning("batch_size auto: no GPU told its memory within a minute; batch size of a CPU detector")
        mpx = model_input_mpx(cfg, plan.tile.size if plan.tile else None)
        n = auto_batch(memory, calls=calls, mpx=mpx, precision=r.precision)
        return dataclasses.replace(plan, batch_size=n), {"batch_size": n, "gpu_memory_gib": memory,
                                                          "model_input_mpx": round(mpx, 3), "calls": calls}

    return decided


def plan_sources(plan: Plan) -> list:
    """The sources `plan`'s inputs name, what a run reads: a directory's or a glob's files, a manifest's entries,
    STAC items (pipeline.sources.expand_inputs). Raises on a missing input."""
    return expand_inputs(list(plan.inputs), plan.storage_options, stac_asset=plan.stac_asset,
                         stac_bands=plan.asset_bands, stac_search=plan.stac_search)


def run(plan: Plan, *, address: str | None = None, job_id: str | None = None,
        alongside_ray: Callable[[], Any] | None = None, sources: list | None = None) -> dict[str, Any]:
    """Execute `plan`; returns the summary that `_job.json` also records (its `state` says how it ended).

    Raises before any work (nothing written) on a missing input or output bucket, an unreachable Ray address,
    resources the cluster cannot hold (pipeline.sizing.fit), an output held by a live writer (OutputBusyError)
    or written with other settings (OutputSettingsError, a ValueError naming what differs). `alongside_ray`: run
    while Ray starts (`init_ray`). `sources`: `plan_sources(plan)`, when the caller has them already (`fpn run`
    counts them in its first line)."""
    t0, began = time.monotonic(), time.time()
    check_address(address)
    sources = plan_sources(plan) if sources is None else sources
    check_output_location(plan.output, plan.output_options)
    cfg, _ = read_config(plan.checkpoint)
    model_input = read_input_spec(plan.checkpoint)
    raster = plan.raster_settings(model_input)  # the bands chosen fit the model, before any work
    with_masks = cfg.arch == "mask_rcnn"
    probe = Output(plan.output, plan.output_options)
    probe.lease(owner=job_id).check_free()  # a live writer: before Ray starts
    sources, young, ahead = _waiting(plan, sources, probe, began)
    _, digest = model_id(Path(plan.checkpoint))
    identity = plan.identity(digest)
    differences = _settings_differ(probe.read_job(missing_ok=True), identity)
    if differences and probe.has_frames():  # before Ray starts too (checked again under the lease)
        raise OutputSettingsError(plan.output, differences)
    job = _Job(plan, cfg, digest, identity, model_input, raster, job_id, t0, began,
               tuple(s.canonical for s in young), len(ahead))
    if not differences and (doc := _when_written(job, probe, sources)) is not None:
        return doc
    init_ray(address, alongside_ray)
    start = {"before_run": began - psutil.Process().create_time(), "ray": time.time() - began}
    decoder_note = nvdec_note(plan) if _embedded.is_set() else None
    sizing = fit(plan.resources, cluster_nodes())  # a request the cluster cannot hold fails here, not by hanging
    r = sizing.resources  # GPUs and detectors decided where the job left them open
    # unless told, the precision the checkpoint's evaluation chose for the detectors' device
    plan = dataclasses.replace(plan, resources=dataclasses.replace(
        r, precision=r.precision or default_precision(plan.checkpoint, r.device_type)))
    decide_batch = ask_batch(plan, cfg, calls=sizing.calls)  # a GPU's memory asked while the job plans
    # processes that every job starts, started now so that they start while it plans and not beside the detectors
    if not _embedded.is_set():
        _ray_threads.append(start_ray_data_helpers())
    counter = FrameCounter()
    with probe.lease(owner=job_id) as lease:
        previous = probe.read_job(missing_ok=True)
        differences = _settings_differ(previous, identity)
        if differences:
            if probe.has_frames():
                raise OutputSettingsError(plan.output, differences)
            # runs before wrote no frame (a run that failed at its start, or only error rows): nothing to keep
            # consistent, and this run re-attempts everything their error rows name (removed when it completes)
            log.warning("%s holds no frames yet: this run's settings replace the earlier run's (%s)",
                        plan.output, differences)
        out = probe.as_run(previous.get("runs", 0) + 1)
        removed = out.clean_temporary()
        if removed:
            log.info("removed %d temporary files left by killed writers", removed)
        doc = job.record(plan, previous, lease, out, len(sources))
        doc["resources"] = {**sizing.as_record(), "precision": plan.resources.precision}
        if decoder_note:
            doc["video_backend_note"] = decoder_note
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            out.write_job(doc)
            read = {s.canonical for s in sources}  # a changed one too: its error row is this run's
            out.recall_errors(read)  # before any error row of this run: a failure recorded is not written again
            sources, recorded, left = _skip_changed(out, sources, replace=plan.changed_sources == "replace")
            kept = {src for src in left if recorded[src]["left_run"] != out.run}  # their rows are earlier runs'
            done = frozenset(out.done_ids())
            planned = plan_work(plan, raster, out, sources, recorded)
            if planned.probed:  # what the probes found: a later run plans these sources from the record
                out.write_sources({**recorded, **{src: {**recorded.get(src, {}), **found}
                                                  for src, found in planned.probed.items()}})
            units = planned.units
            doc.update(_plan_record(plan, planned, done, left))
            plan, batch_record = decide_batch()
            if batch_record:
                doc["spec"] = plan_to_dict(plan)
                doc["resources"]["batch_size_auto"] = batch_record
            start["planned"] = time.time() - began
            doc["startup_s"] = _rounded(start)
            out.write_job(doc)
            try:
                with Watchdog(out, plan.resources, detected=counter.total), quiet_actor_init_deaths(), \
                        one_node_execution() if _embedded.is_set() else contextlib.nullcontext():
                    written = execute(plan, out, units, done, planned=doc["planned_frames"],
                                      fence=lease.record["token"], with_masks=with_masks, threads=sizing.threads,
                                      calls=sizing.calls, counter=counter, worker_env=dict(_worker_env))
                device_errors = counter.events("device_lost")  # each restarted a detector, up to a limit
            finally:
                counter.close()
            doc["min_rows_per_file"] = written["rows_per_file"]
            doc["duplicate_rows_removed"] = written["rows_removed"]  # 0 unless a frame reached the output twice
            doc["core_ms_per_frame"] = written["core_ms_per_frame"]  # CPU time by stage: decode, transfer, ...
            doc["work_units_written_before"] = written["units_written_before"]  # not run again
            doc["startup_s"] = _rounded({**start, **{k.removeprefix("t_"): t - began
                                                   for k, t in written["times"].items()}})
            if device_errors:
                doc["device_errors"] = device_errors
            if plan.video_backend == "nvdec" or written["nvdec_frames"]:  # of this run's frames written
                doc["frames_decoded_on_gpu"] = written["nvdec_frames"]
            # this run re-attempted everything they named of its sources; all of them, when its settings replaced
            counts, state = _complete(out, doc, None if differences else read, kept=kept, with_masks=with_masks)
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                state = "interrupted" if lease.lost else "cancelled"
            else:
                state = "failed"
            cause = None if isinstance(e, KeyboardInterrupt) else detector_start_error(e)
            if cause:
                said = str(cause)
            elif not isinstance(e, KeyboardInterrupt):
                said = one_line(e)
            elif lease.lost:
                said = "another writer took the output's lease over"
            else:  # _on_sigterm's "signal SIGTERM", or Ctrl-C's bare KeyboardInterrupt
                said = f"stopped by {e}" if str(e) else "stopped by Ctrl-C (SIGINT)"
            doc.update(state=state, error=redact_text(said), wall_s=round(time.monotonic() - t0, 2),
                       finished_at=_now())
            if not lease.lost:
                out.write_job(doc)  # the state first: SIGTERM may be followed by SIGKILL within seconds
                doc.update(_safe_counts(out))
                out.write_job(doc)
            if cause:
                raise cause from e
            raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        if counts["frames"] == len(done) and (work := _last_work(previous)):  # no frame written: not this one
            doc["last_work"] = work
        _ended(out, doc, counts, state, t0=t0, new_frames=counts["frames"] - len(done))
    return doc


def _waiting(plan: Plan, sources: list, probe: Output, now: float) -> tuple[list, list, list]:
    """`sources` split into those this run reads and those left for a later one (`plan.min_age_s`: written since,
    or dated after `now`; `pipeline.sources.settled`), and of those, the ones dated after `now`. A source the
    output knows as it is now (size and version as recorded: read when it was older, say, or by a run without the
    age) is read, not left: there is nothing of it to wait for."""
    sources, young = settled(sources, plan.min_age_s, now)
    if young:
        recorded = probe.read_sources()
        same = {s.canonical for s in young if (rec := recorded.get(s.canonical)) is not None
                and rec.get("left_run") is None and not Output.source_change(rec, s.size_and_version())}
        if same:
            sources = sorted(sources + [s for s in young if s.canonical in same], key=lambda s: s.canonical)
            young = [s for s in young if s.canonical not in same]
    ahead = ahead_of(young, now)
    if young:
        log.warning("%d input(s) not yet %g s old (min_age_s), left for a later run: %s%s", len(young),
                    plan.min_age_s, ", ".join(s.canonical for s in young[:3]), ", ..." if len(young) > 3 else "")
    if ahead:
        log.warning("%d of them dated after this machine's clock (%s, %.0f s ahead): wrong clocks? --min-age 0 "
                    "reads them", len(ahead), ahead[0].canonical, ahead[0].modified - now)
    return sources, young, ahead


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a run knows of its job before it takes the output's lease."""

    plan: Plan
    cfg: Any  # fpn_model.config.ModelConfig
    digest: str  # sha256 of the weights
    identity: dict[str, Any]
    model_input: Any  # fpn_model.weights.InputSpec
    raster: Any  # pipeline.raster.RasterSettings: `plan.raster_settings(model_input)`
    job_id: str | None
    t0: float  # time.monotonic() at the start
    began: float  # time.time() at the start
    young: tuple[str, ...] = ()  # sources written within `plan.min_age_s`: left for a later run
    ahead: int = 0  # of them, dated after this machine's clock

    def record(self, plan: Plan, previous: dict[str, Any], lease, out: Output, inputs: int) -> dict[str, Any]:
        """The start of the run's `_job.json` (`plan`: as it runs, with what Ray decided in it once Ray started)."""
        cfg = self.cfg
        doc: dict[str, Any] = {
            "job_id": self.job_id or previous.get("job_id"), "state": "running", "spec": plan_to_dict(plan),
            "identity": self.identity,
            "model": {"id": plan.model_id, "sha256": self.digest, "arch": cfg.arch, "backbone": cfg.backbone,
                      "neck": cfg.neck, "levels": list(cfg.levels), "class_names": list(cfg.class_names),
                      "input": dataclasses.asdict(self.model_input)},
            "versions": versions(), "inputs": inputs, "started_at": _now(), "runs": out.run,
            "lease": {k: lease.record[k] for k in ("owner", "host", "pid")},
        }
        if self.young:  # the first of them by name; a run over a camera's day may leave one file per camera
            doc["not_settled"] = {"sources": len(self.young), "min_age_s": plan.min_age_s,
                                  "first": list(self.young[:NOT_SETTLED_NAMED]), "dated_ahead": self.ahead}
        if lease.took_over:
            doc["took_over_from"] = {k: lease.took_over.get(k) for k in ("owner", "host", "pid", "heartbeat")}
        return doc


def _plan_record(plan: Plan, planned: Planned, done: frozenset[str], left: dict[str, str]) -> dict[str, Any]:
    """What `_job.json` says of the run's plan (and a line for each source with nothing to read); `left`: the
    changed sources it leaves, and their error rows' messages (`_skip_changed`)."""
    for src, why in planned.unread.items():
        log.warning("%s: %s", src, why)
    written = count_written(plan, planned.units, done)  # planned, and written by earlier runs
    return {"planned_frames": count_planned(plan, planned.units), "skipped_frames": written,
            "frames_outside_plan": len(done) - written,  # other inputs or sampling took them
            "rasters": raster_summary(planned.units),  # CRS, GSD and resampling of each; which have pixels only
            "nothing_read": planned.unread,  # sources the aoi or the time range misses, and why
            "work_units": len(planned.units),
            "inputs_known": planned.known,  # planned from what earlier runs recorded of them, not probed
            "changed_left": left}  # changed since their frames were written, not processed: an error row each


def _when_written(job: _Job, probe: Output, sources: list) -> dict[str, Any] | None:
    """The run's record when nothing is left to do: every source known to the output (`pipeline.known`: unchanged
    since an earlier run recorded its units) and every frame they plan written. A rerun over an archive with
    nothing new ends here, with no probe and no Ray: it read the listing, `_sources.parquet` and the frame ids
    (benchmarks/daily_rerun.py); so does a run whose every source was left for a later run (`min_age_s`). None:
    there is work, or a source to probe. That is seen first without the lease (and again under it): a run with work
    takes the lease once, and one taking it over from a writer that died records whom from (`took_over_from`). A
    source changed since its frames were written that an earlier run left so, and still at the version it saw, is
    left again (`_left_changed`): its row, of that run, stays; unless the run replaces changed sources
    (`_skip_changed`)."""
    plan = job.plan

    def known(output: Output) -> tuple[Planned | None, dict[str, str]]:
        recorded = output.read_sources()
        left = {} if plan.changed_sources == "replace" else _left_changed(sources, recorded)
        return plan_known(plan, job.raster, [s for s in sources if s.canonical not in left], recorded), left

    if not (sources or job.young) or (planned := known(probe)[0]) is None:
        return None
    if unwritten(plan, planned.units, frozenset(probe.done_ids())):
        return None
    with probe.lease(owner=job.job_id) as lease:
        previous = probe.read_job(missing_ok=True)
        if _settings_differ(previous, job.identity):  # another run replaced them meanwhile
            return None
        out = probe.as_run(previous.get("runs", 0) + 1)
        planned, left = known(out)
        done = frozenset(out.done_ids())
        if planned is None or unwritten(plan, planned.units, done):
            return None
        doc = job.record(plan, previous, lease, out, len(sources))
        doc.update(_plan_record(plan, planned, done, left), nothing_new=True,
                   work_units_written_before=len(planned.units),
                   startup_s=_rounded({"before_run": job.began - psutil.Process().create_time(),
                                       "planned": time.time() - job.began}))
        if last_work := _last_work(previous):
            doc["last_work"] = last_work
        # what a killed writer left: as every run that holds the lease, this one tidies it
        if removed := out.clean_temporary():
            log.info("removed %d temporary files left by killed writers", removed)
        doc["duplicate_rows_removed"] = drop_duplicates(out)["rows_removed"]
        counts, state = _complete(out, doc, {s.canonical for s in sources}, kept=set(left),
                                  with_masks=job.cfg.arch == "mask_rcnn")
        _ended(out, doc, counts, state, t0=job.t0, new_frames=0)
    return doc


# what `last_work` keeps of the last run that did work: when it ran, what it did, how fast, on what
_WORK_FIGURES = ("runs", "job_id", "state", "error", "started_at", "finished_at", "wall_s", "new_frames",
                 "frames_per_s", "planned_frames", "skipped_frames", "inputs", "inputs_known", "work_units",
                 "work_units_written_before", "resources", "startup_s", "core_ms_per_frame", "min_rows_per_file",
                 "duplicate_rows_removed", "device_errors", "frames_decoded_on_gpu", "video_backend_note")


def _last_work(previous: dict[str, Any]) -> dict[str, Any] | None:
    """The figures of the last run that did work, for the record of a run with nothing new or none written
    (`previous`: the record before it): that run's own, or the `last_work` such a run carried. Without it, one day
    with nothing new left no trace of how the archive's last work ran (its resources, rate, start); a run that only
    found a source changed (Ray started, 0 frames) stood for it ("0 new frames, 0.00 frames/s")."""
    if previous.get("nothing_new") or (previous.get("new_frames") == 0 and "last_work" in previous):
        return previous.get("last_work")
    work = {k: previous[k] for k in _WORK_FIGURES if k in previous}
    if "new_frames" not in work and "frames" in previous:  # a run that stopped, or recorded before new_frames
        work["new_frames"] = (previous["frames"] - previous.get("skipped_frames", 0)
                              - previous.get("frames_outside_plan", 0))
    return work or None


def _complete(out: Output, doc: dict[str, Any], read: set[str] | None, *, kept: set[str],
              with_masks: bool) -> tuple[dict[str, int], str]:
    """The output's counts and the state of a run that went through all its work, having read the sources `read`
    (None: all, as when its settings replaced an earlier run's): earlier runs' error rows of those are gone, but
    for failures it met again (`Output.settle_errors`), and of `kept`, changed sources an earlier run left as they
    still are (its SourceChanged row stays, and is this run's error too: one of its inputs)."""
    # the state is this run's: an earlier run's error about a source it did not read is kept, and counted
    doc["errors_of_other_inputs"] = out.settle_errors(read, keep=kept)
    counts = out.counts()
    if counts["frames"] == 0:  # every input failed or nothing was sampled: frames/ still holds the schema
        out.write_empty_frames(with_masks=with_masks)
    return counts, final_state(frames=counts["frames"], errors=counts["errors"] - doc["errors_of_other_inputs"])


def _ended(out: Output, doc: dict[str, Any], counts: dict[str, int], state: str, *, t0: float,
           new_frames: int) -> None:
    """Record the end of a run that went through all its work."""
    wall = time.monotonic() - t0
    doc.update(state=state, wall_s=round(wall, 2), new_frames=new_frames,
               frames_per_s=round(new_frames / wall, 3) if wall else None, finished_at=_now(), **counts)
    doc["decoded_per_sampled"] = round(counts["decoded_frames"] / counts["frames"], 3) if counts["frames"] else None
    out.write_job(doc)


class DetectorStartError(RuntimeError):
    """The detectors could not start (their model, its device): the cause, in one line."""


def detector_start_error(e: BaseException) -> DetectorStartError | None:
    """A DetectorStartError naming why a detector actor died in its `__init__` (a checkpoint or plugin that does not
    load, a GPU torch cannot use, ...), when that is what ended the execution: Ray Data raises it as an
    ActorDiedError, whose message holds the actor's whole traceback, and retries nothing."""
    died = actor_init_death(e)
    if died is None:
        return None
    lines = [ln.strip() for ln in str(died.error_msg).splitlines() if ln.strip()]
    return DetectorStartError(f"the detector could not start: {lines[-1] if lines else died.error_msg}")


def _rounded(start: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in start.items()}


def _safe_counts(out: Output) -> dict[str, int]:
    try:
        return out.counts()
    except Exception as e:  # noqa: BLE001 - the state is recorded even when the output cannot be counted
        log.warning("cannot count %s: %s", out.url, e)
        return {}


def _skip_changed(out: Output, sources: list, *,
                  replace: bool = False) -> tuple[list, dict[str, dict], dict[str, str]]:
    """Sources that changed (size or version) since an earlier run wrote frames of them become error rows: the
    frames here are of the old version. Each is recorded as left at the version seen (`pipeline.known.left_at`), so
    that later runs leave it too without a row of their own (this one's stays) and, with nothing else new, end
    without Ray (`_when_written`); one that changes again is reported again, one changed back is processed as
    before. With `replace`, their frames are removed instead (a source left earlier too), and they are processed
    again. Records size and version of each source read afresh (of a replaced one, once its old frames are gone:
    a run that dies before finds it changed again; what was known of its old version goes). Returns the sources to
    process, the record of every source (`Output.read_sources`) as it is now, and the changed sources left, with
    their rows' messages."""
    recorded = out.read_sources()
    left = {} if replace else _left_changed(sources, recorded)
    current = {s.canonical: s.size_and_version() for s in sources if s.canonical not in left}
    differs = {src: why for src, cur in current.items()
               if src in recorded and (why := Output.source_change(recorded[src], cur))}
    stale = out.sources_with_frames(set(differs)) if differs else set()
    if replace and stale:
        dropped = out.drop_frames_of(stale)
        log.warning("%d source(s) changed since earlier runs (%s%s): their %d frames removed, to be processed again",
                    len(stale), ", ".join(sorted(stale)[:3]), ", ..." if len(stale) > 3 else "", dropped)
        stale = set()
    now = {src: {**recorded[src], **left_at(current[src], out.run)} for src in stale}
    for src in sorted(stale):
        left[src] = _changed_message(src, recorded[src], differs[src])
        out.write_errors([error_row(src, "probe", left[src], error_type="SourceChanged")], f"changed:{src}")
    now.update({src: {**cur, "first_run": out.run} for src, cur in current.items()
                if (src not in recorded or src in differs) and src not in stale})
    # left earlier, and back at the version its frames are of: no longer left
    now.update({src: {**recorded[src], **dict.fromkeys(LEFT_FIELDS)} for src in current
                if src not in now and recorded.get(src, {}).get("left_run") is not None})
    if now:
        recorded = {**recorded, **now}
        out.write_sources(recorded)
    return [s for s in sources if s.canonical not in left], recorded, left


def _left_changed(sources: list, recorded: dict[str, dict]) -> dict[str, str]:
    """Of `sources`, those an earlier run left as changed and still at the version it saw
    (`pipeline.known.left_as_changed`), with their error rows' messages."""
    return {s.canonical: _changed_message(s.canonical, rec, why) for s in sources
            if (why := left_as_changed(s, rec := recorded.get(s.canonical)))}


def _changed_message(src: str, rec: dict[str, Any], why: str) -> str:
    """The message of the SourceChanged row of `src` (`rec`: its record), and how to process it."""
    return (f"{src} changed since run {rec.get('first_run')} ({why}): its frames here are of the old version; run "
            "with --replace-changed to process it again here, or write to a new output")
