"""unCLIP sampling (DALL-E 2 sec. 3): slerp against its closed form; DDIM and Euler inversion on a Gaussian whose
exact eps / velocity is known, walked back through their samplers; and the stack of a tiny prior and tiny decoders:
generation through the prior, variations, interpolations, text-diff edits from an inverted latent, the CLIP check,
and the `sample` command's unCLIP options and errors."""

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET, _fit, randomise_unet, tiny_datamodule
from PIL import Image

from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.diffusion.flow import FlowSchedule, euler_sample
from lit_diffusion.diffusion.inversion import ddim_invert, flow_invert
from lit_diffusion.diffusion.samplers import ddim_sample, timestep_spacing
from lit_diffusion.diffusion.schedule import NoiseSchedule
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.prior import DiffusionPriorModule
from lit_diffusion.unclip import UnCLIP, load_image, slerp

TINY_PRIOR = dict(width=32, depth=2, heads=2)


# ------------------------------------------------------------------------------------------------------- slerp
def _angle(a, b):
    return torch.arccos((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).clamp(-1, 1))


def test_slerp_follows_the_great_circle_at_constant_speed():
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    omega = _angle(a, b)
    thetas = torch.linspace(0, 1, 11)
    z = slerp(a, b, thetas)  # [11, 8]
    assert z.shape == (11, 8)
    torch.testing.assert_close(z[0], a)
    torch.testing.assert_close(z[-1], b)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(11))
    torch.testing.assert_close(_angle(a.expand(11, 8), z), thetas * omega, atol=1e-5, rtol=0)
    torch.testing.assert_close(_angle(z, b.expand(11, 8)), (1 - thetas) * omega, atol=1e-5, rtol=0)
    # on the plane of a and b: the closed form's coefficients, not some other unit curve with the same angles
    th = thetas[:, None]
    expected = (torch.sin((1 - th) * omega) * a + torch.sin(th * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(z, expected)
    # batched ends with one theta each
    batch = slerp(torch.stack([a, b]), torch.stack([b, a]), torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(batch[0], slerp(a, b, 0.25))
    torch.testing.assert_close(batch[1], slerp(a, b, 0.75))


def test_slerp_of_near_parallel_vectors_is_the_normalised_lerp_and_antipodes_are_refused():
    a = F.normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]), dim=-1)
    b = F.normalize(torch.tensor([1.0, 1e-6, 0.0, 0.0]), dim=-1)  # sin(omega) ~ 1e-6: the closed form is 0 / 0
    z = slerp(a, b, torch.tensor([0.0, 0.3, 1.0]))
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z, F.normalize(torch.stack([a, 0.7 * a + 0.3 * b, b]), dim=-1))
    torch.testing.assert_close(slerp(a, a, 0.5), a)
    with pytest.raises(ValueError, match="antipodal"):
        slerp(a, -a, 0.5)


# -------------------------------------------------------------------------------------------------- inversion
MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
_L = torch.tensor([[1.2, 0.0, 0.0], [0.5, 0.6, 0.0], [-0.3, 0.4, 0.3]], dtype=torch.float64)
SIGMA = _L @ _L.T
EYE = torch.eye(3, dtype=torch.float64)


def gaussian_velocity(schedule: FlowSchedule):
    """v*(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU, SIGMA) (tests/test_flow.py derives it), called like a
    network: t arrives as t * time_scale."""

    def fn(x, t_net):
        t = (t_net.double() / schedule.time_scale)[:, None, None]  # [B, 1, 1]
        c = (1 - t) ** 2 * SIGMA + t**2 * EYE
        a = (t * EYE - (1 - t) * SIGMA) @ torch.linalg.inv(c)
        centred = x.double() - (1 - t[:, :, 0]) * MU
        return (-MU + (a @ centred.unsqueeze(-1)).squeeze(-1)).to(x.dtype)

    return fn


