"""fpn_model: backbones, necks, level assignment, builders, config validation."""
import math

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from fpn_model.backbone import build_backbone
from fpn_model.config import ModelConfig, preset
from fpn_model.detectors import BackboneWithNeck, build_detector
from fpn_model.fpn import FPN, ExtraLevels, MaxPoolP6
from fpn_model.levels import PyramidRoIAlign, assign_levels


@pytest.mark.parametrize("name,channels", [
    ("resnet18", [64, 128, 256, 512]), ("resnet34", [64, 128, 256, 512]),
    ("resnet50", [256, 512, 1024, 2048]), ("resnet101", [256, 512, 1024, 2048]),
])
def test_resnet_returns_c2_to_c5_with_published_channels_and_strides(name, channels):
    body = build_backbone(ModelConfig(backbone=name))
    assert body.names == ["c2", "c3", "c4", "c5"]
    assert body.channels == channels and body.strides == [4, 8, 16, 32]
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 128, 96))
    for (k, v), c, s in zip(out.items(), body.channels, body.strides):
        assert v.shape == (1, c, 128 // s, 96 // s), k


def test_mobilenet_returns_c2_to_c5():
    body = build_backbone(ModelConfig(backbone="mobilenet_v3_large", returned_layers=(1, 2, 3, 5)))
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 128, 128))
    assert list(out) == ["c2", "c3", "c4", "c5"]
    assert [v.shape[-1] for v in out.values()] == [128 // s for s in body.strides] == [32, 16, 8, 4]
    assert [v.shape[1] for v in out.values()] == body.channels


def test_trainable_layers_freezes_early_stages():
    body = build_backbone(ModelConfig(backbone="resnet18", trainable_layers=2))
    frozen = {n.split(".")[1] for n, p in body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[1] for n, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1", "layer2"} and trainable == {"layer3", "layer4"}


@pytest.mark.parametrize("neck", ["fpn", "panet", "bifpn"])
@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "deconv"])
def test_necks_give_d_channels_on_every_level(neck, upsample):
    cfg = ModelConfig(backbone="resnet18", neck=neck, upsample=upsample, out_channels=32)
    net = BackboneWithNeck(cfg).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 100, 132))  # sizes not divisible by 32: upsampling must match shapes
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for k, v in out.items():
        level = int(k[1:])
        assert v.shape[1] == 32
        assert v.shape[-2] == math.ceil(100 / 2 ** level) or v.shape[-2] == -(-100 // 2 ** level), (k, v.shape)


def test_fpn_top_down_is_the_paper_equation():
    """P_k = conv3x3(lateral(C_k) + up2x(M_{k+1})) with nearest upsampling, checked by hand."""
    fpn = FPN([4, 8], 6, out_names=["p2", "p3"]).eval()
    c2, c3 = torch.rand(1, 4, 8, 8), torch.rand(1, 8, 4, 4)
    with torch.no_grad():
        out = fpn({"c2": c2, "c3": c3})
        m3 = fpn.lateral[1](c3)
        m2 = fpn.lateral[0](c2) + m3.repeat_interleave(2, -1).repeat_interleave(2, -2)
        torch.testing.assert_close(out["p3"], fpn.output[1](m3))
        torch.testing.assert_close(out["p2"], fpn.output[0](m2))


def test_p6_is_stride_two_subsampling_of_p5():
    fpn = FPN([4, 8], 6, out_names=["p4", "p5", "p6"], extra=MaxPoolP6()).eval()
    with torch.no_grad():
        out = fpn({"c4": torch.rand(1, 4, 16, 16), "c5": torch.rand(1, 8, 8, 8)})
    torch.testing.assert_close(out["p6"], out["p5"][..., ::2, ::2])


def test_extra_block_of_wrong_type_is_refused():
    with pytest.raises(TypeError, match="ExtraLevels"):
        FPN([4], 4, out_names=["p2"], extra=torch.nn.Identity())
    assert issubclass(MaxPoolP6, ExtraLevels)


def test_single_scale_baseline_has_one_level():
    cfg = ModelConfig(backbone="resnet18", neck="single", single_level=4, anchor_sizes=((32, 64, 128),), out_channels=32,
                      min_size=128, max_size=128)
    assert cfg.levels == (4,)
    model = build_detector(cfg).eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 128, 128))
        out = model([torch.rand(3, 128, 128)])
    assert list(feats) == ["p4"] and feats["p4"].shape[-1] == 8
    assert set(out[0]["levels"].tolist()) <= {4}


