"""What folding frozen batch norms into their convolutions (fpn_model.predict.fold_norms) does on a CPU, side by
side in one process: for each precision, the Predictor as it is against the same Predictor without folding,
calls alternating (6 rounds after a warm-up, order swapped each round), on the street scenario
(benchmarks/street_inputs.py: torchvision's MobileNetV3 FPN imported, 768x576 frames; a batch of 4 at 512 px,
2 threads). Reports the median seconds per call and their ratio, the largest difference between the two paths'
detections, and, over 40 frames, how many of the exact path's confident detections (score >= 0.5) each path
keeps (same label, IoU >= 0.9): the Predictor folds on the approximate paths (int8, bf16), not on the exact one.

    .venv/bin/python benchmarks/fold_norms.py [--inputs DIR] [--out benchmarks/results/fold_norms.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _meta import measured  # benchmarks/ is this script's directory

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=Path, help="a directory with street.avi and mobilenet_v3_fpn.safetensors "
                    "(benchmarks/street_inputs.py; made in a temporary directory if not given)")
    ap.add_argument("--precisions", nargs="+", default=["exact", "int8", "bf16"])
    ap.add_argument("--scale", type=float, default=0.8889, help="576 -> 512 px")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fold_norms.json")
    a = ap.parse_args()
    import torch

    import fpn_model.predict as fp
    from forward_inputs import video_frames
    from fpn_model.weights import load_checkpoint
    from gpu import agreement
    from street_inputs import street_inputs

    torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory()
    if a.inputs:
        video, ckpt = a.inputs / "street.avi", a.inputs / "mobilenet_v3_fpn.safetensors"
    else:
        video, ckpt = street_inputs(Path(tmp.name))
    model = load_checkpoint(str(ckpt), scale=a.scale)
    frames, many = video_frames(str(video), 4, 10), video_frames(str(video), 40, 20)
    fold = fp.fold_norms

    def predictor(precision: str, folded: bool):
        fp.fold_norms = lambda m: 0  # the Predictor's own rule off: this script folds where it is asked to
        try:
            p = fp.Predictor(model, precision=precision)
        finally:
            fp.fold_norms = fold
        return p, (fold(p.model) if folded else 0)

    def run(p, inputs) -> list:
        return [d for k in range(0, len(inputs), 4) for d in p(inputs[k:k + 4])]

    exact_ref = run(predictor("exact", False)[0], many)
    result = {}
    for precision in a.precisions:
        (plain, _), (folded, norms) = predictor(precision, False), predictor(precision, True)
        both = {False: plain, True: folded}
        for p in both.values():
            p(frames)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(6):
            for k in ((False, True) if r % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                both[k](frames)
                times[k].append(time.perf_counter() - t0)
        diffs = [fp.detection_difference(x, y) for x, y in zip(plain(frames), folded(frames))]
        med = {k: statistics.median(v) for k, v in times.items()}
        result[precision] = {
            "norms_folded": norms, "unfolded_s": round(med[False], 3), "folded_s": round(med[True], 3),
            "ratio": round(med[True] / med[False], 3),
            "spread_s": {"unfolded": [round(min(times[False]), 3), round(max(times[False]), 3)],
                         "folded": [round(min(times[True]), 3), round(max(times[True]), 3)]},
            # None where a frame's detections differ in number (no box-for-box difference then)
            "largest_box_rel_difference": None if any(d["count"][0] != d["count"][1] for d in diffs) else
            max(d["box_rel"] for d in diffs),
            "frames_with_other_counts": sum(d["count"][0] != d["count"][1] for d in diffs),
            "of_exact_confident": {"unfolded": agreement(exact_ref, run(plain, many)),
                                   "folded": agreement(exact_ref, run(folded, many))},
        }
        print(precision, json.dumps(result[precision]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"what": __doc__.splitlines()[0], "scale": a.scale, "batch": 4, "threads": 2,
                                 "torch": torch.__version__, "results": result, **measured()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
