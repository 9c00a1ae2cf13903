"""Run the fault tests and print their outcomes as one table (issue 9): each bad input and fault, what the job
did, frames expected vs written, duplicates, errors recorded, secrets found, exit code.

    scripts/loopback-only .venv/bin/python benchmarks/fault_table.py
    FPN_FAULT_TABLE=/tmp/faults.jsonl make test && .venv/bin/python benchmarks/fault_table.py --rows /tmp/faults.jsonl

Writes benchmarks/results/faults.json and faults.md. The figures come from the tests' own assertions' inputs
(tests/faulttable.py), so the table is what the tests saw, not a second implementation of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_isolation.py", "tests/test_s3.py", "tests/test_cluster.py"]
COLUMNS = ["fault", "did", "expected", "written", "duplicates", "errors", "secrets_found", "exit_code"]


def main() -> int:
    if sys.argv[1:2] == ["--rows"]:  # rows recorded by a run of the tests already made
        rows, code = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()], None
    else:
        with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
            table = Path(f.name)
        env = {**os.environ, "FPN_FAULT_TABLE": str(table)}
        code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", *TESTS], cwd=REPO,
                              env=env).returncode
        rows = [json.loads(line) for line in table.read_text().splitlines()]
        table.unlink()
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps({"pytest_exit_code": code, "rows": rows}, indent=1) + "\n")
    cell = lambda v: "-" if v is None else str(v)  # noqa: E731
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "faults.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
