"""Embedded default data: captioned images of simple coloured shapes, written as WebDataset shards.

Every image is drawn from attributes we keep (`KEY.json`), so generated images can later be checked against
their caption (colour, shape, size, relation), the way GenEval checks objects.

Canvas: square, `size` x `size` pixels, unless `aspect_ratios` (such as "1:1,3:2,2:3,2:1,1:2") is given; then each
sample draws its ratio uniformly from the list (same seeded rng, no draw when the list has one ratio) and its
canvas is W x H with W / H the ratio and W * H about `size`^2: W = size * sqrt(ratio) and H = size / sqrt(ratio),
each rounded half up to the nearest even number ("1:1" stays `size` x `size`), e.g. 40 x 26 for 3:2 at 32 px. A
shorter side under 14 px is refused: the border margin must round to a whole background pixel. `KEY.json` then
holds `aspect_ratio`, `width` and `height`; with the default ("1:1" only) neither those keys nor any byte change.

Geometry (y grows downwards; S is the canvas's shorter side, S = W = H on a square):
- cx is a fraction of the width, cy of the height; sizes, margins and gaps are fractions of S, so an object
  looks the same on every canvas: a circle, square or triangle inscribed in the box of half-extent r * S pixels
  around (cx * W, cy * H);
- every object lies fully inside the image with at least one pixel of background around it (`_MARGIN` * S);
- in two-object images the boxes do not overlap: along the relation's axis the first object's box ends at least
  `_GAP` * S before the second's begins ("above": first bottom < second top), and the offset in pixels along the
  other axis is at most half the offset along the relation's axis, so the relation is the dominant direction.
  Two large objects cannot satisfy this along a side of S pixels (2 * 0.52 > 1), so a two-object image has at
  most one large one; every other pair fits along the shorter side, so no relation is ever impossible. Positions
  are drawn by rejection: a pair's centres are redrawn from the same rng until the rules hold (about 1 draw in
  300 succeeds for a small and a large object side by side across the short side of a 2:1 canvas, 1 in 120 on a
  square).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import time
from collections.abc import Sequence
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
SIZES = {"small": 0.14, "large": 0.26}  # half-extent as a fraction of the image's shorter side
RELATIONS = ("above", "below", "left of", "right of")
ASPECT_RATIOS = ("1:1",)  # the default: square canvases only, byte for byte the data set as it always was

TWO_OBJECT_PROBABILITY = 0.5
_GAP = 0.04  # empty space between two objects' boxes along the relation's axis
_MARGIN = 0.04  # empty space between an object's box and the image border (>= 1 px at 32 px)
_MIN_SIDE = 14  # shorter side of a non-square canvas: the smallest even side where _MARGIN * side > 0.5 px
# Rejection draws per pair. Never reached: the worst allowed pair (small and large side by side across a 2:1
# canvas's short side) is accepted about once in 300 draws; a square's once in 120.
_PLACE_TRIES = 100_000
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


def parse_aspect_ratios(value: str | Sequence[str]) -> tuple[str, ...]:
    """Aspect ratios W:H from "1:1,3:2" (or a list of such strings), reduced ("4:2" -> "2:1") and without
    repeats, in the order given. Raises ValueError on anything else ("3x2", "0:1", "")."""
    items = value.split(",") if isinstance(value, str) else list(value)
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise ValueError(f"expected comma-separated aspect ratios W:H such as 1:1,3:2, got {value!r}")
    ratios = []
    for item in items:
        match = re.fullmatch(r"\s*([0-9]+)\s*:\s*([0-9]+)\s*", item)
        if match is None or 0 in (int(match[1]), int(match[2])):
            raise ValueError(f"aspect ratio {item.strip()!r} is not W:H with positive whole numbers, such as 3:2")
        w, h = int(match[1]), int(match[2])
        g = math.gcd(w, h)
        ratio = f"{w // g}:{h // g}"
        if ratio not in ratios:
            ratios.append(ratio)
    return tuple(ratios)


def canvas_size(aspect_ratio: str, size: int, multiple: int = 2) -> tuple[int, int]:
    """(width, height) of a canvas of ratio "W:H" and area about `size`^2 (see the module docstring), each side
    rounded half up to a multiple of `multiple` (2 by default; 8 gives sides a VAE of factor 4 and a U-Net with one
    downsampling take as they are, so aspect buckets of those sizes hold the canvases uncropped)."""
    (ratio,) = parse_aspect_ratios([aspect_ratio])
    w, h = (int(x) for x in ratio.split(":"))
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if w == h:
        return int(size), int(size)
    width = multiple * math.floor(size * math.sqrt(w / h) / multiple + 0.5)
    height = multiple * math.floor(size * math.sqrt(h / w) / multiple + 0.5)
    if min(width, height) < _MIN_SIDE:
        raise ValueError(
            f"aspect ratio {ratio} at size {size} gives a {width}x{height} canvas, whose shorter side is under "
            f"{_MIN_SIDE} px; choose a larger size or a less elongated ratio"
        )
    return width, height


def _object(rng: random.Random, color: str, size: str) -> dict:
    return {"shape": rng.choice(SHAPES), "color": color, "size": size}


# kx = S / W and ky = S / H turn lengths in units of the shorter side S into fractions of the width and height.
# Both are exactly 1.0 on a square, where every expression below reduces to the square-only code's, float for
# float, so the default data set keeps its bytes.
def _bounds(r: float, k: float) -> tuple[float, float]:
    """Range of an object centre (fraction of one side) keeping its box and margin inside that side."""
    return r * k + _MARGIN * k, 1.0 - r * k - _MARGIN * k


def _place_single(rng: random.Random, obj: dict, kx: float = 1.0, ky: float = 1.0) -> None:
    r = SIZES[obj["size"]]
    obj.update(cx=round(rng.uniform(*_bounds(r, kx)), 4), cy=round(rng.uniform(*_bounds(r, ky)), 4), r=r)


def _place_pair(rng: random.Random, first: dict, second: dict, relation: str,
                kx: float = 1.0, ky: float = 1.0) -> None:
    """Place `first` relative to `second` as `relation` says (see the module docstring for the rules)."""
    r1, r2 = SIZES[first["size"]], SIZES[second["size"]]
    # Work in the frame where the relation axis is "along" and "first comes before second" means smaller along.
    along_vertical = relation in ("above", "below")
    first_before = relation in ("above", "left of")
    k_along, k_across = (ky, kx) if along_vertical else (kx, ky)
    lo1, hi1 = _bounds(r1, k_along)
    lo2, hi2 = _bounds(r2, k_along)
    clo1, chi1 = _bounds(r1, k_across)
    clo2, chi2 = _bounds(r2, k_across)
    min_sep = (r1 + r2 + _GAP) * k_along
    if ((hi2 - lo1) if first_before else (hi1 - lo2)) < min_sep:
        raise ValueError(f"a {first['size']} object cannot be {relation} a {second['size']} one on a canvas whose "
                         f"side along that relation is {1 / k_along:.3g} times its shorter side")
    for _ in range(_PLACE_TRIES):
        a1, a2 = rng.uniform(lo1, hi1), rng.uniform(lo2, hi2)
        sep = (a2 - a1) if first_before else (a1 - a2)
        if sep < min_sep:
            continue
        c1, c2 = rng.uniform(clo1, chi1), rng.uniform(clo2, chi2)
        if abs(c1 - c2) / k_across > 0.5 * sep / k_along:  # offsets in units of S, i.e. in pixels
            continue
        break
    else:  # pragma: no cover - see _PLACE_TRIES
        raise RuntimeError(f"could not place {first} {relation} {second}")
    a1, a2, c1, c2 = (round(v, 4) for v in (a1, a2, c1, c2))
    if along_vertical:
        first.update(cx=c1, cy=a1, r=r1)
        second.update(cx=c2, cy=a2, r=r2)
    else:
        first.update(cx=a1, cy=c1, r=r1)
        second.update(cx=a2, cy=c2, r=r2)


def sample_attrs(rng: random.Random | int, image_size: int = 32,
                 aspect_ratios: str | Sequence[str] = ASPECT_RATIOS, multiple: int = 2) -> dict:
    """Draw one image's attributes (the `KEY.json` content) from `rng` (a `random.Random` or an int seed); with
    aspect ratios other than the default, first the sample's ratio, and the attributes gain `aspect_ratio`,
    `width` and `height`."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    ratios = parse_aspect_ratios(aspect_ratios)
    canvas = {}
    width = height = int(image_size)
    if ratios != ASPECT_RATIOS:
        ratio = ratios[0] if len(ratios) == 1 else rng.choice(ratios)
        width, height = canvas_size(ratio, image_size, multiple)
        canvas = {"aspect_ratio": ratio, "width": width, "height": height, **({"multiple": multiple}
                                                                              if multiple != 2 else {})}
    short = min(width, height)
    kx, ky = short / width, short / height
    size_names = list(SIZES)
    if rng.random() < TWO_OBJECT_PROBABILITY:
        color1, color2 = rng.sample(list(COLORS), 2)
        sizes = [rng.choice(size_names), rng.choice(size_names)]
        if sizes == ["large", "large"]:
            sizes[rng.randrange(2)] = "small"
        first, second = _object(rng, color1, sizes[0]), _object(rng, color2, sizes[1])
        relation = rng.choice(RELATIONS)
        _place_pair(rng, first, second, relation, kx, ky)
        objects = [first, second]
    else:
        obj = _object(rng, rng.choice(list(COLORS)), rng.choice(size_names))
        _place_single(rng, obj, kx, ky)
        relation, objects = None, [obj]
    attrs = {"caption": "", "relation": relation, "objects": objects, "image_size": int(image_size), **canvas}
    attrs["caption"] = caption_of(attrs)
    return attrs


