"""Frame rows from detections (pipeline.detect.detections_to_rows): built from whole arrays, they hold what the
output contract says of each detection, checked here one detection at a time."""
import math

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from fpn_model.predict import Detections
from pipeline.detect import detections_to_rows
from pipeline.output import frame_id, frame_schema
from pipeline.raster import map_boxes

T = (0.5, 0.0, 500000.0, 0.0, -0.5, 4100000.0)  # 0.5 m pixels, north up


def _batch():
    """Two windows of a georeferenced raster (resampled 2x, the second offset), and an image frame."""
    n = 3
    cols = {"frame_id": [frame_id("r.tif", 0), frame_id("r.tif", 1), frame_id("a.png", 0)],
            "source": ["r.tif", "r.tif", "a.png"], "source_kind": ["raster", "raster", "image"],
            "frame_index": [0, 1, 0], "pts_s": [np.nan] * n, "width": [400, 400, 64], "height": [400, 400, 48],
            "window_x": [0, 200, 0], "window_y": [0, 0, 0], "window_width": [200, 200, 64],
            "window_height": [200, 200, 48], "offset_x": [0, 168, 0], "offset_y": [0, 0, 0],
            "scale_x": [2.0, 2.0, 1.0], "scale_y": [2.0, 2.0, 1.0], "crs": ["EPSG:32633", "EPSG:32633", None],
            "transform": [np.array(T)] * 2 + [np.zeros(6)], "all_nodata": [False] * n}
    batch = {k: np.array(v, dtype=object if k in ("crs", "transform") else None) for k, v in cols.items()}
    batch["image"] = [np.zeros((464, 464, 3), np.uint8)] * 2 + [np.zeros((48, 64, 3), np.uint8)]
    return batch


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


def _box_mask(box, side: int) -> dict:
    """A mask filling its box but a corner, over a `side` x `side` image."""
    m = np.zeros((side, side), np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = 1
    m[y1, x1] = 0
    return _rle(m)


def _mask_in_raster(rle: dict, batch, i) -> dict:
    """A window's mask over the whole raster, the plain way: each raster pixel looked up at its centre in the
    image the model saw, in a raster-sized array."""
    m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    ys, xs = np.mgrid[0:batch["height"][i], 0:batch["width"][i]] + 0.5
    u = np.floor((xs - batch["offset_x"][i]) * batch["scale_x"][i]).astype(int)
    v = np.floor((ys - batch["offset_y"][i]) * batch["scale_y"][i]).astype(int)
    inside = (u >= 0) & (u < m.shape[1]) & (v >= 0) & (v < m.shape[0])
    full = np.zeros(xs.shape, np.uint8)
    full[inside] = m[v[inside], u[inside]]
    return _rle(full)


def _dets(rng, n, labels=3, masks=False):
    xy = rng.uniform(0, 440, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (n, 2)).astype(np.float32)], 1)
    rles = [_box_mask(b, 464) for b in boxes] if masks else None
    return Detections(boxes, rng.uniform(0, 1, n).astype(np.float32), rng.integers(1, labels, n).astype(np.int32),
                      rng.integers(2, 6, n).astype(np.int8), rles)


def _expected(batch, i, d, name):
    """The detections of frame `i`, one at a time: boxes undo the resampling and the window's offset; raster
    windows keep the boxes centred in their core; georeferenced ones get map envelopes."""
    s = np.array([batch["scale_x"][i], batch["scale_y"][i]] * 2, np.float32)
    boxes = d.boxes / s + np.array([batch["offset_x"][i], batch["offset_y"][i]] * 2, np.float32)
    rows = []
    for j, b in enumerate(boxes):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        x, y, w, h = (batch[k][i] for k in ("window_x", "window_y", "window_width", "window_height"))
        if batch["source_kind"][i] == "raster" and not (x <= cx < x + w and y <= cy < y + h):
            continue
        r = {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": d.scores[j], "label": int(d.labels[j]),
             "label_name": name(int(d.labels[j])), "level": int(d.levels[j])}
        m = map_boxes(b[None], T)[0] if batch["crs"][i] else [None] * 4
        r.update(zip(("map_x1", "map_y1", "map_x2", "map_y2"), m))
        if d.masks is not None:  # a raster window's in raster pixels, as its box
            r["mask"] = d.masks[j] if batch["source_kind"][i] != "raster" else _mask_in_raster(d.masks[j], batch, i)
        rows.append(r)
    return rows


def _same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(
        (g is None and w is None) or (isinstance(w, dict) and g == w) or
        (g is not None and w is not None and not isinstance(w, (str, dict)) and math.isclose(g, w, rel_tol=1e-6))
        or g == w for g, w in ((got[k], want[k]) for k in want))


def test_rows_hold_each_detection_as_the_contract_says():
    rng = np.random.default_rng(0)
    name = {1: "car", 2: "tree"}.get
    for masks in (False, True):
        batch = _batch()
        dets = [_dets(rng, 40, masks=masks), _dets(rng, 25, masks=masks), _dets(rng, 0, masks=masks)]
        table = detections_to_rows(batch, dets, name, "m", frame_schema(masks))
        assert table.schema == frame_schema(masks)
        got = table.column("detections").to_pylist()
        counts = table.column("num_detections").to_pylist()
        for i, d in enumerate(dets):
            want = _expected(batch, i, d, name)
            assert 0 < len(want) < len(d.boxes) if i < 2 else want == []  # windows keep some, not all
            assert counts[i] == len(got[i]) == len(want)
            assert all(_same(g, w) for g, w in zip(got[i], want)), (got[i][:2], want[:2])
        assert table.column("crs").to_pylist() == ["EPSG:32633", "EPSG:32633", None]


def test_no_detections_at_all_give_empty_lists():
    table = detections_to_rows(_batch(), [_dets(np.random.default_rng(1), 0)] * 3, str, "m", frame_schema())
    assert table.column("detections").to_pylist() == [[], [], []]
    assert table.column("num_detections").to_pylist() == [0, 0, 0]
    assert isinstance(table.column("detections").type, pa.ListType)
