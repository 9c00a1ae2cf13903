"""Rasters: opened by byte ranges, planned once per raster, read window by window as the model's input.

`plan_raster` runs once per raster while the job is planned and decides everything that must be the same
for all of its windows, so neighbouring windows match: which bands feed the model's channels, the stretch
of raster values onto 0..255 (from the raster's overviews, or a decimated read when it has none), the
resampling scale to the model's ground sample distance, the windows (in raster pixels, sized so that a
resampled window is about `window` model pixels), which of them an area of interest keeps, and the
georeference (CRS and affine transform). The result (`RasterPlan`) travels with the work units as JSON.

`read_window` reads one window (padded by the margin) resampled and stretched to uint8, nodata masked to 0,
and tells when the window holds no valid pixel at all. `map_boxes` turns pixel boxes into map coordinates
through the affine transform (rotated or sheared transforms included: the box's four corners are
transformed and their envelope kept; `fpn export` writes the exact quadrilateral).

Remote rasters are opened with rasterio's `opener=` over the job's fsspec filesystem for that URL (its own
storage options), so GDAL fetches the header and the tiles a window needs, never the whole file.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from .storage import filesystem, protocol_of, ranged_opener

__all__ = ["Stretch", "RasterSettings", "RasterPlan", "open_raster", "open_rasters", "plan_raster", "read_window",
           "map_boxes", "aoi_geometry", "box_polygons", "WindowRead"]

_OVERVIEW_SIDE = 1024  # the stretch is computed from a read of at most this many pixels a side


@dataclass(frozen=True)
class Stretch:
    """How raster values become the model's 0..255: a fixed range (`min`, `max`), or the `percentiles` of the
    valid pixels of the whole raster, per band."""

    percentiles: tuple[float, float] = (2.0, 98.0)
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"stretch.percentiles must be two numbers 0 <= low < high <= 100, got {self.percentiles}")
        if (self.min is None) != (self.max is None):
            raise ValueError("stretch: give both min and max, or neither")
        if self.min is not None and not self.min < self.max:
            raise ValueError(f"stretch: min ({self.min}) must be below max ({self.max})")


@dataclass(frozen=True)
class RasterSettings:
    """The job's raster settings, with the model's expectations (`fpn_model.weights.InputSpec`) resolved."""

    window: int = 2048  # core window side in model pixels
    margin: int = 128  # model pixels read around each core window
    bands: tuple[int, ...] | None = None  # 1-based raster bands in model channel order; None: by name or first N
    stretch: Stretch | None = None  # None: the model's value range, else uint8 as is, else Stretch()
    target_gsd_m: float | None = None  # resample georeferenced rasters to this; None: native pixels
    model_bands: tuple[str, ...] = ("red", "green", "blue")
    model_value_range: tuple[float, float] | None = None
    aoi: dict | None = None  # see aoi_geometry


@dataclass(frozen=True)
class RasterPlan:
    """Everything fixed once per raster. Pixel coordinates are the raster's own; `scale` is model pixels per
    raster pixel (2.0: a 0.2 m raster read for a 0.1 m model). Pixels that are not square on the ground (a
    raster in degrees away from the equator) are read with another scale down the rows (`scale_y`), windows
    and margins sized per axis (`window_y`, `margin_y`), so that the model sees square pixels; None: as across."""

    width: int
    height: int
    crs: str | None  # "EPSG:32633", or WKT when the CRS has no code; None: not georeferenced
    transform: tuple[float, ...]  # affine a, b, c, d, e, f: map = (a*col + b*row + c, d*col + e*row + f)
    bands: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    scale: float
    window: int  # core window side in raster pixels
    margin: int  # raster pixels
    gsd_m: float | None
    keep: tuple[int, ...] | None = None  # window indices an area of interest keeps; None: all
    assets: tuple[str, ...] | None = None  # band assets (STAC), one single-band raster per channel, on this grid
    palette: tuple[tuple[int, int, int], ...] | None = None  # a paletted band's colours (index -> RGB): read as RGB
    scale_y: float | None = None
    window_y: int | None = None
    margin_y: int | None = None
    note: str | None = None  # what a reader should know of its georeference (fitted to GCPs, or why not)

    @property
    def scales(self) -> tuple[float, float]:
        """Model pixels per raster pixel across and down."""
        return self.scale, self.scale if self.scale_y is None else self.scale_y

    def windows(self) -> list[tuple[int, int, int, int]]:
        """Core windows `(x, y, w, h)` in raster pixels, row by row."""
        wx, wy = self.window, self.window_y or self.window
        return [(x, y, min(wx, self.width - x), min(wy, self.height - y))
                for y in range(0, self.height, wy) for x in range(0, self.width, wx)]

    def window_ids(self) -> list[int]:
        """The indices of the windows to read (the frame indices of their rows)."""
        return list(self.keep) if self.keep is not None else list(range(len(self.windows())))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RasterPlan":
        d = json.loads(text)
        for k in ("transform", "bands", "low", "high", "keep", "assets"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        if d.get("palette") is not None:
            d["palette"] = tuple(map(tuple, d["palette"]))
        return cls(**d)


@contextlib.contextmanager
def open_raster(uri: str, storage_options: dict | None = None) -> Iterator[Any]:
    """A rasterio dataset of `uri`: local files directly, remote ones through the URL's fsspec filesystem
    (byte ranges; see storage.REMOTE_BLOCK). Storage errors come out as built-ins naming `uri`."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # plan_raster tells, and _job.json says so
    if protocol_of(uri) == "file":
        with rasterio.open(uri) as ds:
            yield ds
        return
    _, path = filesystem(uri, storage_options)
    open_ = ranged_opener(uri, storage_options)  # storage.REMOTE_BLOCK bytes past each read

    def opener(p: str, mode: str = "rb"):
        try:
            return open_(p, mode)
        except OSError:
            raise
        except Exception as e:  # an OSError whatever the cause: rasterio probes openers with a made-up path
            raise OSError(f"{uri}: cannot open ({e})") from e

    with rasterio.open(path, opener=opener) as ds:
        yield ds


