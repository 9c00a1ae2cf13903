"""`fpn demo`: the bundled model over bundled data, end to end on embedded local Ray.

The bundled model knows tree crowns, so the video it understands is a flyover: a window panned
across the aerial validation image (known frame count and fps). The street video shows sampling
and timestamps. The aerial image's detections are drawn into a PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fpn_model.data import read_image
from fpn_model.zoo import DEFAULT_MODEL

from .query import connect
from .render import render_frame
from .runner import run
from .spec import plan_from_dict

__all__ = ["DATA_DIR", "write_video", "make_flyover", "run_demo"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def write_video(frames, path: str | Path, fps: float, *, codec: str = "libx264") -> int:
    """Encode `[H, W, 3]` uint8 frames to `path` (PyAV, constant frame rate); returns the frame count."""
    import av
    from fractions import Fraction

    n = 0
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        st.pix_fmt = "yuv420p"
        for frame in frames:
            if n == 0:
                st.height, st.width = frame.shape[:2]
            for packet in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                c.mux(packet)
            n += 1
        for packet in st.encode():
            c.mux(packet)
    return n


def make_flyover(image: np.ndarray, path: str | Path, *, size: int = 256, frames: int = 48, fps: float = 12) -> int:
    """A clip of a `size` x `size` window moving diagonally across `image`."""
    h, w = image.shape[:2]
    xs = np.linspace(0, w - size, frames).round().astype(int)
    ys = np.linspace(0, h - size, frames).round().astype(int)
    return write_video((image[y:y + size, x:x + size] for x, y in zip(xs, ys)), path, fps)


def run_demo(output: str | Path) -> tuple[dict, Path, list[str]]:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    aerial = DATA_DIR / "aerial-trees" / "SOAP_061.png"
    flyover = out / "flyover.mp4"
    make_flyover(read_image(aerial), flyover)
    street = DATA_DIR / "video" / "bikes.mp4"
    plan = plan_from_dict({
        "inputs": [str(aerial), str(flyover), str(street)],
        "output": str(out / "job"),
        "model": DEFAULT_MODEL,
        "sampling": {"every_n": 4},
        "batch_size": 8,
    })
    doc = run(plan)
    png = out / "detections.png"
    n = render_frame(str(out / "job"), str(aerial), png, min_score=0.5)
    con = connect(str(out / "job"))
    stats = ["", "per source (frames, detections with score >= 0.5, first/last timestamp):"]
    for src, nf, nd, t0, t1 in con.execute("""
        SELECT source, count(*), sum(len(list_filter(detections, lambda d: d.score >= 0.5))), min(pts_s), max(pts_s)
        FROM frames GROUP BY source ORDER BY source""").fetchall():
        span = f"{t0:.2f}-{t1:.2f} s" if t0 is not None else "still image"
        stats.append(f"  {Path(src).name:<14} {nf:>4} frames  {int(nd or 0):>5} detections  {span}")
    stats.append(f"{n} crowns (score >= 0.5) drawn on {aerial.name}")
    return doc, png, stats
