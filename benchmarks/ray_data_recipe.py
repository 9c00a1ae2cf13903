"""Ray Data's documented batch-inference pattern, as a user would write it for one of our checkpoints: the
baseline `fpn run` is measured against (benchmarks/throughput.py).

    read_videos -> map_batches(callable class, concurrency=K, num_cpus=C, batch_size=B * every_n) -> write_parquet

Sampling happens inside the class (every Nth `frame_index`), as the recipe has no sampling of its own; the model
is the checkpoint's eager torch module, called like a torchvision detector. Prints one JSON line:
{"frames", "detections", "wall_s", "init_s"} (wall_s from before `ray.init` to the last file written).

    python benchmarks/ray_data_recipe.py VIDEO OUT --checkpoint trees --scale 1.0 --every-n 10 --batch 4
"""
from __future__ import annotations

import argparse
import json
import time


class Detect:
    def __init__(self, checkpoint: str, scale: float, every_n: int, threads: int):
        import torch

        from fpn_model.weights import load_checkpoint
        from fpn_model.zoo import resolve

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_checkpoint(resolve(checkpoint), scale=scale).eval()
        self.every_n = every_n

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        keep = batch["frame_index"] % self.every_n == 0
        frames = batch["frame"][keep]
        images = [torch.from_numpy(f).permute(2, 0, 1).float().div_(255) for f in frames]
        with torch.inference_mode():
            out = self.model(images) if images else []
        return {"frame_index": batch["frame_index"][keep],
                "num_detections": [len(o["boxes"]) for o in out],
                "boxes": [o["boxes"].numpy().ravel().tolist() for o in out],
                "scores": [o["scores"].numpy().tolist() for o in out]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("out")
    ap.add_argument("--checkpoint", default="trees")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--every-n", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="sampled frames per model call")
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the class")
    a = ap.parse_args()

    import ray

    t0 = time.monotonic()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.monotonic() - t0
    ds = ray.data.read_videos(a.video)
    ds = ds.map_batches(Detect, fn_constructor_kwargs=dict(checkpoint=a.checkpoint, scale=a.scale,
                                                           every_n=a.every_n, threads=a.threads),
                        batch_size=a.batch * a.every_n, concurrency=a.concurrency, num_cpus=a.num_cpus,
                        batch_format="numpy")
    ds.write_parquet(a.out)
    wall = time.monotonic() - t0
    t = ray.data.read_parquet(a.out).to_pandas()
    ray.shutdown()
    print(json.dumps({"frames": len(t), "detections": int(t["num_detections"].sum()), "wall_s": round(wall, 3),
                      "init_s": round(init_s, 3)}))


if __name__ == "__main__":
    main()