@pytest.mark.parametrize("side,level", [(224, 4), (223, 3), (112, 4 - 1), (448, 5), (56, 2), (16, 2), (2000, 5)])
def test_level_assignment_formula(side, level):
    boxes = torch.tensor([[10.0, 10.0, 10.0 + side, 10.0 + side]])
    expect = min(5, max(2, math.floor(4 + math.log2(side / 224) + 1e-6)))
    assert assign_levels(boxes, 2, 5).item() == expect == level


def test_pyramid_roi_align_matches_torchvision_pooler():
    feats = {f"p{k}": torch.rand(2, 8, 256 // 2 ** k, 256 // 2 ** k) for k in (2, 3, 4, 5)}
    boxes = [torch.tensor([[0, 0, 20, 20], [10, 10, 200, 220.0]]), torch.tensor([[5, 5, 90, 60.0]])]
    ours = PyramidRoIAlign(list(feats), 7, 2)(feats, boxes, [(256, 256)] * 2)
    ref = MultiScaleRoIAlign(list(feats), 7, 2)(feats, boxes, [(256, 256)] * 2)
    torch.testing.assert_close(ours, ref)


def test_detectors_report_levels_within_the_pyramid():
    for name in ("retinanet_r50_fpn", "faster_rcnn_r50_fpn"):
        cfg = preset(name, backbone="resnet18", min_size=128, max_size=128, score_thresh=0.0)
        out = build_detector(cfg).eval()([torch.rand(3, 128, 128)])[0]
        assert len(out["levels"]) == len(out["boxes"]) > 0
        assert set(out["levels"].tolist()) <= set(cfg.levels)


@pytest.mark.parametrize("field,value,match", [
    ("neck", "fpm", "neck must be one of"), ("upsample", "cubic", "upsample"),
    ("anchor_sizes", ((32,),), "anchor_sizes has 1 levels"), ("num_classes", 0, "num_classes"),
])
def test_invalid_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{field: value})


def test_a_pyramid_without_as_many_anchor_sizes_says_what_to_set():
    with pytest.raises(ValueError, match=r'levels \(4,\)\): give one list of sizes per level, e.g. --set '
                                         r'"anchor_sizes=\[\[12, 20, 28, 40'):
        preset("trees", neck="single")  # the sizes of its 5 levels on one


def test_training_a_mask_rcnn_is_refused_before_any_work():
    """Training reads boxes only: torchvision failed at the first step ('Every element of targets should have a
    masks key'), even from COCO polygons."""
    from fpn_model.train import TrainConfig

    with pytest.raises(ValueError, match="arch=mask_rcnn: training reads boxes only"):
        TrainConfig(model=preset("mask_rcnn_r50_fpn"), train=("a.xml",))


def test_config_round_trips_through_dict():
    cfg = preset("trees")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# -- the exact fast path and the opt-in precisions of fpn_model.predict.Predictor ---------------------------------
def _bikes(n: int = 4, every: int = 10):
    from tests.conftest import BIKES
    from tests.forward_inputs import video_frames

    return video_frames(BIKES, n, every)


def _mobilenet_v3_fpn(frames, min_size: int):
    from tests.forward_inputs import calibrated_mobilenet_v3_fpn

    return calibrated_mobilenet_v3_fpn(frames, min_size)


def _assert_same_detections(plain, fast):
    """The exact path's promise: the same detections within 1e-4 (scores absolute, box coordinates relative to
    the coordinate: float32 itself resolves a 1200 px coordinate only to 1.2e-4 px), labels equal. Boxes are
    checked to 1.5e-4: on an AMD EPYC host (oneDNN's other kernels for channels_last convolutions) mobilenet_v3_fpn's
    moved 1.07e-4; folding norms moves them up to 2e-4 (fpn_model.predict.fold_norms), still caught."""
    from fpn_model.predict import detection_difference

    assert sum(len(d.boxes) for d in plain) > 0
    for a, b in zip(plain, fast):
        d = detection_difference(a, b)
        assert d["count"][0] == d["count"][1], d
        assert d["score"] <= 1e-4 and d["box_rel"] <= 1.5e-4, d


@pytest.mark.parametrize("which", ["trees", "mobilenet_v3_fpn"])
def test_fast_path_gives_the_eager_detections_on_real_frames(which):
    from tests.conftest import SOAP
    from fpn_model.data import read_image
    from fpn_model.predict import FastRPN, Predictor
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    torch.set_num_threads(2)  # the NMS / RoIAlign pool has 2 threads
    frames = _bikes()
    model = load_checkpoint(resolve("trees")) if which == "trees" else _mobilenet_v3_fpn(frames, 320)
    plain, fast = Predictor(model, fast=False), Predictor(model)
    assert fast.fast and isinstance(fast.model.rpn, FastRPN) and fast.executor is not None
    assert next(fast.model.backbone.parameters()).is_contiguous(memory_format=torch.channels_last)
    # the caller's model is left as it was (fpn train validates the model it is training)
    assert type(model.rpn).__name__ == "RegionProposalNetwork"
    assert all(p.is_contiguous() for p in model.parameters())
    _assert_same_detections(plain(frames), fast(frames))
    if which == "trees":  # its own kind of imagery, tiled
        soap = [read_image(SOAP)]
        _assert_same_detections(plain(soap), fast(soap))


def test_batch_wide_choices_are_torchvision_s_own():
    """The fast path's RPN and RoI heads choose boxes for the whole batch at once (on a GPU a few waits per batch,
    not several per image): the same boxes, scores and labels as torchvision's loop over the images, bit for bit,
    for images of different sizes in one batch, with the NMS calls in the calling thread or on a pool."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from fpn_model.predict import FastRoIHeads, FastRPN, fast_path

    frames = _bikes()
    model = _mobilenet_v3_fpn(frames, 320).eval()
    images = [torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames]
    images[1], images[3] = images[1][:, :200, :300], images[3][:, 20:, 10:]
    with torch.inference_mode():
        ref = model(images)
    assert sum(len(r["boxes"]) for r in ref) > 0
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            fast = fast_path(copy.deepcopy(model), executor, channels_last=False)
            assert type(fast.rpn) is FastRPN and type(fast.roi_heads) is FastRoIHeads
            with torch.inference_mode():
                out = fast(images)
            for a, b in zip(ref, out):
                assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    # Mask R-CNN's masks come from the boxes chosen so: the same too
    torch.manual_seed(0)
    masks = build_detector(preset("mask_rcnn_r50_fpn", backbone="resnet18", min_size=160, max_size=160,
                                  score_thresh=0.0, num_classes=7)).eval()
    images = [torch.rand(3, 160, 160), torch.rand(3, 120, 150)]
    with torch.inference_mode():
        ref, out = masks(images), fast_path(copy.deepcopy(masks), None, channels_last=False)(images)
    assert all(len(r["masks"]) for r in ref)
    for a, b in zip(ref, out):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_retinanet_chooses_torchvision_s_candidates_for_the_whole_batch():
    """FPNRetinaNet's post-processing picks each level's candidates for all images at once: torchvision's own
    boxes, scores and labels, bit for bit (images of two sizes, NMS in the calling thread or on a pool), plus
    the level of each."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.models.detection import RetinaNet

    from fpn_model.predict import fast_path

    torch.manual_seed(0)
    cfg = preset("retinanet_r50_fpn", backbone="resnet18", min_size=160, max_size=160, score_thresh=0.005,
                 num_classes=5)
    model = build_detector(cfg).eval()
    images = [torch.rand(3, 160, 160), torch.rand(3, 120, 150), torch.rand(3, 160, 128)]
    plain = copy.deepcopy(model)
    plain.__class__ = RetinaNet  # torchvision's forward and post-processing as they are
    with torch.inference_mode():
        ref = plain(images)
    assert all(len(r["boxes"]) > 50 for r in ref)
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            fast = fast_path(copy.deepcopy(model), executor, channels_last=False)
            assert fast.executor is executor
            with torch.inference_mode():
                out = fast(images)
            for a, b in zip(ref, out):
                assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
                assert set(b["levels"].tolist()) <= set(cfg.levels) and len(b["levels"]) == len(b["boxes"])


def test_parallel_nms_and_roi_align_are_torchvision_s_own():
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.ops import batched_nms

    from fpn_model.predict import batched_nms_many, fast_path

    g = torch.Generator().manual_seed(0)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 300
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 1], 1)

    # per class (more than 4000 numbers), the coordinate trick (float32 and float64: its offset's sum), nothing at all
    jobs = [(boxes(n), torch.rand(n, generator=g), torch.randint(0, 5, (n,), generator=g), 0.6) for n in (3000, 200, 0)]
    jobs.append(tuple(x.double() if x.is_floating_point() else x for x in jobs[1][:3]) + (0.6,))
    with ThreadPoolExecutor(2) as pool:
        for executor in (None, pool):
            for (b, s, i, t), keep in zip(jobs, batched_nms_many(jobs, executor)):
                assert torch.equal(keep, batched_nms(b, s, i, t))
        pooler = PyramidRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)
        feats = {f"p{k}": torch.rand(2, 8, 512 // 2 ** k, 512 // 2 ** k, generator=g) for k in (2, 3, 4, 5)}
        rois = [boxes(300), boxes(200)]
        ref = pooler(feats, rois, [(512, 512)] * 2)
        model = torch.nn.Module()
        model.pool = pooler
        fast_path(model, pool)
        assert type(model.pool).__name__ == "FastPyramidRoIAlign"
        feats_cl = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}
        assert torch.equal(model.pool(feats_cl, rois, [(512, 512)] * 2), ref)


def test_tile_offsets_and_frame_clipping_are_the_tensor_arithmetic_they_replace():
    """`Predictor._collect` shifts a tile's boxes and clips a frame's with Python scalars (no tensor of offsets or
    limits copied to the device: on a GPU each copy waits for it): the same numbers as the tensor arithmetic."""
    from fpn_model.predict import _shifted

    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(500, 4, generator=g) * 1400 - 200  # in and out of a 1000x800 frame
    for x, y in ((0, 0), (768, 0), (0, 512), (3072, 1536)):
        ref = boxes + torch.tensor([x, y, x, y], dtype=torch.float32)
        assert torch.equal(_shifted(boxes, x, y), ref) and torch.equal(_shifted(boxes.half(), x, y), boxes.half().float()
                                                                       + torch.tensor([x, y, x, y]))
    before = boxes.clone()
    _shifted(boxes, 8, 8)
    assert torch.equal(boxes, before)  # the tile's own boxes stay as they were
    from fpn_model.predict import Predictor

    w, h = 1000, 800  # one frame, one part: no merge; a model without a config: no score threshold
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    out = Predictor(torch.nn.Identity())._collect([(0, 0, 0, {"boxes": boxes, "scores": torch.rand(500, generator=g),
                                                             "labels": torch.ones(500, dtype=torch.int64),
                                                             "levels": torch.full((500,), 2)})], [(h, w)])[0]
    clipped = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h]))
    inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])  # the others have no area left
    assert 0 < int(inside.sum()) < 500 and np.array_equal(out.boxes, clipped[inside].numpy())


