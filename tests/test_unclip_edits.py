"""Text-diff edit accuracy (`evaluation/edits.py`): the counting, checked against hand-computed values with fake
edits on rendered shapes images (an edit that returns the rendered target, one that returns the source, one that
does only colour edits, one that blanks the image), the per-theta curve, the deterministic choice of the new value,
and the two wrappers around UnCLIP (its edit at guidance 3, and the regenerate-from-the-caption baseline)."""

import numpy as np
import pytest
import torch

from lit_diffusion.data.shapes import COLORS, SHAPES, SIZES, render, sample_attrs
from lit_diffusion.evaluation.edits import EDITABLE, edit_accuracy, edit_target, regenerate, unclip_edit
from lit_diffusion.metrics.caption_accuracy import check_image


class FakeClip:
    """CLIP's image tower as the raw pixels: identical images have cosine 1."""

    def encode_image(self, x):
        return x.flatten(1)


def _tensor(attrs):
    return torch.from_numpy(np.array(render(attrs))).permute(2, 0, 1).float() / 255


def _data(n_one=4, n_two=2):
    """n_one one-object and n_two two-object val-like images (attrs drawn from seeds), interleaved."""
    one, two, seed = [], [], 0
    while len(one) < n_one or len(two) < n_two:
        a = sample_attrs(seed)
        (one if len(a["objects"]) == 1 else two).append(a)
        seed += 1
    one, two = one[:n_one], two[:n_two]
    attrs = [x for pair in zip(one, two + [None] * n_one) for x in pair if x is not None]
    keys = [f"{i:06d}" for i in range(len(attrs))]
    return torch.stack([_tensor(a) for a in attrs]), attrs, keys


def _target_of(image, old, new, attrs, keys):
    """The rendered target attrs of the edit old -> new (the test's look-up from captions to attrs)."""
    for a, k in zip(attrs, keys):
        if len(a["objects"]) == 1 and a["caption"] == old:
            for attribute in EDITABLE:
                t = edit_target(a, attribute, k)
                if t["caption"] == new:
                    return t
    raise AssertionError(f"no edit {old!r} -> {new!r}")


def test_edit_target_changes_one_attribute_deterministically_by_key():
    a = next(x for x in (sample_attrs(s) for s in range(50)) if len(x["objects"]) == 1)
    for attribute, (field, values, _) in EDITABLE.items():
        t = edit_target(a, attribute, "000001")
        assert t == edit_target(a, attribute, "000001")  # the same key: the same new value
        assert t["objects"][0][field] != a["objects"][0][field] and t["objects"][0][field] in values
        assert all(t["objects"][0][f] == a["objects"][0][f] for f, _, _ in EDITABLE.values() if f != field)
        assert t["objects"][0]["r"] == SIZES[t["objects"][0]["size"]]  # a size edit resizes the box too
        assert t["caption"] != a["caption"] and t["relation"] is None
        drawn = {edit_target(a, attribute, f"{k:06d}")["objects"][0][field] for k in range(200)}
        assert drawn == set(values) - {a["objects"][0][field]}  # uniform over the others: all of them, over keys
    assert edit_target(a, "color", "k")["caption"] == "a {size} {color} {shape}".format(
        **edit_target(a, "color", "k")["objects"][0])
    two = next(x for x in (sample_attrs(s) for s in range(50)) if len(x["objects"]) == 2)
    with pytest.raises(ValueError, match="one-object"):
        edit_target(two, "color", "k")
    with pytest.raises(ValueError, match="unknown attribute"):
        edit_target(a, "relation", "k")


