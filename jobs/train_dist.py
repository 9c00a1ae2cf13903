"""Distributed training with Ray Train: `fpn_model.train.train` on N workers with DDP (gloo on CPU, nccl on GPU).

The driver reads the annotations, their images (training and validation) and the first weights (fresh, or
`--init`'s) once and hands them to the workers through Ray's object store; each rank trains on crops of its own,
DDP averages the gradients, the ranks validate together (each predicts and scores a share of the images and
views), and rank 0 sends its progress records and finally its checkpoints back to the driver through a Ray queue:
the driver prints the progress as a one-process `fpn train` does and writes the files where that would. So no
worker reads a file of the driver's and the driver reads none of theirs: a cluster whose nodes share no filesystem
trains as one machine does. Ray Train's own checkpointing would need a `storage_path` every node can reach (S3,
NFS; a rank on another node fails its check of the driver's local directory), for files of tens of MB that Ray
carries as well.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from fpn_model.train import TrainConfig, TrainData, output_paths

__all__ = ["train_distributed"]

log = logging.getLogger(__name__)


def _loop(config: dict) -> None:
    import ray
    from ray.train.torch import prepare_model

    from fpn_model.train import train

    tc: TrainConfig = config["tc"]
    inbox = config["inbox"]  # to the driver: progress records, then the files rank 0 wrote
    if not tc.threads:  # train sets them; recorded in the summary's config: what each worker ran with
        tc = dataclasses.replace(tc, threads=_threads_per_worker())
    with tempfile.TemporaryDirectory() as d:
        summary = train(tc, log_fn=inbox.put, data=ray.get(config["data"]), write_to=d,
                        wrap=lambda m: prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}))
        if summary:  # rank 0: the files it wrote, by their names under tc.output
            files = {p.name: p.read_bytes() for p in output_paths(Path(d) / Path(tc.output).name)}
            inbox.put({"event": "done", "summary": summary, "files": files})


def _threads_per_worker() -> int:
    """torch threads for this training worker: its node's CPUs shared by the workers there. Ray starts a worker that
    reserves 1 CPU with OMP_NUM_THREADS=1, and torch follows it: a worker alone on a 16-CPU node (or each of 2 on a
    2-GPU node of 32 CPUs) used 1 core for its forward and backward passes and its crops' augmentation."""
    import ray
    import ray.train

    here = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == here), 1)
    return max(1, int(cpus // ray.train.get_context().get_local_world_size()))


def _has_dashboard() -> bool:
    """Whether the connected cluster runs Ray's dashboard (its address in the GCS), which serves the state API; True
    where that cannot be read (Ray Train's defaults then stay)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        return bool(_internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD))
    except Exception:  # noqa: BLE001 - another Ray's internals: keep its defaults
        log.debug("cannot tell whether the cluster runs a dashboard", exc_info=True)
        return True


def _trainer_class():
    """Ray Train's TorchTrainer; on a cluster without a dashboard (the embedded node, `ray start
    --include-dashboard=false`), less its placement-group cleaner. That detached actor asks the state API every
    second whether the run's controller still lives; with no dashboard each question first waits 40 s for the API
    server's address in the GCS (20 reads, 2 s apart) and then fails, so it can never clean anything, and the
    controller's stop of it times out after 12 s at the end of every run ("Failed to stop PlacementGroupCleaner
    gracefully", Ray 2.60; ray/train/v2/_internal/callbacks/placement_group_callback.py). Ray offers no switch for
    it, hence the override of the trainer's default callbacks (Ray Train v2; v1's trainer never calls it)."""
    from ray.train.torch import TorchTrainer

    if _has_dashboard():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def _check_room(workers: int, use_gpu: bool, have: dict) -> None:
    """Fail in one line where the local Ray node cannot hold the workers: Ray Train would wait for the resources
    for ever, printing nothing (a cluster may grow, so only the node `fpn` starts is checked)."""
    for name, need in (("CPU", workers), ("GPU", workers if use_gpu else 0)):
        if need > have.get(name, 0):
            raise ValueError(f"--workers {workers}{' --use-gpu' if use_gpu else ''} needs {need} {name}s (one per "
                             f"worker) and this machine's Ray has {have.get(name, 0):g}: use fewer workers, or "
                             "--address a cluster that has them")


def _relay(inbox, log_fn: Callable[[dict], None] | None, fit_over: threading.Event, done: dict) -> None:
    """Hand rank 0's progress records to `log_fn` as they come and keep its final record, until the training is
    over and the queue is empty (rank 0's puts return once the queue holds them, before `fit` can)."""
    from ray.util.queue import Empty

    while True:
        try:
            rec = inbox.get(timeout=0.5)
        except Empty:
            if fit_over.is_set():
                return
            continue
        if rec["event"] == "done":
            done.update(rec)
        elif log_fn is not None:
            log_fn(rec)


def train_distributed(tc: TrainConfig, *, workers: int, address: str | None = None, use_gpu: bool = False,
                      log_fn: Callable[[dict], None] | None = None) -> dict:
    """`fpn_model.train.train(tc)` on `workers` Ray Train workers: writes the same files and returns the same
    summary; `log_fn` gets rank 0's progress and validation records while it trains."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.util.queue import Queue

    from .runner import embedded_node, init_ray

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    data = TrainData.read(tc, first_weights=True)
    init_ray(address)
    if embedded_node():
        _check_room(workers, use_gpu, ray.cluster_resources())
    inbox = Queue(actor_options={"num_cpus": 0})
    storage = tempfile.mkdtemp(prefix="fpn-train-")  # Ray Train's record of the run, on this node (its controller's)
    fit_over, done = threading.Event(), {}
    relay = threading.Thread(target=_relay, args=(inbox, log_fn, fit_over, done), name="fpn-train-relay", daemon=True)
    try:
        trainer = _trainer_class()(
            _loop,
            train_loop_config={"tc": tc, "data": ray.put(data), "inbox": inbox},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, name=f"fpn-train-{int(time.time())}"),
        )
        relay.start()
        result = trainer.fit()
    finally:
        fit_over.set()
        if relay.is_alive():
            relay.join()
        inbox.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    if "summary" not in done:
        raise RuntimeError(f"distributed training ended without a checkpoint: {result.error}")
    for path in output_paths(tc.output):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(done["files"][path.name])
    return done["summary"]