def test_detections_go_back_to_the_frame_size_as_torchvision_s_transform_takes_them():
    """FPNTransform.postprocess resizes with Python-number ratios (no copies to the device, each a wait on a GPU):
    the same boxes and pasted masks as torchvision's own postprocess, the levels tagged from the model-size boxes."""
    import copy

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from fpn_model.detectors import FPNTransform

    g = torch.Generator().manual_seed(0)
    transform = FPNTransform(preset("trees"), roi_levels=(2, 5)).eval()
    shapes, originals = [(800, 1333), (608, 800), (800, 800)], [(1080, 1920), (576, 768), (333, 333)]
    result = [{"boxes": torch.rand(50, 4, generator=g).cumsum(1) * 200, "masks": torch.rand(50, 1, 28, 28, generator=g)}
              for _ in shapes]
    ref = GeneralizedRCNNTransform.postprocess(transform, copy.deepcopy(result), shapes, originals)
    levels = [assign_levels(r["boxes"], 2, 5) for r in result]
    out = transform.postprocess(copy.deepcopy(result), shapes, originals)
    for o, r, lv in zip(out, ref, levels):
        assert torch.equal(o["boxes"], r["boxes"]) and torch.equal(o["masks"], r["masks"])
        assert torch.equal(o["levels"], lv)