def gaussian_ddpm(schedule: NoiseSchedule, prediction: str, calls: list | None = None):
    """The exact E[eps | x_t] for the same Gaussian, x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: with
    C = abar SIGMA + (1 - abar) I, E[eps | x_t] = sqrt(1 - abar) C^-1 (x_t - sqrt(abar) MU); as eps or as v."""

    def fn(x, t):
        if calls is not None:
            calls.append(int(t[0]))
        abar = schedule.alphas_cumprod_f64[t.cpu()][:, None, None]  # [B, 1, 1]
        c = abar * SIGMA + (1 - abar) * EYE
        centred = x.double() - abar[:, :, 0].sqrt() * MU
        eps = ((1 - abar).sqrt() * torch.linalg.inv(c) @ centred.unsqueeze(-1)).squeeze(-1)
        if prediction == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0, x0 from x_t and eps
            a, s = abar[:, :, 0].sqrt(), (1 - abar[:, :, 0]).sqrt()
            eps = a * eps - s * (x.double() - s * eps) / a
        return eps.to(x.dtype)

    return fn


def _data_points(n=256):
    g = torch.Generator().manual_seed(0)
    return (MU + torch.randn(n, 3, generator=g, dtype=torch.float64) @ _L.T).float()


def test_flow_inversion_then_euler_returns_the_data_and_converges_with_steps():
    fs = FlowSchedule(shift=3.0)  # a shifted grid, as SD3 samples: the inversion must walk the same one
    v = gaussian_velocity(fs)
    x0 = _data_points()
    errors = []
    for steps in (10, 20, 40, 80):
        x_T = flow_invert(v, fs, x0, steps)
        errors.append((euler_sample(v, fs, x0.shape, steps=steps, x_T=x_T) - x0).abs().max().item())
    assert all(b < 0.6 * a for a, b in zip(errors, errors[1:])), errors  # first order: halves with each doubling
    assert errors[-1] < 0.08, errors  # the data spread is ~1-2
    # the noise it finds is noise: about N(0, I), not the data
    x_T = flow_invert(v, fs, x0, 80)
    assert (x_T.mean(0)).abs().max() < 0.2 and (x_T.std(0) - 1).abs().max() < 0.15
    # fixed-point refinement solves each Euler step's implicit equation: the round trip error falls geometrically
    # with the iterations, down to float error
    refined = [(euler_sample(v, fs, x0.shape, steps=20, x_T=flow_invert(v, fs, x0, 20, refine=r)) - x0).abs().max()
               for r in (1, 3, 10)]
    assert refined[0] < 0.5 * errors[1] and refined[1] < 0.1 * refined[0] and refined[2] < 1e-5, refined
    # that exactness is the sampler's own grid's: solved as exactly on another grid (shift 1), it is off by the two
    # grids' different discretisation errors
    other = flow_invert(v, FlowSchedule(shift=1.0), x0, 20, refine=10)
    assert (euler_sample(v, fs, x0.shape, steps=20, x_T=other) - x0).abs().max() > 1e3 * refined[2]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_inversion_then_ddim_returns_the_data_and_converges_with_steps(prediction, spacing):
    ns = NoiseSchedule(schedule="cosine")
    x0 = _data_points()
    errors = []
    for steps in (10, 20, 40, 80):
        model = gaussian_ddpm(ns, prediction)
        x_T = ddim_invert(model, ns, x0, steps, prediction, spacing=spacing)
        back = ddim_sample(model, ns, x0.shape, steps=steps, eta=0.0, spacing=spacing, prediction=prediction,
                           x_T=x_T)
        errors.append((back - x0).abs().max().item())
    assert all(b < 0.75 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15, errors
    refined_err = (ddim_sample(gaussian_ddpm(ns, prediction), ns, x0.shape, steps=40, spacing=spacing,
                               prediction=prediction,
                               x_T=ddim_invert(gaussian_ddpm(ns, prediction), ns, x0, 40, prediction,
                                               spacing=spacing, refine=2)) - x0).abs().max().item()
    assert refined_err < 0.5 * errors[2], (refined_err, errors)


def test_ddim_inversion_visits_the_samplers_timesteps_in_reverse():
    ns = NoiseSchedule()
    calls = []
    ddim_invert(gaussian_ddpm(ns, "eps", calls), ns, _data_points(4), 7, refine=1)
    ts = timestep_spacing(1000, 7)
    assert calls == [t for t in reversed(ts) for _ in range(2)]  # refine=1: two calls per step


# ------------------------------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def stack(tiny_ckpts, embedded_latents, tmp_path_factory):
    """Checkpoint files: a tiny prior, two tiny unCLIP decoders (ddpm and flow), a text-only model and a prior with
    another CLIP, all from the session's tiny CLIP and VAE. The decoders' zero-initialised output layers are
    randomised, so that the image embedding and the caption change what they draw."""
    root = tmp_path_factory.mktemp("unclip")
    data, latents = tiny_ckpts["data"], embedded_latents
    torch.manual_seed(0)
    prior = DiffusionPriorModule(clip_ckpt=str(tiny_ckpts["clip"]), prior=TINY_PRIOR, sample_steps=4,
                                 warmup_steps=0, lr=1e-3, candidates=2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(prior, datamodule=LatentDataModule(train_urls=str(latents / "train" / "*.tar"),
                                                   val_urls=str(latents / "val" / "*.tar"), batch_size=16,
                                                   num_workers=0, train_batches_per_epoch=2))
    trainer.save_checkpoint(root / "prior.ckpt")
    # the same prior with one CLIP weight changed: another CLIP
    ckpt = torch.load(root / "prior.ckpt", map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("clip.") and v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01
    torch.save(ckpt, root / "other_clip_prior.ckpt")

    paths = {"prior": root / "prior.ckpt", "other_prior": root / "other_clip_prior.ckpt", "root": root}
    # v-prediction: an untrained eps-predictor's x0 estimate at the noise end is x_T / sqrt(abar_T), hundreds of
    # units, which the VAE decodes to saturated images whatever the condition; v's (and flow's) stays bounded
    decoders = {"ddpm": dict(sampler="ddim", prediction="v"), "flow": dict(objective="flow", sampler="euler"),
                "text": dict(condition="text", sampler="ddim")}
    for name, kwargs in decoders.items():
        torch.manual_seed(0)
        model = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]),
                                      image_size=16, unet=TINY_UNET, warmup_steps=0, sample_steps=4, guidance=2.0,
                                      **{"condition": "text+image_embedding", **kwargs})
        randomise_unet(model)  # before the step: after it the zero-initialised weights are no longer zero
        trainer = _fit(model, tiny_datamodule(data), 1, root)
        trainer.save_checkpoint(root / f"{name}.ckpt")
        paths[name] = root / f"{name}.ckpt"
    return paths


