"""The issue's own CPU scenario, rebuilt from this repository's data: a 768x576, 795-frame AVI (MPEG-4 part 2,
25 fps, about 8 MB, as the held-back street video) and torchvision's `fasterrcnn_mobilenet_v3_large_fpn` imported
with `fpn import-torchvision --state-dict`, its weights seeded random and calibrated on the clip's frames
(tests/forward_inputs.py: COCO's weights cannot be downloaded here) so that it finds boxes.

The clip is data/video/bikes.mp4 (250 frames of 640x272) resized to 768x576 and played forwards, then
backwards, until 795 frames. `benchmarks/throughput.py --street` runs on these; alone:

    .venv/bin/python benchmarks/street_inputs.py DEST   # DEST/street.avi, DEST/mobilenet_v3_fpn.safetensors
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "video" / "bikes.mp4"
FRAMES, WIDTH, HEIGHT, FPS = 795, 768, 576, 25


def street_avi(dest: Path, source: Path = SOURCE) -> Path:
    """`dest`: the source's frames at WIDTHxHEIGHT, forwards then backwards, FRAMES of them, in an AVI."""
    import av

    with av.open(str(source)) as c:
        frames = [f.reformat(width=WIDTH, height=HEIGHT).to_ndarray(format="rgb24") for f in c.decode(video=0)]
    order = frames + frames[::-1]
    with av.open(str(dest), "w") as out:
        s = out.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt, s.bit_rate = WIDTH, HEIGHT, "yuv420p", 2_000_000
        for k in range(FRAMES):  # new frames (no timestamps of the source's): the encoder numbers them in order
            out.mux(s.encode(av.VideoFrame.from_ndarray(order[k % len(order)], format="rgb24")))
        out.mux(s.encode())
    return dest


def mobilenet_checkpoint(video: Path, dest: Path) -> Path:
    """`dest`: `fpn import-torchvision fasterrcnn_mobilenet_v3_large_fpn` of a calibrated random state dict."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from forward_inputs import calibrated_mobilenet_v3_state_dict, video_frames

    state = dest.with_suffix(".pth")
    torch.save(calibrated_mobilenet_v3_state_dict(video_frames(str(video), every_n=25)), state)
    subprocess.run([sys.executable, "-m", "jobs.cli", "import-torchvision", "fasterrcnn_mobilenet_v3_large_fpn",
                    str(dest), "--state-dict", str(state)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    state.unlink()
    return dest


def street_inputs(dest: Path) -> tuple[Path, Path]:
    """The clip and the imported model in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    video = street_avi(dest / "street.avi")
    return video, mobilenet_checkpoint(video, dest / "mobilenet_v3_fpn.safetensors")


if __name__ == "__main__":
    print(*street_inputs(Path(sys.argv[1])))
