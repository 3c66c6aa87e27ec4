"""How well unCLIP's text-diff edits (DALL-E 2 sec. 3.3, `UnCLIP.edit`) do what a caption edit asks, measured.

For each val image with ONE object ("a large red circle") and each edited attribute (colour, shape, size), the
caption is edited in that attribute alone, to a value drawn from the others by a rng seeded with the image's key
("a large blue circle"), the image is edited from the old caption to the new one, and the edit is judged by the
shapes judge (`check_image`, caption accuracy's) against the NEW attributes. Besides the judge's booleans:

    success   the edited attribute has the asked value     (the main object's: the largest one detected)
    kept      the other attributes are the source's, and the image still holds exactly one object
    correct   both; for one object it is exactly check_image(edit, new attrs)["correct"]

A source left unchanged scores success 0 and kept 1; an edit that redraws the whole image from the new caption
(`regenerate`, the baseline: caption -> prior -> decoder, without the source) can score success 1 and kept 1 too,
since one-object attributes are only colour, shape and size; what the edit keeps beyond the caption shows in
`placed` (the object's centre stays within `PLACED` of the exact edit's), `offset` (how far it is from there) and
the CLIP image similarity of edit to source (cosine, of uint8-quantised images, as `unclip_metrics` measures
variations; on the shapes data CLIP sees the attributes more than the position, so it gauges the layout poorly).

An edit returns frames [K, 3, H, W] (one per theta of `UnCLIP.edit`'s slerp); the figures are those of frame
`frame` (the last: the largest theta, by default), and with K > 1 `per_theta` gives success, kept, correct and
similarity of every frame, the curve along the slerp. One process; nothing is reduced across ranks. Deterministic
given the keys and `seed`: the new values come from `random.Random` seeded by strings, the edit itself is the
deterministic inversion and sampler, the baseline's noise is seeded per image (`sample_seed`).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from lit_diffusion.data.shapes import COLORS, SHAPES, SIZES, _bounds, canvas_of, caption_of, render
from lit_diffusion.evaluation.evaluator import sample_seed
from lit_diffusion.evaluation.unclip_metrics import _embed, _mean_se
from lit_diffusion.metrics.caption_accuracy import ATTRIBUTES, check_image, detect_objects
from lit_diffusion.metrics.features import to_uint8

# the edited attribute -> (its key in an object's attrs, its values, check_image's boolean for it)
EDITABLE = {"color": ("color", tuple(COLORS), "colors"), "shape": ("shape", SHAPES, "shapes"),
            "size": ("size", tuple(SIZES), "sizes")}
# edit(image [1, 3, H, W] in [0, 1], old caption, new caption, seed) -> frames [K, 3, H, W] in [0, 1]
Edit = Callable[[Tensor, str, str, int], Tensor]
JUDGED = (*ATTRIBUTES, "correct")
PLACED = 0.1  # an edit keeps the layout when the object's centre is this near the exact edit's (of the short side)


def edit_target(attrs: dict, attribute: str, key: str, seed: int = 0) -> dict:
    """The attributes of a one-object image with `attribute` (color, shape or size) changed to another value, drawn
    uniformly from the others by `random.Random(f"{key}|{attribute}|{seed}")`: the same for the same image key. A
    size edit also sets the half-extent `r` and moves the centre the least that keeps the object inside the canvas
    (as the data places it), so that `render(target)` is the target image."""
    if attribute not in EDITABLE:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {tuple(EDITABLE)}")
    if len(attrs.get("objects") or []) != 1:
        raise ValueError(f"edits are made on one-object images, got {len(attrs.get('objects') or [])} objects")
    field, values, _ = EDITABLE[attribute]
    obj = dict(attrs["objects"][0])
    others = [v for v in values if v != obj[field]]
    obj[field] = random.Random(f"{key}|{attribute}|{seed}").choice(others)
    if field == "size" and "r" in obj:  # the new half-extent, the centre moved the least to keep it inside
        width, height = canvas_of(attrs)
        short = min(width, height)
        obj["r"] = SIZES[obj["size"]]
        for c, side in (("cx", width), ("cy", height)):
            lo, hi = _bounds(obj["r"], short / side)
            obj[c] = round(min(max(obj[c], lo), hi), 4)
    new = {**attrs, "objects": [obj], "relation": None}
    new["caption"] = caption_of(new)
    return new


def judge_edit(image: Tensor, source: dict, target: dict, attribute: str,
               judge: Callable[[Tensor, dict], dict] = check_image) -> dict:
    """One edited image [3, H, W] against the source's and the target's one-object attributes: the judge's booleans
    against the target (JUDGED), `success`, `kept`, `correct` (see the module docstring), and `offset`: how far
    the main object's centroid is from where the exact edit puts it (that of the target's attrs rendered, at the
    source's place: a triangle's centroid sits lower in its box than a square's), in units of the image's shorter
    side (None when nothing is detected)."""
    field = EDITABLE[attribute][0]
    found = detect_objects(image)
    main = found[0] if found else None
    want, was = target["objects"][0], source["objects"][0]
    success = main is not None and main[field] == want[field]
    kept = (len(found) == 1 and all(main[f] == was[f] for f, _, _ in EDITABLE.values() if f != field))
    offset = None
    if main is not None and "cx" in want:
        ideal = detect_objects(np.array(render(target)))  # the exact edit: the target drawn at the source's place
        if ideal:
            height, width = image.shape[-2:]
            short = min(height, width)
            offset = float(((main["cx"] - ideal[0]["cx"]) * width / short) ** 2
                           + ((main["cy"] - ideal[0]["cy"]) * height / short) ** 2) ** 0.5
    return {**{k: bool(v) for k, v in judge(image, target).items() if k in JUDGED},
            "success": bool(success), "kept": bool(kept), "correct": bool(success and kept), "offset": offset}


def _summary(checks: list[dict], similarity: list[float]) -> dict:
    n = len(checks)
    out: dict = {"edits": n}
    for what in ("success", "kept", "correct"):
        count = sum(int(c[what]) for c in checks)
        out[what], out[f"{what}_count"] = (count / n if n else float("nan")), count
    out["similarity"], out["similarity_se"] = _mean_se(similarity)
    offsets = [c["offset"] for c in checks if c.get("offset") is not None]
    # the layout kept: the main object's centre within PLACED of the exact edit's (a missing object is not placed)
    out["placed"] = sum(o <= PLACED for o in offsets) / n if n else float("nan")
    out["offset"] = _mean_se(offsets)[0]  # mean over edits with an object detected
    # the edit asked for: the new caption holds and the object stayed where it was
    both = sum(int(c["correct"] and c.get("offset") is not None and c["offset"] <= PLACED) for c in checks)
    out["correct_placed"], out["correct_placed_count"] = (both / n if n else float("nan")), both
    out["judge"] = {k: (sum(int(c[k]) for c in checks) / n if n else float("nan"))
                    for k in ATTRIBUTES}  # check_image against the new attrs; its `correct` is `correct`
    return out


@torch.no_grad()
def edit_accuracy(edit: Edit, images: Tensor, attrs: Sequence[dict | None], keys: Sequence[str], clip_module,
                  attributes: Sequence[str] = tuple(EDITABLE), images_limit: int | None = None, seed: int = 0,
                  frame: int = -1, thetas: Sequence[float] | None = None,
                  judge: Callable[[Tensor, dict], dict] = check_image) -> dict:
    """Single-attribute caption edits of the one-object images among `images` [N, 3, H, W] in [0, 1] (their
    `attrs`, `keys`; others are skipped), the first `images_limit` of them (None: all), judged as the module
    docstring says. `edit(image [1, 3, H, W], old, new, seed)` returns frames [K, 3, H, W]; `thetas` (K labels)
    name the frames in `per_theta`.

    Returns {"attributes": {attribute: summary}, "overall": summary, "per_theta": {theta: {"overall": ...,
    attribute: ...}} (K > 1), "images", "edits", "skipped" (not one-object), "source_correct" (the judge on the
    sources against their own attrs: the ceiling of `kept`), "frame", "theta", "records"}, a summary being
    {"edits", "success", "kept", "correct" (fractions) with "*_count" (integers), "similarity" (mean cosine of
    edit to source), "similarity_se" (its standard error over edits), "placed" (the fraction of edits whose main
    object's centre is within `PLACED` of the exact edit's), "offset" (the mean distance, over edits with an
    object), "correct_placed" (correct and placed: the edit asked for) with its count, "judge" (check_image's
    per-attribute fractions against the new attrs)}; `records`: one dict per edit (key, attribute, old, new, the
    frame's checks and similarity)."""
    n = images.shape[0]
    if len(attrs) != n or len(keys) != n:
        raise ValueError(f"{n} images but {len(attrs)} attrs and {len(keys)} keys")
    for attribute in attributes:
        if attribute not in EDITABLE:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {tuple(EDITABLE)}")
    chosen = [i for i, a in enumerate(attrs) if a and len(a.get("objects") or []) == 1]
    skipped = n - len(chosen)
    chosen = chosen[:images_limit] if images_limit is not None else chosen
    sources = to_uint8(images[chosen]).float().cpu() / 255 if chosen else images[:0]
    source_emb = _embed(clip_module, sources) if chosen else None
    records, frames_k = [], None
    for j, i in enumerate(chosen):
        src_attrs = attrs[i]
        own = judge(sources[j], src_attrs)
        for attribute in attributes:
            target = edit_target(src_attrs, attribute, str(keys[i]), seed)
            old, new = caption_of(src_attrs), target["caption"]
            frames = edit(sources[j:j + 1], old, new, sample_seed(f"edit {keys[i]} {attribute}", seed))
            if frames.ndim == 3:
                frames = frames[None]
            frames = to_uint8(frames).float().cpu() / 255
            if frames_k is None:
                frames_k = frames.shape[0]
            elif frames.shape[0] != frames_k:
                raise ValueError(f"edit returned {frames.shape[0]} frames, earlier {frames_k}")
            sims = (_embed(clip_module, frames) * source_emb[j]).sum(-1).tolist()  # [K] cosines
            checks = [judge_edit(f, src_attrs, target, attribute, judge) for f in frames]
            records.append({"key": str(keys[i]), "attribute": attribute, "old": old, "new": new,
                            "source_correct": bool(own["correct"]), "checks": checks, "similarity": sims})
    k = frames_k or 1
    if thetas is not None and len(thetas) != k:
        raise ValueError(f"{len(thetas)} thetas for {k} frames")
    frame = frame % k

    def summarise(f: int) -> dict:
        per = {a: _summary([r["checks"][f] for r in records if r["attribute"] == a],
                           [r["similarity"][f] for r in records if r["attribute"] == a]) for a in attributes}
        return {"overall": _summary([r["checks"][f] for r in records], [r["similarity"][f] for r in records]),
                "attributes": per}

    main = summarise(frame)
    labels = list(thetas) if thetas is not None else list(range(k))
    out = {**main, "images": len(chosen), "edits": len(records), "skipped": skipped,
           "source_correct": (sum(r["source_correct"] for r in records) / len(records) if records
                              else float("nan")),
           "frame": frame, "theta": labels[frame] if thetas is not None else None,
           "records": [{**r, "checks": r["checks"][frame], "similarity": r["similarity"][frame]} for r in records]}
    if k > 1:
        out["per_theta"] = {labels[f]: summarise(f) for f in range(k)}
    return out


# ------------------------------------------------------------------------------------- the edit and its baseline
def unclip_edit(unclip, guidance: float | None = 3.0, **edit_kwargs) -> Edit:
    """`edit` for `edit_accuracy`: `UnCLIP.edit` at its defaults (thetas `EDIT_THETAS`, the decoder's steps) but
    `guidance`; it is deterministic, so the seed is unused."""

    def edit(image: Tensor, old: str, new: str, seed: int) -> Tensor:
        return unclip.edit(image.to(unclip.decoder.device), old, new, guidance=guidance, **edit_kwargs)

    return edit


def regenerate(unclip, guidance: float | None = 3.0, **generate_kwargs) -> Edit:
    """The baseline `edit`: ignore the source and generate from the new caption (caption -> prior -> decoder,
    `UnCLIP.generate`, seeded per edit): what an edit keeps beyond the caption shows against it."""

    def edit(image: Tensor, old: str, new: str, seed: int) -> Tensor:
        return unclip.generate([new], seed=[seed], guidance=guidance, height=image.shape[-2], width=image.shape[-1],
                               **generate_kwargs)

    return edit
