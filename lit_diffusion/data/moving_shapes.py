"""Embedded video data: captioned clips of one or two shapes moving left, right, up or down, as WebDataset shards.

The video counterpart of `shapes`: the same colours, shapes, sizes and renderer, each frame drawn from attributes
we keep (`KEY.json`), so a generated clip can be checked against its caption (`metrics.motion_accuracy`).

A sample is `KEY.apng` (an animated PNG: lossless, every frame stored whole or as a lossless difference; PIL reads
and writes it, browsers play it), `KEY.txt` and `KEY.json`. `VideoDataModule` reads it as it reads video2dataset's
`KEY.mp4` / `KEY.webm` (those through PyAV).

Motion (positions as fractions of the side, y grows downwards): each object moves in a straight line at constant
speed from its first frame's centre to its last's, `travel` of the side (drawn from [0.2, 0.4] and bounded by the
room the object has), along its direction; the other coordinate stays. Every frame keeps the shapes data's rules:
each object fully inside with a margin of background, and in two-object clips the two boxes at least a gap apart
in every frame (drawn by rejection). The two objects of a clip differ in colour (the judge tracks them by colour);
their directions are independent. With `grow_probability` > 0 an object may also grow from small to large or
shrink from large to small over the clip; its caption then names the change instead of a size ("a red circle
growing and moving left").

Captions: "a small red circle moving left", "a small blue square moving up and a large green triangle moving
right".
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from pathlib import Path

from PIL import Image
from webdataset import ShardWriter

from lit_diffusion.data.shapes import COLORS, SHAPES, SIZES, _remove_stale_shards, render, split_urls

log = logging.getLogger(__name__)

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
TWO_OBJECT_PROBABILITY = 0.5
TRAVEL = (0.2, 0.4)  # distance moved over the clip, as a fraction of the side
FPS = 8  # frames a second of the animated PNGs, also in KEY.json: a reader counts frames by it
_MARGIN = 0.04  # as in `shapes`: background between an object's box and the border, and between two boxes
_GAP = 0.04
_PLACE_TRIES = 100_000
_PNG_COMPRESS_LEVEL = 1
MOTION_SWAPS = {"left": "right", "up": "down", "growing": "shrinking"}  # hard negatives for a video CLIP


def clip_caption(attrs: dict) -> str:
    phrases = []
    for obj in attrs["objects"]:
        if obj.get("scale"):
            phrases.append(f"a {obj['color']} {obj['shape']} {obj['scale']} and moving {obj['direction']}")
        else:
            phrases.append(f"a {obj['size']} {obj['color']} {obj['shape']} moving {obj['direction']}")
    return " and ".join(phrases)


def _radius(obj: dict, t: float) -> float:
    """Half-extent at time t in [0, 1] (the first frame at 0, the last at 1)."""
    r0, r1 = SIZES[obj["size"]], SIZES[obj.get("end_size", obj["size"])]
    return r0 + (r1 - r0) * t


def _centre(obj: dict, t: float) -> tuple[float, float]:
    return obj["cx0"] + (obj["cx1"] - obj["cx0"]) * t, obj["cy0"] + (obj["cy1"] - obj["cy0"]) * t


def _place(rng: random.Random, obj: dict) -> None:
    """A straight path inside the canvas for the object's direction and (largest) size."""
    r = max(SIZES[obj["size"]], SIZES[obj.get("end_size", obj["size"])])
    lo, hi = r + _MARGIN, 1.0 - r - _MARGIN
    dx, dy = _STEP[obj["direction"]]
    travel = rng.uniform(TRAVEL[0], min(TRAVEL[1], hi - lo))
    start_along = rng.uniform(lo, hi - travel)  # the path [start, start + travel] in the "forward" sense
    across = rng.uniform(lo, hi)
    if dx:
        x0 = start_along if dx > 0 else start_along + travel
        obj.update(cx0=x0, cy0=across, cx1=x0 + dx * travel, cy1=across)
    else:
        y0 = start_along if dy > 0 else start_along + travel
        obj.update(cx0=across, cy0=y0, cx1=across, cy1=y0 + dy * travel)
    for key in ("cx0", "cy0", "cx1", "cy1"):
        obj[key] = round(obj[key], 4)


def _apart(a: dict, b: dict, frames: int) -> bool:
    """The two objects' boxes are at least a gap apart (along x or along y) in every frame."""
    for i in range(frames):
        t = i / max(frames - 1, 1)
        (ax, ay), (bx, by) = _centre(a, t), _centre(b, t)
        reach = _radius(a, t) + _radius(b, t) + _GAP
        if abs(ax - bx) < reach and abs(ay - by) < reach:
            return False
    return True


def _object(rng: random.Random, color: str, grow_probability: float) -> dict:
    obj = {"shape": rng.choice(SHAPES), "color": color, "size": rng.choice(list(SIZES)),
           "direction": rng.choice(DIRECTIONS)}
    if grow_probability and rng.random() < grow_probability:
        obj["scale"] = rng.choice(("growing", "shrinking"))
        obj["size"], obj["end_size"] = ("small", "large") if obj["scale"] == "growing" else ("large", "small")
    return obj


