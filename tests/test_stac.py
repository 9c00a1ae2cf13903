"""STAC inputs: an Item end to end (its id and datetime in every row), ItemCollections and Catalogs (local and on
S3), asset choice, signed asset URLs kept out of outputs, and a STAC API search against a real server."""
import datetime as dt
import json
import os
import sys

import pyarrow.dataset as pads
import pystac
import pytest

from conftest import _free_port, serve_until_listening
from fakes import BrightBoxes, backend
from geo_scenes import write_scene
from jobs.runner import run
from jobs.spec import plan_from_dict
from pipeline.sources import expand_inputs

WHEN = dt.datetime(2024, 6, 1, 10, 30, tzinfo=dt.timezone.utc)


def make_item(item_id: str, href: str, when=WHEN, **assets) -> pystac.Item:
    item = pystac.Item(item_id, {"type": "Polygon", "coordinates": [[[15.0, 47.8], [15.1, 47.8], [15.1, 47.9],
                                                                     [15.0, 47.9], [15.0, 47.8]]]},
                       [15.0, 47.8, 15.1, 47.9], when, {})
    item.add_asset("visual", pystac.Asset(href, media_type=pystac.MediaType.COG))
    for key, h in assets.items():
        item.add_asset(key, pystac.Asset(h, media_type=pystac.MediaType.COG))
    return item


@pytest.mark.slow
def test_a_stac_item_runs_end_to_end_with_its_id_and_datetime_in_every_row(ray_session, tmp_path):
    scene = write_scene(tmp_path / "scene.tif", width=600, height=500, squares=((400, 100, 20), (450, 300, 16)))
    item = make_item("scene-1", "./scene.tif")
    item.set_self_href(str(tmp_path / "scene-1.json"))
    item.save_object(include_self_link=False)
    doc = run(plan_from_dict({"inputs": [str(tmp_path / "scene-1.json")], "output": str(tmp_path / "out"),
                              "model": backend(BrightBoxes), "tile": None, "raster_window": 1024, "raster_margin": 64,
                              "bands": [4, 3, 2], "stretch": {"min": 0, "max": 4000}}))
    t = pads.dataset(str(tmp_path / "out" / "frames"), format="parquet").to_table()
    assert doc["state"] == "succeeded" and t.num_rows == 2  # 1200 x 1000 model pixels: 2 x 1 windows of 1024
    assert set(t.column("stac_item").to_pylist()) == {"scene-1"}
    assert set(t.column("datetime").to_pylist()) == {WHEN}
    assert set(t.column("source").to_pylist()) == {str(scene.path)}
    assert sum(t.column("num_detections").to_pylist()) == 2


