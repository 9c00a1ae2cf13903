"""Run a generator in a child process, with a deadline on each item and detection of a crashed child.

Why Ray's own task retries do not cover a decoder that hangs or crashes in native code:

- a hung task is never retried: Ray Data has no per-task or per-unit timeout, so a decoder stuck in a native
  call holds its operator, and the job, forever;
- a crash (SIGSEGV in a native decoder) kills the whole Ray worker; Ray retries the task, and when the crash
  persists (the same corrupt segment crashes every attempt) the retries run out and the whole dataset fails,
  not just the unit that crashed;
- a retried Ray task starts its unit over, so the frames it had already yielded are decoded and sent again.

`IsolatedChild` runs the work in a child process of the worker instead. The worker stays alive, waits at
most `timeout_s` for each item, kills and replaces a child that hangs or dies, and tells the caller which of the
two happened (`ChildTimeout`, `ChildCrashed`), so the caller can retry what is left or record an error and go on.
An ordinary exception in the child reaches the caller as `ChildError` with its type name and message.

The child is started with multiprocessing's "spawn" context (Ray workers are threaded: fork is unsafe), without
the parent's main module (`_spawning_without_main`), and is long-lived, reused across calls, so its start-up and
imports (`preload`) are paid once per worker process, not per call, and never count against `timeout_s`. One
message goes down per call and one comes up per item. It is a daemon (ended when its parent exits normally) and
it also exits by itself when its parent dies without cleaning up (a killed Ray worker), so no child outlives its
worker.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
import types
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Iterator, NoReturn

__all__ = ["IsolatedChild", "IsolationError", "ChildTimeout", "ChildCrashed", "ChildError", "process_child"]

log = logging.getLogger(__name__)

_ITEM, _DONE, _ERROR, _READY = "item", "done", "error", "ready"


class IsolationError(Exception):
    """The child hung or died: its work may succeed in a fresh child (`ChildTimeout`, `ChildCrashed`)."""


class ChildTimeout(IsolationError):
    """No item arrived within the deadline; the child was killed."""

    def __init__(self, timeout_s: float):
        super().__init__(f"no result within {timeout_s:g} s")
        self.timeout_s = timeout_s


class ChildCrashed(IsolationError):
    """The child died: killed by a signal (`signal_name`, e.g. SIGSEGV) or exited on its own."""

    def __init__(self, exitcode: int | None):
        self.exitcode = exitcode
        self.signal_name = _signal_name(-exitcode) if exitcode is not None and exitcode < 0 else None
        super().__init__(f"killed by {self.signal_name}" if self.signal_name else f"exited with code {exitcode}")


class ChildError(Exception):
    """An ordinary exception raised by the work in the child: its type name, message, formatted traceback and, for
    a video frame that cannot be decoded, its `frame_index` (the error row names it)."""

    def __init__(self, error_type: str, message: str, child_traceback: str = "", frame_index: int | None = None):
        super().__init__(message)
        self.error_type, self.message, self.child_traceback = error_type, message, child_traceback
        if frame_index is not None:
            self.frame_index = frame_index


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class IsolatedChild:
    """A long-lived child process that runs generator functions and streams their items back.

    Args:
        preload: modules the child imports when it starts (before the first deadline applies).
        start_timeout_s: longest wait for a fresh child to start and import `preload`.

    Not thread-safe: one call at a time (use `process_child` for one child per thread).
    """

    def __init__(self, *, preload: tuple[str, ...] = (), start_timeout_s: float = 120.0):
        self.preload, self.start_timeout_s = tuple(preload), start_timeout_s
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first call or after a kill)."""
        return self._proc.pid if self._proc is not None else None

    def stream(self, fn: Callable[..., Iterator[Any]], *args: Any, timeout_s: float, **kwargs: Any) -> Iterator[Any]:
        """Yield the items of `fn(*args, **kwargs)` run in the child. `fn` and its arguments are pickled (a
        module-level function). Raises `ChildTimeout` when no item (or the end) arrives within `timeout_s`,
        `ChildCrashed` when the child dies, `ChildError` when `fn` raises; after a timeout or crash, and when
        the caller stops early, the child is killed and the next call starts a fresh one."""
        if self._proc is None or not self._proc.is_alive():
            self.kill()  # reaps a child that died between calls (e.g. the kernel's OOM killer)
            self._start()
        finished = False
        try:
            try:
                self._conn.send((fn, args, kwargs))
            except OSError:  # it died just now
                self._crashed()
            while True:
                kind, payload = self._receive(timeout_s)
                if kind == _ITEM:
                    yield payload
                    continue
                finished = True
                if kind == _ERROR:
                    raise ChildError(*payload)
                return
        finally:
            if not finished:  # hung, crashed, or abandoned mid-stream: its pipe holds unread items
                self.kill()

    def kill(self) -> None:
        """End the child at once (SIGKILL); the next call starts a fresh one."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if proc is not None:
            proc.kill()
            proc.join(10)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Let the child exit on its own (it ends when its pipe closes); kill it if it does not."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
                proc.join(10)

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_child_main, args=(child_end, self.preload), daemon=True, name="fpn-isolated")
        with _spawning_without_main():
            proc.start()
        child_end.close()
        self._proc, self._conn = proc, parent_end
        log.info("started isolated child %d (preload %s)", proc.pid, ", ".join(self.preload) or "nothing")
        try:
            kind, payload = self._receive(self.start_timeout_s)
        except IsolationError:
            self.kill()
            raise
        if kind == _ERROR:
            self.kill()
            raise ChildError(*payload)

    def _receive(self, timeout_s: float) -> tuple[str, Any]:
        """The next message, or ChildTimeout / ChildCrashed (the child is then killed and reaped)."""
        if not self._conn.poll(timeout_s):  # a dead child's closed pipe polls ready, so this is a real hang
            self.kill()
            raise ChildTimeout(timeout_s)
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._crashed()

    def _crashed(self) -> NoReturn:
        """The pipe closed under us: reap the child and raise ChildCrashed with how it ended."""
        proc = self._proc
        proc.join(10)
        exitcode = proc.exitcode
        self.kill()
        raise ChildCrashed(exitcode)


@contextlib.contextmanager
def _spawning_without_main():
    """Spawn a child that does not run the parent's main module again. multiprocessing's spawn imports it in the
    child (as `__mp_main__`) so that functions defined there can be unpickled; the child here runs module-level
    functions of importable modules only, and in a Ray worker the main module is Ray's `default_worker.py`, whose
    imports (all of Ray) were 0.5 core-seconds of every decoding child's start. While the child is started (the
    parent pickles what it needs then), `__main__` is an empty module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _child_main(conn: multiprocessing.connection.Connection, preload: tuple[str, ...]) -> None:
    """The child's loop: one call per message received, its items sent back one message each."""
    _exit_with_parent()
    try:
        for name in preload:
            importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        _send(conn, (_ERROR, _describe(e)))
        return
    _send(conn, (_READY, None))
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:  # the parent closed its end: nothing more to do
            return
        _send(conn, _run(conn, fn, args, kwargs))


