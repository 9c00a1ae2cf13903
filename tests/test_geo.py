"""Georeferenced rasters: bands, stretch once per raster, nodata, resampling to the model's GSD, map coordinates,
and images beyond PIL's decompression-bomb limit. The model is `fakes.BrightBoxes` (known pixel boxes)."""
import collections
import http.client
import http.server
import json
import threading

import numpy as np
import pyarrow.dataset as pads
import pytest

from fakes import BrightBoxes, backend
from fpn_model.weights import CheckpointError, InputSpec, read_input_spec
from fpn_model.zoo import resolve
from geo_scenes import write_scene
from jobs.runner import run
from jobs.spec import plan_from_dict
from pipeline.raster import RasterPlan, RasterSettings, Stretch, box_polygons, map_boxes, open_raster, plan_raster, read_window


def detections(out):
    t = pads.dataset(str(out / "frames"), format="parquet").to_table()
    return t, [d for ds in t.column("detections").to_pylist() for d in ds]


def geo_job(scene, out, **fields):
    spec = {"inputs": [str(scene.path)], "output": str(out), "model": backend(BrightBoxes), "tile": None,
            "raster_window": 512, "raster_margin": 64, "bands": [4, 3, 2], "stretch": {"min": 0, "max": 4000},
            **fields}
    return run(plan_from_dict(spec))


