"""unCLIP's evaluation: the Evaluator feeds the decoder the true CLIP embeddings of the val images or a prior's (with
the per-key seeds), one process equals the data split in two (and two ranks); `evaluate --prior` and its refusals;
within-caption diversity and variation fidelity against hand computations on fakes whose outputs we control."""

import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import TINY_DIT, TINY_UNET, randomise_unet, tiny_datamodule

from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.data.shapes import render, sample_attrs
from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator, load_prior_for, sample_seed
from lit_diffusion.evaluation.unclip_metrics import (
    decoder_variations,
    unclip_generate,
    variation_metrics,
    within_caption_diversity,
)
from lit_diffusion.metrics.caption_accuracy import check_image
from lit_diffusion.metrics.features import to_uint8
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.prior import DiffusionPriorModule

TINY_PRIOR = dict(width=32, depth=2, heads=2)


# ------------------------------------------------------------------- a tiny decoder and prior (tests/test_decoder.py,
# tests/test_prior.py)
def _data(latents, batches=4, batch_size=64):
    return LatentDataModule(train_urls=str(latents / "train" / "*.tar"), val_urls=str(latents / "val" / "*.tar"),
                            batch_size=batch_size, num_workers=0, train_batches_per_epoch=batches)


def _decoder(ckpts, net="unet", **kwargs):
    torch.manual_seed(0)
    nets = {"unet": {"unet": TINY_UNET}, "dit": {"dit": TINY_DIT}}[net]
    return LatentDiffusionModule(clip_ckpt=str(ckpts["clip"]), vae_ckpt=str(ckpts["vae"]), image_size=16,
                                 warmup_steps=0, **{"condition": "text+image_embedding", "p_uncond": 0.5, **nets,
                                                    **kwargs})


def _trainer(root, steps):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=str(root))


@pytest.fixture(scope="module")
def stack(tiny_ckpts, embedded_latents, tmp_path_factory):
    """decoder.ckpt (briefly trained, its zero-initialised outputs randomised so that the embedding shows) and
    prior.ckpt (trained 10 steps), both with the tiny CLIP."""
    root = tmp_path_factory.mktemp("unclip_stack")
    decoder = _decoder(tiny_ckpts, sample_steps=2, sampler="ddim")
    randomise_unet(decoder)
    trainer = _trainer(root, 1)
    trainer.fit(decoder, datamodule=_data(embedded_latents))
    trainer.save_checkpoint(root / "decoder.ckpt")
    torch.manual_seed(0)
    prior = DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior=TINY_PRIOR, sample_steps=3,
                                 warmup_steps=0, lr=1e-3)
    trainer = _trainer(root, 10)
    trainer.fit(prior, datamodule=_data(embedded_latents, batches=5, batch_size=16))
    trainer.save_checkpoint(root / "prior.ckpt")
    return {"decoder": root / "decoder.ckpt", "prior": root / "prior.ckpt", "data": tiny_ckpts["data"]}


def _load(stack):
    return (LatentDiffusionModule.from_checkpoint(stack["decoder"]),
            DiffusionPriorModule.from_checkpoint(stack["prior"]))


def record(module, name="sample"):
    """Wrap `module.<name>`: every call's prompts, keyword arguments and output, in order."""
    calls, method = [], getattr(module, name)

    def wrapper(prompts, *args, **kwargs):
        out = method(prompts, *args, **kwargs)
        calls.append({"prompts": list(prompts), **kwargs, "out": out})
        return out

    module.__dict__[name] = wrapper  # an instance attribute wins over the method
    return calls


CFG = EvalConfig(guidance=[1.0, 3.0], num_samples=12, backends=["clip"], sampler="ddim", steps=2, cache_dir=None,
                 resolution=16)


def _real(batch):
    return ((batch["image"].float() + 1) / 2).clamp(0, 1)