def _run(conn, fn, args, kwargs) -> tuple[str, Any]:
    """Send each item of `fn(*args, **kwargs)`; return the closing message (done, or the error)."""
    try:
        for item in fn(*args, **kwargs):
            _send(conn, (_ITEM, item))
    except Exception as e:  # noqa: BLE001 - any failure of the work goes to the parent
        return _ERROR, _describe(e)
    return _DONE, None


def _send(conn, message: tuple[str, Any]) -> None:
    """Pickle, then write: a pickling error is raised before any byte is written (the pipe stays usable)."""
    data = ForkingPickler.dumps(message)
    try:
        conn.send_bytes(data)
    except OSError:  # the parent is gone
        os._exit(0)


def _describe(e: BaseException) -> tuple[str, str, str, int | None]:
    from .storage import first_line

    return type(e).__name__, first_line(e), traceback.format_exc(), getattr(e, "frame_index", None)


def _exit_with_parent() -> None:
    """Exit as soon as the parent dies, even while the main thread is stuck in native code: a daemon child is
    ended only when its parent exits normally, and a killed Ray worker does not."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_local = threading.local()


def process_child(preload: tuple[str, ...] = ()) -> IsolatedChild:
    """This thread's shared child for `preload` (started on first use): a Ray worker runs its tasks one at a
    time, so this is one long-lived child per worker process, reused across tasks."""
    children = _local.__dict__.setdefault("children", {})
    key = tuple(preload)
    if key not in children:
        children[key] = IsolatedChild(preload=key)
    return children[key]
