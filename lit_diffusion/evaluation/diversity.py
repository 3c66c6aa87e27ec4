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
placement rule (`data.shapes.replace_objects`) on the square canvas the model draws, rendered and detected the same
way, and the figure to read is the model's spread minus the data's, paired by caption. A model that draws each
caption in one place scores near 0 (the difference near minus the data's); one that places objects as the data
does, near the data's figure (the difference near 0).

One process (the pipeline's final evaluation, a notebook); nothing is reduced across ranks.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch

from lit_diffusion.data.shapes import render, replace_objects
from lit_diffusion.evaluation.unclip_metrics import Generate, _mean_se, _seeds
from lit_diffusion.metrics.caption_accuracy import KINDS, caption_kind, detect_objects, match_by_color
from lit_diffusion.metrics.features import to_uint8


def _centroids(images: Sequence[np.ndarray], attrs: dict) -> list[list[tuple[float, float]]]:
    """For each of the caption's objects, the centroids (in units of the shorter side) of its colour's largest
    component in each image that has one; images are uint8 [H, W, 3]."""
    per_object: list[list[tuple[float, float]]] = [[] for _ in attrs["objects"]]
    for pixels in images:
        height, width = pixels.shape[:2]
        short = min(height, width)
        for index, found in enumerate(match_by_color(detect_objects(pixels), attrs["objects"])):
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


def _summary(rows: list[tuple[str, float | None, float]]) -> dict:
    """{"captions", "found", "spread", "spread_se"} and `spread_{kind}` (with `_se`) per caption kind present, from
    (kind, spread, found) per caption; captions with no spread are left out of the spread, counted in `found` and
    in `captions` (`spread_captions` counts those with one)."""
    if not rows:
        raise ValueError("a position spread needs at least one caption")
    spreads = [s for _, s, _ in rows if s is not None]
    out = {"captions": len(rows), "spread_captions": len(spreads), "found": float(np.mean([f for _, _, f in rows]))}
    out["spread"], out["spread_se"] = _mean_se(spreads)
    for kind in KINDS:
        mine = [s for k, s, _ in rows if k == kind and s is not None]
        if mine:
            out[f"spread_{kind}"], out[f"spread_{kind}_se"] = _mean_se(mine)
    return out


def _check(attrs: Sequence[dict], per_caption: int) -> None:
    if per_caption < 2:
        raise ValueError(f"per_caption must be >= 2 (pairs of one caption's images), got {per_caption}")
    for a in attrs:
        if not a or not a.get("objects"):
            raise ValueError(f"a position spread needs shapes attributes with 'objects', got {a!r}")


def _data_rows(attrs: Sequence[dict], per_caption: int, seed: int, size: int | None) -> list[tuple]:
    rows = []
    for a in attrs:
        # on the square canvas the model samples (`size`), whatever canvas the val image had: on a 2:1 canvas the
        # same caption's objects spread over twice the width
        square = {k: v for k, v in a.items() if k not in ("aspect_ratio", "width", "height", "multiple")}
        square["image_size"] = int(size or a["image_size"])
        images = [np.asarray(render(replace_objects(square, random.Random(s))), dtype=np.uint8)
                  for s in _seeds(a["caption"], per_caption, seed)]
        rows.append((caption_kind(a), *caption_position_spread(images, a)))
    return rows


def data_position_spread(attrs: Sequence[dict], per_caption: int = 8, seed: int = 0, size: int | None = None) -> dict:
    """The figure for the data: each caption's objects re-placed `per_caption` times by the data set's placement
    rule (`replace_objects`, seeded by the caption and `seed`) on a square canvas of `size` pixels (default: the
    attributes' `image_size`), rendered and detected as a model's images are."""
    _check(attrs, per_caption)
    return _summary(_data_rows(attrs, per_caption, seed, size))


@torch.no_grad()
def position_spread(generate: Generate, attrs: Sequence[dict], per_caption: int = 8, seed: int = 0) -> dict:
    """Within-caption spread of object positions of a model, beside the data's on the same captions.

    `generate(captions, seeds)` (one square image [3, S, S] in [0, 1] per caption, as for
    `within_caption_diversity`) is called once per caption of `attrs` (shapes attributes, the `KEY.json` content).
    Returns the model's `captions`, `spread_captions`, `found`, `spread` (mean over captions, with `spread_se`),
    `spread_one_object` and `spread_two_objects` (with `_se`); `data`: the same for the data's own placements at
    S pixels (`data_position_spread`); and `minus_data` / `minus_data_se`: the mean over captions of the model's
    spread minus the data's, paired by caption (the captions where the model has a spread), which is what to read:
    below 0, the model draws a caption's objects in fewer places than the data does."""
    _check(attrs, per_caption)
    rows, sizes = [], set()
    for a in attrs:
        images = generate([a["caption"]] * per_caption, _seeds(a["caption"], per_caption, seed))
        if images.shape[0] != per_caption:
            raise ValueError(f"generate returned {images.shape[0]} images for {per_caption} captions")
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"position_spread compares with the data on a square canvas; generate returned images "
                             f"{tuple(images.shape[-2:])}")
        sizes.add(images.shape[-1])
        pixels = [p.permute(1, 2, 0).cpu().numpy() for p in to_uint8(images)]
        rows.append((caption_kind(a), *caption_position_spread(pixels, a)))
    data = _data_rows(attrs, per_caption, seed, sizes.pop() if len(sizes) == 1 else None)
    paired = [m[1] - d[1] for m, d in zip(rows, data) if m[1] is not None and d[1] is not None]
    out = {**_summary(rows), "data": _summary(data)}
    out["minus_data"], out["minus_data_se"] = _mean_se(paired)
    return out
