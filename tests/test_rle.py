"""Mask RLEs from run boundaries (fpn_model.rle) against pycocotools' encoding of the masks pasted into the frame."""
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from fpn_model.rle import chunks_to_rle, encode_masks, rle_columns, runs_to_rle


def pasted(masks: np.ndarray, x0: int, y0: int, h: int, w: int) -> list[dict]:
    out = []
    for m in masks:
        full = np.zeros((h, w), np.uint8, order="F")
        full[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] = m
        rle = mask_utils.encode(full)
        out.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
    return out


@pytest.mark.parametrize("encode", [runs_to_rle, chunks_to_rle, encode_masks])
@pytest.mark.parametrize("h, w, x0, y0, th, tw", [
    (40, 30, 0, 0, 40, 30),  # the whole frame: runs continue from a column's bottom into the next one's top
    (50, 60, 7, 11, 20, 25),  # a tile inside the frame
    (30, 30, 0, 5, 25, 10),  # touching the bottom, not the top
    (16, 16, 3, 0, 16, 5),  # full height at an offset: runs join across columns
])
def test_encode_masks_equals_pycocotools_on_the_pasted_masks(encode, h, w, x0, y0, th, tw):
    """Both ways (runs_to_rle on GPUs, chunks_to_rle on CPUs), run here on the CPU."""
    rng = np.random.default_rng(h * w + x0)
    blobs = rng.random((20, th, tw)) < 0.5  # with the rest, more masks than one chunk (fpn_model.rle.CHUNK)
    special = np.stack([np.zeros((th, tw), bool), np.ones((th, tw), bool),  # empty, full
                        np.eye(th, tw, dtype=bool), np.eye(th, tw, k=1, dtype=bool)[::-1]])
    corners = np.zeros((2, th, tw), bool)
    corners[0, -1, 0] = corners[0, 0, -1] = True  # a column's last row and the next column's first
    corners[1, -1, :] = corners[1, 0, :] = True
    masks = np.concatenate([blobs, special, corners])
    got = encode(torch.from_numpy(masks), x0=x0, y0=y0, height=h, width=w)
    assert got == pasted(masks, x0, y0, h, w)
    assert np.array_equal(mask_utils.decode(got[0])[y0:y0 + th, x0:x0 + tw], masks[0])


def test_encode_masks_of_no_masks_and_masks_outside_the_frame():
    assert encode_masks(torch.zeros((0, 4, 4), dtype=torch.bool), x0=0, y0=0, height=8, width=8) == []
    empty = np.zeros((2, 4, 4), bool)
    for encode in (runs_to_rle, chunks_to_rle):
        assert encode(torch.from_numpy(empty), x0=1, y0=2, height=8, width=8) == pasted(empty, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="do not fit"):
        encode_masks(torch.ones((1, 4, 4), dtype=torch.bool), x0=6, y0=0, height=8, width=8)


def test_rle_columns_are_the_pixels_pycocotools_decodes():
    """The runs `fpn render` draws a mask from, per column, equal pycocotools' decoding: random masks, full ones,
    empty ones, and runs that go on from a column's bottom into the next column's top."""
    rng = np.random.default_rng(3)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = [rng.random((h, w)) < rng.random(), np.ones((h, w), bool), np.zeros((h, w), bool)][t % 3]
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        drawn = np.zeros((h, w), bool)
        for c, top, bottom in zip(*rle_columns(rle["counts"].decode("ascii"), h)):
            drawn[top:bottom, c] = True
        assert np.array_equal(drawn, m), (t, h, w)
