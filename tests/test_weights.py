"""Checkpoints (safe loading) and torchvision equivalence: same weights, same detections."""
import os
import pickle

import pytest
import torch
from torchvision.models import detection as tvd

from fpn_model.config import preset
from fpn_model.detectors import build_detector
from fpn_model.weights import CheckpointError, import_torchvision, load_checkpoint, read_config, save_checkpoint

SIZES = dict(min_size=256, max_size=320)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 240, 300, generator=g), torch.rand(3, 256, 200, generator=g)]


@pytest.mark.parametrize("name,low_scores", [
    ("fasterrcnn_resnet50_fpn", False), ("retinanet_resnet50_fpn", True), ("maskrcnn_resnet50_fpn", False),
    ("fasterrcnn_resnet50_fpn_v2", False), ("retinanet_resnet50_fpn_v2", True),
])
def test_same_detections_as_torchvision(name, low_scores, images, tmp_path, record_property):
    """Random-initialised torchvision model -> local state dict -> our modules: identical output."""
    torch.manual_seed(1)
    ref = getattr(tvd, name)(weights=None, weights_backbone=None, **SIZES).eval()
    extra = {"score_thresh": 0.0} if low_scores else {}  # an untrained RetinaNet scores below 0.05
    if low_scores:
        ref.score_thresh = 0.0
    path = tmp_path / "ref.pth"
    torch.save(ref.state_dict(), path)
    ours = import_torchvision(name, path, **SIZES, **extra)
    with torch.no_grad():
        expected, got = ref(images), ours(images)
    worst = 0.0
    for e, g in zip(expected, got):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        for key in ("boxes", "scores", "labels") + (("masks",) if "masks" in e else ()):
            worst = max(worst, (e[key].float() - g[key].float()).abs().max().item())
    record_property("max_abs_diff", worst)
    print(f"{name}: max abs difference {worst:.3g}")
    assert worst <= 1e-4


def test_mobilenet_import_loads_every_tensor(tmp_path):
    ref = tvd.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None).eval()
    torch.save(ref.state_dict(), tmp_path / "m.pth")
    ours = import_torchvision("fasterrcnn_mobilenet_v3_large_fpn", tmp_path / "m.pth")
    theirs = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    mine = ours.state_dict()
    assert len(mine) == len(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine.values(), theirs.values()))


def test_checkpoint_round_trip_keeps_config_and_outputs(tmp_path):
    cfg = preset("trees", class_names=("Tree",), num_classes=2, score_thresh=0.0)
    model = build_detector(cfg).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert read_config(path)[0] == cfg and loaded.config == cfg
    img = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        a = build_detector(cfg).eval()
        a.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        torch.testing.assert_close(a(img)[0]["boxes"], loaded(img)[0]["boxes"])
    assert path.stat().st_size < sum(v.numel() * 4 for v in model.state_dict().values()) * 0.6  # fp16 storage
    # readable as any file this process writes (safetensors made it 0600: a cluster's other users could not load it)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_loading_draws_no_random_weights_and_leaves_other_threads_alone(tmp_path):
    """Loading skips the random initialisers (their draws would be overwritten): no draw from torch's generator,
    every tensor exactly the file's; a model built on another thread meanwhile draws its weights as ever."""
    import threading

    cfg = preset("faster_rcnn_mobilenet_v3_fpn", num_classes=3, class_names=("a", "b"))
    model = build_detector(cfg).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    torch.manual_seed(5)
    loaded = load_checkpoint(path)
    after_load = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after_load, torch.rand(4))  # the load drew nothing
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    beside: dict = {}
    both = threading.Barrier(2)

    def build():
        both.wait()
        beside["model"] = build_detector(cfg)

    torch.manual_seed(7)
    t = threading.Thread(target=build)
    t.start()
    both.wait()
    load_checkpoint(path)  # while the other thread builds, drawing from the same generator
    t.join()
    torch.manual_seed(7)
    alone = build_detector(cfg).state_dict()
    assert all(torch.equal(beside["model"].state_dict()[k], v) for k, v in alone.items())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"backbone.body.conv1.weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        import_torchvision("fasterrcnn_resnet50_fpn", bad)
    assert not _Evil.marker.exists()
    with pytest.raises(CheckpointError, match="not an fpn-pipeline checkpoint"):
        load_checkpoint(bad)
    assert not _Evil.marker.exists()


def test_state_dict_that_does_not_fit_is_refused_naming_keys(tmp_path):
    sd = tvd.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    sd.pop("roi_heads.box_predictor.cls_score.weight")
    with pytest.raises(CheckpointError, match="missing keys"):
        import_torchvision("fasterrcnn_resnet50_fpn", sd)


def test_a_model_name_that_is_no_checkpoint_says_what_it_is(tmp_path):
    from fpn_model.zoo import resolve

    with pytest.raises(FileNotFoundError, match="a torchvision detector, to import first: fpn import-torchvision "
                                                "retinanet_resnet50_fpn"):
        resolve("retinanet_resnet50_fpn")
    with pytest.raises(IsADirectoryError, match="a directory, not a checkpoint file"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("code, says", [
    ("import torch\nimport no_such_module_xyz\n", "(line 2: ModuleNotFoundError: No module named 'no_such_module_xyz')"),
    ("class M(:\n    pass\n", "(SyntaxError: "),
    ("raise RuntimeError('needs CUDA 13\\nsecond line')\n", "(line 1: RuntimeError: needs CUDA 13)"),
])
def test_a_model_plugin_that_fails_to_import_is_one_line_naming_its_file_and_the_cause(tmp_path, code, says):
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(code)
    with pytest.raises(CheckpointError) as e:
        read_config(f"{plugin}:M")
    assert str(e.value).startswith(f"model plugin {plugin}:M cannot be loaded ") and says in str(e.value)
    assert "\n" not in str(e.value)
