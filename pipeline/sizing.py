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
from dataclasses import dataclass
from typing import Any

__all__ = ["Fit", "fit", "decide", "cluster_nodes", "WRITE_CPUS", "MAX_CALLS", "GPU_CALLS"]

WRITE_CPUS = 0.1  # the reservation of each write task (I/O): pipeline.plan.execute
MAX_CALLS = 4  # most batches a CPU detector runs at once
GPU_CALLS = 2  # batches a GPU detector runs at once


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