def _images(n=2, seed=0):
    """Smooth test images in [0, 1] at the decoders' 16 px."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def unclip(stack):
    return UnCLIP.from_checkpoints(stack["ddpm"], stack["prior"])


def test_generate_is_the_prior_then_the_decoder_with_the_same_seeds(unclip, caplog):
    prompts = ["a small red circle", "a large blue square", "a small red circle"]
    images = unclip.generate(prompts, seed=[5, 6, 7], guidance=2.0, prior_guidance=1.5)
    e = unclip.prior.sample(prompts, seed=[5, 6, 7], guidance=1.5)
    torch.testing.assert_close(images, unclip.decoder.sample(prompts, guidance=2.0, seed=[5, 6, 7],
                                                             image_embeddings=e))
    assert images.shape == (3, 3, 16, 16)
    assert not torch.allclose(images[0], images[2])  # the same caption, another seed
    # an int seed is seed + i per sample, so a sample does not depend on its batch
    torch.testing.assert_close(unclip.generate(prompts[1:2], seed=6, guidance=2.0, prior_guidance=1.5), images[1:2])
    # a negative prompt reaches both: the prior's unconditional caption and the decoder's negative
    negative = "a green triangle"
    with_negative = unclip.generate(prompts[:1], negative_prompts=negative, seed=[5], guidance=2.0,
                                    prior_guidance=1.5)
    e_neg = unclip.prior.sample(prompts[:1], negative, seed=[5], guidance=1.5)
    assert not torch.allclose(e_neg, e[:1])
    torch.testing.assert_close(with_negative, unclip.decoder.sample(prompts[:1], negative_prompts=negative,
                                                                    guidance=2.0, seed=[5], image_embeddings=e_neg))
    assert not torch.allclose(with_negative, images[:1])
    # at prior guidance 1 the prior cannot move away from it: the decoder alone takes it, and the log says so
    with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
        decoder_only = unclip.generate(prompts[:1], negative_prompts=negative, seed=[5], guidance=2.0,
                                       prior_guidance=1.0)
    e_1 = unclip.prior.sample(prompts[:1], seed=[5], guidance=1.0)
    torch.testing.assert_close(decoder_only, unclip.decoder.sample(prompts[:1], negative_prompts=negative,
                                                                   guidance=2.0, seed=[5], image_embeddings=e_1))
    assert any("the negative prompt steers the decoder only" in r.getMessage() for r in caplog.records)


def test_the_prior_and_the_decoder_start_from_unrelated_noise_for_one_seed(unclip, monkeypatch):
    """generate() gives the prior and the decoder the same seeds; their starting noise must still be independent
    draws (it was once the same generator's: the decoder's latent began with the prior's noise, so the image's
    noise was a function of its embedding)."""
    import lit_diffusion.stages.prior as prior_stage

    seen = {}
    real = prior_stage.sample_x0

    def spy(net, schedule, cond, uncond, guidance, sampler, steps, x_T, **kwargs):
        seen["prior"] = x_T.clone()
        return real(net, schedule, cond, uncond, guidance, sampler, steps, x_T, **kwargs)

    monkeypatch.setattr(prior_stage, "sample_x0", spy)
    e = unclip.prior.sample(["a small red circle"], seed=[5], guidance=1.0)
    d = unclip.decoder  # its x_T for seed [5], as sample() draws it
    latent = torch.randn(d.latent_channels, *d.latent_shape(), generator=torch.Generator().manual_seed(5)).flatten()
    prior_noise = seen["prior"].flatten()
    n = min(len(latent), len(prior_noise))
    assert e.shape[0] == 1 and n > 8
    # no shared run of values (a shared generator gives equal prefixes), and no correlation
    assert not torch.isin(prior_noise[:n], latent).any()
    assert abs(torch.corrcoef(torch.stack([prior_noise[:n], latent[:n]]))[0, 1]) < 0.5


def test_variations_redraw_the_noise_per_seed_and_keep_the_embedding(unclip):
    images = _images(2)
    out = unclip.variations(images, per_image=3, seed=10, guidance=2.0)
    assert out.shape == (2, 3, 3, 16, 16)
    for n in range(2):  # different seeds, different images
        assert (out[n, 0] - out[n, 1]).abs().max() > 1e-3 and (out[n, 1] - out[n, 2]).abs().max() > 1e-3
    torch.testing.assert_close(unclip.variations(images, per_image=3, seed=10, guidance=2.0), out)  # deterministic
    # variation j of image n: its CLIP embedding, the empty caption and seed 10 + j; the other image's embedding
    # with the same noise draws another picture
    e = unclip.decoder.encode_image_embeddings(images)
    one = unclip.decoder.sample([""], guidance=2.0, seed=[11], image_embeddings=e[1])
    torch.testing.assert_close(out[1, 1], one[0])
    assert (out[0, 1] - out[1, 1]).abs().max() > 1e-3
    shifted = unclip.variations(images[:1], per_image=2, seed=11, guidance=2.0)
    torch.testing.assert_close(shifted[0, 0], out[0, 1])  # per-seed noise, whatever the batch


def test_interpolation_ends_are_the_two_images_embeddings_with_the_same_noise(unclip):
    a, b = _images(2, seed=3)
    frames = unclip.interpolate(a, b, frames=4, seed=9, guidance=2.0)
    assert frames.shape == (4, 3, 16, 16)
    e = unclip.decoder.encode_image_embeddings(torch.stack([a, b]))
    ends = unclip.decoder.sample(["", ""], guidance=2.0, seed=[9, 9], image_embeddings=e)
    torch.testing.assert_close(frames[0], ends[0])
    torch.testing.assert_close(frames[-1], ends[1])
    third = unclip.decoder.sample([""], guidance=2.0, seed=[9], image_embeddings=slerp(e[0], e[1], 1 / 3))
    torch.testing.assert_close(frames[1], third[0])
    steps = [(frames[i + 1] - frames[i]).abs().max().item() for i in range(3)]
    assert min(steps) > 1e-4  # every frame moves
    with pytest.raises(ValueError, match="frames >= 2"):
        unclip.interpolate(a, b, frames=1)
    # a stochastic sampler's step noise is the frame's seed's too: the same for every frame
    noisy = unclip.interpolate(a, b, frames=3, seed=9, guidance=2.0, sampler="ddim", eta=1.0, steps=4)
    noisy_ends = unclip.decoder.sample(["", ""], guidance=2.0, seed=[9, 9], image_embeddings=e, sampler="ddim",
                                       eta=1.0, steps=4)
    torch.testing.assert_close(noisy[0], noisy_ends[0])
    torch.testing.assert_close(noisy[-1], noisy_ends[1])


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_edit_at_theta_zero_is_the_decoders_reconstruction_from_the_inverted_latent(stack, objective):
    u = UnCLIP.from_checkpoints(stack[objective])
    d = u.decoder
    image = _images(1, seed=4)
    old, new = "a small red circle", "a large blue square"
    steps = 20
    frames = u.edit(image, old, new, thetas=(0.0, 0.25, 0.5), guidance=1.0, steps=steps)
    assert frames.shape == (3, 3, 16, 16)
    x_T = u.invert(image, new, guidance=1.0, steps=steps)
    sampler = "ddim" if objective == "ddpm" else "euler"
    direct = d.sample([new], guidance=1.0, sampler=sampler, steps=steps, eta=0.0, x_T=x_T,
                      image_embeddings=d.encode_image_embeddings(image))
    torch.testing.assert_close(frames[0], direct[0])
    # the inverted latent decodes back to (about) the VAE's reconstruction of the image: far nearer than a sample
    # of the same embedding from fresh noise; solving each inversion step by fixed-point iteration nearer still
    reconstruction = ((d.vae.decode(d.encode_images(image * 2 - 1)) + 1) / 2).clamp(0, 1)
    e = d.encode_image_embeddings(image)
    fresh = d.sample([new], guidance=1.0, sampler=sampler, steps=steps, seed=0, image_embeddings=e)
    err = (frames[0] - reconstruction[0]).abs().mean().item()
    assert err < 0.25 * (fresh[0] - reconstruction[0]).abs().mean().item(), err
    refined = d.sample([new], guidance=1.0, sampler=sampler, steps=steps, eta=0.0, image_embeddings=e,
                       x_T=u.invert(image, new, guidance=1.0, steps=steps, refine=2))
    assert (refined[0] - reconstruction[0]).abs().mean().item() < 0.2 * err
    # larger thetas move away from it along the text diff
    assert (frames[2] - frames[0]).abs().mean() > (frames[1] - frames[0]).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="same CLIP embedding"):
        u.edit(image, old, old)


class Recorder(torch.nn.Module):
    """A stand-in denoiser: records the conditioning of every call."""

    def __init__(self):
        super().__init__()
        self.conds = []

    def forward(self, x_t, t, cond):
        self.conds.append(cond)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_inversion_conditions_the_denoiser_exactly_as_sampling_does(stack, objective):
    """Inversion runs the sampler backwards only if it calls the network with the sampler's conditioning: the same
    caption, negative caption, image embedding and null embedding in guidance's unconditional half."""
    u = UnCLIP.from_checkpoints(stack[objective])
    d = u.decoder
    image = _images(1, seed=6)
    e = d.encode_image_embeddings(image)
    recorder = Recorder()
    d.__dict__["denoiser"] = recorder  # an instance attribute wins over the method
    u.invert(image, "a large blue square", guidance=2.5, negative_prompts="a green triangle", steps=1)
    d.sample(["a large blue square"], negative_prompts="a green triangle", guidance=2.5, steps=1, image_embeddings=e,
             x_T=torch.zeros(1, d.latent_channels, *d.latent_shape()))
    inverted, sampled = recorder.conds
    assert inverted.tensors().keys() == sampled.tensors().keys()
    for name, value in sampled.tensors().items():
        torch.testing.assert_close(inverted.tensors()[name], value, msg=name)
    assert (sampled.image_embedding[0] == 0).all() and torch.allclose(sampled.image_embedding[1], e[0])


