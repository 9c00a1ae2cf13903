"""Test doubles that misbehave the way native decoders do: hang, or die of a signal.

The video decoders are real PyAV decoders (`pipeline.decode.PyAVVideo`) that hang or crash on one frame of a
video whose file name says so, and decode every other video normally (`FewerFrames`, `FloatFrames` and
`HalfSizeFrames` return other frames than the ones asked for, from one frame on, in every video). A job loads them through the plugin
backend "path/to/fakes.py:Class" (`pipeline.decode.open_video`): a file path, because Ray workers (and the
decoding child processes they spawn) do not have `tests/` on their Python path.

`BrightBoxes` is a model plugin ("path/to/fakes.py:BrightBoxes", `fpn_model.weights`) that returns known pixel
boxes: one per connected region of bright pixels of its input, so a test that draws squares into a raster knows
where every box must land after windows, resampling and georeferencing. `MallocProbe` reports whether its
detector process started with the malloc settings of `fpn_model.memory`, `LaneProbe` which of a detector's
concurrent calls ran each frame, `LosesDevice` raises CUDA's error after an illegal memory access,
`OverscoresBrightFrames` returns scores above 1, `FailsToStart` cannot be built. `GreyLevels` and its subclasses
find objects of known grey levels and label them with classes a test chooses (named as a trained model's, as a COCO
detector's, or not at all).

The generator functions are for `pipeline.isolate` directly; they are pickled by reference, which works
because a spawned child gets its parent's `sys.path` (and pytest puts `tests/` there).
"""
from __future__ import annotations

import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fpn_model.config import ModelConfig
from fpn_model.weights import InputSpec
from pipeline.decode import PyAVVideo

FAKES = Path(__file__).resolve()
BAD_FRAME = 8  # the frame on which a "hang*" video hangs and a "crash*" video crashes
FOREVER_S = 3600.0  # far longer than any test's decode timeout


def backend(cls: type) -> str:
    """The `video_backend` (or `model`) value that makes a job use `cls` from this file."""
    return f"{FAKES}:{cls.__name__}"


class BrightBoxes(torch.nn.Module):
    """A detector of bright regions: for each `[3, H, W]` image in 0..1, one box per 8-connected region whose
    channel mean is above 0.5, bounding its pixels exactly (score 0.9, label 1 "bright", level 2). Trained, it
    would be, at 0.1 m per pixel (so georeferenced rasters are resampled for it)."""

    config = ModelConfig(num_classes=2, class_names=("bright",))
    input = InputSpec(gsd_m=0.1)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # something to move between devices

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from rasterio.features import shapes
        from shapely.geometry import shape

        out = []
        for im in images:
            mask = (im.float().mean(0) > 0.5).cpu().numpy().astype(np.uint8)
            boxes = [shape(g).bounds for g, _ in shapes(mask, mask=mask.astype(bool), connectivity=8)]
            n = len(boxes)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                        "scores": torch.full((n,), 0.9), "labels": torch.ones(n, dtype=torch.int64),
                        "levels": torch.full((n,), 2, dtype=torch.int8)})
        return out


class MallocProbe(torch.nn.Module):
    """A model plugin that reports its process's malloc settings: one whole-frame box per image, scored 0.9 when
    the process started with `fpn_model.memory.keep_freed_memory_env()` (MALLOC_ARENA_MAX=1), else 0.1."""

    config = ModelConfig(num_classes=2, class_names=("kept",))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        score = 0.9 if os.environ.get("MALLOC_ARENA_MAX") == "1" else 0.1
        return [{"boxes": torch.tensor([[0.0, 0.0, im.shape[-1], im.shape[-2]]]), "scores": torch.tensor([score]),
                 "labels": torch.ones(1, dtype=torch.int64), "levels": torch.full((1,), 2, dtype=torch.int8)}
                for im in images]


