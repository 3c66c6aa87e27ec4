"""Aspect-ratio buckets: train at any aspect ratio with batches of one size (kohya's and mosaic's buckets, SDXL).

SDXL (Podell et al. 2023, sec. 2.3 and app. I) partitions the data into buckets of about 1024**2 pixels whose
sides are multiples of 64, draws every batch from one bucket, and conditions the model on each sample's
original size, crop offset and bucket (sec. 2.2's micro-conditioning), so cropping and upscaling cost little.

- `make_buckets`: the bucket list, computed once; with base 1024 and step 64 it is SDXL's published list.
- `nearest_bucket`: a sample goes to the bucket nearest in log aspect ratio.
- `cover_crop` / `apply`: resize to cover the bucket, then crop the overflow (center or random); the plan
  carries SDXL's conditioning: original size, crop top-left, target size.
- `BucketConfig`: the data module's knobs, validated, with `assign` reporting the images worth counting.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

ASSIGN_REASONS = ("small", "aspect_out_of_range")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def make_buckets(base_size: int, min_aspect: float = 0.25, max_aspect: float = 4.0, step: int = 64,
                 divisor: int | None = None, min_area_ratio: float = 0.9) -> list[tuple[int, int]]:
    """(height, width) buckets of at most base_size**2 pixels, sides on the `step` grid, sorted by width/height.

    The rule: every grid pair (h, w) with min_area_ratio * base**2 <= h * w <= base**2 and
    min_aspect <= w / h <= max_aspect, plus the square bucket, plus for each height its widest width under
    base**2 (and the transpose), so that a grid too coarse for the band still covers every height.
    With base 1024, step 64, aspects 1/4..4 this is SDXL's 41 buckets exactly (any ratio in
    (0.8984, 0.9023] gives them: 0.9 is the round number that does). `divisor` is what the model needs every
    side to divide by (VAE factor x patch x downsamplings); `step` must be a multiple of it.
    """
    divisor = step if divisor is None else divisor
    for name, value in (("base_size", base_size), ("step", step), ("divisor", divisor)):
        _positive_int(name, value)
    if step % divisor:
        raise ValueError(f"step ({step}) must be a multiple of divisor ({divisor}): every side must divide by it")
    if base_size < step:
        raise ValueError(f"base_size ({base_size}) must be at least step ({step}): no bucket fits otherwise")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError(f"need 0 < min_aspect <= 1 <= max_aspect (the square bucket is always there), "
                         f"got min_aspect={min_aspect}, max_aspect={max_aspect}")
    if not 0 < min_area_ratio <= 1:
        raise ValueError(f"min_area_ratio must be in (0, 1], got {min_area_ratio}")

    area = base_size**2
    side = base_size // step * step  # the largest grid square within base**2
    found = {(side, side)}
    # taller than sqrt(area / min_aspect), a bucket would be narrower than min_aspect or larger than base**2
    for h in range(step, math.isqrt(int(area / min_aspect)) + 1, step):
        w_max = area // h // step * step  # the widest width with h * w <= base**2
        w_min = math.ceil(min_area_ratio * area / h / step) * step  # the narrowest width still in the band
        for w in range(max(step, min(w_min, w_max)), w_max + 1, step):
            found |= {(h, w), (w, h)}
    found = {(h, w) for h, w in found if min_aspect <= w / h <= max_aspect}
    return sorted(found, key=lambda hw: (hw[1] / hw[0], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket nearest in log aspect ratio, |log(w/h) - log(bw/bh)|; ties go to the smaller index.

    Compared as exact fractions (max/min of w*bh and h*bw is exp of that distance), so ties are real ties and
    the answer never depends on float rounding."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets")

    # |log(w/h) - log(bw/bh)| = log(max(a, b) / min(a, b)) with a = w*bh, b = h*bw: compared as integer cross
    # products, so ties are real ties and the answer never depends on float rounding
    best, best_num, best_den = 0, None, None
    for i, (bh, bw) in enumerate(buckets):
        a, b = width * bh, height * bw
        num, den = max(a, b), min(a, b)
        if best_num is None or num * best_den < best_num * den:
            best, best_num, best_den = i, num, den
    return best


@dataclass(frozen=True)
class CropPlan:
    original_size: tuple[int, int]  # (h, w) of the source image: SDXL's c_size
    resized_size: tuple[int, int]  # (h, w) after the cover resize, both >= the target's
    crop_top_left: tuple[int, int]  # (top, left) in resized pixels: SDXL's c_crop
    target_size: tuple[int, int]  # (h, w) of the bucket: SDXL's c_ar


def cover_crop(height: int, width: int, bucket: tuple[int, int], mode: str = "center",
               rng: random.Random | None = None) -> CropPlan:
    """Resize (h, w) to cover the bucket, keeping the aspect ratio, then crop the overflow: the least we can lose.

    Only the axis whose aspect overshoots the bucket's overflows (the other fits exactly); the offset is that
    axis's center or uniform over every position. `rng` is required for "random": a hidden global generator
    would make data order depend on what else drew from it."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if mode not in ("center", "random"):
        raise ValueError(f"mode must be 'center' or 'random', got {mode!r}")
    if mode == "random" and rng is None:
        raise ValueError("mode='random' needs an rng (random.Random), for reproducible crops")
    bh, bw = bucket
    scale = max(bh / height, bw / width)
    # round to the nearest pixel, but never below the bucket (float error could give bh - 1e-12 -> bh - 1)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    if mode == "center":
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    return CropPlan((height, width), (rh, rw), (top, left), (bh, bw))


