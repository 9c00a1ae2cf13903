"""The model zoo: checkpoints shipped with the package (`fpn_model/checkpoints/*.safetensors`) and named presets.

`resolve(name_or_path)` turns a zoo name (`trees`) or a path/URL into a local checkpoint path.
"""
from __future__ import annotations

import os
from pathlib import Path

from .weights import TORCHVISION_MODELS, file_sha256, is_plugin, model_file

__all__ = ["ZOO_DIR", "DEFAULT_MODEL", "bundled", "resolve", "model_id"]

ZOO_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_MODEL = "trees"


def bundled() -> dict[str, Path]:
    """Zoo name -> checkpoint path, for every checkpoint shipped in the package."""
    return {p.name.split(".")[0]: p for p in sorted(ZOO_DIR.glob("*.safetensors"))}


def resolve(name_or_path: str) -> Path:
    """Local path of a zoo name, an existing checkpoint file or a model plugin (`file.py:Class`, its file made
    absolute); FileNotFoundError otherwise."""
    zoo = bundled()
    if name_or_path in zoo:
        return zoo[name_or_path]
    p = model_file(os.path.expanduser(name_or_path))
    if p.is_file():
        return Path(f"{p.resolve()}:{name_or_path.rpartition(':')[2]}") if is_plugin(name_or_path) else p.resolve()
    if p.is_dir():
        raise IsADirectoryError(f"model {name_or_path!r}: a directory, not a checkpoint file (.safetensors)")
    if name_or_path in TORCHVISION_MODELS:
        raise FileNotFoundError(f"model {name_or_path!r}: a torchvision detector, to import first: fpn "
                                f"import-torchvision {name_or_path} {name_or_path}.safetensors, then -m that file")
    raise FileNotFoundError(
        f"model {name_or_path!r}: neither a bundled model ({', '.join(zoo) or 'none'}) nor an existing file"
    )


def model_id(path: Path) -> tuple[str, str]:
    """(`name@sha256-prefix`, full sha256) identifying a checkpoint (or a plugin by its file) in outputs."""
    digest = file_sha256(model_file(path))
    name = str(path).rpartition(":")[2] if is_plugin(path) else path.name.split(".")[0]
    return f"{name}@{digest[:12]}", digest