@pytest.mark.slow
def test_boxes_land_at_map_coordinates_after_resampling_and_nodata_windows_are_skipped(ray_session, tmp_path, capsys):
    scene = write_scene(tmp_path / "scene.tif", gsd=0.2)
    doc = geo_job(scene, tmp_path / "out")
    t, dets = detections(tmp_path / "out")
    # 0.2 m raster, 0.1 m model: read 2x; windows of 512 model px are 256 raster px: 5 x 4 of them
    info = doc["rasters"]["georeferenced"][str(scene.path)]
    assert info["scale"] == 2.0 and info["crs"] == "EPSG:32633" and info["gsd_m"] == pytest.approx(0.2)
    assert t.num_rows == 20 and doc["state"] == "succeeded"
    # the first column of windows (x < 256) lies in the nodata border: not run through the model, counted
    nodata = [i for i, n in zip(t.column("frame_index").to_pylist(), t.column("all_nodata").to_pylist()) if n]
    assert sorted(nodata) == [0, 5, 10, 15] and doc["nodata_windows"] == 4
    # every square once (the one across a window border too), in raster pixels within half a pixel; the decoy,
    # bright in bands 1-2 only, is not seen through bands [4, 3, 2]
    got = sorted((d["x1"], d["y1"], d["x2"], d["y2"]) for d in dets)
    assert len(got) == len(scene.squares)
    np.testing.assert_allclose(got, scene.pixel_boxes(), atol=0.5)
    for d in dets:
        want = scene.map_box(d["x1"], d["y1"], d["x2"], d["y2"])
        np.testing.assert_allclose([d["map_x1"], d["map_y1"], d["map_x2"], d["map_y2"]], want, atol=1e-6)
    by_pixel = {tuple(round(v) for v in b): b for b in got}
    for box in scene.pixel_boxes():
        np.testing.assert_allclose(scene.map_box(*by_pixel[box]), scene.map_box(*box), atol=0.5 * scene.gsd)
    assert set(t.column("crs").to_pylist()) == {"EPSG:32633"}
    assert t.column("transform")[0].as_py() == [0.2, 0.0, 500000.0, 0.0, -0.2, 5300000.0]

    # the drawing as a GeoTIFF: the scene's CRS and bounds, each box drawn where its map coordinates are
    import rasterio

    from PIL import Image

    from jobs.render import Region, colour, render_frame

    render_frame(str(tmp_path / "out"), str(scene.path), tmp_path / "drawn.tif", max_side=600)
    with rasterio.open(tmp_path / "drawn.tif") as drawn, rasterio.open(scene.path) as src:
        assert drawn.crs == src.crs and drawn.width == 600
        np.testing.assert_allclose(tuple(drawn.bounds), tuple(src.bounds), atol=1e-6)
        pixels = drawn.read()
        for d in dets:
            row, col = drawn.index(d["map_x1"], (d["map_y1"] + d["map_y2"]) / 2)  # the middle of its left edge
            near = pixels[:, row, max(col - 1, 0):col + 2].T
            assert any(tuple(p) == colour(d["label"]) for p in near), (d, near)

    # the picture shows the bands the model saw ([4, 3, 2]): the decoy, bright in bands 1-2 only, shows in the
    # third channel alone (the first three bands showed it bright red and green)
    x, y, side = scene.decoy
    render_frame(str(tmp_path / "out"), str(scene.path), tmp_path / "decoy.png", region=Region(x, y, side, side))
    centre = np.asarray(Image.open(tmp_path / "decoy.png").convert("RGB"))[side // 2, side // 2]
    assert centre[2] > 200 and centre[0] < 100 and centre[1] < 100, centre

    # the report says where the raster lies and what was skipped
    from jobs.report import build_report

    build_report(str(tmp_path / "out"), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "<div class=\"muted\" data-raster>EPSG:32633, 0.2 m/pixel, read at 2x · 4 windows all nodata (skipped)</div>" in html

    # other bands change what the frames mean: a rerun into the output is refused, naming the setting
    with pytest.raises(ValueError, match=r"bands \[4, 3, 2\] -> \[2, 3, 4\]"):
        geo_job(scene, tmp_path / "out", bands=[2, 3, 4])
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["spec"]["bands"] == [4, 3, 2]

    # an area of interest that misses the scene (latitude and longitude swapped): no work, and said so
    doc = geo_job(scene, tmp_path / "far", aoi={"bbox": [47.8, 15.0, 47.9, 15.1]})
    assert doc["state"] == "succeeded" and doc["frames"] == 0 and doc["errors"] == 0
    assert doc["nothing_read"] == {str(scene.path): "the aoi meets none of its 20 windows: nothing read"}
    from jobs.cli import _print_summary

    _print_summary({**doc, "nodata_windows": 3})
    printed = capsys.readouterr().out
    assert f"{scene.path}: the aoi meets none of its 20 windows: nothing read" in printed
    assert "raster windows all nodata (skipped): 3" in printed


def test_native_pixels_and_the_first_bands_find_the_same_places_and_the_decoy(tmp_path):
    from dataclasses import replace

    from geo_scenes import make_output, scene_settings

    scene = write_scene(tmp_path / "scene.tif")
    make_output(tmp_path / "native", [scene], replace(scene_settings(), bands=None, target_gsd_m=None))
    t, dets = detections(tmp_path / "native")
    assert t.num_rows == 6  # windows of 512 raster pixels: 3 x 2
    got = sorted((d["x1"], d["y1"], d["x2"], d["y2"]) for d in dets)
    x, y, s = scene.decoy
    np.testing.assert_allclose(got, sorted(scene.pixel_boxes() + [(x, y, x + s, y + s)]), atol=1e-3)
    for d in dets:
        np.testing.assert_allclose([d["map_x1"], d["map_y1"], d["map_x2"], d["map_y2"]],
                                   scene.map_box(d["x1"], d["y1"], d["x2"], d["y2"]), atol=1e-6)


def test_rotated_transform_maps_every_corner():
    # 30 degrees rotation, 0.5 m pixels: a box's envelope holds its four transformed corners; the polygon is exact
    c, s = np.cos(np.radians(30)) * 0.5, np.sin(np.radians(30)) * 0.5
    t = (c, -s, 1000.0, -s, -c, 2000.0)
    boxes = np.array([[10, 20, 30, 60]], np.float32)
    corners = [(t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5]) for x, y in ((10, 20), (30, 20), (30, 60), (10, 60))]
    xs, ys = zip(*corners)
    np.testing.assert_allclose(map_boxes(boxes, t)[0], [min(xs), min(ys), max(xs), max(ys)])
    poly = box_polygons(boxes, t)[0]
    assert poly.area == pytest.approx(20 * 40 * 0.25)  # 20 x 40 pixels of 0.25 m^2
    ring = np.asarray(poly.exterior.coords)[:4]
    np.testing.assert_allclose(sorted(map(tuple, ring)), sorted(corners))
    assert poly.exterior.is_ccw


def test_stretch_is_one_per_raster_so_neighbouring_windows_match(tmp_path):
    scene = write_scene(tmp_path / "noisy.tif", noise=True)
    with open_raster(str(scene.path)) as ds:
        plan = plan_raster(ds, RasterSettings(window=256, margin=0, bands=(4, 3, 2), stretch=Stretch((2, 98))))
        whole = ds.read(4, masked=True).compressed()
        a, b = read_window([ds], plan, 6), read_window([ds], plan, 7)
        raw_a, raw_b = ds.read(4, window=((256, 512), (256, 512))), ds.read(4, window=((256, 512), (512, 768)))
    lo, hi = np.percentile(whole, [2, 98])
    assert plan.low[0] == pytest.approx(lo, abs=3) and plan.high[0] == pytest.approx(hi, abs=3)  # from an overview
    # one mapping of values for both windows: the same raster value gives the same byte
    for value in (950, 1000, 1050):
        va = a.image[..., 0][raw_a == value]
        vb = b.image[..., 0][raw_b == value]
        assert len(set(va.tolist()) | set(vb.tolist())) == 1


def test_band_choice_fits_the_model_or_is_refused(tmp_path):
    scene = write_scene(tmp_path / "s.tif")
    with open_raster(str(scene.path)) as ds:
        with pytest.raises(ValueError, match=r"bands \[5, 3, 2\]: the raster has bands 1..4"):
            plan_raster(ds, RasterSettings(bands=(5, 3, 2)))
        assert plan_raster(ds, RasterSettings()).bands == (1, 2, 3)  # no colour names: the first three
        assert plan_raster(ds, RasterSettings(target_gsd_m=0.4)).scale == 0.5
    with pytest.raises(ValueError, match=r"bands \[4, 3\]: the model takes 3 bands \(red, green, blue\)"):
        plan_from_dict({"inputs": [str(scene.path)], "output": str(tmp_path / "o"), "bands": [4, 3]}).raster_settings(
            InputSpec())
    with pytest.raises(ValueError, match="spec field stretch: stretch: give both min and max"):
        plan_from_dict({"inputs": [str(scene.path)], "output": str(tmp_path / "o"), "stretch": {"min": 0}})


def test_checkpoints_record_their_input_and_a_bad_record_is_refused(tmp_path):
    from fpn_model.weights import save_checkpoint, load_checkpoint

    trees = read_input_spec(resolve("trees"))
    assert trees == InputSpec(bands=("red", "green", "blue"), value_range=None, gsd_m=0.1)
    model = load_checkpoint(resolve("trees"))
    path = save_checkpoint(model, tmp_path / "nir.safetensors", input=InputSpec(bands=("nir", "red", "green"),
                                                                                 value_range=(0, 3000), gsd_m=0.5))
    assert read_input_spec(path) == InputSpec(("nir", "red", "green"), (0, 3000), 0.5)
    bad = save_checkpoint(model, tmp_path / "bad.safetensors", input=InputSpec(bands=("red", "green", "blue", "nir")))
    with pytest.raises(CheckpointError, match="records 4 input bands .* for a model of 3 channels"):
        read_input_spec(bad)


def test_image_beyond_the_decompression_bomb_limit_is_read_by_windows(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.decode import Sampling, decode_unit
    from pipeline.plan import plan_units

    img = np.random.default_rng(1).integers(0, 255, (600, 500, 3), dtype=np.uint8)
    path = tmp_path / "huge.png"
    Image.fromarray(img).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 300 000 px is now beyond 2x the limit
    units = list(plan_units(str(path), str(path), segment_frames=8, raster_pixels=10**9, windows_per_unit=8,
                            raster=RasterSettings(window=256, margin=0)))
    assert [u.kind for u in units] == ["raster"]
    batches = [b for u in units for b in decode_unit(u, sampling=Sampling(), batch_size=1)]
    assert len(batches) == 6 and batches[0]["crs"] == [None]
    np.testing.assert_array_equal(batches[4]["image"][0], img[512:600, 0:256])


class _CountingProxy(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the S3 server and counts the body bytes it serves per object path."""

    protocol_version = "HTTP/1.1"

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(*self.server.upstream)
        conn.request(self.command, self.path, body=body or None,
                     headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
        r = conn.getresponse()
        data = r.read()
        self.server.served[self.path.split("?")[0]] += len(data)
        self.send_response(r.status, r.reason)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length" or
                                                                        self.command == "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    def log_message(self, *args):
        pass


@pytest.fixture
def counting_s3(s3):
    """(s3fs of the bucket `test`, an endpoint in front of the S3 server that counts bytes served per path)."""
    fs, endpoint = s3
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingProxy)
    server.upstream, server.served = (host, int(port)), collections.Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield fs, f"http://127.0.0.1:{server.server_address[1]}", server.served
    server.shutdown()


@pytest.mark.slow
def test_cog_on_object_storage_is_read_by_ranges(ray_session, counting_s3, tmp_path):
    from geo_scenes import tile_bytes, write_big_cog

    fs, endpoint, served = counting_s3
    cog = tmp_path / "big.tif"
    write_big_cog(cog, side=4096)  # 256 px tiles
    size = cog.stat().st_size
    fs.put(str(cog), "test/scenes/big.tif")
    opts = {"s3": {"endpoint_url": endpoint}}
    uri, key = "s3://test/scenes/big.tif", "/test/scenes/big.tif"

    with open_raster(uri, opts) as ds:
        plan = plan_raster(ds, RasterSettings(window=1024, margin=128))
        header = served[key]
        k = 5  # window (1024, 1024) padded by 128: pixels 896..2176 on both axes
        read_window([ds], plan, k)
        one = served[key] - header
    tiles = tile_bytes(cog, (896, 896, 2176, 2176))
    print(f"\nCOG {size} bytes; header {header} bytes; one 1280 px window {one} bytes for {tiles} bytes of its tiles "
          f"({one / tiles:.3f}x tiles, {one / size:.3f} of the file)")
    assert one <= 1.5 * tiles + header and one < size / 5  # its 6 x 6 tiles: 0.14 of the file's

    served.clear()
    doc = run(plan_from_dict({"inputs": [uri], "output": str(tmp_path / "out"), "storage_options": opts,
                              "model": backend(BrightBoxes), "tile": None, "resample": False}))
    whole = served[key]
    print(f"whole job ({doc['frames']} windows): {whole} bytes served, {whole / size:.3f}x the file")
    assert doc["state"] == "succeeded" and doc["frames"] == 4 and whole <= 1.5 * size  # 2048 px windows


def test_an_area_of_interest_limits_the_windows_read(tmp_path):
    from pyproj import Transformer

    from pipeline.decode import Sampling, decode_unit
    from pipeline.plan import plan_units

    scene = write_scene(tmp_path / "s.tif")
    base = RasterSettings(window=512, margin=64, bands=(4, 3, 2), target_gsd_m=0.1)  # 256 raster px windows

    def windows(aoi):
        units = list(plan_units(str(scene.path), str(scene.path), segment_frames=8, raster_pixels=10**8,
                                windows_per_unit=2, raster=RasterSettings(**{**base.__dict__, "aoi": aoi})))
        return [k for u in units for k in u.frame_indices()], units

    # 60..100 m east, 20..60 m south of the corner: raster columns 300..500, rows 100..300: windows 1 and 6
    ids, units = windows({"bbox": [500_060, 5_299_940, 500_100, 5_299_980], "crs": "EPSG:32633"})
    assert ids == [1, 6] and sum(u.stop - u.start for u in units) == 2
    rows = [b["frame_index"][0] for u in units for b in decode_unit(u, sampling=Sampling(), batch_size=1)]
    assert rows == [1, 6]
    # the same area as a GeoJSON polygon in WGS 84
    tf = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    ring = [tf.transform(x, y) for x, y in ((500_061, 5_299_941), (500_099, 5_299_941), (500_099, 5_299_979),
                                            (500_061, 5_299_979), (500_061, 5_299_941))]
    assert windows({"geometry": {"type": "Polygon", "coordinates": [ring]}})[0] == [1, 6]
    with pytest.raises(ValueError, match="aoi.bbox: expected \\[minx, miny, maxx, maxy\\]"):
        plan_from_dict({"inputs": [str(scene.path)], "output": str(tmp_path / "o"), "aoi": {"bbox": [3, 2, 1]}})


@pytest.mark.parametrize("tagged", [True, False], ids=["nodata-nan", "untagged-nan"])
def test_float_rasters_are_stretched_with_nan_nodata_masked(tmp_path, tagged):
    """NaN is missing data whether or not the file says so (many reflectance products carry no nodata tag): an
    untagged NaN made the stretch NaN and the model saw a black image."""
    import rasterio
    from rasterio.transform import from_origin

    from jobs.render import Region, read_pixels

    data = np.linspace(0.0, 1.0, 3 * 64 * 64, dtype=np.float32).reshape(3, 64, 64)
    data[:, :, :16] = np.nan
    path = tmp_path / "reflectance.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=3, dtype="float32",
                       nodata=float("nan") if tagged else None, crs="EPSG:32633",
                       transform=from_origin(500_000, 5_300_000, 0.1, 0.1)) as ds:
        ds.write(data)
    with open_raster(str(path)) as ds:
        plan = plan_raster(ds, RasterSettings(window=64, margin=0, stretch=Stretch((0, 100)), target_gsd_m=0.1))
        r = read_window([ds], plan, 0)
    valid = data[:, :, 16:]
    assert plan.low == tuple(float(np.nanmin(b)) for b in valid) and plan.high == tuple(float(np.nanmax(b)) for b in valid)
    assert json.loads(plan.to_json())["low"] == list(plan.low)  # finite: strict JSON
    assert not r.all_nodata and r.image.dtype == np.uint8
    assert (r.image[:, :16] == 0).all() and r.image[-1, -1, 0] == 255 and r.image[0, 16, 0] == 0
    # the picture a person sees (render, report): the valid part stretched, the NaN part black
    picture = read_pixels(str(path), "raster", region=Region(0, 0, 64, 64))
    assert (picture[:, :16] == 0).all() and picture[:, 16:].mean() > 60 and picture[-1, -1, 2] == 255


def test_a_paletted_raster_is_read_as_its_colours(tmp_path):
    """A colour-mapped band is colours, not grey levels: the model and the picture get the palette's RGB, and a
    reduced read never averages indices into colours the palette does not have."""
    import rasterio
    from rasterio.transform import from_origin

    from jobs.render import Region, read_pixels

    colours = {0: (0, 0, 0, 255), 1: (200, 30, 10, 255), 2: (20, 120, 250, 255)}
    idx = np.ones((64, 64), np.uint8)
    idx[:, 32:] = 2
    idx[:8] = 0  # nodata
    path = tmp_path / "paletted.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500_000, 5_300_000, 0.1, 0.1),
                       photometric="palette") as ds:
        ds.write(idx, 1)
        ds.write_colormap(1, colours)
    for gsd, side in ((0.1, 64), (0.25, 26)):  # native, and read reduced
        with open_raster(str(path)) as ds:
            plan = plan_raster(ds, RasterSettings(window=64, margin=0, target_gsd_m=gsd))
            image = read_window([ds], plan, 0).image
        assert plan.palette[1] == (200, 30, 10) and (plan.low, plan.high) == ((0.0,) * 3, (255.0,) * 3)
        assert image.shape == (side, side, 3)
        assert {tuple(p) for p in image.reshape(-1, 3)} == {(0, 0, 0), (200, 30, 10), (20, 120, 250)}
        assert tuple(image[-1, 0]) == (200, 30, 10) and tuple(image[-1, -1]) == (20, 120, 250)
        assert (image[0] == 0).all()  # nodata
    assert RasterPlan.from_json(plan.to_json()) == plan
    picture = read_pixels(str(path), "raster", region=Region(0, 0, 64, 64))
    assert tuple(picture[-1, 0]) == (200, 30, 10) and tuple(picture[-1, -1]) == (20, 120, 250)
    with open_raster(str(path)) as ds, pytest.raises(ValueError, match="band 1 is paletted .* expand it first"):
        plan_raster(ds, RasterSettings(model_bands=("red", "green", "blue", "nir")))


def _gcp_raster(path, gcps):
    import rasterio
    from rasterio.crs import CRS as RioCRS

    with rasterio.open(path, "w", driver="GTiff", width=100, height=80, count=3, dtype="uint8") as ds:
        ds.write(np.full((3, 80, 100), 90, np.uint8))
        ds.gcps = (gcps, RioCRS.from_epsg(32633))
    return path


def test_ground_control_points_give_a_transform_when_an_affine_one_fits_them(tmp_path):
    from rasterio.control import GroundControlPoint

    from pipeline.plan import raster_summary

    true = (0.5, 0.0, 500_000.0, 0.0, -0.5, 5_300_000.0)  # 0.5 m pixels, north up
    at = lambda c, r: (true[0] * c + true[2], true[4] * r + true[5])  # noqa: E731
    corners = [(0, 0), (100, 0), (0, 80), (100, 80), (50, 40)]
    exact = [GroundControlPoint(row=r, col=c, x=at(c, r)[0], y=at(c, r)[1]) for c, r in corners]
    bent = exact[:4] + [GroundControlPoint(row=40, col=50, x=at(50, 40)[0] + 4.0, y=at(50, 40)[1])]  # 8 px off
    with open_raster(str(_gcp_raster(tmp_path / "fits.tif", exact))) as ds:
        fits = plan_raster(ds, RasterSettings(window=64, margin=0))
    with open_raster(str(_gcp_raster(tmp_path / "bent.tif", bent))) as ds:
        bent_plan = plan_raster(ds, RasterSettings(window=64, margin=0))
    with open_raster(str(_gcp_raster(tmp_path / "two.tif", exact[:2]))) as ds:
        two = plan_raster(ds, RasterSettings(window=64, margin=0))
    assert fits.crs == "EPSG:32633" and fits.gsd_m == pytest.approx(0.5)
    np.testing.assert_allclose(fits.transform, true, atol=1e-6)
    assert fits.note.startswith("transform fitted to its 5 ground control points")
    assert bent_plan.crs is None and "no affine transform fits within half a pixel" in bent_plan.note
    assert two.crs is None and "2 ground control points, too few" in two.note
    units = [{"kind": "raster", "source": s, "raster": p.to_json()}
             for s, p in (("fits.tif", fits), ("bent.tif", bent_plan))]
    summary = raster_summary(units)
    assert list(summary["georeferenced"]) == ["fits.tif"] and summary["pixel_coordinates_only"] == ["bent.tif"]
    assert set(summary["notes"]) == {"fits.tif", "bent.tif"}


def test_bands_that_do_not_fit_the_model_fail_the_run_before_any_work(tmp_path):
    from click.testing import CliRunner

    from jobs.cli import cli

    scene = write_scene(tmp_path / "s.tif", width=300, height=300, squares=())
    r = CliRunner().invoke(cli, ["run", str(scene.path), "-o", str(tmp_path / "out"), "--bands", "4,3"])
    assert r.exit_code == 1 and "bands [4, 3]: the model takes 3 bands (red, green, blue)" in r.output
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(cli, ["run", str(scene.path), "-o", str(tmp_path / "out"), "--stretch", "2"])
    assert r.exit_code == 2 and "--stretch" in r.output


def test_pixels_that_are_not_square_on_the_ground_are_read_square(tmp_path):
    """A raster in degrees at 60 N: a pixel 1e-6 degrees a side is 0.056 m across and 0.111 m down. Read with one
    scale, the model saw every crown squeezed to half its width."""
    import rasterio
    from rasterio.transform import from_origin

    data = np.full((3, 200, 400), 60, np.uint8)
    data[:, 90:110, 180:220] = 230  # 40 x 20 pixels: a square on the ground
    path = tmp_path / "degrees.tif"
    with rasterio.open(path, "w", driver="GTiff", width=400, height=200, count=3, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(10.0, 60.0, 1e-6, 1e-6)) as ds:
        ds.write(data)
    with open_raster(str(path)) as ds:
        plan = plan_raster(ds, RasterSettings(window=64, margin=8, target_gsd_m=0.1))
        sx, sy = plan.scales
        assert sx == pytest.approx(0.558, rel=0.01) and sy == pytest.approx(1.116, rel=0.01)
        assert plan.window == round(64 / sx) and plan.window_y == round(64 / sy)  # 64 model pixels each way
        assert RasterPlan.from_json(plan.to_json()) == plan
        got = [(k, read_window([ds], plan, k)) for k in range(len(plan.windows()))]
    bright = [(k, r) for k, r in got if (r.image > 150).any()]
    k, r = max(bright, key=lambda kr: (kr[1].image > 150).sum())
    rows, cols = np.nonzero((r.image > 150).all(axis=2))
    w, h = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
    assert abs(w / h - 1) < 0.15, (w, h)  # square, as on the ground (it was 2:1)
    assert r.scale == pytest.approx((sx, sy), rel=0.05)  # boxes go back to raster pixels per axis
