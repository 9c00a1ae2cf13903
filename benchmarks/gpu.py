"""The GPU path, measured: torchvision's eager forward against our Detector on the same host frames, the Detector
alone against `fpn run` end to end, start-up, precision against accuracy, rasters in Mpx/s. Runs on any CUDA device
and, with `--device cpu` (small inputs), on a CPU. Writes JSON (device name, library versions) as it goes.

Sections (`--sections`, in this order; those added at the second GPU session first in the list below):

- `machine`: the GPU, its driver, NVDEC's library and PyNvVideoCodec.
- `profile`: torch.profiler over Detector calls of the largest batch (fp32 and bf16) and the trees model on a
  raster's tiles: the ops taking most device and host time, the host's waits per call, the GPU's busy share;
  torchvision's eager forward beside, and with `--before` the before tree's calls (`before`) in a process of its own.
- `startup_parts`: seconds from a fresh Python to torch, CUDA, the Detector, its first and second call.
- `startup_again`: `startup` once more (files cached, compiled kernels on disk).
- `decoders`: every frame of a 1080p H.264 clip and of bikes.mp4 through pyav, decord and nvdec (`pipeline.nvdec`):
  frames/s, CPU ms per frame (the decode CPUs a GPU needs), NVDEC's pixels against PyAV's.
- `masks`: 100 Mask R-CNN masks of a 1080p frame on the device to COCO RLE, three ways (`fpn_model.rle`).
- `e2e_shared`: `e2e` with two detectors on the one GPU (`gpus_per_detector` 0.5); `e2e_nvdec`: with nvdec.
- `compile`: the Detector with `compile` (first call, frames/s), cuDNN's autotuner, TF32 matrix products, each
  against without, exact and bf16, largest batch.

- `forward`: Faster R-CNN R50-FPN (torchvision's, seeded random weights, the class logits scaled so that some
  boxes pass the score threshold; `--proposals` RPN boxes, torchvision's 1000, 200 with --quick) at `--min-size`
  (800) from `--height`p uint8 frames (bikes.mp4 upscaled), batch 1 / 8 / 16, fp32 and bf16, frames/s of:
  `eager` (torchvision: each frame to the device, converted, the model's own transform), `detector`
  (`pipeline.detect.Detector` on a decoded batch, Parquet rows included) and `detector_2calls` (two threads calling
  it at once, as a GPU detector actor runs its calls). `--before DIR` runs the Detector of another source tree (an
  older commit) in the same way, for before -> after.
  At the largest batch, milliseconds per part of the model (upload, transform, backbone+neck, RPN, RoI heads).
  The same for torchvision's eager model (`eager_stages_ms`).
- `alone`: the Detector on `--alone-frames` frames of the looped clip (640x272, decoded first), 1 and 2 calls.
- `e2e`: `fpn run` on bikes.mp4 looped to `--e2e-frames` frames (packets copied, not re-encoded), batch 16, one GPU
  detector: whole wall, time to the first frames file, and steady state (frames landing after the first 2,000, over
  the time they took).
- `startup`: `fpn run` on one image: wall time and time to its frames file.
- `precision`: the bundled `trees` model's AP on SOAP_061 (8 views) per precision on the device (and exact on
  the CPU), and R50's agreement with its own fp32 detections per precision.
- `raster`: a 4096x4096 aerial frame (SOAP_061 mirrored) in 1024-px tiles through the trees model: Mpx/s.

    python benchmarks/gpu.py --out benchmarks/results/gpu.json [--before /tmp/old-tree]
    python benchmarks/gpu.py --device cpu --quick   # the same code paths on a CPU, small inputs
    # sizes given as flags win over --quick's (tests/test_gpu_benchmark.py: tiny ones, in make test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "data" / "video" / "bikes.mp4"
SOAP = REPO / "data" / "aerial-trees" / "SOAP_061.png"
SOAP_XML = REPO / "data" / "aerial-trees" / "SOAP_061.xml"


def versions(device: str) -> dict:
    import numpy
    import torch
    import torchvision

    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "cpus": os.cpu_count(), "device": device}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


# -- inputs ------------------------------------------------------------------------------------------------------
def frames_hd(n: int, height: int):
    """`n` frames of bikes.mp4 resized to `height` x 16/9 `height`, `[n, H, W, 3]` uint8."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from forward_inputs import video_frames

    width = height * 16 // 9
    src = video_frames(str(VIDEO), n)
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in src])