# ------------------------------------------------------------------------------------------- the Evaluator
def test_without_a_prior_the_decoder_is_fed_the_clip_embeddings_of_the_batchs_real_images(stack):
    model, _ = _load(stack)
    calls = record(model)
    dm = tiny_datamodule(stack["data"], batch_size=5)
    results = Evaluator(CFG, model.clip).run(model, dm.eval_dataloader(12))
    assert results["eval_detail/image_embeddings_from_prior"] == 0.0
    assert results["eval/num_samples"] == 12
    batches = list(dm.eval_dataloader(12))
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    assert len(calls) == len(batches) * len(CFG.guidance)  # every sample call, at every scale
    for i, batch in enumerate(batches):
        want = model.clip.encode_image(_real(batch) * 2 - 1).float()  # CLIP's own view of the real images
        for call in calls[i * 2:(i + 1) * 2]:
            assert call["prompts"] == list(batch["caption"])
            assert call["seed"] == [sample_seed(k, CFG.seed) for k in batch["key"]]
            torch.testing.assert_close(call["image_embeddings"], want, rtol=0, atol=0)
        assert [c["guidance"] for c in calls[i * 2:(i + 1) * 2]] == [1.0, 3.0]
    # the embeddings are the samples' own: the first two real images are different, and so are their embeddings
    assert not torch.allclose(calls[0]["image_embeddings"][0], calls[0]["image_embeddings"][1])


def test_with_a_prior_the_decoder_is_fed_the_priors_embeddings_drawn_with_the_per_key_seeds(stack):
    model, prior = _load(stack)
    calls, prior_calls = record(model), record(prior)
    dm = tiny_datamodule(stack["data"], batch_size=5)
    results = Evaluator(CFG, model.clip).run(model, dm.eval_dataloader(12), prior=prior)
    assert results["eval_detail/image_embeddings_from_prior"] == 1.0
    batches = list(dm.eval_dataloader(12))
    assert len(prior_calls) == len(batches)  # one draw per caption, shared by every guidance scale
    for i, (batch, drawn) in enumerate(zip(batches, prior_calls)):
        seeds = [sample_seed(k, CFG.seed) for k in batch["key"]]
        assert drawn["prompts"] == list(batch["caption"]) and drawn["seed"] == seeds
        for call in calls[i * 2:(i + 1) * 2]:
            assert call["seed"] == seeds
            torch.testing.assert_close(call["image_embeddings"], drawn["out"], rtol=0, atol=0)
        # ... which are not the true embeddings
        assert not torch.allclose(drawn["out"], model.encode_image_embeddings(_real(batch)), atol=1e-3)
    torch.testing.assert_close(prior_calls[0]["out"].norm(dim=-1), torch.ones(5))


def test_a_text_only_model_takes_no_prior_and_is_called_as_before(stack, tiny_ckpts):
    _, prior = _load(stack)
    text = _decoder(tiny_ckpts, condition="text", sample_steps=2, sampler="ddim")
    with pytest.raises(ValueError, match="conditioned on text only"):
        Evaluator(CFG, text.clip).run(text, [], prior=prior)
    with pytest.raises(ValueError, match=r"--prior .*prior.ckpt: .*ldm.ckpt is conditioned on text only"):
        load_prior_for(text, "ldm.ckpt", stack["prior"])
    calls = record(text)
    results = Evaluator(replace(CFG, num_samples=4), text.clip).run(text, tiny_datamodule(stack["data"], 4)
                                                                    .eval_dataloader(4))
    assert all("image_embeddings" not in c for c in calls)
    assert "eval_detail/image_embeddings_from_prior" not in results


def _split(batch: dict, at: int) -> tuple[dict, dict]:
    def part(v, sl):
        return v[sl] if isinstance(v, (torch.Tensor, list, tuple)) else v

    return ({k: part(v, slice(None, at)) for k, v in batch.items()},
            {k: part(v, slice(at, None)) for k, v in batch.items()})


