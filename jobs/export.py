"""`fpn export`: an output's detections, one record per detection, as GeoParquet 1.1, GeoJSON, COCO results or CSV.

- GeoParquet 1.1: WKB polygons (the pixel box's four corners through the raster's affine transform, exact under
  rotation), `geo` metadata with the CRS as PROJJSON and a `bbox` covering column (struct xmin/ymin/xmax/ymax)
  that GeoPandas, QGIS and DuckDB (without its spatial extension: `WHERE bbox.xmin > ...`) read. An output of
  pixel-only rasters or images is written in pixel coordinates with an undefined CRS (`"crs": null`).
- GeoJSON (RFC 7946): WGS 84 longitude/latitude, one Feature per georeferenced detection.

In a geographic CRS (GeoJSON, or GeoParquet/CSV with `--crs EPSG:4326`), a box across the antimeridian is split
into a MultiPolygon of its two sides (RFC 7946 section 3.1.9); its corners alone made a polygon around the globe.
- COCO results: `[{image_id, category_id, bbox: [x, y, w, h], score}]` in source pixels, and `segmentation` (the
  mask's COCO RLE) for a Mask R-CNN output, so it scores by pycocotools' segm too; image ids number the
  images (a video frame; an image or a whole raster) with detections in the order met, listed in
  `DEST.images.json` (COCO `images` entries: id, file_name = the source, frame_index, width, height), from which
  ground truth can take its ids. `category_id` is the model's label (a model trained here numbers its classes
  1..N; a COCO detector imported from torchvision, COCO's ids), unless `categories` names a COCO JSON: then the id
  of its category of the detection's label name, so results can be scored against that dataset.
- CSV: the per-detection columns, pixel and map boxes side by side (map boxes in `--crs` when given: the envelope
  of the reprojected box, and `crs` says so).

Everything streams: frames are read in batches of rows (pyarrow.dataset), flattened to detections with Arrow
compute, turned into geometries with shapely and reprojected with pyproj, and written batch by batch, so memory
stays bounded by one batch whatever the output's size; `dedup_iou` adds a pass (`jobs.dedup`: an on-disk sort and
a sweep) that keeps one byte per detection.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.output import Output
from pipeline.raster import box_polygons
from pipeline.storage import check_file_destination, filesystem

from .dedup import duplicates

__all__ = ["FORMATS", "ExportSummary", "export"]

log = logging.getLogger(__name__)

FORMATS = ("geoparquet", "geojson", "coco", "csv")
_SUFFIX = {"geoparquet": "parquet", "geojson": "geojson", "coco": "json", "csv": "csv"}
_BY_SUFFIX = {".parquet": "geoparquet", ".geoparquet": "geoparquet", ".geojson": "geojson", ".csv": "csv"}
_FRAME_COLUMNS = ("frame_id", "source", "source_kind", "frame_index", "pts_s", "width", "height", "stac_item",
                  "datetime", "crs", "transform")
_BOX = ("x1", "y1", "x2", "y2")
_MAP = ("map_x1", "map_y1", "map_x2", "map_y2")
MAX_DETECTIONS = 65_536  # per batch written


def export_format(dest: str, fmt: str | None) -> str:
    """The format to write `dest` in: `fmt`, or the one its name says (.parquet, .geojson, .csv; GeoParquet when
    it says none). A name that says another format than `fmt`, or a .json without `fmt` (COCO results or
    GeoJSON?), is refused: a file named d.csv held GeoParquet."""
    suffix = PurePosixPath(dest).suffix.lower()
    named = _BY_SUFFIX.get(suffix)
    if fmt is None:
        if suffix == ".json":
            raise ValueError(f"{dest}: a .json file is COCO results or GeoJSON: say which with --format coco|geojson")
        return named or "geoparquet"
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if named is not None and named != fmt:
        raise ValueError(f"{dest}: its name says {named}, and --format says {fmt}: name it .{_SUFFIX[fmt]}")
    return fmt


@dataclass(frozen=True)
class ExportSummary:
    destination: str
    format: str
    detections: int  # written
    crs: str | None  # of the geometries (None: pixel coordinates)
    left_out: int = 0  # detections without map coordinates in a georeferenced export
    duplicates: int = 0  # merged by dedup_iou


def _dataset(out: Output) -> pads.Dataset:
    files = out.frame_files()
    if not files and not out.fs.exists(out.path):
        raise FileNotFoundError(f"output {out.url} does not exist")
    if not files:
        raise FileNotFoundError(f"{out.url}: no frames to export (is it an fpn output?)")
    return pads.dataset(files, filesystem=out.fs, format="parquet")


def _frame_batches(ds: pads.Dataset, columns: list[str], batch_frames: int) -> Iterator[pa.RecordBatch]:
    """Batches of at most `batch_frames` frames and about MAX_DETECTIONS detections (a frame is never split),
    read one file at a time: what bounds the export's memory."""
    batches = (rb for frag in ds.get_fragments()  # file by file: a dataset-wide scan reads far ahead (measured)
               for rb in frag.to_batches(columns=columns, batch_size=batch_frames, use_threads=False))
    for rb in batches:
        counts = pc.fill_null(pc.list_value_length(rb.column("detections")), 0).to_numpy()
        start = acc = 0
        for i, c in enumerate(counts):
            if acc + c > MAX_DETECTIONS and i > start:
                yield rb.slice(start, i - start)
                start, acc = i, 0
            acc += int(c)
        yield rb.slice(start)


