"""unCLIP's decoder: the diffusion stage conditioned on a CLIP image embedding (`condition: text+image_embedding` or
`image_embedding`), both denoisers; its condition dropout rates, guidance's unconditional branch, sampling from its
checkpoint alone, and the errors that name what is missing."""

import shutil

import lightning as L
import pytest
import torch
from conftest import TINY_DIT, TINY_UNET

from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.dit import DiT
from lit_diffusion.models.layers import ImageEmbedder
from lit_diffusion.models.unet import UNet
from lit_diffusion.stages.ldm import LatentDiffusionModule


def _data(latents, batches=4):
    return LatentDataModule(train_urls=str(latents / "train" / "*.tar"), val_urls=str(latents / "val" / "*.tar"),
                            batch_size=64, num_workers=0, train_batches_per_epoch=batches)


def _decoder(ckpts, net="unet", **kwargs):
    torch.manual_seed(0)
    nets = {"unet": {"unet": TINY_UNET}, "dit": {"dit": TINY_DIT}}[net]
    return LatentDiffusionModule(clip_ckpt=str(ckpts["clip"]), vae_ckpt=str(ckpts["vae"]), image_size=16,
                                 warmup_steps=0, **{"condition": "text+image_embedding", "p_uncond": 0.5, **nets,
                                                    **kwargs})


@pytest.mark.parametrize("cls,cfg", [(UNet, TINY_UNET), (DiT, TINY_DIT)], ids=["unet", "dit"])
def test_both_denoisers_take_the_embedding_through_time_and_four_context_tokens(cls, cfg):
    torch.manual_seed(0)
    net = cls({**cfg, "in_channels": 4, "out_channels": 4, "context_dim": 8, "image_embedding_dim": 6})
    assert isinstance(getattr(net, "image_embed", None) or net.image_embedder, ImageEmbedder)
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised outputs would hide any condition
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    text = Conditioning(context=torch.randn(2, 3, 8), mask=torch.ones(2, 3, dtype=torch.bool))
    e = torch.nn.functional.normalize(torch.randn(2, 6), dim=-1)
    out = net(x, t, text.replace(image_embedding=e))
    assert not torch.allclose(out, net(x, t, text.replace(image_embedding=e.flip(0))))
    # a zero row is "no embedding": the learned null embedding, the same as giving it explicitly
    embedder = net.image_embed if cls is UNet else net.image_embedder
    null = torch.nn.functional.normalize(embedder.null.detach(), dim=0) * embedder.null.norm()  # = null
    torch.testing.assert_close(net(x, t, text.replace(image_embedding=torch.zeros(2, 6))),
                               net(x, t, text.replace(image_embedding=null.expand(2, 6))))
    add, tokens = embedder(e)
    assert tokens.shape == (2, 4, 8)  # DALL-E 2's four extra tokens, at the context's width
    with pytest.raises(ValueError, match=r"needs cond.image_embedding \[2, 6\], got None"):
        net(x, t, text)
    plain = cls({**cfg, "in_channels": 4, "out_channels": 4, "context_dim": 8})
    with pytest.raises(ValueError, match="got an image embedding .* but has no image_embedding_dim"):
        plain(x, t, text.replace(image_embedding=e))


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conds = []

    def forward(self, x_t, t, cond):
        self.conds.append(cond)
        return torch.zeros_like(x_t)


