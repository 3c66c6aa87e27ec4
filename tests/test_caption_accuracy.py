import copy
import random

import numpy as np
import pytest
import torch

from lit_diffusion.data.shapes import COLORS, RELATIONS, SHAPES, render, sample_attrs
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
    with pytest.raises(ValueError, match="do not match"):
        metric.update(images, attrs[:3])
    with pytest.raises(ValueError, match="objects"):
        check_image(images[0], {})
