"""Sliced inference, merging, training steps and COCO metrics."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SOAP, SOAP_XML
from fpn_model.config import preset
from fpn_model.data import CropSampler, load_annotations
from fpn_model.detectors import build_detector
from fpn_model.evaluate import coco_metrics, evaluate
from fpn_model.predict import Predictor, TileConfig
from fpn_model.tiling import merge_detections, plan_tiles
from fpn_model.train import TrainConfig, train
from fpn_model.weights import load_checkpoint


def test_tiles_cover_the_frame_with_the_overlap():
    tiles = plan_tiles(1000, 1500, 512, 64)
    cover = np.zeros((1000, 1500), bool)
    for x0, y0, x1, y1 in tiles:
        assert (x1 - x0, y1 - y0) == (512, 512)
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    xs = sorted({t[0] for t in tiles})
    assert all(b - a <= 512 - 64 for a, b in zip(xs, xs[1:]))
    assert plan_tiles(300, 200, 512, 64) == [(0, 0, 200, 300)]
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(100, 100, 64, 64)


def test_merge_methods():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60], [1, 1, 11, 11.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 1, 2])
    keep, merged = merge_detections(boxes, scores, labels, threshold=0.5, method="nms", metric="iou")
    assert sorted(keep.tolist()) == [0, 2, 3]  # IoU(box 0, box 1) = 0.6 > 0.5: box 1 suppressed
    keep, _ = merge_detections(boxes, scores, labels, threshold=0.65, method="nms", metric="iou")
    assert sorted(keep.tolist()) == [0, 1, 2, 3]  # 0.6 IoU survives 0.65
    keep, _ = merge_detections(boxes, scores, labels, threshold=0.65, method="nms", metric="ios")
    assert sorted(keep.tolist()) == [0, 2, 3]  # box 1 lies inside box 0: IoS 1.0; label 2 is separate
    keep, merged = merge_detections(torch.tensor([[0, 0, 10, 10], [5, 0, 20, 10.0]]), torch.tensor([0.9, 0.5]),
                                    torch.tensor([1, 1]), threshold=0.2, method="nmm", metric="iou")  # IoU 0.25
    assert keep.tolist() == [0] and merged.tolist() == [[0, 0, 20, 10]]


@pytest.mark.parametrize("method,metric", [("nms", "ios"), ("nmm", "iou"), ("nmm", "ios")])
def test_merge_is_the_greedy_pass_box_by_box(method, metric):
    """The merge (its greedy pass on the host) keeps and merges as a pass over the boxes one by one, best score
    first, does: crowded boxes of three labels, ties in score included."""
    from fpn_model.tiling import _pairwise

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=g) * 40], 1)
    scores = (torch.rand(300, generator=g) * 20).round() / 20
    labels = torch.randint(0, 3, (300,), generator=g)
    order = scores.argsort(descending=True)
    b, lab = boxes[order], labels[order]
    over = _pairwise(b, metric)
    out = torch.zeros(len(b), dtype=torch.bool)
    want_keep, want_boxes = [], []
    for i in range(len(b)):
        if out[i]:
            continue
        group = (over[i] > 0.3) & (lab == lab[i]) & ~out
        group[i] = True
        out |= group
        want_keep.append(int(order[i]))
        g_ = b[group]
        want_boxes.append(torch.cat([g_[:, :2].min(0).values, g_[:, 2:].max(0).values]) if method == "nmm" else b[i])
    keep, merged = merge_detections(boxes, scores, labels, threshold=0.3, method=method, metric=metric)
    assert keep.tolist() == want_keep and 20 < len(want_keep) < 280
    assert torch.equal(merged, torch.stack(want_boxes))


def test_object_cut_by_tile_border_is_reported_once(tmp_path):
    """Tile-level boxes from two tiles overlapping the same object merge to one detection."""
    cfg = preset("trees", num_classes=2, class_names=("Tree",), score_thresh=0.0, detections_per_img=50)
    model = build_detector(cfg).eval()
    pred = Predictor(model, tile=TileConfig(size=128, overlap=32, merge="nms", metric="ios", threshold=0.5))
    frame = np.random.default_rng(0).integers(0, 255, (200, 230, 3), dtype=np.uint8)
    det = pred([frame])[0]
    assert len(det.boxes) > 0
    assert (det.boxes[:, 2] <= 230 + 1e-3).all() and (det.boxes[:, 3] <= 200 + 1e-3).all()
    whole = Predictor(model)([frame])[0]
    assert len(whole.boxes) <= 50  # untiled: one image, the per-image cap holds
    # no pair of the same label is left overlapping above the merge threshold (IoS)
    b = torch.as_tensor(det.boxes)
    lt, rb = torch.max(b[:, None, :2], b[None, :, :2]), torch.min(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (b[:, 2:] - b[:, :2]).prod(-1)
    ios = inter / torch.min(area[:, None], area[None, :]).clamp(min=1e-6)
    ios.fill_diagonal_(0)
    assert ios.max() <= 0.5 + 1e-6


def test_coco_metrics_perfect_and_empty():
    items = load_annotations([SOAP_XML], single_class="Tree")
    a = items[0]
    perfect = coco_metrics(items, [(a.boxes, np.ones(len(a.boxes)), a.labels)])
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    shifted = a.boxes + np.array([0, 0, 1000, 1000], np.float32)  # wildly wrong boxes
    assert coco_metrics(items, [(shifted, np.ones(len(a.boxes)), a.labels)])["AP50"] == 0.0


def test_crops_keep_boxes_aligned_with_pixels():
    """A box drawn into the image stays on its pixels through scale, crop and the 8 flips/rotations."""
    from fpn_model.data import Annotated

    img = np.zeros((300, 300, 3), np.uint8)
    img[100:140, 150:200] = 255
    ann = Annotated(None, np.array([[150, 100, 200, 140]], np.float32), np.array([1]), ("x",))
    sampler = CropSampler([ann], images=[img], crop=128, scale_range=(0.7, 1.3), object_centred=1.0, min_visible=0.9,
                          colour=0.0, grey=0.0, seed=3)
    for _ in range(24):
        x, t = sampler.sample()
        assert len(t["boxes"]) == 1
        x1, y1, x2, y2 = t["boxes"][0].round().int().tolist()
        inside = x[0, y1 + 2:y2 - 2, x1 + 2:x2 - 2]
        assert inside.numel() and inside.mean() > 0.9


def test_eval_over_8_views_turns_images_and_boxes_together(tmp_path):
    """A detector that finds the grey rectangles scores 1 in all 8 orientations of a non-square image;
    one that always answers the upright boxes scores 1 upright only, so its 8-view mean drops."""
    from PIL import Image

    from fpn_model.data import Annotated
    from fpn_model.predict import Detections

    img = np.zeros((120, 200, 3), np.uint8)
    boxes = np.array([[10, 20, 40, 35], [150, 70, 190, 110], [90, 5, 100, 60]], np.float32)
    for value, (x1, y1, x2, y2) in zip((100, 180, 255), boxes.astype(int)):
        img[y1:y2, x1:x2] = value
    Image.fromarray(img).save(tmp_path / "r.png")
    items = [Annotated(tmp_path / "r.png", boxes, np.ones(3, np.int64), ("x",), 1)]

    def found(frames):
        from torchvision.ops import masks_to_boxes

        grey = torch.from_numpy(np.ascontiguousarray(frames[0][..., 0]))
        b = (masks_to_boxes(torch.stack([grey == v for v in (100, 180, 255)])) + torch.tensor([0, 0, 1, 1])).numpy()
        return [Detections(b, np.ones(len(b), np.float32), np.ones(len(b), np.int32), np.zeros(len(b), np.int8))]

    def upright(frames):
        return [Detections(boxes, np.ones(3, np.float32), np.ones(3, np.int32), np.zeros(3, np.int8))]

    m = evaluate(found, items, views=8)
    assert m["AP50"] == pytest.approx(1.0) and m["AP50_sd"] == pytest.approx(0.0)
    assert evaluate(upright, items)["AP50"] == pytest.approx(1.0)
    assert evaluate(upright, items, views=8)["AP50"] < 0.5


def test_rare_sampling_centres_crops_on_the_least_saturated_objects():
    """With rare=1 every crop holds the one grey object among 20 green ones; with rare=0 most do not."""
    from fpn_model.data import Annotated

    img = np.zeros((1000, 1000, 3), np.uint8)
    img[:] = (40, 120, 40)
    boxes = [[50 * i, 900, 50 * i + 30, 930] for i in range(20)]  # green crowns along the bottom
    boxes.append([100, 100, 130, 130])  # one grey crown far from them
    img[100:130, 100:130] = 200
    ann = Annotated(None, np.array(boxes, np.float32), np.ones(21, np.int64), ("x",))

    def grey_crops(rare: float) -> int:
        sampler = CropSampler([ann], images=[img], crop=128, scale_range=(1.0, 1.0), colour=0.0, grey=0.0,
                              rare=rare, rare_quantile=0.05, seed=0)
        assert sampler.rare_objects == ([(0, 20)] if rare else [])
        crops = [sampler.sample()[0] for _ in range(40)]
        return sum(bool(((c[0] > 0.7) & (c[1] > 0.7)).any()) for c in crops)  # grey pixels in the crop

    assert grey_crops(1.0) == 40
    assert grey_crops(0.0) < 20


def test_saturation_jitter_reaches_the_requested_floor():
    from fpn_model.data import Annotated

    img = np.zeros((64, 64, 3), np.uint8)
    img[:] = (200, 40, 40)  # saturated red
    ann = Annotated(None, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), ("x",))
    sat = []
    for floor in (None, 0.1):
        sampler = CropSampler([ann], images=[img], crop=64, scale_range=(1.0, 1.0), colour=0.3, grey=0.0,
                              saturation_min=floor, seed=0)
        xs = torch.stack([sampler.sample()[0] for _ in range(200)])
        hi, lo = xs.amax(1), xs.amin(1)
        sat.append((hi - lo).div(hi.clamp(min=1e-6)).mean((1, 2)).min().item())
    assert sat[1] < 0.5 * sat[0]
    with pytest.raises(ValueError, match="saturation_min"):
        CropSampler([ann], images=[img], crop=64, saturation_min=0.0)
    with pytest.raises(ValueError, match="saturation_min"):  # the colour jitter is off: it would be ignored
        CropSampler([ann], images=[img], crop=64, colour=0.0, saturation_min=0.5)


@pytest.mark.slow
def test_a_few_training_steps_write_a_loadable_checkpoint(tmp_path):
    from conftest import SOAP_XML

    tc = TrainConfig(model=preset("trees"), train=(str(SOAP_XML),), val=(str(SOAP_XML),), single_class="Tree",
                     output=str(tmp_path / "m.safetensors"), steps=3, batch_size=2, crop=128, eval_every=3, threads=2)
    summary = train(tc)
    model = load_checkpoint(summary["checkpoint"])
    assert model.config.class_names == ("Tree",) and summary["steps"] == 3
    assert [h["step"] for h in summary["history"]] == [3]  # the last step's validation is the final one
    assert set(summary["history"][0]) >= {"AP50", "AP_S"}


# One rank of a two-process data-parallel `train` with a time budget (gloo over a file store, no Ray); rank 1's clock
# runs `fast` times as fast, so alone it would spend the budget steps before rank 0 does. Fine-tunes the bundled
# model with a moving average of the weights and validates at the end (8 views of the training image). Prints its
# own first-step loss, what the run logged for that step (rank 0's log), the validation units it predicted, the
# views it scored and a fingerprint of the weights it validated
_RANK = """
import datetime, json, sys, time
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fpn_model import train as train_module
from fpn_model.config import preset
from fpn_model.train import TrainConfig, train
from fpn_model.zoo import resolve
own, logged, units, scored, validated = [], [], [], [], []
step_of, views_of, metrics_of = train_module.train_step, train_module.view_predictions, train_module.view_metrics
predictor_of = train_module.Predictor
train_module.train_step = lambda *a: own.append(step_of(*a)) or own[-1]
train_module.view_predictions = lambda *a, **kw: units.append(list(kw["units"])) or views_of(*a, **kw)
train_module.view_metrics = lambda p, n, views: scored.append(list(views)) or metrics_of(p, n, views)
def predictor(weights, **kw):
    validated.append(sum(float(t.double().sum()) for t in weights.state_dict().values() if t.is_floating_point()))
    return predictor_of(weights, **kw)
