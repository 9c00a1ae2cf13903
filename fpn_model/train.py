"""Training loop: random crops from annotated images, AdamW with warm-up and cosine decay.

`train(TrainConfig)` is the loop behind `fpn train`, in one process or on each rank of a data-parallel run (Ray
Train, jobs/train_dist.py: the same options either way). Progress goes to the `log` callback (the CLI prints it);
the best checkpoint by validation AP50 and the last one are written.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import ModelConfig
from .data import Annotated, CropSampler, load_annotations, read_image
from .detectors import build_detector
from .evaluate import aligned_to_model, mean_over_views, view_metrics, view_predictions
from .predict import Predictor, TileConfig
from .weights import load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "TrainData", "train", "train_step", "make_optimizer", "make_sampler", "make_ema", "build_model",
           "lr_at", "model_config_for", "output_paths"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    train: tuple[str, ...]
    val: tuple[str, ...] = ()
    output: str = "runs/model.safetensors"
    single_class: str | None = None
    steps: int = 2000
    minutes: float | None = None  # stop (and finish the cosine schedule) by wall-clock time instead
    batch_size: int = 8
    crop: int = 384
    scale_range: tuple[float, float] = (0.6, 1.4)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    clip: float = 10.0
    eval_every: int = 200
    threads: int | None = None
    seed: int = 0
    save_dtype: str = "float16"
    val_tile: int = 1024
    val_views: int = 8  # validation metrics averaged over the 8 flips/rotations (1: as given)
    init: str | None = None  # checkpoint whose weights start the training (fine-tuning)
    colour: float = 0.3
    grey: float = 0.1
    saturation_min: float | None = None  # lowest saturation factor of the colour jitter (default 1 - colour)
    rare: float = 0.0  # fraction of crops centred on the least saturated 5% of objects (CropSampler)
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); the average is
    #                   what is evaluated and saved

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("train: at least one annotation file or directory is required")
        for name in ("steps", "batch_size", "crop", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_dtype not in ("float16", "float32", "bfloat16"):
            raise ValueError(f"save_dtype must be float16, bfloat16 or float32, got {self.save_dtype!r}")
        if self.model.arch == "mask_rcnn":  # before any work: torchvision failed at the first step, in its words
            raise ValueError("arch=mask_rcnn: training reads boxes only (no instance masks from VOC or COCO "
                             "annotations); train faster_rcnn or retinanet, or import a torchvision Mask R-CNN "
                             "(fpn import-torchvision)")


def model_config_for(tc: TrainConfig, items: list[Annotated]) -> ModelConfig:
    """The model config with the training data's classes (label 0 = background, unused by RetinaNet)."""
    class_names = items[0].class_names
    return tc.model.replace(num_classes=len(class_names) + 1, class_names=class_names)


def build_model(tc: TrainConfig, items: list[Annotated], state: dict | None = None) -> nn.Module:
    """The detector to train: `state`'s weights where given, else fresh ones or `tc.init`'s (fine-tuning)."""
    model = build_detector(model_config_for(tc, items))
    if state is not None or tc.init:
        model.load_state_dict(state if state is not None else load_checkpoint(tc.init).state_dict())
    return model


@dataclass
class TrainData:
    """What `train` otherwise reads from `tc`'s paths: the annotations, their pixels `[H, W, 3]` uint8 (training
    and validation) and the first weights. A distributed worker gets it from its driver (jobs/train_dist.py), so
    that no worker reads the driver's files."""

    items: list[Annotated]
    images: list[np.ndarray]
    val_items: list[Annotated] = field(default_factory=list)
    val_images: list[np.ndarray] = field(default_factory=list)
    state: dict | None = None

    @classmethod
    def read(cls, tc: TrainConfig, *, first_weights: bool = False) -> TrainData:
        """`tc`'s annotations and images; with `first_weights`, also the model's first weights (fresh from
        `tc.seed`, or `tc.init`'s), which `train` otherwise makes itself."""
        items = load_annotations(list(tc.train), single_class=tc.single_class)
        val_items = load_annotations(list(tc.val), single_class=tc.single_class) if tc.val else []
        # labelled as the model's classes (the training data's), by name: its files number them their own way
        if val_items:
            val_items = aligned_to_model(val_items, model_config_for(tc, items), single_class=tc.single_class)
        state = None
        if first_weights:
            torch.manual_seed(tc.seed)
            state = build_model(tc, items).state_dict()
        return cls(items, [read_image(a.image_path) for a in items], val_items,
                   [read_image(a.image_path) for a in val_items], state)


