"""Validation in data-parallel training: `fpn_model.train.train` on 2 ranks (torch.distributed over gloo, a file
store: what a Ray Train worker runs, without Ray's start), this tree against `--before` (another source tree, e.g. a
`git worktree` of an older commit), alternating, each run once with validation and once without.

A run trains `--steps` steps of the bundled model on the aerial image and, with validation, validates once at the
end: `--val-images` copies of that image (a validation set of that many 400x400 images), each in its `--views`
flips/rotations. What validation costs a run = its wall time with validation minus
without, per rank 0 (the rank that scores and writes). Before the shared validation, rank 0 predicted every view
while rank 1 waited; now each rank predicts its share.

    .venv/bin/python benchmarks/ddp_validation.py --before /tmp/old --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _meta import REPO, code_of, measured

RANK = """
import datetime, json, sys, time
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fpn_model.config import preset
from fpn_model.train import TrainConfig, train
rank, store, out, xml, steps, views, threads, val = sys.argv[1:9]
rank = int(rank)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=600))
tc = TrainConfig(model=preset("trees"), train=(xml,), val=(val,) if val else (), single_class="Tree",
                 output=out, steps=int(steps), batch_size=1, crop=128, threads=int(threads), val_views=int(views),
                 eval_every=10**6)
dist.barrier()
t0 = time.perf_counter()
train(tc, wrap=lambda m: DistributedDataParallel(m, find_unused_parameters=True))
wall = time.perf_counter() - t0
dist.destroy_process_group()
print(json.dumps({"rank": rank, "wall_s": wall}))
"""


def one_run(tree: Path, args, val: str) -> float:
    """Rank 0's wall time of `train` on 2 ranks (both started together) with the code in `tree`."""
    with tempfile.TemporaryDirectory(prefix="ddpval-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), f"{tmp}/store", f"{tmp}/m.safetensors",
                                   str(args.xml), str(args.steps), str(args.views), threads, val],
                                  cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (0, 1)]
        done = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, done):
            if p.returncode:
                raise SystemExit(f"{tree}: a rank failed: {err[-2000:]}")
        return json.loads(done[0][0].strip().splitlines()[-1])["wall_s"]


def _describe(tree: Path) -> str:
    """`tree` and its commit (`git describe`), where it is a git checkout."""
    code = code_of(tree)
    return f"{tree} ({code})" if code else str(tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the source tree to compare against")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--val-images", type=int, default=4)
    ap.add_argument("--xml", default=str(REPO / "data" / "aerial-trees" / "SOAP_061.xml"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_validation.json"))
    args = ap.parse_args()
    trees = {"after": REPO, "before": Path(args.before).resolve()}
    rows = []
    val = Path(tempfile.mkdtemp(prefix="ddpval-set-"))  # the validation set: copies of the annotation, one image
    xml = Path(args.xml)
    (val / xml.with_suffix(".png").name).symlink_to(xml.with_suffix(".png"))
    for k in range(args.val_images):
        (val / f"{xml.stem}_{k}.xml").write_text(xml.read_text())
    try:
        for rep in range(args.reps):
            order = list(trees) if rep % 2 == 0 else list(reversed(trees))
            for name in order:
                with_val, without = one_run(trees[name], args, str(val)), one_run(trees[name], args, "")
                rows.append({"rep": rep, "tree": name, "with_val_s": round(with_val, 3),
                             "without_s": round(without, 3), "validation_s": round(with_val - without, 3)})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(val)
    med = {n: statistics.median(r["validation_s"] for r in rows if r["tree"] == n) for n in trees}
    ratios = [a["validation_s"] / b["validation_s"] for a in rows if a["tree"] == "after"
              for b in rows if b["tree"] == "before" and b["rep"] == a["rep"]]
    result = {**measured(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "before": _describe(trees["before"]), "ranks": 2, "steps": args.steps, "views": args.views,
              "val_images": args.val_images,
              "validation_s_median": {n: round(v, 3) for n, v in med.items()},
              "validation_ratio_per_rep": [round(r, 3) for r in ratios],
              "validation_ratio_median": round(statistics.median(ratios), 3), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("validation_s_median", "validation_ratio_median")}))


if __name__ == "__main__":
    main()
