import copy

import numpy as np
import pytest
import torch

from lit_diffusion.data.moving_shapes import clip_attrs, render_clip, write_moving_shapes
from lit_diffusion.data.shapes import COLORS, SHAPES
from lit_diffusion.data.video import VideoDataModule
from lit_diffusion.evaluation.report import _video_lines
from lit_diffusion.metrics.motion_accuracy import ATTRIBUTES, MotionAccuracy, check_clip

FLIP = {"left": "right", "right": "left", "up": "up", "down": "down"}


def to_video(attrs):
    frames = np.stack([np.asarray(frame) for frame in render_clip(attrs)])  # uint8 [T, H, W, 3]
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # [T, 3, H, W] in [0, 1]


def draw(n, seed=0, grow_probability=0.0, growing=None):
    """n clips' attributes; `growing` keeps only clips with (True) or without (False) a growing object."""
    out, i = [], seed
    while len(out) < n:
        attrs = clip_attrs(i, grow_probability=grow_probability)
        i += 1
        if growing is None or any("end_size" in o for o in attrs["objects"]) == growing:
            out.append(attrs)
    return out


def all_but(result, *failing):
    """The attributes in `failing` are wrong, every other one is right."""
    return {k: result[k] for k in ATTRIBUTES} == {k: k not in failing for k in ATTRIBUTES}


def assert_perfect(metric):
    per_attribute = metric.attribute_accuracy()
    assert metric.compute().item() == 1.0, per_attribute
    assert all(per_attribute[k] == 1.0 for k in ATTRIBUTES)
    assert per_attribute["cut"] == 0.0


@pytest.mark.parametrize("grow_probability", [0.0, 0.5])
def test_rendered_clips_score_perfectly(grow_probability):
    attrs = draw(200, grow_probability=grow_probability)
    if grow_probability:
        assert sum("end_size" in o for a in attrs for o in a["objects"]) > 50
    metric = MotionAccuracy()
    for start in range(0, len(attrs), 50):
        batch = attrs[start:start + 50]
        metric.update(torch.stack([to_video(a) for a in batch]), batch)
    assert_perfect(metric)
    kinds = metric.attribute_accuracy()
    assert kinds["one_object"] == kinds["two_objects"] == 1.0


def test_val_clips_from_shards_score_perfectly(tmp_path):
    info = write_moving_shapes(tmp_path, train=0, val=100, size=32, frames=8, shard_size=40, grow_probability=0.5)
    data = VideoDataModule(val_urls=info["urls"]["val"], image_size=32, num_frames=8, batch_size=16, num_workers=0)
    metric, seen = MotionAccuracy(), 0
    for batch in data.val_dataloader():
        metric.update((batch["video"] + 1) / 2, batch["attrs"])
        seen += len(batch["attrs"])
    assert seen == 100
    assert_perfect(metric)


def test_noisy_clips_still_pass():
    attrs = draw(60, seed=50, grow_probability=0.5)
    g = torch.Generator().manual_seed(0)
    videos = torch.stack([to_video(a) for a in attrs])
    metric = MotionAccuracy()
    metric.update((videos + 0.08 * torch.randn(videos.shape, generator=g)).clamp(0, 1), attrs)
    assert metric.compute().item() == 1.0, metric.attribute_accuracy()


def test_uint8_frames_give_the_same_verdict():
    for attrs in draw(10, seed=3):
        video = to_video(attrs)
        frames = np.stack([np.asarray(frame) for frame in render_clip(attrs)])
        assert check_clip(video, attrs) == check_clip(frames, attrs)
        assert check_clip(video.flip(0), attrs) == check_clip(frames[::-1], attrs)


def test_reversed_clips_move_the_wrong_way():
    for attrs in draw(30, seed=100, grow_probability=0.5, growing=False):
        result = check_clip(to_video(attrs).flip(0), attrs)
        assert all_but(result, "direction"), result
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
        assert result["directions"] == [opposite[o["direction"]] for o in attrs["objects"]]
    for attrs in draw(10, seed=100, grow_probability=0.5, growing=True):  # growing played backwards shrinks
        assert all_but(check_clip(to_video(attrs).flip(0), attrs), "direction", "sizes")


