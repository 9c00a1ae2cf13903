"""Checkpoints and torchvision weight import.

The checkpoint format is a single safetensors file: tensors only, so loading it can never run
code, with the `ModelConfig` (JSON, class names included) in the file's metadata. Weights may be
stored in fp16 to halve the file (`save_checkpoint(..., dtype=torch.float16)`); they are cast back
to the model's dtype on load.

torchvision's COCO detectors (pickled state dicts) are imported with `torch.load(weights_only=True)`,
which refuses any pickle that would execute code, and renamed onto our modules.

A checkpoint records what its input pixels were (`InputSpec`, metadata key `input`): band order by common
name, how raster values were scaled to 0..255, and the ground sample distance of its training imagery. A
checkpoint that records none expects RGB uint8 at an unknown GSD (no resampling).

A model reference of the form `path/to/file.py:Class` is a model plugin: a class with `config` (ModelConfig),
`input` (InputSpec, optional) and `__init__(config)`, called like a torchvision detector (a list of `[3, H, W]`
float images in 0..1 -> a list of dicts with boxes, scores, labels, levels: `fpn_model.predict.Predictor` checks
them and applies `config.score_thresh`). It runs code by design (the user's own model, as a video backend plugin
does); checkpoints never do.

Reading a checkpoint's config and input metadata imports no torch (the job's driver and its planning and
decoding workers never load a model); torch comes in with the functions that build or load one.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from .config import ModelConfig, preset

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "save_checkpoint", "load_checkpoint", "read_config", "file_sha256", "TORCHVISION_MODELS",
    "import_torchvision", "coco_class_names", "torchvision_to_ours", "CheckpointError", "InputSpec", "read_input_spec",
    "is_plugin", "model_file", "read_precision", "default_precision", "record_precision",
    "read_limits", "record_limits",
]

FORMAT = "fpn-pipeline/1"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (wrong format, unsafe pickle, mismatched weights)."""