def output_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """Where `train` writes: the best checkpoint (by validation AP50; the last without validation), the last one,
    and the summary JSON."""
    out = Path(output)
    return out, out.with_name(out.stem + ".last.safetensors"), out.with_suffix(".train.json")


def make_sampler(tc: TrainConfig, items: list[Annotated], *, seed: int, images: list | None = None) -> CropSampler:
    """`tc`'s crop sampler over `items` (their images read from their paths, unless given in memory)."""
    return CropSampler(items, images=images, crop=tc.crop, scale_range=tc.scale_range, colour=tc.colour, grey=tc.grey,
                       saturation_min=tc.saturation_min, rare=tc.rare, seed=seed)


def make_ema(model: nn.Module, tc: TrainConfig) -> AveragedModel | None:
    """The moving average of `model`'s weights that `tc.ema` asks for (update it after each step), or None."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema), use_buffers=True) if tc.ema else None


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)


def lr_at(progress: float, step: int, tc: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 1% over `progress` in [0, 1]."""
    warm = min(1.0, (step + 1) / tc.warmup)
    return tc.lr * warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images, targets, clip: float) -> dict[str, float]:
    losses = model(images, targets)
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()}: {({k: v.item() for k, v in losses.items()})}")
    opt.zero_grad(set_to_none=True)
    total.backward()
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return {"loss": total.item(), **{k: v.item() for k, v in losses.items()}}


def _rank0_weights(product: nn.Module, model: nn.Module) -> nn.Module:
    """Rank 0's `product` (its moving average of the weights, or the model) on every rank, for the ranks to
    validate it together: rank 0's own module there, elsewhere a copy of the rank's `model` given rank 0's
    parameters and buffers. A collective: every rank calls it at the same point."""
    weights = product if dist.get_rank() == 0 else copy.deepcopy(model)
    for t in weights.state_dict().values():
        dist.broadcast(t, src=0)
    return weights