@pytest.mark.parametrize("with_prior", [False, True], ids=["true_embeddings", "prior"])
def test_one_process_equals_the_data_split_in_two_halves(stack, with_prior):
    """What two ranks do: each half of the captions evaluated on its own gives each caption the same embedding and
    the same image as the whole."""
    model, prior = _load(stack)
    prior = prior if with_prior else None
    (whole,) = list(tiny_datamodule(stack["data"], batch_size=12).eval_dataloader(12))
    halves = _split(whole, 7)
    calls = record(model)
    cfg = replace(CFG, guidance=[3.0])
    Evaluator(cfg, model.clip).run(model, [whole], prior=prior)
    for half in halves:
        Evaluator(cfg, model.clip).run(model, [half], prior=prior)
    one, two = calls[0], calls[1:]
    assert [len(c["prompts"]) for c in two] == [7, 5]
    torch.testing.assert_close(torch.cat([c["image_embeddings"] for c in two]), one["image_embeddings"],
                               rtol=1e-5, atol=1e-6)
    assert (to_uint8(torch.cat([c["out"] for c in two])).int() - to_uint8(one["out"]).int()).abs().max() <= 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_evaluate(rank, world, port, model, prior, data, cfg, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = Evaluator(cfg, model.clip).run(model, tiny_datamodule(data, 5).eval_dataloader(cfg.num_samples),
                                                 prior=prior)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("with_prior", [False, True], ids=["true_embeddings", "prior"])
def test_two_ranks_give_the_one_rank_figures(stack, tmp_path, with_prior):
    model, prior = _load(stack)
    prior = prior if with_prior else None
    cfg = replace(CFG, guidance=[3.0], num_samples=12)
    one = Evaluator(cfg, model.clip).run(model, tiny_datamodule(stack["data"], 5).eval_dataloader(12), prior=prior)
    mp.start_processes(_ddp_evaluate, args=(2, _free_port(), model, prior, stack["data"], cfg, str(tmp_path)),
                       nprocs=2, join=True, start_method="fork")
    for r in range(2):
        two = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for key, value in one.items():
            if key.startswith("eval") and key != "eval/seconds":
                assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_in_loop_callback_evaluates_a_decoder_with_the_true_embeddings(tiny_ckpts, embedded_latents, tmp_path):
    from lit_diffusion.callbacks.evaluation import DiffusionEvaluation

    model = _decoder(tiny_ckpts, sample_steps=2, sampler="ddim")
    evaluation = DiffusionEvaluation(every_n_steps=0, guidance=[1.0], num_samples=8, cache_dir=None)
    calls = record(model)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[evaluation], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=_data(embedded_latents))
    (results,) = evaluation.history
    assert results["eval_detail/image_embeddings_from_prior"] == 0.0
    assert results["eval/num_samples"] == 8 and math.isfinite(results["eval/fid_clip_g1.0"])
    assert calls and all(c["image_embeddings"].shape == (len(c["prompts"]), 32) for c in calls)


# --------------------------------------------------------------------------------- evaluate --prior, refusals
def test_evaluate_passes_the_prior_through_and_refuses_one_with_another_clip(stack, tmp_path, capsys):
    from lit_diffusion.cli import main

    data = stack["data"]
    args = ["evaluate", "--ckpt", str(stack["decoder"]), "--data", str(data / "val-*.tar"), "--num-samples", "4",
            "--guidance", "3", "--sampler", "ddim", "--steps", "2", "--batch-size", "4", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]
    main([*args, "--prior", str(stack["prior"]), "--json", str(tmp_path / "prior.json")])
    main([*args, "--json", str(tmp_path / "true.json")])
    with_prior = json.loads((tmp_path / "prior.json").read_text())
    true = json.loads((tmp_path / "true.json").read_text())
    assert with_prior["eval_detail/image_embeddings_from_prior"] == 1.0
    assert true["eval_detail/image_embeddings_from_prior"] == 0.0
    # the figures are those of the stack: the Evaluator given the prior
    model, prior = _load(stack)
    cfg = replace(CFG, guidance=[3.0], num_samples=4)
    direct = Evaluator(cfg, model.clip).run(model, tiny_datamodule(data, 4).eval_dataloader(4), prior=prior)
    assert with_prior["eval/fid_clip_g3.0"] == pytest.approx(direct["eval/fid_clip_g3.0"], rel=1e-5)
    assert with_prior["eval/fid_clip_g3.0"] != pytest.approx(true["eval/fid_clip_g3.0"], rel=1e-3)

    # a prior whose CLIP weights are not the decoder's
    ckpt = torch.load(stack["prior"], map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if k.startswith("clip.") and v.is_floating_point())
    ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.01
    other = tmp_path / "other_prior.ckpt"
    torch.save(ckpt, other)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--prior", str(other)])
    err = capsys.readouterr().err
    assert "other_prior.ckpt" in err and "decoder.ckpt" in err and "CLIP weights" in err


