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


def test_export_refuses_what_the_pipeline_cannot_hold(tiny_ckpts, tmp_path):
    video = make_model(tiny_ckpts, unet=None, dit=TINY_DIT, **FLOW, frames=2)
    with pytest.raises(ExportError, match=r"model\.init_args\.frames = 2: a video model"):
        export_pipeline(video, tmp_path / "video")
    decoder = make_model(tiny_ckpts, condition="text+image_embedding")
    with pytest.raises(ExportError, match=r"model\.init_args\.condition = 'text\+image_embedding': unCLIP's decoder"):
        export_pipeline(decoder, tmp_path / "decoder")
    assert not (tmp_path / "video").exists() and not (tmp_path / "decoder").exists()  # refused before writing


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
