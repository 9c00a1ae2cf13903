"""Frames detected so far in a run, which the runner's watchdog reads (files land only when a bundle of
`min_rows_per_file` frames is full), and events the run's detectors count (`note`): kept in the cluster's key-value
store (Ray's GCS), not in an actor of its own.

Each detector process keeps its running total under a key of its own, one write per batch; `total()` sums the
keys of the run. An actor did this before: a Ray worker process of its own per job, 0.6 core-seconds of start
while the detectors start and ~1% of a core after (benchmarks/startup.py, on a 2-core node). The key-value
functions are Ray's `ray.experimental.internal_kv` (Ray is pinned)."""
from __future__ import annotations

import logging
import threading
import uuid

__all__ = ["FrameCounter"]

log = logging.getLogger(__name__)

NAMESPACE = "fpn-frames"


class FrameCounter:
    """Pickled into each detector actor; every copy that `add`s writes its own key under the run's prefix."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"{uuid.uuid4().hex}/"  # the run's
        self._key = f"{self.prefix}frames/{uuid.uuid4().hex}".encode()  # this copy's
        self._n = 0
        self._lock = threading.Lock()  # a detector runs batches on several threads

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def add(self, n: int) -> None:
        """Count `n` more frames; never raises: a count the watchdog misses must not fail a batch."""
        from ray.experimental.internal_kv import _internal_kv_put

        with self._lock:
            self._n += n
            try:
                _internal_kv_put(self._key, str(self._n).encode(), overwrite=True, namespace=NAMESPACE)
            except Exception as e:  # noqa: BLE001 - the next batch writes the running total again
                log.debug("frame count not recorded: %s: %s", type(e).__name__, e)

    def total(self) -> int:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

        return sum(int(_internal_kv_get(k, namespace=NAMESPACE) or 0)
                   for k in _internal_kv_list(f"{self.prefix}frames/", namespace=NAMESPACE))

    def note(self, event: str) -> int:
        """Count one `event` of the run (a detector that lost its device, `pipeline.detect`); returns how many the
        run has had, this one included. Unlike `add`, this raises when the store cannot be reached."""
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(f"{self.prefix}{event}/{uuid.uuid4().hex}".encode(), b"1", namespace=NAMESPACE)
        return self.events(event)

    def events(self, event: str) -> int:
        from ray.experimental.internal_kv import _internal_kv_list

        return len(_internal_kv_list(f"{self.prefix}{event}/", namespace=NAMESPACE))

    def close(self) -> None:
        """Remove the run's keys (a cluster outlives its jobs)."""
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.prefix, del_by_prefix=True, namespace=NAMESPACE)
