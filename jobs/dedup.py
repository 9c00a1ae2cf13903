"""Duplicates of one object seen in overlapping scenes or windows, found in bounded memory (`fpn export --dedup IOU`).

Two detections are duplicates when they come from different scenes, or from different windows of one raster (an
object across a window edge, boxed in both), and their map polygons overlap by more than IOU; within each group
of detections linked by such pairs, a greedy, score-ordered pass keeps the best and drops the duplicates of every
detection it keeps (non-maximum suppression across scenes).

An STRtree over every detection would hold the whole output in memory, and a relational join on map cells runs
out of DuckDB's memory at 10^7 detections (measured: the 9x neighbour-cell join), so this is a sweep, written by
hand because no library here does a spatial self-join out of core:

1. every detection's polygon corners, score and source go to a temporary Parquet file (one streaming pass);
2. DuckDB sorts that file on disk, in a child process, by the polygons' lower edge along the longer axis of the
   data's extent;
3. a sweep reads it in sorted chunks, holding only the detections that may still overlap what comes next and the
   groups that may still grow; pairs come from an STRtree over that window; a group is decided once the sweep has
   passed its far edge.

Detections are identified by their position in the export's (deterministic) stream of detections, and the result
is a bitmap of one byte per detection, the only thing that grows with the output (10 MB at 10^7).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["duplicates"]

CHUNK = 65_536  # detections read per step of the sweep
DUCKDB_MEMORY = "256MB"


def duplicates(tables: Iterator[pa.Table], geometries: Callable[[pa.Table], tuple[np.ndarray, np.ndarray]],
               iou: float) -> np.ndarray:
    """A boolean mask over the detections of `tables` (in order, every row counted): True where the row is a
    duplicate to drop. `geometries(t)` gives each row's map polygon (4 corners) and whether it has one."""
    with tempfile.TemporaryDirectory(prefix="fpn-dedup-") as tmp:
        extents_path = os.path.join(tmp, "extents.parquet")
        extents, total = _write_extents(tables, geometries, extents_path)
        drop = np.zeros(total, bool)
        if extents is None:
            return drop
        axis = "y" if extents[3] - extents[1] >= extents[2] - extents[0] else "x"
        sorted_path = os.path.join(tmp, "sorted.parquet")
        _sort(extents_path, sorted_path, axis, tmp)
        # without pre-buffering: with it the reader keeps every row group it has read (measured: 4 MB more
        # Arrow memory per chunk, the whole file by the end)
        _Sweep(iou, axis, drop).run(pq.ParquetFile(sorted_path, pre_buffer=False))
        return drop