def apply(plan: CropPlan, image: Image.Image) -> Image.Image:
    """The plan on a PIL image: bicubic resize and crop in one call, sampling only the kept region (the box is
    the crop mapped back into source pixels). Returns exactly the bucket's size. The image may be the original
    decoded at a reduced scale (a JPEG's draft mode): the box is then scaled with it."""
    h, w = plan.original_size
    if abs(image.size[0] * h - image.size[1] * w) > max(h, w):  # other than a rounded-down scaled copy
        raise ValueError(f"image is {image.size[1]}x{image.size[0]} (h x w), the plan was made for {h}x{w}")
    (rh, rw), (top, left), (bh, bw) = plan.resized_size, plan.crop_top_left, plan.target_size
    sy, sx = image.size[1] / rh, image.size[0] / rw  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
    return image.resize((bw, bh), Image.Resampling.BICUBIC, box=box)


@dataclass(frozen=True)
class BucketConfig:
    base_size: int = 256  # buckets hold about base_size**2 pixels (SDXL: 1024)
    min_aspect: float = 0.25  # the narrowest bucket, width / height; narrower images are cropped into it
    max_aspect: float = 4.0  # the widest bucket; wider images are cropped into it (SDXL: 1/4 .. 4)
    step: int = 64  # every side a multiple of this: VAE factor x patch size x U-Net downsamplings must divide it
    crop: str = "random"  # "random" to train (SDXL conditions on the offset), "center" for evaluation
    small: str = "upscale"  # images that must be upscaled to cover their bucket: "upscale" (size-conditioning
    #                         tells the model they were small, SDXL sec. 2.2) or "skip" (SD 1.x's choice)
    sizes: tuple | None = None  # an explicit bucket list [[h, w], ...] instead of the generated one (sides still
    #                             multiples of `step`; aspect range from the list)

    def __post_init__(self):
        if self.crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {self.crop!r}")
        if self.small not in ("upscale", "skip"):
            raise ValueError(f"small must be 'upscale' or 'skip', got {self.small!r}")
        self.buckets  # validates base_size, step and the aspect range, naming the field, at construction

    @cached_property
    def buckets(self) -> list[tuple[int, int]]:
        if self.sizes is None:
            return make_buckets(self.base_size, self.min_aspect, self.max_aspect, self.step)
        sizes = sorted({(int(h), int(w)) for h, w in self.sizes}, key=lambda hw: (hw[1] / hw[0], hw[0]))
        bad = [hw for hw in sizes if min(hw) <= 0 or hw[0] % self.step or hw[1] % self.step]
        if not sizes or bad:
            raise ValueError(f"sizes: every bucket [h, w] must have positive sides that are multiples of step "
                             f"{self.step}; got {bad or 'none'}")
        return sizes

    @property
    def aspect_range(self) -> tuple[float, float]:
        """The narrowest and widest aspect ratio (w / h) that a bucket holds without extra cropping."""
        if self.sizes is None:
            return self.min_aspect, self.max_aspect
        return self.buckets[0][1] / self.buckets[0][0], self.buckets[-1][1] / self.buckets[-1][0]

    def assign(self, height: int, width: int) -> tuple[int, str | None]:
        """(bucket index, reason or None). "small": the cover resize would upscale (a side shorter than the
        bucket's; this includes every image with fewer pixels than its bucket), so the caller upscales or
        skips it per `small`. "aspect_out_of_range": outside [min_aspect, max_aspect], cropped into the
        nearest (end) bucket, losing more than usual. "small" wins when both hold, since it may drop the image."""
        i = nearest_bucket(height, width, self.buckets)
        bh, bw = self.buckets[i]
        if height < bh or width < bw:
            return i, "small"
        lo, hi = self.aspect_range
        if not lo <= width / height <= hi:
            return i, "aspect_out_of_range"
        return i, None