@pytest.mark.parametrize("name", ["faster_rcnn_r50_fpn", "retinanet_r50_fpn", "mask_rcnn_r50_fpn"])
def test_a_batch_makes_no_tensor_from_python_numbers_per_image(name):
    """On a GPU a tensor made from Python numbers for the device is a copy that waits for it (torchvision's heads
    made several per image: 112 of 159 waits for a batch of 16 on an H200). The Predictor's forward makes the same
    few for a batch of 3 frames as for 1 (counted on the CPU, where they are all made, with torch's dispatch)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from fpn_model.predict import Predictor

    class Made(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no NMS thread pool, as on a GPU: every op in this thread, where the mode sees it
    try:
        predictor = Predictor(build_detector(preset(name, backbone="resnet18", min_size=128, max_size=128)).eval())
    finally:
        torch.set_num_threads(threads)
    made = []
    for n in (1, 3):
        frames = np.random.default_rng(n).integers(0, 255, (n, 96, 128, 3), dtype=np.uint8)
        predictor(frames)
        with Made() as mode:
            predictor(frames)
        made.append(mode.ops["lift_fresh"])  # torch.tensor(...) of Python data
    assert 0 < made[0] == made[1], made
    batch = torch.rand(2, 3, 96, 128)
    with Made() as mode:
        predictor.model.transform(batch)
    assert mode.ops["lift_fresh"] == 0  # the normalisation's mean and std were made once, not at each call


def test_precisions_are_opt_in_and_change_only_a_copy():
    from fpn_model.predict import Predictor

    model = build_detector(preset("trees", min_size=128, max_size=128)).eval()
    assert Predictor(model).precision == "exact"
    q = Predictor(model, precision="int8")
    assert isinstance(q.model.roi_heads.box_head.fc6, torch.ao.nn.quantized.dynamic.Linear)
    assert type(model.roi_heads.box_head.fc6) is torch.nn.Linear
    b = Predictor(model, precision="bf16")
    frame = (torch.rand(96, 128, 3) * 255).byte().numpy()
    for p in (q, b):
        d = p([frame])[0]
        assert d.boxes.dtype == np.float32 and len(d.boxes) == len(d.scores)
    with pytest.raises(ValueError, match="precision must be one of"):
        Predictor(model, precision="fp8")
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        Predictor(model, precision="fp16")


def test_a_job_asks_only_for_precisions_its_detectors_device_has():
    from pipeline.plan import Resources

    assert Resources(gpus_per_detector=1, precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match="int8 is for CPUs"):
        Resources(gpus_per_detector=1, precision="int8")
    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        Resources(gpus_per_detector=0, precision="fp16")


@pytest.mark.parametrize("scale", [None, 2.0, 1.0])
def test_a_batch_is_transformed_as_torchvision_transforms_each_image(scale):
    """The batched transform (one normalise, resize and pad for a [B, 3, H, W] batch) gives torchvision's
    per-image result, value for value."""
    from fpn_model.detectors import FPNTransform

    cfg = preset("trees", min_size=200, max_size=333, scale=scale)
    t = FPNTransform(cfg, cfg.roi_levels).eval()
    x = torch.rand(3, 3, 150, 190, generator=torch.Generator().manual_seed(0))  # resized: not a multiple of 32
    batched, _ = t(x)
    listed, _ = t(list(x))
    assert torch.equal(batched.tensors, listed.tensors)
    assert batched.image_sizes == listed.image_sizes


def test_the_predictor_gives_the_detections_of_the_model_called_on_its_own():
    """Frames uploaded as one batch, transformed as a batch, detections brought back in one copy: the detections
    torchvision's forward gives on a list of float images; tiles of equal frames batched together: each frame's
    detections as when it is alone."""
    from tests.conftest import SOAP
    from fpn_model.data import read_image
    from fpn_model.predict import Detections, Predictor, TileConfig, detection_difference
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve

    model = load_checkpoint(resolve("trees"))
    frames = np.stack(_bikes()[:3])
    with torch.inference_mode():
        ref = model([torch.from_numpy(f).permute(2, 0, 1).float().div(255) for f in frames])
    got = Predictor(model, fast=False, channels_last=False)(frames)
    _assert_same_detections([Detections(*(r[k].numpy() for k in ("boxes", "scores", "labels", "levels")))
                             for r in ref], got)
    for fast, channels_last in ((False, False), (True, True)):  # frames arrive in the model's memory format
        x = Predictor(model, fast=fast)._upload(frames, [0, 1])
        assert x.shape == (2, 3, *frames.shape[1:3]) and x.dtype == torch.float32 and float(x.max()) <= 1
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    soap = read_image(SOAP)
    pair = [soap[:300, :300], soap[100:, 100:][:300, :300]]
    tiled = Predictor(model, tile=TileConfig(size=160, overlap=32))
    together = tiled(pair)
    for frame, d in zip(pair, together):
        alone = tiled([frame])[0]
        assert len(alone.boxes) > 0
        diff = detection_difference(alone, d)
        assert diff["count"][0] == diff["count"][1] and diff["score"] <= 1e-4 and diff["box_rel"] <= 1e-4, diff


def test_one_growing_pinned_buffer_serves_every_upload_shape():
    """A thread's uploads to a GPU go through one host buffer (pinned there, plain here), grown to the largest batch,
    not a buffer kept for good per shape and frame count; each reuse first waits for the copy out of it."""
    from fpn_model.predict import Staging

    made, seen = [], []

    class Event:
        def record(self):
            seen.append("record")

        def synchronize(self):
            seen.append("wait")

    staging = Staging(allocate=lambda n: made.append(n) or torch.empty(n, dtype=torch.uint8), event=Event)
    views = []
    for shape in ((2, 4, 6, 3), (1, 4, 6, 3), (3, 8, 6, 3), (2, 4, 6, 3)):
        views.append(staging.take(shape))
        assert views[-1].shape == shape
        staging.copied()
    assert made == [144, 432]  # grown once, for the largest batch
    assert views[0].data_ptr() == views[1].data_ptr() and views[2].data_ptr() == views[3].data_ptr()
    assert seen == ["record", "wait", "record", "wait", "record", "wait", "record"]


def test_the_predictor_gives_mask_rcnn_masks_as_rles_of_the_models_own_masks():
    """Each detection's RLE decodes to the model's mask (> 0.5) in frame pixels, for a frame fed whole; tiled, to a
    frame-sized mask inside its box."""
    from pycocotools import mask as mask_utils

    from fpn_model.predict import Predictor, TileConfig

    torch.manual_seed(0)
    cfg = preset("mask_rcnn_r50_fpn", backbone="resnet18", num_classes=2, scale=1.0, score_thresh=0.0,
                 detections_per_img=20)
    model = build_detector(cfg).eval()
    frame = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    with torch.inference_mode():
        ref = model([torch.from_numpy(frame).permute(2, 0, 1).float().div(255)])[0]
    got = Predictor(model, fast=False, channels_last=False)([frame])[0]
    assert len(got.masks) == len(ref["masks"]) > 0
    for rle, m in zip(got.masks, ref["masks"][:, 0].numpy() > 0.5):
        assert rle["size"] == [96, 128] and np.array_equal(mask_utils.decode(rle).astype(bool), m)
    tiled = Predictor(model, tile=TileConfig(size=64, overlap=16))([frame])[0]
    assert len(tiled.masks) == len(tiled.boxes) > 0
    for rle, (x1, y1, x2, y2) in zip(tiled.masks, tiled.boxes):
        ys, xs = np.nonzero(mask_utils.decode(rle))
        assert rle["size"] == [96, 128]
        if len(xs):
            # torchvision pastes a mask into its box grown by a pixel on each side
            assert x1 - 2 <= xs.min() and xs.max() <= x2 + 2 and y1 - 2 <= ys.min() and ys.max() <= y2 + 2


def test_keep_freed_memory_is_process_wide_and_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = ("import resource, torch; from fpn_model.predict import keep_freed_memory; on = keep_freed_memory(); "
            "[torch.ones(20_000_000) for _ in range(3)]; f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
            "x = torch.ones(20_000_000); print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)")
    def faults(env: str) -> int:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "FPN_KEEP_FREED_MEMORY": env}).stdout.split()
        assert out[0] == str(env == "1")
        return int(out[1])

    # an 80 MB tensor reuses freed memory instead of faulting in 20k pages. The fewest of up to 3 tries: once in
    # about ten CI runs a process faulted them in all the same (the machine reclaiming its memory, not malloc)
    tries = [faults("1")]
    while tries[-1] >= 1000 and len(tries) < 3:
        tries.append(faults("1"))
    assert tries[-1] < 1000 < faults("0"), tries


def test_keep_freed_memory_env_reaches_threads_that_allocated_before_it():
    """A Ray actor runs its calls on a thread that had its own malloc arena before our code ran: mallopt cannot
    move it (120 MB tensors there are page-faulted in every time), the environment from process start does."""
    import os
    import subprocess
    import sys

    from fpn_model.memory import keep_freed_memory_env

    code = """if True:
        import resource, threading, torch
        from fpn_model.predict import keep_freed_memory
        faults, ready, go = [], threading.Event(), threading.Event()
        def work():
            torch.ones(10)  # this thread's arena exists before keep_freed_memory()
            ready.set(); go.wait()
            [torch.ones(30_000_000) for _ in range(3)]
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.ones(30_000_000)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
        t = threading.Thread(target=work); t.start(); ready.wait()
        keep_freed_memory(); go.set(); t.join()
        print(faults[0])"""
    env = keep_freed_memory_env()
    assert env["MALLOC_ARENA_MAX"] == "1"
    faults = {}
    for name, extra in (("mallopt only", {}), ("environment", env)):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **extra})
        faults[name] = int(run.stdout)
    assert faults["environment"] < 1000 < 20_000 < faults["mallopt only"]
    off = subprocess.run([sys.executable, "-c", "from fpn_model.memory import keep_freed_memory_env as e; print(e())"],
                         capture_output=True, text=True, check=True, env={**os.environ, "FPN_KEEP_FREED_MEMORY": "0"})
    assert off.stdout.strip() == "{}"


def test_frozen_norms_fold_into_the_convolutions_before_them():
    """fold_norms leaves no batch norm in torchvision's R50-FPN and MobileNetV3 bodies (frozen, or in eval mode)
    and the features within float rounding of the unfolded model's; a norm in training mode is left alone."""
    import copy

    from torchvision.models import mobilenet_v3_large
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.ops.misc import FrozenBatchNorm2d

    from fpn_model.predict import fold_norms

    torch.manual_seed(0)
    r50 = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                  norm_layer=FrozenBatchNorm2d).eval()
    for m in r50.modules():  # stats a trained model would have, not the identity a fresh one starts with
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
    x = torch.rand(1, 3, 256, 320)
    folded = copy.deepcopy(r50)
    assert fold_norms(folded) == 53
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():
        a, b = r50.backbone(x), folded.backbone(x)
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5 * a[k].abs().max(), k
    mb = mobilenet_v3_large().eval()
    folded = copy.deepcopy(mb)
    assert fold_norms(folded) == 46
    with torch.no_grad():
        assert torch.allclose(mb.features(x), folded.features(x), rtol=1e-4, atol=1e-5)
    assert fold_norms(mobilenet_v3_large().train()) == 0
    # the Predictor folds on the CPU's approximate paths, not on its exact one
    from fpn_model.predict import Predictor

    norms = lambda p: sum(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in p.model.modules())
    assert norms(Predictor(r50)) == 53 and norms(Predictor(r50, precision="int8")) == 0
    assert norms(Predictor(r50, precision="bf16")) == 0