def replace_objects(attrs: dict, rng: random.Random | int) -> dict:
    """A copy of attributes with the same objects (shape, colour, size), relation, caption and canvas, placed anew
    by the rule that drew them: another image the data set could hold for the same caption."""
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    width, height = canvas_of(attrs)
    short = min(width, height)
    kx, ky = short / width, short / height
    objects = [{k: obj[k] for k in ("shape", "color", "size")} for obj in attrs["objects"]]
    if attrs.get("relation") is not None:
        if len(objects) != 2:
            raise ValueError(f"a relation needs two objects, got {len(objects)} in {attrs.get('caption')!r}")
        _place_pair(rng, objects[0], objects[1], attrs["relation"], kx, ky)
    else:
        for obj in objects:
            _place_single(rng, obj, kx, ky)
    return {**attrs, "objects": objects}


def _pixel_box(obj: dict, width: int, height: int | None = None) -> tuple[int, int, int, int]:
    # Inclusive pixel bounds; rounding keeps the shape within its box (half-extent r * S) up to half a pixel,
    # which the 1-px-or-more margin and gap absorb.
    height = width if height is None else height
    short = min(width, height)
    rx, ry = obj["r"] * (short / width), obj["r"] * (short / height)  # fractions of the width and height
    x0 = round((obj["cx"] - rx) * width)
    y0 = round((obj["cy"] - ry) * height)
    x1 = round((obj["cx"] + rx) * width) - 1
    y1 = round((obj["cy"] + ry) * height) - 1
    return x0, y0, x1, y1