def test_caption_and_embedding_are_dropped_at_their_own_rates_independently(tiny_ckpts, embedded_latents):
    """DALL-E 2's decoder: the caption dropped 50% of the time, the image embedding 10%, independently."""
    model = _decoder(tiny_ckpts, p_uncond_image=0.1)
    data = _data(embedded_latents, batches=40)
    data.setup("fit")
    recorder = Recorder()
    model.__dict__["denoiser"] = recorder  # an instance attribute wins over the method
    null = model.null_cond(1)
    torch.manual_seed(1)
    batches = [b for _, b in zip(range(40), data.train_dataloader())]
    for batch in batches:
        model.model_step(batch, train=True)
    text_dropped, image_dropped = [], []
    for batch, cond in zip(batches, recorder.conds):
        n = null.context.shape[1]
        is_null = (cond.context[:, :n] == null.context[0]).flatten(1).all(1) & ~cond.mask[:, n:].any(1)
        text_dropped.append(is_null)
        image_dropped.append((cond.image_embedding == 0).all(1))
        kept = ~(cond.image_embedding == 0).all(1)
        torch.testing.assert_close(cond.image_embedding[kept], batch["image_embedding"][kept])
    text, image = torch.cat(text_dropped).float(), torch.cat(image_dropped).float()
    n = len(text)
    assert n == 40 * 64
    se = lambda p: (p * (1 - p) / n) ** 0.5  # noqa: E731
    assert abs(text.mean() - 0.5) < 4 * se(0.5)
    assert abs(image.mean() - 0.1) < 4 * se(0.1)
    assert abs((text * image).mean() - 0.05) < 4 * se(0.05)  # independent draws: both dropped 5% of the time


@pytest.mark.parametrize("net", ["unet", pytest.param("dit", marks=pytest.mark.slow)])  # the DiT: 36 s, slow
def test_the_decoder_trains_and_samples_alone_with_guidance_against_the_null_embedding(tiny_ckpts, embedded_latents,
                                                                                       tmp_path, net):
    root = tmp_path
    for name in ("clip", "vae"):
        shutil.copy(tiny_ckpts[name], root / f"{name}.ckpt")
    ckpts = {"clip": root / "clip.ckpt", "vae": root / "vae.ckpt"}
    model = _decoder(ckpts, net=net, sample_steps=3, sampler="ddim")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(model, datamodule=_data(embedded_latents))
    trainer.save_checkpoint(root / "decoder.ckpt")
    for name in ("clip", "vae"):
        (root / f"{name}.ckpt").unlink()
    loaded = LatentDiffusionModule.from_checkpoint(root / "decoder.ckpt")
    assert loaded.image_conditioned and loaded.hparams.condition == "text+image_embedding"
    images = torch.rand(2, 3, 16, 16)
    e = loaded.encode_image_embeddings(images)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    out = loaded.sample(["a red circle", "a blue square"], image_embeddings=e, seed=[1, 2], guidance=3.0)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(model.eval().sample(["a red circle", "a blue square"], image_embeddings=e,
                                                   seed=[1, 2], guidance=3.0), out)
    # guidance's batch is [uncond; cond]: the unconditional half has the null (zero) embedding and the empty caption
    recorder = Recorder()
    loaded.__dict__["denoiser"] = recorder
    loaded.sample(["a red circle", "a blue square"], image_embeddings=e, seed=[1, 2], guidance=3.0, steps=1)
    both = recorder.conds[0]
    assert (both.image_embedding[:2] == 0).all()
    torch.testing.assert_close(both.image_embedding[2:], e)
    with pytest.raises(ValueError, match="unCLIP's decoder .* needs CLIP image embeddings"):
        loaded.sample(["a red circle"])