# -- what a model returns: a plugin's output is checked ----------------------------------------------------------

class _Returns(torch.nn.Module):
    """A model plugin that returns `output(h, w)` for each image: a dict of lists, made tensors as a plugin would."""

    config = ModelConfig(num_classes=3, class_names=("alpha", "beta"), score_thresh=0.5)

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, images):
        out = []
        for im in images:
            d = self.output(im.shape[-2], im.shape[-1])
            if not isinstance(d, dict):
                return d
            out.append({k: torch.tensor(v, dtype=torch.int64 if k == "labels" else torch.float32) if k != "levels"
                        else torch.tensor(v, dtype=torch.int8) for k, v in d.items()})
        return out


def _dets(boxes, scores, labels, levels=None):
    return lambda h, w: {"boxes": boxes, "scores": scores, "labels": labels,
                         "levels": [2] * len(scores) if levels is None else levels}


_BOX = [10.0, 20.0, 50.0, 60.0]


@pytest.mark.timeout(60)
def test_a_model_that_returns_no_output_for_its_images_raises_instead_of_waiting_forever():
    from fpn_model.predict import ModelOutputError, Predictor

    frames = np.zeros((2, 48, 64, 3), np.uint8)
    with pytest.raises(ModelOutputError, match=r"model empty\.py:M returned 0 outputs for 2 image\(s\)"):
        Predictor(_Returns(lambda h, w: []), name="empty.py:M")(frames)
    with pytest.raises(ModelOutputError, match="returned None for 2 image"):
        Predictor(_Returns(lambda h, w: None), name="none.py:M")(frames)


