"""Fit a plan's resource requests to the cluster before any work, and size the detectors' torch threads.

Ray schedules by reservations, and a request the cluster cannot hold does not fail: the tasks wait forever
("backpressured"), silently. So a job checks, once Ray is up, that its detector actors, one decode task and the
writer fit the cluster's CPUs and GPUs (and that one detector fits on one node), and fails with one line naming
the numbers otherwise.

Threads are not reservations: a detector reserving 1 CPU of a 2-core node would run 1 torch thread while the
other core idles between decodes. On CPU, each detector gets the cores of its node that decoding does not
reserve, shared among the detectors that node will hold: `round((node CPUs - decode_cpus) / detectors per node)`,
at least 1 (a decode task runs beside the model; the OS shares the cores while it does). A GPU detector keeps
the floor of its CPU reservation (its CPU work is pre- and post-processing).

An autoscaling pool (`max_detectors`) is checked and sized at its minimum, `num_detectors`: the actors Ray Data
adds later start where the cluster has room (GPUs that join), and on CPU nodes share the cores sized for the
minimum.

A CPU detector runs several batches at once, each on its own thread with its share of the torch threads: the
largest divisor of its threads up to MAX_CALLS (2 threads: 2 batches of 1 thread). One batch over all threads
stops at every parallel region's barrier whenever another process (Ray's daemons, the decoder, the driver)
takes one of its cores, and its serial parts leave the other cores idle; batches side by side do not wait for
each other (benchmarks/throughput.py, `fpn` against `fpn_1call`: 2 calls of 1 thread against 1 of 2 threads).
MAX_CALLS bounds the activations held at once (one batch's each). A GPU detector runs GPU_CALLS batches at once,
each on its own CUDA stream (fpn_model.predict.Predictor): one batch's host work (copying frames in, building rows)
overlaps the other's kernels (benchmarks/gpu.py measures 1 against 2).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Fit", "fit", "decide", "cluster_nodes", "WRITE_CPUS", "MAX_CALLS", "GPU_CALLS", "AUTO_BATCH_CPU",
           "auto_batch", "model_input_mpx", "gpu_memory_gib", "ask_detector_gpu_memory"]

WRITE_CPUS = 0.1  # the reservation of each write task (I/O): pipeline.plan.execute
MAX_CALLS = 4  # most batches a CPU detector runs at once
GPU_CALLS = 2  # batches a GPU detector runs at once

# `batch_size: auto` (a job's frames per detector call). On a GPU: as many frames as GPU_MEMORY_SHARE of the
# detector's GPU memory holds, for each of its calls in flight, at most AUTO_BATCH_MAX. Measured on an H200
# (benchmarks/gpu.py, torchvision's R50-FPN, 1080p frames at 800 px = 1.07 Mpx model input, 100 detections a
# frame): peak memory 4.2 GiB at batch 8 and 8.1 at 16 in fp32 (0.49 GiB a frame), 3.9 and 7.0 in bf16 (0.38);
# frames/s grew 4% from batch 8 to 16 (fp32), so 16 is the most worth holding. On a CPU: AUTO_BATCH_CPU.
GIB_PER_MPX = {"exact": 0.5, "bf16": 0.4, "fp16": 0.4}  # GPU memory per model-input megapixel, a frame
GPU_MEMORY_SHARE = 0.6  # of a detector's GPU memory, for activations (the rest: weights, CUDA's own, others)
AUTO_BATCH_MAX = 16
AUTO_BATCH_CPU = 8


@dataclass(frozen=True)
class Fit:
    threads: int  # torch intra-op threads of each detector actor, shared by its calls
    cpus: float  # the cluster's
    gpus: float
    nodes: int
    calls: int = 1  # batches each detector runs at once, on threads // calls torch threads each
    resources: Any = None  # the job's pipeline.plan.Resources with what it left open decided

    def as_record(self) -> dict[str, Any]:
        return {"num_detectors": self.resources.num_detectors, "gpus_per_detector": self.resources.gpus_per_detector,
                "detector_threads": self.threads, "detector_calls": self.calls, "cluster_cpus": self.cpus,
                "cluster_gpus": self.gpus, "cluster_nodes": self.nodes}


def decide(resources, nodes: list[dict[str, float]]):
    """`resources` with the detectors' device and count decided where the job left them open: 1 GPU each on a
    cluster with GPUs (one detector per GPU), else the CPU and one detector; an autoscaling pool starts at most
    at its `max_detectors`."""
    r = resources
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    g = r.gpus_per_detector if r.gpus_per_detector is not None else (1.0 if gpus >= 1 else 0.0)
    n = r.num_detectors
    if n is None:
        n = max(1, int(gpus / g + 1e-9)) if g else 1
        n = min(n, r.max_detectors or n)
    return dataclasses.replace(r, gpus_per_detector=g, num_detectors=n)


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _n(x: float) -> str:
    return f"{x:g}"


def fit(resources, nodes: list[dict[str, float]]) -> Fit:
    """Check `resources` (pipeline.plan.Resources, what it leaves open decided first: `decide`) against `nodes`
    (`cluster_nodes()`); ValueError naming the numbers when the job could never run. Returns the detectors' thread
    count and calls, and the decided resources."""
    resources = decide(resources, nodes)
    n, c, g, d = resources.num_detectors, resources.cpus_per_detector, resources.gpus_per_detector, resources.decode_cpus
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    need = n * c + d + WRITE_CPUS
    if need > cpus + 1e-9:
        raise ValueError(f"the job needs {n} detector(s) x {_n(c)} CPU + {_n(d)} CPU per decode task + "
                         f"{_n(WRITE_CPUS)} CPU for writing = {_n(round(need, 3))} CPUs, and the cluster has "
                         f"{_n(cpus)}: lower num_detectors or cpus_per_detector (or decode_cpus)")
    if n * g > gpus + 1e-9:
        raise ValueError(f"the job needs {n} detector(s) x {_n(g)} GPU = {_n(n * g)} GPUs, and the cluster has "
                         f"{_n(gpus)}: lower num_detectors or gpus_per_detector")
    hosts = [node for node in nodes if node.get("CPU", 0.0) >= c - 1e-9 and node.get("GPU", 0.0) >= g - 1e-9]
    if not hosts:
        biggest = max(nodes, key=lambda node: (node.get("GPU", 0.0), node.get("CPU", 0.0)), default={})
        raise ValueError(f"one detector needs {_n(c)} CPU and {_n(g)} GPU, and the largest node has "
                         f"{_n(biggest.get('CPU', 0.0))} CPU and {_n(biggest.get('GPU', 0.0))} GPU")
    if g > 0:
        return Fit(threads=max(1, math.floor(c)), cpus=cpus, gpus=gpus, nodes=len(nodes),
                   calls=resources.calls_per_detector or GPU_CALLS, resources=resources)
    per_node = math.ceil(n / len(hosts))
    node_cpus = min(node["CPU"] for node in hosts)
    threads = max(1, round((node_cpus - d) / per_node))
    calls = resources.calls_per_detector or max(k for k in range(1, MAX_CALLS + 1) if threads % k == 0)
    return Fit(threads=threads, cpus=cpus, gpus=gpus, nodes=len(nodes), calls=calls, resources=resources)


def model_input_mpx(cfg, tile_size: int | None, frame: tuple[int, int] = (1080, 1920)) -> float:
    """Megapixels of the largest input the model `cfg` (fpn_model.config.ModelConfig) sees a frame as: a tile of
    `tile_size` at its fixed scale; else a `frame` (height, width: the job's frames are not known before they are
    probed) at its fixed scale; else torchvision's resize rule at its most (`min_size` x `max_size`)."""
    if cfg.scale is not None:
        h, w = (tile_size, tile_size) if tile_size else frame
        return h * w * cfg.scale ** 2 / 1e6
    if tile_size:
        return min(tile_size * tile_size, cfg.min_size * cfg.max_size) / 1e6
    return cfg.min_size * cfg.max_size / 1e6


