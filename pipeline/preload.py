"""What each worker of the embedded node imports as it starts, before any work reaches it (Ray's
`preload_python_modules`: jobs.runner.EMBEDDED_SYSTEM_CONFIG), so that a job's first calls do not wait for it:
`pipeline.plan` (the planning task's module and the detector class's) and Ray Data, which every Ray Data task and
actor imports on its first call (0.6 s on the 2-core node).

Both on the worker's main thread, before it takes a task (the planning task waits 0.5-0.7 s for a worker, where
it waited 0.25-0.35 s with Ray Data imported on a thread of its own). Not on a thread: a task that reaches the
worker mid-import imports Ray Data too, from its arguments, and Ray Data's circular imports on two threads at once
end in Python's import deadlock detection ("KeyError: 'ray.data'" in the task; jobs failed so on a 16-CPU node).
"""
import importlib

importlib.import_module(f"{__package__}.plan")
importlib.import_module("ray.data")
