import shutil

import pytest
import torch
from conftest import randomise_unet, TINY_UNET, tiny_datamodule

from lit_diffusion.diffusion import samplers
from lit_diffusion.diffusion.guidance import rescale_guidance
from lit_diffusion.stages.base import CheckpointError
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
    with pytest.raises(ValueError, match="unet.pooled_dim is set by model.init_args.pooled_text"):
        make_ldm(tiny_ckpts, unet={**TINY_UNET, "pooled_dim": 8})
    with pytest.raises(ValueError, match="unet.pooled_dim = 8 does not match the CLIP embedding width"):
        make_ldm(tiny_ckpts, unet={**TINY_UNET, "pooled_dim": 8}, pooled_text=True)
    with pytest.raises(ValueError, match="min_snr_plus_one needs model.init_args.prediction v or x0"):
        make_ldm(tiny_ckpts, prediction="eps", loss_weighting="min_snr_plus_one")


@pytest.mark.parametrize("pooled_text", [False, True])
def test_condition_dropout_replaces_captions_by_the_empty_caption(tiny_ckpts, pooled_text):
    model = make_ldm(tiny_ckpts, p_uncond=0.5, pooled_text=pooled_text)
    seen = []
    unet_forward = model.unet.forward

    def spy(x, t, cond):
        seen.append((cond.context.detach().clone(), cond.mask.clone(), cond.pooled))
        return unet_forward(x, t, cond)

    model.unet.forward = spy
    captions = ["a large red circle"] * 200
    batch = {"image": torch.zeros(200, 3, 16, 16), "caption": captions}
    torch.manual_seed(1)
    model.model_step(batch, train=True)
    context, mask, pooled = seen[-1]
    cond, null = model.encode_prompts(captions), model.null_cond(200)
    if pooled_text:
        assert pooled.shape == (200, model.clip.embed_dim)
    else:
        assert pooled is None and cond.pooled is None
        pooled = torch.zeros(200)
        cond, null = cond.replace(pooled=torch.zeros(200)), null.replace(pooled=torch.zeros(200))

    def rows_equal(want):
        return torch.tensor([torch.equal(context[i], want.context[i]) and torch.equal(mask[i], want.mask[i])
                             and torch.equal(pooled[i], want.pooled[i]) for i in range(200)])

    is_null, is_cond = rows_equal(null), rows_equal(cond)
    assert bool((is_null ^ is_cond).all())  # every row is exactly one of the two, pooled embedding included
    assert 0.35 < is_null.float().mean() < 0.65
    model.model_step(batch, train=False)  # validation never drops
    assert all(torch.equal(c, cond.context[0]) for c in seen[-1][0])


def test_guidance_negative_prompt_and_per_sample_seeds(tiny_ckpts):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    prompts = ["a large red circle", "a small blue square"]
    both = model.sample(prompts, guidance=3.0, seed=[11, 12])
    assert both.shape == (2, 3, 16, 16) and 0 <= both.min() and both.max() <= 1
    one = model.sample(prompts[1:], guidance=3.0, seed=[12])
    torch.testing.assert_close(both[1:], one)  # independent of the batch it shares
    assert torch.equal(model.sample(prompts, guidance=3.0, seed=[11, 12]), both)  # deterministic (DDIM, eta=0)
    # stochastic samplers too: each sample's step noise comes from its own seed
    for sampler, kw in (("ddpm", {"steps": 4}), ("ddim", {"steps": 4, "eta": 1.0})):
        both_noisy = model.sample(prompts, guidance=3.0, seed=[11, 12], sampler=sampler, **kw)
        torch.testing.assert_close(both_noisy[1:], model.sample(prompts[1:], guidance=3.0, seed=[12],
                                                                sampler=sampler, **kw))
        assert (both_noisy[1:] - one).abs().max() > 1e-4  # not the deterministic chain
        # a given x_T (edits, interpolations) with per-sample seeds: the step noise is still each sample's own
        x_T = torch.randn(2, model.latent_channels, *model.latent_shape(), generator=torch.Generator().manual_seed(1))
        given = model.sample(prompts, guidance=3.0, seed=[11, 12], sampler=sampler, x_T=x_T, **kw)
        torch.testing.assert_close(given[1:], model.sample(prompts[1:], guidance=3.0, seed=[12], sampler=sampler,
                                                           x_T=x_T[1:], **kw))
    negative = model.sample(prompts, negative_prompts="a red circle", guidance=3.0, seed=[11, 12])
    assert (negative - both).abs().max() > 1e-4
    # guidance 1 is the conditional prediction alone: the negative prompt has no effect
    g1 = model.sample(prompts, guidance=1.0, seed=[11, 12])
    torch.testing.assert_close(model.sample(prompts, negative_prompts="a red circle", guidance=1.0, seed=[11, 12]), g1)
    assert (g1 - both).abs().max() > 1e-4
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        model.sample(prompts + ["x"], negative_prompts=["a", "b"])