@dataclass(frozen=True)
class InputSpec:
    """What a model expects of its input pixels.

    bands: common band names in the order of the model's channels (`red`, `green`, `blue`, `nir`, ...).
    value_range: raster values mapped linearly onto 0..255 (e.g. `(0, 3000)` for reflectance x 10^4);
        None: a display stretch of each raster (and uint8 rasters as they are).
    gsd_m: ground sample distance of the training imagery in metres per pixel; None: unknown (no resampling).
    """

    bands: tuple[str, ...] = ("red", "green", "blue")
    value_range: tuple[float, float] | None = None
    gsd_m: float | None = None

    def __post_init__(self) -> None:
        if not self.bands or not all(isinstance(b, str) and b for b in self.bands):
            raise ValueError(f"input.bands must be band names, got {self.bands!r}")
        if self.value_range is not None and not (len(self.value_range) == 2 and self.value_range[0] < self.value_range[1]):
            raise ValueError(f"input.value_range must be [low, high] with low < high, got {self.value_range!r}")
        if self.gsd_m is not None and not self.gsd_m > 0:
            raise ValueError(f"input.gsd_m must be > 0, got {self.gsd_m!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        unknown = set(d) - {"bands", "value_range", "gsd_m"}
        if unknown:
            raise ValueError(f"input.{sorted(unknown)[0]}: unknown field")
        vr = d.get("value_range")
        return cls(bands=tuple(d.get("bands", cls.bands)), value_range=tuple(vr) if vr is not None else None,
                   gsd_m=d.get("gsd_m"))


def is_plugin(ref: str | os.PathLike) -> bool:
    """Whether a model reference names a plugin class (`path/to/file.py:Class`)."""
    return ".py:" in str(ref)


def model_file(ref: str | os.PathLike) -> Path:
    """The file a model reference lives in: the checkpoint, or a plugin's `.py` file."""
    return Path(str(ref).rpartition(":")[0]) if is_plugin(ref) else Path(ref)


def _plugin_class(ref: str | os.PathLike) -> type:
    """The plugin's class. Whatever its file raises as it runs (an import of a missing module, a syntax error, ...)
    is a CheckpointError of one line naming the file, the line and the cause, as any model that cannot be loaded
    is: the file is the user's code, and its traceback would bury the cause under the pipeline's frames."""
    import runpy
    import traceback

    file, _, name = str(ref).rpartition(":")
    try:
        cls = runpy.run_path(file).get(name)
        if cls is not None and not isinstance(cls.config, ModelConfig):
            raise TypeError(f"{name}.config is a {type(cls.config).__name__}, not a ModelConfig")
    except Exception as e:  # noqa: BLE001 - the plugin's own code ran: any error of it means it cannot be loaded
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
        where = f"line {lines[-1]}: " if lines and not isinstance(e, SyntaxError) else ""  # a SyntaxError says it
        why = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"model plugin {ref} cannot be loaded ({where}{type(e).__name__}: {why})") from e
    if cls is None:
        raise CheckpointError(f"model plugin {ref}: {file} has no class {name}")
    return cls


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                    extra: dict[str, Any] | None = None, input: InputSpec | None = None) -> Path:
    """Write `model` (built by `build_detector`) with its config (and what its input pixels were) to `path`."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "extra": json.dumps(extra or {})}
    if input is not None:
        meta["input"] = json.dumps(asdict(input))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600: others (a cluster's workers, a team) read it
    os.replace(tmp, path)
    return path


def _umask() -> int:
    """The process's umask, read without changing it (`os.umask` sets it, racing other threads' files); Linux
    reports it in /proc/self/status, elsewhere the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:  # the metadata only: no torch needed
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist") from e
        raise CheckpointError(f"{path} is not an fpn-pipeline checkpoint (safetensors): {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an fpn-pipeline checkpoint (no '{FORMAT}' metadata)")
    return meta


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and extra metadata of a checkpoint (or plugin), without loading the weights."""
    if is_plugin(path):
        cls = _plugin_class(path)
        return cls.config, dict(getattr(cls, "extra", {}))
    meta = _metadata(path)
    return ModelConfig.from_dict(json.loads(meta["config"])), json.loads(meta.get("extra", "{}"))


def read_precision(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint (or plugin class, as its `precision` attribute) records of its approximate precisions:
    `{"default": {"cuda": "fp16", ...}, "evaluated": {"cuda/exact": {"AP50": ...}, ...}, "how": ...}` (`fpn eval
    --record` writes it); {} when nothing was recorded."""
    if is_plugin(path):
        return dict(getattr(_plugin_class(path), "precision", {}))
    try:
        return json.loads(_metadata(path).get("precision", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{path}: its precision metadata is not usable ({e})") from e


def default_precision(path: str | os.PathLike, device_type: str) -> str:
    """The precision a job runs the checkpoint at on `device_type` ("cpu", "cuda") unless told: the one its
    evaluation recorded as keeping accuracy there (`read_precision`), else exact."""
    return read_precision(path).get("default", {}).get(device_type, "exact")


def record_precision(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Rewrite the checkpoint at `path` with `record` (`read_precision`'s form) as its precision metadata; the
    weights stay as they are (the file, and so the model id, changes)."""
    return _rewrite_metadata(path, precision=json.dumps(record))


def read_limits(path: str | os.PathLike) -> dict[str, Any]:
    """How a checkpoint's per-image limits were sized (`fpn eval --limits-from ... --record` writes it: the limits,
    the training annotations, the densest window, AP before and after); {} when they are the preset's."""
    if is_plugin(path):
        return {}
    try:
        return json.loads(_metadata(path).get("limits", "{}"))
    except ValueError as e:
        raise CheckpointError(f"{path}: its limits metadata is not usable ({e})") from e


def record_limits(path: str | os.PathLike, limits: dict[str, int], record: dict[str, Any]) -> Path:
    """Rewrite the checkpoint at `path` with `limits` (fpn_model.limits.LIMIT_FIELDS) in its config and `record`
    (how they were sized) as its limits metadata; the weights stay as they are (the model id changes)."""
    cfg, _ = read_config(path)
    return _rewrite_metadata(path, config=json.dumps(cfg.replace(**limits).to_dict()),
                             limits=json.dumps({"limits": limits, **record}))


def _rewrite_metadata(path: str | os.PathLike, **entries: str) -> Path:
    from safetensors.torch import load_file, save_file

    meta = {**_metadata(path), **entries}
    tensors = load_file(str(path))
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return Path(path)


def read_input_spec(path: str | os.PathLike) -> InputSpec:
    """What the checkpoint (or plugin) at `path` expects of its input pixels, checked against its config (one
    channel per band); a checkpoint that records nothing expects RGB uint8. Raises CheckpointError."""
    if is_plugin(path):
        cfg, spec = _plugin_class(path).config, getattr(_plugin_class(path), "input", InputSpec())
    else:
        meta = _metadata(path)
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
        try:
            spec = InputSpec.from_dict(json.loads(meta["input"])) if "input" in meta else InputSpec()
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: its input metadata is not usable ({e})") from e
    if len(spec.bands) != len(cfg.image_mean):
        raise CheckpointError(f"{path}: records {len(spec.bands)} input bands {list(spec.bands)} for a model of "
                              f"{len(cfg.image_mean)} channels")
    return spec


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    **overrides: Any) -> nn.Module:
    """Rebuild the model stored in `path` (eval mode). `overrides` change inference-time config
    fields (score_thresh, scale, detections_per_img, ...)."""
    from safetensors.torch import load_file

    cfg, _ = read_config(path)
    if overrides:
        cfg = cfg.replace(**overrides)
    if is_plugin(path):
        return _plugin_class(path)(cfg).to(map_location).eval()
    model = _build_for_loading(cfg)
    state = load_file(str(path))  # on the CPU: copied into the model's CPU tensors, then moved once
    _load_strict(model, state, str(path))
    return model.to(map_location).eval()


def _build_for_loading(cfg: ModelConfig) -> nn.Module:
    """`build_detector(cfg)` without drawing the random weights that loading overwrites (`_load_strict` insists on
    every key, so none survives): most of a model's build time (R50-FPN on a CPU: 0.28 s of 0.29 s), paid by every
    detector as it starts. torch's `skip_init` and the meta device do not fit: they take a module class and miss
    the tensors torchvision keeps as plain attributes (the anchor generator's). The torch function mode is
    thread-local, so a model built on another thread meanwhile (training) is initialised as ever."""
    import torch
    from torch.overrides import TorchFunctionMode

    from .detectors import build_detector

    random_fills = {torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_,
                    torch.Tensor.uniform_, torch.Tensor.normal_}

    class SkipRandomFills(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in random_fills:
                return args[0] if args else kwargs["tensor"]
            return func(*args, **(kwargs or {}))

    with SkipRandomFills():
        return build_detector(cfg)


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        if v.is_floating_point():
            state[k] = v.to(own[k].dtype)
    model.load_state_dict(state)


# -- torchvision import ----------------------------------------------------------------------------
def _tv_configs() -> dict[str, ModelConfig]:
    v2 = dict(head_style="v2", neck_norm="bn")
    return {
        "fasterrcnn_resnet50_fpn": preset("faster_rcnn_r50_fpn"),
        "fasterrcnn_resnet50_fpn_v2": preset("faster_rcnn_r50_fpn", **v2),
        "retinanet_resnet50_fpn": preset("retinanet_r50_fpn"),
        "retinanet_resnet50_fpn_v2": preset("retinanet_r50_fpn", head_style="v2", extra="p6p7_c5"),
        "maskrcnn_resnet50_fpn": preset("mask_rcnn_r50_fpn"),
        "maskrcnn_resnet50_fpn_v2": preset("mask_rcnn_r50_fpn", **v2),
        "fasterrcnn_mobilenet_v3_large_fpn": preset("faster_rcnn_mobilenet_v3_fpn"),
    }


TORCHVISION_MODELS = tuple(_tv_configs())

_RENAMES = [
    (re.compile(r"^backbone\.body\."), "backbone.body.trunk."),
    (re.compile(r"^backbone\.fpn\.inner_blocks\."), "backbone.neck.lateral."),
    (re.compile(r"^backbone\.fpn\.layer_blocks\."), "backbone.neck.output."),
    (re.compile(r"^backbone\.fpn\.extra_blocks\."), "backbone.neck.extra."),
]


def torchvision_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision detection state dict onto our module names."""
    out = {}
    for k, v in state.items():
        for pattern, repl in _RENAMES:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _safe_torch_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save writes a zip, or (legacy) a pickle
        raise CheckpointError(f"{path} is not a PyTorch state dict: neither a zip archive nor a pickle (it begins "
                              f"{head!r})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing {path}: a pickle that torch's weights-only loader cannot read as tensors (it may run code or "
            f"build other objects): {_unpickling_reason(e)}"
        ) from e
    except (RuntimeError, EOFError, KeyError) as e:
        raise CheckpointError(f"{path} is not a PyTorch state dict: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


def _unpickling_reason(e: Exception) -> str:
    """What torch's weights-only unpickler found, from its many-paragraph message: the line after "WeightsUnpickler
    error:" (an object it will not build, `Unsupported global: GLOBAL os.system ...`, or an opcode it does not
    know, `Unsupported operand 149`)."""
    text = str(e).partition("WeightsUnpickler error:")[2] or str(e)
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    return line.split(". ")[0]  # not its advice on allowlisting


def _download_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's COCO weights of `name` (DEFAULT), downloaded (or from torch's cache); CheckpointError in one
    line when they cannot be fetched, pointing to --state-dict (urllib's error was an 85-line traceback)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=True)
    except OSError as e:  # urllib.error.URLError and socket errors are OSErrors
        raise CheckpointError(f"cannot download {weights.url} ({getattr(e, 'reason', e)}): without a network, "
                              f"download it elsewhere and pass the file with --state-dict FILE") from e


def coco_class_names(name: str) -> tuple[str, ...]:
    """torchvision's class names of its COCO detector `name`, by label: 91, "__background__" at label 0 and "N/A"
    at the ids COCO left unused (so label k is COCO category id k: 1 "person", 3 "car"). In torchvision's weights
    enum, offline."""
    from torchvision.models import get_model_weights

    return tuple(get_model_weights(name).DEFAULT.meta["categories"])


def import_torchvision(name: str, source: str | os.PathLike | dict | None = None, **overrides: Any) -> nn.Module:
    """Our model carrying torchvision's `name` weights, with COCO's class names (`coco_class_names`).

    `source`: a local `.pth` file, a state dict, or None to download torchvision's COCO weights
    (`DEFAULT`), which needs a network.
    """
    configs = _tv_configs()
    if name not in configs:
        raise ValueError(f"unknown torchvision model {name!r}; choose from {', '.join(configs)}")
    cfg = configs[name].replace(class_names=coco_class_names(name))
    if source is None:
        state = _download_state_dict(name)
    elif isinstance(source, dict):
        state = source
    else:
        state = _safe_torch_load(source)
    model = _build_for_loading(cfg.replace(**overrides))
    ours = torchvision_to_ours(state)
    own = model.state_dict()
    ours = {k: v for k, v in ours.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    _load_strict(model, ours, str(source) if not isinstance(source, dict) else name)
    return model.eval()
