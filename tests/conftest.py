"""Shared fixtures: one real local Ray session, a real S3 API (moto's server on 127.0.0.1),
videos written with known frame count, fps and content."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SOAP = DATA / "aerial-trees" / "SOAP_061.png"
SOAP_XML = DATA / "aerial-trees" / "SOAP_061.xml"
BIKES = DATA / "video" / "bikes.mp4"
GOP = 2  # test clips: a keyframe every 2 frames, so segments cut at keyframes fall where the tests cut them


def index_frame(i: int, h: int = 64, w: int = 96) -> np.ndarray:
    """A frame whose content encodes `i`: 8 vertical bars, bar k white when bit k of i is set."""
    img = np.full((h, w, 3), 40, np.uint8)
    bar = w // 8
    for k in range(8):
        if (i >> k) & 1:
            img[:, k * bar:(k + 1) * bar] = 230
    return img


def cut_video(path: Path) -> Path:
    """A 40-frame H.264 MP4 of noisy `index_frame`s (frames of some size, so the cut falls inside one), its index up
    front (faststart), cut to 60% of its bytes: a file decoders open and read up to the cut."""
    import av

    noise = np.random.default_rng(0).integers(-20, 20, (40, 64, 96, 3))
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        st = c.add_stream("libx264", rate=10, options={"x264-params": "keyint=8:min-keyint=8:scenecut=0"})
        st.height, st.width, st.pix_fmt = 64, 96, "yuv420p"
        for i in range(40):
            img = (index_frame(i) + noise[i]).clip(0, 255).astype(np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in st.encode():
            c.mux(packet)
    path.write_bytes(path.read_bytes()[:path.stat().st_size * 6 // 10])
    return path


def read_index(frame: np.ndarray) -> int:
    bar = frame.shape[1] // 8
    return sum(1 << k for k in range(8) if frame[:, k * bar + bar // 4:(k + 1) * bar - bar // 4].mean() > 135)


@pytest.fixture(scope="session")
def make_video(tmp_path_factory):
    """Clips of `index_frame`s with a keyframe every GOP frames: segments are cut at keyframes, so tests that cut
    short clips into several segments need them often."""
    from jobs.demo import write_video

    root = tmp_path_factory.mktemp("videos")

    def make(name: str, frames: int, fps: float) -> Path:
        path = root / name
        if not path.exists():
            write_video((index_frame(i) for i in range(frames)), path, fps, gop=GOP)
        return path

    return make


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # workers inherit the driver's environment: AWS credentials for the moto server, as a user sets them
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_listening(args: list[str], port: int, what: str, *, env: dict | None = None,
                          timeout_s: float = 30) -> subprocess.Popen:
    """Start a server process and return it once 127.0.0.1:`port` accepts connections; RuntimeError naming
    `what` (the process killed) when it does not within `timeout_s`."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = serve_until_listening([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                                 "moto server", env=env)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket `test` on the moto server; credentials in the environment as a user has them."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    if fs.exists("test"):
        fs.rm("test", recursive=True)
    fs.mkdir("test")
    yield fs, s3_server
    s3fs.S3FileSystem.clear_instance_cache()
