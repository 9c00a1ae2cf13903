"""Say so when a running job stops making progress, and which stage is starved.

Ray Data waits without a word when a stage cannot be scheduled or a task makes no progress. The watchdog polls
the output's own progress (`Output.progress`: the Parquet footers) and the frames the detectors report (`detected`:
files land only when a bundle of `min_rows_per_file` frames is full) from a daemon thread; when no frame has been
detected or written for `stall_s` seconds (FPN_STALL_WARN_S, default 300) it logs one warning, with the
cluster's free resources against what a decode task and a detector need, and again after each further `stall_s`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from pipeline.output import Output

__all__ = ["Watchdog", "diagnose", "stall_seconds"]

log = logging.getLogger(__name__)


def stall_seconds() -> float:
    return float(os.environ.get("FPN_STALL_WARN_S", "300"))


def diagnose(resources, free: dict[str, float], total: dict[str, float], quiet_s: float) -> str:
    """One line: which stage waits for what, from the cluster's free and total resources."""
    cpu, cpus = free.get("CPU", 0.0), total.get("CPU", 0.0)
    detectors, gpus_each = resources.num_detectors or 1, resources.gpus_per_detector or 0.0  # None: not yet decided
    head = f"no frame detected or written for {quiet_s:.0f} s"
    if cpu + 1e-9 < resources.decode_cpus:
        return (f"{head}: decoding is starved: {cpu:g} of {cpus:g} CPUs are free and a decode task needs "
                f"{resources.decode_cpus:g} (the detectors reserve {detectors * resources.cpus_per_detector:g}); "
                "lower cpus_per_detector or num_detectors")
    if gpus_each and free.get("GPU", 0.0) + 1e-9 < gpus_each and total.get("GPU", 0.0) + 1e-9 < detectors * gpus_each:
        return f"{head}: the detectors wait for GPUs ({free.get('GPU', 0.0):g} free of {total.get('GPU', 0.0):g})"
    return (f"{head} with {cpu:g} of {cpus:g} CPUs free: a decoder or the detector is slow or stuck (a hung decoder "
            "becomes an error row after decode_timeout_s)")


class Watchdog:
    """`with Watchdog(out, plan.resources): execute(...)`."""

    def __init__(self, out: Output, resources, *, stall_s: float | None = None,
                 cluster: Callable[[], tuple[dict, dict]] | None = None, detected: Callable[[], int] | None = None):
        self.out, self.resources, self.detected = out, resources, detected
        self.stall_s = stall_s or stall_seconds()
        self.cluster = cluster or _ray_resources
        self.warnings: list[str] = []
        self._done, self._since = -1, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fpn-watchdog", daemon=True)

    def check(self, now: float | None = None) -> str | None:
        """Poll once; the warning logged, if this poll found a stall."""
        now = time.monotonic() if now is None else now
        done = self.out.progress()["frames_done"] + (self.detected() if self.detected else 0)
        if done != self._done:
            self._done, self._since = done, now
            return None
        quiet = now - self._since
        if quiet < self.stall_s * (len(self.warnings) + 1):
            return None
        free, total = self.cluster()
        msg = diagnose(self.resources, free, total, quiet)
        self.warnings.append(msg)
        log.warning("%s", msg)
        return msg

    def _loop(self) -> None:
        while not self._stop.wait(min(30.0, self.stall_s / 4)):
            try:
                self.check()
            except Exception as e:  # noqa: BLE001 - the watchdog never stops the job
                log.debug("watchdog poll of %s failed: %s", self.out.url, e)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


def _ray_resources() -> tuple[dict, dict]:
    import ray

    return ray.available_resources(), ray.cluster_resources()
