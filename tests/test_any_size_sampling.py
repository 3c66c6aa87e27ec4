"""Sampling, grids and evaluation at several aspect ratios: `sample --aspect`, the size-rounding rule, mixed-size grids
(`save_grid`, `SampleGrid(aspect_ratios=...)`) and `evaluate --aspect-ratios` (figures per ratio, FID per ratio
against that ratio's real images, exact over 2 ranks)."""

import json
import math
import os
import socket
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import _fit, randomise_unet, tiny_datamodule
from PIL import Image
from test_ldm import make_ldm

from lit_diffusion.callbacks.sample_grid import SampleGrid
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.data.shapes import write_shapes
from lit_diffusion.evaluation.evaluator import (
    AspectRatioError,
    EvalConfig,
    Evaluator,
    aspect_size,
    describe_fid_reals,
    image_aspect_ratio,
    sample_seed,
    sample_size,
    size_multiple,
    tradeoff_points,
)
from lit_diffusion.evaluation.plots import grid_cells, save_grid
from lit_diffusion.metrics.caption_accuracy import CaptionAccuracy
from lit_diffusion.metrics.clip_score import clip_score_per_sample
from lit_diffusion.metrics.features import CLIPFeatures, to_uint8
from lit_diffusion.metrics.fid import FID

RATIOS = ("1:1", "2:1", "1:2")


# ------------------------------------------------------------------------------------------ the size-rounding rule
@pytest.mark.parametrize("ratio, base, multiple, expected", [
    ("1:1", 16, 8, (16, 16)),
    ("2:1", 16, 8, (8, 16)),  # ideal 11.3 x 22.6: 8 x 16 is exactly 2:1 (16 x 24 would be 3:2)
    ("1:2", 16, 8, (16, 8)),
    ("3:2", 16, 8, (16, 24)),
    ("3:2", 32, 8, (24, 40)),  # 5:3 is nearer 3:2 in log aspect than 4:3 (32 x 40 would be 5:4)
    ("4:2", 32, 8, (24, 48)),  # reduced to 2:1 first
    ("1:1", 36, 8, (40, 40)),  # a base the model does not take: 40 x 40 is nearer 36**2 in log area than 32 x 32
    ("2:1", 1024, 64, (704, 1408)),  # SDXL's 2:1 bucket
    ("16:9", 1024, 64, (768, 1344)),  # SDXL's 16:9 bucket
    ("4:1", 16, 8, (8, 32)),  # the most elongated ratio at 16 px and multiples of 8
])
def test_aspect_size_reference_sizes(ratio, base, multiple, expected):
    assert aspect_size(ratio, base, multiple) == expected


def _log_aspect_error(hw, ratio):
    w, h = (int(x) for x in ratio.split(":"))
    return abs(math.log(hw[1] * h / (hw[0] * w)))


@pytest.mark.parametrize("base, multiple", [(16, 8), (32, 8), (64, 16), (256, 8), (100, 8), (1024, 64)])
def test_aspect_size_is_never_worse_than_rounding_each_side_and_keeps_the_area(base, multiple):
    ratios = ["1:1", "3:2", "2:3", "2:1", "1:2", "4:3", "16:9", "9:16", "5:4", "21:9", "3:1"]
    for ratio in ratios:
        try:
            h, w = aspect_size(ratio, base, multiple)
        except AspectRatioError:
            a, b = (int(x) for x in ratio.split(":"))
            assert base * math.sqrt(min(a, b) / max(a, b)) < multiple  # refused only below one multiple
            continue
        assert h % multiple == 0 and w % multiple == 0 and h >= multiple and w >= multiple
        a, b = (int(x) for x in ratio.split(":"))
        ideal_w, ideal_h = base * math.sqrt(a / b), base * math.sqrt(b / a)
        assert abs(w - ideal_w) < multiple and abs(h - ideal_h) < multiple  # one multiple per side at most
        # each side rounded to its nearest multiple on its own is never nearer the ratio
        naive = tuple(max(multiple, round(side / multiple) * multiple) for side in (ideal_h, ideal_w))
        assert _log_aspect_error((h, w), ratio) <= _log_aspect_error(naive, ratio) + 1e-12, (ratio, (h, w), naive)
    if base % multiple == 0:
        assert aspect_size("1:1", base, multiple) == (base, base)