def _detections(ds: pads.Dataset, *, min_score: float, batch_frames: int, masks: bool = False) -> Iterator[pa.Table]:
    """One table of detections (frame columns repeated) per batch of frames; columns an older output lacks are
    null. `masks`: with a Mask R-CNN output's `mask` column (COCO RLE) too."""
    names = set(ds.schema.names)
    cols = [c for c in _FRAME_COLUMNS if c in names] + ["detections"]
    for rb in _frame_batches(ds, cols, batch_frames):
        lists = rb.column("detections")
        if not len(pc.list_flatten(lists)):
            continue
        parents = pc.list_parent_indices(lists)
        flat = pc.list_flatten(lists)
        frame = pa.Table.from_batches([rb.drop_columns(["detections"])]).take(parents)
        for c in _FRAME_COLUMNS:
            if c not in names:
                frame = frame.append_column(c, pa.nulls(len(frame), _NULL_TYPES[c]))
        fields = {f.name: flat.field(f.name) for f in flat.type}
        for c in _MAP:
            fields.setdefault(c, pa.nulls(len(flat), pa.float64()))
        t = frame.select(list(_FRAME_COLUMNS))
        for name in ("label", "label_name", "score", "level", *_BOX, *_MAP, *(("mask",) if masks else ())):
            if name in fields:
                t = t.append_column(name, fields[name])
        if min_score > 0:
            t = t.filter(pc.greater_equal(t.column("score"), min_score))
        if t.num_rows:
            yield t


def _no_detections(ds: pads.Dataset) -> pa.Table:
    """An empty table with the columns `_detections` gives."""
    names = set(ds.schema.names)
    item = ds.schema.field("detections").type.value_type
    fields = [(c, ds.schema.field(c).type if c in names else _NULL_TYPES[c]) for c in _FRAME_COLUMNS]
    fields += [(c, item.field(c).type if item.get_field_index(c) >= 0 else pa.float64())
               for c in ("label", "label_name", "score", "level", *_BOX, *_MAP)]
    return pa.schema(fields).empty_table()


_NULL_TYPES = {"crs": pa.string(), "transform": pa.list_(pa.float64()), "stac_item": pa.string(),
               "datetime": pa.timestamp("us", tz="UTC")}


def _crss(ds: pads.Dataset) -> set[str]:
    """The CRSs of the output's georeferenced rasters (one column read)."""
    if "crs" not in ds.schema.names:
        return set()
    return set(pc.unique(ds.to_table(columns=["crs"]).column("crs").combine_chunks().drop_null()).to_pylist())