def clip_attrs(rng: random.Random | int, image_size: int = 32, frames: int = 8, grow_probability: float = 0.0) -> dict:
    """Draw one clip's attributes (the `KEY.json` content)."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    if rng.random() < TWO_OBJECT_PROBABILITY:
        colors = rng.sample(list(COLORS), 2)
        for _ in range(_PLACE_TRIES):
            objects = [_object(rng, c, grow_probability) for c in colors]
            if all("large" in (o["size"], o.get("end_size")) for o in objects):
                # two objects large at some time rarely fit past each other: the second stays small
                objects[1] = {k: v for k, v in objects[1].items() if k not in ("scale", "end_size")}
                objects[1]["size"] = "small"
            for obj in objects:
                _place(rng, obj)
            if _apart(*objects, frames):
                break
        else:  # pragma: no cover - about one draw in ten is accepted
            raise RuntimeError("could not place two moving objects")
    else:
        objects = [_object(rng, rng.choice(list(COLORS)), grow_probability)]
        _place(rng, objects[0])
    attrs = {"caption": "", "objects": objects, "frames": int(frames), "fps": FPS, "image_size": int(image_size)}
    attrs["caption"] = clip_caption(attrs)
    return attrs


def frame_attrs(attrs: dict, index: int) -> dict:
    """The still-image attributes (`shapes` format, drawn by `shapes.render`) of frame `index`."""
    t = index / max(attrs["frames"] - 1, 1)
    objects = []
    for obj in attrs["objects"]:
        cx, cy = _centre(obj, t)
        objects.append({"shape": obj["shape"], "color": obj["color"], "cx": cx, "cy": cy, "r": _radius(obj, t),
                        "size": obj["size"] if t < 0.5 else obj.get("end_size", obj["size"])})
    return {"objects": objects, "relation": None, "image_size": attrs["image_size"]}


def render_clip(attrs: dict, size: int | None = None) -> list[Image.Image]:
    """The clip's frames as RGB images of `size` (default `attrs["image_size"]`) pixels square."""
    return [render(frame_attrs(attrs, i), size or attrs["image_size"]) for i in range(attrs["frames"])]


def encode_apng(frames: list[Image.Image], fps: int = FPS) -> bytes:
    """Frames as an animated PNG (lossless), `fps` frames a second, looping."""
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0,
                   compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def clip_sample(index: int, attrs: dict, size: int) -> dict:
    return {"__key__": f"{index:09d}", "apng": encode_apng(render_clip(attrs, size), attrs.get("fps", FPS)),
            "txt": attrs["caption"].encode("utf-8"), "json": json.dumps(attrs, sort_keys=True).encode("utf-8")}


def write_moving_shapes(out_dir: str | Path, train: int = 5000, val: int = 500, size: int = 32, frames: int = 8,
                        shard_size: int = 1000, seed: int = 0, grow_probability: float = 0.0,
                        vocab_size: int = 1000, context_length: int = 32) -> dict:
    """Write `train-%06d.tar` / `val-%06d.tar` shards of moving-shapes clips, `tokenizer.json` and `info.json` to
    `out_dir`; the same arguments give byte-identical shards (not always the same tokenizer.json: the BPE trainer
    breaks ties between equally frequent pairs in hash-map order, see `Tokenizer.train`). Returns info.json's
    content plus timing."""
    from lit_diffusion.data.tokenizer import Tokenizer

    if size < 16:
        raise ValueError(f"size={size}: shapes need at least 16 px to keep objects and gaps visible")
    if frames < 2:
        raise ValueError(f"frames={frames}: a motion needs at least 2 frames")
    if not 0.0 <= grow_probability <= 1.0:
        raise ValueError(f"grow_probability={grow_probability} must be in [0, 1]")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out_dir, dataset="moving_shapes")
    start = time.perf_counter()
    shards, captions = {}, {}
    for split, count in (("train", train), ("val", val)):
        rng = random.Random(f"lit_diffusion-moving-shapes-{seed}-{split}")
        written, captions[split] = [], []
        if count > 0:
            pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
            with ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0, post=written.append) as sink:
                for index in range(count):
                    attrs = clip_attrs(rng, size, frames, grow_probability)
                    captions[split].append(attrs["caption"])
                    sink.write(clip_sample(index, attrs, size))
        shards[split] = [Path(s).name for s in written]
    seconds = time.perf_counter() - start
    tokenizer_captions = captions["train"] or [clip_caption(clip_attrs(i, size, frames)) for i in range(100)]
    Tokenizer.train(tokenizer_captions, vocab_size=vocab_size, context_length=context_length).save(
        out_dir / "tokenizer.json")

    info = {
        "dataset": "moving_shapes",
        "seed": seed,
        "image_size": size,
        "frames": frames,
        "grow_probability": grow_probability,
        "format": "apng",
        "shard_size": shard_size,
        "counts": {"train": train, "val": val},
        "shards": shards,
        "urls": {split: split_urls(out_dir, shards[split], split) for split in shards},
        "tokenizer": "tokenizer.json",
        "colors": {k: list(v) for k, v in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": SIZES,
        "directions": list(DIRECTIONS),
        "hard_negatives": MOTION_SWAPS,
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    total = train + val
    log.info("wrote %d moving-shapes clips to %s in %.2fs", total, out_dir, seconds)
    return {**info, "seconds": seconds, "clips_per_s": total / max(seconds, 1e-9)}
