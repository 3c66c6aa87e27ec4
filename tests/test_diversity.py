"""Within-caption diversity of positions (`evaluation/diversity.py`), the data's own placement re-drawn
(`data.shapes.replace_objects`), and the pipeline's `evaluation.compare` / `evaluation.diversity` for a text model
beside another on the same CLIP and VAE (REPA against the flow U-Net without it), with its report section."""

import itertools
import math
import random

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, _fit, randomise_unet

from lit_diffusion import pipeline
from lit_diffusion.data.shapes import SIZES, _MARGIN, render, replace_objects, sample_attrs
from lit_diffusion.evaluation.diversity import caption_position_spread, data_position_spread, position_spread
from lit_diffusion.evaluation.report import _compare_lines, _relation_word_lines
from lit_diffusion.evaluation.unclip_metrics import cached, within_caption_diversity
from lit_diffusion.metrics.caption_accuracy import check_image

ONE = {"caption": "a small red square", "relation": None, "image_size": 32,
       "objects": [{"shape": "square", "color": "red", "size": "small"}]}
TWO = {"caption": "a small red square above a small blue square", "relation": "above", "image_size": 32,
       "objects": [{"shape": "square", "color": "red", "size": "small"},
                   {"shape": "square", "color": "blue", "size": "small"}]}


def _palette():
    from lit_diffusion.data.shapes import COLORS

    return COLORS["red"], COLORS["blue"]


def _canvas(boxes) -> np.ndarray:
    """uint8 [32, 32, 3]: white, with filled boxes (colour, x0, y0, side) in pixels."""
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    for color, x0, y0, side in boxes:
        image[y0:y0 + side, x0:x0 + side] = color
    return image


def _centre(x0, y0, side):  # a filled box's centroid in units of the side of a 32 px image
    return ((x0 + side / 2) / 32, (y0 + side / 2) / 32)


def _mean_pairwise(points):
    return sum(math.dist(a, b) for a, b in itertools.combinations(points, 2)) / math.comb(len(points), 2)


def test_spread_is_the_mean_pairwise_distance_of_each_objects_centroids_by_hand():
    red, blue = _palette()
    red_boxes, blue_boxes = [(2, 3, 8), (20, 4, 8), (11, 19, 8)], [(3, 22, 6), (22, 21, 6), (4, 2, 6)]
    images = [_canvas([(red, *r), (blue, *b)]) for r, b in zip(red_boxes, blue_boxes)]
    spread, found = caption_position_spread(images, TWO)
    expected = (_mean_pairwise([_centre(*r) for r in red_boxes]) + _mean_pairwise([_centre(*b) for b in blue_boxes])) / 2
    assert spread == pytest.approx(expected, abs=1e-9) and found == 1.0
    # the same image every time: no spread; an object missing from one image: found in 5 of 6 (image, object) pairs
    assert caption_position_spread([images[0]] * 4, TWO)[0] == 0.0
    spread, found = caption_position_spread([*images[:2], _canvas([(red, *red_boxes[2])])], TWO)
    expected = (_mean_pairwise([_centre(*r) for r in red_boxes]) + _mean_pairwise([_centre(*b) for b in blue_boxes[:2]])) / 2
    assert spread == pytest.approx(expected, abs=1e-9) and found == pytest.approx(5 / 6)
    # an object found in fewer than two images has no spread, and no object anywhere gives none
    assert caption_position_spread([_canvas([])] * 3, ONE) == (None, 0.0)


def test_position_spread_calls_generate_per_caption_with_seeds_keyed_by_the_caption():
    red, _ = _palette()
    boxes = [(2, 3, 8), (20, 4, 8), (11, 19, 8), (5, 5, 8)]
    calls = []

    def generate(captions, seeds):
        calls.append((captions, seeds))
        return torch.stack([torch.from_numpy(_canvas([(red, *b)])).permute(2, 0, 1).float() / 255 for b in boxes])

    out = position_spread(generate, [ONE, {**ONE, "caption": "a small red square "}], per_caption=4)
    assert [c for c, _ in calls] == [[ONE["caption"]] * 4, [ONE["caption"] + " "] * 4]
    assert len(set(calls[0][1])) == 4 and calls[0][1] != calls[1][1]  # four seeds, another caption's differ
    assert out["spread"] == pytest.approx(_mean_pairwise([_centre(*b) for b in boxes]), abs=1e-6)
    assert out["spread_se"] == pytest.approx(0.0, abs=1e-9) and out["captions"] == 2 and out["found"] == 1.0
    # beside the data's own placements of the same captions at the generated size, paired by caption
    data = data_position_spread([ONE, {**ONE, "caption": "a small red square "}], per_caption=4, size=32)
    assert out["data"] == data and out["minus_data"] == pytest.approx(out["spread"] - data["spread"])
    assert "spread_two_objects" not in out and out["spread_one_object"] == pytest.approx(out["spread"])
    with pytest.raises(ValueError, match="per_caption must be >= 2"):
        position_spread(generate, [ONE], per_caption=1)
    with pytest.raises(ValueError, match="shapes attributes with 'objects'"):
        position_spread(generate, [{"caption": "a photo"}], per_caption=4)
    with pytest.raises(ValueError, match="at least one caption"):
        position_spread(generate, [], per_caption=4)
    with pytest.raises(ValueError, match=r"square canvas; generate returned images \(32, 64\)"):
        position_spread(lambda c, s: torch.ones(len(c), 3, 32, 64), [ONE], per_caption=4)