@pytest.mark.parametrize("caption", ["", "a large blue square"])
def test_inversion_guides_a_captionless_call_with_one_scale_as_sampling_does(stack, caption):
    """With a default image_guidance (2) apart from guidance (3), sampling guides a caption with three branches and
    an empty caption with one scale (two branches): inversion must guide each the same way, or the inverted latent
    belongs to another ODE than the one sampled from it."""
    u = UnCLIP.from_checkpoints(stack["flow"])
    d = u.decoder
    d.use_image_guidance(2.0)
    image = _images(1, seed=6)
    e = d.encode_image_embeddings(image)
    recorder = Recorder()
    d.__dict__["denoiser"] = recorder
    u.invert(image, caption, guidance=3.0, steps=1)
    d.sample([caption], guidance=3.0, steps=1, image_embeddings=e, x_T=torch.zeros(1, d.latent_channels,
                                                                                      *d.latent_shape()))
    inverted, sampled = recorder.conds
    assert inverted.batch_size == sampled.batch_size == (2 if caption == "" else 3)
    for name, value in sampled.tensors().items():
        torch.testing.assert_close(inverted.tensors()[name], value, msg=name)


def test_a_call_mixing_empty_and_real_captions_with_image_guidance_is_refused(stack):
    """An empty caption is guided with one scale among empty ones and with two beside captions: in one call its
    sample would depend on the rest of the batch."""
    d = UnCLIP.from_checkpoints(stack["flow"]).decoder
    d.use_image_guidance(2.0)
    e = d.encode_image_embeddings(_images(2, seed=6))
    with pytest.raises(ValueError, match="empty and non-empty captions in one call with image guidance"):
        d.sample(["", "a large blue square"], guidance=3.0, steps=1, image_embeddings=e, seed=[1, 2])
    alone = d.sample([""], guidance=3.0, steps=1, image_embeddings=e[:1], seed=[1])
    together = d.sample(["", ""], guidance=3.0, steps=1, image_embeddings=e, seed=[1, 2])
    torch.testing.assert_close(together[:1], alone, atol=1e-4, rtol=0)