@pytest.mark.parametrize("output, says", [
    (_dets([[float("nan"), 20.0, 50.0, 60.0]], [0.9], [1]), "boxes with a NaN or infinite coordinate"),
    (_dets([[5.0, 5.0, 30.0, float("inf")]], [0.9], [1]), "boxes with a NaN or infinite coordinate"),
    (_dets([[50.0, 60.0, 10.0, 20.0]], [0.9], [1]), "boxes with x2 < x1 or y2 < y1"),
    (_dets([_BOX], [7.5], [1]), r"scores outside \[0, 1\] or NaN"),
    (_dets([_BOX], [float("nan")], [1]), r"scores outside \[0, 1\] or NaN"),
    (_dets([_BOX, _BOX], [0.9, 0.9], [1, 7]), r"labels outside 0\.\.2"),
    (_dets([_BOX], [0.9], [-1]), r"labels outside 0\.\.2"),
    (_dets([[*_BOX, 0.5]], [0.9], [1]), r"boxes of shape \[1, 5\], expected \[N, 4\]"),
    (_dets([[*_BOX, *_BOX]], [0.9], [1]), r"boxes of shape \[1, 8\], expected \[N, 4\]"),
    (_dets([_BOX, _BOX], [0.9], [1, 1]), r"scores of shape \[1\] for 2 boxes, expected \[2\]"),
    (_dets([_BOX], [0.9], [1], [2, 2]), r"levels of shape \[2\] for 1 boxes, expected \[1\]"),
    (lambda h, w: {"boxes": [_BOX], "scores": [0.9], "labels": [1]}, "no 'levels' tensor"),
])
def test_an_output_that_breaks_the_contract_raises_naming_the_model_and_the_flaw(output, says):
    """Boxes `[N, 4]` finite with x2 >= x1 and y2 >= y1, scores `[N]` in [0, 1], labels `[N]` among the classes
    (1..num_classes - 1), the same N for all: otherwise the frame would be written with whatever came back."""
    from fpn_model.predict import ModelOutputError, Predictor

    with pytest.raises(ModelOutputError, match=f"^model bad.py:Bad returned (.* )?{says}"):
        Predictor(_Returns(output), name="bad.py:Bad")(np.zeros((2, 48, 64, 3), np.uint8))