def test_aspect_size_refuses_ratios_too_elongated_for_the_area_naming_the_limit():
    with pytest.raises(AspectRatioError, match=r"^5:1 at the base size 16x16 px gives a shorter side of 7\.2 px, "
                                               r"under the 8 px .* most elongated ratio .* is 4:1"):
        aspect_size("5:1", 16, 8)
    with pytest.raises(ValueError, match="is not W:H"):
        aspect_size("3x2", 16, 8)


class _ModelWithMultiple:
    """What size_multiple reads: the base size and the model's own check of a size."""

    def __init__(self, base, multiple):
        self.hparams = type("H", (), {"image_size": base})()
        self.multiple = multiple

    def latent_shape(self, height, width):
        if height % self.multiple or width % self.multiple:
            raise ValueError(f"{height}x{width} px: multiples of {self.multiple}")
        return height // 4, width // 4


def test_the_multiple_is_read_from_the_models_own_size_check(tiny_ckpts):
    assert size_multiple(_ModelWithMultiple(48, 12)) == 12
    assert size_multiple(_ModelWithMultiple(64, 16)) == 16
    model = make_ldm(tiny_ckpts)  # VAE factor 4 x one U-Net downsampling
    assert size_multiple(model) == 8
    assert sample_size(model, "3:2") == (16, 24)
    model.latent_shape(*sample_size(model, "1:2"))


def test_a_real_images_ratio_comes_from_its_json_else_its_own_size():
    ratios = ("1:1", "2:1", "1:2", "3:2")
    assert image_aspect_ratio({"aspect_ratio": "2:1", "width": 46, "height": 22}, None, ratios) == "2:1"
    assert image_aspect_ratio({"aspect_ratio": "4:2"}, None, ratios) == "2:1"  # reduced
    assert image_aspect_ratio({"aspect_ratio": "2:3"}, None, ratios) == "other"  # known, not asked for
    assert image_aspect_ratio({"width": 46, "height": 22}, None, ratios) == "2:1"  # even rounding of 45.3 x 22.6
    assert image_aspect_ratio({}, torch.tensor([427.0, 640.0, 0, 0, 16, 16]), ratios) == "3:2"  # (h, w) first
    assert image_aspect_ratio({}, torch.tensor([16.0, 16.0, 0, 0, 16, 16]), ratios) == "1:1"
    assert image_aspect_ratio({}, torch.tensor([1080.0, 1920.0, 0, 0, 16, 16]), ratios) == "other"  # 16:9 is not 2:1
    assert image_aspect_ratio({"objects": []}, None, ratios) is None  # nothing says