def test_guidance_rescale_reaches_sample_and_matches_the_guidance_function_by_hand(tiny_ckpts):
    model = make_ldm(tiny_ckpts).eval()
    randomise_unet(model)
    prompts, seeds, scale, phi = ["a large red circle", "a small blue square"], [11, 12], 5.0, 0.7
    plain = model.sample(prompts, guidance=scale, seed=seeds, return_latents=True)
    rescaled = model.sample(prompts, guidance=scale, guidance_rescale=phi, seed=seeds, return_latents=True)
    # reference: separate conditional and unconditional forwards, combined by hand (Lin et al. 2024, eq. 15-16)
    cond, uncond = model.encode_prompts(prompts), model.null_cond(len(prompts))

    def by_hand(x_t, t):
        out_cond, out_uncond = (model.denoiser(x_t, t, c) for c in (cond, uncond))
        return rescale_guidance(out_uncond + scale * (out_cond - out_uncond), out_cond, phi)

    x_T = torch.stack([torch.randn(plain.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        want = samplers.ddim_sample(by_hand, model.schedule, x_T.shape, steps=4, eta=0.0, x_T=x_T,
                                    prediction=model.prediction)
    # float32 round-off of batched vs separate forwards, grown by the guidance scale over the steps
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(rescaled, want, rtol=0, atol=tol)
    assert (rescaled - plain).abs().max() > 100 * tol
    # the stage's default (configs set it as model.init_args.guidance_rescale) reaches `sample` too
    default = make_ldm(tiny_ckpts, guidance_rescale=phi).eval()
    default.load_state_dict(model.state_dict())
    torch.testing.assert_close(default.sample(prompts, guidance=scale, seed=seeds, return_latents=True), rescaled)
    with pytest.raises(ValueError, match=r"model.init_args.guidance_rescale must be in \[0, 1\]"):
        make_ldm(tiny_ckpts, guidance_rescale=1.5)


def test_clip_x0_bounds_the_predicted_x0_of_every_step(tiny_ckpts, monkeypatch):
    seen = []
    ddim = samplers.ddim_sample

    def spying_ddim(*args, **kwargs):  # the stage passes no callback of its own
        return ddim(*args, callback=lambda i, t, x, pred: seen.append(pred.x0.abs().max().item()), **kwargs)

    monkeypatch.setitem(samplers.SAMPLERS, "ddim", spying_ddim)
    model = make_ldm(tiny_ckpts).eval()
    randomise_unet(model)
    prompts, seeds = ["a large red circle", "a small blue square"], [11, 12]
    model.sample(prompts, guidance=5.0, seed=seeds)
    bound = max(seen) / 2  # half the largest unclipped |x0|: the clamp must act
    seen.clear()
    model.sample(prompts, guidance=5.0, seed=seeds, clip_x0=bound)
    assert len(seen) == 4 and max(seen) == pytest.approx(bound)
    seen.clear()
    default = make_ldm(tiny_ckpts, clip_x0=bound).eval()
    default.load_state_dict(model.state_dict())
    z = default.sample(prompts, guidance=5.0, seed=seeds, return_latents=True)
    assert max(seen) == pytest.approx(bound) and z.abs().max() <= bound * (1 + 1e-6)  # DDIM ends on x0
    with pytest.raises(ValueError, match="clip_x0 must be >= 0"):
        model.sample(prompts, clip_x0=-1.0)


@pytest.mark.parametrize("pooled_text", [False, True])
def test_checkpoint_is_self_contained_and_holds_the_ema_weights(tiny_ckpts, tmp_path, pooled_text):
    from lightning.pytorch.callbacks import EMAWeightAveraging
    import lightning as L

    model = make_ldm(tiny_ckpts, pooled_text=pooled_text)
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


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_validation_loss_of_a_sample_depends_on_neither_its_batch_nor_its_position(tiny_ckpts, objective):
    """val/loss draws each sample's t and noise from its key: a batch of 8 equals its halves as batches 0 and 1
    (under DDP, rank r's k-th batch had drawn what every rank's k-th batch drew, from a batch-index seed)."""
    model = make_ldm(tiny_ckpts, objective=objective, sampler="ddim" if objective == "ddpm" else "euler")
    randomise_unet(model)
    model.eval()
    batch = next(iter(tiny_datamodule(tiny_ckpts["data"], batch_size=8).eval_dataloader(8)))

    def part(idx):
        return {k: v[idx] if torch.is_tensor(v) else [v[i] for i in idx] for k, v in batch.items()}

    def val_loss(batches):
        model.on_validation_epoch_start()
        with torch.no_grad():
            for i, b in enumerate(batches):
                model.validation_step(b, i)
        return model._val_metrics["loss"].compute().item()

    whole = val_loss([batch])
    assert val_loss([part(list(range(4))), part(list(range(4, 8)))]) == pytest.approx(whole, rel=1e-5)
    assert val_loss([part([7, 6, 5, 4]), part([3, 2, 1, 0])]) == pytest.approx(whole, rel=1e-5)
    # and the draws are the sample's: another key, another loss
    renamed = {**batch, "key": [f"other{k}" for k in batch["key"]]}
    assert val_loss([renamed]) != pytest.approx(whole, rel=1e-3)


def test_options_no_sampler_of_the_model_takes_are_refused(tiny_ckpts):
    """clip_x0 on a flow model was accepted, then every grid and evaluation failed, well into the run; an eta given
    to a sampler other than DDIM changed nothing."""
    with pytest.raises(ValueError, match=r"model.init_args.clip_x0 = 1.0 .*leave it 0 for objective flow"):
        make_ldm(tiny_ckpts, objective="flow", sampler="euler", clip_x0=1.0)
    model = make_ldm(tiny_ckpts)
    for sampler in ("ddpm", "dpmpp_2m"):
        with pytest.raises(ValueError, match=rf"eta=0.5 sets DDIM's step noise; sampler '{sampler}' does not take"):
            model.sample(["a red circle"], sampler=sampler, steps=2, eta=0.5)
    ddim = [model.sample(["a red circle"], sampler="ddim", steps=2, eta=eta, seed=[0]) for eta in (0.0, 1.0)]
    assert not torch.equal(*ddim)  # where it is taken, it changes the draw


def test_zero_terminal_snr_with_eps_prediction_is_refused(tiny_ckpts):
    """abar(T-1) = 0: an eps model's x0 at the first sampling step is inf / NaN, while its training loss stays finite,
    so the pairing would train a whole run and only then sample NaN."""
    from lit_diffusion.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule(100, "linear", zero_terminal_snr=True)
    x_t, eps = torch.randn(2, 4), torch.randn(2, 4)
    t = torch.full((2,), 99)
    assert not torch.isfinite(schedule.predict_x0_from_eps(x_t, t, eps)).all()
    for prediction in (None, "eps"):
        with pytest.raises(ValueError, match="zero_terminal_snr needs model.init_args.prediction v or x0"):
            make_ldm(tiny_ckpts, schedule={"zero_terminal_snr": True}, prediction=prediction)
    model = make_ldm(tiny_ckpts, schedule={"zero_terminal_snr": True}, prediction="v")
    assert float(model.schedule.alphas_cumprod[-1]) == 0.0