def _target_crs(ds: pads.Dataset, fmt: str, crs: str | None, output: str, dedup: bool) -> str | None:
    """The CRS of the exported geometries (and of the map boxes `--dedup` compares): EPSG:4326 for GeoJSON, else
    `crs` if given, else the one CRS of the output's rasters; None (pixel coordinates) when no raster has one, and
    for COCO results (source pixels) without `dedup`. ValueError naming the problem."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if crs is not None:
        try:
            given = CRS.from_user_input(crs)
        except CRSError as e:
            raise ValueError(f"crs {crs!r} is not a coordinate reference system ({e})") from None
        if fmt == "geojson" and given != CRS.from_epsg(4326):
            raise ValueError(f"crs {crs}: GeoJSON is always EPSG:4326 (RFC 7946); --crs is for geoparquet and csv")
        if fmt == "coco" and not dedup:
            raise ValueError(f"crs {crs}: COCO results are boxes in source pixels (--crs applies to them only with "
                             "--dedup, whose map boxes it sets)")
    if fmt == "coco" and not dedup:
        return None
    found = _crss(ds)
    if fmt == "geojson":
        if not found:
            raise ValueError(f"{output}: no georeferenced detections, and GeoJSON needs map coordinates "
                             "(export pixel boxes with --format geoparquet, coco or csv)")
        return "EPSG:4326"
    if crs is not None:
        if not found:
            raise ValueError(f"{output}: no georeferenced detections to reproject to {crs} (without --crs: pixel "
                             "boxes)")
        return crs
    if len(found) > 1:
        raise ValueError(f"{output} holds detections in {len(found)} CRSs ({', '.join(sorted(found))}): "
                         "choose one to reproject them to with --crs")
    return found.pop() if found else None


def _geometries(t: pa.Table, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(shapely polygons, mask of the rows that have them) of a detections table: map polygons reprojected to
    `target`, or pixel boxes when `target` is None (a pixel-only export)."""
    import shapely

    boxes = np.column_stack([t.column(c).to_numpy(zero_copy_only=False) for c in _BOX]).astype(np.float64)
    if target is None:
        return shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]), np.ones(len(boxes), bool)
    crs = t.column("crs").to_numpy(zero_copy_only=False)
    valid = pc.is_valid(t.column("crs")).to_numpy(zero_copy_only=False)
    transforms = np.full((len(boxes), 6), np.nan)
    transforms[valid] = pc.list_flatten(t.column("transform").combine_chunks()).to_numpy().reshape(-1, 6)
    geoms = np.full(len(boxes), None, dtype=object)
    for src in set(crs[valid]):  # one CRS and transform per raster: a few groups per batch
        rows = valid & (crs == src)
        for tr in np.unique(transforms[rows], axis=0):
            sel = rows & (transforms == tr).all(axis=1)
            geoms[sel] = _reproject(box_polygons(boxes[sel], tuple(tr)), src, target)
    return geoms, valid


def _across_antimeridian(geoms: np.ndarray, target: str | None) -> np.ndarray:
    """Indices of the polygons wider than 180 degrees in a geographic `target` CRS: boxes across the antimeridian,
    their corners transformed one by one (the long way round the globe)."""
    import shapely
    from pyproj import CRS

    if target is None or not len(geoms) or not CRS.from_user_input(target).is_geographic:
        return np.zeros(0, np.intp)
    bounds = shapely.bounds(geoms)
    return np.flatnonzero(bounds[:, 2] - bounds[:, 0] > 180)


def _unwrapped(geoms):
    """Longitudes 0..360: continuous at the antimeridian."""
    import shapely

    return shapely.transform(geoms, lambda xy: np.column_stack([xy[:, 0] % 360, xy[:, 1]]))


