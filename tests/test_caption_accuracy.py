import copy
import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lit_diffusion.data.shapes import COLORS, RELATIONS, SHAPES, render, sample_attrs, write_shapes
from lit_diffusion.metrics.caption_accuracy import ATTRIBUTES, CaptionAccuracy, check_image, detect_objects

OPPOSITE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def to_tensor(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255  # [3, H, W] in [0, 1]


def draw(n, size, seed, two_objects=None):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        attrs = sample_attrs(rng, size)
        if two_objects is None or (attrs["relation"] is not None) == two_objects:
            out.append(attrs)
    return out


@pytest.mark.parametrize("size", [32, 64])
def test_real_shapes_images_score_perfectly(size):
    attrs = draw(300, size, seed=size)
    metric = CaptionAccuracy()
    for start in range(0, len(attrs), 50):
        batch = attrs[start:start + 50]
        metric.update(torch.stack([to_tensor(render(a, size)) for a in batch]), batch)
    per_attribute = metric.attribute_accuracy()
    assert metric.compute().item() == 1.0, per_attribute  # 300 of 300 (also 1000/1000 at both sizes offline)
    assert all(per_attribute[k] == 1.0 for k in ATTRIBUTES)


def test_detect_objects_recovers_attributes():
    attrs = {"caption": "", "relation": "left of", "image_size": 64, "objects": [
        {"shape": "triangle", "color": "purple", "size": "large", "cx": 0.32, "cy": 0.5, "r": 0.26},
        {"shape": "circle", "color": "cyan", "size": "small", "cx": 0.8, "cy": 0.45, "r": 0.14},
    ]}
    found = detect_objects(to_tensor(render(attrs, 64)))
    assert [(o["color"], o["shape"], o["size"]) for o in found] == [("purple", "triangle", "large"),
                                                                      ("cyan", "circle", "small")]
    assert found[1]["cx"] == pytest.approx(0.8, abs=1 / 64) and found[1]["cy"] == pytest.approx(0.45, abs=1 / 64)
    assert found[1]["r"] == pytest.approx(0.14, abs=1 / 64)
    # a triangle's centroid sits below its box centre (2/3 of the way down)
    assert found[0]["cy"] > 0.5


def test_noisy_renders_still_pass():
    attrs = draw(60, 32, seed=5)
    g = torch.Generator().manual_seed(0)
    images = torch.stack([to_tensor(render(a, 32)) for a in attrs])
    metric = CaptionAccuracy()
    metric.update((images + 0.08 * torch.randn(images.shape, generator=g)).clamp(0, 1), attrs)
    assert metric.compute().item() == 1.0


def _wrong(attrs, field, value, index=0):
    bad = copy.deepcopy(attrs)
    bad["objects"][index][field] = value
    return bad


def test_wrong_images_are_incorrect():
    for attrs in draw(20, 32, seed=11):
        image = to_tensor(render(attrs, 32))
        obj = attrs["objects"][0]
        used = {o["color"] for o in attrs["objects"]}
        other_color = next(c for c in COLORS if c not in used)
        other_shape = next(s for s in SHAPES if s != obj["shape"])
        other_size = "large" if obj["size"] == "small" else "small"

        wrong_color = check_image(to_tensor(render(_wrong(attrs, "color", other_color), 32)), attrs)
        assert not wrong_color["colors"] and not wrong_color["correct"]
        wrong_shape = check_image(to_tensor(render(_wrong(attrs, "shape", other_shape), 32)), attrs)
        assert wrong_shape["colors"] and not wrong_shape["shapes"] and not wrong_shape["correct"]
        # the caption asks for the other size (re-rendering a bigger object could break the layout)
        asked = _wrong(attrs, "size", other_size)
        wrong_size = check_image(image, asked)
        assert wrong_size["shapes"] and not wrong_size["sizes"] and not wrong_size["correct"]

        blank = check_image(torch.ones(3, 32, 32), attrs)
        assert not blank["count"] and not blank["colors"] and not blank["correct"]


def test_swapped_relation_is_incorrect():
    for attrs in draw(20, 64, seed=12, two_objects=True):
        image = to_tensor(render(attrs, 64))
        assert check_image(image, attrs)["correct"]
        swapped = dict(attrs, relation=OPPOSITE[attrs["relation"]])
        result = check_image(image, swapped)
        assert result["colors"] and result["shapes"] and not result["relation"] and not result["correct"]
        # a perpendicular relation is not the dominant direction either
        perpendicular = next(r for r in RELATIONS if r not in (attrs["relation"], OPPOSITE[attrs["relation"]]))
        assert not check_image(image, dict(attrs, relation=perpendicular))["relation"]


def test_missing_second_object_and_extra_object():
    two = draw(1, 32, seed=13, two_objects=True)[0]
    only_first = dict(two, relation=None, objects=two["objects"][:1])
    result = check_image(to_tensor(render(only_first, 32)), two)
    assert not result["count"] and not result["relation"] and not result["correct"]
    extra = check_image(to_tensor(render(two, 32)), only_first)
    assert not extra["count"] and extra["shapes"] and not extra["correct"]


def test_metric_fraction_and_errors():
    attrs = draw(8, 32, seed=14)
    images = torch.stack([to_tensor(render(a, 32)) for a in attrs])
    images[:2] = 1.0  # two blank images
    metric = CaptionAccuracy()
    metric.update(images, attrs)
    assert metric.compute().item() == pytest.approx(6 / 8)
    per_attribute = metric.attribute_accuracy()
    assert per_attribute["count"] == pytest.approx(6 / 8)
    # by kind: the blanks are wrong for either kind of caption
    kinds = [len(a["objects"]) for a in attrs]
    for kind, objects in (("one_object", 1), ("two_objects", 2)):
        expected = sum(k == objects for k in kinds[2:]) / sum(k == objects for k in kinds)
        assert per_attribute[kind] == pytest.approx(expected)
        assert per_attribute[f"{kind}_count"] == pytest.approx(expected)  # a blank has no object
    with pytest.raises(ValueError, match="do not match"):
        metric.update(images, attrs[:3])
    with pytest.raises(ValueError, match="objects"):
        check_image(images[0], {})


# ------------------------------------------------------------------------------------------ non-square images
RATIOS = ("1:1", "3:2", "2:3", "2:1", "1:2")


def _val_images(out):
    """(image [3, H, W], attrs) of every sample in the val shards that `write_shapes` wrote to `out`."""
    for shard in sorted(out.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in files}):
            yield to_tensor(Image.open(io.BytesIO(files[f"{key}.png"]))), json.loads(files[f"{key}.json"])


