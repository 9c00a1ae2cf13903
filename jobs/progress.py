"""One progress bar for a local `fpn run` or `fpn resume`: frames written / planned, frames/s, ETA, errors.

The counts come from the output itself (`pipeline.output.Output.progress`: the job record and the Parquet
footers, no row read), polled from a daemon thread while the run executes in the main thread, so what the
bar shows is what `fpn status` would say. tqdm draws it (rate and ETA over the frames written since the plan
was known, so frames skipped by a resume do not inflate the rate). Ray Data's own per-operator progress
lines go away while the bar is up (`quiet_ray_data`); `fpn -v run` keeps them.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import IO, Any

from tqdm import tqdm

from pipeline.output import Output

__all__ = ["RunProgress", "quiet_ray_data"]

log = logging.getLogger(__name__)


def quiet_ray_data() -> None:
    """Turn off Ray Data's progress bars, its INFO lines and its issue detectors' advice on the console (its log
    file keeps them all)."""
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one-time "progress bars disabled" warning
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler):  # the console handler; the session's log file is not one
            h.setLevel(logging.WARNING)
            if not any(isinstance(f, _NoIssueAdvice) for f in h.filters):
                h.addFilter(_NoIssueAdvice())


class _NoIssueAdvice(logging.Filter):
    """Ray Data's issue detectors' warnings, kept off the console: every 30 s of a job, 12 lines per operator
    advising to call its functions with `memory=...` ("Operator 'Write' uses 306.8MiB of memory per worker ...,
    but Ray only requests 0.0B", "Operator 'MapBatches(Detector)' uses 2.9GiB ..."), over the progress bar, which
    an fpn user cannot act on: fpn sizes its actors itself (pipeline.sizing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("ray.data._internal.issue_detection")


class RunProgress:
    """`with RunProgress(output, storage_options): run(...)` shows the bar while the block runs."""

    def __init__(self, output: str, storage_options: dict | None = None, *, interval_s: float | None = None,
                 file: IO[str] | None = None):
        """`interval_s`: seconds between polls (default 1 on a terminal, 15 into a log file or pipe)."""
        self.out = Output(output, storage_options)
        self.file = file
        stream = file or sys.stderr
        self.interval_s = interval_s or (1.0 if stream.isatty() else 15.0)
        self.bar: tqdm | None = None  # drawn at the first poll (`_drawn`)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fpn-progress", daemon=True)
        self._runs_before: int | None = None  # the output's run count as this run starts (None: no record yet)

    def _drawn(self) -> tqdm:
        """The bar, drawn first at the first poll, not as the run starts: a run refused at once (an output another
        writer holds, or made with other settings) printed "planning: 0/?" twice above its error, once as it was
        made and once as it closed."""
        if self.bar is None:
            self.bar = tqdm(total=None, unit="frame", desc="planning", file=self.file, smoothing=0,
                            dynamic_ncols=True, bar_format="{desc}: {n_fmt}/{total_fmt} {bar} "
                                                           "[{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]")
        return self.bar

    def update(self, *, final: bool = False) -> None:
        """Poll the output once and redraw (`final`: the run has returned; its record is this run's unless it was
        refused before it wrote one, and then the earlier run's frames are not drawn: a rerun refused for other
        settings showed "frames: 32/32" above its refusal, as if it had run)."""
        p = self.out.progress()
        if final and p["runs"] == self._runs_before:
            if self.bar is not None:  # drawn while it was refused (a slow listing): it goes, as no job ran
                self.bar.leave = False
            return
        bar = self._drawn()
        done, planned = p["frames_done"], p["frames_planned"]
        if planned is not None and bar.total is None and (final or p["state"] == "running"):
            # this run's plan is known (a record of an earlier run is not running): start the clock here, from
            # what earlier runs already wrote
            bar.reset(total=planned)
            bar.initial = bar.n = done
            bar.set_description_str("frames", refresh=False)
        elif bar.total is not None and done > bar.n:  # while planning, an earlier run's frames are no rate
            bar.update(done - bar.n)
        bar.set_postfix_str(f"{p['errors']} errors", refresh=False)
        if not final:
            bar.refresh()  # at the end, close() draws the last state once

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.update()
            except Exception as e:  # noqa: BLE001 - the bar never stops the job; the next poll tries again
                log.debug("progress poll of %s failed: %s", self.out.url, e)

    def __enter__(self) -> "RunProgress":
        try:
            self._runs_before = self.out.read_job(missing_ok=True).get("runs")
        except Exception as e:  # noqa: BLE001 - a torn record: the run says so
            log.debug("progress: %s has no readable record: %s", self.out.url, e)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)
        try:
            self.update(final=True)
        except Exception as e:  # noqa: BLE001
            log.debug("progress poll of %s failed: %s", self.out.url, e)
        if self.bar is not None:
            self.bar.close()
