"""What each worker of the embedded node imports as it starts, before any work reaches it (Ray's
`preload_python_modules`: jobs.runner.EMBEDDED_SYSTEM_CONFIG), so that a job's first calls do not wait for it.

- `pipeline.plan`, at once: the planning task's module and the detector class's;
- Ray Data (0.6 s on the 2-core node), on a thread of its own: every Ray Data task and actor imports it on its
  first call, but the planning task, which comes first, does not, and need not wait for it (a worker's preloads
  run before it takes any task: with Ray Data among them the planning task waited 0.5-0.7 s for a worker, with
  it on a thread 0.25-0.35 s).
"""
import importlib
import threading

importlib.import_module(f"{__package__}.plan")
threading.Thread(target=importlib.import_module, args=("ray.data",), name="fpn-preload", daemon=True).start()