train_module.Predictor = predictor
rank, store, out, xml, fast = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=30))
if rank == 1:
    real, t0 = time.monotonic, time.monotonic()
    time.monotonic = lambda: t0 + (real() - t0) * fast
tc = TrainConfig(model=preset("trees"), train=(xml,), val=(xml,), single_class="Tree", output=out, minutes=0.05,
                 batch_size=1, crop=64, threads=1, init=str(resolve("trees")), warmup=1, ema=0.5, eval_every=10**6,
                 save_dtype="float32")
summary = train(tc, log_fn=logged.append, wrap=lambda m: DistributedDataParallel(m, find_unused_parameters=True))
dist.destroy_process_group()
print(json.dumps({"rank": rank, "steps": summary.get("steps"), "workers": summary.get("workers"),
                  "loss": own[0]["loss"], "logged": [r["loss"] for r in logged if r.get("step") == 1],
                  "units": units, "scored": scored, "validated": validated, "best": summary.get("best")}))
"""


@pytest.mark.slow
def test_data_parallel_ranks_spend_a_time_budget_together(tmp_path):
    """`train` under torch.distributed with `minutes`: the ranks agree on the budget's progress (the furthest
    clock), so all stop at the same step; a rank that stopped alone would leave the other waiting in DDP's
    all-reduce (here: an error after gloo's 30 s; under Ray Train, 30 minutes). Rank 0 alone writes; the loss it
    logs is the mean over both ranks' batches. Both validate rank 0's weights (its moving average, which rank 1
    does not keep), each predicts and scores half of the 8 views, and rank 0 averages: the metrics of one process."""
    import json
    import subprocess
    import sys

    out = tmp_path / "m.safetensors"
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(tmp_path / "store"), str(out), str(SOAP_XML),
                               "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    done = [p.communicate(timeout=240) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [e[-2000:] for _, e in done]
    first, second = (json.loads(o.strip().splitlines()[-1]) for o, _ in done)
    assert first["workers"] == 2 and first["steps"] >= 1 and second["steps"] is None  # rank 1 writes no summary
    assert load_checkpoint(out).config.class_names == ("Tree",)
    assert json.loads(out.with_suffix(".train.json").read_text())["steps"] == first["steps"]
    assert second["logged"] == [] and first["loss"] != second["loss"]  # crops of their own (seed + rank)
    assert first["logged"] == [pytest.approx(round((first["loss"] + second["loss"]) / 2, 4), abs=1e-4)]
    assert first["units"] == first["scored"] == [[0, 2, 4, 6]] and second["units"] == second["scored"] == [[1, 3, 5, 7]]
    saved = load_checkpoint(out)  # the moving average, as float32
    fingerprint = sum(float(t.double().sum()) for t in saved.state_dict().values() if t.is_floating_point())
    assert first["validated"] == second["validated"] == [pytest.approx(fingerprint, rel=1e-9)]
    alone = evaluate(Predictor(saved, tile=TileConfig(size=1024, overlap=128)), load_annotations([SOAP_XML],
                     single_class="Tree"), views=8)
    assert first["best"]["AP50"] > 0.1
    assert {k: first["best"][k] for k in alone} == {k: pytest.approx(round(v, 4), abs=2e-3) for k, v in alone.items()}


def test_ema_is_what_training_evaluates_and_saves(tmp_path):
    """torch's AveragedModel starts from the weights after the first step; with a decay of ~1 it stays
    there, so 3 steps with EMA save the weights of 1 step without, and not those of 3 steps without."""
    def trained(steps: int, ema: float) -> dict:
        tc = TrainConfig(model=preset("trees"), train=(str(SOAP_XML),), single_class="Tree", steps=steps,
                         output=str(tmp_path / f"s{steps}-ema{ema}.safetensors"), batch_size=1, crop=96,
                         threads=1, ema=ema, save_dtype="float32", warmup=1)
        return load_checkpoint(train(tc)["last"]).state_dict()

    def diff(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())

    averaged = trained(3, 1 - 1e-9)
    assert diff(averaged, trained(1, 0.0)) < 1e-6 < diff(averaged, trained(3, 0.0))


def test_a_frames_detections_do_not_depend_on_its_batch_mates():
    """The bundled model normalises with GroupNorm: padded to a larger batch mate, SOAP_061 gave 16 detections
    scoring >= 0.5 alone and 15 beside a 640x480 frame. One forward pass per image shape keeps them identical."""
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve
    from PIL import Image

    soap = np.array(Image.open(SOAP).convert("RGB"))
    other = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    p = Predictor(load_checkpoint(resolve("trees")), tile=None)
    alone = p([soap])[0]
    mixed = p([other, soap, soap[:300, :350]])[1]
    assert len(alone.boxes) > 0
    np.testing.assert_allclose(mixed.boxes, alone.boxes, atol=1e-4)
    np.testing.assert_allclose(mixed.scores, alone.scores, atol=1e-4)


class _OutOfMemoryAbove:
    """A model that runs out of device memory on more than `limit` images at once (as a GPU would), and notes the
    sizes it was called with."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.sizes = model, limit, []

    def __call__(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.model(x)


def test_tiles_that_run_out_of_memory_together_run_in_halves_and_later_calls_keep_the_smaller_batch(caplog):
    """A frame whose tiles do not fit in one forward pass is still detected, the same as in one pass: the pass runs
    again in halves and the predictor keeps the smaller batch (before, the frame became an error row)."""
    from fpn_model.weights import load_checkpoint
    from fpn_model.zoo import resolve
    from PIL import Image

    soap = np.array(Image.open(SOAP).convert("RGB"))
    frame = np.ascontiguousarray(np.tile(soap, (2, 2, 1))[:700, :700])
    tile = TileConfig(size=256, overlap=32)
    model = load_checkpoint(resolve("trees"))
    whole = Predictor(model, tile=tile, max_batch=16)([frame])[0]
    p = Predictor(model, tile=tile, max_batch=16)
    p.model = small = _OutOfMemoryAbove(p.model, limit=3)
    with caplog.at_level("WARNING", logger="fpn_model.predict"):
        got = p([frame])[0]
    tiles = len(plan_tiles(700, 700, 256, 32))
    assert tiles == 9 and small.sizes == [9, 4, 2, 2, 2, 2, 1] and p.max_batch == 2
    assert "out of device memory at 9 images of 256x256 per forward pass; 4 from now on" in caplog.text
    assert "at 4 images of 256x256 per forward pass; 2 from now on" in caplog.text
    np.testing.assert_allclose(got.boxes, whole.boxes, atol=1e-4)
    np.testing.assert_allclose(got.scores, whole.scores, atol=1e-4)
    assert len(got.boxes) > 0
    small.sizes.clear()
    p([frame])
    assert max(small.sizes) == 2  # the next call starts at the batch that fitted
    p.model.limit = 0
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit alone: the caller's to handle
        p([frame])


def test_annotation_files_with_other_classes_share_one_list_of_labels(tmp_path):
    """Each VOC file numbered its own classes alphabetically: a file of Dead crowns alone labelled them 1, the
    label of Alive in a file of both, and training took the first file's list for all."""
    def voc(name, objects):
        boxes = "".join(f"<object><name>{n}</name><bndbox><xmin>{x}</xmin><ymin>1</ymin><xmax>{x + 9}</xmax>"
                        f"<ymax>10</ymax></bndbox></object>" for n, x in objects)
        (tmp_path / name).write_text(f"<annotation><filename>{name}.png</filename>{boxes}</annotation>")
        return str(tmp_path / name)

    items = load_annotations([voc("a.xml", [("Dead", 1)]), voc("b.xml", [("Alive", 1), ("Dead", 20)])], images=False)
    assert [a.class_names for a in items] == [("Alive", "Dead")] * 2
    assert [a.labels.tolist() for a in items] == [[2], [1, 2]]


def test_validation_annotations_are_labelled_as_the_models_classes(tmp_path):
    """Validation compared numbers: a validation file of Dead crowns alone labelled them 1, which a model trained
    on (Alive, Dead) calls Alive."""
    from fpn_model.train import TrainConfig, TrainData

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "i.png")

    def voc(name, names):
        boxes = "".join(f"<object><name>{n}</name><bndbox><xmin>{1 + 10 * k}</xmin><ymin>1</ymin>"
                        f"<xmax>{9 + 10 * k}</xmax><ymax>10</ymax></bndbox></object>" for k, n in enumerate(names))
        (tmp_path / name).write_text(f"<annotation><filename>i.png</filename>{boxes}</annotation>")
        return str(tmp_path / name)

    tc = TrainConfig(model=preset("trees"), train=(voc("t.xml", ["Alive", "Dead"]),), val=(voc("v.xml", ["Dead"]),))
    data = TrainData.read(tc)
    assert data.val_items[0].labels.tolist() == [2]
