"""Does a generated shapes image show what its caption asks for? (a deterministic, GenEval-style checker)

Pixels are classified to the nearest palette colour (or background, or "other" when far from all), each colour's
connected components above a speck size are objects, and each object gets a shape from its fill of the bounding
box and the share of its mass in the box's top half (square 1.0/0.5, circle pi/4/0.5, upward triangle 0.5/0.25),
a size from its half-extent (small 0.14, large 0.26 of the image's shorter side, as the data defines sizes) and a
centre from its centroid (a fraction of the width and of the height, as in `KEY.json`). Expected objects are
matched to detections by colour, since the two objects of a caption always differ in colour; a relation is read
from the two centroids' offset in pixels, so it means the same on a square as on a 2:1 or 1:2 image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

from lit_diffusion.data.shapes import BACKGROUND, COLORS, RELATIONS, SIZES

ATTRIBUTES = ("count", "colors", "shapes", "sizes", "relation")
KINDS = ("one_object", "two_objects")  # GenEval-style split: a caption with one object, or two and a relation
# two-object captions by their relation word: key suffix ("left of" -> "left_of") -> the word
RELATION_WORDS = {r.replace(" ", "_"): r for r in RELATIONS}
_PALETTE = np.array([*COLORS.values(), BACKGROUND], dtype=np.float32)  # [K + 1, 3]
_NAMES = [*COLORS, "background"]
# (fill of the bounding box, share of pixels in its top half) of each shape as rendered
_SHAPE_PROTOTYPES = {"square": (1.0, 0.5), "circle": (np.pi / 4, 0.5), "triangle": (0.5, 0.27)}
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # half-extent between small and large
# RGB distance beyond which a pixel is no palette colour (the closest pair, blue/purple, is ~114 apart)
_MAX_COLOR_DIST = 90.0
_MIN_AREA_FRAC = 0.01  # specks below 1% of the shorter side squared are noise (a small triangle covers ~4%)


def _to_hwc_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"check_image expects an image [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
        image = image.detach().float().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.uint8)  # [H, W, 3]


def _classify_shape(fill: float, top_share: float) -> str:
    return min(_SHAPE_PROTOTYPES, key=lambda s: (fill - _SHAPE_PROTOTYPES[s][0]) ** 2
               + (top_share - _SHAPE_PROTOTYPES[s][1]) ** 2)


def detect_objects(image: Tensor | np.ndarray) -> list[dict]:
    """Objects in an image [3, H, W] in [0, 1] (or uint8 [H, W, 3]), H and W any: dicts with color, shape, size,
    cx and cy (centroid as fractions of the width and height), r (half-extent as a fraction of the shorter side)
    and area (fraction of the image), largest first."""
    pixels = _to_hwc_uint8(image).astype(np.float32)  # [H, W, 3]
    height, width = pixels.shape[:2]
    short = min(height, width)
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=-1)  # [H, W, K + 1]
    labels = dist.argmin(-1)
    labels[dist.min(-1) > _MAX_COLOR_DIST] = -1
    min_area = max(3, _MIN_AREA_FRAC * short * short)
    objects = []
    for index, color in enumerate(_NAMES[:-1]):
        components, count = ndimage.label(labels == index, structure=np.ones((3, 3)))  # 8-connected
        for sl, comp_id in zip(ndimage.find_objects(components), range(1, count + 1)):
            mask = ndimage.binary_fill_holes(components[sl] == comp_id)  # noisy pixels inside still count
            area = int(mask.sum())
            if area < min_area:
                continue
            h, w = mask.shape
            ys, xs = np.nonzero(mask)
            half_extent = max(h, w) / (2 * short)
            objects.append({
                "color": color,
                "shape": _classify_shape(area / (h * w), float((ys < h / 2).sum()) / area),
                "size": "large" if half_extent > _SIZE_THRESHOLD else "small",
                "cx": float((xs.mean() + sl[1].start + 0.5) / width),
                "cy": float((ys.mean() + sl[0].start + 0.5) / height),
                "r": half_extent,
                "area": area / (height * width),
                # reaching the image's edge: an object the border cuts (real shapes keep a margin of background)
                "at_border": sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == height or sl[1].stop == width,
            })
    return sorted(objects, key=lambda o: -o["area"])


def _relation_holds(first: dict, second: dict, relation: str, sx: float = 1.0, sy: float = 1.0) -> bool:
    """`first` is `relation` `second`: right sign along the relation's axis, and that axis dominates, comparing
    pixel offsets (sx = W / S and sy = H / S turn fractions of the width and height into units of the shorter
    side S; both are 1.0 on a square)."""
    dx, dy = (first["cx"] - second["cx"]) * sx, (first["cy"] - second["cy"]) * sy  # y grows downwards
    along, across = {"above": (-dy, dx), "below": (dy, dx), "left of": (-dx, dy), "right of": (dx, dy)}[relation]
    return along > 0 and along >= abs(across)


def match_by_color(found: list[dict], expected: list[dict]) -> list[dict | None]:
    """For each expected object, the detection of its colour (the largest, as `detect_objects` sorts them), or None:
    a caption's objects always differ in colour."""
    by_color = {}
    for obj in found:  # largest first, so the largest component of each colour wins
        by_color.setdefault(obj["color"], obj)
    return [by_color.get(obj["color"]) for obj in expected]


