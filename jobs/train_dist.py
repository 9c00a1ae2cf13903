"""Distributed training with Ray Train: the same loop on N workers with DDP (gloo on CPU, nccl on GPU).

Each worker samples its own crops (seed + rank), gradients are averaged by DDP, rank 0 writes the
checkpoint (the project's safetensors format) into a directory that Ray Train persists; the driver
copies it to the requested output path.
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path

from fpn_model.train import TrainConfig

__all__ = ["train_distributed"]

log = logging.getLogger(__name__)


def _loop(config: dict) -> None:
    import ray.train
    import torch
    from ray.train.torch import prepare_model

    from fpn_model.data import load_annotations
    from fpn_model.train import build_model, lr_at, make_ema, make_optimizer, make_sampler, train_step
    from fpn_model.weights import save_checkpoint

    tc: TrainConfig = config["tc"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(tc.seed)  # same initial weights on every worker
    items = load_annotations(list(tc.train), single_class=tc.single_class)
    model = build_model(tc, items)
    sampler = make_sampler(tc, items, seed=tc.seed + rank)
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    opt = make_optimizer(ddp, tc)
    ema = make_ema(model, tc) if rank == 0 else None  # DDP keeps the replicas equal: one average suffices
    ddp.train()
    t0 = time.monotonic()
    losses: dict = {}
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step / tc.steps, step, tc)
        images, targets = sampler.batch(tc.batch_size)
        device = next(ddp.parameters()).device
        images = [i.to(device) for i in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = train_step(ddp, opt, images, targets, tc.clip)
        if ema is not None:
            ema.update_parameters(model)
        if (step + 1) % max(1, tc.steps // 10) == 0 and step + 1 < tc.steps:
            ray.train.report({"step": step + 1, **losses})
    metrics = {"step": tc.steps, "minutes": round((time.monotonic() - t0) / 60, 2), "workers": ctx.get_world_size(), **losses}
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(model if ema is None else ema.module, Path(d) / "model.safetensors", extra={"train": {"distributed": metrics}})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def _absolute(p: str) -> str:
    return p if "://" in p else str(Path(p).resolve())


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


def train_distributed(tc: TrainConfig, *, workers: int, address: str | None = None, use_gpu: bool = False,
                      storage_path: str | None = None) -> dict:
    """Train `tc` on `workers` Ray Train workers; writes `tc.output` and returns the final metrics."""
    from ray.train import RunConfig, ScalingConfig

    from .runner import init_ray

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # workers run elsewhere (another directory, another node): hand them absolute paths
    tc = dataclasses.replace(tc, train=tuple(_absolute(p) for p in tc.train), val=tuple(_absolute(p) for p in tc.val),
                             init=tc.init and _absolute(tc.init))
    init_ray(address)
    storage = storage_path or tempfile.mkdtemp(prefix="fpn-train-")
    try:
        trainer = _trainer_class()(
            _loop,
            train_loop_config={"tc": tc, "threads": tc.threads or 1},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage, name=f"fpn-train-{int(time.time())}"),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"distributed training ended without a checkpoint: {result.error}")
        out = Path(tc.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as d:
            shutil.copyfile(Path(d) / "model.safetensors", out)
    finally:
        if storage_path is None:  # Ray Train's copy of the checkpoint, in a directory made here: the output has it
            shutil.rmtree(storage, ignore_errors=True)
    return {"checkpoint": str(out), **(result.metrics or {})}
