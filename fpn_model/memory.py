"""Malloc settings for processes that run forward passes on a CPU (torch-free, so planning code can read them).

A forward pass allocates and frees the same large tensors every batch. By default glibc's malloc serves each
one above 32 MB with a fresh mmap whose pages the kernel faults in and zeroes again: a million page faults and
about a second of system time per batch of 4 frames of 800 px (torchvision's mobilenet_v3 FPN). Kept, they are
reused: the same results, less time, and the process's resident memory stays at its peak between batches.

Two ways to get there, the same settings (mmap and trim thresholds raised to 1 GB and 2 GB, one arena):
- `keep_freed_memory()`: mallopt in a running process. It cannot move threads that have already allocated off
  their own arenas, and a non-main arena serves allocations of 64 MB and more by mmap whatever the threshold.
  Enough for a process whose forward runs on its main thread (`fpn eval`, benchmarks).
- `keep_freed_memory_env()`: the same as glibc's environment variables, for a process started with them. A Ray
  actor runs its calls on a thread Ray made before any of our code ran: measured in a detector actor without
  them, 3.5 million page faults and 20% of a core in system time for 250 frames of 512 px, 10x the bare model's.

`FPN_KEEP_FREED_MEMORY=0` turns both off. Off glibc (or off Linux) both do nothing.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory", "keep_freed_memory_env"]

# each setting: glibc's environment variable, its mallopt parameter number, the value
_SETTINGS = (("MALLOC_MMAP_THRESHOLD_", -3, 1 << 30), ("MALLOC_TRIM_THRESHOLD_", -1, (1 << 31) - 1),
             ("MALLOC_ARENA_MAX", -8, 1))

_KEEPING_MEMORY = False


def _wanted() -> bool:
    return os.environ.get("FPN_KEEP_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux")


def keep_freed_memory() -> bool:
    """Have this process's malloc keep freed memory for the next allocation instead of handing it back to the
    system at once. Process-wide and one-way. Returns whether it is in effect (False off glibc)."""
    global _KEEPING_MEMORY
    if _KEEPING_MEMORY:
        return True
    if not _wanted():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    _KEEPING_MEMORY = all(mallopt(param, value) for _, param, value in _SETTINGS)
    return _KEEPING_MEMORY


def keep_freed_memory_env() -> dict[str, str]:
    """The environment variables that give a process `keep_freed_memory()`'s settings from its first malloc, on
    every thread ({} when turned off); glibc reads them at start-up, other allocators ignore them."""
    if not _wanted():
        return {}
    return {name: str(value) for name, _, value in _SETTINGS}
