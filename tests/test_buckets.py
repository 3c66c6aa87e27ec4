"""Aspect-ratio buckets: the bucket list against SDXL's, nearest-bucket assignment, cover-resize-and-crop plans
(a property test over random sizes), `apply` on PIL images, and `BucketConfig`'s reasons and validation."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from lit_diffusion.data.buckets import BucketConfig, CropPlan, apply, cover_crop, make_buckets, nearest_bucket

# SDXL's 1024**2 buckets as (height, width), app. I of Podell et al. 2023 as copied in many repositories (each
# pair is checked against the rule below, not trusted). Some copies have 40 rows, lacking (1344, 704).
SDXL_BUCKETS = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


# ------------------------------------------------------------------------------------------------- make_buckets


def test_sdxl_list_obeys_the_rule():
    """Every published pair is on the 64 grid, within 1/4..4, and in the area band [0.9, 1] * 1024**2."""
    assert len(set(SDXL_BUCKETS)) == len(SDXL_BUCKETS) == 41
    for h, w in SDXL_BUCKETS:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.25 <= w / h <= 4
        assert 0.9 * 1024**2 <= h * w <= 1024**2
    assert set(SDXL_BUCKETS) == {(w, h) for h, w in SDXL_BUCKETS}  # mirror-symmetric


def test_make_buckets_reproduces_sdxl():
    buckets = make_buckets(1024, 0.25, 4.0, step=64)
    assert buckets == sorted(SDXL_BUCKETS, key=lambda hw: hw[1] / hw[0])  # same pairs, same order (by w/h)
    assert buckets[0] == (2048, 512) and buckets[-1] == (512, 2048) and (1024, 1024) in buckets


@pytest.mark.parametrize("ratio, same", [(0.899, True), (0.9023, True), (0.898, False), (0.903, False)])
def test_only_a_narrow_area_band_gives_sdxl(ratio, same):
    # (640, 1472) has 0.8984 * 1024**2 pixels, SDXL's smallest bucket (704, 1344) has 0.9023
    assert (make_buckets(1024, min_area_ratio=ratio) == sorted(SDXL_BUCKETS, key=lambda hw: hw[1] / hw[0])) == same


@pytest.mark.parametrize("base, step", [(512, 32), (256, 16)])
def test_scaling_base_and_step_together_scales_sdxl(base, step):
    k = 1024 // base
    assert make_buckets(base, step=step) == [(h // k, w // k) for h, w in make_buckets(1024, step=64)]


@pytest.mark.parametrize("base, step, lo, hi", [(1024, 64, 0.25, 4), (512, 32, 0.25, 4), (256, 64, 0.25, 4),
                                                 (512, 64, 0.5, 2), (256, 32, 1 / 3, 3), (100, 64, 0.25, 4),
                                                 (32, 8, 0.25, 4), (1000, 48, 0.2, 5)])
def test_bucket_properties(base, step, lo, hi):
    buckets = make_buckets(base, lo, hi, step=step)
    assert len(set(buckets)) == len(buckets)
    side = base // step * step
    assert (side, side) in buckets
    aspects = [w / h for h, w in buckets]
    assert aspects == sorted(aspects)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and lo <= w / h <= hi
        assert h * w <= base**2
        if (h, w) != (side, side):  # in the band, or the widest width under base**2 (< one grid step short)
            assert h * w >= min(0.9 * base**2, base**2 - step * max(h, w) + 1)
    if base >= 16 * step:
        assert all(h * w >= 0.9 * base**2 for h, w in buckets)


def test_coarse_grid_still_covers_every_height():
    # at 256 px on a 64 grid, no width puts h=384 within 10% of 256**2: the widest under it (128) stands in
    assert make_buckets(256) == [(512, 128), (448, 128), (384, 128), (320, 192), (256, 256), (192, 320),
                                 (128, 384), (128, 448), (128, 512)]
    assert make_buckets(100, step=64) == [(128, 64), (64, 64), (64, 128)]


def test_divisor_must_divide_step():
    assert make_buckets(256, step=64, divisor=16) == make_buckets(256, step=64)
    with pytest.raises(ValueError, match="divisor"):
        make_buckets(256, step=32, divisor=64)


# ----------------------------------------------------------------------------------------------- nearest_bucket

SDXL_SORTED = make_buckets(1024)


@pytest.mark.parametrize("height, width, expected", [
    (1080, 1920, (768, 1344)),  # 16:9 landscape (1.778): 1.75 beats 1.909
    (1920, 1080, (1344, 768)),  # 9:16 portrait
    (1350, 1080, (1152, 896)),  # 4:5 portrait (0.8): 0.778 (log-distance 0.0282) beats 0.824 (0.0290)
    (1000, 750, (1152, 896)),
    (750, 1000, (896, 1152)),  # 4:3 landscape
    (512, 512, (1024, 1024)),
    (360, 4000, (512, 2048)),  # a panorama past the widest bucket goes to it
    (4000, 360, (2048, 512)),
])
def test_nearest_bucket(height, width, expected):
    assert SDXL_SORTED[nearest_bucket(height, width, SDXL_SORTED)] == expected


def test_nearest_bucket_ties_go_to_the_smaller_index():
    # a square image is exactly as far (log 2) from 1:2 as from 2:1
    assert nearest_bucket(100, 100, [(128, 64), (64, 128)]) == 0
    assert nearest_bucket(100, 100, [(64, 128), (128, 64)]) == 0
    assert nearest_bucket(100, 100, [(64, 128), (128, 64), (64, 64), (32, 32)]) == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000))
def test_nearest_bucket_is_the_argmin(height, width):
    i = nearest_bucket(height, width, SDXL_SORTED)
    d = [abs(np.log(width / height) - np.log(bw / bh)) for bh, bw in SDXL_SORTED]
    assert d[i] <= min(d) + 1e-12


# --------------------------------------------------------------------------------------------------- cover_crop


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6000), st.integers(1, 6000), st.sampled_from(make_buckets(256)),
       st.sampled_from(["center", "random"]), st.integers(0, 2**32))
def test_cover_crop_covers_and_loses_no_more_than_needed(height, width, bucket, mode, seed):
    plan = cover_crop(height, width, bucket, mode, random.Random(seed))
    (rh, rw), (top, left), (bh, bw) = plan.resized_size, plan.crop_top_left, plan.target_size
    assert plan.original_size == (height, width) and plan.target_size == bucket
    assert rh >= bh and rw >= bw  # covers the bucket
    assert rh == bh or rw == bw  # and fits it exactly along one axis: only the other one is cropped
    scale = max(bh / height, bw / width)
    assert abs(rh - height * scale) <= 0.5 + 1e-6 and abs(rw - width * scale) <= 0.5 + 1e-6  # aspect kept
    assert 0 <= top <= rh - bh and 0 <= left <= rw - bw
    if mode == "center":  # the margins on either side differ by at most one pixel
        assert abs((rh - bh - top) - top) <= 1 and abs((rw - bw - left) - left) <= 1


def test_center_crop():
    plan = cover_crop(300, 1000, (256, 256))  # scale 256/300: 1000 -> 853, 597 px to crop from a 853 width
    assert plan == CropPlan((300, 1000), (256, 853), (0, 298), (256, 256))
    assert cover_crop(512, 128, (512, 128)) == CropPlan((512, 128), (512, 128), (0, 0), (512, 128))


def test_random_crop_is_seeded_and_reaches_both_ends():
    def lefts(seed):
        rng = random.Random(seed)
        return [cover_crop(100, 300, (64, 128), "random", rng).crop_top_left for _ in range(1000)]

    draws = lefts(0)
    assert draws == lefts(0) and draws != lefts(1)
    assert {top for top, _ in draws} == {0}  # resized to (64, 192): nothing to crop vertically
    assert {left for _, left in draws} == set(range(65))  # every offset 0..64, both ends included
    with pytest.raises(ValueError, match="rng"):
        cover_crop(100, 300, (64, 128), "random")
    with pytest.raises(ValueError, match="mode"):
        cover_crop(100, 300, (64, 128), "top")


# -------------------------------------------------------------------------------------------------------- apply


def _smooth_image(height, width):
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(3))


@pytest.mark.parametrize("bucket", make_buckets(256))
@pytest.mark.parametrize("mode", ["center", "random"])
def test_apply_gives_the_bucket_and_matches_resize_then_crop(bucket, mode):
    image = _smooth_image(300, 500)
    plan = cover_crop(300, 500, bucket, mode, random.Random(0))
    out = apply(plan, image)
    assert out.size == (bucket[1], bucket[0])  # PIL sizes are (w, h)
    (rh, rw), (top, left) = plan.resized_size, plan.crop_top_left
    two_steps = image.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + bucket[1], top + bucket[0]))
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(two_steps, dtype=int))
    assert diff.max() <= 3 and diff.mean() < 0.1  # the same pixels, up to PIL's rounding of the box


def test_apply_keeps_the_cropped_side():
    # left half black, right half white; a random crop from the right end of a wide image is all white
    image = Image.new("L", (400, 100))
    image.paste(255, (200, 0, 400, 100))
    plan = CropPlan((100, 400), (64, 256), (0, 192), (64, 64))
    assert np.asarray(apply(plan, image)).min() >= 250
    assert np.asarray(apply(CropPlan((100, 400), (64, 256), (0, 0), (64, 64)), image)).max() <= 5


def test_apply_rejects_the_wrong_image():
    with pytest.raises(ValueError, match="plan was made for 100x400"):
        apply(cover_crop(100, 400, (64, 64)), Image.new("RGB", (100, 400)))


# ------------------------------------------------------------------------------------------------- BucketConfig


def test_assign_reasons():
    config = BucketConfig(base_size=256, step=64)
    square = config.buckets.index((256, 256))
    assert config.assign(1000, 1000) == (square, None)
    assert config.assign(256, 256) == (square, None)  # exactly the bucket: nothing to upscale
    assert config.assign(255, 256) == (square, "small")
    assert config.assign(10, 10) == (square, "small")
    assert config.assign(600, 150) == (0, None)  # exactly 1:4, the narrowest bucket
    assert config.assign(1000, 20000) == (len(config.buckets) - 1, "aspect_out_of_range")
    assert config.assign(20000, 1000) == (0, "aspect_out_of_range")
    assert config.assign(100, 5000) == (len(config.buckets) - 1, "small")  # both: small wins, it may be dropped


@pytest.mark.parametrize("kwargs, field", [
    (dict(base_size=0), "base_size"), (dict(base_size=32), "base_size"), (dict(base_size=256.0), "base_size"),
    (dict(step=0), "step"), (dict(min_aspect=0), "min_aspect"), (dict(min_aspect=2.0), "min_aspect"),
    (dict(max_aspect=0.5), "max_aspect"), (dict(crop="middle"), "crop"), (dict(small="shrink"), "small"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BucketConfig(**kwargs)


def test_config_defaults_and_sdxl():
    assert BucketConfig().buckets == make_buckets(256)
    assert BucketConfig(base_size=1024).buckets == sorted(SDXL_BUCKETS, key=lambda hw: hw[1] / hw[0])