def test_a_prior_with_another_clip_and_a_text_only_decoder_are_refused_by_name(stack):
    with pytest.raises(ValueError) as err:
        UnCLIP.from_checkpoints(stack["ddpm"], stack["other_prior"])
    assert str(stack["ddpm"]) in str(err.value) and str(stack["other_prior"]) in str(err.value)
    assert "different CLIPs" in str(err.value)
    with pytest.raises(ValueError, match=rf"{stack['text']} is not an unCLIP decoder"):
        UnCLIP.from_checkpoints(stack["text"], stack["prior"])


def test_load_image_is_rgb_cover_resized_and_centre_cropped(tmp_path):
    pixels = torch.zeros(20, 40, 4, dtype=torch.uint8)  # RGBA, twice as wide as high
    pixels[:, :10, 0] = 255  # left quarter red: cropped away by the centre square
    pixels[:, 10:30, 2] = 255  # centre half blue
    pixels[..., 3] = 255
    Image.fromarray(pixels.numpy(), "RGBA").save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 16, 16)
    assert image.shape == (3, 16, 16) and 0 <= image.min() and image.max() <= 1
    assert image[2, :, 2:14].mean() > 0.95 and image[0].mean() < 0.05  # the centre, blue, no red
    assert load_image(tmp_path / "wide.png", 8, 16).shape == (3, 8, 16)


