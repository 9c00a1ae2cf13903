"""Job specs: YAML (or CLI flags) -> a validated `pipeline.Plan`, before any work starts.

A spec file mirrors the Plan's fields, nested where the Plan nests:

    inputs: [s3://bucket/flights/**.mp4]
    output: s3://bucket/results/flights
    model: trees                       # zoo name or checkpoint path
    storage_options:                   # per protocol or URL prefix; each URL gets only its own set
      s3: {endpoint_url: http://127.0.0.1:9000}
      s3://public-bucket/: {anon: true}
    output_storage_options: {s3: {profile: writer}}   # the output's own (default: storage_options)
    sampling: {every_n: 5}             # or fps / start_s / end_s / keyframes: true
    tile: {size: 1024, overlap: 128}   # null: frames whole
    batch_size: 8                      # or auto: by the GPU memory a detector gets (8 on CPUs)
    min_rows_per_file: 1000            # fewest frames per Parquet file (default: 1/20 of the job, 1 batch..1000)
    changed_sources: replace           # a source changed since its frames were written: error (default) or replace
    min_age_s: 10m                     # leave sources written within 10 minutes (still being written) for later
    score_thresh: 0.3                  # model overrides: score_thresh, scale, detections_per_img
    resources: {num_detectors: 2, gpus_per_detector: 1}
    bands: [4, 3, 2]                   # rasters: bands in the model's channel order
    stretch: {percentiles: [2, 98]}    # or {min: 0, max: 3000}; once per raster
    gsd: 0.2                           # resample to this (m/pixel; default: the model's), or resample: false
    aoi: {bbox: [11.50, 48.10, 11.60, 48.20], crs: "EPSG:4326"}   # or {geometry: GeoJSON, crs: ...}

Unknown or invalid fields raise `SpecError` naming the field (`sampling.evry_n`).

Flags and spec fields merge in one place, `merge_fields`, for `fpn run`, `fpn submit` and `fpn resume`: a flag
the user gave replaces the field (an explicit None too: `--no-tile` is `tile: null`); nested fields (sampling,
tile, resources, storage options per location) merge key by key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fpn_model.config import TileConfig
from fpn_model.weights import read_config
from fpn_model.zoo import DEFAULT_MODEL, model_id, resolve
from pipeline.decode import Sampling
from pipeline.plan import Plan, Resources
from pipeline.raster import Stretch
from pipeline.storage import drop_redacted, normalize_options, redact, redact_url

__all__ = ["SpecError", "load_spec", "read_spec_file", "merge_fields", "plan_from_dict", "MODEL_OVERRIDES",
           "plan_to_dict", "plan_from_record"]

MODEL_OVERRIDES = ("score_thresh", "scale", "detections_per_img", "nms_thresh")
_NESTED = {"sampling": Sampling, "tile": TileConfig, "resources": Resources, "stretch": Stretch}
_TOP = {f.name for f in dataclasses.fields(Plan)} - {"checkpoint", "model_id", "model_overrides"}
_TOP |= {"model", *MODEL_OVERRIDES}
_STORAGE = ("storage_options", "output_storage_options")


class SpecError(ValueError):
    """An invalid job spec; the message names the field."""


def _coerce(field: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(field, value, a)
            except SpecError as e:
                errors.append(e)
        raise errors[0]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if field in _DURATIONS and isinstance(value, str):  # "10m", as the flag takes it
        try:
            return parse_duration(value)
        except ValueError as e:
            raise SpecError(f"spec field {field}: {e}") from None
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(field, v, args[0]) for v in value)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    name = _EXPECTED.get(field) or ("a list" if origin is tuple else getattr(tp, "__name__", str(tp)))
    raise SpecError(f"spec field {field}: expected {name}, got {value!r}")


_DURATIONS = {"min_age_s"}  # seconds, or a duration with its unit (parse_duration)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from "90", "90s", "10m", "1.5h" or "1d" (`--min-age`, spec `min_age_s`); ValueError otherwise."""
    t = text.strip().lower()
    unit = _UNITS.get(t[-1:])
    try:
        seconds = float(t[:-1] if unit else t) * (unit or 1)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{text!r} is not a duration (seconds, or a number with s, m, h or d: 10m)")
    return seconds


def duration_text(seconds: float) -> str:
    """A duration as `parse_duration` takes it, in its largest whole unit: 600 -> 10m."""
    for unit, n in sorted(_UNITS.items(), key=lambda u: -u[1]):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