class LaneProbe(torch.nn.Module):
    """A model plugin that says which of its detector's concurrent calls ran each frame: one whole-frame box per
    image, labelled 1 for the first thread that called it and 2 for any other; each call takes 0.3 s, so the
    batches of a unit that reach the detector together run side by side."""

    config = ModelConfig(num_classes=3, class_names=("first lane", "other lane"))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.first: int | None = None

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        import threading

        time.sleep(0.3)
        me = threading.get_ident()
        if self.first is None:
            self.first = me
        label = 1 if me == self.first else 2
        return [{"boxes": torch.tensor([[0.0, 0.0, im.shape[-1], im.shape[-2]]]), "scores": torch.tensor([0.9]),
                 "labels": torch.full((1,), label, dtype=torch.int64), "levels": torch.full((1,), 2, dtype=torch.int8)}
                for im in images]


class GreyLevels(torch.nn.Module):
    """A model plugin of known classes: one box per grey level of LEVELS (in 0..255) filling a region of its input,
    bounding that region exactly (score 0.9), labelled as LEVELS says: a level-100 object is "Dead" (label 1) and a
    level-250 one "Alive" (label 2), whatever number an annotation file gives those classes."""

    config = ModelConfig(num_classes=3, class_names=("Dead", "Alive"))
    LEVELS = {100: 1, 250: 2}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        from torchvision.ops import masks_to_boxes

        out = []
        for im in images:
            masks = {label: (im[0] * 255 - level).abs() < 1 for level, label in self.LEVELS.items()}
            found = [(label, m) for label, m in masks.items() if m.any()]
            boxes = masks_to_boxes(torch.stack([m for _, m in found])) + torch.tensor([0, 0, 1, 1]) if found \
                else torch.zeros(0, 4)
            out.append({"boxes": boxes, "scores": torch.full((len(found),), 0.9),
                        "labels": torch.tensor([label for label, _ in found], dtype=torch.int64),
                        "levels": torch.full((len(found),), 2, dtype=torch.int8)})
        return out


def coco_names() -> tuple[str, ...]:
    """torchvision's COCO class names by label (91: "__background__" at 0, "N/A" at the ids COCO left unused)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return tuple(FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])


class CocoGreyLevels(GreyLevels):
    """GreyLevels as torchvision's COCO detectors label: level 100 is a remote (label 75, COCO's id), 250 a person
    (label 1)."""

    config = ModelConfig(num_classes=91, class_names=coco_names())
    LEVELS = {100: 75, 250: 1}


class UnnamedGreyLevels(CocoGreyLevels):
    """CocoGreyLevels without its class names, as torchvision's COCO detectors were imported from a state dict."""

    config = ModelConfig(num_classes=91)


# one file per error still to raise; a checkout's own (two checkouts' tests may run at once on one machine)
DEVICE_ERRORS = Path(tempfile.gettempdir()) / f"fpn-fakes-device-errors-{hashlib.sha1(bytes(FAKES)).hexdigest()[:10]}"


class LosesDevice(torch.nn.Module):
    """A model whose calls raise what CUDA raises after an illegal memory access (`torch.AcceleratorError`) while
    files are left in DEVICE_ERRORS, each call taking one (a test puts as many as it wants errors), and otherwise
    find one box per image. Its process stays usable: whether the detector exits is the pipeline's choice."""

    config = ModelConfig(num_classes=2, class_names=("object",))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        for f in sorted(DEVICE_ERRORS.glob("*")):
            try:
                f.unlink()  # this call's error; a concurrent call that lost the race takes the next file
            except FileNotFoundError:
                continue
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.ones(1, dtype=torch.int64), "levels": torch.full((1,), 2, dtype=torch.int8)}
                for _ in images]


class OverscoresBrightFrames(torch.nn.Module):
    """A model plugin with a bug: one whole-frame box per image, scored 0.9, or 7.5 for an image brighter than 0.5
    on average (a score outside [0, 1])."""

    config = ModelConfig(num_classes=2, class_names=("object",))

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": torch.tensor([[0.0, 0.0, im.shape[-1], im.shape[-2]]]),
                 "scores": torch.tensor([7.5 if im.float().mean() > 0.5 else 0.9]),
                 "labels": torch.ones(1, dtype=torch.int64), "levels": torch.full((1,), 2, dtype=torch.int8)}
                for im in images]