def test_an_edit_that_renders_the_target_scores_one():
    images, attrs, keys = _data()
    calls = []

    def perfect(image, old, new, seed):
        calls.append((old, new, seed))
        return _tensor(_target_of(image, old, new, attrs, keys))

    res = edit_accuracy(perfect, images, attrs, keys, FakeClip())
    assert (res["images"], res["edits"], res["skipped"]) == (4, 12, 2)
    assert len(calls) == 12 and len({c[2] for c in calls}) == 12  # one seed per edit
    for summary in [res["overall"], *res["attributes"].values()]:
        assert (summary["success"], summary["kept"], summary["correct"]) == (1.0, 1.0, 1.0)
        assert summary["judge"]["count"] == 1.0 and summary["judge"]["colors"] == 1.0
    # the exact edit is where the exact edit is
    assert all(r["checks"]["offset"] == 0.0 for r in res["records"]) and res["overall"]["placed"] == 1.0
    assert res["overall"]["correct_placed"] == 1.0 and res["overall"]["correct_placed_count"] == 12
    assert res["attributes"]["color"]["success_count"] == 4 and res["overall"]["correct_count"] == 12
    assert res["source_correct"] == 1.0 and "per_theta" not in res
    # the same figures again: deterministic
    assert edit_accuracy(perfect, images, attrs, keys, FakeClip())["records"] == res["records"]


def test_an_edit_that_returns_the_source_keeps_everything_and_succeeds_nowhere():
    images, attrs, keys = _data()
    res = edit_accuracy(lambda image, old, new, seed: image[0], images, attrs, keys, FakeClip(), images_limit=3)
    assert (res["images"], res["edits"]) == (3, 9)
    for summary in [res["overall"], *res["attributes"].values()]:
        assert (summary["success"], summary["kept"], summary["correct"], summary["success_count"]) == (0, 1, 0, 0)
        assert summary["similarity"] == pytest.approx(1.0)
    # the source is where colour edits put the object; shape and size edits move the centroid a little (a
    # triangle's sits low in its box; a grown object near the border moves inward)
    assert res["attributes"]["color"]["offset"] == 0.0 and res["attributes"]["color"]["placed"] == 1.0
    assert 0 < res["attributes"]["shape"]["offset"] < 0.1 and res["attributes"]["size"]["offset"] < 0.2
    # check_image against the NEW attrs: a colour edit not made fails colours (and, matched by colour, the rest)
    assert res["attributes"]["color"]["judge"]["colors"] == 0.0
    assert res["attributes"]["shape"]["judge"] == {"count": 1.0, "colors": 1.0, "shapes": 0.0, "sizes": 1.0,
                                                   "relation": 1.0}


def test_mixed_edits_are_counted_per_attribute_and_per_theta():
    images, attrs, keys = _data()
    blank = torch.ones(3, 32, 32)

    def colour_only(image, old, new, seed):
        target = _target_of(image, old, new, attrs, keys)
        source = next(a for a in attrs if a["caption"] == old)
        changed = target["objects"][0]["color"] != source["objects"][0]["color"]
        # frames at thetas (0, 0.5, 1): the source, the edit (colour edits only, else the source), a blank canvas
        return torch.stack([image[0], _tensor(target) if changed else image[0], blank])

    res = edit_accuracy(colour_only, images, attrs, keys, FakeClip(), thetas=(0.0, 0.5, 1.0), frame=1)
    assert res["theta"] == 0.5 and res["frame"] == 1
    att = res["attributes"]
    assert (att["color"]["success"], att["color"]["kept"], att["color"]["correct"]) == (1.0, 1.0, 1.0)
    for a in ("shape", "size"):
        assert (att[a]["success"], att[a]["kept"], att[a]["correct"]) == (0.0, 1.0, 0.0)
    o = res["overall"]
    assert (o["success_count"], o["kept_count"], o["correct_count"], o["edits"]) == (4, 12, 4, 12)
    assert o["correct_placed_count"] == 4 and o["placed"] > 0.5  # the colour edits are exact
    assert o["success"] == pytest.approx(1 / 3) and o["correct"] == pytest.approx(1 / 3)
    assert att["shape"]["similarity"] == pytest.approx(1.0) and att["color"]["similarity"] < 1.0
    pt = res["per_theta"]
    assert list(pt) == [0.0, 0.5, 1.0]
    assert (pt[0.0]["overall"]["success"], pt[0.0]["overall"]["kept"]) == (0.0, 1.0)
    assert pt[0.5]["overall"] == o
    # nothing detected: neither the asked value nor the kept attributes
    assert (pt[1.0]["overall"]["success"], pt[1.0]["overall"]["kept"], pt[1.0]["overall"]["judge"]["count"]) == \
        (0.0, 0.0, 0.0)
    assert pt[1.0]["overall"]["placed"] == 0.0 and pt[1.0]["overall"]["offset"] != pt[1.0]["overall"]["offset"]  # nan
    # `correct` is check_image(edit, new attrs)["correct"] on one-object images
    for r in res["records"]:
        assert r["checks"]["correct"] == (r["checks"]["success"] and r["checks"]["kept"])
    with pytest.raises(ValueError, match="thetas"):
        edit_accuracy(colour_only, images, attrs, keys, FakeClip(), thetas=(0.0, 1.0))


