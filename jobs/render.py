"""Draw a frame's detections from an output onto its image: a PNG a person can look at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
from PIL import Image, ImageDraw

from pipeline.output import Output
from pipeline.storage import canonical_uri, filesystem

__all__ = ["render_frame"]


def render_frame(output: str, source: str, png: str | Path, *, frame_index: int = 0, min_score: float = 0.0,
                 storage_options: dict | None = None, image: np.ndarray | None = None) -> int:
    """Draw the detections of (`source`, `frame_index`) with score >= `min_score`; returns how many.

    `image` supplies the frame's pixels (for video frames); otherwise `source` is read as an image.
    """
    out = Output(output, storage_options)
    ds = pads.dataset(out.frame_files(), filesystem=out.fs, format="parquet")
    t = ds.to_table(filter=(pads.field("source") == canonical_uri(source)) & (pads.field("frame_index") == frame_index),
                    columns=["detections"])
    if t.num_rows == 0:
        raise LookupError(f"no frame {frame_index} of {source} in {output}")
    dets = [d for d in (t.column("detections")[0].as_py() or []) if d["score"] >= min_score]
    if image is None:
        sfs, spath = filesystem(source, storage_options)
        with sfs.open(spath, "rb") as f, Image.open(f) as im:
            canvas = im.convert("RGB")
    else:
        canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 500))
    for d in dets:
        colour = (255, int(255 * (1 - d["score"])), 0)
        draw.rectangle([d["x1"], d["y1"], d["x2"], d["y2"]], outline=colour, width=width)
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png)
    return len(dets)