# ----------------------------------------------------------------------------------------------------------- grids
def _boxes(png: Path, colours) -> list[tuple[int, int, int, int]]:
    """The bounding box (top, left, bottom, right) of each colour's pixels in a drawn PNG."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    boxes = []
    for colour in colours:
        ys, xs = np.nonzero((np.abs(pixels - np.array(colour)) <= 1).all(-1))
        assert len(ys), f"colour {colour} is not drawn"
        boxes.append((ys.min(), xs.min(), ys.max() + 1, xs.max() + 1))
    return boxes


def test_a_grid_of_one_size_draws_each_image_whole_in_its_cell_in_order(tmp_path):
    """Each image one flat colour: each colour fills one equal, square, solid box, in row-major order."""
    colours = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    images = [torch.tensor(c, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 16, 16) for c in colours]
    rows = [torch.stack(images[:3]), torch.stack(images[3:])]
    out = save_grid(rows, ["a large red circle", "a small blue square\n(negative: x)"], tmp_path / "g.png",
                    col_titles=["guidance 1", "guidance 3", "guidance 5"], title="step 7")
    boxes = _boxes(out, colours)
    sides = {(b - t, r - l) for t, l, b, r in boxes}
    assert len({s for side in sides for s in side}) <= 2 and all(abs(h - w) <= 1 for h, w in sides), sides
    pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for (t, l, b, r), colour in zip(boxes, colours):  # solid: the box holds only its colour
        assert (np.abs(pixels[t:b, l:r] - np.array(colour)) <= 1).all()
    (r0, r1, r2), (s0, s1) = boxes[:3], boxes[3:]
    assert r0[3] <= r1[1] and r1[3] <= r2[1] and s0[3] <= s1[1]  # columns left to right
    assert max(b[2] for b in boxes[:3]) <= min(b[0] for b in boxes[3:])  # the second row below the first
    assert abs(r0[1] - s0[1]) <= 1 and abs(r1[1] - s1[1]) <= 1  # columns aligned across rows


def test_images_of_several_sizes_are_centred_in_cells_of_the_largest_height_and_width(tmp_path):
    wide, tall, square = torch.zeros(3, 8, 16), torch.ones(3, 16, 8), torch.full((3, 16, 16), 0.25)
    rows = grid_cells([[wide, tall], [square]], pad_value=0.5)
    assert [len(r) for r in rows] == [2, 1] and all(c.shape == (3, 16, 16) for r in rows for c in r)
    cell = rows[0][0]
    assert torch.equal(cell[:, 4:12, :], wide) and (cell[:, :4] == 0.5).all() and (cell[:, 12:] == 0.5).all()
    cell = rows[0][1]
    assert torch.equal(cell[:, :, 4:12], tall) and (cell[:, :, :4] == 0.5).all() and (cell[:, :, 12:] == 0.5).all()
    assert torch.equal(rows[1][0], square)
    # an odd margin: the extra pixel goes below / right
    cell = grid_cells([[torch.zeros(3, 5, 8), torch.ones(3, 8, 8)]])[0][0]
    assert (cell[:, :1] == 0.5).all() and (cell[:, 1:6] == 0).all() and (cell[:, 6:] == 0.5).all()

    red = torch.zeros(3, 24, 48)
    red[0] = 1.0
    blue = torch.zeros(3, 48, 24)
    blue[2] = 1.0
    out = save_grid([[red, blue]], ["prompt"], tmp_path / "mixed.png", col_titles=["2:1", "1:2"])
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert (255, 0, 0) in colours and (0, 0, 255) in colours
    assert any(all(abs(int(c) - 128) <= 1 for c in p) for p in colours)  # the neutral grey around them


def test_sample_grid_with_aspect_ratios_samples_each_ratio_at_its_size(tiny_ckpts, tmp_path):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    grid = SampleGrid(prompts=["a large red circle", "a small blue square"], guidance=[1.0, 4.0],
                      negative_prompt="a green triangle", steps=2, aspect_ratios=["1:1", "2:1", "1:2"])
    rows, labels = grid.grid(model)
    assert len(rows) == 3 and labels[-1] == "a small blue square\n(negative: a green triangle)"
    assert [tuple(im.shape) for im in rows[0]] == [(3, 16, 16)] * 2 + [(3, 8, 16)] * 2 + [(3, 16, 8)] * 2
    assert grid.col_titles() == ["1:1, guidance 1", "1:1, guidance 4", "2:1, guidance 1", "2:1, guidance 4",
                                 "1:2, guidance 1", "1:2, guidance 4"]
    # each image is the module's own sample at that size, with the prompt's seed
    wide = model.sample(["a small blue square"], guidance=4.0, steps=2, seed=[1], height=8, width=16)[0]
    torch.testing.assert_close(rows[1][3], wide.cpu())
    negative = model.sample(["a small blue square"], negative_prompts=["a green triangle"], guidance=4.0, steps=2,
                            seed=[1], height=16, width=8)[0]
    torch.testing.assert_close(rows[2][5], negative.cpu())
    # the default is the square grid, sampled exactly as before (no size arguments), as one tensor per row
    default = SampleGrid(prompts=["a large red circle"], guidance=[1.0, 4.0], steps=2)
    calls = []
    sample = model.sample
    model.sample = lambda *a, **k: calls.append(k) or sample(*a, **k)
    (row,), _ = default.grid(model)
    assert row.shape == (2, 3, 16, 16) and all("height" not in k and "width" not in k for k in calls)
    assert default.col_titles() == ["guidance 1", "guidance 4"]
    out = save_grid(rows, labels, tmp_path / "grid.png", col_titles=grid.col_titles())
    assert Image.open(out).size[0] > Image.open(out).size[1]
    # a ratio the module cannot sample at its base area fails at setup, before any training
    with pytest.raises(ValueError, match=r"SampleGrid aspect_ratios 8:1 at the base size 16x16 px .* 4:1"):
        SampleGrid(aspect_ratios=["1:1", "8:1"]).setup(None, model, "fit")


# ------------------------------------------------------------------------------------------------- sample command
@pytest.fixture(scope="module")
def ldm_ckpt(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_any_size")
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    _fit(model, tiny_datamodule(tiny_ckpts["data"]), 1, root).save_checkpoint(root / "ldm.ckpt")
    return root / "ldm.ckpt"


def test_sample_command_sizes_and_its_errors(ldm_ckpt, tmp_path, capsys, monkeypatch):
    from lit_diffusion.cli import main
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    shapes = []
    sample = LatentDiffusionModule.sample

    def spy(self, prompts, **kwargs):
        images = sample(self, prompts, **kwargs)
        shapes.append(((kwargs.get("height"), kwargs.get("width")), tuple(images.shape)))
        return images

    monkeypatch.setattr(LatentDiffusionModule, "sample", spy)
    base = ["sample", "--ckpt", str(ldm_ckpt), "--prompt", "a large red circle", "--steps", "2", "--num", "2"]
    main([*base, "--aspect", "2:1", "--out", str(tmp_path / "wide.png")])
    main([*base, "--aspect", "6:4", "--out", str(tmp_path / "three_two.png")])
    main([*base, "--height", "24", "--width", "16", "--out", str(tmp_path / "tall.png")])
    main([*base, "--width", "24", "--out", str(tmp_path / "width_only.png")])
    main([*base, "--out", str(tmp_path / "default.png")])
    assert shapes == [((8, 16), (2, 3, 8, 16)), ((16, 24), (2, 3, 16, 24)), ((24, 16), (2, 3, 24, 16)),
                      ((None, 24), (2, 3, 16, 24)), ((None, None), (2, 3, 16, 16))]
    wide = Image.open(tmp_path / "wide.png").size
    assert wide[0] > Image.open(tmp_path / "default.png").size[0]  # wider cells for a wide image
    capsys.readouterr()

    def error(*extra) -> str:
        with pytest.raises(SystemExit) as exc:
            main([*base, *extra, "--out", str(tmp_path / "never.png")])
        assert exc.value.code == 2
        return capsys.readouterr().err

    err = error("--aspect", "3:2", "--height", "16")
    assert "--aspect 3:2 and --height/--width both give the size" in err
    err = error("--height", "20", "--width", "16")
    assert "--height 20 --width 16: 20x16 px: this model samples heights and widths that are multiples of 8" in err
    err = error("--aspect", "8:1")
    assert "--aspect 8:1 at the base size 16x16 px" in err
    assert "the most elongated ratio it samples at this area is 4:1" in err
    err = error("--aspect", "3x2")
    assert "argument --aspect: aspect ratio '3x2' is not W:H" in err
    err = error("--aspect", "3:2,1:1")
    assert "argument --aspect: expected one aspect ratio W:H" in err
    assert not (tmp_path / "never.png").exists()


# ------------------------------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Val shards of three aspect ratios (KEY.json says each image's ratio)."""
    out = tmp_path_factory.mktemp("mixed")
    write_shapes(out, train=0, val=24, size=20, shard_size=12, seed=0, aspect_ratios=RATIOS)
    return out


