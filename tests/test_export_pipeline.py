"""A diffusion stage exported as a whole diffusers pipeline folder (lit_diffusion.export.pipeline): loaded with
`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`, it gives our `LatentDiffusionModule.sample`'s
images from the same initial noise, for each backbone and objective, with and without guidance and a negative
prompt. Tiny randomly initialised denoisers on the tiny trained CLIP and VAE, 8x8 latents, 4 steps, no network.

The exported scheduler is the one stepping as the checkpoint's default sampler, where one does exactly
(`export/pipeline.py`'s docstring names the pairs without a twin):
  flow: our `euler`  <->  FlowMatchEulerDiscreteScheduler (sigmas linspace(1, 1/n, n), our shift)
  flow: our `heun`   <->  LitDiffusionFlowHeunScheduler (remote code: diffusers' FlowMatchHeunDiscreteScheduler
                          cannot take our time grid)
  ddpm: our `ddim` (eta 0, trailing)  <->  DDIMScheduler (trailing, set_alpha_to_one), 1000 timesteps / 4 steps
  ddpm: our `dpmpp_2m`  <->  DPMSolverMultistepScheduler (dpmsolver++, order 2, trailing, final sigma 0); with zero
        terminal SNR it does not step as ours and the export falls back to DDIMScheduler (our ddim)
Video models (clips [B, T, C, h, w], `num_frames`) and unCLIP decoders (`image_embeds`, or `image` through the
exported image tower, the null embedding in guidance's unconditional branch) give our `sample(frames=...)` and
`sample(image_embeddings=...)` too.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY_DIT, TINY_UNET

EXTRA = 'the pretrained extra is not installed: pip install -e ".[pretrained]"'
diffusers = pytest.importorskip("diffusers", reason=EXTRA)
pytest.importorskip("transformers", reason=EXTRA)
safetensors_torch = pytest.importorskip("safetensors.torch", reason=EXTRA)

from lit_diffusion.cli import main as cli_main  # noqa: E402
from lit_diffusion.export import ExportError  # noqa: E402
from lit_diffusion.export.pipeline import export_pipeline, import_denoiser  # noqa: E402
from lit_diffusion.stages.ldm import LatentDiffusionModule  # noqa: E402

PROMPTS = ["a large red circle above a small blue square", "two small green triangles"]
NEGATIVE = "a yellow star"
STEPS = 4
IMAGE_SIZE = 32  # the tiny VAE's factor 4: 8x8 latents
TOL = dict(atol=1e-4, rtol=0)
FLOW = dict(objective="flow", sampler="euler")
HEUN = dict(objective="flow", sampler="heun")
EULER_S, HEUN_S, DDIM_S, DPM_S = ("FlowMatchEulerDiscreteScheduler", "LitDiffusionFlowHeunScheduler", "DDIMScheduler",
                                  "DPMSolverMultistepScheduler")
CASES = {  # name -> (LatentDiffusionModule arguments, our sampler that the exported scheduler matches, its class)
    "unet_flow": (dict(**FLOW, flow={"shift": 2.0}), "euler", EULER_S),
    "unet_eps": (dict(), "ddim", DDIM_S),  # DDPM, eps, linear betas
    "dit_flow": (dict(unet=None, dit=TINY_DIT, **FLOW, flow={"shift": 1.5, "base_latent": 4}), "euler", EULER_S),
    "dit_joint_flow_pooled": (dict(unet=None, dit={**TINY_DIT, "joint_attention": True}, **FLOW, pooled_text=True),
                              "euler", EULER_S),
    "unet_v_cosine_pooled_size": (dict(unet={**TINY_UNET, "size_conditioning": True}, pooled_text=True,
                                       prediction="v", schedule={"schedule": "cosine"}), "ddim", DDIM_S),
    "unet_v_zero_terminal_snr": (dict(prediction="v", schedule={"schedule": "scaled_linear", "zero_terminal_snr": True}),
                                 "ddim", DDIM_S),  # our betas as trained_betas
    # the checkpoint's default sampler heun: our own Heun scheduler, fixed shift and the per-resolution one (mu)
    "unet_flow_heun": (dict(**HEUN, flow={"shift": 2.0}), "heun", HEUN_S),
    "dit_flow_heun_base_latent": (dict(unet=None, dit=TINY_DIT, **HEUN, flow={"shift": 1.5, "base_latent": 4}),
                                  "heun", HEUN_S),
    # default dpmpp_2m: DPMSolverMultistepScheduler (named betas), eps and v
    "unet_eps_dpmpp_2m": (dict(sampler="dpmpp_2m"), "dpmpp_2m", DPM_S),
    "unet_v_cosine_dpmpp_2m": (dict(sampler="dpmpp_2m", prediction="v", schedule={"schedule": "cosine"}),
                               "dpmpp_2m", DPM_S),
    # dpmpp_2m with zero terminal SNR has no twin (diffusers' abar_T is 2^-24, ours 0): DDIMScheduler, our ddim
    "unet_v_zero_terminal_snr_dpmpp_2m": (dict(sampler="dpmpp_2m", prediction="v", schedule={
        "schedule": "scaled_linear", "zero_terminal_snr": True}), "ddim", DDIM_S),
}
NAMED_BETAS = {"unet_eps": "linear", "unet_v_cosine_pooled_size": "squaredcos_cap_v2", "unet_eps_dpmpp_2m": "linear",
               "unet_v_cosine_dpmpp_2m": "squaredcos_cap_v2"}  # else our betas as trained_betas


def make_model(ckpts, **kwargs) -> LatentDiffusionModule:
    torch.manual_seed(0)
    args = dict(clip_ckpt=str(ckpts["clip"]), vae_ckpt=str(ckpts["vae"]), image_size=IMAGE_SIZE, unet=TINY_UNET,
                sample_steps=STEPS, warmup_steps=0)
    model = LatentDiffusionModule(**{**args, **kwargs}).eval()
    with torch.no_grad():  # a trained-looking denoiser: its zero-initialised layers would hide the text
        for p in model.network.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def save_checkpoint(model: LatentDiffusionModule, path) -> None:
    """What Lightning's `save_checkpoint` keeps of a stage (weights, hyper-parameters, the stage block)."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def exported(tiny_ckpts, tmp_path_factory):
    """Each case's model and its pipeline folder."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for name, (kwargs, sampler, _) in CASES.items():
        model = make_model(tiny_ckpts, **kwargs)
        export_pipeline(model, root / name)
        out[name] = (model, root / name, sampler)
    return out


def load(folder):
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", CASES)
def test_exported_pipeline_gives_our_images_from_the_same_noise(exported, case):
    model, folder, sampler = exported[case]
    pipe = load(folder)
    assert type(pipe).__name__ == "LitDiffusionPipeline"
    denoiser = pipe.unet if model._net_name == "unet" else pipe.transformer
    assert type(denoiser).__name__ == {"unet": "LitDiffusionUNet", "dit": "LitDiffusionDiT"}[model._net_name]
    assert type(pipe.scheduler).__name__ == CASES[case][2]
    if model.objective == "ddpm":  # diffusers' named schedule where it computes our betas, else ours as they are
        betas = NAMED_BETAS.get(case, "trained_betas")
        assert betas == ("trained_betas" if pipe.scheduler.config.trained_betas else pipe.scheduler.config.beta_schedule)
    lh, lw = model.latent_shape()
    noise = torch.randn(len(PROMPTS), model.latent_channels, lh, lw, generator=torch.Generator().manual_seed(3))
    results = {}
    for guidance, negative in ((1.0, None), (3.0, NEGATIVE)):
        ours = model.sample(PROMPTS, negative_prompts=negative, guidance=guidance, sampler=sampler, steps=STEPS,
                            x_T=noise.clone())
        theirs = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=STEPS,
                      latents=noise.clone(), output_type="pt").images
        assert theirs.shape == ours.shape == (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(theirs, ours, **TOL)
        results[guidance] = ours
    # the comparisons saw something: the prompts, and guidance with the negative prompt, change the images
    assert (results[1.0][0] - results[1.0][1]).abs().max() > 1e-3
    assert (results[3.0] - results[1.0]).abs().max() > 1e-3
    latents = pipe(PROMPTS[:1], guidance_scale=3.0, num_inference_steps=STEPS, latents=noise[:1].clone(),
                   output_type="latent").images
    torch.testing.assert_close(latents, model.sample(PROMPTS[:1], guidance=3.0, sampler=sampler, steps=STEPS,
                                                     x_T=noise[:1].clone(), return_latents=True),
                               atol=1e-4, rtol=1e-5)  # unclamped: a random eps model's latents reach ~300


@pytest.mark.parametrize("case", ["unet_flow", "unet_flow_heun", "unet_eps_dpmpp_2m"])
def test_a_generator_draws_our_seeded_noise_defaults_and_guidance_rescale_are_ours(exported, case):
    model, folder, _ = exported[case]
    pipe = load(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["lit_diffusion_pipeline", "LitDiffusionPipeline"]
    assert (index["guidance_scale"], index["num_inference_steps"], index["image_size"]) == (3.0, STEPS, IMAGE_SIZE)
    images = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(7), output_type="np").images  # defaults
    ours = model.sample(PROMPTS[:1], seed=7)  # guidance 3, its sampler, 4 steps: the checkpoint's defaults
    torch.testing.assert_close(torch.from_numpy(images).permute(0, 3, 1, 2), ours, **TOL)
    rescaled = pipe(PROMPTS[0], negative_prompt=NEGATIVE, guidance_rescale=0.7, generator=torch.Generator()
                    .manual_seed(7), output_type="pt").images
    torch.testing.assert_close(rescaled, model.sample(PROMPTS[:1], NEGATIVE, guidance_rescale=0.7, seed=7), **TOL)
    pil = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(7)).images
    assert pil[0].size == (IMAGE_SIZE, IMAGE_SIZE)


def test_our_heun_scheduler_steps_as_our_heun_sampler():
    """LitDiffusionFlowHeunScheduler against `heun_sample` on a nonlinear toy velocity: the same grid (fixed shift,
    and mu = log(shift) for the per-resolution one), 2 n - 1 calls, the last step Euler to t = 0."""
    from lit_diffusion.diffusion.flow import FlowSchedule, heun_sample
    from lit_diffusion.export.remote.lit_diffusion_scheduler import LitDiffusionFlowHeunScheduler

    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5
    calls = []

    def velocity(x, t):  # t: the network's time, t * 1000
        calls.append(t[0].item())
        s = (t / 1000).view(-1, 1, 1, 1)
        return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, x)) * (1 + s) + 0.5 * x * s

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for shift, steps, dynamic in ((1.0, 13, False), (3.0, 13, False), (2.0, 4, False), (3.0, 7, True), (1.0, 1, False)):
        calls.clear()
        ours = heun_sample(velocity, FlowSchedule(shift=shift), x_T.shape, steps=steps, x_T=x_T.clone())
        our_calls = list(calls)
        scheduler = LitDiffusionFlowHeunScheduler(shift=1.0 if dynamic else shift, use_dynamic_shifting=dynamic)
        scheduler.set_timesteps(steps, mu=math.log(shift) if dynamic else None)
        assert scheduler.order == 2 and len(scheduler.timesteps) == 2 * steps - 1
        calls.clear()
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(velocity(x, t.expand(2)), t, x, return_dict=False)[0]
        assert scheduler.state_in_first_order
        assert calls == our_calls  # the same network times, in the same order
        torch.testing.assert_close(x, ours, atol=1e-6, rtol=0)
    # its config is FlowMatchEulerDiscreteScheduler's: from_config swaps to our euler
    euler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        LitDiffusionFlowHeunScheduler(shift=1.5, use_dynamic_shifting=True).config)
    assert (euler.config.shift, euler.config.use_dynamic_shifting, euler.config.time_shift_type) == (
        1.5, True, "exponential")


def test_dpm_solver_steps_on_our_trailing_grid_for_every_count(exported):
    """DPMSolverMultistepScheduler's own trailing grid, np.arange(T, 0, -T / n) rounded, is not ours for some step
    counts (T = 1000: 48, 61 (62 timesteps, the last -1), 96, ...): the pipeline hands it our grid."""
    from lit_diffusion.diffusion.samplers import timestep_spacing

    model, folder, _ = exported["unet_eps_dpmpp_2m"]
    pipe = load(folder)
    for steps in (4, 13, 48, 61, 96):
        pipe._set_timesteps(steps, 8, 8, "cpu")
        assert pipe.scheduler.timesteps.tolist() == timestep_spacing(1000, steps)
    noise = torch.randn(1, model.latent_channels, *model.latent_shape(), generator=torch.Generator().manual_seed(4))
    theirs = pipe(PROMPTS[:1], guidance_scale=1.0, num_inference_steps=61, latents=noise.clone(),
                  output_type="latent").images
    ours = model.sample(PROMPTS[:1], guidance=1.0, steps=61, x_T=noise.clone(), return_latents=True)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)  # an eps model's latents reach ~300


@pytest.mark.parametrize("case", ["unet_eps", "dit_joint_flow_pooled"])
def test_the_exported_denoiser_imports_back_bit_for_bit(exported, case):
    model, folder, _ = exported[case]
    ours = model.network.state_dict()
    for back in (import_denoiser(folder).state_dict(),  # our class, from the folder's weights
                 getattr(load(folder), "unet" if model._net_name == "unet" else "transformer")  # diffusers'
                 .state_dict()):
        back = {k.removeprefix(f"{model._net_name}."): v for k, v in back.items()}
        assert back.keys() == ours.keys()
        different = [k for k in ours if back[k].dtype != ours[k].dtype or not torch.equal(back[k], ours[k])]
        assert not different, f"not bit for bit: {different[:5]}"


@pytest.mark.slow  # ~15 s: a fresh interpreter importing torch, transformers and diffusers
def test_the_remote_code_runs_without_lit_diffusion(exported, tmp_path):
    """A fresh interpreter that cannot import lit_diffusion loads the folder and samples our images."""
    model, folder, sampler = exported["dit_flow_heun_base_latent"]  # the remote denoiser and scheduler
    noise = torch.randn(1, model.latent_channels, *model.latent_shape(), generator=torch.Generator().manual_seed(5))
    torch.save(noise, tmp_path / "noise.pt")
    script = textwrap.dedent(f"""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "lit_diffusion":
                    raise ImportError("lit_diffusion is hidden")
        sys.meta_path.insert(0, Hide())
        sys.path = [p for p in sys.path if "work/main" not in p]
        import torch
        torch.set_num_threads(1)
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.load({str(tmp_path / "noise.pt")!r})
        out = pipe({PROMPTS[0]!r}, guidance_scale=3.0, latents=noise, output_type="pt").images
        assert not any(m.split(".")[0] == "lit_diffusion" for m in sys.modules)
        torch.save(out, {str(tmp_path / "out.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    ours = model.sample(PROMPTS[:1], guidance=3.0, sampler=sampler, x_T=noise)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours, **TOL)


# ------------------------------------------------------------------------------------------ video and unCLIP
FRAMES = 4
VIDEO_CASES = {  # name -> LatentDiffusionModule arguments of a video DiT (tubelets of 2 frames) or U-Net
    "video_flow_full": dict(unet=None, dit={**TINY_DIT, "temporal_patch": 2}, **FLOW, frames=FRAMES),
    "video_eps_factorised": dict(unet=None, dit={**TINY_DIT, "attention": "factorised"}, frames=FRAMES),  # ddim
    "video_unet_flow": dict(unet={**TINY_UNET, "temporal_attention": True}, **FLOW, frames=FRAMES),
}
DECODER_CASES = {  # name -> LatentDiffusionModule arguments of an unCLIP decoder
    "decoder_unet_flow": dict(**FLOW, condition="text+image_embedding"),
    "decoder_dit_eps_image_only": dict(unet=None, dit=TINY_DIT, condition="image_embedding"),  # ddim
}


@pytest.fixture(scope="module")
def exported_more(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines_more")
    out = {}
    for name, kwargs in {**VIDEO_CASES, **DECODER_CASES}.items():
        model = make_model(tiny_ckpts, **kwargs)
        summary = export_pipeline(model, root / name)
        out[name] = (model, root / name, summary)
    return out


def _embeddings(model, n, seed):
    e = torch.randn(n, int(model.clip.embed_dim), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(e, dim=-1)


@pytest.mark.parametrize("case", VIDEO_CASES)
def test_a_video_model_exports_and_samples_our_clips(exported_more, case):
    model, folder, summary = exported_more[case]
    assert summary["frames"] == FRAMES
    pipe = load(folder)
    net = pipe.unet if "unet" in case else pipe.transformer
    assert pipe.config.frames == FRAMES and type(net).__name__ == ("LitDiffusionUNet" if "unet" in case
                                                                   else "LitDiffusionDiT")
    lh, lw = model.latent_shape()
    noise = torch.randn(len(PROMPTS), FRAMES, model.latent_channels, lh, lw, generator=torch.Generator().manual_seed(3))
    sampler = model.hparams.sampler
    results = {}
    for guidance, negative in ((1.0, None), (3.0, NEGATIVE)):
        ours = model.sample(PROMPTS, negative_prompts=negative, guidance=guidance, sampler=sampler, steps=STEPS,
                            x_T=noise.clone(), frames=FRAMES)
        out = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=STEPS,
                   latents=noise.clone(), output_type="pt", decode_chunk_size=3)
        assert out.frames is out.images
        assert out.frames.shape == ours.shape == (len(PROMPTS), FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(out.frames, ours, **TOL)
        results[guidance] = ours
    assert (results[1.0][0] - results[1.0][1]).abs().max() > 1e-3
    assert (results[3.0] - results[1.0]).abs().max() > 1e-3
    assert (results[1.0][:, 0] - results[1.0][:, -1]).abs().max() > 1e-3  # the frames differ
    if case == "video_flow_full":  # the default clip length from a generator; "np" and "pil" clips
        clips = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(7), output_type="np").frames
        ours = model.sample(PROMPTS[:1], seed=7)
        assert clips.shape == (1, FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)
        torch.testing.assert_close(torch.from_numpy(clips).permute(0, 1, 4, 2, 3), ours, **TOL)
        pil = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(7)).frames
        assert len(pil) == 1 and len(pil[0]) == FRAMES and pil[0][0].size == (IMAGE_SIZE, IMAGE_SIZE)
        # a shorter clip (a multiple of the tubelet), and the latents
        short = torch.randn(1, 2, model.latent_channels, lh, lw, generator=torch.Generator().manual_seed(5))
        latents = pipe(PROMPTS[:1], num_frames=2, guidance_scale=3.0, num_inference_steps=STEPS, latents=short,
                       output_type="latent").frames
        torch.testing.assert_close(latents, model.sample(PROMPTS[:1], guidance=3.0, steps=STEPS, x_T=short, frames=2,
                                                         return_latents=True), atol=1e-4, rtol=1e-5)
        with pytest.raises(ValueError, match=r"latents have shape \(1, 2, "):
            pipe(PROMPTS[:1], latents=short, output_type="latent")  # num_frames defaults to the checkpoint's 4


@pytest.mark.parametrize("case", DECODER_CASES)
def test_an_unclip_decoder_exports_and_samples_our_images_from_image_embeddings(exported_more, case):
    model, folder, summary = exported_more[case]
    assert summary["condition"] == model.hparams.condition
    assert summary["image_encoder"] == "CLIPVisionModelWithProjection"
    pipe = load(folder)
    lh, lw = model.latent_shape()
    noise = torch.randn(len(PROMPTS), model.latent_channels, lh, lw, generator=torch.Generator().manual_seed(3))
    embeds = _embeddings(model, len(PROMPTS), 11)
    sampler = model.hparams.sampler
    results = {}
    for guidance, negative in ((1.0, None), (3.0, NEGATIVE)):
        ours = model.sample(PROMPTS, negative_prompts=negative, guidance=guidance, sampler=sampler, steps=STEPS,
                            x_T=noise.clone(), image_embeddings=embeds)
        theirs = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=STEPS,
                      latents=noise.clone(), output_type="pt", image_embeds=embeds).images
        assert theirs.shape == ours.shape == (len(PROMPTS), 3, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(theirs, ours, **TOL)
        results[guidance] = ours
    assert (results[3.0] - results[1.0]).abs().max() > 1e-3
    same_text = model.sample(PROMPTS[:1] * 2, guidance=1.0, sampler=sampler, steps=STEPS, x_T=noise.clone(),
                             image_embeddings=embeds)
    assert (same_text[0] - same_text[1]).abs().max() > 1e-3  # the embedding reaches the images
    if model.hparams.condition == "image_embedding":  # the caption is never shown: no prompt needed
        theirs = pipe(guidance_scale=3.0, num_inference_steps=STEPS, latents=noise.clone(), output_type="pt",
                      image_embeds=embeds).images
        torch.testing.assert_close(theirs, results[3.0], **TOL)
    # variations: an image's embedding through the exported image tower is our CLIP's
    images = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(2))
    ours_e = model.encode_image_embeddings(images)
    torch.testing.assert_close(pipe.encode_image(images), ours_e, atol=1e-5, rtol=0)
    varied = pipe(PROMPTS[:1], guidance_scale=3.0, num_inference_steps=STEPS, latents=noise[:1].clone(),
                  output_type="pt", image=images[:1]).images
    torch.testing.assert_close(varied, model.sample(PROMPTS[:1], guidance=3.0, sampler=sampler, steps=STEPS,
                                                    x_T=noise[:1].clone(), image_embeddings=ours_e[:1]), **TOL)
    with pytest.raises(ValueError, match="needs CLIP image embeddings"):
        pipe(PROMPTS[:1], num_inference_steps=STEPS, output_type="latent")


def test_export_refuses_what_the_pipeline_cannot_hold(tiny_ckpts, tmp_path):
    model = make_model(tiny_ckpts, **FLOW, flow={"time_scale": 999.5})
    with pytest.raises(ExportError, match=r"model\.init_args\.flow\.time_scale = 999\.5"):
        export_pipeline(model, tmp_path / "scale")
    assert not (tmp_path / "scale").exists()  # refused before writing


def test_cli_exports_a_diffusion_checkpoint_as_a_pipeline_with_its_card(tiny_ckpts, tmp_path, capsys, monkeypatch):
    from lit_diffusion.export import card

    pushed = []
    monkeypatch.setattr(card, "push_to_hub", lambda folder, repo_id, **kw: pushed.append((folder, repo_id, kw)) or
                        ["README.md"])  # no network: the CLI hands the folder and repo over
    model = make_model(tiny_ckpts, **FLOW)
    save_checkpoint(model, tmp_path / "ldm.ckpt")
    out = tmp_path / "pipe"
    cli_main(["export", "--ckpt", str(tmp_path / "ldm.ckpt"), "--to", "diffusers", "--out", str(out),
              "--push-to-hub", "someone/tiny", "--private"])
    summary = json.loads(capsys.readouterr().out)
    assert pushed == [(out, "someone/tiny", {"private": True})]
    assert summary["pushed"] == {"repo": "someone/tiny", "files": ["README.md"]}
    assert summary["kind"] == "pipeline" and summary["denoiser"] == "unet/LitDiffusionUNet"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(summary["files"]) <= names and "README.md" in names
    assert {"model_index.json", "lit_diffusion_pipeline.py", "unet/lit_diffusion_unet.py",
            "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= names
    assert import_denoiser(out).state_dict().keys() == model.unet.state_dict().keys()


def test_cli_exports_video_and_decoder_checkpoints(tiny_ckpts, tmp_path, capsys):
    """Through `lit-diffusion export` (model card included): a video checkpoint, and an unCLIP decoder's with its
    prior (`--prior`), whose folder holds the image tower and the prior."""
    save_checkpoint(make_prior(tiny_ckpts), tmp_path / "prior.ckpt")
    for name, kwargs in (("video", VIDEO_CASES["video_flow_full"]), ("decoder", DECODER_CASES["decoder_unet_flow"])):
        save_checkpoint(make_model(tiny_ckpts, **kwargs), tmp_path / f"{name}.ckpt")
        out = tmp_path / name
        prior = ["--prior", str(tmp_path / "prior.ckpt")] if name == "decoder" else []
        cli_main(["export", "--ckpt", str(tmp_path / f"{name}.ckpt"), "--to", "diffusers", "--out", str(out), *prior])
        summary = json.loads(capsys.readouterr().out)
        assert summary["kind"] == "pipeline" and (out / "README.md").is_file()
        index = json.loads((out / "model_index.json").read_text())
        assert (index["frames"], index["condition"]) == (kwargs.get("frames", 1), kwargs.get("condition", "text"))
        if name == "decoder":
            assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
            assert {"image_encoder/config.json", "image_encoder/model.safetensors"} <= set(summary["files"])
            assert index["prior"] == ["lit_diffusion_prior", "LitDiffusionPrior"] and index["prior_candidates"] == 2
            assert index["prior_scheduler"] == ["diffusers", "DDIMScheduler"]
        else:
            assert index["image_encoder"] == index["prior"] == [None, None] and not (out / "image_encoder").exists()
    with pytest.raises(SystemExit):
        cli_main(["export", "--ckpt", str(tmp_path / "video.ckpt"), "--to", "diffusers", "--out",
                  str(tmp_path / "refused"), "--prior", str(tmp_path / "prior.ckpt")])
    assert "--prior with a model conditioned on text only" in capsys.readouterr().err


PRIOR_CASES = {  # name -> (decoder case, DiffusionPriorModule arguments, the prior scheduler): each of our prior
    "prior_ddpm_ddim": ("decoder_unet_flow", dict(), DDIM_S),  # samplers; an x0 model: DDPM's prediction "sample"
    "prior_flow_euler": ("decoder_dit_eps_image_only", dict(objective="flow", sampler="euler"), EULER_S),
    "prior_ddpm_dpmpp_2m": ("decoder_unet_flow", dict(sampler="dpmpp_2m"), DPM_S),
    "prior_flow_heun": ("decoder_unet_flow", dict(objective="flow", sampler="heun"), HEUN_S),  # in prior_scheduler/
}


def make_prior(ckpts, **kwargs):
    from lit_diffusion.stages.prior import DiffusionPriorModule

    torch.manual_seed(1)
    prior = DiffusionPriorModule(clip_ckpt=str(ckpts["clip"]), prior=dict(width=32, depth=2, heads=2),
                                 sample_steps=STEPS, warmup_steps=0, candidates=2, guidance=2.0, **kwargs).eval()
    with torch.no_grad():  # a trained-looking standardisation, so that to_clip_space does something
        prior.embedding_mean.normal_(std=0.05)
        prior.embedding_std.uniform_(0.5, 1.5)
    return prior


@pytest.fixture(scope="module")
def exported_prior(exported_more, tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines_prior")
    out = {}
    for name, (decoder, kwargs, _) in PRIOR_CASES.items():
        model = exported_more[decoder][0]
        prior = make_prior(tiny_ckpts, **kwargs)
        summary = export_pipeline(model, root / name, prior=prior)
        out[name] = (model, prior, root / name, summary)
    return out


@pytest.mark.parametrize("case", PRIOR_CASES)
def test_with_its_prior_the_decoder_pipeline_generates_as_unclip(exported_prior, case):
    """`export --prior`: captions -> the prior's embeddings -> the decoder, as `UnCLIP.generate` from the same
    seeds' noise (the prior's draws and the decoder's latents)."""
    from lit_diffusion.unclip import UnCLIP

    model, prior, folder, summary = exported_prior[case]
    assert summary["prior"] == "LitDiffusionPrior"
    pipe = load(folder)
    assert type(pipe.prior).__name__ == "LitDiffusionPrior"
    assert type(pipe.prior_scheduler).__name__ == PRIOR_CASES[case][2]
    unclip = UnCLIP(prior, model)
    # seeds at which some caption keeps its second draw, so that the last check exercises the scoring
    seeds, k, e = [7, 8], prior.hparams.candidates, prior.prior.config.embed_dim
    from lit_diffusion.runtime.rng import key_seed

    # the prior's draws of seed s come from key_seed(f"{s}/x_T") (the decoder's latent from s itself)
    prior_noise = torch.stack([torch.randn(k, e, generator=torch.Generator().manual_seed(key_seed(f"{s}/x_T")))
                               for s in seeds])
    lh, lw = model.latent_shape()
    noise = torch.stack([torch.randn(model.latent_channels, lh, lw, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    for guidance, prior_guidance, negative in ((1.0, 1.0, None), (3.0, 2.0, NEGATIVE)):
        ours_e = prior.sample(PROMPTS, negative, seed=seeds, guidance=prior_guidance)
        theirs_e = pipe.sample_prior(PROMPTS, negative, guidance_scale=prior_guidance, latents=prior_noise.clone())
        torch.testing.assert_close(theirs_e, ours_e, atol=1e-5, rtol=0)
        ours = unclip.generate(PROMPTS, negative, seed=seeds, guidance=guidance, prior_guidance=prior_guidance,
                               steps=STEPS)
        theirs = pipe(PROMPTS, negative_prompt=negative, guidance_scale=guidance, num_inference_steps=STEPS,
                      latents=noise.clone(), prior_latents=prior_noise.clone(), prior_guidance_scale=prior_guidance,
                      output_type="pt").images
        torch.testing.assert_close(theirs, ours, **TOL)
    assert pipe.config.prior_candidates == 2 and pipe.config.prior_guidance_scale == 2.0  # the prior's defaults
    first = pipe.sample_prior(PROMPTS, candidates=1, latents=prior_noise[:, :1].clone())  # its first draws only
    torch.testing.assert_close(first, prior.sample(PROMPTS, seed=seeds, candidates=1), atol=1e-5, rtol=0)
    kept = pipe.sample_prior(PROMPTS, latents=prior_noise.clone())
    assert (kept - first).abs().max() > 1e-3  # some caption kept its second draw: the scoring was exercised


def test_a_prior_is_refused_beside_a_text_model_or_another_clip(exported_more, tiny_ckpts, tmp_path):
    prior = make_prior(tiny_ckpts)
    text_model = make_model(tiny_ckpts, **FLOW)
    with pytest.raises(ExportError, match=r"--prior with a model conditioned on text only"):
        export_pipeline(text_model, tmp_path / "text", prior=prior)
    decoder = exported_more["decoder_unet_flow"][0]
    prior._clip_hash = "0" * 64  # as a prior trained on another CLIP's shards
    with pytest.raises(ExportError, match="the prior and the decoder hold different CLIPs"):
        export_pipeline(decoder, tmp_path / "other", prior=prior)
    assert not (tmp_path / "text").exists() and not (tmp_path / "other").exists()
