"""Embedded default data: captioned images of simple coloured shapes, written as WebDataset shards.

Every image is drawn from attributes we keep (`KEY.json`), so generated images can later be checked against
their caption (colour, shape, size, relation), the way GenEval checks objects.

Geometry (coordinates in [0, 1], y grows downwards):
- an object is a circle, square or triangle inscribed in the box [cx - r, cx + r] x [cy - r, cy + r];
- every object lies fully inside the image with at least one pixel of background around it;
- in two-object images the boxes do not overlap: along the relation's axis the first object's box ends at least
  `_GAP` before the second's begins ("above": first bottom < second top), and the offset along the other axis is
  at most half the offset along the relation's axis, so the relation is the dominant direction. Two large
  objects cannot satisfy this in a unit square (2 * 0.52 > 1), so a two-object image has at most one large one.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from pathlib import Path

from PIL import Image, ImageDraw
from webdataset import ShardWriter

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.14, "large": 0.26}  # half-extent as a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")

TWO_OBJECT_PROBABILITY = 0.5
_GAP = 0.04  # empty space between two objects' boxes along the relation's axis
_MARGIN = 0.04  # empty space between an object's box and the image border (>= 1 px at 32 px)
_PNG_COMPRESS_LEVEL = 1  # PNGs of flat colour compress well even at the fastest level

log = logging.getLogger(__name__)


def zeroshot_classes() -> dict:
    """info.json's `zeroshot` block: single objects classified by colour x shape (two-object captions name two
    classes, so they are left out); every training caption names a size, so the prompts do too (a class scores
    its best-matching prompt)."""
    return {"classes": [f"{c} {s}" for c in COLORS for s in SHAPES], "templates": [f"a {z} {{}}" for z in SIZES]}


def caption_of(attrs: dict) -> str:
    """Caption text for attributes (`attrs["objects"]`, `attrs["relation"]`)."""
    phrases = [f"a {o['size']} {o['color']} {o['shape']}" for o in attrs["objects"]]
    if attrs["relation"] is None:
        return phrases[0]
    return f"{phrases[0]} {attrs['relation']} {phrases[1]}"


def _object(rng: random.Random, color: str, size: str) -> dict:
    return {"shape": rng.choice(SHAPES), "color": color, "size": size}


def _place_single(rng: random.Random, obj: dict) -> None:
    r = SIZES[obj["size"]]
    lo, hi = r + _MARGIN, 1.0 - r - _MARGIN
    obj.update(cx=round(rng.uniform(lo, hi), 4), cy=round(rng.uniform(lo, hi), 4), r=r)


def _place_pair(rng: random.Random, first: dict, second: dict, relation: str) -> None:
    """Place `first` relative to `second` as `relation` says (see the module docstring for the rules)."""
    r1, r2 = SIZES[first["size"]], SIZES[second["size"]]
    # Work in the frame where the relation axis is "along" and "first comes before second" means smaller along.
    along_vertical = relation in ("above", "below")
    first_before = relation in ("above", "left of")
    lo1, hi1 = r1 + _MARGIN, 1.0 - r1 - _MARGIN
    lo2, hi2 = r2 + _MARGIN, 1.0 - r2 - _MARGIN
    min_sep = r1 + r2 + _GAP
    for _ in range(1000):
        a1, a2 = rng.uniform(lo1, hi1), rng.uniform(lo2, hi2)
        sep = (a2 - a1) if first_before else (a1 - a2)
        if sep < min_sep:
            continue
        c1, c2 = rng.uniform(lo1, hi1), rng.uniform(lo2, hi2)
        if abs(c1 - c2) > 0.5 * sep:
            continue
        break
    else:  # pragma: no cover - acceptance is high for every allowed size pair
        raise RuntimeError(f"could not place {first} {relation} {second}")
    a1, a2, c1, c2 = (round(v, 4) for v in (a1, a2, c1, c2))
    if along_vertical:
        first.update(cx=c1, cy=a1, r=r1)
        second.update(cx=c2, cy=a2, r=r2)
    else:
        first.update(cx=a1, cy=c1, r=r1)
        second.update(cx=a2, cy=c2, r=r2)


def sample_attrs(rng: random.Random | int, image_size: int = 32) -> dict:
    """Draw one image's attributes (the `KEY.json` content) from `rng` (a `random.Random` or an int seed)."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    size_names = list(SIZES)
    if rng.random() < TWO_OBJECT_PROBABILITY:
        color1, color2 = rng.sample(list(COLORS), 2)
        sizes = [rng.choice(size_names), rng.choice(size_names)]
        if sizes == ["large", "large"]:
            sizes[rng.randrange(2)] = "small"
        first, second = _object(rng, color1, sizes[0]), _object(rng, color2, sizes[1])
        relation = rng.choice(RELATIONS)
        _place_pair(rng, first, second, relation)
        objects = [first, second]
    else:
        obj = _object(rng, rng.choice(list(COLORS)), rng.choice(size_names))
        _place_single(rng, obj)
        relation, objects = None, [obj]
    attrs = {"caption": "", "relation": relation, "objects": objects, "image_size": int(image_size)}
    attrs["caption"] = caption_of(attrs)
    return attrs


