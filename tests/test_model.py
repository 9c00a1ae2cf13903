"""fpn_model: backbones, necks, level assignment, builders, config validation."""
import math

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


def test_config_round_trips_through_dict():
    cfg = preset("trees")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