def test_static_clips_do_not_move():
    for attrs in draw(30, seed=200, grow_probability=0.5, growing=False):
        video = to_video(attrs)
        result = check_clip(video[:1].expand_as(video), attrs)  # the first frame repeated
        assert all_but(result, "direction"), result
        assert result["directions"] == [None] * len(attrs["objects"])
    for attrs in draw(10, seed=200, grow_probability=0.5, growing=True):
        video = to_video(attrs)
        assert all_but(check_clip(video[:1].expand_as(video), attrs), "direction", "sizes")


def test_growing_in_place_is_not_moving():
    """A growing or shrinking object that stays put (a triangle's centroid creeps 0.04 of the side) is not
    moving: the minimum travel is above that creep."""
    for attrs in draw(20, seed=300, grow_probability=0.5, growing=True):
        still = copy.deepcopy(attrs)
        for obj in still["objects"]:
            obj["cx1"], obj["cy1"] = obj["cx0"], obj["cy0"]
        result = check_clip(to_video(still), attrs)
        assert all_but(result, "direction"), result
        assert result["directions"] == [None] * len(attrs["objects"])


def test_mirrored_clips_flip_left_and_right():
    seen = set()
    for attrs in draw(40, seed=400):
        result = check_clip(to_video(attrs).flip(-1), attrs)  # mirrored horizontally
        moved = [o["direction"] for o in attrs["objects"]]
        assert result["directions"] == [FLIP[d] for d in moved]
        vertical = all(d in ("up", "down") for d in moved)
        assert all_but(result, *([] if vertical else ["direction"])), result
        seen.add(vertical)
    assert seen == {True, False}


def test_recoloured_object_fails_colors():
    for attrs in draw(20, seed=500):
        used = {o["color"] for o in attrs["objects"]}
        recoloured = copy.deepcopy(attrs)
        recoloured["objects"][-1]["color"] = next(c for c in COLORS if c not in used)
        result = check_clip(to_video(recoloured), attrs)
        # the right number of objects, but one of them the wrong colour: the expected one is never found
        assert result["count"] and not result["colors"] and not result["correct"], result
        assert result["directions"][-1] is None


def test_colours_tolerate_one_flickering_frame_in_eight():
    attrs = draw(1, seed=600)[0]
    other = next(c for c in COLORS if c not in {o["color"] for o in attrs["objects"]})
    video = to_video(attrs)
    recoloured = copy.deepcopy(attrs)
    recoloured["objects"][0]["color"] = other
    wrong = to_video(recoloured)
    one = video.clone()
    one[3] = wrong[3]
    assert check_clip(one, attrs)["colors"] and check_clip(one, attrs)["correct"]
    two = video.clone()
    two[3:5] = wrong[3:5]
    assert not check_clip(two, attrs)["colors"]


def test_changed_shape_fails_shapes():
    for attrs in draw(30, seed=700, grow_probability=0.5):
        changed = copy.deepcopy(attrs)
        obj = changed["objects"][0]
        obj["shape"] = next(s for s in SHAPES if s != obj["shape"])
        result = check_clip(to_video(changed), attrs)
        assert all_but(result, "shapes"), result


def test_changed_size_fails_sizes():
    for attrs in draw(30, seed=800, grow_probability=0.5):
        changed = copy.deepcopy(attrs)
        obj = changed["objects"][0]
        if "end_size" in obj:  # growing <-> shrinking
            obj["size"], obj["end_size"] = obj["end_size"], obj["size"]
        else:
            obj["size"] = "large" if obj["size"] == "small" else "small"
        result = check_clip(to_video(attrs), changed)
        assert not result["sizes"] and result["shapes"] and result["colors"], result


