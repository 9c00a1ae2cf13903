"""Georeferenced test scenes written with rasterio: a 4-band uint16 COG in UTM with a nodata border and bright
squares at known pixels, so a test knows where every detection must land (in pixels and in map coordinates);
and `make_output`, which writes an output of scenes with the pipeline's own pieces, without Ray."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CRS = "EPSG:32633"
ORIGIN = (500_000.0, 5_300_000.0)  # map coordinates of the top-left corner
BACKGROUND, BRIGHT = 1000, 3000
NODATA_COLS = 300  # columns of nodata (0) on the left


def scene_settings():
    """Raster settings for scenes and `fakes.BrightBoxes`: bands 4, 3, 2 with a fixed stretch, resampled to
    0.1 m, windows of 512 model pixels."""
    from pipeline.raster import RasterSettings, Stretch

    return RasterSettings(window=512, margin=64, bands=(4, 3, 2), stretch=Stretch(min=0, max=4000), target_gsd_m=0.1)


def make_output(path: Path, rasters, settings=None) -> str:
    """An output holding the frames of `rasters` (Scenes or paths), planned, decoded, detected by
    `fakes.BrightBoxes` and written as a job does, in this process."""
    from fakes import BrightBoxes, backend
    from pipeline.decode import Sampling, decode_unit
    from pipeline.detect import Detector
    from pipeline.output import Output
    from pipeline.plan import plan_units

    det = Detector(backend(BrightBoxes), model_id="bright@test", tile=None)
    out = Output(str(path))
    for r in rasters:
        p = str(getattr(r, "path", r))
        for u in plan_units(p, p, segment_frames=8, raster_pixels=1000, windows_per_unit=64,
                            raster=settings or scene_settings()):
            for b in decode_unit(u, sampling=Sampling(), batch_size=4):
                out.write_frames(det(b))
    return str(path)


@dataclass(frozen=True)
class Scene:
    path: Path
    width: int
    height: int
    gsd: float
    squares: tuple[tuple[int, int, int], ...]  # (x, y, side) in raster pixels, bright in bands 2, 3, 4
    decoy: tuple[int, int, int]  # bright in bands 1 and 2 only: found when bands 1-3 are read, not with [4, 3, 2]
    crs: str = CRS
    origin: tuple[float, float] = ORIGIN

    def map_box(self, x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the scene's CRS of a pixel box."""
        ox, oy = self.origin
        return ox + x1 * self.gsd, oy - y2 * self.gsd, ox + x2 * self.gsd, oy - y1 * self.gsd

    def pixel_boxes(self) -> list[tuple[int, int, int, int]]:
        return sorted((x, y, x + s, y + s) for x, y, s in self.squares)


SQUARES = ((400, 100, 20), (700, 300, 16), (1000, 800, 24), (500, 500, 24), (900, 620, 18))


def write_scene(path: Path, *, width: int = 1200, height: int = 1000, gsd: float = 0.2, squares=SQUARES,
                decoy=(800, 100, 20), blocksize: int = 256, noise: bool = False, crs: str = CRS,
                origin: tuple[float, float] = ORIGIN) -> Scene:
    """A 4-band uint16 COG (deflate, tiled `blocksize`, overviews) in EPSG:32633 at `gsd` m/pixel; nodata 0 in the
    leftmost NODATA_COLS columns. `noise`: random background (incompressible tiles, for byte counting)."""
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    data = np.full((4, height, width), BACKGROUND, np.uint16)
    if noise:
        data[:] = rng.integers(900, 1100, data.shape, dtype=np.uint16)
    for x, y, s in squares:
        data[1:4, y:y + s, x:x + s] = BRIGHT
    x, y, s = decoy
    data[0:2, y:y + s, x:x + s] = BRIGHT
    data[:, :, :NODATA_COLS] = 0
    profile = dict(driver="GTiff", width=width, height=height, count=4, dtype="uint16", crs=crs, nodata=0,
                   transform=from_origin(*origin, gsd, gsd))
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data)
        with mem.open() as src:
            rio_copy(src, str(path), driver="COG", blocksize=blocksize, compress="deflate", overview_resampling="average")
    return Scene(Path(path), width, height, gsd, tuple(squares), tuple(decoy), crs, origin)


def write_big_cog(path: Path, side: int = 8192, blocksize: int = 256) -> None:
    """A single-band uint8 COG of `side` x `side` at 0.1 m in EPSG:32633 (deflate, overviews), of low-amplitude
    noise: tiles compress to about half, so byte counts are about real tiles, not about headers."""
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import from_origin

    data = (100 + np.random.default_rng(0).integers(0, 16, (1, side, side), dtype=np.uint8)).astype(np.uint8)
    profile = dict(driver="GTiff", width=side, height=side, count=1, dtype="uint8", crs=CRS,
                   transform=from_origin(*ORIGIN, 0.1, 0.1))
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data)
        with mem.open() as src:
            rio_copy(src, str(path), driver="COG", blocksize=blocksize, compress="deflate")


def tile_bytes(path: Path, window: tuple[int, int, int, int]) -> int:
    """Compressed bytes of the full-resolution tiles of band 1 that the pixel window (x0, y0, x1, y1) touches."""
    import rasterio

    with rasterio.open(path) as ds:
        bh, bw = ds.block_shapes[0]
        x0, y0, x1, y1 = window
        return sum(int(ds.get_tag_item(f"BLOCK_SIZE_{bx}_{by}", "TIFF", bidx=1))
                   for by in range(y0 // bh, (y1 - 1) // bh + 1) for bx in range(x0 // bw, (x1 - 1) // bw + 1))