def canvas_of(attrs: dict, size: int | None = None) -> tuple[int, int]:
    """(width, height) of attributes' canvas at `size` (default `attrs["image_size"]`): square unless the
    attributes carry an `aspect_ratio`."""
    size = int(size or attrs["image_size"])
    if "aspect_ratio" in attrs:
        return canvas_size(attrs["aspect_ratio"], size, attrs.get("multiple", 2))
    return size, size


def render(attrs: dict, size: int | None = None) -> Image.Image:
    """Draw attributes as an RGB image of `canvas_of(attrs, size)` (`size` x `size` for square attributes);
    no anti-aliasing, so every pixel is either the background or one of `COLORS`."""
    width, height = canvas_of(attrs, size)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in attrs["objects"]:
        color = COLORS[obj["color"]]
        x0, y0, x1, y1 = _pixel_box(obj, width, height)
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


def _remove_stale_shards(out_dir: Path, dataset: str = "shapes") -> None:
    """Old shards of a bigger run would be picked up by globs; delete them only if we wrote this directory (its
    info.json names `dataset`)."""
    stale = sorted(out_dir.glob("train-*.tar")) + sorted(out_dir.glob("val-*.tar"))
    if not stale:
        return
    info = out_dir / "info.json"
    try:
        ours = json.loads(info.read_text()).get("dataset") == dataset
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ValueError(
            f"{out_dir} already holds shards ({stale[0].name}, ...) that were not written as {dataset} data "
            f"(no {dataset} {info.name}); choose an empty directory"
        )
    for path in stale:
        path.unlink()