def _split_at_antimeridian(geoms: np.ndarray, target: str | None) -> np.ndarray:
    """`geoms` with those across the antimeridian (`_across_antimeridian`) as MultiPolygons of their parts east and
    west of it (RFC 7946 3.1.9)."""
    import shapely

    wide = _across_antimeridian(geoms, target)
    if not len(wide):
        return geoms
    geoms = geoms.copy()
    inside, beyond = shapely.box(-180, -90, 180, 90), shapely.box(180, -90, 540, 90)
    for i in wide:
        unwrapped = _unwrapped(geoms[i])  # 0..360: the part east of 180 is past 180, moved back to -180..
        parts = [shapely.intersection(unwrapped, inside),
                 shapely.transform(shapely.intersection(unwrapped, beyond), lambda xy: xy - [360, 0])]
        geoms[i] = shapely.orient_polygons(shapely.MultiPolygon([p for p in parts if not p.is_empty]))
    return geoms


def _continuous_at_antimeridian(geoms: np.ndarray, target: str | None) -> np.ndarray:
    """For `--dedup`: `geoms` with those across the antimeridian in longitudes 0..360, each its own width. Two such
    boxes, each around the globe, overlapped by IoU near 1 whatever their true overlap (unrelated ones merged)."""
    wide = _across_antimeridian(geoms, target)
    if not len(wide):
        return geoms
    geoms = geoms.copy()
    geoms[wide] = _unwrapped(geoms[wide])
    return geoms


def _reproject(geoms: np.ndarray, src: str, dst: str) -> np.ndarray:
    import shapely
    from pyproj import CRS, Transformer

    if CRS.from_user_input(src) == CRS.from_user_input(dst):
        return geoms
    tf = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geoms, lambda xy: np.column_stack(tf.transform(xy[:, 0], xy[:, 1])))


def export(output: str, dest: str, *, fmt: str | None = None, storage_options: dict | None = None,
           min_score: float = 0.0, crs: str | None = None, dedup_iou: float | None = None,
           categories: str | None = None, batch_frames: int = 256) -> ExportSummary:
    """Write the detections of `output` to `dest` (a path or URL) as `fmt` (see the module docstring; default: the
    format `dest`'s name says, see `export_format`).

    `crs`: reproject map geometries to it (needed when the output's rasters have several CRSs); GeoJSON is always
    EPSG:4326. `dedup_iou`: merge detections of different scenes or windows whose map boxes overlap by more than
    this IoU, keeping the highest score. `categories`: a COCO JSON whose category ids COCO results take, by label
    name (ignoring case; a label name it has no category of is refused, and nothing is written). Raises ValueError
    naming the cause."""
    fmt = export_format(dest, fmt)
    if categories is not None and fmt != "coco":
        raise ValueError(f"categories {categories}: category ids are for COCO results (--format coco), not {fmt}")
    category_ids = _category_ids(categories) if categories is not None else None
    if dedup_iou is not None and not 0 < dedup_iou < 1:
        raise ValueError(f"dedup IoU must be between 0 and 1, got {dedup_iou}")
    check_file_destination(dest, f"detections.{_SUFFIX[fmt]}", storage_options)
    out = Output.for_reading(output, storage_options)
    ds = _dataset(out)
    target = _target_crs(ds, fmt, crs, output, dedup_iou is not None)
    if dedup_iou is not None and target is None:
        raise ValueError(f"{output}: --dedup needs map coordinates, and no detection has them")
    batches = _detections(ds, min_score=min_score, batch_frames=batch_frames, masks=fmt == "coco")
    removed = 0
    if dedup_iou is not None:
        def compared(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
            geoms, ok = _geometries(t, target)
            geoms[ok] = _continuous_at_antimeridian(geoms[ok], target)
            return geoms, ok

        drop = duplicates(_detections(ds, min_score=min_score, batch_frames=batch_frames), compared, dedup_iou)
        removed = int(drop.sum())
        batches = _without(batches, drop)
    writer = {"geoparquet": _GeoParquet, "geojson": _GeoJSON, "coco": partial(_Coco, categories=category_ids),
              "csv": _Csv}[fmt]
    fs, path = filesystem(dest, storage_options)
    with fs.transaction:  # the file appears complete, or not at all (local: renamed; S3: upload completed)
        with fs.open(path, "wb") as f:
            w = writer(f, target)
            for t in batches:
                w.write(t)
            if not w.written:  # the columns still, for readers of an empty result
                w.write(_no_detections(ds))
            w.close()
        if fmt == "coco":
            with fs.open(path + ".images.json", "wb") as f:
                f.write(json.dumps(w.images).encode())
    return ExportSummary(dest, fmt, w.written, target, w.left_out, removed)


def _category_ids(path: str) -> tuple[str, dict[str, int]]:
    """(`path`, {category name in lower case: its id}) of a COCO JSON's categories. ValueError when it has none, or
    gives one name two ids."""
    try:
        cats = json.loads(Path(path).read_text()).get("categories")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"categories {path}: not COCO JSON ({e})") from None
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"categories {path}: no 'categories' list (COCO JSON's [{{id, name}}, ...])")
    ids: dict[str, int] = {}
    for c in cats:
        name = str(c["name"]).lower()
        if ids.setdefault(name, c["id"]) != c["id"]:
            raise ValueError(f"categories {path}: {c['name']!r} has two ids, {ids[name]} and {c['id']}")
    return path, ids


