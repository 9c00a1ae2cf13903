"""Video decoded on an NVIDIA GPU's NVDEC engine (PyNvVideoCodec), with PyAV's index and CPU decode behind it.

`video_backend: nvdec` (`--video-backend nvdec`). The container's index (frame count, rate, keyframes) is PyAV's,
read without decoding, so frame indices, sampling and frame ids are those of the `pyav` backend; the wanted frames
are decoded by NVDEC (`PyNvVideoCodec.SimpleDecoder`, RGB on the device) and copied to host memory in one copy per
call, as the pipeline's batches cross processes in host memory. Where NVDEC is missing (no PyNvVideoCodec, no CUDA
device, a codec the engine lacks) the video is decoded on the CPU by PyAV and one line says why, once per process.
NVDEC's YUV->RGB conversion is not FFmpeg's: pixels differ by a few levels from the CPU backends'.

Written by hand because no library the pipeline uses offers it: decord's CUDA build and torchcodec's CUDA device
are not on PyPI; PyNvVideoCodec is, and gives frames by index with DLPack.
"""
from __future__ import annotations

import logging
import threading

import numpy as np

from .decode import PyAVVideo, _seek_policy_counts
from .storage import one_line

__all__ = ["NvdecVideo", "nvdec_unavailable", "nvdec_missing_here"]

log = logging.getLogger(__name__)
_said: set[str] = set()
_lock = threading.Lock()


def nvdec_unavailable() -> str | None:
    """Why NVDEC cannot decode in this process (None: it can, as far as can be told without a video)."""
    import importlib

    try:
        importlib.import_module("PyNvVideoCodec")
    except ImportError as e:
        return f"PyNvVideoCodec is not installed ({e})"
    try:
        import torch
    except ImportError as e:
        return f"torch is not installed ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def nvdec_missing_here() -> str | None:
    """Why NVDEC cannot decode on this machine, asked without torch or a CUDA context (PyNvVideoCodec installed,
    the driver's decode library loadable): for a job's driver on the machine its decoders run on to say so before
    any work (workers' own lines stay in their logs). None: both are there."""
    import ctypes
    import importlib.util

    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return "PyNvVideoCodec is not installed"
    try:
        ctypes.CDLL("libnvcuvid.so.1")
    except OSError as e:
        return f"NVIDIA's decode library cannot be loaded ({e})"
    return None


def _say_once(why: str) -> None:
    with _lock:
        if why in _said:
            return
        _said.add(why)
    log.warning("nvdec unavailable: %s; decoding on the CPU with PyAV", why)


class NvdecVideo(PyAVVideo):
    """`pipeline.decode.VideoDecoder` over NVDEC, PyAV's where NVDEC is unavailable (see the module docstring).
    `decoded` follows the seek policy of the other backends (decode on within a group of pictures, else from the
    keyframe before)."""

    def __init__(self, source: str, gpu_id: int = 0):
        super().__init__(source)
        self._source, self._gpu_id = source, gpu_id
        self._dec = None
        self.backend: str | None = None  # "nvdec" or "pyav", once the first frames are asked for (a probe never is)
        self._after: int | None = None  # the frame NVDEC decodes next without seeking

    def _open(self) -> None:
        self.backend = "pyav"
        if not isinstance(self._source, str):
            _say_once("NVDEC reads paths, not file objects")
            return
        why = nvdec_unavailable()
        if why is None:
            try:
                import PyNvVideoCodec as nvc

                self._dec = nvc.SimpleDecoder(self._source, gpu_id=self._gpu_id, use_device_memory=True,
                                              output_color_type=nvc.OutputColorType.RGB)
                self.backend = "nvdec"
                return
            except Exception as e:  # noqa: BLE001 - any failure of the engine leaves the CPU decoder
                why = one_line(e)
        _say_once(why)

    def frames(self, indices: list[int]) -> np.ndarray:
        if self.backend is None:
            self._open()
        if self._dec is None:
            return super().frames(indices)
        import torch

        got = self._dec.get_batch_frames_by_index(list(indices))
        if len(got) != len(indices):
            raise ValueError(f"NVDEC gave {len(got)} frames for {len(indices)} indices")
        batch = torch.stack([torch.from_dlpack(f) for f in got])  # uint8 on the device
        if batch.shape[-1] != 3 and batch.shape[1] == 3:  # planar
            batch = batch.permute(0, 2, 3, 1)
        self.decoded, self._after = _seek_policy_counts(self.keyframes, self._after, indices)
        return batch.cpu().numpy()

    def close(self) -> None:
        self._dec = None
        super().close()