def test_collections_and_catalogs_give_each_items_asset(tmp_path):
    write_scene(tmp_path / "a.tif", width=64, height=64, squares=())
    a = make_item("a", str(tmp_path / "a.tif"), red=str(tmp_path / "a.tif"))
    b = make_item("b", "https://example.com/b.tif?X-Amz-Signature=abc123&X-Amz-Credential=KEY&tile=1",
                  when=dt.datetime(2024, 7, 2, tzinfo=dt.timezone.utc))
    (tmp_path / "items.json").write_text(json.dumps(pystac.ItemCollection([a, b]).to_dict()))
    got = expand_inputs([str(tmp_path / "items.json")])
    assert [(s.stac_item, s.datetime) for s in got] == [("a", WHEN.isoformat()), ("b", "2024-07-02T00:00:00+00:00")]
    signed = got[1]
    assert "X-Amz-Signature=abc123" in signed.url  # read with its signature ...
    assert signed.canonical == "https://example.com/b.tif?tile=1"  # ... identified (and written) without it

    cat = pystac.Catalog("cat", "two scenes")
    for i in ("c1", "c2"):
        cat.add_item(make_item(i, str(tmp_path / "a.tif")))
    cat.normalize_hrefs(str(tmp_path / "catalog"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    got = expand_inputs([str(tmp_path / "catalog" / "catalog.json")])
    assert [s.stac_item for s in got] == ["c1"]  # one raster, one identity: both items name the same file
    with pytest.raises(ValueError, match="STAC item b has no asset 'red' \\(it has visual\\)"):
        expand_inputs([str(tmp_path / "items.json")], stac_asset="red")
    (tmp_path / "not-stac.json").write_text('{"type": "Topology"}')
    with pytest.raises(ValueError, match="not-stac.json: not a usable STAC document"):
        expand_inputs([str(tmp_path / "not-stac.json")])


def test_a_catalog_on_s3_is_read_through_the_jobs_storage_options(s3, tmp_path):
    fs, endpoint = s3
    cat = pystac.Catalog("remote", "on s3")
    cat.add_item(make_item("r1", "./r1.tif"))
    cat.normalize_hrefs(str(tmp_path / "cat"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    fs.put(str(tmp_path / "cat"), "test/stac", recursive=True)
    got = expand_inputs(["s3://test/stac/catalog.json"], {"s3": {"endpoint_url": endpoint}})
    assert [(s.url, s.stac_item) for s in got] == [("s3://test/stac/r1/r1.tif", "r1")]


@pytest.fixture
def stac_api(tmp_path):
    """A STAC API (stac-fastapi-static) on 127.0.0.1 over a static catalog the test writes: collection `scenes`
    with items s1 (June, near 15 E), s2 (July, near 15 E) and s3 (June, near 21 E). Yields the API's URL."""
    col = pystac.Collection("scenes", "test scenes", pystac.Extent(
        pystac.SpatialExtent([[15.0, 47.8, 21.1, 47.9]]), pystac.TemporalExtent([[WHEN, None]])))
    col.add_item(make_item("s1", str(tmp_path / "s1.tif")))
    col.add_item(make_item("s2", str(tmp_path / "s2.tif"), when=dt.datetime(2024, 7, 2, tzinfo=dt.timezone.utc)))
    s3 = make_item("s3", str(tmp_path / "s3.tif"))
    s3.geometry["coordinates"] = [[[21.0, 47.8], [21.1, 47.8], [21.1, 47.9], [21.0, 47.9], [21.0, 47.8]]]
    s3.bbox = [21.0, 47.8, 21.1, 47.9]
    col.add_item(s3)
    yield from serve_catalog(col, tmp_path)


def serve_catalog(col: pystac.Collection, tmp_path):
    """Save a catalog holding `col` under tmp_path/stac and serve it with stac-fastapi-static on 127.0.0.1; yields
    the API's URL."""
    cat = pystac.Catalog("root", "root catalog")
    cat.add_child(col)
    cat.normalize_hrefs(f"file://{tmp_path / 'stac'}")  # the server follows file:// links
    cat.save(pystac.CatalogType.ABSOLUTE_PUBLISHED)  # an API serves absolute asset hrefs
    port = _free_port()
    env = {**os.environ, "CATALOG_HREF": str(tmp_path / "stac" / "catalog.json"), "APP_HOST": "127.0.0.1",
           "APP_PORT": str(port), "RELOAD": "false"}
    proc = serve_until_listening([sys.executable, "-m", "stac_fastapi.static.app"], port, "the STAC API server",
                                 env=env, timeout_s=60)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_stac_api_search_gives_the_items_of_its_collection_bbox_and_time(stac_api, tmp_path):
    found = expand_inputs([], stac_search={"url": stac_api, "collections": ["scenes"], "bbox": [14.9, 47.7, 15.2, 48.0],
                                           "datetime": "2024-06-01/2024-06-30"})
    # (stac-fastapi-static serves asset hrefs rebased onto its own URL)
    assert [(s.stac_item, s.url.rsplit("/", 1)[1], s.datetime) for s in found] == [("s1", "s1.tif", WHEN.isoformat())]
    found = expand_inputs([], stac_search={"url": stac_api, "collections": ["scenes"], "limit": 2})
    assert len(found) == 2
    plan = plan_from_dict({"output": str(tmp_path / "o"), "stac_search": {"url": stac_api, "limit": 5}})
    assert plan.inputs == () and plan.stac_search["limit"] == 5
    with pytest.raises(ValueError, match="stac_search.colections: unknown"):
        plan_from_dict({"output": str(tmp_path / "o"), "stac_search": {"url": stac_api, "colections": ["x"]}})


def test_band_assets_are_combined_on_the_finest_grid(tmp_path):
    """red at 0.2 m, green and blue at 0.4 m: one raster on the red grid, boxes in its pixels and on the ground."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from fakes import BrightBoxes
    from pipeline.decode import Sampling, decode_unit
    from pipeline.detect import Detector
    from pipeline.raster import RasterSettings, Stretch
    from pipeline.plan import plan_units

    squares = ((100, 60, 20), (300, 200, 16))  # x, y, side on the 0.2 m grid (even: whole 0.4 m pixels)
    for name, gsd in (("red", 0.2), ("green", 0.4), ("blue", 0.4)):
        f = round(gsd / 0.2)
        data = np.full((1, 300 // f, 400 // f), 1000, np.uint16)
        for x, y, s in squares:
            data[0, y // f:(y + s) // f, x // f:(x + s) // f] = 3000
        with rasterio.open(tmp_path / f"{name}.tif", "w", driver="GTiff", width=400 // f, height=300 // f, count=1,
                           dtype="uint16", crs="EPSG:32633", transform=from_origin(500_000, 5_300_000, gsd, gsd)) as ds:
            ds.write(data)
    item = make_item("multi", "./red.tif", red="./red.tif", green="./green.tif", blue="./blue.tif")
    item.set_self_href(str(tmp_path / "multi.json"))
    item.save_object(include_self_link=False)

    (src,) = expand_inputs([str(tmp_path / "multi.json")], stac_bands=("red", "green", "blue"))
    assert src.canonical == str(tmp_path / "multi.json") and len(src.assets) == 3
    settings = RasterSettings(window=512, margin=32, stretch=Stretch(min=0, max=4000), target_gsd_m=None)
    det = Detector(backend(BrightBoxes), model_id="bright@test", tile=None)
    rows = []
    for u in plan_units(src.url, src.canonical, segment_frames=8, raster_pixels=10**8, windows_per_unit=8,
                        raster=settings, stac_item=src.stac_item, datetime=src.datetime, assets=src.assets):
        assert (u.width, u.height) == (400, 300)  # the red band's grid
        for b in decode_unit(u, sampling=Sampling(), batch_size=1):
            rows += det(b).to_pylist()
    dets = sorted((d["x1"], d["y1"], d["x2"], d["y2"]) for r in rows for d in r["detections"])
    np.testing.assert_allclose(dets, [(x, y, x + s, y + s) for x, y, s in squares], atol=1.0)
    assert {r["stac_item"] for r in rows} == {"multi"} and {r["source"] for r in rows} == {src.canonical}
    d = rows[0]["detections"][0]
    assert d["map_x1"] == pytest.approx(500_000 + 0.2 * d["x1"]) and d["map_y2"] == pytest.approx(5_300_000 - 0.2 * d["y1"])


@pytest.mark.slow
def test_a_stac_api_search_runs_end_to_end_reading_its_assets_from_object_storage(ray_session, s3, tmp_path):
    """`stac_search` as the job's input: the API answers with items whose assets live on S3 (the moto server),
    read by ranges with the job's storage options; every row carries its item id and datetime."""
    fs, endpoint = s3
    scene = write_scene(tmp_path / "scene.tif", width=600, height=500, squares=((400, 100, 20), (450, 300, 16)))
    fs.put(str(scene.path), "test/scenes/a.tif")
    col = pystac.Collection("scenes", "test scenes", pystac.Extent(
        pystac.SpatialExtent([[15.0, 47.8, 15.1, 47.9]]), pystac.TemporalExtent([[WHEN, None]])))
    col.add_item(make_item("a", "s3://test/scenes/a.tif"))
    col.add_item(make_item("late", "s3://test/scenes/a.tif", when=dt.datetime(2024, 7, 2, tzinfo=dt.timezone.utc)))
    server = serve_catalog(col, tmp_path)
    try:
        doc = run(plan_from_dict({
            "stac_search": {"url": next(server), "collections": ["scenes"], "datetime": "2024-06-01/2024-06-30"},
            "output": str(tmp_path / "out"), "storage_options": {"s3": {"endpoint_url": endpoint}},
            "model": backend(BrightBoxes), "tile": None, "raster_window": 1024, "raster_margin": 64,
            "bands": [4, 3, 2], "stretch": {"min": 0, "max": 4000}}))
    finally:
        server.close()
    t = pads.dataset(str(tmp_path / "out" / "frames"), format="parquet").to_table()
    assert doc["state"] == "succeeded" and t.num_rows == 2
    assert set(t.column("source").to_pylist()) == {"s3://test/scenes/a.tif"}
    assert set(t.column("stac_item").to_pylist()) == {"a"} and set(t.column("datetime").to_pylist()) == {WHEN}
    assert sum(t.column("num_detections").to_pylist()) == 2