# ------------------------------------------------------------------------------------------------ diversity
class ColourCLIP:
    """A stand-in CLIP: an image's embedding is its mean colour in [-1, 1], (normalised by the metric)."""

    def encode_image(self, images):
        return images.mean(dim=(2, 3))


def flat(colours) -> torch.Tensor:
    """Flat images [N, 3, 4, 4] of RGB colours given in 0..255 (exact under uint8 quantisation)."""
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 4, 4) / 255


def _unit(rgb):
    return F.normalize(torch.tensor(rgb, dtype=torch.float64) / 255 * 2 - 1, dim=0)


def test_diversity_is_zero_for_identical_images_and_the_mean_pairwise_distance_by_hand():
    seen = []

    def same(captions, seeds):
        seen.append((list(captions), list(seeds)))
        return flat([[255, 0, 0]] * len(captions))

    out = within_caption_diversity(same, ["a", "b"], ColourCLIP(), per_caption=3)
    assert out["diversity"] == 0.0 and out["diversity_se"] == 0.0 and out["captions"] == 2
    assert [c for c, _ in seen] == [["a"] * 3, ["b"] * 3]
    assert len(set(seen[0][1])) == 3  # one seed per sample
    within_caption_diversity(same, ["b", "c"], ColourCLIP(), per_caption=3)
    assert seen[2] == seen[1]  # "b"'s seeds are keyed by the caption, not its position in the list
    assert seen[1][1] == [sample_seed(f"b#{j}", 0) for j in range(3)]

    # caption "two": two known embeddings; caption "four": four colours, six pairs
    colours = {"two": [[255, 0, 0], [0, 0, 255]], "four": [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]}

    def known(captions, seeds):
        return flat(colours[captions[0]][:len(captions)])

    two = within_caption_diversity(known, ["two"], ColourCLIP(), per_caption=2)
    assert two["diversity"] == pytest.approx(float((_unit([255, 0, 0]) - _unit([0, 0, 255])).norm()), abs=1e-6)
    assert math.isnan(two["diversity_se"])  # one caption: no spread to estimate
    both = within_caption_diversity(known, ["four", "two"], ColourCLIP(), per_caption=2)
    four = within_caption_diversity(known, ["four"], ColourCLIP(), per_caption=4)
    units = [_unit(c) for c in colours["four"]]
    by_hand = np.mean([float((units[i] - units[j]).norm()) for i in range(4) for j in range(i + 1, 4)])
    assert four["diversity"] == pytest.approx(by_hand, abs=1e-6)
    per = [float((_unit([255, 0, 0]) - _unit([0, 255, 0])).norm()), two["diversity"]]  # "four"'s first two
    assert both["diversity"] == pytest.approx(np.mean(per), abs=1e-6)
    assert both["diversity_se"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(2), abs=1e-6)
    with pytest.raises(ValueError, match="per_caption must be >= 2"):
        within_caption_diversity(known, ["two"], ColourCLIP(), per_caption=1)


def test_diversity_of_the_real_stack_is_positive_and_reproducible(stack):
    model, prior = _load(stack)
    generate = unclip_generate(model, prior, guidance=3.0, steps=2)
    first = within_caption_diversity(generate, ["a red circle", "a small blue square"], model.clip, per_caption=3)
    again = within_caption_diversity(generate, ["a red circle", "a small blue square"], model.clip, per_caption=3)
    assert first["diversity"] > 0 and first == again
    with pytest.raises(ValueError, match="needs a prior"):
        unclip_generate(model)


