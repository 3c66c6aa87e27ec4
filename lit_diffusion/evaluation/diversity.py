"""Within-caption diversity of positions: does a model draw one caption's objects in many places, as the data does,
or has it settled on one layout per caption? An alignment loss (REPA) or strong guidance can raise caption accuracy
by collapsing layouts; this measures it.

For each caption, `per_caption` images are generated (seeds keyed by the caption's text, as
`unclip_metrics.within_caption_diversity` does), the caption accuracy judge's detector finds the objects, each of
the caption's objects is matched by colour (the largest component of its colour, as `check_image` matches), and
its spread is the mean pairwise distance of its centroids over the images where it was found, in units of the
image's shorter side (so a square's full diagonal is sqrt(2)). A caption's spread is the mean over its objects;
the figure is the mean over captions, with its standard error over captions.

The reference is the data itself: the same caption's objects placed `per_caption` times by the data set's own
placement rule (`data.shapes.replace_objects`), rendered and detected the same way. A model that draws each caption
in one place scores near 0; one that places objects as the data does scores near the data's figure.

One process (the pipeline's final evaluation, a notebook); nothing is reduced across ranks.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from lit_diffusion.data.shapes import canvas_of, render, replace_objects
from lit_diffusion.evaluation.unclip_metrics import Generate, _mean_se, _seeds
from lit_diffusion.metrics.caption_accuracy import caption_kind, detect_objects
from lit_diffusion.metrics.features import to_uint8

KINDS = ("one_object", "two_objects")


def _centroids(images: Sequence[np.ndarray], attrs: dict) -> list[list[tuple[float, float]]]:
    """For each of the caption's objects, the centroids (in units of the shorter side) of its colour's largest
    component in each image that has one; images are uint8 [H, W, 3]."""
    per_object: list[list[tuple[float, float]]] = [[] for _ in attrs["objects"]]
    for pixels in images:
        height, width = pixels.shape[:2]
        short = min(height, width)
        by_color = {}
        for obj in detect_objects(pixels):  # largest first
            by_color.setdefault(obj["color"], obj)
        for index, expected in enumerate(attrs["objects"]):
            found = by_color.get(expected["color"])
            if found is not None:
                per_object[index].append((found["cx"] * width / short, found["cy"] * height / short))
    return per_object


def _spread(points: list[tuple[float, float]]) -> float | None:
    """Mean distance over the unordered pairs of points; None with fewer than 2."""
    if len(points) < 2:
        return None
    p = np.asarray(points, dtype=np.float64)
    i, j = np.triu_indices(len(p), k=1)
    return float(np.linalg.norm(p[i] - p[j], axis=-1).mean())


def caption_position_spread(images: Sequence[np.ndarray], attrs: dict) -> tuple[float | None, float]:
    """(spread, found): the mean over the caption's objects of their centroids' mean pairwise distance (None when
    no object was found in two images), and the fraction of (image, object) pairs where the object was found."""
    per_object = _centroids(images, attrs)
    spreads = [s for s in (_spread(points) for points in per_object) if s is not None]
    found = sum(len(points) for points in per_object) / (len(images) * len(attrs["objects"]))
    return (float(np.mean(spreads)) if spreads else None), found


def _summary(per_caption: list[tuple[str, float | None, float]]) -> dict:
    """{"spread", "spread_se", "found", "captions"} overall and `spread_{kind}` per caption kind, from (kind,
    spread, found) per caption; captions with no spread are left out of the spread (and counted in `found`)."""
    spreads = [s for _, s, _ in per_caption if s is not None]
    out = {"captions": len(per_caption), "found": float(np.mean([f for _, _, f in per_caption]))}
    out["spread"], out["spread_se"] = _mean_se(spreads)
    for kind in KINDS:
        mine = [s for k, s, _ in per_caption if k == kind and s is not None]
        if mine:
            out[f"spread_{kind}"], out[f"spread_{kind}_se"] = _mean_se(mine)
    return out


@torch.no_grad()
def position_spread(generate: Generate, attrs: Sequence[dict], per_caption: int = 8, seed: int = 0) -> dict:
    """Within-caption spread of object positions of a model: `generate(captions, seeds)` (one image [3, H, W] in
    [0, 1] per caption, as for `within_caption_diversity`) is called once per caption of `attrs` (shapes
    attributes, the `KEY.json` content). Returns `spread` (mean over captions), `spread_se`, `spread_one_object`,
    `spread_two_objects` (each with `_se`), `found` (how often a caption's object was found at all) and
    `captions`."""
    if per_caption < 2:
        raise ValueError(f"per_caption must be >= 2 (pairs of one caption's images), got {per_caption}")
    rows = []
    for a in attrs:
        if not a or not a.get("objects"):
            raise ValueError(f"position_spread needs shapes attributes with 'objects', got {a!r}")
        images = generate([a["caption"]] * per_caption, _seeds(a["caption"], per_caption, seed))
        if images.shape[0] != per_caption:
            raise ValueError(f"generate returned {images.shape[0]} images for {per_caption} captions")
        pixels = [p.permute(1, 2, 0).cpu().numpy() for p in to_uint8(images)]
        rows.append((caption_kind(a), *caption_position_spread(pixels, a)))
    return _summary(rows)


def data_position_spread(attrs: Sequence[dict], per_caption: int = 8, seed: int = 0) -> dict:
    """The same figure for the data: each caption's objects re-placed `per_caption` times by the data set's
    placement rule (`replace_objects`, seeded by the caption and `seed`), rendered and detected as a model's
    images are."""
    if per_caption < 2:
        raise ValueError(f"per_caption must be >= 2 (pairs of one caption's images), got {per_caption}")
    rows = []
    for a in attrs:
        images = []
        for s in _seeds(a["caption"], per_caption, seed):
            placed = replace_objects(a, random.Random(s))
            width, height = canvas_of(placed)
            images.append(np.asarray(render(placed), dtype=np.uint8).reshape(height, width, 3))
        rows.append((caption_kind(a), *caption_position_spread(images, a)))
    return _summary(rows)