def test_centroids_are_in_units_of_the_shorter_side_on_a_wide_canvas_and_the_data_is_drawn_square():
    red, _ = _palette()
    boxes = [(2, 3, 8), (50, 20, 8), (30, 10, 8)]
    images = []
    for x0, y0, side in boxes:
        image = np.full((32, 64, 3), 255, dtype=np.uint8)
        image[y0:y0 + side, x0:x0 + side] = red
        images.append(image)
    spread, _ = caption_position_spread(images, ONE)
    assert spread == pytest.approx(_mean_pairwise([((x + s / 2) / 32, (y + s / 2) / 32) for x, y, s in boxes]))
    # a 2:1 val image's caption is placed on the square canvas the model draws: its objects spread as a square's
    wide = next(a for a in (sample_attrs(i, 32, aspect_ratios=("2:1",)) for i in range(50)) if a["relation"] is None)
    square = {k: v for k, v in wide.items() if k not in ("aspect_ratio", "width", "height")}
    assert data_position_spread([wide], per_caption=6) == data_position_spread([square], per_caption=6)


def test_clip_diversity_and_positions_of_one_cached_generator_sample_once():
    red, _ = _palette()
    pixels_as_embeddings = type("Clip", (), {"encode_image": staticmethod(lambda x: x.flatten(1))})
    calls = []

    def generate(captions, seeds):
        calls.append(seeds)
        return torch.stack([torch.from_numpy(_canvas([(red, 2 + 3 * (s % 5), 4, 8)])).permute(2, 0, 1).float() / 255
                            for s in seeds])

    remembered = cached(generate)
    clip_div = within_caption_diversity(remembered, [ONE["caption"]], pixels_as_embeddings, per_caption=3)
    positions = position_spread(remembered, [ONE], per_caption=3)
    assert len(calls) == 1 and positions["captions"] == clip_div["captions"] == 1
    assert positions == position_spread(generate, [ONE], per_caption=3) and len(calls) == 2


def test_replaced_objects_keep_caption_relation_and_canvas_and_move():
    rng = random.Random(0)
    for seed in range(100):
        attrs = sample_attrs(seed, 32, aspect_ratios=("1:1", "2:1", "1:2"))
        placed = replace_objects(attrs, rng)
        assert placed["caption"] == attrs["caption"] and placed.get("width") == attrs.get("width")
        assert [{k: o[k] for k in ("shape", "color", "size")} for o in placed["objects"]] == \
               [{k: o[k] for k in ("shape", "color", "size")} for o in attrs["objects"]]
        assert check_image(np.asarray(render(placed)), placed)["correct"], placed
        assert [(o["cx"], o["cy"]) for o in placed["objects"]] != [(o["cx"], o["cy"]) for o in attrs["objects"]]
    with pytest.raises(ValueError, match="a relation needs two objects"):
        replace_objects({**ONE, "relation": "above"}, 0)


def test_the_datas_spread_of_one_object_is_the_mean_distance_of_two_uniform_points_in_its_square():
    # a single object's centre is uniform on a square of side 1 - 2 (r + margin); two uniform points in a unit
    # square are (2 + sqrt(2) + 5 ln(1 + sqrt(2))) / 15 apart on average (a closed form, e.g. MathWorld's
    # "Square Line Picking"). Pixel boxes move the centroid by under half a pixel.
    side = 1 - 2 * (SIZES["large"] + _MARGIN)
    closed = side * (2 + math.sqrt(2) + 5 * math.log(1 + math.sqrt(2))) / 15
    captions = [{**ONE, "caption": f"a large red square {i}", "objects": [{**ONE["objects"][0], "size": "large"}]}
                for i in range(40)]
    out = data_position_spread(captions, per_caption=24)
    assert out["found"] == 1.0 and out["captions"] == 40
    assert abs(out["spread"] - closed) < 3 * out["spread_se"] + 0.5 / 32, (out, closed)
    # two small objects in a relation are tied to each other: each moves less than a small object alone would
    alone = (1 - 2 * (SIZES["small"] + _MARGIN)) * (2 + math.sqrt(2) + 5 * math.log(1 + math.sqrt(2))) / 15
    pair = data_position_spread([{**TWO, "caption": f"{TWO['caption']} {i}"} for i in range(10)], per_caption=8)
    assert 0.1 < pair["spread_two_objects"] < alone - 3 * pair["spread_two_objects_se"]