def check_image(image: Tensor | np.ndarray, attrs: dict) -> dict:
    """Per-attribute booleans (count, colors, shapes, sizes, relation) and `correct` (all of them) for one image
    [3, H, W] (any H and W) against its shapes attributes (the `KEY.json` content)."""
    if not attrs or "objects" not in attrs:
        raise ValueError(f"check_image needs shapes attributes with 'objects', got keys {sorted(attrs or {})}")
    expected = attrs["objects"]
    pixels = _to_hwc_uint8(image)  # [H, W, 3]
    height, width = pixels.shape[:2]
    short = min(height, width)
    found = detect_objects(pixels)
    matches = match_by_color(found, expected)
    result = {
        "count": len(found) == len(expected),
        "colors": sorted(o["color"] for o in found) == sorted(o["color"] for o in expected),
        "shapes": all(m is not None and m["shape"] == e["shape"] for m, e in zip(matches, expected)),
        "sizes": all(m is not None and m["size"] == e["size"] for m, e in zip(matches, expected)),
        "relation": True,
    }
    if attrs.get("relation") is not None:
        result["relation"] = (len(matches) == 2 and None not in matches
                              and _relation_holds(matches[0], matches[1], attrs["relation"],
                                                  width / short, height / short))
    result["correct"] = all(result[k] for k in ATTRIBUTES)
    result["cut"] = any(obj["at_border"] for obj in found)  # not part of `correct`: counted on its own
    return result


def caption_kind(attrs: dict) -> str:
    return KINDS[0] if len(attrs["objects"]) == 1 else KINDS[1]


class CaptionAccuracy(Metric):
    """Fraction of images whose every caption attribute checks out; `attribute_accuracy()` breaks it down by
    attribute and by caption kind. A subclass judges other samples by setting what they are (`samples`, their
    dimensions `sample_dims`), what is checked (`attributes`) and the check (`check`): `MotionAccuracy`'s clips.

    Two-object captions are also counted by their relation word (`RELATION_WORDS`: above, below, left of, right
    of): per word, how many such captions there were, how many were wholly correct and how many had the relation
    right, as sums that reduce exactly across ranks."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    attributes = ATTRIBUTES
    check = staticmethod(check_image)
    samples, sample_dims = "images [B, 3, H, W]", 4

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for key in (*self.attributes, "correct", "cut"):
            self.add_state(f"{key}_sum", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for kind in KINDS:
            self.add_state(f"{kind}_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{kind}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            for key in self.attributes:
                self.add_state(f"{kind}_{key}_sum", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for word in RELATION_WORDS:
            for what in ("count", "correct", "placed"):
                self.add_state(f"relation_{word}_{what}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, samples: Tensor, attrs: list[dict]) -> None:
        if samples.dim() != self.sample_dims or len(attrs) != samples.shape[0]:
            raise ValueError(f"{type(self).__name__}.update: {self.samples.split()[0]} {tuple(samples.shape)} "
                             f"(expected {self.samples.split(' ', 1)[1]}) and {len(attrs)} attrs do not match")
        results = [self.check(sample, a) for sample, a in zip(samples.detach().cpu(), attrs)]
        for key in (*self.attributes, "correct", "cut"):
            setattr(self, f"{key}_sum", getattr(self, f"{key}_sum") + sum(int(r[key]) for r in results))
        self.count = self.count + len(results)
        for kind in KINDS:
            mine = [r for r, a in zip(results, attrs) if caption_kind(a) == kind]
            setattr(self, f"{kind}_correct", getattr(self, f"{kind}_correct") + sum(int(r["correct"]) for r in mine))
            setattr(self, f"{kind}_count", getattr(self, f"{kind}_count") + len(mine))
            for key in self.attributes:
                name = f"{kind}_{key}_sum"
                setattr(self, name, getattr(self, name) + sum(int(r[key]) for r in mine))
        for word, relation in RELATION_WORDS.items():
            mine = [r for r, a in zip(results, attrs) if a.get("relation") == relation]
            for what, n in (("count", len(mine)), ("correct", sum(int(r["correct"]) for r in mine)),
                            ("placed", sum(int(r.get("relation", False)) for r in mine))):
                setattr(self, f"relation_{word}_{what}", getattr(self, f"relation_{word}_{what}") + n)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise ValueError(f"{type(self).__name__}.compute() before any update()")
        return self.correct_sum.double() / self.count

    def attribute_accuracy(self) -> dict[str, float]:
        """Accuracy of each attribute, overall (`correct`) and of each caption kind present (`one_object`,
        `two_objects`), each attribute's within a kind (`two_objects_shapes`: how often a two-object caption's
        shapes were right), and the fraction of samples with an object at the border (`cut`), gathered over all ranks;
        for each relation word present (`RELATION_WORDS`), `relation_{word}`: the accuracy of its captions, and
        `relation_{word}_placed`: how often its relation held."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            n = max(int(self.count), 1)
            out = {key: int(getattr(self, f"{key}_sum")) / n for key in (*self.attributes, "correct", "cut")}
            for kind in KINDS:
                count = int(getattr(self, f"{kind}_count"))
                if count:
                    out[kind] = int(getattr(self, f"{kind}_correct")) / count
                    out.update({f"{kind}_{key}": int(getattr(self, f"{kind}_{key}_sum")) / count
                                for key in self.attributes})
            for word in RELATION_WORDS:
                count = int(getattr(self, f"relation_{word}_count"))
                if count:
                    out[f"relation_{word}"] = int(getattr(self, f"relation_{word}_correct")) / count
                    out[f"relation_{word}_placed"] = int(getattr(self, f"relation_{word}_placed")) / count
            return out
