"""Per-image limits sized from training annotations (fpn_model.limits) and recorded by `fpn eval --record`."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import DATA, SOAP_XML
from fpn_model.config import preset
from fpn_model.data import Annotated
from fpn_model.limits import densest, input_window, sized_limits
from jobs.cli import cli

YELL_XML = DATA / "aerial-trees" / "2019_YELL_2_528000_4978000_image_crop2.xml"  # the bundled model's training image


def annotated(centres) -> Annotated:
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    boxes = np.concatenate([c - 3, c + 3], axis=1)
    return Annotated(Path("unused.png"), boxes, np.ones(len(c), np.int64))


def test_densest_counts_the_most_centres_in_one_window_of_any_image():
    cluster = [(10 + i, 12 + i) for i in range(10)]  # all in one quarter-window cell
    far = [(1000, 1000), (1010, 1005), (2000, 50)]
    items = [annotated(cluster + far), annotated([(5, 5)] * 4)]
    assert densest(items, 100) == 10
    assert densest(items, None) == 13  # whole images
    assert densest([annotated(np.zeros((0, 2)))], 100) == 0


def test_densest_equals_counting_every_window_on_its_grid():
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 900, size=(300, 2)) ** 1.3 / 10  # denser near the origin
    window = 120.0
    cell = window / 4
    g = np.floor(centres / cell).astype(int)
    brute = max(int(((g[:, 0] >= x) & (g[:, 0] < x + 4) & (g[:, 1] >= y) & (g[:, 1] < y + 4)).sum())
                for x in range(g[:, 0].min() - 3, g[:, 0].max() + 1) for y in range(g[:, 1].min() - 3, g[:, 1].max() + 1))
    assert densest([annotated(centres)], window) == brute


def test_limits_are_sized_from_the_densest_input_sized_window():
    trees = preset("trees")  # native resolution: a 1024 tile covers 1024 training-image pixels
    assert input_window(trees, 1024) == 1024 and input_window(trees.replace(scale=2.0), 1024) == 512
    assert input_window(preset("faster_rcnn_r50_fpn"), 1024) is None  # resized whole: whole images count
    limits, n = sized_limits([annotated([(10 + i, 10) for i in range(147)])], trees)
    assert n == 147
    assert limits == {"detections_per_img": 300, "rpn_post_nms_top_n_test": 600, "rpn_pre_nms_top_n_test": 1200}
    with pytest.raises(ValueError, match="no object"):
        sized_limits([annotated(np.zeros((0, 2)))], trees)


@pytest.mark.slow
def test_fpn_eval_records_sized_limits_in_the_checkpoint_when_they_keep_ap(tmp_path):
    from fpn_model.weights import file_sha256, read_config, read_limits, record_limits
    from fpn_model.zoo import resolve

    model = tmp_path / "trees.safetensors"
    shutil.copy(resolve("trees"), model)
    preset_limits = {"detections_per_img": 500, "rpn_post_nms_top_n_test": 1000, "rpn_pre_nms_top_n_test": 3000}
    record_limits(model, preset_limits, {})  # the bundled model as trained, before its limits were sized
    before = file_sha256(model)
    r = CliRunner().invoke(cli, ["eval", str(model), str(SOAP_XML), "--single-class", "Tree", "--views", "8",
                                 "--limits-from", str(YELL_XML), "--record", "--format", "json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout[r.stdout.index("{"):])
    assert metrics["sized/AP50"] >= metrics["own/AP50"] - metrics["own/AP50_sd"]
    cfg, _ = read_config(model)
    assert (cfg.detections_per_img, cfg.rpn_post_nms_top_n_test, cfg.rpn_pre_nms_top_n_test) == (300, 600, 1200)
    record = read_limits(model)
    assert record["densest"] == 147 and record["limits"]["detections_per_img"] == 300
    assert set(record["evaluated"]) == {"own", "sized"} and "--single-class Tree --views 8 --limits-from" in record["how"]
    assert file_sha256(model) != before  # a new model id: outputs made with the old limits are not mixed in
