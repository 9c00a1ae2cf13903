"""Annotations (Pascal-VOC XML, COCO JSON) and the training-crop sampler.

Large aerial images are not resized to fit a network: training samples crops at (near) native
resolution, so a 10 px crown stays 10 px. Each sample applies a random scale (jitter), one of the
8 flips/90-degree rotations (aerial imagery has no "up"), colour jitter and occasional greyscale.

Torch is imported by the sampler's functions, not by the module: reading annotations and images
(`load_annotations`, `read_image`) is done in drivers that never run a model (`fpn demo`), where
importing torch cost 2-4 s and about 500 MiB.
"""
from __future__ import annotations

import json
import math
import random
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Annotated", "load_voc", "load_coco", "load_annotations", "CropSampler", "read_image", "dihedral"]

Image.MAX_IMAGE_PIXELS = 20_000 ** 2


@dataclass
class Annotated:
    """One image with boxes `[N, 4]` (x1, y1, x2, y2 pixels) and labels (label k: `class_names[k - 1]`).

    `category_ids`: the file's own id of each of `class_names` (COCO's category ids, often sparse); empty where the
    file gives none (VOC XML names its classes only)."""

    image_path: Path
    boxes: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = field(default=("object",))
    image_id: int = 0
    category_ids: tuple[int, ...] = ()


def read_image(path: str | Path) -> np.ndarray:
    """`[H, W, 3]` uint8 RGB."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def load_voc(xml_path: str | Path, *, single_class: str | None = None, image_dir: str | Path | None = None) -> Annotated:
    """One Pascal-VOC XML file. `single_class` maps every object to that one class."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml_path}: not Pascal-VOC XML ({e})") from None
    filename = root.findtext("filename") or xml_path.with_suffix(".png").name
    image_path = Path(image_dir or xml_path.parent) / filename
    names, boxes = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{xml_path}: object without bndbox")
        box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        boxes.append(box)
        names.append(single_class or obj.findtext("name") or "object")
    classes = tuple(sorted(set(names))) if not single_class else (single_class,)
    labels = np.array([classes.index(n) + 1 for n in names], dtype=np.int64)
    return Annotated(image_path, np.array(boxes, dtype=np.float32).reshape(-1, 4), labels, classes,
                     category_ids=(1,) if single_class else ())