_SCHEMA = pa.schema([("row", pa.int64()), ("source", pa.int32()), ("score", pa.float32()),
                     *[(f"{c}{k}", pa.float64()) for k in range(4) for c in "xy"],
                     ("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())])


def _write_extents(tables, geometries, path: str) -> tuple[tuple[float, ...] | None, int]:
    """Stream the detections with map polygons to `path` (each (source, window) as a small integer id: boxes of
    one window are the model's own, already suppressed); (their overall extent, rows seen)."""
    import shapely

    sources: dict[tuple[str, int], int] = {}
    writer, total, ext = None, 0, None
    try:
        for t in tables:
            geoms, ok = geometries(t)
            rows = np.arange(total, total + t.num_rows)
            total += t.num_rows
            if not ok.any():
                continue
            geoms = geoms[ok]
            corners = shapely.get_coordinates(shapely.get_exterior_ring(geoms)).reshape(len(geoms), -1, 2)
            if corners.shape[1] != 5:
                raise ValueError("dedup expects four-cornered box polygons")
            keys = zip(t.column("source").to_pylist(), t.column("frame_index").to_pylist())
            src = np.array([sources.setdefault(k, len(sources)) for k, keep in zip(keys, ok) if keep], np.int32)
            bounds = shapely.bounds(geoms)
            cols = {"row": rows[ok], "source": src, "score": t.column("score").to_numpy(zero_copy_only=False)[ok]}
            for k in range(4):
                cols[f"x{k}"], cols[f"y{k}"] = corners[:, k, 0], corners[:, k, 1]
            for k, name in enumerate(("xmin", "ymin", "xmax", "ymax")):
                cols[name] = bounds[:, k]
            batch = pa.table(cols, schema=_SCHEMA)
            e = (bounds[:, 0].min(), bounds[:, 1].min(), bounds[:, 2].max(), bounds[:, 3].max())
            ext = e if ext is None else (min(ext[0], e[0]), min(ext[1], e[1]), max(ext[2], e[2]), max(ext[3], e[3]))
            writer = writer or pq.ParquetWriter(path, _SCHEMA)
            writer.write_table(batch)
    finally:
        if writer is not None:
            writer.close()
    return ext, total


def _sort(src: str, dest: str, axis: str, tmp: str) -> None:
    """DuckDB's external sort, memory capped and spilling to `tmp`, in a child process: the memory DuckDB's
    allocator keeps after a sort goes back to the system with it (measured: in-process, the export's peak grew
    from 538 MB at 10^6 detections to 1062 MB at 10^7)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "jobs.dedup", src, dest, axis, tmp], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"sorting detections for --dedup failed: {done.stderr.strip().splitlines()[-1:]}")


def _sort_here(src: str, dest: str, axis: str, tmp: str) -> None:
    import duckdb

    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY, "temp_directory": os.path.join(tmp, "spill"),
                                 "threads": 2, "preserve_insertion_order": True})
    try:
        con.execute(f"COPY (SELECT * FROM read_parquet({_quote(src)}) ORDER BY {axis}min, row) TO {_quote(dest)} "
                    f"(FORMAT parquet, ROW_GROUP_SIZE {CHUNK})")
    finally:
        con.close()


def _quote(path: str) -> str:
    return "'" + path.replace("'", "''") + "'"


class _Sweep:
    """The sweep over extents sorted by their lower edge along `axis`, marking duplicates in `drop`."""

    def __init__(self, iou: float, axis: str, drop: np.ndarray):
        self.iou, self.lo, self.hi, self.drop = iou, f"{axis}min", f"{axis}max", drop
        self.window: pa.Table | None = None  # extents that may overlap later ones
        self.parent: dict[int, int] = {}  # union-find over rows in a duplicate pair
        self.edges: dict[int, list[tuple[int, int]]] = {}  # a group's root -> its pairs
        self.reach: dict[int, float] = {}  # a group's root -> its far edge along the axis
        self.score: dict[int, float] = {}

    def run(self, f: pq.ParquetFile) -> None:
        for batch in f.iter_batches(batch_size=CHUNK):
            self._step(pa.Table.from_batches([batch]))
        self._close(np.inf)

    def _step(self, chunk: pa.Table) -> None:
        import shapely

        cand = chunk if self.window is None else pa.concat_tables([self.window, chunk])
        first = cand.num_rows - chunk.num_rows
        geoms = shapely.polygons(np.stack([np.column_stack([cand.column(f"{c}{k}").to_numpy() for c in "xy"])
                                           for k in range(4)], axis=1))
        tree = shapely.STRtree(geoms)
        new, other = tree.query(geoms[first:], predicate="intersects")
        new = new + first
        keep = other < new  # each pair once: window x chunk, and chunk pairs in one order
        new, other = new[keep], other[keep]
        src = cand.column("source").to_numpy()
        cross = src[new] != src[other]
        new, other = new[cross], other[cross]
        if len(new):
            inter = shapely.area(shapely.intersection(geoms[new], geoms[other]))
            union = shapely.area(geoms[new]) + shapely.area(geoms[other]) - inter
            dup = inter / np.maximum(union, 1e-12) > self.iou
            rows, scores, hi = (cand.column(c).to_numpy() for c in ("row", "score", self.hi))
            for a, b in zip(new[dup], other[dup]):
                self._pair(int(rows[a]), int(rows[b]), float(scores[a]), float(scores[b]), max(hi[a], hi[b]))
        last = chunk.column(self.lo)[-1].as_py()
        self._close(last)  # rows still to come start at or after `last`
        self.window = cand.filter(np.asarray(cand.column(self.hi)) >= last)

    def _find(self, r: int) -> int:
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def _pair(self, a: int, b: int, sa: float, sb: float, reach: float) -> None:
        for r, s in ((a, sa), (b, sb)):
            if r not in self.parent:
                self.parent[r], self.edges[r], self.reach[r] = r, [], -np.inf
            self.score[r] = s
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            ra, rb = (ra, rb) if len(self.edges[ra]) >= len(self.edges[rb]) else (rb, ra)
            self.parent[rb] = ra
            self.edges[ra] += self.edges.pop(rb)
            self.reach[ra] = max(self.reach[ra], self.reach.pop(rb))
        self.edges[ra].append((a, b))
        self.reach[ra] = max(self.reach[ra], reach)

    def _close(self, front: float) -> None:
        """Decide the groups no row at or after `front` can reach, and forget them."""
        for root in [r for r, reach in self.reach.items() if reach < front]:
            pairs = self.edges.pop(root)
            del self.reach[root]
            partners: dict[int, list[int]] = {}
            for a, b in pairs:
                partners.setdefault(a, []).append(b)
                partners.setdefault(b, []).append(a)
            removed: set[int] = set()
            for r in sorted(partners, key=lambda r: (-self.score[r], r)):  # greedy by score, ties by stream order
                if r not in removed:
                    removed.update(partners[r])
            self.drop[list(removed)] = True
            for r in partners:
                del self.parent[r], self.score[r]


if __name__ == "__main__":  # the sort's child process: SRC DEST AXIS TMP
    import sys

    _sort_here(*sys.argv[1:5])
