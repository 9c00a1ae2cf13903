"""What earlier runs found in each input, kept in the output, so that a rerun probes only what is new.

A daily run over a growing archive probed every file again (headers and indexes: ranged GETs on object storage, in
Ray tasks, so Ray started for them too) to find the same work units as the day before. `OUTPUT/_sources.parquet`
records each source's size and version (`Output.read_sources`); beside them it keeps the work units a probe cut the
source into, or why nothing in it is read (an aoi that misses a raster), and `probe_key`, the settings they were
cut under. A source whose size and version are those recorded, and whose units were cut under the same settings,
is planned from the record; the rest are probed (`pipeline.plan.plan_work`).

Not recorded: sources that combine STAC band assets (their raster plan names the assets' URLs, which a catalogue
may sign for an hour), and sources whose listing gives neither size nor version (nothing tells that they
changed). A source whose probe failed has no record: it is probed again, as its error row says (it may be
transient).

A source that changed since a run wrote its frames, and was left so (a SourceChanged error row; no
`--replace-changed`), keeps the record of the version its frames are of, and the size and version it was seen at
when left (`LEFT_FIELDS`): a rerun that finds it still so leaves it again without probing it or writing its row
again (`left_as_changed`), and with nothing else new ends without Ray (every one started Ray to report it again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from .output import Output
from .sources import Source

__all__ = ["PROBE_VERSION", "LEFT_FIELDS", "probe_key", "known_units", "record", "left_as_changed", "left_at"]

# what a probe makes of a file: raised when a change to probing or cutting makes other units of the same file, so
# that no output plans from units cut the old way
PROBE_VERSION = 1
# of a changed source left so: the size and version it was seen at, and the run that wrote its SourceChanged row
LEFT_FIELDS = ("left_size", "left_version", "left_run")


def probe_key(plan: Any, raster: Any) -> str:
    """The settings a source's units are cut under (a `pipeline.plan.Plan`'s, its `RasterSettings`), hashed: a
    rerun with another segment length, decoder, window or aoi probes again. Sampling is not among them (it picks
    frames of the units when they are planned)."""
    settings = {"probe_version": PROBE_VERSION, "segment_frames": plan.segment_frames,
                "windows_per_unit": plan.windows_per_unit, "raster_pixels": plan.raster_pixels,
                "video_backend": plan.video_backend, "raster": dataclasses.asdict(raster)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def known_units(source: Source, rec: dict[str, Any] | None, key: str) -> list[dict[str, Any]] | str | None:
    """`source`'s work units (rows, with its URL of now: a presigned one is signed afresh) or why nothing in it is
    read, as an earlier run recorded them (`rec`, its entry of `Output.read_sources`); None when it must be
    probed: not recorded, cut under other settings (`key`), not known to be the same file, or left as changed
    (`left_as_changed`: one back at the version its frames are of has its record made whole first, by
    `jobs.runner._skip_changed`)."""
    if rec is None or source.assets or rec.get("probe_key") != key or rec.get("left_run") is not None:
        return None
    if rec.get("units") is None and rec.get("unread") is None:
        return None
    now = source.size_and_version()
    same = (now["size"] is not None and rec.get("size") is not None) or (now["version"] and rec.get("version"))
    if not same or Output.source_change(rec, now):
        return None
    if rec.get("unread") is not None:
        return rec["unread"]
    return [{**u, "uri": source.url, "source": source.canonical} for u in json.loads(rec["units"])]


def record(found: list[dict[str, Any]] | str, key: str) -> dict[str, Any]:
    """What `_sources.parquet` keeps of a source's probe: its units (without the URL they were read with, and the
    source, which is the record's key) or why nothing in it is read."""
    if isinstance(found, str):
        return {"probe_key": key, "units": None, "unread": found}
    units = [{k: v for k, v in u.items() if k not in ("uri", "source")} for u in found]
    return {"probe_key": key, "units": json.dumps(units, separators=(",", ":")), "unread": None}


def left_as_changed(source: Source, rec: dict[str, Any] | None) -> str | None:
    """How `source` differs from the version its frames here are of (`Output.source_change`), when an earlier run
    left it as changed (`rec`, its entry of `Output.read_sources`) and it is still at the size and version that run
    saw; None otherwise (not left, or changed again since: reported again)."""
    if rec is None or rec.get("left_run") is None:
        return None
    seen, now = {"size": rec.get("left_size"), "version": rec.get("left_version")}, source.size_and_version()
    if (now["size"] is None and not now["version"]) or Output.source_change(seen, now):
        return None
    return Output.source_change(rec, seen)


def left_at(now: dict[str, Any], run: int) -> dict[str, Any]:
    """The `LEFT_FIELDS` of a source left as changed by run `run`, seen at `now` (`Source.size_and_version`)."""
    return dict(zip(LEFT_FIELDS, (now["size"], now["version"], run)))
