"""What a benchmark's JSON says about when and on which code it was measured."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measured() -> dict[str, str | None]:
    """`measured_at` (local time with its offset) and `code` (`git describe --always --dirty` of this checkout;
    None outside git)."""
    try:
        code = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        code = None
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code": code}
