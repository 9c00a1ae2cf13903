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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Fit", "fit", "cluster_nodes", "WRITE_CPUS"]

WRITE_CPUS = 0.1  # the reservation of each write task (I/O): pipeline.plan.execute


@dataclass(frozen=True)
class Fit:
    threads: int  # torch intra-op threads of each detector actor
    cpus: float  # the cluster's
    gpus: float
    nodes: int

    def as_record(self) -> dict[str, Any]:
        return {"detector_threads": self.threads, "cluster_cpus": self.cpus, "cluster_gpus": self.gpus,
                "cluster_nodes": self.nodes}


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _n(x: float) -> str:
    return f"{x:g}"


def fit(resources, nodes: list[dict[str, float]]) -> Fit:
    """Check `resources` (pipeline.plan.Resources) against `nodes` (`cluster_nodes()`); ValueError naming the
    numbers when the job could never run. Returns the detectors' thread count."""
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
        threads = max(1, math.floor(c))
    else:
        per_node = math.ceil(n / len(hosts))
        node_cpus = min(node["CPU"] for node in hosts)
        threads = max(1, round((node_cpus - d) / per_node))
    return Fit(threads=threads, cpus=cpus, gpus=gpus, nodes=len(nodes))
