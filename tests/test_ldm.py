import shutil

import pytest
import torch
from conftest import randomise_unet, TINY_UNET, _fit, tiny_datamodule

from lit_diffusion.stages.common import CheckpointError
from lit_diffusion.stages.ldm import LatentDiffusionModule


def make_ldm(ckpts, **kwargs):
    torch.manual_seed(0)
    args = dict(clip_ckpt=str(ckpts["clip"]), vae_ckpt=str(ckpts["vae"]), image_size=16, unet=TINY_UNET,
                sample_steps=4, warmup_steps=0)
    args.update(kwargs)
    return LatentDiffusionModule(**args)


def test_missing_or_wrong_stage_checkpoints_are_named(tiny_ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="clip checkpoint not found: .*nowhere.ckpt"):
        make_ldm(tiny_ckpts, clip_ckpt=str(tmp_path / "nowhere.ckpt"))
    with pytest.raises(CheckpointError, match=r"vae.ckpt is a 'vae' checkpoint, expected a 'clip' checkpoint"):
        make_ldm(tiny_ckpts, clip_ckpt=str(tiny_ckpts["vae"]))
    with pytest.raises(ValueError, match=r"unet.in_channels = 3 does not match the VAE's latent channels .* = 4"):
        make_ldm(tiny_ckpts, unet={**TINY_UNET, "in_channels": 3})
    with pytest.raises(ValueError, match=r"unet.context_dim = 7 does not match the CLIP text width"):
        make_ldm(tiny_ckpts, unet={**TINY_UNET, "context_dim": 7})
    with pytest.raises(ValueError, match="p_uncond"):
        make_ldm(tiny_ckpts, p_uncond=1.0)


def test_condition_dropout_replaces_captions_by_the_empty_caption(tiny_ckpts):
    model = make_ldm(tiny_ckpts, p_uncond=0.5)
    seen = []
    unet_forward = model.unet.forward

    def spy(x, t, context=None, context_mask=None):
        seen.append((context.detach().clone(), context_mask.clone()))
        return unet_forward(x, t, context, context_mask)

    model.unet.forward = spy
    captions = ["a large red circle"] * 200
    batch = {"image": torch.zeros(200, 3, 16, 16), "caption": captions}
    torch.manual_seed(1)
    model.model_step(batch, train=True)
    context, mask = seen[-1]
    cond_ctx, cond_mask = model.encode_prompts(captions[:1])
    null_ctx, null_mask = model.null_cond(1)
    is_null = torch.tensor([torch.equal(c, null_ctx[0]) and torch.equal(m, null_mask[0]) for c, m in zip(context, mask)])
    is_cond = torch.tensor([torch.equal(c, cond_ctx[0]) and torch.equal(m, cond_mask[0]) for c, m in zip(context, mask)])
    assert bool((is_null ^ is_cond).all())  # every row is exactly one of the two
    assert 0.35 < is_null.float().mean() < 0.65
    model.model_step(batch, train=False)  # validation never drops
    context, _ = seen[-1]
    assert all(torch.equal(c, cond_ctx[0]) for c in context)


def test_guidance_negative_prompt_and_per_sample_seeds(tiny_ckpts):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    prompts = ["a large red circle", "a small blue square"]
    both = model.sample(prompts, guidance=3.0, seed=[11, 12])
    assert both.shape == (2, 3, 16, 16) and 0 <= both.min() and both.max() <= 1
    one = model.sample(prompts[1:], guidance=3.0, seed=[12])
    torch.testing.assert_close(both[1:], one)  # independent of the batch it shares
    assert torch.equal(model.sample(prompts, guidance=3.0, seed=[11, 12]), both)  # deterministic (DDIM, eta=0)
    negative = model.sample(prompts, negative_prompts="a red circle", guidance=3.0, seed=[11, 12])
    assert (negative - both).abs().max() > 1e-4
    # guidance 1 is the conditional prediction alone: the negative prompt has no effect
    g1 = model.sample(prompts, guidance=1.0, seed=[11, 12])
    torch.testing.assert_close(model.sample(prompts, negative_prompts="a red circle", guidance=1.0, seed=[11, 12]), g1)
    assert (g1 - both).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        model.sample(prompts + ["x"], negative_prompts=["a", "b"])


def test_checkpoint_is_self_contained_and_holds_the_ema_weights(tiny_ckpts, tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging
    import lightning as L

    model = make_ldm(tiny_ckpts)
    ema = EMAWeightAveraging(decay=0.5)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ema], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=tiny_datamodule(tiny_ckpts["data"]))
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    raw = torch.load(tmp_path / "ldm.ckpt", weights_only=True)
    averaged = ema._average_model.module.unet.state_dict()
    for name, value in raw["state_dict"].items():
        if name.startswith("unet."):
            torch.testing.assert_close(value, averaged[name[5:]])
    # the stage-1/2 files are not needed any more: their weights and configs travel inside ldm.ckpt
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    clip_copy, vae_copy = shutil.copy(tiny_ckpts["clip"], moved), shutil.copy(tiny_ckpts["vae"], moved)
    loaded = LatentDiffusionModule.from_checkpoint(tmp_path / "ldm.ckpt")
    assert loaded.hparams.clip_ckpt == str(tiny_ckpts["clip"])
    reference = ema._average_model.module
    reference.eval()
    torch.testing.assert_close(loaded.sample(["a red circle"], seed=[3]), reference.sample(["a red circle"], seed=[3]))
    with pytest.raises(CheckpointError, match="is a 'ldm' checkpoint, expected a 'clip' checkpoint"):
        make_ldm(tiny_ckpts, clip_ckpt=str(tmp_path / "ldm.ckpt"))
    assert clip_copy and vae_copy