@pytest.fixture(scope="module")
def non_square_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_ratios")
    write_shapes(out, train=0, val=200, size=32, shard_size=100, seed=0, aspect_ratios=",".join(RATIOS))
    return list(_val_images(out))


def test_non_square_val_images_score_perfectly(non_square_val):
    by_ratio = {}
    for image, attrs in non_square_val:
        assert tuple(image.shape) == (3, attrs["height"], attrs["width"])
        by_ratio.setdefault(attrs["aspect_ratio"], []).append((image, attrs))
    assert sorted(by_ratio) == sorted(RATIOS) and min(len(v) for v in by_ratio.values()) >= 25
    for ratio, samples in by_ratio.items():  # one batch per canvas shape
        metric = CaptionAccuracy()
        metric.update(torch.stack([image for image, _ in samples]), [attrs for _, attrs in samples])
        per_attribute = metric.attribute_accuracy()
        assert metric.compute().item() == 1.0, (ratio, per_attribute)
        assert per_attribute["one_object"] == 1.0 and per_attribute["two_objects"] == 1.0, (ratio, per_attribute)


@pytest.mark.parametrize("ratio", ["2:1", "1:2"])
def test_non_square_renders_at_64_px_score_perfectly(ratio):
    rng = random.Random(ratio)
    for _ in range(60):
        attrs = sample_attrs(rng, 64, ratio)
        result = check_image(to_tensor(render(attrs)), attrs)
        assert result["correct"], (attrs, result)