class FailsToStart(torch.nn.Module):
    """A model plugin that cannot be built (as a checkpoint of other code, or a model needing a missing library)."""

    config = ModelConfig(num_classes=2, class_names=("object",))

    def __init__(self, config: ModelConfig):
        raise RuntimeError("needs the nms_rotated kernel, which this build of torchvision lacks")


class EngineVideo(PyAVVideo):
    """PyAV that says it is NVIDIA's engine (`backend` "nvdec"), as `pipeline.nvdec.NvdecVideo` does once it decodes
    on a GPU: the count of frames decoded on a GPU, without one."""

    backend = "nvdec"


class BreaksAfterABadBatch(PyAVVideo):
    """PyAV with decord's ways on a truncated file: frames from FIRST_LOST on cannot be decoded, a batch reaching
    BATCH_FAILS fails too, and a reader that failed fails every call after it (a fresh one decodes up to the cut)."""

    FIRST_LOST, BATCH_FAILS = 28, 16

    def __init__(self, path: str):
        super().__init__(path)
        self.broken = False

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.broken or max(indices) >= self.FIRST_LOST or (len(indices) > 1 and max(indices) >= self.BATCH_FAILS):
            self.broken = True
            raise RuntimeError("[07:20:14] /github/workspace/src/video/ffmpeg/threaded_decoder.cc:292: Check failed: "
                               "avcodec_send_packet(dec_ctx_.get(), pkt.get()) >= 0 Thread worker: Error sending packet.")
        return super().frames(indices)


class FewerFrames(PyAVVideo):
    """PyAV that returns only the first frame of a call asking for frame BAD_FRAME."""

    def frames(self, indices: list[int]) -> np.ndarray:
        got = super().frames(indices)
        return got[:1] if BAD_FRAME in indices else got


class FloatFrames(PyAVVideo):
    """PyAV that returns float32 frames in 0..1 from a call asking for frame BAD_FRAME."""

    def frames(self, indices: list[int]) -> np.ndarray:
        got = super().frames(indices)
        return got.astype(np.float32) / 255 if BAD_FRAME in indices else got


class HalfSizeFrames(PyAVVideo):
    """PyAV that returns frames of half the size it declares from a call asking for frame BAD_FRAME."""

    def frames(self, indices: list[int]) -> np.ndarray:
        got = super().frames(indices)
        return np.ascontiguousarray(got[:, ::2, ::2]) if BAD_FRAME in indices else got


class HangingVideo(PyAVVideo):
    """PyAV, except that a video named hang*.mp4 blocks for an hour when asked for frame BAD_FRAME."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bad = Path(path).name.startswith("hang")

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.bad and BAD_FRAME in indices:
            time.sleep(FOREVER_S)
        return super().frames(indices)


class CrashingVideo(PyAVVideo):
    """PyAV, except that a video named crash*.mp4 dies of SIGSEGV when asked for frame BAD_FRAME."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bad = Path(path).name.startswith("crash")

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.bad and BAD_FRAME in indices:
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().frames(indices)


class CrashingOpen(PyAVVideo):
    """PyAV, except that opening a video named crashopen*.mp4 (the probe does, when a job plans) dies of SIGSEGV."""

    def __init__(self, path: str):
        if Path(path).name.startswith("crashopen"):
            os.kill(os.getpid(), signal.SIGSEGV)
        super().__init__(path)


def count(n: int) -> Iterator[int]:
    yield from range(n)


def count_then_hang(n: int) -> Iterator[int]:
    yield from range(n)
    time.sleep(FOREVER_S)


def count_then_crash(n: int) -> Iterator[int]:
    yield from range(n)
    os.kill(os.getpid(), signal.SIGSEGV)


def count_then_raise(n: int) -> Iterator[int]:
    yield from range(n)
    raise KeyError("no such frame")


def pid() -> Iterator[int]:
    yield os.getpid()