def auto_batch(gpu_memory: float | None, *, calls: int, mpx: float, precision: str) -> int:
    """`batch_size: auto`: frames per call for a detector with `gpu_memory` GiB of GPU memory (None: on a CPU)
    running `calls` calls at once on inputs of `mpx` megapixels (see GIB_PER_MPX above)."""
    if gpu_memory is None:
        return AUTO_BATCH_CPU
    per_frame = GIB_PER_MPX.get(precision, GIB_PER_MPX["exact"]) * mpx
    return max(1, min(AUTO_BATCH_MAX, math.floor(GPU_MEMORY_SHARE * gpu_memory / (calls * per_frame))))


def gpu_memory_gib() -> float | None:
    """Total memory in GiB of the first GPU this process sees (nvidia-smi, which needs no torch; else torch's
    CUDA), None without one."""
    import os
    import subprocess

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return None
    cmd = ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"]
    if visible:
        cmd.insert(1, f"--id={visible.split(',')[0].strip()}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return round(float(out.stdout.split()[0]) / 1024, 2)  # MiB
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 2)


def ask_detector_gpu_memory(gpus_per_detector: float, timeout_s: float = 60.0) -> Callable[[], float | None]:
    """Ask the cluster, by a task holding what a detector holds of a GPU, for the GPU memory of one detector (its
    share of the GPU it gets); returns at once a function that waits for the answer: None when none came within
    `timeout_s` of the question (GPUs busy with other jobs). The job plans meanwhile: asked first, a job on one
    image on an H200 node took 1/0.85 of the time it took with a fixed batch size (benchmarks/startup_overlap.py:
    `batch8`, medians of 2)."""
    import ray

    task = ray.remote(gpu_memory_gib).options(num_gpus=gpus_per_detector, num_cpus=0, max_retries=0)
    ref, asked = task.remote(), time.monotonic()

    def answer() -> float | None:
        ready, _ = ray.wait([ref], timeout=max(0.0, timeout_s - (time.monotonic() - asked)))
        if not ready:
            ray.cancel(ref, force=True)
            return None
        total = ray.get(ref)
        return None if total is None else round(total * min(1.0, gpus_per_detector), 2)

    return answer