# ----------------------------------------------------------------------------- the pipeline's compare / diversity
@pytest.fixture(scope="module")
def two_text_models(tiny_ckpts, embedded_latents, tmp_path_factory):
    from lit_diffusion.data.datamodule import LatentDataModule
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    root = tmp_path_factory.mktemp("compare_run")
    for name, seed in (("ldm", 0), ("other", 1)):
        torch.manual_seed(seed)
        module = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]),
                                       image_size=16, unet=TINY_UNET, warmup_steps=0, sampler="ddim", sample_steps=2)
        randomise_unet(module)
        data = LatentDataModule(train_urls=str(embedded_latents / "train" / "*.tar"),
                                val_urls=str(embedded_latents / "val" / "*.tar"), batch_size=32, num_workers=0,
                                train_batches_per_epoch=2)
        _fit(module, data, 2, root / name).save_checkpoint(root / f"{name}.ckpt")
    cfg = {"name": "c", "root": str(root), "stages": {"clip": {}, "vae": {}, "ldm": {}},
           "evaluation": {"guidance": [1, 3], "num_samples": 8, "batch_size": 8, "features": ["clip"],
                          "sampler": "ddim", "steps": 2, "compare": str(root / "other.ckpt"),
                          "diversity": {"captions": 3, "per_caption": 2, "guidance": 3}}}
    return cfg, root, {"val_urls": str(tiny_ckpts["data"] / "val-*.tar")}


def test_compare_evaluates_the_other_model_on_the_same_captions_and_reports_both(two_text_models):
    cfg, root, data = two_text_models
    evaluation = pipeline.evaluate_final(cfg, root, data)
    compare = evaluation["compare"]
    assert compare["ckpt"] == cfg["evaluation"]["compare"]
    ours, theirs = evaluation["results"], compare["results"]
    assert ours["eval/num_samples"] == theirs["eval/num_samples"] == 8
    assert ours["eval/fid_clip_g3.0"] != theirs["eval/fid_clip_g3.0"]  # two models
    div = compare["diversity"]
    assert div["guidance"] == 3.0 and div["per_caption"] == 2
    captions = {k: div[k]["captions"] for k in ("model", "compare")}
    assert captions["model"] == captions["compare"] == div["model"]["positions"]["captions"] <= 3
    for key in ("model", "compare"):
        pos = div[key]["positions"]
        assert 0 <= pos["found"] <= 1 and div[key]["diversity"] >= 0 and pos["data"]["found"] == 1.0
    # the two models' data references are the same captions' placements
    assert div["model"]["positions"]["data"] == div["compare"]["positions"]["data"]
    lines = _compare_lines(compare, ours, [1.0, 3.0], ["clip"])
    table = lines[:lines.index("## Within-caption diversity")]
    for label, res in (("this run", ours), ("compared", theirs)):
        row = next(line for line in table if line.startswith(f"| {label} | 3 |"))
        assert f"| {res['eval/caption_acc_g3.0']:.4g} |" in row and f"| {res['eval/fid_clip_g3.0']:.4g} |" in row
        pos = div["model" if label == "this run" else "compare"]["positions"]
        row = next(line for line in lines[len(table):] if line.startswith(f"| {label} |"))
        assert f"| {pos['spread']:.4g} ({pos['spread_se']:.4g}) | {pos['data']['spread']:.4g} |" in row, row


def test_diversity_alone_needs_no_compare_and_another_clip_is_refused(two_text_models, tmp_path):
    cfg, root, data = two_text_models
    alone = {**cfg, "evaluation": {k: v for k, v in cfg["evaluation"].items() if k != "compare"}}
    out = pipeline.evaluate_compare(alone, root, data)
    assert out["ckpt"] is None and out["note"] is None and "results" not in out and "model" in out["diversity"]
    assert "compare" not in out["diversity"]
    other = torch.load(root / "other.ckpt", weights_only=True)
    key = next(k for k in other["state_dict"] if k.startswith("vae."))
    other["state_dict"][key] = other["state_dict"][key] + 1
    torch.save(other, tmp_path / "bad.ckpt")
    bad = {**cfg, "evaluation": {**cfg["evaluation"], "compare": str(tmp_path / "bad.ckpt")}}
    # refused, said why, and this run's own figures kept: the report is not lost after the training
    out = pipeline.evaluate_compare(bad, root, data)
    assert out["ckpt"] is None and "results" not in out and set(out["diversity"]) == {"model", "guidance", "per_caption"}
    assert "bad.ckpt was trained with another CLIP or VAE" in out["note"]
    lines = _compare_lines(out, {}, [3.0], ["clip"])
    assert any(line.startswith("No model beside this one: evaluation.compare: ") for line in lines)


def test_the_report_lists_each_relation_word():
    results = {f"eval_detail/caption_relation_{w}{p}_g3.0": v
               for (w, p), v in zip(itertools.product(("above", "below", "left_of", "right_of"), ("", "_placed")),
                                    (0.5, 0.75, 0.25, 1.0, 0.125, 0.375, 0.625, 0.875))}
    lines = _relation_word_lines(results, [3.0])
    assert lines[3] == "| guidance | above | below | left of | right of |"
    assert lines[5] == "| 3 | 0.5 / 0.75 | 0.25 / 1 | 0.125 / 0.375 | 0.625 / 0.875 |"
    assert _relation_word_lines({"eval/caption_acc_g3.0": 0.5}, [3.0]) == []
