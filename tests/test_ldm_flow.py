"""The diffusion stage with either backbone (U-Net, DiT) and either objective (ddpm, flow)."""

import shutil

import pytest
import torch
from conftest import TINY_DIT, _fit, tiny_datamodule
from test_ldm import make_ldm

from lit_diffusion.diffusion import flow, samplers
from lit_diffusion.diffusion.flow import FlowSchedule
from lit_diffusion.models.dit import DiT
from lit_diffusion.stages.ldm import LatentDiffusionModule

DIT_FLOW = dict(unet=None, dit=TINY_DIT, objective="flow", sampler="euler")


def randomise(module: torch.nn.Module) -> None:
    """A trained-looking network: adaLN-Zero and the zero final layer would make a fresh DiT output zeros."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(std=0.05)


def test_objective_and_denoiser_options_are_checked_by_name(tiny_ckpts):
    with pytest.raises(ValueError, match="model.init_args.sampler: sampler 'ddim' needs objective 'ddpm', this "
                                         "model's objective is 'flow'; choose one of \\['euler', 'heun'\\]"):
        make_ldm(tiny_ckpts, **{**DIT_FLOW, "sampler": "ddim"})
    with pytest.raises(ValueError, match="sampler 'heun' needs objective 'flow', this model's objective is 'ddpm'"):
        make_ldm(tiny_ckpts, sampler="heun")
    with pytest.raises(ValueError, match="unet and model.init_args.dit are both set"):
        make_ldm(tiny_ckpts, dit=TINY_DIT)
    with pytest.raises(ValueError, match="model.init_args.prediction is DDPM's"):
        make_ldm(tiny_ckpts, **DIT_FLOW, prediction="v")
    with pytest.raises(ValueError, match="model.init_args.schedule is DDPM's"):
        make_ldm(tiny_ckpts, **DIT_FLOW, schedule={"num_timesteps": 100})
    with pytest.raises(ValueError, match="model.init_args.flow is set but model.init_args.objective is ddpm"):
        make_ldm(tiny_ckpts, flow={"shift": 3.0})
    with pytest.raises(ValueError, match="model.init_args.objective: 'edm' is not one of"):
        make_ldm(tiny_ckpts, objective="edm")
    with pytest.raises(ValueError, match="dit.context_dim = 7 does not match the CLIP text width"):
        make_ldm(tiny_ckpts, **{**DIT_FLOW, "dit": {**TINY_DIT, "context_dim": 7}})
    model = make_ldm(tiny_ckpts, **DIT_FLOW)
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' needs objective 'ddpm'"):
        model.sample(["a red circle"], sampler="dpmpp_2m", steps=2)
    with pytest.raises(ValueError, match="clip_x0 .* leave it 0 for a flow model"):
        model.sample(["a red circle"], steps=2, clip_x0=2.0)


@pytest.mark.parametrize("joint", [False, True])
def test_flow_loss_is_the_velocity_loss_of_the_dit_on_the_encoded_batch(tiny_ckpts, joint):
    model = make_ldm(tiny_ckpts, **{**DIT_FLOW, "dit": {**TINY_DIT, "joint_attention": joint}},
                     flow={"timesteps": "logit_normal", "shift": 2.0}, loss_weighting="min_snr")
    assert isinstance(model.dit, DiT) and model.network is model.dit and not hasattr(model, "unet")
    randomise(model.dit)
    batch = {"image": torch.rand(6, 3, 16, 16) * 2 - 1, "caption": ["a large red circle"] * 3 + ["a small square"] * 3}
    loss = model.model_step(batch, train=False, generator=torch.Generator().manual_seed(3))
    # the same loss written out: latents and captions through the frozen stages, then FlowSchedule's maths
    z, cond = model.encode_images(batch["image"]), model.encode_prompts(batch["caption"])
    gen = torch.Generator().manual_seed(3)
    t = model.schedule.sample_timesteps(6, generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise
    v = model.dit(x_t, t * 1000, cond)
    weight = model.schedule.loss_weight(t, "min_snr", 5.0)
    expected = (weight * ((v - (noise - z)) ** 2).mean((1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    model.model_step(batch, train=True).backward()
    assert all(p.grad is None for p in model.clip.parameters()) and all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.parameters())


def test_flow_sampling_at_guidance_one_is_euler_on_the_conditional_velocity(tiny_ckpts):
    model = make_ldm(tiny_ckpts, **DIT_FLOW, flow={"shift": 3.0}).eval()
    randomise(model.dit)
    prompts = ["a large red circle", "a small blue square"]
    z = model.sample(prompts, guidance=1.0, steps=5, seed=0, return_latents=True, negative_prompts="a green square")
    cond = model.encode_prompts(prompts)
    x_T = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    by_hand = flow.euler_sample(lambda x, t: model.denoiser(x, t, cond), model.schedule, z.shape,
                                steps=5, x_T=x_T)
    torch.testing.assert_close(z, by_hand)  # guidance 1 never looks at the (negative) unconditional branch
    guided = model.sample(prompts, guidance=4.0, steps=5, seed=0, return_latents=True)
    assert (guided - z).abs().max() > 1e-3
    heun = model.sample(prompts, guidance=4.0, steps=5, seed=0, sampler="heun", return_latents=True)
    assert (heun - guided).abs().max() > 1e-4  # a second-order step, not Euler's


@pytest.mark.parametrize("denoiser", ["dit_flow", "unet_flow", "dit_ddpm"])
def test_a_trained_checkpoint_samples_after_the_stage_files_are_gone(tiny_ckpts, tmp_path, denoiser):
    ckpts = {k: shutil.copy(tiny_ckpts[k], tmp_path / f"{k}.ckpt") for k in ("clip", "vae")}
    options = {"dit_flow": DIT_FLOW, "unet_flow": dict(objective="flow", sampler="heun"),
               "dit_ddpm": dict(unet=None, dit=TINY_DIT)}[denoiser]
    model = make_ldm(ckpts, **options, lr=3e-3)
    trainer = _fit(model, tiny_datamodule(tiny_ckpts["data"]), 3, tmp_path)
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    expected = model.eval().sample(["a large red circle"], steps=3, seed=1)
    for path in ckpts.values():
        (tmp_path / path).unlink()
    loaded = LatentDiffusionModule.from_checkpoint(tmp_path / "ldm.ckpt")
    assert loaded.objective == model.objective and type(loaded.network) is type(model.network)
    assert loaded.schedule.config == model.schedule.config
    block = torch.load(tmp_path / "ldm.ckpt", weights_only=True)["lit_diffusion"]
    assert block["objective"] == model.objective
    torch.testing.assert_close(loaded.sample(["a large red circle"], steps=3, seed=1), expected)


def test_flow_schedule_travels_with_the_checkpoint_and_sampler_registry_lists_both_objectives():
    assert FlowSchedule(**FlowSchedule(shift=3.0).config) == FlowSchedule(shift=3.0)
    assert {samplers.SAMPLER_OBJECTIVE[s] for s in ("euler", "heun")} == {"flow"}
    assert {samplers.SAMPLER_OBJECTIVE[s] for s in ("ddpm", "ddim", "dpmpp_2m")} == {"ddpm"}
