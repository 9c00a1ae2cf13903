"""What a benchmark's JSON says about when and on which code it was measured."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_of(tree: Path = REPO) -> str | None:
    """`git describe --always --dirty` of the checkout at `tree` (a `--before` tree too); None outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=tree, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def measured() -> dict[str, str | None]:
    """`measured_at` (local time with its offset) and `code` (`code_of` this checkout)."""
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code_of()}