def split_urls(out_dir: Path, shards: list[str], split: str) -> str | None:
    """The brace pattern of a split's shards written as `SPLIT-%06d.tar` (one shard: its path; none: None)."""
    if not shards:
        return None
    return str(out_dir / (f"{split}-{{000000..{len(shards) - 1:06d}}}.tar" if len(shards) > 1 else shards[0]))


def _write_split(out_dir: Path, split: str, count: int, size: int, shard_size: int, seed: int,
                 aspect_ratios: tuple[str, ...] = ASPECT_RATIOS, multiple: int = 2) -> tuple[list, list]:
    rng = random.Random(f"lit_diffusion-shapes-{seed}-{split}")  # str seeds hash deterministically
    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
    shards, captions = [], []
    if count <= 0:
        return shards, captions
    # mtime fixed so the same seed gives byte-identical tars; an int, as a float mtime costs a PAX header per file.
    with ShardWriter(pattern, maxcount=shard_size, verbose=0, mtime=0, post=shards.append) as sink:
        for index in range(count):
            attrs = sample_attrs(rng, size, aspect_ratios, multiple)
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
    aspect_ratios: str | Sequence[str] = ASPECT_RATIOS,
    multiple: int = 2,
) -> dict:
    """Write `train-%06d.tar` / `val-%06d.tar` shards of shapes images, `tokenizer.json` (trained on the
    train captions) and `info.json` to `out_dir`. The same arguments give byte-identical files.
    `aspect_ratios` ("1:1,3:2,..." or a list) are the canvases' W:H, drawn per sample; info.json records them
    and their canvases unless they are the default, square only; `multiple` rounds the canvases' sides.
    Returns info.json's content plus timing (`seconds`, `samples_per_s`)."""
    from lit_diffusion.data.tokenizer import Tokenizer

    if size < 16:
        raise ValueError(f"size={size}: shapes need at least 16 px to keep objects and gaps visible")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    ratios = parse_aspect_ratios(aspect_ratios)
    canvases = {ratio: list(canvas_size(ratio, size, multiple)) for ratio in ratios}  # refuses too-small ones early
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_shards(out_dir)
    start = time.perf_counter()
    train_shards, train_captions = _write_split(out_dir, "train", train, size, shard_size, seed, ratios, multiple)
    val_shards, _ = _write_split(out_dir, "val", val, size, shard_size, seed, ratios, multiple)
    seconds = time.perf_counter() - start

    tokenizer_captions = train_captions or [caption_of(sample_attrs(i, size)) for i in range(100)]
    Tokenizer.train(tokenizer_captions, vocab_size=vocab_size, context_length=context_length).save(
        out_dir / "tokenizer.json"
    )

    info = {
        "dataset": "shapes",
        "seed": seed,
        "image_size": size,
        **({"aspect_ratios": list(ratios), "canvases": canvases} if ratios != ASPECT_RATIOS else {}),
        "shard_size": shard_size,
        "counts": {"train": train, "val": val},
        "shards": {"train": train_shards, "val": val_shards},
        "urls": {"train": split_urls(out_dir, train_shards, "train"), "val": split_urls(out_dir, val_shards, "val")},
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