def test_an_extra_object_is_not_kept():
    images, attrs, keys = _data(n_one=1, n_two=0)
    target = edit_target(attrs[0], "size", keys[0])
    # the asked size, but beside a second object of another colour in the opposite corner
    main = target["objects"][0]
    other = {"shape": "square", "color": next(c for c in COLORS if c != main["color"]), "size": "small",
             "cx": 0.82 if main["cx"] < 0.5 else 0.18, "cy": 0.82 if main["cy"] < 0.5 else 0.18, "r": SIZES["small"]}
    extra = {**target, "objects": [target["objects"][0], other]}
    img = _tensor(extra)
    assert not check_image(img, target)["count"]
    res = edit_accuracy(lambda image, old, new, seed: img, images, attrs, keys, FakeClip(), attributes=("size",))
    r = res["records"][0]["checks"]
    if main["r"] > other["r"]:  # the main object is the largest: the target's, at its place
        assert r["offset"] == 0.0
    else:  # the other one, in the opposite corner
        assert r["offset"] > 0.2
    assert r["kept"] is False and r["correct"] is False and r["count"] is False
    assert set(res["attributes"]) == {"size"}
    with pytest.raises(ValueError, match="unknown attribute"):
        edit_accuracy(lambda *a: img, images, attrs, keys, FakeClip(), attributes=("relation",))
    assert SHAPES  # the module's values are the data's


class FakeUnCLIP:
    def __init__(self):
        self.calls = []
        self.decoder = type("D", (), {"device": torch.device("cpu")})()

    def edit(self, image, old, new, **kw):
        self.calls.append(("edit", old, new, kw))
        return image.expand(6, -1, -1, -1)

    def generate(self, prompts, **kw):
        self.calls.append(("generate", prompts, kw))
        return torch.ones(len(prompts), 3, kw["height"], kw["width"])


def test_the_wrappers_call_unclip_at_guidance_three():
    u = FakeUnCLIP()
    image = torch.zeros(1, 3, 32, 32)
    assert unclip_edit(u)(image, "a large red circle", "a large blue circle", 7).shape == (6, 3, 32, 32)
    assert u.calls[-1] == ("edit", "a large red circle", "a large blue circle", {"guidance": 3.0})
    assert regenerate(u)(image, "a large red circle", "a large blue circle", 7).shape == (1, 3, 32, 32)
    assert u.calls[-1] == ("generate", ["a large blue circle"], {"seed": [7], "guidance": 3.0, "height": 32,
                                                                  "width": 32})


def test_the_report_line_gives_each_attribute_and_the_overall_figures():
    from lit_diffusion.evaluation.report import _unclip_lines

    images, attrs, keys = _data(n_one=2, n_two=0)
    edits = edit_accuracy(lambda image, old, new, seed: image[0].expand(2, -1, -1, -1), images, attrs, keys,
                          FakeClip(), thetas=(0.0, 0.5))
    unclip = {"systems": {}, "compare": "x", "diversity": {"guidance": 3.0, "per_caption": 2},
              "variations": {"guidance": 3.0, "sources": 2, "variations": 4},
              "edits": {**{k: v for k, v in edits.items() if k != "records"}, "guidance": 3.0}}
    line = _unclip_lines(unclip, [], [])[-1]
    assert line.startswith("Text-diff edits at guidance 3, theta 0.5 (2 one-object val images, 6 edits): ")
    assert "color success 0, kept 1, correct 0, placed 1, similarity 1" in line
    assert "overall success 0, kept 1" in line