def r50(min_size: int, proposals: int = 1000, seed: int = 0, boost: float = 30.0):
    """torchvision's fasterrcnn_resnet50_fpn with seeded random weights, class logits scaled by `boost` (random
    logits are near 0: every class scores about 1/91, under the 0.05 threshold), keeping `proposals` RPN boxes per
    level before NMS and per image after it (torchvision's default 1000)."""
    import torch
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(seed)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, min_size=min_size,
                                 rpn_pre_nms_top_n_test=proposals, rpn_post_nms_top_n_test=proposals).eval()
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(boost)
    return tv


def r50_checkpoint(tv, min_size: int, path: Path) -> str:
    """`tv` (`r50`) as an fpn-pipeline checkpoint with its input size and RPN limits."""
    from fpn_model.weights import import_torchvision, save_checkpoint

    limits = {"rpn_pre_nms_top_n_test": tv.rpn._pre_nms_top_n["testing"],
              "rpn_post_nms_top_n_test": tv.rpn._post_nms_top_n["testing"]}
    return str(save_checkpoint(import_torchvision("fasterrcnn_resnet50_fpn", tv.state_dict(), min_size=min_size,
                                                  **limits), path))


def eager_inputs(frames, device: str) -> list:
    """Frames as torchvision's eager forward is handed them: each to the device on its own, CHW float in [0, 1]."""
    import torch

    return [torch.from_numpy(f).to(device).permute(2, 0, 1).float().div(255) for f in frames]


def eager_boxes(tv, frames, device: str, dtype=None) -> list:
    """torchvision's eager forward of `frames` (autocast to `dtype` unless None), its boxes on the host."""
    import torch

    with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = tv(eager_inputs(frames, device))
    return [o["boxes"].cpu() for o in out]


def decoded_batch(frames, start: int = 0) -> dict:
    """The columns `pipeline.decode` yields for a batch of video frames."""
    import numpy as np

    from pipeline.output import frame_id

    n, h, w = frames.shape[:3]
    src = "bench.mp4"
    idx = list(range(start, start + n))
    cols = {"frame_id": [frame_id(src, k) for k in idx], "source": [src] * n, "source_kind": ["video"] * n,
            "frame_index": idx, "pts_s": [k / 25 for k in idx], "width": [w] * n, "height": [h] * n,
            "window_x": [0] * n, "window_y": [0] * n, "window_width": [w] * n, "window_height": [h] * n,
            "offset_x": [0] * n, "offset_y": [0] * n, "transform": [np.zeros(6)] * n}
    return {**{k: np.array(v) for k, v in cols.items()}, "image": frames}


