"""Distributed training with Ray Train: the same loop on N workers with DDP (gloo on CPU, nccl on GPU).

The driver reads the annotations, their images and the starting weights (fresh, or `--init`'s) once and hands them
to the workers through Ray's object store; each worker samples its own crops (seed + rank), DDP averages the
gradients, and rank 0 sends its progress and then the finished checkpoint (the project's safetensors format) back to
the driver through a Ray queue: the driver prints the progress as a one-process `fpn train` does and writes the
checkpoint to the output path. So no worker reads a file of the driver's and the driver reads none
of theirs: a cluster whose nodes share no filesystem trains as one machine does. Ray Train's own checkpointing would
need a `storage_path` every node can reach (S3, NFS; a worker on another node fails its check of the driver's local
directory), for one file of tens of MB that Ray carries as well.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from fpn_model.train import TrainConfig

__all__ = ["train_distributed"]

log = logging.getLogger(__name__)


def _loop(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from fpn_model.detectors import build_detector
    from fpn_model.train import lr_at, make_ema, make_optimizer, make_sampler, model_config_for, train_step
    from fpn_model.weights import save_checkpoint

    tc: TrainConfig = config["tc"]
    inbox = config["inbox"]  # to the driver: progress records, then the checkpoint
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(tc.seed + rank)  # the heads' sampling of anchors and proposals, per worker as the crops are
    data = ray.get(config["data"])
    items = data["items"]
    model = build_detector(model_config_for(tc, items))
    model.load_state_dict(data["state"])  # the driver's weights: the same start on every worker
    sampler = make_sampler(tc, items, images=data["images"], seed=tc.seed + rank)
    del data
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    opt = make_optimizer(ddp, tc)
    ema = make_ema(model, tc) if rank == 0 else None  # DDP keeps the replicas equal: one average suffices
    ddp.train()
    start = time.monotonic()
    losses: dict = {}
    for step in range(1, tc.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at((step - 1) / tc.steps, step - 1, tc)
        images, targets = sampler.batch(tc.batch_size)
        device = next(ddp.parameters()).device
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        t0 = time.monotonic()
        losses = train_step(ddp, opt, images, targets, tc.clip)
        if ema is not None:
            ema.update_parameters(model)
        if rank == 0 and (step % 20 == 0 or step == 1):  # the records `fpn train` prints, as in one process
            inbox.put({"event": "step", "step": step, "lr": round(opt.param_groups[0]["lr"], 6),
                       "s_per_step": round(time.monotonic() - t0, 3),
                       "elapsed_min": round((time.monotonic() - start) / 60, 2),
                       **{k: round(v, 4) for k, v in losses.items()}})
    if rank == 0:
        metrics = {"step": tc.steps, "minutes": round((time.monotonic() - start) / 60, 2),
                   "workers": ctx.get_world_size(), **losses}
        with tempfile.TemporaryDirectory() as d:
            path = save_checkpoint(model if ema is None else ema.module, Path(d) / "model.safetensors",
                                   dtype=getattr(torch, tc.save_dtype), extra={"train": {"distributed": metrics}})
            inbox.put({"event": "checkpoint", "metrics": metrics, "checkpoint": path.read_bytes()})


def _driver_data(tc: TrainConfig) -> dict:
    """What every worker starts from: the annotations, their images `[H, W, 3]` uint8, and the model's first weights
    (fresh from `tc.seed`, or `tc.init`'s)."""
    import torch

    from fpn_model.data import load_annotations, read_image
    from fpn_model.train import build_model

    items = load_annotations(list(tc.train), single_class=tc.single_class)
    torch.manual_seed(tc.seed)
    return {"items": items, "images": [read_image(a.image_path) for a in items],
            "state": build_model(tc, items).state_dict()}


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


def _relay(inbox, log_fn: Callable[[dict], None] | None, fit_over: threading.Event, checkpoint: dict) -> None:
    """Hand the workers' progress records to `log_fn` as they come and keep the checkpoint record, until the
    training is over and the queue is empty (rank 0's puts return once the queue holds them, before `fit` can)."""
    from ray.util.queue import Empty

    while True:
        try:
            rec = inbox.get(timeout=0.5)
        except Empty:
            if fit_over.is_set():
                return
            continue
        if rec["event"] == "checkpoint":
            checkpoint.update(rec)
        elif log_fn is not None:
            log_fn(rec)


def train_distributed(tc: TrainConfig, *, workers: int, address: str | None = None, use_gpu: bool = False,
                      log_fn: Callable[[dict], None] | None = None) -> dict:
    """Train `tc` on `workers` Ray Train workers; writes `tc.output` and returns the final metrics. `log_fn` gets
    rank 0's progress records (`fpn_model.train.train`'s "step" records) while it trains."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.util.queue import Queue

    from .runner import init_ray

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    data = _driver_data(tc)
    init_ray(address)
    inbox = Queue(actor_options={"num_cpus": 0})
    storage = tempfile.mkdtemp(prefix="fpn-train-")  # Ray Train's record of the run, on this node (its controller's)
    fit_over, sent = threading.Event(), {}
    relay = threading.Thread(target=_relay, args=(inbox, log_fn, fit_over, sent), name="fpn-train-relay", daemon=True)
    try:
        trainer = _trainer_class()(
            _loop,
            train_loop_config={"tc": tc, "threads": tc.threads or 1, "data": ray.put(data), "inbox": inbox},
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
    if "checkpoint" not in sent:
        raise RuntimeError(f"distributed training ended without a checkpoint: {result.error}")
    out = Path(tc.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(sent["checkpoint"])
    return {"checkpoint": str(out), **sent["metrics"]}
