"""Import torchvision without TorchDynamo: 1.2-1.7 s less in every process that loads a model (each detector
actor's start on a CPU node, `fpn eval`, `fpn train`).

torchvision's `torchvision.ops.roi_align` imports `torch._dynamo.utils.is_compile_supported` when it is imported,
and with it all of TorchDynamo (measured on a 2-core node: `import torch, torchvision` 2.9 s, of which TorchDynamo
1.25 s; the detector's forward never uses it). torchvision calls that function only when its compiled ops are
missing or deterministic algorithms run on a GPU. No option of torch or torchvision skips the import, so while
torchvision itself is imported, `torch._dynamo.utils` is a placeholder whose `is_compile_supported` imports the
real one when it is first called, and which imports the real module for any other name torchvision asks for
(then nothing is saved, nothing breaks). The placeholder is gone as soon as torchvision's import ends:
`torch.compile` and everything else import the real TorchDynamo as usual.

`install()` (run by `fpn_model/__init__.py`) only registers an import hook: it imports nothing, so torch-free
code (planning in the driver) stays torch-free. `FPN_IMPORT_DYNAMO=1` turns it off.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types

__all__ = ["install"]

_UTILS = "torch._dynamo.utils"


def _placeholder() -> types.ModuleType:
    module = types.ModuleType(_UTILS, "placeholder while torchvision imports (fpn_model._imports)")

    def is_compile_supported(device_type):
        from torch._dynamo.utils import is_compile_supported as real

        return real(device_type)

    def __getattr__(name: str):
        if name.startswith("__"):  # the import system probing (__path__, __spec__, ...): not a module attribute
            raise AttributeError(name)
        _remove(module)
        return getattr(importlib.import_module(_UTILS), name)

    module.is_compile_supported = is_compile_supported
    module.__getattr__ = __getattr__
    return module


def _remove(module: types.ModuleType) -> None:
    if sys.modules.get(_UTILS) is module:
        del sys.modules[_UTILS]


class _Loader(importlib.abc.Loader):
    """torchvision's own loader, with the placeholder in place while torchvision's `__init__` runs."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        importlib.import_module("torch")  # torch first: its own import is left as it is

        if _UTILS in sys.modules or "torch._dynamo" in sys.modules:  # already paid for
            return self.loader.exec_module(module)
        placeholder = _placeholder()
        sys.modules[_UTILS] = placeholder
        try:
            self.loader.exec_module(module)
        finally:
            _remove(placeholder)

    def __getattr__(self, name: str):  # resource readers and the like: torchvision's loader answers
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds torchvision once, through the rest of `sys.meta_path`, and wraps its loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Have the next import of torchvision skip TorchDynamo; no-op when torchvision is already imported or
    `FPN_IMPORT_DYNAMO=1`."""
    if "torchvision" in sys.modules or os.environ.get("FPN_IMPORT_DYNAMO") == "1" or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