def looped_remux(video: Path, frames: int, dest: Path) -> int:
    """`video` repeated until it holds at least `frames` frames, by copying its packets with shifted timestamps (no
    re-encoding: each copy starts on the source's first keyframe; the last one ends before the first keyframe past
    `frames`). Returns the frame count."""
    import av

    with av.open(str(video)) as src:
        stream = src.streams.video[0]
        packets = [(p.pts, p.duration) for p in src.demux(stream) if p.size]
    span = max(pts for pts, _ in packets) + packets[0][1]
    muxed = 0
    with av.open(str(dest), "w") as out:
        with av.open(str(video)) as src:
            ostream = out.add_stream_from_template(src.streams.video[0])
        for k in range(-(-frames // len(packets))):  # muxing takes a packet's data: demux afresh for each copy
            with av.open(str(video)) as src:
                for p in src.demux(src.streams.video[0]):
                    if p.size and muxed >= frames and p.is_keyframe:
                        break
                    if p.size:
                        p.pts, p.dts = p.pts + k * span, p.dts + k * span
                        p.stream = ostream
                        out.mux(p)
                        muxed += 1
    return muxed


def timed(call, reps: int, warm: int, sync) -> dict:
    for _ in range(warm):
        call()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


# -- forward: one process per source tree ---------------------------------------------------------------------------
def forward_worker(args) -> dict:
    """In a fresh process whose sys.path starts at the tree under test: eager vs Detector per batch x precision."""
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pipeline.detect import Detector

    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    frames = frames_hd(max(args.batches), args.height)
    tv = r50(args.min_size, args.proposals).to(dev)
    ckpt = args.checkpoint
    new_api = "precision" in inspect.signature(Detector.__init__).parameters and \
        "amp" not in inspect.signature(Detector.__init__).parameters
    rows = []
    if args.layouts:
        from fpn_model.weights import load_checkpoint

        ours = load_checkpoint(ckpt)
    for precision in args.precisions:
        dtype = {"exact": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        kw = {"precision": precision} if new_api else {"amp": None if precision == "exact" else precision}
        det = Detector(ckpt, model_id="r50", tile=None, max_batch=max(args.batches), **kw)
        for bs in args.batches:
            batch = decoded_batch(frames[:bs])

            r = {"precision": precision, "batch": bs}
            # on a CPU torchvision's eager forward and the layouts below at exact only: under bf16 autocast eager
            # took 50 s a call at 200 px on an AMD EPYC host without bf16 instructions (where our Detector's bf16
            # takes 5 s), the Predictor in NCHW bf16 50 s too (6 s in NHWC), and a CPU detector's precision is
            # exact unless its checkpoint's evaluation chose otherwise
            comparable = dev == "cuda" or precision == "exact"
            eager = not args.skip_eager and comparable
            if eager:
                t = timed(lambda: eager_boxes(tv, batch["image"], dev, dtype), args.reps, args.warm, sync)
                r["eager_fps"] = round(bs / t["median_s"], 2)
                r["eager_spread_fps"] = [round(bs / t["max_s"], 2), round(bs / t["min_s"], 2)]
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = timed(lambda: det(batch), args.reps, args.warm, sync)
            r["detector_fps"] = round(bs / t["median_s"], 2)
            if dev == "cuda":
                r["detector_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            r["detector_spread_fps"] = [round(bs / t["max_s"], 2), round(bs / t["min_s"], 2)]
            r["detections_per_frame"] = round(det(batch).column("num_detections").to_numpy().mean(), 1)
            if bs > 1 and args.two_calls:  # two lasting threads, as an actor's: each keeps its stream and buffers
                with ThreadPoolExecutor(2) as pool:
                    t = timed(lambda: list(pool.map(det, [batch, batch])), args.reps, args.warm, sync)
                r["detector_2calls_fps"] = round(2 * bs / t["median_s"], 2)
            if bs == max(args.batches) and hasattr(det.predictor, "_upload"):
                pred = det.predictor
                r["stages_ms"] = stages(pred.model, lambda f: pred._upload(f, list(range(len(f)))), batch["image"],
                                        reps=args.reps, sync=sync, context=_both(pred._stream(), pred._autocast()))
                if eager:
                    r["eager_stages_ms"] = stages(
                        tv, lambda fs: eager_inputs(fs, dev),
                        batch["image"], reps=args.reps, sync=sync,
                        context=torch.autocast(dev, dtype=dtype or torch.float32, enabled=dtype is not None))
                if args.layouts and comparable:  # the Predictor alone (no rows), its convolutions in NHWC and NCHW
                    from fpn_model.predict import Predictor

                    for layout, cl in (("nhwc", True), ("nchw", False)):
                        p = Predictor(ours, device=dev, channels_last=cl, precision=precision)
                        t = timed(lambda: p(batch["image"]), args.reps, args.warm, sync)
                        r[f"predictor_{layout}_fps"] = round(bs / t["median_s"], 2)
                        p = None
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        det = None  # free its GPU memory before the next precision
    return {"rows": rows, "api": "precision" if new_api else "amp"}


def stages(model, upload, frames, *, reps: int, sync, context) -> dict:
    """Milliseconds per batch of each part of a torchvision-style `model` (median of `reps`), run one after another
    as its forward runs them: `upload` (the frames to the device, converted), transform, backbone+neck, RPN, RoI
    heads with post-processing; inside `context` (a stream and autocast)."""
    import torch

    times: dict[str, list[float]] = {}

    def lap(name, t0):
        sync()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return time.perf_counter()

    with torch.inference_mode(), context:
        for _ in range(reps + 1):
            sync()
            t = time.perf_counter()
            x = upload(frames)
            t = lap("upload", t)
            images, _ = model.transform(x)
            t = lap("transform", t)
            features = model.backbone(images.tensors)
            t = lap("backbone_neck", t)
            proposals, _ = model.rpn(images, features)
            t = lap("rpn", t)
            dets, _ = model.roi_heads(features, proposals, images.image_sizes)
            model.transform.postprocess(dets, images.image_sizes, [f.shape[:2] for f in frames])
            lap("roi_heads_post", t)
    return {k: round(statistics.median(v[1:]), 2) for k, v in times.items()}


def _both(a, b):
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(a)
    stack.enter_context(b)
    return stack


def run_worker(root: Path, args, ckpt: str, extra: list[str], worker: str = "forward") -> dict:
    """`worker` (forward, profile) in a fresh process whose imports come from the source tree `root`."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--worker", worker, "--device", args.device,
           "--checkpoint", ckpt, "--height", str(args.height), "--min-size", str(args.min_size),
           "--reps", str(args.reps), "--warm", str(args.warm), "--batches", ",".join(map(str, args.batches)),
           "--precisions", ",".join(args.precisions), "--raster-side", str(args.raster_side),
           "--proposals", str(args.proposals), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.section_timeout)
    if p.returncode:
        return {"error": p.stderr[-3000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- Detector alone, fpn run, start-up -----------------------------------------------------------------------------
def alone(args, ckpt: str, video: Path) -> dict:
    """The Detector alone on frames of `video` decoded beforehand, batches of 16, 1 and 2 calls at once."""
    import numpy as np
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.detect import Detector

    sys.path.insert(0, str(REPO / "tests"))
    from forward_inputs import video_frames

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    frames = np.stack(video_frames(str(video), args.alone_frames))
    batches = [decoded_batch(frames[i:i + 16], i) for i in range(0, len(frames), 16)]
    out = {"frames": len(frames), "height": int(frames.shape[1]), "width": int(frames.shape[2])}
    det = Detector(ckpt, model_id="r50", tile=None, max_batch=16)
    det(batches[0])
    for calls in (1, 2):
        sync()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(calls) as pool:
            n = sum(t.num_rows for t in pool.map(det, batches))
        sync()
        out[f"fps_{calls}call"] = round(n / (time.perf_counter() - t0), 2)
    return out


def watch_run(cmd: list[str], out: Path, log: Path, timeout: float) -> dict:
    """Run `cmd` (an `fpn run` writing to `out`), noting when each frames file appears."""
    import pyarrow.parquet as pq

    t0 = time.monotonic()
    seen: dict[Path, float] = {}
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
        while p.poll() is None:
            if time.monotonic() - t0 > timeout:
                p.terminate()
                p.wait(30)
                break
            for file in (out / "frames").glob("part-*.parquet"):
                seen.setdefault(file, time.monotonic() - t0)
            time.sleep(0.05)
    wall = time.monotonic() - t0
    files = sorted((t, pq.ParquetFile(f).metadata.num_rows) for f, t in seen.items() if f.exists())
    job = json.loads((out / "_job.json").read_text()) if (out / "_job.json").exists() else {}
    return {"returncode": p.returncode, "wall_s": round(wall, 2), "files": files, "state": job.get("state"),
            "frames": job.get("frames"), "detections": job.get("detections"), "resources": job.get("resources"),
            "core_ms_per_frame": job.get("core_ms_per_frame"), "startup_s": job.get("startup_s"),
            "frames_decoded_on_gpu": job.get("frames_decoded_on_gpu"),
            "video_backend_note": job.get("video_backend_note"), "log_tail": log.read_text()[-1500:]}


def steady(files: list[tuple[float, int]], after: int) -> float | None:
    """Frames per second of the files that landed once `after` frames were out, over the time they took."""
    done, start = 0, None
    for t, rows in files:
        if start is not None:
            done += rows
        elif (done := done + rows) >= after:
            start, done = t, 0
    if start is None or files[-1][0] <= start:
        return None
    return round(done / (files[-1][0] - start), 2)


def fpn_cmd(inputs: list[str], out: Path, ckpt: str, args, *extra: str, detectors: int = 1,
            backend: str = "pyav") -> list[str]:
    gpu = ["--num-detectors", str(detectors), "--gpus-per-detector", f"{1 / detectors:g}", "--cpus-per-detector",
           "2"] if args.device == "cuda" else []
    return [sys.executable, "-m", "jobs.cli", "run", *inputs, "-o", str(out), "-m", ckpt, "--no-tile",
            "--video-backend", backend, *gpu, *extra]


def e2e(args, ckpt: str, video: Path, tmp: Path, name: str = "e2e", **how) -> dict:
    """`fpn run` on `video`, batch 16; `how`: `detectors` sharing the one GPU, the video `backend`."""
    out = tmp / name
    r = watch_run(fpn_cmd([str(video)], out, ckpt, args, "--batch-size", "16", **how), out, tmp / f"{name}.log",
                  args.section_timeout)
    files = r.pop("files")
    r["first_file_s"] = files[0][0] if files else None
    r["fps_whole"] = round(sum(n for _, n in files) / r["wall_s"], 2)
    r["fps_steady_after_2000"] = steady(files, min(2000, sum(n for _, n in files) // 5))
    r["file_times"] = [[round(t, 2), n] for t, n in files]
    return r


def startup(args, ckpt: str, tmp: Path, name: str = "startup") -> dict:
    out = tmp / name
    r = watch_run(fpn_cmd([str(SOAP)], out, ckpt, args), out, tmp / f"{name}.log", args.section_timeout)
    files = r.pop("files")
    r["first_file_s"] = files[0][0] if files else None
    return r


# -- precision and rasters --------------------------------------------------------------------------------------------
def precision(args) -> dict:
    from fpn_model.data import load_annotations
    from fpn_model.evaluate import evaluate
    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    out = {"trees": {}, "r50_agreement": {}}
    items = load_annotations([str(SOAP_XML)], single_class="Tree")
    model = load_checkpoint(resolve("trees"))
    runs = [("cpu", "exact")] + [(args.device, p) for p in args.precisions] if args.device == "cuda" else \
        [("cpu", "exact"), ("cpu", "bf16")]
    for dev, p in runs:
        m = evaluate(Predictor(model, device=dev, tile=TileConfig(), precision=p), items, views=8)
        out["trees"][f"{dev}/{p}"] = {k: round(m[k], 4) for k in ("AP", "AP50", "AP50_sd", "AR1000") if k in m}
    return out


def agreement(ref, other, iou: float = 0.9, score: float = 0.5) -> dict:
    """Of `ref`'s detections scoring >= `score`, how many `other` has (same label, IoU >= `iou`)."""
    import torch
    from torchvision.ops import box_iou

    kept = total = 0
    for a, b in zip(ref, other):
        sel = a.scores >= score
        total += int(sel.sum())
        if not sel.any() or not len(b.boxes):
            continue
        ious = box_iou(torch.from_numpy(a.boxes[sel]), torch.from_numpy(b.boxes))
        same = torch.from_numpy(a.labels[sel])[:, None] == torch.from_numpy(b.labels)[None, :]
        kept += int(((ious >= iou) & same).any(1).sum())
    return {"confident": total, "kept": kept}


def r50_agreement(args, ckpt: str) -> dict:
    from fpn_model.predict import Predictor
    from fpn_model.weights import load_checkpoint

    frames = frames_hd(8, args.height)
    model = load_checkpoint(ckpt)
    ref = Predictor(model, device=args.device)(frames)
    out = {}
    for p in args.precisions:
        if p != "exact":
            out[p] = agreement(ref, Predictor(model, device=args.device, precision=p)(frames))
    return out


def raster_frame(side: int):
    """SOAP_061 and its mirror image tiled to `side` x `side` pixels."""
    import numpy as np

    from fpn_model.data import read_image

    img = read_image(SOAP)
    reps = -(-side // img.shape[0])
    return np.ascontiguousarray(np.tile(np.concatenate([img, img[::-1]], 0), (reps, reps, 1))[:side, :side])


def raster(args) -> dict:
    import torch

    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    side = args.raster_side
    big = raster_frame(side)
    model = load_checkpoint(resolve("trees"))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    out = {"side": side}
    for p in args.precisions if args.device == "cuda" else ["exact"]:
        pred = Predictor(model, device=args.device, tile=TileConfig(size=1024, overlap=128), precision=p, max_batch=32)
        t = timed(lambda: pred([big]), args.reps, 1, sync)
        out[p] = {"mpx_per_s": round(side * side / 1e6 / t["median_s"], 1), "s_per_frame": round(t["median_s"], 3),
                  "detections": len(pred([big])[0].boxes)}
    return out


# -- the machine, the decoders, start-up parts, a profile, masks, compile ----------------------------------------------
def machine(args) -> dict:
    """The GPU, its driver and what a decoder on it needs (NVDEC's library, PyNvVideoCodec)."""
    import ctypes

    import torch

    out = {"cpu_model": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                              if ln.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None}
    try:
        out["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"{type(e).__name__}: {e}"
    for lib in ("libnvcuvid.so.1", "libnvidia-encode.so.1"):
        try:
            ctypes.CDLL(lib)
            out[lib] = "loads"
        except OSError as e:
            out[lib] = str(e)
    try:
        import PyNvVideoCodec as nvc

        out["pynvvideocodec"] = getattr(nvc, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        out["pynvvideocodec"] = f"{type(e).__name__}: {e}"
    if args.device == "cuda":
        out["cudnn"] = torch.backends.cudnn.version()
        out["capability"] = list(torch.cuda.get_device_capability(0))
        out["tf32_conv"] = torch.backends.cudnn.allow_tf32
        out["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return out


def hd_clip(dest: Path, frames: int, height: int) -> Path:
    """`frames` frames of bikes.mp4 upscaled to `height`p, H.264 (x264, a keyframe every 50), as a camera gives."""
    import av

    src = frames_hd(min(frames, 250), height)
    with av.open(str(dest), "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = src.shape[2], src.shape[1], "yuv420p"
        st.options = {"g": "50", "crf": "23", "preset": "veryfast"}
        for k in range(frames):
            for packet in st.encode(av.VideoFrame.from_ndarray(src[k % len(src)], format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return dest


def decoders(args, tmp: Path) -> dict:
    """Every frame of a 1080p H.264 clip and of bikes.mp4 (640x272) decoded by the pipeline's backends: frames/s,
    CPU milliseconds per frame (process time: the cores a decode task takes), and NVDEC's pixels against PyAV's."""
    import numpy as np

    from pipeline.decode import open_video

    clip = hd_clip(tmp / "hd.mp4", args.hd_frames, 1080)
    out = {}
    for name, path in (("1080p", clip), ("640x272", VIDEO)):
        ref = None
        for backend in ("pyav", "decord", "nvdec"):
            try:
                v = open_video(str(path), backend)
                idx = list(range(v.num_frames))
                v.frames(idx[:1])  # opens the decoder (NVDEC: its session)
                c0, t0 = time.process_time(), time.perf_counter()
                n = 0
                for i in range(0, len(idx), 16):
                    n += len(v.frames(idx[i:i + 16]))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"frames": n, "fps": round(n / wall, 1), "cpu_ms_per_frame": round(1000 * cpu / n, 2),
                       "backend": getattr(v, "backend", backend)}
                probe_idx = [0, min(37, len(idx) - 1), len(idx) - 1]
                got = v.frames(probe_idx)
                if ref is None:
                    ref = got
                else:
                    row["mean_abs_diff_vs_pyav"] = round(float(np.abs(got.astype(int) - ref.astype(int)).mean()), 3)
                v.close()
            except Exception as e:  # noqa: BLE001
                row = {"error": f"{type(e).__name__}: {e}"[:500]}
            out[f"{name}/{backend}"] = row
            print(name, backend, row, file=sys.stderr, flush=True)
    return out


STARTUP_PARTS = r"""
import sys, time, json
t0 = time.perf_counter(); marks = {}
def mark(name): marks[name] = round(time.perf_counter() - t0, 3)
import torch; mark("import_torch")
import fpn_model, torchvision; mark("import_torchvision")  # as a detector imports it (fpn_model._imports)
dev = sys.argv[2]
if dev == "cuda":
    torch.zeros(1, device="cuda"); torch.cuda.synchronize(); mark("cuda_init")
from pipeline.detect import Detector; mark("import_pipeline_detect")
det = Detector(sys.argv[1], model_id="r50", tile=None, max_batch=1); mark("detector_built")
sys.path.insert(0, "benchmarks"); import gpu
batch = gpu.decoded_batch(gpu.frames_hd(2, 1080)[:1]); mark("frame_ready")
det(batch); mark("first_call")
det(batch); mark("second_call")
print(json.dumps(marks))
"""


def startup_parts(args, ckpt: str) -> dict:
    """Seconds from a fresh Python to each step of a detector's start (torch, CUDA, the model, the first call)."""
    p = subprocess.run([sys.executable, "-c", STARTUP_PARTS, ckpt, args.device], cwd=REPO, capture_output=True,
                       text=True, timeout=args.section_timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(REPO), os.environ.get("PYTHONPATH", "")])})
    if p.returncode:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def profile(args, ckpt: str) -> dict:
    """torch.profiler over 3 calls (`--warm` calls before; `--reps` calls when under 3) of torchvision's eager
    forward (fp32; not with --skip-eager) and of the Detector per precision on the largest batch (and the trees
    model on 1024-px tiles of a raster): the ops taking most device and host time, and the host's waits for the
    device (on a CPU the ops that would wait: nonzero, nms)."""
    import torch
    from torch.profiler import ProfilerActivity

    from pipeline.detect import Detector

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    bs = max(args.batches)
    batch = decoded_batch(frames_hd(bs, args.height))
    out = {}
    calls = min(3, args.reps)  # on a GPU (reps 5, warm 2) 2 calls to warm up and 3 profiled

    def table(prof, wall: float) -> dict:
        ev = prof.key_averages()
        dev_attr = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"
        rows = [{"op": e.key, "calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000 / calls, 2),
                 "self_cpu_ms": round(e.self_cpu_time_total / 1000 / calls, 2),
                 "device_ms": round(getattr(e, dev_attr, 0) / 1000 / calls, 2)} for e in ev]
        waits = {k: sum(r["calls"] for r in rows if r["op"] == k) / calls for k in
                 ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense",
                  "aten::nonzero", "torchvision::nms", "cudaMemcpyAsync", "cudaLaunchKernel")}
        kernels = sum(getattr(e, "self_device_time_total", 0) for e in ev if e.device_type.name == "CUDA") \
            if args.device == "cuda" else 0
        return {"ms_per_call": round(wall * 1000 / calls, 1), "gpu_busy": round(kernels / 1000 / wall / 1000, 3)
                if kernels else None, "per_call": waits,
                "top_device": sorted(rows, key=lambda r: -r["device_ms"])[:25],
                "top_self_cpu": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:25]}

    def profiled(call) -> dict:
        for _ in range(args.warm):
            call()
        sync()
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            sync()
            wall = time.perf_counter() - t0
        return table(prof, wall)

    if not args.skip_eager:  # torchvision's eager forward on the same frames: its waits beside ours
        tv = r50(args.min_size, args.proposals).to(args.device)
        out[f"r50_b{bs}_eager"] = profiled(lambda: eager_boxes(tv, batch["image"], args.device))
        tv = None
    for precision in args.precisions[:2]:
        det = Detector(ckpt, model_id="r50", tile=None, max_batch=bs, precision=precision)
        out[f"r50_b{bs}_{precision}"] = profiled(lambda: det(batch))
        det = None
    from fpn_model.predict import Predictor, TileConfig
    from fpn_model.weights import load_checkpoint

    big = raster_frame(args.raster_side)
    trees = REPO / "fpn_model" / "checkpoints" / "trees.safetensors"  # this tree's: a --before tree comes without
    pred = Predictor(load_checkpoint(trees), device=args.device, tile=TileConfig(size=1024, overlap=128), max_batch=32)
    out["trees_raster_exact"] = {"side": args.raster_side, **profiled(lambda: pred([big]))}
    return out


def masks_on_device(args) -> dict:
    """A frame's 100 Mask R-CNN masks (1080p, on the device as the model leaves them) to COCO RLE: copied to the host
    and encoded one by one (before fpn_model.rle), copied and encoded in chunks (the CPU way), and the GPU way
    (`runs_to_rle`: run boundaries found on the device, only they copied). Medians of 5; results equal."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from mask_rle import masks, one_by_one

    from fpn_model.rle import chunks_to_rle, runs_to_rle

    h, w = (1080, 1920) if not args.quick else (270, 480)
    m = masks(100, h, w).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    frame = dict(x0=0, y0=0, height=h, width=w)
    ways = {"copy_one_by_one": lambda: one_by_one(m.cpu(), h, w),
            "copy_chunks": lambda: chunks_to_rle(m.cpu(), **frame), "runs_on_device": lambda: runs_to_rle(m, **frame)}
    ref = ways["copy_one_by_one"]()
    out = {"same_rles": all(fn() == ref for fn in ways.values())}
    for k, fn in ways.items():
        out[k + "_s"] = round(timed(fn, 5, 1, sync)["median_s"], 4)
    return out


def compiled(args, ckpt: str) -> dict:
    """The Detector at the largest batch with the device's knobs, one at a time: `compile` (torch.compile of
    backbone+neck and the RPN head: seconds of the first call, frames/s after), cuDNN's autotuner
    (`cudnn.benchmark`), TF32 matrix products (fp32 only); each against the same Detector without, exact and bf16
    (exact only on a CPU)."""
    import torch

    from pipeline.detect import Detector

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    bs = max(args.batches)
    batch = decoded_batch(frames_hd(bs, args.height))
    out = {"batch": bs}
    cuda = args.device == "cuda"
    runs = [("exact", "plain"), ("exact", "cudnn_benchmark"), ("exact", "tf32_matmul"), ("exact", "compile")]
    if cuda:
        runs = runs[:3] + [("bf16", "plain"), ("bf16", "cudnn_benchmark"), ("bf16", "compile")]
    for precision, knob in runs:
        torch.backends.cudnn.benchmark = knob == "cudnn_benchmark"
        torch.backends.cuda.matmul.allow_tf32 = knob == "tf32_matmul"
        try:
            det = Detector(ckpt, model_id="r50", tile=None, max_batch=bs, precision=precision,
                           compile=knob == "compile")
            sync()
            t0 = time.perf_counter()
            det(batch)
            sync()
            row = {"first_call_s": round(time.perf_counter() - t0, 2),
                   "fps": round(bs / timed(lambda: det(batch), args.reps, 1, sync)["median_s"], 2)}
        except Exception as e:  # noqa: BLE001
            row = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.matmul.allow_tf32 = False
            det = None
        out[f"{precision}/{knob}"] = row
        print(precision, knob, row, file=sys.stderr, flush=True)
    return out


# -- sizes ---------------------------------------------------------------------------------------------------------
SIZES = {"height": 1080, "min_size": 800, "batches": "1,8,16", "reps": 5, "warm": 2, "alone_frames": 2000,
         "e2e_frames": 10000, "raster_side": 4096, "hd_frames": 250, "proposals": 1000}
# on a CPU the RoI heads of 1000 proposals took half of an R50 call at 200 px (and bf16 autocast 5 s a call on a host
# without bf16 instructions): 200 still leave the boosted logits their 100 detections a frame
QUICK = {**SIZES, "height": 180, "min_size": 200, "batches": "1,2", "reps": 2, "warm": 1, "alone_frames": 32,
         "e2e_frames": 250, "raster_side": 1024, "hd_frames": 20, "proposals": 200}


# -- main ------------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--sections", default="machine,forward,profile,startup_parts,startup,startup_again,raster,"
                    "precision,decoders,masks,alone,e2e,e2e_shared,e2e_nvdec,compile")
    ap.add_argument("--before", help="another source tree (an older commit) whose Detector to time beside")
    ap.add_argument("--quick", action="store_true", help="small inputs (CPU runs)")
    # sizes: the GPU's defaults, or with --quick a CPU's (QUICK); a flag given wins over both
    ap.add_argument("--height", type=int)
    ap.add_argument("--min-size", type=int)
    ap.add_argument("--batches")
    ap.add_argument("--precisions", default="exact,bf16,fp16")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--warm", type=int)
    ap.add_argument("--alone-frames", type=int)
    ap.add_argument("--e2e-frames", type=int)
    ap.add_argument("--raster-side", type=int)
    ap.add_argument("--proposals", type=int, help="R50's RPN boxes kept per level before NMS and per image after")
    ap.add_argument("--hd-frames", type=int, help="decoders: frames of the 1080p clip")
    ap.add_argument("--section-timeout", type=float, default=300)
    ap.add_argument("--worker")
    ap.add_argument("--checkpoint")
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--two-calls", action="store_true")
    ap.add_argument("--layouts", action="store_true", help="forward: also the Predictor alone in NHWC and NCHW")
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else SIZES).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.precisions = str(args.precisions).split(",")
    if args.worker == "forward":
        print(json.dumps(forward_worker(args)))
        return
    if args.worker == "profile":
        print(json.dumps(profile(args, args.checkpoint)))
        return
    if args.device == "cpu":
        args.precisions = ["exact", "bf16"]
    sections = args.sections.split(",")
    result = {"versions": versions(args.device), "args": {k: v for k, v in vars(args).items() if k != "worker"}}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)

    def save(name, value):
        result[name] = value
        dest.write_text(json.dumps(result, indent=1))
        print(f"{name}: {json.dumps(value)[:2000]}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = r50_checkpoint(r50(args.min_size, args.proposals), args.min_size, tmp / "r50.safetensors")
        for name in sections:
            t0 = time.monotonic()
            try:
                if name == "forward":
                    value = {"after": run_worker(REPO, args, ckpt, ["--two-calls", "--layouts"])}
                    if args.before and args.before != "none":
                        value["before"] = run_worker(Path(args.before).resolve(), args, ckpt,
                                                     ["--skip-eager", "--two-calls"])
                elif name in ("alone", "e2e", "e2e_shared", "e2e_nvdec"):
                    video = tmp / "looped.mp4"
                    if not video.exists():
                        result["looped_frames"] = looped_remux(VIDEO, args.e2e_frames, video)
                    how = {"e2e_shared": {"detectors": 2}, "e2e_nvdec": {"backend": "nvdec"}}.get(name, {})
                    value = alone(args, ckpt, video) if name == "alone" else e2e(args, ckpt, video, tmp, name, **how)
                elif name in ("startup", "startup_again"):
                    value = startup(args, ckpt, tmp, name)
                elif name == "machine":
                    value = machine(args)
                elif name == "startup_parts":
                    value = startup_parts(args, ckpt)
                elif name == "profile":
                    value = profile(args, ckpt)
                    if args.before and args.before != "none":  # the same calls of the before tree's code
                        value["before"] = run_worker(Path(args.before).resolve(), args, ckpt, ["--skip-eager"],
                                                     "profile")
                elif name == "decoders":
                    value = decoders(args, tmp)
                elif name == "masks":
                    value = masks_on_device(args)
                elif name == "compile":
                    value = compiled(args, ckpt)
                elif name == "precision":
                    value = precision(args)
                    value["r50_agreement"] = r50_agreement(args, ckpt)
                elif name == "raster":
                    value = raster(args)
                else:
                    raise ValueError(f"unknown section {name}")
            except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
                import traceback

                value = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
            value = {**value, "section_s": round(time.monotonic() - t0, 1)} if isinstance(value, dict) else value
            save(name, value)


if __name__ == "__main__":
    main()