# ---------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def grid_spy(monkeypatch):
    """What `sample` hands to `save_grid`: the rows it lays out and their labels."""
    from lit_diffusion.evaluation import plots

    save_grid = plots.save_grid
    seen = {"save_grid": save_grid}  # the unpatched one, for reference layouts

    def spy(rows, labels, out, col_titles=None, title=None, **kwargs):
        seen.update(rows=[torch.as_tensor(r).clone() for r in rows], labels=list(labels), col_titles=col_titles,
                    title=title)
        return save_grid(rows, labels, out, col_titles=col_titles, title=title, **kwargs)

    monkeypatch.setattr(plots, "save_grid", spy)
    return seen


def _png_size_of_layout(save_grid, tmp_path, rows, cols, labels, col_titles, title):
    """The pixel size `save_grid` gives a grid of rows x cols images of 16 px with these texts."""
    ref = save_grid([torch.zeros(cols, 3, 16, 16)] * rows, labels, tmp_path / "ref.png", col_titles=col_titles,
                    title=title)
    return Image.open(ref).size


def _write_images(tmp_path, n):
    paths = []
    for i, image in enumerate(_images(n, seed=20)):
        path = tmp_path / f"in{i}.png"
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).resize((24, 20)).save(path)
        paths.append(str(path))
    return paths


