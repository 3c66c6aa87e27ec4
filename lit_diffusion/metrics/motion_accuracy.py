"""Does a generated moving-shapes clip show what its caption asks for? (a deterministic judge of motion captions)

The video counterpart of `caption_accuracy`: every frame goes through its `detect_objects` (palette colours,
connected components, a shape, a size and a centroid per object), and each expected object is tracked by its
colour (the two objects of a clip always differ in colour): in each frame its track is the largest component of
that colour, or nothing. A clip is then judged attribute by attribute:

- count: every frame shows exactly the expected number of objects.
- colors: the set of colours found is exactly the expected set in at least 7/8 of the frames (rounded up: 7 of 8,
  14 of 16; every frame below 8 frames). One flickering frame in eight is forgiven; a colour that is missing, or an
  extra one that is there, for a quarter of the clip is not.
- shapes: each object's expected shape gets strictly more of its per-frame classifications than any other shape.
- sizes: a growing (shrinking) object, one with `end_size`, is small (large) in the first frame where it is found
  and large (small) in the last; any other object's expected size gets strictly more of its frames than the other.
- direction: each object's centroid displacement in pixels, from the first frame where it is found to the last;
  the dominant axis and its sign give left / right / up / down (y grows downwards). A displacement along that
  axis under `_MIN_TRAVEL` = 0.1 of the shorter side is "not moving", which no caption asks for. The data moves
  every object 0.2 to 0.4 of the side (`moving_shapes.TRAVEL`); a triangle's centroid sits a third of its
  half-extent below its box centre, so a shrinking one moving down (or a growing one moving up) is measured up to
  0.04 short of that, and a growing or shrinking triangle that stays put drifts 0.04. Measured on 2,000 clips at
  32 px (1,000 with `grow_probability` 0.5; 3,030 objects): every object moved at least 0.177 along its axis
  (0.167 with Gaussian pixel noise of std 0.15), and the same objects held still drifted at most 0.048 (0.054 with
  that noise). 0.1 sits between the two, with room on both sides.
- correct: all of the above. `cut` (an object touches the border in some frame) is counted on its own, as in
  `check_image`.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch
from torch import Tensor

from lit_diffusion.metrics.caption_accuracy import CaptionAccuracy, detect_objects

ATTRIBUTES = ("count", "colors", "shapes", "sizes", "direction")
_COLOR_FRAME_SHARE = 7 / 8  # frames that must show exactly the expected colours
_MIN_TRAVEL = 0.1  # least displacement along the dominant axis, as a fraction of the shorter side


def _to_thwc_uint8(video: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(video, Tensor):
        if video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"check_clip expects a video [T, 3, H, W] in [0, 1], got shape {tuple(video.shape)}")
        video = video.detach().float().cpu().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return video.numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"check_clip expects a uint8 array [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def _wins(votes: list[str], expected: str) -> bool:
    """`expected` has strictly more votes than any other label (so a tie is a miss)."""
    counts = Counter(votes)
    return counts[expected] > max((n for label, n in counts.items() if label != expected), default=0)


def _direction(first: dict, last: dict, width: int, height: int) -> str | None:
    """left / right / up / down from the centroid's displacement in pixels, or None under the minimum travel."""
    dx, dy = (last["cx"] - first["cx"]) * width, (last["cy"] - first["cy"]) * height
    if abs(dx) >= abs(dy):
        along, name = dx, ("right" if dx > 0 else "left")
    else:
        along, name = dy, ("down" if dy > 0 else "up")
    return name if abs(along) >= _MIN_TRAVEL * min(width, height) else None


def _sizes_hold(track: list[dict], obj: dict) -> bool:
    if "end_size" in obj:
        return track[0]["size"] == obj["size"] and track[-1]["size"] == obj["end_size"]
    return _wins([t["size"] for t in track], obj["size"])


def check_clip(video: Tensor | np.ndarray, attrs: dict) -> dict:
    """Per-attribute booleans (count, colors, shapes, sizes, direction), `correct` (all of them) and `cut` for one
    clip, [T, 3, H, W] in [0, 1] or uint8 [T, H, W, 3], against its moving-shapes attributes (`KEY.json`). Also
    `directions`: the direction measured for each expected object (None: not found twice, or not moving)."""
    if not attrs or "objects" not in attrs:
        raise ValueError(f"check_clip needs moving-shapes attributes with 'objects', got keys {sorted(attrs or {})}")
    expected = attrs["objects"]
    frames = _to_thwc_uint8(video)  # [T, H, W, 3]
    height, width = frames.shape[1:3]
    found = [detect_objects(frame) for frame in frames]  # per frame, largest first
    tracks = [[next((o for o in objects if o["color"] == obj["color"]), None) for objects in found]
              for obj in expected]
    tracks = [[t for t in track if t is not None] for track in tracks]  # the frames where each object is found
    expected_colors = sorted(o["color"] for o in expected)
    color_frames = sum(sorted({o["color"] for o in objects}) == expected_colors for objects in found)
    directions = [_direction(track[0], track[-1], width, height) if len(track) > 1 else None for track in tracks]
    result = {
        "count": all(len(objects) == len(expected) for objects in found),
        "colors": color_frames >= math.ceil(_COLOR_FRAME_SHARE * len(found) - 1e-9),
        "shapes": all(track and _wins([t["shape"] for t in track], obj["shape"])
                      for track, obj in zip(tracks, expected)),
        "sizes": all(track and _sizes_hold(track, obj) for track, obj in zip(tracks, expected)),
        "direction": all(d == obj["direction"] for d, obj in zip(directions, expected)),
    }
    result = {key: bool(value) for key, value in result.items()}
    result["correct"] = all(result[k] for k in ATTRIBUTES)
    result["cut"] = any(o["at_border"] for objects in found for o in objects)  # not part of `correct`
    result["directions"] = directions
    return result


class MotionAccuracy(CaptionAccuracy):
    """Fraction of clips whose every caption attribute checks out; `attribute_accuracy()` breaks it down by
    attribute and by caption kind (one object or two). `CaptionAccuracy`'s counting, `check_clip`'s judging."""

    attributes = ATTRIBUTES
    check = staticmethod(check_clip)
    samples, sample_dims = "videos [B, T, 3, H, W]", 5