def _pixel_box(obj: dict, size: int) -> tuple[int, int, int, int]:
    # Inclusive pixel bounds; rounding keeps the shape within its [c - r, c + r] box up to half a pixel,
    # which the 1-px-or-more margin and gap absorb.
    x0 = round((obj["cx"] - obj["r"]) * size)
    y0 = round((obj["cy"] - obj["r"]) * size)
    x1 = round((obj["cx"] + obj["r"]) * size) - 1
    y1 = round((obj["cy"] + obj["r"]) * size) - 1
    return x0, y0, x1, y1


def render(attrs: dict, size: int | None = None) -> Image.Image:
    """Draw attributes as an RGB image of side `size` (default `attrs["image_size"]`); no anti-aliasing, so
    every pixel is either the background or one of `COLORS`."""
    size = int(size or attrs["image_size"])
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in attrs["objects"]:
        color = COLORS[obj["color"]]
        x0, y0, x1, y1 = _pixel_box(obj, size)
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif obj["shape"] == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=color)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")
    return image


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def shapes_sample(index: int, attrs: dict, size: int) -> dict:
    """One WebDataset sample (`__key__`, png, txt, json) for attributes."""
    return {
        "__key__": f"{index:09d}",
        "png": encode_png(render(attrs, size)),
        "txt": attrs["caption"].encode("utf-8"),
        "json": json.dumps(attrs, sort_keys=True).encode("utf-8"),
    }


def _remove_stale_shards(out_dir: Path) -> None:
    """Old shards of a bigger run would be picked up by globs; delete them only if we wrote this directory."""
    stale = sorted(out_dir.glob("train-*.tar")) + sorted(out_dir.glob("val-*.tar"))
    if not stale:
        return
    info = out_dir / "info.json"
    try:
        ours = json.loads(info.read_text()).get("dataset") == "shapes"
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out_dir} already holds shards ({stale[0].name}, ...) that `write_shapes` did not write "
            f"(no shapes {info.name}); choose an empty directory"
        )
    for path in stale:
        path.unlink()


def _write_split(out_dir: Path, split: str, count: int, size: int, shard_size: int, seed: int) -> tuple[list, list]:
    rng = random.Random(f"lit_diffusion-shapes-{seed}-{split}")  # str seeds hash deterministically
    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
    shards, captions = [], []
    if count <= 0:
        return shards, captions
    # mtime fixed so the same seed gives byte-identical tars; an int, as a float mtime costs a PAX header per file.
    with ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0, post=shards.append) as sink:
        for index in range(count):
            attrs = sample_attrs(rng, size)
            captions.append(attrs["caption"])
            sink.write(shapes_sample(index, attrs, size))
    return [Path(s).name for s in shards], captions


def write_shapes(
    out_dir: str | Path,
    train: int = 5000,
    val: int = 500,
    size: int = 32,
    shard_size: int = 1000,
    seed: int = 0,
    vocab_size: int = 1000,
    context_length: int = 32,
) -> dict:
    """Write `train-%06d.tar` / `val-%06d.tar` shards of shapes images, `tokenizer.json` (trained on the
    train captions) and `info.json` to `out_dir`. The same arguments give byte-identical files.
    Returns info.json's content plus timing (`seconds`, `samples_per_s`)."""
    from lit_diffusion.data.tokenizer import Tokenizer

    if size < 16:
        raise ValueError(f"size={size}: shapes need at least 16 px to keep objects and gaps visible")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out_dir)
    start = time.perf_counter()
    train_shards, train_captions = _write_split(out_dir, "train", train, size, shard_size, seed)
    val_shards, _ = _write_split(out_dir, "val", val, size, shard_size, seed)
    seconds = time.perf_counter() - start

    tokenizer_captions = train_captions or [caption_of(sample_attrs(i, size)) for i in range(100)]
    Tokenizer.train(tokenizer_captions, vocab_size=vocab_size, context_length=context_length).save(
        out_dir / "tokenizer.json"
    )

    def brace(shards: list[str], split: str) -> str | None:
        if not shards:
            return None
        return str(out_dir / (f"{split}-{{000000..{len(shards) - 1:06d}}}.tar" if len(shards) > 1 else shards[0]))

    info = {
        "dataset": "shapes",
        "seed": seed,
        "image_size": size,
        "shard_size": shard_size,
        "counts": {"train": train, "val": val},
        "shards": {"train": train_shards, "val": val_shards},
        "urls": {"train": brace(train_shards, "train"), "val": brace(val_shards, "val")},
        "tokenizer": "tokenizer.json",
        "colors": {k: list(v) for k, v in COLORS.items()},
        "shapes": list(SHAPES),
        "sizes": SIZES,
        "relations": list(RELATIONS),
        "zeroshot": zeroshot_classes(),
    }
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    total = train + val
    log.info("wrote %d shapes samples to %s in %.2fs (%.0f samples/s)", total, out_dir, seconds, total / seconds)
    return {**info, "seconds": seconds, "samples_per_s": total / max(seconds, 1e-9)}
