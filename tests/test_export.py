"""`fpn export` of georeferenced detections: GeoParquet 1.1 (GeoPandas, DuckDB by bbox), GeoJSON in EPSG:4326,
COCO results scored by pycocotools, CSV; several CRSs; duplicates of overlapping scenes merged.

Outputs are made by the pipeline's own pieces without Ray (planner, decoder, Detector with the known-box model
`fakes.BrightBoxes`, Output's writer): the same frames `fpn run` writes, in seconds."""
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geo_scenes import make_output, write_scene
from jobs.cli import cli
from jobs.export import export
from pipeline.raster import RasterSettings


@pytest.fixture(scope="module")
def scene_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    scene = write_scene(root / "scene.tif")
    return scene, make_output(root / "out", [scene])


def test_geoparquet_reads_back_in_geopandas_with_the_crs_and_geometries_and_in_duckdb_by_bbox(scene_output, tmp_path):
    import geopandas as gpd
    from pyproj import CRS

    scene, out = scene_output
    dest = tmp_path / "trees.parquet"
    s = export(out, str(dest), fmt="geoparquet", batch_frames=2)
    assert s.detections == len(scene.squares) and s.crs == "EPSG:32633"
    geo = json.loads(pq.read_schema(dest).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert CRS.from_json_dict(geo["columns"]["geometry"]["crs"]) == CRS.from_epsg(32633)
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert pq.ParquetFile(dest).num_row_groups > 1  # written batch by batch

    df = gpd.read_parquet(dest)
    assert df.crs == CRS.from_epsg(32633) and len(df) == len(scene.squares)
    for geom, x1, y1, x2, y2 in zip(df.geometry, df.x1, df.y1, df.x2, df.y2):
        np.testing.assert_allclose(geom.bounds, scene.map_box(x1, y1, x2, y2), atol=1e-6)
    truth = sorted(scene.map_box(*b) for b in scene.pixel_boxes())
    np.testing.assert_allclose(sorted(g.bounds for g in df.geometry), truth, atol=0.5 * scene.gsd)

    # the bbox covering columns: a spatial query in plain DuckDB SQL (no spatial extension)
    x0, y0, x1_, y1_ = truth[0]
    sql = (f"SELECT x1, y1 FROM read_parquet('{dest}') WHERE bbox.xmin >= {x0 - 1} AND bbox.xmax <= {x1_ + 1} "
           f"AND bbox.ymin >= {y0 - 1} AND bbox.ymax <= {y1_ + 1}")
    assert len(duckdb.sql(sql).fetchall()) == 1


def test_geojson_is_valid_rfc7946_in_wgs84(scene_output, tmp_path):
    import shapely
    from pyproj import Transformer

    scene, out = scene_output
    dest = tmp_path / "trees.geojson"
    assert export(out, str(dest), fmt="geojson").detections == len(scene.squares)
    fc = json.loads(dest.read_text())
    assert fc["type"] == "FeatureCollection" and "crs" not in fc  # RFC 7946: WGS 84 lon/lat, no crs member
    to_wgs84 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    for f in fc["features"]:
        g = shapely.geometry.shape(f["geometry"])
        assert f["geometry"]["type"] == "Polygon" and g.is_valid
        p = f["properties"]
        lon, lat = to_wgs84.transform(*scene.map_box(p["x1"], p["y1"], p["x2"], p["y2"])[:2])
        assert g.bounds[0] == pytest.approx(lon, abs=1e-6) and g.bounds[1] == pytest.approx(lat, abs=1e-6)
        assert 14.9 < lon < 15.1 and 47.8 < lat < 47.9  # UTM 33N, 500 km east: near 15 E


def test_coco_results_score_with_pycocotools(scene_output, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    scene, out = scene_output
    dest = tmp_path / "results.json"
    export(out, str(dest), fmt="coco")
    images = json.loads((tmp_path / "results.json.images.json").read_text())
    assert [(i["file_name"], i["width"], i["height"]) for i in images] == [(str(scene.path), 1200, 1000)]
    gt = {"images": [{"id": images[0]["id"], "width": 1200, "height": 1000, "file_name": "scene.tif"}],
          "categories": [{"id": 1, "name": "bright"}],
          "annotations": [{"id": k + 1, "image_id": images[0]["id"], "category_id": 1, "iscrowd": 0,
                           "bbox": [x, y, s, s], "area": s * s} for k, (x, y, s) in enumerate(scene.squares)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(dest)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)  # AP50: every square found, nothing else


def test_coco_results_take_a_datasets_category_ids_by_label_name(scene_output, tmp_path):
    """With --categories GT.json, category_id is GT's id of the category named as the label ("bright" -> 7, where
    the label is 1), so the results score against GT; a label name GT lacks is refused in one line, nothing
    written. Without it, the label as before."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    scene, out = scene_output
    dest = tmp_path / "results.json"
    export(out, str(dest), fmt="coco")
    assert {d["category_id"] for d in json.loads(dest.read_text())} == {1}
    image = json.loads((tmp_path / "results.json.images.json").read_text())[0]
    gt = {"images": [{"id": image["id"], "width": 1200, "height": 1000, "file_name": "scene.tif"}],
          "categories": [{"id": 3, "name": "dark"}, {"id": 7, "name": "Bright"}],
          "annotations": [{"id": k + 1, "image_id": image["id"], "category_id": 7, "iscrowd": 0,
                           "bbox": [x, y, s, s], "area": s * s} for k, (x, y, s) in enumerate(scene.squares)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = CliRunner().invoke(cli, ["export", out, "-o", str(dest), "--format", "coco", "--categories",
                                 str(tmp_path / "gt.json")])
    assert r.exit_code == 0, r.output
    assert {d["category_id"] for d in json.loads(dest.read_text())} == {7}
    coco = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(coco, coco.loadRes(str(dest)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[1] == pytest.approx(1.0)

    gt["categories"] = [{"id": 3, "name": "dark"}]
    (tmp_path / "dark.json").write_text(json.dumps(gt))
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "r2.json"), "--format", "coco", "--categories",
                                 str(tmp_path / "dark.json")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"label 1 'bright': {tmp_path / 'dark.json'} has no category of that name (it has dark)" in r.output
    assert not (tmp_path / "r2.json").exists()


def test_csv_and_the_cli(scene_output, tmp_path):
    import pyarrow.csv as pcsv

    scene, out = scene_output
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "d.csv"), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert f"{len(scene.squares)} detections -> {tmp_path / 'd.csv'} (csv, EPSG:32633)" in r.output
    t = pcsv.read_csv(tmp_path / "d.csv")
    assert t.num_rows == len(scene.squares) and {"x1", "map_x1", "crs", "score", "source"} <= set(t.column_names)
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "x"), "--crs", "EPSG:nope"])
    assert r.exit_code == 1 and "EPSG:nope" in r.output and "Traceback" not in r.output
    # the format a name says, without --format (d.csv held GeoParquet); a name that says another, or .json, refused
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "named.csv")])
    assert r.exit_code == 0 and "(csv, EPSG:32633)" in r.output and pcsv.read_csv(tmp_path / "named.csv").num_rows
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "n.geojson")])
    assert r.exit_code == 0 and "(geojson, EPSG:4326)" in r.output
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "c.json")])
    assert r.exit_code == 1 and "a .json file is COCO results or GeoJSON: say which with --format" in r.output
    r = CliRunner().invoke(cli, ["export", out, "-o", str(tmp_path / "m.parquet"), "--format", "csv"])
    assert r.exit_code == 1 and "its name says geoparquet, and --format says csv: name it .csv" in r.output
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "m.parquet").exists()


def test_a_directory_given_as_the_file_to_write_is_refused_and_left_as_it_was(scene_output, tmp_path):
    """export, report and render write one file each: a directory given for it (an fpn output, say) fails in one
    line before any work and is left as it was. Export used to say it wrote there (exit 0) and leave the directory
    mode 644 (unreadable to a non-root owner) with a temporary file inside; report and render ended in a traceback."""
    scene, out = scene_output
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    mode = d.stat().st_mode
    cases = [(["export", out, "-o", d, "--format", fmt], f"detections.{suffix}")
             for fmt, suffix in (("geoparquet", "parquet"), ("geojson", "geojson"), ("coco", "json"), ("csv", "csv"))]
    cases += [(["report", out, "-o", d], "report.html"), (["render", out, scene.path, d], "frame.png")]
    for args, example in cases:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 1, (args, r.output)
        assert r.output.strip() == f"Error: {d} is a directory: name the file to write (e.g. {d}/{example})", args
    assert d.stat().st_mode == mode and [f.name for f in d.iterdir()] == ["keep.txt"]


def test_several_crs_need_a_choice_and_overlapping_scenes_merge_with_dedup(tmp_path):
    import geopandas as gpd

    a = write_scene(tmp_path / "a.tif", width=800, height=600, squares=((400, 100, 20), (600, 300, 16)))
    # b: 40 m (200 px) further east; its square at x=400 is a's at x=600 on the ground, the other is its own
    b = write_scene(tmp_path / "b.tif", width=800, height=600, squares=((400, 300, 16), (700, 500, 20)),
                    origin=(500_040.0, 5_300_000.0))
    c = write_scene(tmp_path / "c.tif", width=800, height=600, squares=((500, 200, 20),), crs="EPSG:32634")
    out = make_output(tmp_path / "out", [a, b])
    s = export(out, str(tmp_path / "all.parquet"), fmt="geoparquet")
    assert s.detections == 4 and s.duplicates == 0
    s = export(out, str(tmp_path / "dedup.parquet"), fmt="geoparquet", dedup_iou=0.5)
    assert s.detections == 3 and s.duplicates == 1
    assert len(gpd.read_parquet(tmp_path / "dedup.parquet")) == 3

    mixed = make_output(tmp_path / "mixed", [a, c])
    with pytest.raises(ValueError, match=r"holds detections in 2 CRSs \(EPSG:32633, EPSG:32634\).*--crs"):
        export(mixed, str(tmp_path / "m.parquet"), fmt="geoparquet")
    s = export(mixed, str(tmp_path / "m.parquet"), fmt="geoparquet", crs="EPSG:4326")
    df = gpd.read_parquet(tmp_path / "m.parquet")
    assert s.detections == 3 and df.crs.to_epsg() == 4326
    lon = sorted(round(g.bounds[0]) for g in df.geometry)
    assert lon == [15, 15, 21]  # UTM 33N and 34N, 500 km east: near 15 E and 21 E

    # CSV: map boxes in --crs (it said "EPSG:4326" and wrote UTM), the envelopes of the GeoParquet's polygons
    import pyarrow.csv as pcsv

    with pytest.raises(ValueError, match=r"holds detections in 2 CRSs"):
        export(mixed, str(tmp_path / "m.csv"), fmt="csv")
    assert export(mixed, str(tmp_path / "m.csv"), fmt="csv", crs="EPSG:4326").crs == "EPSG:4326"
    t = pcsv.read_csv(tmp_path / "m.csv")
    assert set(t.column("crs").to_pylist()) == {"EPSG:4326"}
    got = sorted(zip(*(t.column(c).to_pylist() for c in ("map_x1", "map_y1", "map_x2", "map_y2"))))
    np.testing.assert_allclose(got, sorted(g.bounds for g in df.geometry), atol=1e-9)
    # COCO results are source pixels: several CRSs do not matter (it was refused), and --crs is no setting of them
    s = export(mixed, str(tmp_path / "m.json"), fmt="coco")
    assert s.detections == 3 and s.crs is None and len(json.loads((tmp_path / "m.json").read_text())) == 3
    with pytest.raises(ValueError, match="COCO results are boxes in source pixels"):
        export(mixed, str(tmp_path / "m.json"), fmt="coco", crs="EPSG:4326")
    with pytest.raises(ValueError, match=r"GeoJSON is always EPSG:4326 \(RFC 7946\)"):
        export(mixed, str(tmp_path / "m.geojson"), fmt="geojson", crs="EPSG:3857")


def test_a_box_across_the_antimeridian_is_split_in_geographic_exports(tmp_path):
    """RFC 7946 3.1.9: a box across 180 degrees is a MultiPolygon of its two sides. Its corners, transformed one
    by one, made a 4 m box into a polygon around the globe (lon -180 to 180 the long way)."""
    import geopandas as gpd
    import pyarrow.csv as pcsv
    import shapely
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32660", always_xy=True).transform(180.0, 60.0)
    scene = write_scene(tmp_path / "am.tif", width=800, height=600, squares=((400, 100, 20), (600, 300, 16)),
                        crs="EPSG:32660", origin=(x - 400 * 0.2 - 2.0, y + 100 * 0.2 + 2.0))  # the first: 180 E
    out = make_output(tmp_path / "out", [scene])
    export(out, str(tmp_path / "am.geojson"), fmt="geojson")
    shapes = sorted((shapely.geometry.shape(f["geometry"]) for f in json.loads(
        (tmp_path / "am.geojson").read_text())["features"]), key=lambda g: g.geom_type)
    assert [g.geom_type for g in shapes] == ["MultiPolygon", "Polygon"]
    across, inside = shapes
    east, west = sorted(across.geoms, key=lambda g: -g.bounds[0])
    assert 179.99 < east.bounds[0] and east.bounds[2] == 180.0 and west.bounds[0] == -180.0 and west.bounds[2] < -179.99
    assert inside.bounds[2] - inside.bounds[0] < 1e-3 and across.is_valid
    # both sides together are the 4 m box: its area on the ellipsoid
    from pyproj import Geod

    assert abs(Geod(ellps="WGS84").geometry_area_perimeter(across)[0]) == pytest.approx(16.0, rel=0.02)
    export(out, str(tmp_path / "am.parquet"), fmt="geoparquet", crs="EPSG:4326")
    geo = json.loads(pq.read_schema(tmp_path / "am.parquet").metadata[b"geo"])
    assert geo["columns"]["geometry"]["geometry_types"] == ["Polygon", "MultiPolygon"]
    df = gpd.read_parquet(tmp_path / "am.parquet")
    assert sorted(df.geometry.geom_type) == ["MultiPolygon", "Polygon"]
    export(out, str(tmp_path / "am.csv"), fmt="csv", crs="EPSG:4326")
    t = pcsv.read_csv(tmp_path / "am.csv")
    assert sorted(t.column("map_x2").to_pylist())[-1] == 180.0  # the envelope of both sides: no narrower box exists
    # in its own CRS (UTM 60N) nothing is split
    export(out, str(tmp_path / "utm.parquet"), fmt="geoparquet")
    assert set(gpd.read_parquet(tmp_path / "utm.parquet").geometry.geom_type) == {"Polygon"}
    # --dedup in lon/lat: another scene 1.5 m further east sees both objects again, each overlapping its first
    # sighting by IoU 0.45 and 0.36: no duplicates, as in metres (the boxes around the globe overlapped by ~1)
    shifted = write_scene(tmp_path / "am2.tif", width=800, height=600, squares=((400, 100, 20), (600, 300, 16)),
                          crs="EPSG:32660", origin=(x - 400 * 0.2 - 0.5, y + 100 * 0.2 + 2.0))
    both = make_output(tmp_path / "both", [scene, shifted])
    for crs in (None, "EPSG:4326"):
        s = export(both, str(tmp_path / f"dedup-{crs}.parquet"), fmt="geoparquet", crs=crs, dedup_iou=0.4)
        assert (s.detections, s.duplicates) == (3, 1), crs  # IoU 0.45 > 0.4: the pair across 180 E merged
        s = export(both, str(tmp_path / f"dedup5-{crs}.parquet"), fmt="geoparquet", crs=crs, dedup_iou=0.5)
        assert (s.detections, s.duplicates) == (4, 0), crs


def test_an_empty_export_has_the_columns_of_a_full_one(scene_output, tmp_path):
    """Nothing above --min-score: the file still has every column (GeoParquet wrote `geometry` alone while its
    metadata named a `bbox` covering column, so GeoPandas' bbox filter failed; CSV wrote no header)."""
    import geopandas as gpd
    import pyarrow.csv as pcsv

    scene, out = scene_output
    for fmt, suffix in (("geoparquet", "parquet"), ("csv", "csv")):
        full, empty = tmp_path / f"full.{suffix}", tmp_path / f"empty.{suffix}"
        assert export(out, str(full), fmt=fmt).detections == len(scene.squares)
        assert export(out, str(empty), fmt=fmt, min_score=0.95).detections == 0
        if fmt == "csv":
            assert pcsv.read_csv(empty).column_names == pcsv.read_csv(full).column_names
            continue
        assert pq.read_schema(empty) == pq.read_schema(full)
        assert pq.read_table(empty).num_rows == 0
        assert len(gpd.read_parquet(empty, bbox=(0, 0, 1e7, 1e7))) == 0
        assert len(gpd.read_parquet(full, bbox=(0, 0, 1e7, 1e7))) == len(scene.squares)


def test_pixel_only_rasters_export_pixel_boxes_and_say_so(tmp_path):
    from PIL import Image

    img = np.zeros((300, 400, 3), np.uint8)
    img[100:140, 50:90] = 255
    path = tmp_path / "plain.tif"  # a TIFF without a georeference
    Image.fromarray(img).save(path)
    out = make_output(tmp_path / "out", [path], RasterSettings(window=512, margin=0, target_gsd_m=0.1))
    s = export(out, str(tmp_path / "px.parquet"), fmt="geoparquet")
    assert s.crs is None and s.detections == 1
    geo = json.loads(pq.read_schema(tmp_path / "px.parquet").metadata[b"geo"])
    assert geo["columns"]["geometry"]["crs"] is None
    assert pq.read_table(tmp_path / "px.parquet").column("bbox").to_pylist() == [
        {"xmin": 50.0, "ymin": 100.0, "xmax": 90.0, "ymax": 140.0}]
    with pytest.raises(ValueError, match="no georeferenced detections, and GeoJSON needs map coordinates"):
        export(out, str(tmp_path / "px.geojson"), fmt="geojson")
    for fmt in ("csv", "geoparquet"):  # csv said "(csv, EPSG:3857)" with empty map columns; geoparquet wrote none
        with pytest.raises(ValueError, match="no georeferenced detections to reproject to EPSG:3857"):
            export(out, str(tmp_path / f"px.{fmt}"), fmt=fmt, crs="EPSG:3857")


def test_export_writes_to_object_storage(scene_output, s3):
    import geopandas as gpd

    fs, endpoint = s3
    scene, out = scene_output
    s = export(out, "s3://test/exports/trees.parquet", fmt="geoparquet", storage_options={"s3": {"endpoint_url": endpoint}})
    assert s.detections == len(scene.squares)
    with fs.open("test/exports/trees.parquet", "rb") as f:
        df = gpd.read_parquet(f)
    assert df.crs.to_epsg() == 32633 and len(df) == len(scene.squares)
    assert fs.ls("test/exports") == ["test/exports/trees.parquet"]  # one object, nothing temporary beside it


@pytest.mark.parametrize("tall, iou", [(False, 0.25), (True, 0.02)])
def test_dedup_sweep_matches_a_greedy_merge_over_all_pairs(monkeypatch, tall, iou):
    """The bounded-memory sweep (sorted chunks of 16, groups closed as it passes them) drops exactly what a greedy,
    score-ordered merge over every pair in memory drops: chains, groups spanning chunks, pairs of one window of one
    source kept (the model's own boxes), pairs of two windows of one source merged (an object across a window edge)."""
    import shapely

    from jobs import dedup

    monkeypatch.setattr(dedup, "CHUNK", 16)
    rng = np.random.default_rng(7)
    n = 1500
    xy = rng.uniform(0, 120, (n, 2)) * ([1, 3] if tall else [3, 1])
    xy[1::3] = xy[0::3][: len(xy[1::3])] + rng.uniform(-4, 4, (len(xy[1::3]), 2))  # near copies: duplicates
    wh = rng.uniform(6, 12, (n, 2))
    boxes = np.column_stack([xy, xy + wh])
    sources = rng.integers(0, 3, n)
    windows = rng.integers(0, 2, n)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    geoms = shapely.box(*boxes.T)
    has = rng.uniform(size=n) > 0.05  # a few rows without map coordinates: never dropped
    table = pa.table({"source": [f"s{s}" for s in sources], "frame_index": windows, "score": scores, "i": np.arange(n)})
    batches = [table.slice(k, 100) for k in range(0, n, 100)]
    drop = dedup.duplicates(iter(batches), lambda t: (geoms[t.column("i").to_numpy()], has[t.column("i").to_numpy()]),
                            iou)

    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")  # every pair, in memory
    inter = shapely.area(shapely.intersection(geoms[left], geoms[right]))
    overlap = inter / (shapely.area(geoms[left]) + shapely.area(geoms[right]) - inter)
    partners = {i: [] for i in range(n)}
    for i, j, v in zip(left, right, overlap):
        if i != j and has[i] and has[j] and (sources[i], windows[i]) != (sources[j], windows[j]) and v > iou:
            partners[i].append(j)
    removed = set()
    for i in sorted(range(n), key=lambda i: (-float(scores[i]), i)):
        if i not in removed:
            removed.update(partners[i])
    assert len(removed) > 100 and any(len(p) > 1 for p in partners.values())
    assert set(np.flatnonzero(drop)) == removed


def test_coco_results_of_a_mask_rcnn_output_carry_its_masks(tmp_path):
    """The masks were in the Parquet rows only: COCO results had boxes, so instance segmentation could not be
    scored."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipeline.output import Output, frame_id, frame_schema

    masks = []
    for x, y in ((4, 6), (30, 20)):
        m = np.zeros((48, 64), np.uint8)
        m[y:y + 10, x:x + 12] = 1
        m[y, x] = 0
        rle = mask_utils.encode(np.asfortranarray(m))
        masks.append({"size": rle["size"], "counts": rle["counts"].decode()})
    dets = [{"x1": 4.0, "y1": 6.0, "x2": 16.0, "y2": 16.0, "score": 0.9, "label": 1, "label_name": "thing",
             "level": 2, "mask": masks[0]},
            {"x1": 30.0, "y1": 20.0, "x2": 42.0, "y2": 30.0, "score": 0.8, "label": 1, "label_name": "thing",
             "level": 2, "mask": masks[1]}]
    row = {"frame_id": frame_id("/a.png", 0), "source": "/a.png", "source_kind": "image", "frame_index": 0,
           "width": 64, "height": 48, "num_detections": 2, "detections": dets}
    Output(str(tmp_path / "out")).write_frames(pa.Table.from_pylist([row], schema=frame_schema(with_masks=True)))
    dest = tmp_path / "r.json"
    export(str(tmp_path / "out"), str(dest), fmt="coco")
    got = json.loads(dest.read_text())
    assert [d["segmentation"] for d in got] == masks
    image = json.loads((tmp_path / "r.json.images.json").read_text())[0]
    gt = {"images": [{"id": image["id"], "width": 64, "height": 48, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "thing"}],
          "annotations": [{"id": k + 1, "image_id": image["id"], "category_id": 1, "iscrowd": 0, "segmentation": m,
                           "area": float(mask_utils.area(m | {"counts": m["counts"].encode()})),
                           "bbox": list(mask_utils.toBbox(m | {"counts": m["counts"].encode()}))}
                          for k, m in enumerate(masks)]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ev = COCOeval(COCO(str(tmp_path / "gt.json")), COCO(str(tmp_path / "gt.json")).loadRes(str(dest)), "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