def _merged_over_ranks(parts: dict) -> dict:
    """Every rank's `parts` (disjoint keys) merged, on every rank (a collective)."""
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, parts)
    return {k: v for share in shares for k, v in share.items()}


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (a collective: every rank calls it at the same step), so
    the losses a run prints are its whole batch's, not rank 0's crops'."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def _dtype(name: str) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def train(tc: TrainConfig, *, log_fn: Callable[[dict], None] | None = None, data: TrainData | None = None,
          wrap: Callable[[nn.Module], nn.Module] | None = None, write_to: str | Path | None = None) -> dict:
    """Train `tc.model` on `tc.train`; returns the summary (also written next to the checkpoint).

    Data-parallel where `torch.distributed` is initialised (a Ray Train worker, jobs/train_dist.py): every rank runs
    this loop on crops of its own (seed + rank), `wrap` makes the model a DDP replica, ranks agree on the progress of
    a `tc.minutes` budget so they take the same number of steps, they validate rank 0's weights together (each
    rank predicts and scores a share of the images and views; a long validation keeps no rank waiting), and rank 0
    alone averages the views, logs and writes (other ranks return an empty summary). `data`: what is otherwise read
    from `tc`'s paths (`TrainData.read`).
    `write_to`: a directory to write the files in, under `tc.output`'s names, instead of where `tc.output` says
    (the summary still names `tc.output`'s: a distributed worker's driver moves them there).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if data is None:
        data = TrainData.read(tc)
    torch.manual_seed(tc.seed + rank)
    model = build_model(tc, data.items, data.state)
    sampler = make_sampler(tc, data.items, images=data.images, seed=tc.seed + rank)
    val_items, val_images = data.val_items, data.val_images  # every rank validates a share
    del data
    trained = wrap(model) if wrap is not None else model  # a DDP replica wraps the model, which stays the weights
    device = next(trained.parameters()).device
    opt = make_optimizer(trained, tc)
    ema = make_ema(model, tc) if rank == 0 else None  # DDP keeps the replicas equal: one average suffices (the
    # other ranks validate rank 0's weights: _rank0_weights)
    product = ema.module if ema is not None else model  # the weights that are evaluated and saved
    named = output_paths(tc.output)
    best_path, last_path, summary_path = output_paths(Path(write_to) / named[0].name) if write_to else named
    history: list[dict] = []
    best = {"AP50": -1.0}
    start = time.monotonic()
    step = 0
    emit = (log_fn or (lambda rec: log.info("%s", rec))) if rank == 0 else (lambda rec: None)
    trained_as = {**_summary(tc), "workers": world}

    def progress() -> float:
        if tc.minutes is None:
            return step / tc.steps
        elapsed = torch.tensor((time.monotonic() - start) / (tc.minutes * 60), device=device)
        if distributed:  # the furthest rank's clock: all stop at the same step
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def validate() -> None:
        nonlocal best
        if not val_items:
            return
        weights = _rank0_weights(product, model) if distributed else product
        predictor = Predictor(weights, device=device, tile=TileConfig(size=tc.val_tile, overlap=tc.val_tile // 8))
        n = len(val_items)
        units = range(rank, n * tc.val_views, world)  # this rank's share of the (view, image)s
        predicted = view_predictions(predictor, val_items, views=tc.val_views, images=val_images, units=units)
        model.train()  # where it trains: a Predictor moves the model it is given to its device (and evaluates)
        per_view = view_metrics(_merged_over_ranks(predicted) if distributed else predicted, n,
                                range(rank, tc.val_views, world))  # each rank scores its share of the views
        if distributed:
            per_view = _merged_over_ranks(per_view)  # a few numbers a view
            if rank != 0:
                return
        metrics = mean_over_views(per_view)
        rec = {"step": step, "minutes": round((time.monotonic() - start) / 60, 2), **{k: round(v, 4) for k, v in metrics.items()}}
        history.append(rec)
        emit({"event": "eval", **rec})
        if metrics["AP50"] > best["AP50"]:
            best = rec
            save_checkpoint(product, best_path, dtype=_dtype(tc.save_dtype), extra={"val": rec, "train": trained_as})

    trained.train()
    while (done := progress()) < 1.0 and (tc.minutes is not None or step < tc.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(done, step, tc)
        images, targets = sampler.batch(tc.batch_size)
        if device.type != "cpu":
            images = [i.to(device) for i in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        t0 = time.monotonic()
        losses = train_step(trained, opt, images, targets, tc.clip)
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        if step % 20 == 0 or step == 1:  # the same steps on every rank
            if distributed:
                losses = _mean_over_ranks(losses, device)
            emit({"event": "step", "step": step, "lr": round(opt.param_groups[0]["lr"], 6),
                  "s_per_step": round(time.monotonic() - t0, 3), "elapsed_min": round((time.monotonic() - start) / 60, 2),
                  **{k: round(v, 4) for k, v in losses.items()}})
        if step % tc.eval_every == 0:
            validate()
    if step == 0 or step % tc.eval_every:  # not twice at the same step
        validate()
    if rank != 0:
        return {}
    save_checkpoint(product, last_path, dtype=_dtype(tc.save_dtype), extra={"train": trained_as})
    if not val_items:
        save_checkpoint(product, best_path, dtype=_dtype(tc.save_dtype), extra={"train": trained_as})
    summary = {"steps": step, "minutes": round((time.monotonic() - start) / 60, 2), "workers": world, "best": best,
               "history": history, "checkpoint": str(named[0]), "last": str(named[1]), "config": _summary(tc)}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _summary(tc: TrainConfig) -> dict:
    d = asdict(tc)
    d["model"] = tc.model.to_dict()
    return d