# what a field holds, where its type says too little ("expected tuple") to a user whose value it refuses
_EXPECTED = {"bands": "a list of band numbers (1-based) or STAC asset keys, e.g. [4, 3, 2] or [B04, B03, B02]"}


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"spec field {prefix}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            raise SpecError(f"spec field {prefix}.{k}: unknown (known: {', '.join(fields)})")
        kwargs[k] = _coerce(f"{prefix}.{k}", v, hints[k])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise SpecError(f"spec field {prefix}: {e}") from e


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """Validate a spec mapping and resolve its model; raises SpecError naming the bad field."""
    if not isinstance(data, dict):
        raise SpecError("a job spec must be a mapping of fields")
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise SpecError(f"spec field {unknown[0]}: unknown (known: {', '.join(sorted(_TOP))})")
    d = dict(data)
    inputs = d.pop("inputs", None)
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs is None and d.get("stac_search"):
        inputs = []  # the items a STAC API search finds are the inputs
    elif not inputs or not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise SpecError("spec field inputs: a list of paths or URLs is required")
    output = d.pop("output", None)
    if not isinstance(output, str) or not output:
        raise SpecError("spec field output: a path or URL is required")
    model = d.pop("model", None) or DEFAULT_MODEL
    try:
        ckpt = resolve(str(model))
    except FileNotFoundError as e:
        raise SpecError(f"spec field model: {e}") from e
    overrides = {}
    for k in MODEL_OVERRIDES:
        if k in d and d[k] is not None:
            overrides[k] = _coerce(k, d.pop(k), float if k != "detections_per_img" else int)
        d.pop(k, None)
    if overrides:  # checked against the model's config now, not in the detector once Ray and the job have started
        try:
            dataclasses.replace(read_config(ckpt)[0], **overrides)
        except ValueError as e:
            raise SpecError(f"spec field {str(e).split()[0]}: {e}") from e
    for k in _STORAGE:
        if d.get(k) is not None:
            try:
                d[k] = normalize_options(d[k], field=k)
            except ValueError as e:
                raise SpecError(f"spec field {e}" if str(e).startswith(k) else f"spec field {k}: {e}") from e
    nested = {}
    for k, cls in _NESTED.items():
        if k in d:
            v = d.pop(k)
            nested[k] = None if v is None or v is False else _build(cls, v, k)
    hints = typing.get_type_hints(Plan)
    plain = {k: _coerce(k, v, hints[k]) for k, v in d.items()}
    mid, _ = model_id(ckpt)
    try:
        return Plan(inputs=tuple(inputs), output=output, checkpoint=str(ckpt), model_id=mid,
                    model_overrides=overrides, **nested, **plain)
    except ValueError as e:
        raise SpecError(f"spec: {e}") from e


def local_absolute(value: str, base_dir: Path) -> str:
    """A local path relative to `base_dir` as an absolute one; a URL or an absolute path as it is."""
    return value if "://" in value or Path(value).is_absolute() else str((base_dir / value).resolve())


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A YAML spec file as a mapping, its relative local inputs and output made absolute (relative to the file),
    so the mapping means the same wherever it is run (`fpn submit` sends it to a cluster)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a job spec (.yaml): it is not text") from None
    except yaml.YAMLError as e:
        raise SpecError(f"spec file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a mapping of fields")
    base = p.parent.resolve()
    ins = data.get("inputs")
    if isinstance(ins, str):
        ins = [ins]
    if isinstance(ins, list):
        data["inputs"] = [local_absolute(i, base) if isinstance(i, str) else i for i in ins]
    if isinstance(data.get("output"), str) and data["output"]:
        data["output"] = local_absolute(data["output"], base)
    return data


# fields of which a spec takes one: a flag for one replaces the spec's other (`--fps 5` over `every_n: 10`)
_ONE_OF = {"sampling": ("every_n", "fps", "keyframes")}


def merge_fields(data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """`data` with `flags` applied: each key in `flags` was given by the user and wins (None included); nested
    mappings (sampling, tile, resources, storage options and their per-location sets) merge key by key, except
    that a flag for one of the alternatives in `_ONE_OF` replaces the others."""
    out = dict(data)
    for k, v in flags.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            if alternatives := set(_ONE_OF.get(k, ())) & set(v):
                old = {kk: vv for kk, vv in old.items() if kk not in _ONE_OF[k] or kk in alternatives}
            out[k] = merge_fields(old, v)
        else:
            out[k] = v
    return out


def load_spec(path: str | Path, flags: dict[str, Any] | None = None) -> Plan:
    """Read a YAML spec file and apply `flags` (the CLI's, through `merge_fields`)."""
    return plan_from_dict(merge_fields(read_spec_file(path), flags or {}))


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """The plan as a spec mapping for `_job.json`: storage secrets and URL signatures redacted."""
    d = dataclasses.asdict(plan)
    for k in _STORAGE:
        d[k] = redact(d[k]) if d[k] is not None else None
    d["inputs"] = [redact_url(i) for i in plan.inputs]
    return d


def plan_from_record(d: dict[str, Any], flags: dict[str, Any] | None = None) -> Plan:
    """Rebuild a Plan from its `_job.json` record (for `fpn resume OUTPUT`), with `flags` merged in. Redacted
    secrets are dropped (credentials come from the environment or the flags); an input whose URL signature was
    redacted cannot be read again and fails as that input's error."""
    d = dict(d)
    for k in _STORAGE:
        if d.get(k) is not None:
            d[k] = drop_redacted(d[k])
    d = merge_fields(d, flags or {})
    for k, cls in _NESTED.items():
        if d.get(k) is not None:
            d[k] = cls(**d[k])
    d["inputs"] = tuple(d["inputs"])
    try:
        return Plan(**d)
    except (TypeError, ValueError) as e:
        raise SpecError(f"the job record's spec is not usable: {e}") from e

