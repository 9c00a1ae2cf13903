"""Test doubles that misbehave the way native decoders do: hang, or die of a signal.

The video decoders are real PyAV decoders (`pipeline.decode.PyAVVideo`) that hang or crash on one frame of a
video whose file name says so, and decode every other video normally. A job loads them through the plugin
backend "path/to/fakes.py:Class" (`pipeline.decode.open_video`): a file path, because Ray workers (and the
decoding child processes they spawn) do not have `tests/` on their Python path.

The generator functions are for `pipeline.isolate` directly; they are pickled by reference, which works
because a spawned child gets its parent's `sys.path` (and pytest puts `tests/` there).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.decode import PyAVVideo

FAKES = Path(__file__).resolve()
BAD_FRAME = 8  # the frame on which a "hang*" video hangs and a "crash*" video crashes
FOREVER_S = 3600.0  # far longer than any test's decode timeout


def backend(cls: type) -> str:
    """The `video_backend` value that makes a job decode with `cls` from this file."""
    return f"{FAKES}:{cls.__name__}"


class HangingVideo(PyAVVideo):
    """PyAV, except that a video named hang*.mp4 blocks for an hour when asked for frame BAD_FRAME."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bad = Path(path).name.startswith("hang")

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.bad and BAD_FRAME in indices:
            time.sleep(FOREVER_S)
        return super().frames(indices)


class CrashingVideo(PyAVVideo):
    """PyAV, except that a video named crash*.mp4 dies of SIGSEGV when asked for frame BAD_FRAME."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bad = Path(path).name.startswith("crash")

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.bad and BAD_FRAME in indices:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().frames(indices)


def count(n: int) -> Iterator[int]:
    yield from range(n)


def count_then_hang(n: int) -> Iterator[int]:
    yield from range(n)
    time.sleep(FOREVER_S)


def count_then_crash(n: int) -> Iterator[int]:
    yield from range(n)
    os.kill(os.getpid(), signal.SIGSEGV)


def count_then_raise(n: int) -> Iterator[int]:
    yield from range(n)
    raise KeyError("no such frame")


def pid() -> Iterator[int]:
    yield os.getpid()