def _check_grid(tmp_path, out, seen, rows, cols):
    assert [tuple(r.shape) for r in seen["rows"]] == [(cols, 3, 16, 16)] * rows
    assert len(seen["labels"]) == rows and len(seen["col_titles"]) == cols
    assert Image.open(out).size == _png_size_of_layout(seen["save_grid"], tmp_path, rows, cols, seen["labels"],
                                                       seen["col_titles"], seen["title"])


def test_sample_command_unclip_modes_write_labelled_grids(stack, tmp_path, capsys, grid_spy):
    from lit_diffusion.cli import main

    dec, prior = str(stack["ddpm"]), str(stack["prior"])
    out = tmp_path / "prior.png"
    main(["sample", "--ckpt", dec, "--prior", prior, "--prompt", "a small red circle", "--prompt",
          "a large blue square", "--negative-prompt", "a green triangle", "--num", "2", "--steps", "3",
          "--seed", "4", "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith("prior.png")
    _check_grid(tmp_path, out, grid_spy, rows=2, cols=2)
    assert grid_spy["labels"][1].startswith("a large blue square") and "a green triangle" in grid_spy["labels"][1]
    u = UnCLIP.from_checkpoints(dec, prior)
    expected = u.generate(["a large blue square"] * 2, negative_prompts="a green triangle", seed=[4, 5], steps=3)
    torch.testing.assert_close(grid_spy["rows"][1], expected)  # column j: seed + j in every row, as titled
    assert grid_spy["col_titles"] == ["seed 4", "seed 5"]
    main(["sample", "--ckpt", dec, "--prior", prior, "--prompt", "a large blue square", "--num", "2", "--steps", "3",
          "--image-guidance", "1.5", "--out", str(out)])  # the image embedding guided apart from the caption
    apart = u.generate(["a large blue square"] * 2, seed=[0, 1], steps=3, image_guidance=1.5)
    torch.testing.assert_close(grid_spy["rows"][0], apart)
    assert (apart - u.generate(["a large blue square"] * 2, seed=[0, 1], steps=3)).abs().max() > 1e-4

    paths = _write_images(tmp_path, 2)
    out = tmp_path / "variations.png"
    main(["sample", "--ckpt", dec, "--image", *paths, "--num", "3", "--steps", "3", "--out", str(out)])
    _check_grid(tmp_path, out, grid_spy, rows=2, cols=4)  # the input, then 3 variations
    assert grid_spy["labels"] == ["in0.png", "in1.png"] and grid_spy["col_titles"][0] == "input"
    inputs = torch.stack([load_image(p, 16, 16) for p in paths])
    torch.testing.assert_close(grid_spy["rows"][1][0], inputs[1])
    torch.testing.assert_close(grid_spy["rows"][1][1:], u.variations(inputs, per_image=3, seed=0, steps=3)[1])
    # --image-guidance is the variations' one scale (no caption to guide apart), as its help says
    main(["sample", "--ckpt", dec, "--image", *paths, "--num", "3", "--steps", "3", "--image-guidance", "1.5",
          "--out", str(out)])
    torch.testing.assert_close(grid_spy["rows"][1][1:], u.variations(inputs, per_image=3, seed=0, steps=3,
                                                                     guidance=1.5)[1])

    out = tmp_path / "interpolation.png"
    main(["sample", "--ckpt", dec, "--interpolate", *paths, "--frames", "5", "--steps", "3", "--out", str(out)])
    _check_grid(tmp_path, out, grid_spy, rows=1, cols=5)
    assert "in0.png" in grid_spy["labels"][0] and "in1.png" in grid_spy["labels"][0]

    out = tmp_path / "edit.png"
    main(["sample", "--ckpt", dec, "--edit", "a large blue square", "--from", "a small red circle", "--image",
          paths[0], "--steps", "3", "--out", str(out)])
    _check_grid(tmp_path, out, grid_spy, rows=1, cols=7)  # the input, then thetas 0, 0.1, ..., 0.5
    assert grid_spy["col_titles"][1:] == [f"theta {t:g}" for t in (0, 0.1, 0.2, 0.3, 0.4, 0.5)]


def _error(capsys, argv):
    from lit_diffusion.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_sample_command_names_what_is_missing_or_wrong(stack, tmp_path, capsys):
    dec, text, prior = str(stack["ddpm"]), str(stack["text"]), str(stack["prior"])
    image = _write_images(tmp_path, 1)[0]
    err = _error(capsys, ["sample", "--ckpt", dec, "--prompt", "a red circle", "--out", str(tmp_path / "x.png")])
    assert dec in err and all(opt in err for opt in ("--prior", "--image", "--interpolate", "--edit"))
    err = _error(capsys, ["sample", "--ckpt", text, "--image", image, "--out", str(tmp_path / "x.png")])
    assert text in err and "not an unCLIP decoder" in err
    err = _error(capsys, ["sample", "--ckpt", text, "--prior", prior, "--prompt", "a red circle"])
    assert text in err and "not an unCLIP decoder" in err
    # the unCLIP-only knobs on a text model: refused, not ignored
    err = _error(capsys, ["sample", "--ckpt", text, "--prompt", "a red circle", "--from", "a blue square",
                          "--thetas", "0,0.5", "--prior-guidance", "9", "--out", str(tmp_path / "x.png")])
    assert "--from, --thetas, --prior-guidance: " in err and "not an unCLIP decoder" in err
    assert not (tmp_path / "x.png").exists()
    err = _error(capsys, ["sample", "--ckpt", dec, "--prior", str(stack["other_prior"]), "--prompt", "a red circle"])
    assert dec in err and str(stack["other_prior"]) in err
    err = _error(capsys, ["sample", "--ckpt", dec, "--edit", "a blue square", "--image", image])
    assert "--from" in err
    err = _error(capsys, ["sample", "--ckpt", dec, "--prior", prior])
    assert "--prompt" in err
    err = _error(capsys, ["sample", "--ckpt", text, "--prompt", "a red circle", "--image-guidance", "2", "--out",
                          str(tmp_path / "x.png")])
    assert "--image-guidance" in err and "conditioned on text only" in err
    err = _error(capsys, ["evaluate", "--ckpt", text, "--data", str(tmp_path / "none-*.tar"), "--image-guidance", "2"])
    assert "image_guidance" in err and "conditioned on text only" in err
    err = _error(capsys, ["sample", "--ckpt", dec, "--edit", "a blue square", "--from", "a red circle"])
    assert "--image" in err
    assert not list(tmp_path.glob("x*.png"))