# ------------------------------------------------------------------------------------------------ variations
@pytest.fixture(scope="module")
def shapes_sources():
    """Real shapes images at 32 px (judged correct on every attribute: tests/test_caption_accuracy.py)."""
    rng = random.Random(3)
    attrs = [sample_attrs(rng, 32) for _ in range(6)]
    images = torch.stack([torch.from_numpy(np.array(render(a, 32))).permute(2, 0, 1).float() / 255 for a in attrs])
    return images, attrs


@pytest.fixture(scope="module")
def tiny_clip(tiny_ckpts):
    return CLIPModule.from_checkpoint(tiny_ckpts["clip"])


def test_variations_that_are_their_sources_score_the_judges_accuracy_on_the_real_images(shapes_sources, tiny_clip):
    images, attrs = shapes_sources
    asked = []

    def themselves(x, per_image, seed):
        asked.append((x.shape[0], per_image, seed))
        return x.repeat_interleave(per_image, dim=0)

    out = variation_metrics(themselves, images, attrs, tiny_clip, per_image=3, seed=5)
    assert asked == [(6, 3, 5)]
    assert out["similarity"] == pytest.approx(1.0, abs=1e-6) and out["spread"] == pytest.approx(0.0, abs=1e-6)
    for key in ("colors", "shapes", "sizes", "correct"):
        assert out[f"source_acc_{key}"] == 1.0, key
        assert out[f"acc_{key}"] == 1.0 and out[f"acc_{key}_se"] == 0.0, key
    assert (out["sources"], out["variations"], out["judged"]) == (6, 18, 6)


def test_variations_of_other_images_score_lower_by_hand_in_image_major_order(shapes_sources, tiny_clip):
    images, attrs = shapes_sources
    others = images.roll(1, dims=0)  # source i's "variation" 1 is image i - 1

    def half_other(x, per_image, seed):  # source i: [itself, image i - 1], image-major
        return torch.stack([x, others], dim=1).reshape(-1, *x.shape[1:])

    out = variation_metrics(half_other, images, attrs, tiny_clip, per_image=2)
    with torch.no_grad():
        e = F.normalize(tiny_clip.encode_image(images * 2 - 1).double(), dim=-1)
    e_other = e.roll(1, dims=0)
    per_source = ((1 + (e * e_other).sum(-1)) / 2).numpy()
    assert out["similarity"] == pytest.approx(per_source.mean(), abs=1e-5)
    assert out["similarity"] < 0.999
    assert out["similarity_se"] == pytest.approx(per_source.std(ddof=1) / math.sqrt(6), abs=1e-5)
    assert out["spread"] == pytest.approx(float((e - e_other).norm(dim=-1).mean()), abs=1e-5)
    for key in ("colors", "shapes", "correct"):
        hand = [(1 + float(check_image(o, a)[key])) / 2 for o, a in zip(others, attrs)]
        assert out[f"acc_{key}"] == pytest.approx(np.mean(hand)), key
    assert out["acc_colors"] < 1.0 and out["acc_correct"] < 1.0

    # unjudgeable sources (no shapes attrs) still count for similarity, not for accuracy
    partial = variation_metrics(half_other, images, [None, *attrs[1:]], tiny_clip, per_image=2)
    assert partial["judged"] == 5 and partial["similarity"] == pytest.approx(out["similarity"])
    with pytest.raises(ValueError, match="returned 6 images for 6 sources x 2"):
        variation_metrics(lambda x, p, s: x, images, attrs, tiny_clip, per_image=2)


def test_decoder_variations_condition_on_each_sources_embedding_image_major(stack, shapes_sources):
    model, _ = _load(stack)
    images = shapes_sources[0][:2]
    calls = record(model)
    make = decoder_variations(model, steps=2)
    out = make(images, 3, 0)
    assert out.shape == (6, 3, 16, 16)
    emb = model.encode_image_embeddings(images)
    torch.testing.assert_close(calls[0]["image_embeddings"], emb.repeat_interleave(3, dim=0))
    assert calls[0]["prompts"] == [""] * 6 and len(set(calls[0]["seed"])) == 6
    torch.testing.assert_close(make(images, 3, 0), out)
    result = variation_metrics(make, images, shapes_sources[1][:2], model.clip, per_image=3)
    assert 0 < result["spread"] and -1 <= result["similarity"] <= 1