@contextlib.contextmanager
def open_rasters(uris: list[str], storage_options: dict | None = None) -> Iterator[list]:
    """`open_raster` of each of `uris` (a raster, or the band assets of one), closed together."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_raster(u, storage_options)) for u in uris]


def _crs_string(crs) -> str | None:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _pixel_size_m(crs: str, t: tuple[float, ...], width: int, height: int) -> tuple[float, float] | None:
    """Metres per pixel across and down at the raster's centre (projected CRS: its linear unit; geographic:
    along the ellipsoid). None when the CRS has neither."""
    from pyproj import CRS, Geod

    c = CRS.from_user_input(crs)
    a, b, _, d, e, _ = t
    if c.is_projected:
        unit = c.axis_info[0].unit_conversion_factor
        return math.hypot(a, d) * unit, math.hypot(b, e) * unit
    if c.is_geographic:
        x = lambda col, row: (a * col + b * row + t[2], d * col + e * row + t[5])  # noqa: E731
        geod = Geod(ellps="WGS84") if c.ellipsoid is None else Geod(a=c.ellipsoid.semi_major_metre,
                                                                     rf=c.ellipsoid.inverse_flattening)
        (x0, y0), (x1, y1), (x2, y2) = x(width / 2, height / 2), x(width / 2 + 1, height / 2), x(width / 2, height / 2 + 1)
        return geod.inv(x0, y0, x1, y1)[2], geod.inv(x0, y0, x2, y2)[2]
    return None


def valid_values(data: np.ndarray) -> np.ma.MaskedArray:
    """`data` (a masked read) with the non-finite values of a floating-point raster masked too: NaN marks missing
    data in many float products that carry no nodata tag, and one NaN would make the stretch NaN (every pixel 0)."""
    return np.ma.masked_invalid(data) if data.dtype.kind == "f" else np.ma.asarray(data)


def palette_of(ds, band: int = 1) -> tuple[tuple[int, int, int], ...] | None:
    """The colours of a paletted (colour-mapped) band, index -> (r, g, b); None when the band is not paletted."""
    from rasterio.enums import ColorInterp

    if ds.colorinterp[band - 1] != ColorInterp.palette:
        return None
    cmap = ds.colormap(band)
    lut = [(0, 0, 0)] * (max(cmap) + 1)
    for i, rgba in cmap.items():
        lut[i] = tuple(int(v) for v in rgba[:3])
    return tuple(lut)


def read_palette(ds, band: int, palette, window, out_shape: tuple[int, int], downsampling: bool) -> np.ma.MaskedArray:
    """`[3, h, w]` colours of paletted `band`: indices read with nearest (or, reduced, the most common) value,
    never averaged, then looked up."""
    from rasterio.enums import Resampling

    idx = ds.read(band, window=window, out_shape=out_shape, masked=True,
                  resampling=Resampling.mode if downsampling else Resampling.nearest)
    lut = np.zeros((max(len(palette), int(np.ma.getdata(idx).max(initial=0)) + 1), 3), np.uint8)
    lut[:len(palette)] = palette
    rgb = lut[np.ma.getdata(idx).astype(np.intp)].transpose(2, 0, 1)
    return np.ma.MaskedArray(rgb, np.broadcast_to(np.ma.getmaskarray(idx), rgb.shape))


def _choose_bands(ds, settings: RasterSettings) -> tuple[int, ...]:
    n = len(settings.model_bands)
    if settings.bands is not None:
        bad = [b for b in settings.bands if not 1 <= b <= ds.count]
        if bad:
            raise ValueError(f"bands {list(settings.bands)}: the raster has bands 1..{ds.count} (no band {bad[0]})")
        if len(settings.bands) != n:
            raise ValueError(f"bands {list(settings.bands)}: the model takes {n} bands ({', '.join(settings.model_bands)})")
        return tuple(settings.bands)
    names = {}
    for i, (ci, desc) in enumerate(zip(ds.colorinterp, ds.descriptions), start=1):
        for name in (ci.name.lower(), (desc or "").lower()):
            names.setdefault(name, i)
    if all(b in names for b in settings.model_bands):
        return tuple(names[b] for b in settings.model_bands)
    colour = [i for i, ci in enumerate(ds.colorinterp, start=1) if ci.name.lower() != "alpha"]
    if len(colour) >= n:
        return tuple(colour[:n])
    if len(colour) == 1:
        return (colour[0],) * n
    raise ValueError(f"the raster has {ds.count} bands and the model takes {n} ({', '.join(settings.model_bands)}):"
                     " choose them with bands: [...]")


def _stretch(ds, bands: tuple[int, ...], settings: RasterSettings) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = len(bands)
    s = settings.stretch
    if s is not None and s.min is not None:
        return (float(s.min),) * n, (float(s.max),) * n
    if s is None and settings.model_value_range is not None:
        return (float(settings.model_value_range[0]),) * n, (float(settings.model_value_range[1]),) * n
    if s is None and all(ds.dtypes[b - 1] == "uint8" for b in bands):
        return (0.0,) * n, (255.0,) * n
    pct = (s or Stretch()).percentiles
    f = max(1.0, max(ds.width, ds.height) / _OVERVIEW_SIDE)  # GDAL serves a decimated read from overviews
    shape = (len(set(bands)), max(1, round(ds.height / f)), max(1, round(ds.width / f)))
    unique = sorted(set(bands))
    data = valid_values(ds.read(unique, out_shape=shape, masked=True))
    by_band = {}
    for k, b in enumerate(unique):
        valid = data[k].compressed().astype(np.float64)
        lo, hi = np.percentile(valid, pct) if valid.size else (0.0, 1.0)
        by_band[b] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    return tuple(by_band[b][0] for b in bands), tuple(by_band[b][1] for b in bands)


def aoi_geometry(aoi: dict) -> tuple[Any, str]:
    """(shapely geometry, CRS) of an area of interest: `{bbox: [minx, miny, maxx, maxy], crs: ...}` or
    `{geometry: <GeoJSON geometry>, crs: ...}`; `crs` defaults to EPSG:4326. Raises ValueError naming the field."""
    import shapely
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    if not isinstance(aoi, dict) or not ({"bbox", "geometry"} & set(aoi)) or set(aoi) - {"bbox", "geometry", "crs"}:
        raise ValueError(f"aoi: expected {{bbox: [minx, miny, maxx, maxy], crs: ...}} or {{geometry: GeoJSON, crs: ...}},"
                         f" got {aoi!r}")
    crs = str(aoi.get("crs") or "EPSG:4326")
    try:
        CRS.from_user_input(crs)
    except CRSError as e:
        raise ValueError(f"aoi.crs: {crs!r} is not a CRS ({e})") from None
    if "bbox" in aoi:
        b = aoi["bbox"]
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and b[0] < b[2] and b[1] < b[3]):
            raise ValueError(f"aoi.bbox: expected [minx, miny, maxx, maxy] with min < max, got {b!r}")
        return shapely.box(*map(float, b)), crs
    try:
        geom = shapely.from_geojson(json.dumps(aoi["geometry"]))
    except (shapely.errors.GEOSException, TypeError, ValueError) as e:
        raise ValueError(f"aoi.geometry: not a GeoJSON geometry ({e})") from None
    if geom.is_empty or geom.area == 0:
        raise ValueError("aoi.geometry: not an area (empty, or a point or line)")
    return geom, crs


def _aoi_windows(plan: RasterPlan, aoi: dict) -> tuple[int, ...]:
    """Indices of the windows whose footprint meets the area of interest (in the raster's CRS)."""
    import shapely
    from pyproj import Transformer

    if plan.crs is None:
        raise ValueError("the raster has no CRS, so an aoi cannot select its windows")
    geom, crs = aoi_geometry(aoi)
    tf = Transformer.from_crs(crs, plan.crs, always_xy=True)
    geom = shapely.transform(shapely.segmentize(geom, max(geom.length / 400, 1e-9)),
                             lambda xy: np.column_stack(tf.transform(xy[:, 0], xy[:, 1])))
    wins = np.array(plan.windows(), dtype=np.float64)
    px = np.stack([wins[:, 0], wins[:, 1], wins[:, 0] + wins[:, 2], wins[:, 1] + wins[:, 3]], axis=1)
    feet = shapely.polygons(_corners(px, plan.transform))
    return tuple(int(i) for i in np.flatnonzero(shapely.intersects(feet, geom)))


def _from_gcps(ds, t: tuple[float, ...]) -> tuple[str | None, tuple[float, ...], bool, str | None]:
    """(crs, transform, georeferenced, note) of a raster georeferenced by ground control points only: the affine
    transform fitted to them (least squares) when it lands every one within half a pixel, else pixel coordinates
    with a note saying why (fpn maps boxes through an affine transform, not a GCP warp)."""
    from rasterio.transform import from_gcps

    gcps, gcp_crs = ds.gcps
    if not gcps or gcp_crs is None:
        return None, t, False, None
    if len(gcps) < 3:
        return None, t, False, f"{len(gcps)} ground control points, too few to fit a transform: pixel coordinates only"
    fitted = from_gcps(gcps)
    back = ~fitted
    worst = max(math.hypot(c - g.col, r - g.row) for g in gcps for c, r in [back @ (g.x, g.y)])
    if worst > 0.5:
        return None, t, False, (f"{len(gcps)} ground control points that no affine transform fits within half a "
                                f"pixel (worst {worst:.1f} px): pixel coordinates only (warp it first: gdalwarp)")
    return (_crs_string(gcp_crs), tuple(fitted)[:6], True,
            f"transform fitted to its {len(gcps)} ground control points (within {worst:.2f} px)")


def plan_raster(ds, settings: RasterSettings, *, band_assets: list[tuple[str, Any]] | None = None) -> RasterPlan:
    """The plan of an open raster (see the module docstring). `band_assets`: (href, open dataset) of single-band
    rasters, one per model channel, combined on the grid of the finest of them (`ds` is ignored). Raises
    ValueError naming the cause."""
    if band_assets:
        crss = {_crs_string(d.crs) for _, d in band_assets}
        if len(crss) > 1:
            raise ValueError(f"band assets in {len(crss)} CRSs ({', '.join(sorted(map(str, crss)))}): cannot combine")
        ds = min((d for _, d in band_assets), key=lambda d: abs(d.transform.determinant))
    crs = _crs_string(ds.crs)
    t = tuple(ds.transform)[:6]
    georef = crs is not None and not ds.transform.is_identity
    note = None
    if not georef and not band_assets:
        crs, t, georef, note = _from_gcps(ds, t)
    sides = _pixel_size_m(crs, t, ds.width, ds.height) if georef else None
    gsd = math.sqrt(sides[0] * sides[1]) if sides else None
    scale = scale_y = 1.0
    if sides and settings.target_gsd_m:
        scale, scale_y = (1.0 if abs(s / settings.target_gsd_m - 1) < 0.01 else s / settings.target_gsd_m
                          for s in sides)
    if band_assets:
        bands = (1,) * len(band_assets)
        ranges = [_stretch(d, (1,), settings) for _, d in band_assets]
        low, high = tuple(r[0][0] for r in ranges), tuple(r[1][0] for r in ranges)
        palette = None
    else:
        bands = _choose_bands(ds, settings)
        palette = palette_of(ds, bands[0]) if len(set(bands)) == 1 else None
        if palette is not None and settings.model_bands != ("red", "green", "blue"):
            raise ValueError(f"band {bands[0]} is paletted (colour-mapped) and the model takes "
                             f"{', '.join(settings.model_bands)}: expand it first (gdal_translate -expand rgb)")
        low, high = ((0.0,) * 3, (255.0,) * 3) if palette else _stretch(ds, bands, settings)
    square = abs(scale_y / scale - 1) < 0.01
    plan = RasterPlan(width=ds.width, height=ds.height, crs=crs if georef else None, transform=t, bands=bands,
                      low=low, high=high, scale=scale, window=max(16, round(settings.window / scale)),
                      margin=math.ceil(settings.margin / scale), gsd_m=gsd,
                      assets=tuple(h for h, _ in band_assets) if band_assets else None, palette=palette, note=note,
                      **({} if square else {"scale_y": scale_y, "window_y": max(16, round(settings.window / scale_y)),
                                            "margin_y": math.ceil(settings.margin / scale_y)}))
    if settings.aoi is not None:
        plan = RasterPlan(**{**asdict(plan), "keep": _aoi_windows(plan, settings.aoi)})
    return plan


@dataclass(frozen=True)
class WindowRead:
    image: np.ndarray  # [H, W, 3] uint8 in model pixels (1 x 1 when the window is all nodata)
    offset: tuple[int, int]  # raster pixel of the image's top-left corner
    scale: tuple[float, float]  # image pixels per raster pixel, x and y
    all_nodata: bool


def read_window(datasets: list, plan: RasterPlan, k: int) -> WindowRead:
    """Window `k` padded by the margin (clipped to the raster), resampled by `plan.scales`, stretched to uint8.
    `datasets`: the open raster, or its band assets in `plan.assets` order (`open_rasters`)."""
    from rasterio.enums import Resampling
    from rasterio.windows import Window, bounds, from_bounds

    x, y, w, h = plan.windows()[k]
    (sx, sy), mx, my = plan.scales, plan.margin, plan.margin_y or plan.margin
    x0, y0 = max(0, x - mx), max(0, y - my)
    x1, y1 = min(plan.width, x + w + mx), min(plan.height, y + h + my)
    out_w, out_h = max(1, round((x1 - x0) * sx)), max(1, round((y1 - y0) * sy))
    window = Window(x0, y0, x1 - x0, y1 - y0)
    resampling = (Resampling.nearest if sx == sy == 1 else Resampling.bilinear if min(sx, sy) >= 1
                  else Resampling.average)
    if plan.assets:  # the same ground from each band asset, onto this window's pixels
        from affine import Affine

        area = bounds(window, Affine(*plan.transform))
        channels = [valid_values(d.read(1, window=from_bounds(*area, transform=d.transform), out_shape=(out_h, out_w),
                                        masked=True, resampling=Resampling.bilinear)) for d in datasets]
    elif plan.palette:
        channels = list(read_palette(datasets[0], plan.bands[0], plan.palette, window, (out_h, out_w), min(sx, sy) < 1))
    else:
        unique = sorted(set(plan.bands))
        data = valid_values(datasets[0].read(unique, window=window, out_shape=(len(unique), out_h, out_w),
                                             masked=True, resampling=resampling))  # [bands, H, W]
        channels = [data[unique.index(b)] for b in plan.bands]
    valid = ~np.all([np.ma.getmaskarray(c) for c in channels], axis=0)
    scale = (out_w / (x1 - x0), out_h / (y1 - y0))
    if not valid.any():
        return WindowRead(np.zeros((1, 1, 3), np.uint8), (x0, y0), scale, True)
    img = np.empty((out_h, out_w, len(plan.bands)), np.uint8)
    for c, (channel, lo, hi) in enumerate(zip(channels, plan.low, plan.high)):
        band = np.ma.filled(channel.astype(np.float32), lo)  # nodata (NaN too): set to 0 below
        img[..., c] = np.clip((band - lo) * (255.0 / (hi - lo)), 0, 255).round().astype(np.uint8)
    img[~valid] = 0
    return WindowRead(img, (x0, y0), scale, False)


def _corners(boxes: np.ndarray, t: tuple[float, ...]) -> np.ndarray:
    """`[N, 4, 2]` map coordinates of the corners (x1,y1), (x2,y1), (x2,y2), (x1,y2) of `[N, 4]` pixel boxes."""
    a, b, c, d, e, f = t
    xs = boxes[:, [0, 2, 2, 0]].astype(np.float64)
    ys = boxes[:, [1, 1, 3, 3]].astype(np.float64)
    return np.stack([a * xs + b * ys + c, d * xs + e * ys + f], axis=-1)


def map_boxes(boxes: np.ndarray, t: tuple[float, ...]) -> np.ndarray:
    """`[N, 4]` map envelopes (minx, miny, maxx, maxy) of `[N, 4]` pixel boxes through the affine transform `t`."""
    if not len(boxes):
        return np.zeros((0, 4), np.float64)
    q = _corners(boxes, t)
    return np.concatenate([q.min(axis=1), q.max(axis=1)], axis=1)


def box_polygons(boxes: np.ndarray, t: tuple[float, ...]):
    """Shapely polygons of `[N, 4]` pixel boxes in map coordinates (exact under any affine transform), exterior
    rings counterclockwise (as RFC 7946 asks of GeoJSON)."""
    import shapely

    return shapely.orient_polygons(shapely.polygons(_corners(boxes, t)))