def load_coco(json_path: str | Path, *, single_class: str | None = None) -> list[Annotated]:
    """Every image of a COCO detection JSON (boxes converted from xywh)."""
    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text())
    except ValueError as e:
        raise ValueError(f"{json_path}: not JSON ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco, dict) or k not in coco]
    if missing:
        raise ValueError(f"{json_path}: not COCO detection JSON (no {', '.join(repr(k) for k in missing)})")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    classes = (single_class,) if single_class else tuple(c["name"] for c in cats)
    ids = (1,) if single_class else tuple(c["id"] for c in cats)
    cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    out = []
    for img in coco["images"]:
        anns = [a for a in by_image.get(img["id"], []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32)
        labels = np.array([1 if single_class else cat_index[a["category_id"]] for a in anns], dtype=np.int64)
        out.append(Annotated(json_path.parent / img["file_name"], boxes.reshape(-1, 4), labels, classes, img["id"],
                             ids))
    return out


def load_annotations(paths: list[str | Path], *, single_class: str | None = None,
                     images: bool = True) -> list[Annotated]:
    """VOC XML files, COCO JSON files, or directories of either; with `images`, FileNotFoundError naming the
    annotation file of an image that is not there (off for boxes alone: sizing limits)."""
    out: list[Annotated] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.glob("*.xml")) + sorted(p.glob("*.json"))
            if not files:
                raise FileNotFoundError(f"{p}: no .xml or .json annotation files")
        elif p.exists():
            files = [p]
        else:
            raise FileNotFoundError(f"annotation file {p} does not exist")
        for f in files:
            found = load_coco(f, single_class=single_class) if f.suffix == ".json" else \
                [load_voc(f, single_class=single_class)]
            missing = next((a.image_path for a in found if images and not a.image_path.is_file()), None)
            if missing:  # here, not as the bare "No such file" of the image read at the first step
                raise FileNotFoundError(f"{f}: the image it annotates, {missing}, does not exist")
            out.extend(found)
    for i, a in enumerate(out):
        a.image_id = i + 1
    return _shared_classes(out)


def _shared_classes(items: list[Annotated]) -> list[Annotated]:
    """`items` labelled by one list of classes: each VOC file numbers its own classes (alphabetically) and each
    COCO file by its categories, so two files with other classes gave one class two labels, and training took the
    first file's list for all. The list: the one they share, else the first COCO file's categories and then the
    other names, sorted (category ids are kept only where all share one list)."""
    if len({a.class_names for a in items}) <= 1:
        return items
    coco = next((a.class_names for a in items if a.category_ids and len(a.category_ids) == len(a.class_names)), ())
    names = coco + tuple(sorted({n for a in items for n in a.class_names} - set(coco)))
    label = {n: k + 1 for k, n in enumerate(names)}
    return [replace(a, labels=np.array([label[a.class_names[k - 1]] for k in a.labels], np.int64),
                    class_names=names, category_ids=()) for a in items]


def dihedral(img: Tensor, boxes: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Apply one of the 8 flips/rotations (k in 0..7) to a `[3, H, W]` image and its boxes."""
    import torch

    if k >= 4:
        img = img.flip(-1)
        w = img.shape[-1]
        boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
    for _ in range(k % 4):  # rotate 90 degrees counter-clockwise: (x, y) -> (y, W - x)
        w = img.shape[-1]
        img = torch.rot90(img, 1, (-2, -1))
        boxes = torch.stack([boxes[:, 1], w - boxes[:, 2], boxes[:, 3], w - boxes[:, 0]], 1)
    return img, boxes


class CropSampler:
    """Random training crops from annotated images.

    Args:
        items: the annotated images (read once into memory as uint8).
        images: their pixels `[H, W, 3]` uint8, if already in memory.
        crop: output side in pixels.
        scale_range: random resize factor range applied before cropping.
        object_centred: fraction of crops centred near a random object.
        min_visible: a box cut by the crop is kept if this fraction of its area stays inside.
        colour: brightness/contrast/saturation jitter strength (factors in 1 +- colour).
        saturation_min: lowest saturation factor (default 1 - colour); imagery from another sensor
            or season can be far less saturated than the training image (aerial: 3x less).
        grey: fraction of crops turned greyscale.
        rare: fraction of crops centred on a *rare-looking* object: one whose mean
            saturation is among the lowest `rare_quantile` of all objects (dead snags, bare crowns
            in green imagery). Appearance-balanced sampling, because a handful of such objects among
            hundreds would otherwise be seen in a few percent of the batches.
    """

    def __init__(self, items: list[Annotated], *, images: list[np.ndarray] | None = None, crop: int = 384, scale_range: tuple[float, float] = (0.6, 1.4),
                 object_centred: float = 0.75, min_visible: float = 0.5, colour: float = 0.3, grey: float = 0.1,
                 saturation_min: float | None = None, rare: float = 0.0, rare_quantile: float = 0.05, seed: int = 0):
        import torch

        if not items:
            raise ValueError("no annotated images to train on")
        self.items = items
        arrays = images if images is not None else [read_image(a.image_path) for a in items]
        self.images = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
        self.crop, self.scale_range = crop, scale_range
        self.object_centred, self.min_visible = object_centred, min_visible
        self.colour, self.grey = colour, grey
        self.saturation = (1 - colour if saturation_min is None else saturation_min, 1 + colour)
        if not 0 < self.saturation[0] <= self.saturation[1] or (saturation_min is not None and colour <= 0):
            raise ValueError(f"saturation_min must be in (0, {1 + colour}] with colour > 0, got {saturation_min}"
                             f" with colour {colour}")
        self.rare = rare
        self.rare_objects = _least_saturated(self.images, items, rare_quantile) if rare > 0 else []
        self.rng = random.Random(seed)

    def _choose(self) -> tuple[int, int | None]:
        """(image index, index of the object to centre the crop on or None for a random window)."""
        rng = self.rng
        if self.rare_objects and rng.random() < self.rare:
            return rng.choice(self.rare_objects)
        i = rng.randrange(len(self.items))
        n = len(self.items[i].boxes)
        return i, (rng.randrange(n) if n and rng.random() < self.object_centred else None)

    def sample(self) -> tuple[Tensor, dict[str, Tensor]]:
        """One `[3, crop, crop]` float image in [0, 1] and its target dict."""
        import torch
        import torch.nn.functional as F

        rng = self.rng
        i, centre = self._choose()
        img, ann = self.images[i], self.items[i]
        s = math.exp(rng.uniform(math.log(self.scale_range[0]), math.log(self.scale_range[1])))
        _, h, w = img.shape
        src = min(int(round(self.crop / s)), h, w)  # source window side that maps to the crop
        boxes = torch.from_numpy(ann.boxes)
        if centre is not None:
            b = boxes[centre]
            cx = (b[0] + b[2]).item() / 2 + rng.uniform(-src / 3, src / 3)
            cy = (b[1] + b[3]).item() / 2 + rng.uniform(-src / 3, src / 3)
            x0, y0 = int(cx - src / 2), int(cy - src / 2)
        else:
            x0, y0 = rng.randint(0, w - src), rng.randint(0, h - src)
        x0, y0 = max(0, min(x0, w - src)), max(0, min(y0, h - src))
        patch = img[:, y0:y0 + src, x0:x0 + src].float().div_(255)
        out_side = max(1, int(round(src * s)))
        patch = F.interpolate(patch[None], size=(out_side, out_side), mode="bilinear", align_corners=False,
                              antialias=s < 1)[0]
        labels = torch.from_numpy(ann.labels)
        if len(boxes):
            shifted = (boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)) * (out_side / src)
            clipped = shifted.clamp(0, out_side)
            area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
            area_in = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
            keep = (area_in >= self.min_visible * area) & (clipped[:, 2] - clipped[:, 0] >= 2) & (clipped[:, 3] - clipped[:, 1] >= 2)
            boxes, labels = clipped[keep], labels[keep]
        patch, boxes = dihedral(patch, boxes.reshape(-1, 4), rng.randrange(8))
        patch = self._colour(patch)
        return patch.contiguous(), {"boxes": boxes.float(), "labels": labels}

    def _colour(self, x: Tensor) -> Tensor:
        import torch

        rng, c = self.rng, self.colour
        if c > 0:
            x = x * rng.uniform(1 - c, 1 + c)  # brightness
            mean = x.mean()
            x = (x - mean) * rng.uniform(1 - c, 1 + c) + mean  # contrast
            grey = x.mean(0, keepdim=True)
            lo, hi = self.saturation
            x = (x - grey) * math.exp(rng.uniform(math.log(lo), math.log(hi))) + grey  # saturation
            x = x * torch.tensor([rng.uniform(1 - c / 3, 1 + c / 3) for _ in range(3)])[:, None, None]  # tint
        if rng.random() < self.grey:
            x = x.mean(0, keepdim=True).repeat(3, 1, 1)
        return x.clamp_(0, 1)

    def batch(self, n: int) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = zip(*(self.sample() for _ in range(n)))
        return list(images), list(targets)


def _least_saturated(images: list[Tensor], items: list[Annotated], quantile: float) -> list[tuple[int, int]]:
    """(image index, object index) of the least saturated `quantile` of all objects (at least one)."""
    keys = []
    for i, (img, ann) in enumerate(zip(images, items)):
        for j, (x1, y1, x2, y2) in enumerate(np.round(ann.boxes).astype(int)):
            patch = img[:, max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)].float()
            hi, lo = patch.max(0).values, patch.min(0).values
            keys.append((float(((hi - lo) / hi.clamp(min=1)).mean()), i, j))
    keys.sort()
    return [(i, j) for _, i, j in keys[:max(1, round(quantile * len(keys)))]] if keys else []