def _without(batches: Iterator[pa.Table], drop: np.ndarray) -> Iterator[pa.Table]:
    """The rows of `batches` not marked in `drop` (a mask over all their rows, in order)."""
    seen = 0
    for t in batches:
        mask, seen = drop[seen:seen + t.num_rows], seen + t.num_rows
        yield t.filter(pa.array(~mask)) if mask.any() else t


class _Writer:
    """Writes detection tables to an open binary file `f`; counts what it wrote and what it left out."""

    def __init__(self, f, target: str | None):
        self.f, self.target = f, target
        self.written = self.left_out = 0

    def _append_json(self, item: dict) -> None:
        """One more element of the JSON array the file holds (opened and closed by the subclass)."""
        self.f.write((", " if self.written else "").encode() + json.dumps(item).encode())
        self.written += 1


class _GeoParquet(_Writer):
    def __init__(self, f, target):
        super().__init__(f, target)
        self.pq_writer = None

    def write(self, t: pa.Table) -> None:
        import pyarrow.parquet as pq
        import shapely

        geoms, ok = _geometries(t, self.target)
        self.left_out += int((~ok).sum())
        if not ok.all():
            t, geoms = t.filter(pa.array(ok)), geoms[ok]
        if not t.num_rows and self.pq_writer is not None:
            return
        geoms = _split_at_antimeridian(geoms, self.target)
        bounds = shapely.bounds(geoms).reshape(-1, 4)
        bbox = pa.StructArray.from_arrays([pa.array(bounds[:, k], pa.float64()) for k in range(4)],
                                          ["xmin", "ymin", "xmax", "ymax"])
        t = t.drop_columns(["crs", "transform", *_MAP]).append_column(
            "geometry", pa.array(shapely.to_wkb(geoms), pa.binary()))
        t = t.append_column("bbox", bbox)
        if self.pq_writer is None:
            self.pq_writer = pq.ParquetWriter(self.f, t.schema.with_metadata({"geo": json.dumps(self._geo())}),
                                              compression="zstd")
        self.pq_writer.write_table(t.cast(self.pq_writer.schema))
        self.written += t.num_rows

    def _geo(self) -> dict[str, Any]:
        from pyproj import CRS

        crs = None if self.target is None else CRS.from_user_input(self.target)
        # a geographic CRS may hold boxes split at the antimeridian (_split_at_antimeridian)
        types = ["Polygon", "MultiPolygon"] if crs is not None and crs.is_geographic else ["Polygon"]
        covering = {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
        return {"version": "1.1.0", "primary_column": "geometry",
                "columns": {"geometry": {"encoding": "WKB", "geometry_types": types,
                                         "crs": None if crs is None else crs.to_json_dict(), "covering": covering}}}

    def close(self) -> None:
        self.pq_writer.close()


class _GeoJSON(_Writer):
    def __init__(self, f, target):
        super().__init__(f, target)
        f.write(b'{"type": "FeatureCollection", "features": [')

    def write(self, t: pa.Table) -> None:
        import shapely

        geoms, ok = _geometries(t, self.target)
        self.left_out += int((~ok).sum())
        geoms[ok] = _split_at_antimeridian(geoms[ok], self.target)
        props = t.select(["frame_id", "source", "frame_index", "stac_item", "datetime", "label", "label_name",
                          "score", *_BOX]).to_pylist()
        for i in np.flatnonzero(ok):
            p = props[i]
            if p["datetime"] is not None:
                p["datetime"] = p["datetime"].isoformat()
            feature = {"type": "Feature", "geometry": json.loads(shapely.to_geojson(geoms[i])), "properties": p}
            self._append_json(feature)

    def close(self) -> None:
        self.f.write(b"]}")


class _Coco(_Writer):
    """`categories`: (a COCO JSON's path, its category ids by name in lower case) to turn label names into; None:
    the label is the category id."""

    def __init__(self, f, target, categories: tuple[str, dict[str, int]] | None = None):
        super().__init__(f, target)
        self.categories = categories
        self.ids: dict[tuple[str, int], int] = {}
        self.images: list[dict] = []
        f.write(b"[")

    def write(self, t: pa.Table) -> None:
        cols = ["source", "source_kind", "frame_index", "width", "height", "label", "label_name", "score", *_BOX,
                *(("mask",) if "mask" in t.column_names else ())]
        for r in t.select(cols).to_pylist():
            key = (r["source"], r["frame_index"] if r["source_kind"] == "video" else 0)  # a raster's boxes: its pixels
            if key not in self.ids:
                self.ids[key] = len(self.ids) + 1
                self.images.append({"id": self.ids[key], "file_name": r["source"], "frame_index": key[1],
                                    "width": r["width"], "height": r["height"]})
            res = {"image_id": self.ids[key], "category_id": self._category_id(r), "score": round(r["score"], 5),
                   "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]]}
            if r.get("mask"):  # Mask R-CNN: its RLE over the image (a raster's over the whole raster)
                res["segmentation"] = r["mask"]
            self._append_json(res)

    def close(self) -> None:
        self.f.write(b"]")

    def _category_id(self, r: dict) -> int:
        if self.categories is None:
            return r["label"]
        path, ids = self.categories
        name = r["label_name"] or ""
        if name.lower() not in ids:
            raise ValueError(f"label {r['label']} {name!r}: {path} has no category of that name (it has "
                             f"{', '.join(ids)})")
        return ids[name.lower()]


def _map_columns_in(t: pa.Table, target: str) -> pa.Table:
    """`t` with the map boxes of the rows in another CRS than `target` reprojected to it (the envelope of the
    reprojected box) and their `crs` set to it."""
    import shapely

    crs = t.column("crs").to_numpy(zero_copy_only=False)
    move = pc.is_valid(t.column("crs")).to_numpy(zero_copy_only=False) & (crs != target)
    if not move.any():
        return t
    geoms, _ = _geometries(t.filter(pa.array(move)), target)
    bounds = shapely.bounds(_split_at_antimeridian(geoms, target))
    where = np.flatnonzero(move)
    for k, name in enumerate(_MAP):
        values = t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        values[where] = bounds[:, k]
        missing = pc.is_null(t.column(name)).to_numpy(zero_copy_only=False) & ~move
        t = t.set_column(t.schema.get_field_index(name), name,
                         pa.array(values, t.schema.field(name).type, mask=missing))
    crs = crs.astype(object)
    crs[where] = target
    return t.set_column(t.schema.get_field_index("crs"), "crs", pa.array(crs, pa.string()))


class _Csv(_Writer):
    def __init__(self, f, target):
        super().__init__(f, target)
        self.csv = None

    def write(self, t: pa.Table) -> None:
        import pyarrow.csv as pcsv

        if self.target is not None:  # map boxes in the target CRS: envelopes of the reprojected boxes
            t = _map_columns_in(t, self.target)
        t = t.drop_columns(["transform"])
        if self.csv is None:
            self.schema = t.schema
            self.csv = pcsv.CSVWriter(self.f, t.schema)
        self.csv.write_table(t.cast(self.schema))
        self.written += t.num_rows

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