def test_float_labels_are_refused():
    from fpn_model.predict import ModelOutputError, Predictor

    model = _Returns(None)
    model.forward = lambda images: [{"boxes": torch.tensor([_BOX]), "scores": torch.tensor([0.9]),
                                     "labels": torch.tensor([1.0]), "levels": torch.tensor([2])} for _ in images]
    with pytest.raises(ModelOutputError, match="labels of torch.float32, expected integers"):
        Predictor(model)(np.zeros((1, 48, 64, 3), np.uint8))


def test_any_models_detections_keep_its_score_threshold_and_an_area_in_the_frame():
    """A plugin's detections at or below `config.score_thresh` are dropped, as ours drop them in their heads; boxes
    are clipped to the frame, and one wholly outside it (clipped to no area) is dropped, as is label 0."""
    from fpn_model.predict import Predictor, TileConfig

    boxes = [_BOX, _BOX, [-10.0, -10.0, 200.0, 30.0], [70.0, 50.0, 90.0, 60.0], [10.0, 10.0, 10.0, 30.0], _BOX]
    model = _Returns(_dets(boxes, [0.9, 0.3, 0.8, 0.9, 0.9, 0.9], [1, 2, 2, 1, 1, 0]))  # label 0: the background
    frames = np.zeros((1, 48, 64, 3), np.uint8)
    got = Predictor(model)(frames)[0]
    assert got.scores.tolist() == pytest.approx([0.9, 0.8]) and got.labels.tolist() == [1, 2]
    assert got.boxes.tolist() == [[10.0, 20.0, 50.0, 48.0], [0.0, 0.0, 64.0, 30.0]]
    tiled = Predictor(model, tile=TileConfig(size=32, overlap=8, merge="nmm"))(frames)[0]  # before merging too
    assert len(tiled.scores) and tiled.scores.min() > 0.5
    b = tiled.boxes
    assert (b >= 0).all() and (b[:, 0::2] <= 64).all() and (b[:, 1::2] <= 48).all() and (b[:, 2:] > b[:, :2]).all()