def _loader(data, batch_size=8, n=24):
    dm = ImageCaptionDataModule(val_urls=str(data / "val-*.tar"), image_size=16, batch_size=batch_size,
                                num_workers=0)
    return dm.eval_dataloader(n)


def _by_hand(model, data, guidance, n=24):
    """Every figure per ratio and overall, computed directly: the same captions, per-key seeds, sizes and crops."""
    batches = list(_loader(data, 24, n))
    real = torch.cat([(b["image"].float() + 1) / 2 for b in batches]).clamp(0, 1)
    captions = [c for b in batches for c in b["caption"]]
    keys = [k for b in batches for k in b["key"]]
    attrs = [a for b in batches for a in b["attrs"]]
    with torch.no_grad():
        _, text = model.clip.encode_text(model.clip.tokenize(captions))
    out, fakes, scores, accs = {}, [], [], CaptionAccuracy()
    for r in RATIOS:
        h, w = sample_size(model, r)
        images = to_uint8(model.sample(captions, guidance=guidance, steps=2, seed=[sample_seed(k, 0) for k in keys],
                                       height=h, width=w)).float() / 255
        assert images.shape[-2:] == (h, w)
        side = min(h, w)
        square = images[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        fakes.append(square)
        mine = [i for i, a in enumerate(attrs) if a["aspect_ratio"] == r]
        fid = FID(CLIPFeatures(model.clip))
        fid.update(real[mine], real=True)
        fid.update(square, real=False)
        out[f"eval/fid_clip_g{guidance:.1f}_ar{r}"] = fid.compute().item()
        with torch.no_grad():
            score = clip_score_per_sample(model.clip.encode_image(images * 2 - 1), text)
        scores.append(score)
        out[f"eval/clip_score_g{guidance:.1f}_ar{r}"] = score.mean().item()
        acc = CaptionAccuracy()
        acc.update(images, attrs)
        accs.update(images, attrs)
        out[f"eval/caption_acc_g{guidance:.1f}_ar{r}"] = acc.attribute_accuracy()["correct"]
        out[f"eval_detail/fid_real_n_ar{r}"] = len(mine)
    fid = FID(CLIPFeatures(model.clip))
    fid.update(real, real=True)
    for square in fakes:  # 16 x 16, 8 x 8, 8 x 8: the features are of one width whatever the size
        fid.update(square, real=False)
    out[f"eval/fid_clip_g{guidance:.1f}"] = fid.compute().item()
    out[f"eval/clip_score_g{guidance:.1f}"] = torch.cat(scores).mean().item()
    out[f"eval/caption_acc_g{guidance:.1f}"] = accs.attribute_accuracy()["correct"]
    return out


def test_figures_per_aspect_ratio_equal_a_direct_computation(tiny_ckpts, mixed_data, tmp_path, monkeypatch):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    cfg = EvalConfig(guidance=[1.0, 3.0], num_samples=24, backends=["clip"], steps=2, resolution=16,
                     data_id="mixed", cache_dir=str(tmp_path / "cache"), aspect_ratios=["1:1", "2:1", "1:2"])
    seen = []  # what FID's feature extractor is given: centre squares (Inception would squash a 2:1 image)
    update = FID.update
    monkeypatch.setattr(FID, "update", lambda self, images, real: seen.append(tuple(images.shape[-2:]))
                        or update(self, images, real))
    evaluator = Evaluator(cfg, model.clip)
    results = evaluator.run(model, _loader(mixed_data))
    assert set(seen) == {(16, 16), (8, 8)}  # real 16 x 16; generated 16 x 16 (1:1) and the 8 x 8 centres of 8 x 16
    monkeypatch.undo()
    assert evaluator.timings[-1]["real_matched_ar"] == {r: True for r in RATIOS}
    per_ratio = ("eval/fid_clip", "eval/clip_score", "eval/caption_acc", "eval_detail/caption_count",
                 "eval_detail/caption_relation", "eval_detail/caption_one_object")
    for g in ("1.0", "3.0"):
        for key in per_ratio:
            assert f"{key}_g{g}" in results
            assert all(f"{key}_g{g}_ar{r}" in results for r in RATIOS)
    counts = {r: results[f"eval_detail/fid_real_n_ar{r}"] for r in RATIOS}
    assert sum(counts.values()) == 24 and all(n >= 2 for n in counts.values())
    assert all(results[f"eval_detail/fid_real_matched_ar{r}"] == 1.0 for r in RATIOS)
    assert results["eval/num_samples"] == 24

    expected = _by_hand(model, mixed_data, 3.0)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the three ratios' FIDs differ: each is against its own real images and its own samples
    fids = [results[f"eval/fid_clip_g3.0_ar{r}"] for r in RATIOS]
    assert len({round(f, 6) for f in fids}) == 3

    # a second evaluator finds each ratio's real statistics on disk, and gives the same figures
    again = Evaluator(cfg, model.clip)
    second = again.run(model, _loader(mixed_data))
    assert again.timings[-1]["real_stats"] == {"clip": "disk"}
    assert again.timings[-1]["real_stats_ar"] == {"clip": "disk"}
    for key, value in results.items():
        if key != "eval/seconds":
            assert second[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # ... and a third run of the first one uses the statistics it holds
    evaluator.run(model, _loader(mixed_data))
    assert evaluator.timings[-1]["real_stats_ar"] == {"clip": "memory"}

    # the plot gets one line per ratio; the overall points ignore the per-ratio keys
    assert [p[0] for p in tradeoff_points(results, "clip")] == [1.0, 3.0]
    assert tradeoff_points(results, "clip", "2:1")[1] == (3.0, results["eval/clip_score_g3.0_ar2:1"],
                                                        results["eval/fid_clip_g3.0_ar2:1"])


def test_bucketed_real_images_enter_fid_as_centre_squares(tiny_ckpts, mixed_data, tmp_path, monkeypatch):
    """A bucketed val reader (the in-loop callback's for bucketed data or latents encoded at buckets) gives real
    images of 8 x 16 and 16 x 8: the overall FID's real side is their centre squares, as the generated side is
    (Inception would stretch a 2:1 image to 299 x 299), and its cached statistics are not a square reader's."""
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    buckets = {"sizes": [[16, 16], [8, 16], [16, 8]], "step": 8, "crop": "center"}
    dm = ImageCaptionDataModule(val_urls=str(mixed_data / "val-*.tar"), image_size=16, batch_size=8,
                                num_workers=0, buckets=buckets)
    cfg = EvalConfig(guidance=[3.0], num_samples=24, backends=["clip"], steps=2, resolution=16, data_id="mixed",
                     cache_dir=str(tmp_path / "cache"), real_buckets=dm.buckets)
    batches = list(dm.eval_dataloader(24))
    assert {tuple(b["image"].shape[-2:]) for b in batches} == {(16, 16), (8, 16), (16, 8)}
    reals = []
    update = FID.update
    monkeypatch.setattr(FID, "update", lambda self, images, real: (reals.append(images) if real else None)
                        or update(self, images, real))
    evaluator = Evaluator(cfg, model.clip)
    results = evaluator.run(model, dm.eval_dataloader(24))
    monkeypatch.undo()
    assert {tuple(r.shape[-2:]) for r in reals} == {(16, 16), (8, 8)}
    squares = []
    for b in batches:
        real = ((b["image"].float() + 1) / 2).clamp(0, 1)
        h, w = real.shape[-2:]
        side = min(h, w)
        squares.append(real[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side])
    by_hand = FID(CLIPFeatures(model.clip))
    for square in squares:
        by_hand.update(square, real=True)
    keys = [k for b in batches for k in b["key"]]
    captions = [c for b in batches for c in b["caption"]]
    fake = to_uint8(model.sample(captions, guidance=3.0, steps=2, seed=[sample_seed(k, 0) for k in keys])).float() / 255
    by_hand.update(fake, real=False)
    assert results["eval/fid_clip_g3.0"] == pytest.approx(by_hand.compute().item(), rel=1e-5)
    # the same shards read square are other real pixels: their statistics are cached under another key
    square_cfg = replace(cfg, real_buckets=None)
    assert Evaluator(square_cfg, model.clip)._cache_fields("clip") != evaluator._cache_fields("clip")
    again = Evaluator(square_cfg, model.clip)
    again.run(model, _loader(mixed_data))
    assert again.timings[-1]["real_stats"] == {"clip": "computed"}


def test_bucketed_image_data_of_another_area_than_the_model_is_refused(tiny_ckpts, mixed_data):
    """Bucketed image data is checked per batch only for sizes the denoiser takes: a 32 px data module's buckets
    would train a 16 px model at 4x its area, and its samples and evaluation would then be at the wrong one."""
    from types import SimpleNamespace

    model = make_ldm(tiny_ckpts)  # image_size 16
    for size, buckets, refused in ((32, {"step": 8}, True), (16, {"step": 8}, False),
                                   (32, {"step": 8, "base_size": 16}, False), (32, {"sizes": [[16, 16]], "step": 8}, False)):
        dm = ImageCaptionDataModule(val_urls=str(mixed_data / "val-*.tar"), image_size=size, buckets=buckets)
        model._trainer = SimpleNamespace(datamodule=dm)
        if refused:
            with pytest.raises(ValueError, match=r"buckets are of 32 px images' area .* model.init_args.image_size "
                                                 r"is 16"):
                model.setup("fit")
        else:
            model.setup("fit")
            assert model._bucketed


def test_square_only_data_compares_every_ratio_against_all_real_images(tiny_ckpts):
    """The tiny data set is square: its images are 1:1 by their own size, so 2:1 and 1:2 have no real images of
    their own; their FID is against all of them (as is 1:1's, all being 1:1). Without aspect ratios, and with 1:1
    only, the overall figures are today's."""
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    data = tiny_ckpts["data"]
    cfg = EvalConfig(guidance=[3.0], num_samples=16, backends=["clip"], steps=2, resolution=16)
    plain = Evaluator(cfg, model.clip).run(model, tiny_datamodule(data, 8).eval_dataloader(16))
    square = Evaluator(replace(cfg, aspect_ratios=["1:1"]), model.clip).run(
        model, tiny_datamodule(data, 8).eval_dataloader(16))
    assert not any("_ar" in k for k in plain)
    for key, value in plain.items():
        if key != "eval/seconds":
            assert square[key] == value, key  # the same computation, bit for bit
            suffixed = f"{key}_ar1:1"
            # per ratio: every figure of the generated images (the VAE's ceiling is the real images', one figure)
            per_ratio = key.startswith(("eval/fid", "eval/clip_score", "eval/caption", "eval_detail/caption"))
            if per_ratio and "_vae" not in key:
                assert square[suffixed] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    mixed = Evaluator(replace(cfg, aspect_ratios=list(RATIOS)), model.clip)
    results = mixed.run(model, tiny_datamodule(data, 8).eval_dataloader(16))
    assert {r: results[f"eval_detail/fid_real_matched_ar{r}"] for r in RATIOS} == {"1:1": 1.0, "2:1": 0.0, "1:2": 0.0}
    assert {r: results[f"eval_detail/fid_real_n_ar{r}"] for r in RATIOS} == {r: 16.0 for r in RATIOS}
    words = describe_fid_reals(results)
    assert words["1:1"] == "the 16 real val images of aspect ratio 1:1"
    assert words["2:1"].startswith("all 16 real val images")
    # the 2:1 FID is against all real images: recomputed so
    batches = list(tiny_datamodule(data, 16).eval_dataloader(16))
    real = torch.cat([((b["image"].float() + 1) / 2).clamp(0, 1) for b in batches])
    keys = [k for b in batches for k in b["key"]]
    captions = [c for b in batches for c in b["caption"]]
    images = to_uint8(model.sample(captions, guidance=3.0, steps=2, seed=[sample_seed(k, 0) for k in keys],
                                   height=8, width=16)).float() / 255
    fid = FID(CLIPFeatures(model.clip))
    fid.update(real, real=True)
    fid.update(images[..., :, 4:12], real=False)  # the centre 8 x 8 square
    assert results["eval/fid_clip_g3.0_ar2:1"] == pytest.approx(fid.compute().item(), rel=1e-5)


def test_evaluate_command_with_aspect_ratios(ldm_ckpt, mixed_data, tmp_path, capsys):
    from lit_diffusion.cli import main

    out = tmp_path / "eval.json"
    args = ["evaluate", "--ckpt", str(ldm_ckpt), "--data", str(mixed_data / "val-*.tar"), "--num-samples", "12",
            "--guidance", "1,3", "--steps", "2", "--batch-size", "6", "--cache-dir", str(tmp_path / "cache")]
    main([*args, "--aspect-ratios", "1:1,2:1,1:2", "--json", str(out)])
    figures = json.loads(out.read_text())
    printed = json.loads(capsys.readouterr().out)
    for key in ("eval/fid_clip_g3.0", "eval/fid_clip_g3.0_ar2:1", "eval/clip_score_g1.0_ar1:2",
                "eval/caption_acc_g3.0_ar1:1", "eval_detail/caption_two_objects_g3.0_ar2:1"):
        assert isinstance(figures[key], float) and printed[key] == figures[key], key
    n = {r: int(figures[f"eval_detail/fid_real_n_ar{r}"]) for r in RATIOS}
    assert sum(n.values()) == 12
    for r in RATIOS:
        words = f"the {n[r]} real val images of aspect ratio {r}" if n[r] >= 2 else "all 12 real val images"
        assert figures["fid_real_per_aspect_ratio"][r].startswith(words)
    assert printed["fid_real_per_aspect_ratio"] == figures["fid_real_per_aspect_ratio"]
    assert (tmp_path / f"fid_clip_vs_clip_score_{out.stem}.png").is_file()  # named after --json
    assert not (tmp_path / "eval_final.json").exists()

    with pytest.raises(SystemExit):
        main([*args, "--aspect-ratios", "1:1,8:1"])
    assert "--aspect-ratios 8:1 at the base size 16x16 px" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--aspect-ratios", "1:1,2x1"])
    assert "argument --aspect-ratios: aspect ratio '2x1' is not W:H" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--aspect-ratios", "2:1", "--save-images", str(tmp_path / "images")])
    assert "--save-images with --aspect-ratios is not supported" in capsys.readouterr().err


def test_in_loop_evaluation_per_aspect_ratio_also_logs_the_models_own_guidance_unsuffixed(tiny_ckpts, mixed_data,
                                                                                           tmp_path):
    from types import SimpleNamespace

    from lit_diffusion.callbacks.evaluation import DiffusionEvaluation

    model = make_ldm(tiny_ckpts, guidance=3.0)
    randomise_unet(model)
    model.eval()
    callback = DiffusionEvaluation(guidance=[1.0], num_samples=8, steps=2, cache_dir=None, aspect_ratios=["2:1", "1:1"])
    dm = ImageCaptionDataModule(val_urls=str(mixed_data / "val-*.tar"), image_size=16, batch_size=4, num_workers=0)
    trainer = SimpleNamespace(global_step=5, datamodule=dm, is_global_zero=True, loggers=[], callbacks=[],
                              default_root_dir=str(tmp_path))
    results = callback.evaluate(trainer, model)
    for r in ("2:1", "1:1"):
        for key in ("eval/fid_clip", "eval/clip_score", "eval/caption_acc"):
            assert results[f"{key}_ar{r}"] == results[f"{key}_g3.0_ar{r}"]
            assert f"{key}_g1.0_ar{r}" in results
    assert results["eval/fid_clip"] == results["eval/fid_clip_g3.0"]
    written = json.loads((tmp_path / "eval" / "eval_step0000005.json").read_text())
    assert written["eval/fid_clip_ar2:1"] == results["eval/fid_clip_ar2:1"]
    assert set(written["fid_real_per_aspect_ratio"]) == {"2:1", "1:1"}
    assert (tmp_path / "eval" / "fid_clip_vs_clip_score_step0000005.png").is_file()


# ------------------------------------------------------------------------------------------------------ two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_evaluate(rank, world, port, model, data, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = Evaluator(cfg, model.clip).run(model, _loader(data, 5, cfg.num_samples))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_one_rank_figures_per_aspect_ratio(tiny_ckpts, mixed_data, tmp_path):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    model.eval()
    # 13 samples in batches of 5: the ranks hold 7 and 6, in batches of uneven sizes
    cfg = EvalConfig(guidance=[3.0], num_samples=13, backends=["clip"], sampler="ddim", steps=2, resolution=16,
                     aspect_ratios=list(RATIOS))
    one = Evaluator(cfg, model.clip).run(model, _loader(mixed_data, 5, 13))
    assert sum(one[f"eval_detail/fid_real_n_ar{r}"] for r in RATIOS) == 13
    mp.start_processes(_ddp_evaluate, args=(2, _free_port(), model, mixed_data, cfg, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) == set(one)
    for key, value in one.items():
        if key != "eval/seconds":
            for r in ranks:
                assert r[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_log_aspect_ties_are_decided_exactly():
    """3:2 at base 20 with multiples of 4: of 16 or 20 x 24 or 28 the exact 16 x 24 wins; 1:1 at base 20 with
    multiples of 8: 16 x 16 and 24 x 24 are both exactly square, and the area nearer base**2 in log wins."""
    assert aspect_size("3:2", 20, 4) == (16, 24)
    h, w = aspect_size("1:1", 20, 8)  # 16 x 16 (0.64 of the area) and 24 x 24 (1.44): 24 x 24 is nearer in log
    assert (h, w) == (24, 24) and Fraction(24 * 24, 400) < Fraction(400, 16 * 16)