def test_image_guidance_guides_the_embedding_apart_from_the_caption(tiny_ckpts):
    """`image_guidance` (a sample argument, or the stage's default from its config): the image embedding's own scale;
    equal to `guidance` it is the one-scale guidance."""
    from conftest import randomise_unet

    def decoder(**kwargs):
        model = _decoder(tiny_ckpts, sample_steps=2, sampler="ddim", **kwargs).eval()
        torch.manual_seed(1)
        randomise_unet(model)  # zero-initialised output layers would hide the conditions
        return model

    model = decoder()
    e = torch.nn.functional.normalize(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompts = ["a red circle", "a blue square"]
    one = model.sample(prompts, image_embeddings=e, seed=[1, 2], guidance=3.0)
    torch.testing.assert_close(model.sample(prompts, image_embeddings=e, seed=[1, 2], guidance=3.0,
                                            image_guidance=3.0), one)
    apart = model.sample(prompts, image_embeddings=e, seed=[1, 2], guidance=3.0, image_guidance=1.0)
    assert (apart - one).abs().max() > 1e-3
    torch.testing.assert_close(decoder(image_guidance=1.0).sample(prompts, image_embeddings=e, seed=[1, 2],
                                                                  guidance=3.0), apart)
    # with the empty caption there is no caption to guide apart: image_guidance is the one scale
    empty = model.sample(["", ""], image_embeddings=e, seed=[1, 2], guidance=3.0, image_guidance=2.0)
    torch.testing.assert_close(empty, model.sample(["", ""], image_embeddings=e, seed=[1, 2], guidance=2.0))
    # the model's default image_guidance is for captions: without one, `guidance` stays the scale
    torch.testing.assert_close(decoder(image_guidance=2.0).sample(["", ""], image_embeddings=e, seed=[1, 2],
                                                                  guidance=3.0),
                               model.sample(["", ""], image_embeddings=e, seed=[1, 2], guidance=3.0))
    for condition in ("text", "image_embedding"):
        with pytest.raises(ValueError, match=f"image_guidance guides the image embedding apart from the caption: it "
                                             f"needs condition text\\+image_embedding .*not '{condition}'"):
            _decoder(tiny_ckpts, condition=condition, image_guidance=1.0)
    with pytest.raises(ValueError, match="never sees a caption"):
        decoder(condition="image_embedding").sample(["a red circle"], image_embeddings=e[:1], image_guidance=2.0)
    with pytest.raises(ValueError, match="image_guidance guides an image embedding: this model is conditioned on "
                                         "text only"):
        _decoder(tiny_ckpts, condition="text").sample(["a red circle"], image_guidance=2.0)


def test_image_embedding_only_never_shows_the_caption(tiny_ckpts, embedded_latents):
    model = _decoder(tiny_ckpts, condition="image_embedding", p_uncond=0.0, p_uncond_image=0.0)
    data = _data(embedded_latents)
    data.setup("fit")
    recorder = Recorder()
    model.__dict__["denoiser"] = recorder  # an instance attribute wins over the method
    model.model_step(next(iter(data.train_dataloader())), train=True)
    null = model.null_cond(1)
    n = null.context.shape[1]
    assert (recorder.conds[0].context[:, :n] == null.context[0]).all()


def test_a_negative_prompt_for_an_image_embedding_only_decoder_is_said_to_do_nothing(tiny_ckpts, caplog):
    import logging

    model = _decoder(tiny_ckpts, condition="image_embedding")
    e = torch.nn.functional.normalize(torch.randn(1, model.clip.embed_dim, generator=torch.Generator().manual_seed(0)),
                                      dim=-1)
    with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
        with_negative = model.sample([""], negative_prompts="a red circle", image_embeddings=e, steps=2, seed=[3])
    assert any("the negative prompt does not steer it" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(with_negative, model.sample([""], image_embeddings=e, steps=2, seed=[3]))


def test_text_only_shards_and_settings_are_refused_naming_the_fix(tiny_ckpts, tmp_path):
    from lit_diffusion.cli import main

    data = tiny_ckpts["data"]
    out = tmp_path / "latents"
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--train", str(data / "train-*.tar"), "--val", str(data / "val-*.tar"), "--out", str(out),
          "--image-size", "16", "--batch-size", "64", "--device", "cpu"])
    model = _decoder(tiny_ckpts)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"decoder \(model.init_args.condition: text\+image_embedding\).*"
                                         r"data encode --image-embeddings"):
        trainer.fit(model, datamodule=_data(out))
    with pytest.raises(ValueError, match="model.init_args.condition: 'image' is not one of"):
        _decoder(tiny_ckpts, condition="image")
    text_model = _decoder(tiny_ckpts, condition="text")
    with pytest.raises(ValueError, match="conditioned on text only"):
        text_model.sample(["a red circle"], image_embeddings=torch.zeros(1, 32))