def test_wrong_captions_are_wrong_on_non_square_images(non_square_val):
    checked = 0
    for image, attrs in non_square_val:
        if attrs["aspect_ratio"] == "1:1":
            continue
        used = {o["color"] for o in attrs["objects"]}
        other_color = next(c for c in COLORS if c not in used)
        recoloured = check_image(image, _wrong(attrs, "color", other_color))
        assert not recoloured["colors"] and not recoloured["correct"]
        other_size = "large" if attrs["objects"][0]["size"] == "small" else "small"
        resized = check_image(image, _wrong(attrs, "size", other_size))
        assert resized["shapes"] and not resized["sizes"] and not resized["correct"]
        if attrs["relation"] is None:
            continue
        swapped = check_image(image, dict(attrs, relation=OPPOSITE[attrs["relation"]]))
        assert swapped["colors"] and swapped["shapes"] and not swapped["relation"] and not swapped["correct"]
        perpendicular = next(r for r in RELATIONS if r not in (attrs["relation"], OPPOSITE[attrs["relation"]]))
        assert not check_image(image, dict(attrs, relation=perpendicular))["correct"]
        checked += 1
    assert checked >= 50


def test_detect_objects_on_a_wide_image():
    # 2:1 at 32 px is 46 x 22: sizes are fractions of the 22-px side, positions of the width and height
    attrs = {"caption": "", "relation": "left of", "image_size": 32, "aspect_ratio": "2:1", "width": 46,
             "height": 22, "objects": [
                 {"shape": "square", "color": "red", "size": "large", "cx": 0.3, "cy": 0.5, "r": 0.26},
                 {"shape": "circle", "color": "blue", "size": "small", "cx": 0.8, "cy": 0.4, "r": 0.14}]}
    image = to_tensor(render(attrs))
    assert tuple(image.shape) == (3, 22, 46)
    found = detect_objects(image)
    assert [(o["color"], o["shape"], o["size"]) for o in found] == [("red", "square", "large"),
                                                                    ("blue", "circle", "small")]
    assert found[0]["r"] == pytest.approx(0.26, abs=1 / 22) and found[1]["r"] == pytest.approx(0.14, abs=1 / 22)
    assert found[0]["cx"] == pytest.approx(0.3, abs=1 / 46) and found[1]["cy"] == pytest.approx(0.4, abs=1 / 22)
    assert check_image(image, attrs)["correct"]


def test_relation_is_read_in_pixels():
    # on a 46 x 22 canvas the first circle is 0.3 of the width (13.8 px) left of the second and 0.5 of the height
    # (11 px) above it: in pixels "left of" dominates, though in fractions of the sides "above" would
    attrs = {"caption": "", "relation": "left of", "image_size": 32, "aspect_ratio": "2:1", "width": 46,
             "height": 22, "objects": [
                 {"shape": "circle", "color": "green", "size": "small", "cx": 0.3, "cy": 0.25, "r": 0.14},
                 {"shape": "circle", "color": "purple", "size": "small", "cx": 0.6, "cy": 0.75, "r": 0.14}]}
    image = to_tensor(render(attrs))
    assert check_image(image, attrs)["correct"]
    assert not check_image(image, dict(attrs, relation="above"))["relation"]
    # the same layout on the transposed canvas (22 x 46) reads the other way round
    tall = dict(attrs, relation="above", aspect_ratio="1:2", width=22, height=46, objects=[
        dict(o, cx=o["cy"], cy=o["cx"]) for o in attrs["objects"]])
    image = to_tensor(render(tall))
    assert tuple(image.shape) == (3, 46, 22)
    assert check_image(image, tall)["correct"] and not check_image(image, dict(tall, relation="left of"))["relation"]


def test_objects_cut_by_the_border_are_counted_apart_from_correctness(tmp_path):
    """Real images keep a margin of background (no object at the border); an object drawn past the edge is cut."""
    from lit_diffusion.data.shapes import render, sample_attrs
    from lit_diffusion.metrics.caption_accuracy import CaptionAccuracy

    metric = CaptionAccuracy()
    for seed in range(40):
        attrs = sample_attrs(seed, 32, "1:1,2:1,1:2", multiple=8)
        image = torch.from_numpy(np.array(render(attrs))).permute(2, 0, 1).float() / 255
        assert not check_image(image, attrs)["cut"]
        metric.update(image[None], [attrs])
        moved = {**attrs, "objects": [{**o, "cx": 0.02} for o in attrs["objects"]]}  # centres on the left edge
        cut = torch.from_numpy(np.array(render(moved))).permute(2, 0, 1).float() / 255
        assert check_image(cut, attrs)["cut"]
    assert metric.attribute_accuracy()["cut"] == 0.0
