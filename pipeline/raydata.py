"""What a job changes in Ray Data's start-up and console, through Ray's internals (Ray is pinned at 2.60): each
piece is only quicker or quieter, and where the internals move it does nothing and Ray Data runs as it would by
itself.

- `start_ray_data_helpers`: on a cluster, Ray Data's helper actors started while the job plans, not beside the
  detectors;
- `one_node_execution`: on the embedded one-node cluster, without the four actors that serve only clusters of
  several nodes, the dashboard's metrics or telemetry;
- `quiet_actor_init_deaths`: an actor that died in its `__init__` is the caller's to report, in one line, not Ray
  Data's and Ray's on the terminal (an internal error's traceback, and each retry of a call to the dead actor);
- `spend_actor_restart_warning`: without the error line Ray's core worker prints as the detectors start.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import Iterator

from .storage import exception_chain

__all__ = ["start_ray_data_helpers", "one_node_execution", "quiet_actor_init_deaths", "actor_init_death", "environ",
           "patched", "spend_actor_restart_warning"]

log = logging.getLogger(__name__)


def start_ray_data_helpers() -> threading.Thread:
    """Start Ray Data's helper actors now, from a background thread, so that their processes start while the job
    plans. The first dataset a cluster executes starts them (execution statistics, actor locations and the
    autoscaling coordinator), each a new Python process importing ray.data, in the same seconds as the detector
    actors, which then wait for the CPU (a 2-core node: ~5 CPU-seconds of start-up at once). Ray Data looks them up
    by name and uses these. Returns the thread: Ray must not be shut down while it runs (a Ray call after
    `ray.shutdown()` ends the process). The embedded one-node cluster needs none (`one_node_execution`)."""
    def start() -> None:
        try:
            from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
            from ray.data._internal.execution.node_trackers.actor_location import (
                get_or_create_actor_location_tracker)
            from ray.data._internal.stats import get_or_create_stats_actor

            for create in (get_or_create_stats_actor, get_or_create_actor_location_tracker,
                           get_or_create_autoscaling_coordinator):
                create()
        except Exception as e:  # noqa: BLE001 - only a head start: Ray Data creates them when it needs them
            log.debug("Ray Data's helper actors not started ahead: %s: %s", type(e).__name__, e)

    thread = threading.Thread(target=start, name="fpn-ray-data-helpers", daemon=True)
    thread.start()
    return thread


_restart_warning_spent = False


def spend_actor_restart_warning() -> None:
    """Spend, out of sight, the line Ray's core worker prints once per process on the terminal the first time it
    creates an actor that may restart and takes an argument from the object store ("[... E ...] core_worker.cc:
    Actor with class name: 'MapWorker(MapBatches(Detector))' ... has constructor arguments in the object store and
    max_restarts > 0. If the arguments ... go out of scope or are lost, the actor restart will fail. See
    https://github.com/ray-project/ray/issues/53727"): every job printed it across its progress bar, `make demo`'s
    first. Ray Data hands every pool actor its transformer by reference and restarts them (a detector's restart is
    how a killed one loses nothing); the driver holds those references for the whole job, so they are not lost
    while an actor may need them. Ray has no setting for this line: an actor no node can place is created with
    the standard error sent to /dev/null for that call, and killed before anything schedules it. The line is
    still in the driver's log (python-core-driver-*.log). Once a process: a later call does nothing."""
    import ray

    global _restart_warning_spent
    if _restart_warning_spent or not ray.is_initialized():
        return
    _restart_warning_spent = True

    @ray.remote(max_restarts=1, num_cpus=0, resources={"fpn-never-placed": 1})
    class _Spent:
        def __init__(self, arg):
            pass

    ref = ray.put(None)
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        actor = _Spent.remote(ref)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    ray.kill(actor)


class _NoRemote:
    def remote(self, *args, **kwargs) -> None:
        return None


class _NoStats:
    """Stands in for Ray Data's statistics actor on the embedded node: the metrics sent to it go nowhere (Ray Data
    falls back on a random dataset id where it asks it for one)."""

    def __getattr__(self, name: str) -> _NoRemote:
        return _NoRemote()


class _NoLocations:
    """Stands in for Ray Data's actor-location tracker on one node: every actor is on it (Ray Data falls back on
    the location each actor reported when it started), so the updates go nowhere."""

    update_actor_location = _NoRemote()


@contextlib.contextmanager
def patched(owner, name: str, value) -> Iterator[None]:
    """`owner.name` (a module's or a class's attribute) set to `value` while the block runs."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def one_node_execution() -> Iterator[None]:
    """While it lasts, Ray Data executions in this process run as on one node that cannot grow (the embedded
    cluster): without four actors Ray Data would start for them, each a Python process that imports ray.data
    (0.75-1.5 CPU-seconds each on the 2-core node, in the seconds a job's detector starts), and the first of them
    in a worker that Ray started ahead, which the detector then finds taken:

    - the autoscaling coordinator, which asks Ray's autoscaler for nodes (a one-node local cluster has no
      autoscaler) and, until it answers, leaves the execution a budget of nothing (no task starts for about a
      second): a cluster autoscaler that reports the node's resources at once takes its place;
    - the actor-location tracker, which tells the actor pool on which node each actor runs (to route blocks and
      avoid draining nodes): there is one node;
    - the statistics actor, which gathers the execution's metrics for the dashboard (the embedded node has none);
      the detector took a fresh process while it held a prestarted worker (street job, 2-core node: its
      `__init__` ~2 s later);
    - the usage-collection actor, which gathers Ray Data's usage telemetry for Ray's usage stats
      (`RAY_DATA_USAGE_DISABLED`, unless the environment says otherwise)."""
    import ray

    with contextlib.ExitStack() as stack:
        try:
            from ray.data._internal import stats
            from ray.data._internal.cluster_autoscaler import ClusterAutoscaler
            from ray.data._internal.execution import streaming_executor
            from ray.data._internal.execution.interfaces.execution_options import ExecutionResources
            from ray.data._internal.execution.operators import actor_pool_map_operator as pool

            class FixedCluster(ClusterAutoscaler):
                """The cluster's resources, all of them this execution's, now and for good."""

                def __init__(self, *args, **kwargs):
                    self.total = ExecutionResources.from_resource_dict(ray.cluster_resources())

                def try_trigger_scaling(self) -> None:
                    pass

                def on_executor_shutdown(self) -> None:
                    pass

                def get_total_resources(self) -> ExecutionResources:
                    return self.total

            patches = ((streaming_executor, "create_cluster_autoscaler", FixedCluster),
                       (pool, "get_or_create_actor_location_tracker", _NoLocations),
                       (pool, "get_actor_locations", lambda ids: {}),
                       (stats, "get_or_create_stats_actor", _NoStats))
            for module, name, _ in patches:
                getattr(module, name)  # all there, or none patched
            for patch in patches:
                stack.enter_context(patched(*patch))
        except (ImportError, AttributeError) as e:
            log.debug("Ray Data's cluster helpers kept: %s: %s", type(e).__name__, e)
        if "RAY_DATA_USAGE_DISABLED" not in os.environ:
            stack.enter_context(environ({"RAY_DATA_USAGE_DISABLED": "1"}))
        yield


def actor_init_death(e: BaseException | None):
    """The `ActorDiedError` of an actor that died in its `__init__`, when `e` is one or was raised from one, else
    None (Ray Data retries nothing then: it fails the execution with it)."""
    from ray.exceptions import ActorDiedError

    return next((x for x in exception_chain(e)
                 if isinstance(x, ActorDiedError) and getattr(x, "actor_init_failed", False)), None)


class _ActorInitDeaths(logging.Filter):
    """Drops the records logged while an actor's death in its `__init__` is being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        handled = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return actor_init_death(handled) is None


_CREATION_TASK_DEATH = "died because of an error raised in its creation task"  # ray.exceptions.ActorDiedError's


def _quiet_retries_on_dead_actors() -> None:
    """From now on, this driver does not print the errors Ray publishes for each retry of a call to an actor that
    died in its `__init__` (Ray Data asks its actors where they run, with endless retries): each holds the actor's
    whole traceback (~50 lines), and the call never succeeds. Other errors Ray publishes to the driver (a worker
    killed for memory, a node lost, ...) still print. The listener thread looks the printer up on each message, so
    replacing it works at any time; without it (another Ray), nothing changes."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "quiet_on_dead_actors", False):
        return

    def print_to_stdstream(data, *args, **kwargs):
        if data.get("pid") == "raylet" and any(_CREATION_TASK_DEATH in str(ln) for ln in data.get("lines", ())):
            return
        printer(data, *args, **kwargs)

    print_to_stdstream.quiet_on_dead_actors = True
    worker.print_to_stdstream = print_to_stdstream


@contextlib.contextmanager
def quiet_actor_init_deaths() -> Iterator[None]:
    """While it lasts, Ray Data's console says nothing of an actor (a detector) that died in its `__init__`, and
    from then on the driver does not print Ray's error for each retried call to it; Ray Data's log file under the
    Ray session still has every record. Ray Data takes such a death for a bug of its own and prints ~80 lines, the
    actor's traceback inside its own, while the caller names the cause in one line
    (`jobs.runner.DetectorStartError`). Only the records logged while that exception is handled are dropped."""
    importlib.import_module("ray.data")  # its import configures its loggers, whose console handlers are filtered here

    try:
        from ray._private.log import PlainRayHandler
    except ImportError:  # another Ray: its console says what it says
        PlainRayHandler = ()

    _quiet_retries_on_dead_actors()
    quiet = _ActorInitDeaths()
    consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, PlainRayHandler)]
    for handler in consoles:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(quiet)


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """This process's environment with `env` added while the block runs (what the processes it starts inherit)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
