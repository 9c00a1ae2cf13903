"""Imported by every worker of the embedded node in benchmarks/startup_overlap.py's `preload` variant (Ray's
`preload_python_modules`): the detector's module (torch, torchvision) on a thread of its own, so that the worker
takes tasks meanwhile and the detector actor, which starts after the job's plan, finds it imported."""
import importlib
import threading

threading.Thread(target=importlib.import_module, args=("pipeline.detect",), name="preload-detector", daemon=True).start()
