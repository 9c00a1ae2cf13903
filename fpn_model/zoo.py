"""The model zoo: checkpoints shipped with the package (`fpn_model/checkpoints/*.safetensors`) and named presets.

`resolve(name_or_path)` turns a zoo name (`trees`) or a path/URL into a local checkpoint path.
"""
from __future__ import annotations

import os
from pathlib import Path

from .weights import file_sha256

__all__ = ["ZOO_DIR", "DEFAULT_MODEL", "bundled", "resolve", "model_id"]

ZOO_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_MODEL = "trees"


def bundled() -> dict[str, Path]:
    """Zoo name -> checkpoint path, for every checkpoint shipped in the package."""
    return {p.name.split(".")[0]: p for p in sorted(ZOO_DIR.glob("*.safetensors"))}


def resolve(name_or_path: str) -> Path:
    """Local path of a zoo name or an existing checkpoint file; FileNotFoundError otherwise."""
    zoo = bundled()
    if name_or_path in zoo:
        return zoo[name_or_path]
    p = Path(os.path.expanduser(name_or_path))
    if p.is_file():
        return p.resolve()
    raise FileNotFoundError(
        f"model {name_or_path!r}: neither a bundled model ({', '.join(zoo) or 'none'}) nor an existing file"
    )


def model_id(path: Path) -> tuple[str, str]:
    """(`name@sha256-prefix`, full sha256) identifying a checkpoint in outputs."""
    digest = file_sha256(path)
    return f"{path.name.split('.')[0]}@{digest[:12]}", digest
