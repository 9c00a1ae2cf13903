"""Frames detected so far in a run: a Ray actor that the detector actors tell after each batch, and the runner's
watchdog reads (files land only when a bundle of `min_rows_per_file` frames is full). A module of its own that
imports nothing: the actor's process imports only this (pipeline.plan's decoders and rasterio cost it 0.4 s)."""
from __future__ import annotations

__all__ = ["FrameCounter", "frame_counter"]


class FrameCounter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


def frame_counter():
    """A `FrameCounter` actor of this job (no CPU reserved)."""
    import ray

    return ray.remote(num_cpus=0)(FrameCounter).remote()
