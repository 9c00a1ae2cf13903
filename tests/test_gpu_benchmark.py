"""benchmarks/gpu.py on a CPU: the script a lent GPU machine runs (scripts/gpu-run) goes through the same code paths
here, so that what a GPU session has minutes for does not fail on something a CPU would have shown. Structure and
results are checked, never speed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["machine", "forward", "profile", "startup_parts", "startup", "raster", "precision", "decoders", "masks",
            "alone", "e2e"]
STEPS = ["ray", "planned", "detector_init", "detector_ready", "batch", "file"]  # startup_s, in the order they happen


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--out", str(out),
           "--batches", "1", "--reps", "1", "--warm", "0", "--alone-frames", "8", "--e2e-frames", "24",
           "--hd-frames", "10", "--min-size", "128", "--before", str(REPO), "--sections", ",".join(SECTIONS)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(out.read_text())


pytestmark = pytest.mark.slow


def test_every_section_ran_without_error(result):
    assert result["versions"]["device"] == "cpu"
    for name in SECTIONS:
        assert "error" not in result[name], (name, result[name])
        assert result[name]["section_s"] >= 0


def test_forward_compares_eager_and_both_trees_per_precision(result):
    after, before = result["forward"]["after"], result["forward"]["before"]
    assert after["api"] == before["api"] == "precision"
    for rows, this_tree in ((after["rows"], True), (before["rows"], False)):
        assert [(r["precision"], r["batch"]) for r in rows] == [("exact", 1), ("bf16", 1)]
        for r in rows:
            assert r["detector_fps"] > 0 and r["detections_per_frame"] == 100  # the boosted logits: 100 boxes a frame
            eager = this_tree and r["precision"] == "exact"  # on a CPU torchvision's eager forward at exact only
            assert ("eager_fps" in r) == ("eager_stages_ms" in r) == eager
            assert list(r["stages_ms"]) == ["upload", "transform", "backbone_neck", "rpn", "roi_heads_post"]
            if eager:
                assert list(r["eager_stages_ms"]) == list(r["stages_ms"])
            assert ("predictor_nchw_fps" in r) == eager  # --layouts: this tree's only, on a CPU at exact only


def test_profile_counts_what_would_wait_for_a_gpu(result):
    prof = result["profile"]
    ours = {"r50_b1_exact", "r50_b1_bf16", "trees_raster_exact"}
    assert set(prof) - {"section_s"} == ours | {"r50_b1_eager", "before"}
    assert set(prof["before"]) == ours  # the before tree's calls (no eager: it is the same torchvision)
    for name, p in [*prof.items(), *prof["before"].items()]:
        if name not in ("section_s", "before"):
            assert p["ms_per_call"] > 0 and p["per_call"]["aten::nonzero"] > 0 and p["top_self_cpu"], name
    assert prof["r50_b1_eager"]["per_call"]["torchvision::nms"] > 0  # torchvision's own calls are seen
    # both trees' calls on the same raster (the before tree's process once took the GPU's 4096 px under --quick)
    assert prof["trees_raster_exact"]["side"] == prof["before"]["trees_raster_exact"]["side"] == 1024


def test_startup_is_broken_down_in_order(result):
    parts = result["startup_parts"]
    marks = [parts[k] for k in ("import_torch", "import_torchvision", "import_pipeline_detect", "detector_built",
                                "frame_ready", "first_call", "second_call")]
    assert marks == sorted(marks) and marks[0] > 0
    run = result["startup"]
    assert run["returncode"] == 0 and run["state"] == "succeeded" and run["frames"] == 1
    steps = [run["startup_s"][k] for k in STEPS]
    assert steps == sorted(steps) and run["startup_s"]["before_run"] > 0
    assert 0 < run["first_file_s"] <= run["wall_s"]


def test_end_to_end_counts_every_frame_of_the_looped_clip(result):
    e2e, frames = result["e2e"], result["looped_frames"]
    assert 24 <= frames < 250  # cut at a keyframe of bikes.mp4 (keyframes at 0, 30, ...), not a whole copy
    assert e2e["state"] == "succeeded" and e2e["frames"] == frames == sum(n for _, n in e2e["file_times"])
    assert e2e["detections"] == 100 * frames and e2e["resources"]["precision"] == "exact"
    assert set(STEPS) <= set(e2e["startup_s"])
    assert result["alone"]["frames"] == 8 and result["alone"]["fps_1call"] > 0 and result["alone"]["fps_2call"] > 0


def test_accuracy_rasters_decoders_and_masks(result):
    trees = result["precision"]["trees"]
    assert trees["cpu/exact"]["AP50"] == pytest.approx(0.3547, abs=0.005)  # trees.md: 8 views, sized limits
    assert set(trees) == {"cpu/exact", "cpu/bf16"}
    agree = result["precision"]["r50_agreement"]["bf16"]
    assert agree["confident"] > 0 and 0 < agree["kept"] <= agree["confident"]
    assert result["raster"]["exact"]["detections"] > 0
    dec = result["decoders"]
    for name, frames in (("1080p", 10), ("640x272", 250)):
        for backend in ("pyav", "decord", "nvdec"):
            assert dec[f"{name}/{backend}"]["frames"] == frames
        assert dec[f"{name}/nvdec"]["backend"] == "pyav"  # no NVDEC here: the fallback decodes, exactly as PyAV
        assert dec[f"{name}/nvdec"]["mean_abs_diff_vs_pyav"] == 0
    assert result["masks"]["same_rles"] is True


def test_startup_overlap_runs_each_variant(tmp_path):
    """benchmarks/startup_overlap.py, which a GPU session runs to learn what changing the start would buy: each
    variant's job succeeds, `before` from the tree it is given, and the raylet of `prestart1` starts one worker
    ahead (its log, kept with --logs), where the plain start starts one per CPU (up to 4)."""
    import shutil

    before = tmp_path / "before"
    for pkg in ("fpn_model", "pipeline", "jobs"):
        shutil.copytree(REPO / pkg, before / pkg, ignore=shutil.ignore_patterns("*.safetensors", "__pycache__"))
    out = tmp_path / "overlap.json"
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "startup_overlap.py"), "--rounds", "1", "--variants",
                        "base,prestart1,before", "--before", str(before), "--logs", str(tmp_path / "logs"), "--out",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    med = json.loads(out.read_text())["median"]
    assert list(med) == ["base", "prestart1", "before"]
    for v, m in med.items():
        assert 0 < m["first_file_s"] <= m["wall_s"] + 1, v

    def ahead(variant: str) -> int:  # workers the raylet started before it registered the node
        log = (tmp_path / "logs" / variant / "raylet.out").read_text()
        return log[:log.index("Raylet of id")].count("Started worker process")

    assert ahead("base") > ahead("prestart1") == 1