def test_update_in_parts_equals_one_update():
    attrs = draw(12, seed=900, grow_probability=0.5)
    videos = torch.stack([to_video(a) for a in attrs])
    videos[::3] = videos[::3].flip(1)  # a third played backwards: wrong
    whole, parts = MotionAccuracy(), MotionAccuracy()
    whole.update(videos, attrs)
    parts.update(videos[:5], attrs[:5])
    parts.update(videos[5:], attrs[5:])
    assert whole.compute().item() == parts.compute().item() < 1.0
    assert whole.attribute_accuracy() == parts.attribute_accuracy()


def test_per_kind_accuracy_on_a_hand_made_mix():
    one = [a for a in draw(30, seed=1000) if len(a["objects"]) == 1][:3]
    two = [a for a in draw(30, seed=1000) if len(a["objects"]) == 2][:2]
    attrs = one + two
    videos = torch.stack([to_video(a) for a in attrs])
    videos[2] = videos[2].flip(0)  # one of three one-object clips wrong
    videos[4] = videos[4].flip(0)  # one of two two-object clips wrong
    metric = MotionAccuracy()
    metric.update(videos, attrs)
    out = metric.attribute_accuracy()
    assert metric.compute().item() == pytest.approx(3 / 5)
    assert out["one_object"] == pytest.approx(2 / 3) and out["two_objects"] == pytest.approx(1 / 2)
    assert out["direction"] == pytest.approx(3 / 5) and out["count"] == out["shapes"] == 1.0
    assert out["one_object_direction"] == pytest.approx(2 / 3) and out["two_objects_direction"] == pytest.approx(1 / 2)
    assert out["one_object_shapes"] == out["two_objects_shapes"] == out["two_objects_count"] == 1.0


def test_attributes_within_a_caption_kind():
    """`two_objects_shapes` counts the two-object captions whose shapes were right, apart from the one-object ones:
    here a caption that names the wrong shape for one of its two objects."""
    one = [a for a in draw(40, seed=1001) if len(a["objects"]) == 1][:4]
    two = [a for a in draw(40, seed=1001) if len(a["objects"]) == 2][:4]
    videos = torch.stack([to_video(a) for a in one + two])
    wrong = copy.deepcopy(two[1])  # the clip drawn from two[1], judged against another shape
    obj = wrong["objects"][0]
    obj["shape"] = next(s for s in SHAPES if s != obj["shape"])
    metric = MotionAccuracy()
    metric.update(videos, one + [two[0], wrong, *two[2:]])
    out = metric.attribute_accuracy()
    assert out["two_objects_shapes"] == pytest.approx(3 / 4) and out["one_object_shapes"] == 1.0
    assert out["shapes"] == pytest.approx(7 / 8) and out["two_objects"] == pytest.approx(3 / 4)
    assert out["two_objects_colors"] == out["two_objects_direction"] == out["one_object_sizes"] == 1.0
    assert {k for k in out if k.startswith("one_object_")} == {f"one_object_{a}" for a in ATTRIBUTES}
    # the video report's second table, from the logged keys
    results = {f"eval_detail/motion_{k}_g3.0": v for k, v in out.items()}
    lines = _video_lines(results, [3])
    assert "| 3 | two objects | 1 | 1 | 0.75 | 1 | 1 |" in lines and "| 3 | one object | 1 | 1 | 1 | 1 | 1 |" in lines
    assert lines[lines.index("| 3 | one object | 1 | 1 | 1 | 1 | 1 |") - 2] == (
        "| guidance | caption kind | count | colors | shapes | sizes | direction |")
    # no clip judged (data without attributes): no empty table
    assert not any("caption kind" in line for line in _video_lines({"eval/fcd_g3.0": 0.1}, [3]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_bad_inputs_are_refused():
    attrs = draw(1)[0]
    with pytest.raises(ValueError, match="objects"):
        check_clip(to_video(attrs), {"caption": "x"})
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        check_clip(to_video(attrs)[0], attrs)
    with pytest.raises(ValueError, match="do not match"):
        MotionAccuracy().update(to_video(attrs)[None], [attrs, attrs])
    with pytest.raises(ValueError, match="before any update"):
        MotionAccuracy().compute()
