"""Stage 3 to diffusers: a diffusion stage checkpoint (ldm.ckpt) written as a whole diffusers pipeline folder that
`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads and runs, with the frozen CLIP and VAE that
travel inside ldm.ckpt:

  vae/                 diffusers AutoencoderKL (export/vae.py), latent scale and shift in its config
  text_encoder/        transformers CLIPTextModelWithProjection: our text tower (export/clip.py's key map)
  tokenizer/           a fast tokenizer giving our token ids, padded to the context length (export/clip.py)
  unet/ | transformer/ our U-Net or DiT as remote code (`export/remote`): LitDiffusionUNet / LitDiffusionDiT
  scheduler/           the scheduler stepping as the checkpoint's default sampler (`sampler`) where one does:
                       flow euler: FlowMatchEulerDiscreteScheduler (our shift; `base_latent`: exponential dynamic
                       shifting, mu = log(shift)); flow heun: LitDiffusionFlowHeunScheduler, remote code
                       (scheduler/lit_diffusion_scheduler.py, export/remote); ddpm dpmpp_2m:
                       DPMSolverMultistepScheduler; else DDIMScheduler (ddpm: our betas, prediction type, trailing
                       timesteps, alpha 1 after the last step)
  image_encoder/       unCLIP decoders only: transformers CLIPVisionModelWithProjection, the frozen CLIP's image
                       tower (export/clip.py's key map), for `pipe(image=...)` variations; not written (a warning)
                       where transformers cannot compute it as ours (a text-only, video or pooled-without-class-token
                       tower): `image_embeds` only then
  lit_diffusion_pipeline.py + model_index.json   the LitDiffusionPipeline (remote code) and its defaults

What the pipeline samples, as `LatentDiffusionModule.sample` does (tests/test_export_pipeline.py):
  images                a text-to-image model: latents [B, C, h, w]
  clips                 a video model (`frames` > 1: the DiT, or the U-Net with temporal or space-time attention):
                        latents [B, T, C, h, w], T = `num_frames` (default the checkpoint's `frames`, as
                        `sample(frames=...)`), the VAE decoding frame by frame; output_type "pt" [B, T, 3, H, W],
                        "np" [B, T, H, W, 3], "pil" a list of clips, each a list of frames (the output's `frames`,
                        also `images`)
  unCLIP decoder        `condition` text+image_embedding or image_embedding: `image_embeds` [B, E] (CLIP image
                        embeddings: from our prior, `DiffusionPriorModule.sample_embeddings` / `UnCLIP`, an
                        interpolation, or `pipe.encode_image(image)`; `pipe(image=...)` gives variations);
                        guidance's unconditional branch has the null embedding (a zero row: the denoiser's learned
                        one) beside the empty or negative caption, as `sample(image_embeddings=...)`; with
                        image_embedding the caption is never shown (`prompt` may be left out)
  + unCLIP prior        `export --prior prior.ckpt` (the decoder's CLIP): prior/ (LitDiffusionPrior, remote code: our
                        DiffusionPrior and the embedding standardisation) and prior_scheduler/ (as for the denoiser,
                        an x0-predicting model: DDIMScheduler prediction "sample", DPMSolverMultistepScheduler, or the
                        flow schedulers fed the velocity (x_t - x0) / t); given prompts and no embeddings the
                        pipeline samples them (`sample_prior`: candidates, guidance on x0, the best dot product with
                        the caption's embedding kept) as `UnCLIP.generate`, the negative prompt going to both

Which of our samplers the exported scheduler reproduces (same initial noise, same guidance: equal to float
rounding, tests/test_export_pipeline.py):
  flow  euler                     = FlowMatchEulerDiscreteScheduler with sigmas linspace(1, 1/n, n), shifted
  flow  heun                      = LitDiffusionFlowHeunScheduler (ours, bit for bit: the same float64 grid and
                                    update order). Not diffusers' FlowMatchHeunDiscreteScheduler: its step is the
                                    same method (Karras Algorithm 1, the last step Euler to t = 0, 2 n - 1 calls; with
                                    our grid forced in, 5e-7 from ours), but its set_timesteps takes no sigmas and no
                                    mu, and its own grid is shift(linspace(1, shift(1 / 1000), n)) where ours is
                                    shift(linspace(1, 1 / n, n)), e.g. last time 0.0089 vs 0.2 at shift 3, 13 steps
  ddpm  ddim, eta 0, trailing     = DDIMScheduler, when num_timesteps is a multiple of the steps (DDIM steps to
                                    t - T // n; our trailing grid rounds T - i T / n, the same timesteps only then;
                                    the pipeline warns otherwise). Betas: diffusers' named schedule where it
                                    computes ours (linear, scaled_linear, cosine as squaredcos_cap_v2), else ours as
                                    trained_betas (zero terminal SNR included: diffusers' own rescaling ends at
                                    abar 2^-24, ours at 0)
  ddpm  dpmpp_2m                  = DPMSolverMultistepScheduler (dpmsolver++, solver_order 2, midpoint, trailing:
                                    the same timesteps for every step count, final_sigmas_type "zero": first-order
                                    first and last steps, as ours), betas as for DDIM; to float32 rounding of its
                                    float32 alphas_cumprod (relative ~1e-6)
and which have no exact twin here (the export writes DDIMScheduler and warns):
  ddpm  ddim with eta > 0, ddpm   the same updates, but each step's fresh noise is drawn in another order
  ddpm  dpmpp_2m, zero terminal   DPMSolverMultistepScheduler cannot start at abar 0 (sigma = inf: NaN); with
        SNR                       rescale_betas_zero_snr it starts at abar 2^-24 instead, ~1e-3 from ours
  ddpm  dpmpp_2m with clip_x0     DPMSolverMultistepScheduler has dynamic thresholding only, no clipping of x0
  ddpm  clip_x0 (ddim)            DDIM's clip_sample with use_clipped_model_output: same maths, not tested
Refused, naming the field: a flow `time_scale` that is not a whole number of training timesteps, and whatever the
VAE or text-encoder exports refuse (export/vae.py, `check_text_encoder_exportable`). Video models and unCLIP decoders
export (earlier versions refused them), a decoder with its prior where `--prior` names one; refused by name: a
prior beside a text-only model, or one embedding another CLIP than the decoder's.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from lit_diffusion.export import ExportError, prepare_folder, save_safetensors, write_json
from lit_diffusion.export.clip import (
    LAYER_NORM_EPS,
    _act,
    _backend,
    _split_qkv,
    hf_names,
    pad_is_special,
    write_hf_tokenizer,
)
from lit_diffusion.export.remote import (
    DENOISERS,
    PIPELINE_CLASS,
    PIPELINE_FILE,
    PIPELINE_MODULE,
    PRIOR,
    SCHEDULER_CLASS,
    SCHEDULER_FILE,
    SCHEDULER_MODULE,
    denoiser_source,
    prior_source,
)
from lit_diffusion.export.vae import WEIGHTS_NAME, check_exportable as check_vae_exportable, export_vae
from lit_diffusion.stages.base import CheckpointError
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.ldm import LatentDiffusionModule

log = logging.getLogger("lit_diffusion")

TEXT_WEIGHTS = "model.safetensors"
DDIM_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# our NoiseSchedule's named schedules that diffusers computes with the same formula: (name, default start, end)
DIFFUSERS_BETAS = {"linear": ("linear", 1e-4, 0.02), "scaled_linear": ("scaled_linear", 0.00085, 0.012),
                   "cosine": ("squaredcos_cap_v2", None, None)}


def _diffusers_version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "0.30.0"


# ----------------------------------------------------------------------------------------------------- checks
def check_text_encoder_exportable(clip: CLIPModule) -> None:
    """What transformers' CLIPTextModel cannot compute as our text tower does (export/clip.py's text checks)."""
    text = clip.model.text.cfg
    if text.eot_id == 2:
        raise ExportError("text.eot_id = 2 (the tokenizer's end-of-text id): transformers' CLIPTextModel reads "
                          "eos_token_id 2 as a legacy config and pools at the highest token id instead of the "
                          "end-of-text token")
    if not pad_is_special(clip.tokenizer):
        backend, _ = _backend(clip.tokenizer)
        pad = backend.id_to_token(clip.tokenizer.pad_id)
        raise ExportError(f"the tokenizer pads with id {clip.tokenizer.pad_id} ({pad!r}), an ordinary vocabulary "
                          f"entry: a transformers tokenizer pads only with a special token")


def check_exportable(module: LatentDiffusionModule) -> None:
    """Refuse, naming the field, a diffusion stage the exported pipeline would not sample as ours does. Video models
    (`frames` > 1: latents [B, T, C, h, w], decoded frame by frame) and unCLIP decoders (`condition` with an image
    embedding: the pipeline takes `image_embeds`, or an `image` through the exported image tower) export."""
    h = module.hparams
    if module.objective == "flow":
        scale = module.schedule.time_scale
        if scale != int(scale):
            raise ExportError(f"model.init_args.flow.time_scale = {scale}: FlowMatchEulerDiscreteScheduler calls "
                              f"the network with t * num_train_timesteps, a whole number")
    elif h.sampler == "dpmpp_2m" and ddpm_twin(module) != "DPMSolverMultistepScheduler":
        why = "zero terminal SNR" if module.schedule.config["zero_terminal_snr"] else f"clip_x0 = {h.clip_x0}"
        log.warning("the checkpoint samples with dpmpp_2m by default; with %s DPMSolverMultistepScheduler does not "
                    "step as ours, so the exported pipeline steps with DDIMScheduler (our ddim, eta 0)", why)
    elif h.sampler not in ("ddim", "dpmpp_2m") or h.eta:
        log.warning("the checkpoint samples with %s (eta %s) by default; the exported pipeline steps with "
                    "DDIMScheduler (eta 0 unless given)", h.sampler, h.eta)
    check_text_encoder_exportable(module.clip)
    check_vae_exportable(module.vae.config)


# ----------------------------------------------------------------------------------------------- text encoder
def text_encoder_config(clip: CLIPModule):
    """transformers' CLIPTextConfig of our text tower (projection to the CLIP embedding width included)."""
    from lit_diffusion.pretrained import require

    transformers = require("transformers", "exporting a text encoder to transformers")
    text, tok = clip.model.text.cfg, clip.tokenizer
    config = transformers.CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=int(text.width * text.mlp_ratio),
        num_hidden_layers=text.layers, num_attention_heads=text.heads, max_position_embeddings=text.context_length,
        hidden_act=_act(text.quick_gelu), layer_norm_eps=LAYER_NORM_EPS, attention_dropout=text.dropout,
        projection_dim=clip.model.embed_dim, pad_token_id=tok.pad_id, bos_token_id=tok.sot_id,
        eos_token_id=tok.eot_id)
    config.architectures = ["CLIPTextModelWithProjection"]
    return config


def text_encoder_state_dict(clip: CLIPModule) -> dict[str, Tensor]:
    """Our text tower's weights -> CLIPTextModelWithProjection's names (export/clip.py's map, text side only)."""
    state = _split_qkv({f"text.{k}": v for k, v in clip.model.text.state_dict().items()})
    out = {"text_projection.weight": state.pop("text.text_projection").T}
    return hf_names(state, out, ("text_model.",), "CLIPTextModel")


def export_text_encoder(clip: CLIPModule, out: Path) -> list[str]:
    """text_encoder/ (config + weights) and tokenizer/ in the pipeline folder `out`."""
    check_text_encoder_exportable(clip)
    (out / "text_encoder").mkdir(exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    text_encoder_config(clip).save_pretrained(str(out / "text_encoder"))
    save_safetensors(text_encoder_state_dict(clip), out / "text_encoder" / TEXT_WEIGHTS)
    files = write_hf_tokenizer(clip.tokenizer, out / "tokenizer")
    return ["text_encoder/config.json", f"text_encoder/{TEXT_WEIGHTS}", *(f"tokenizer/{f}" for f in files)]


def image_encoder_refusal(clip: CLIPModule) -> str | None:
    """Why transformers' CLIPVisionModelWithProjection cannot compute our image tower's embeddings (None: it can)."""
    if clip.model.visual is None:
        return "the CLIP has no image tower (text_only)"
    vision = clip.model.visual.cfg
    if vision.frames > 1:
        return f"vision.frames = {vision.frames}: a video CLIP tower"
    if vision.pool != "cls":
        return f"vision.pool = {vision.pool!r}: transformers' CLIP vision tower always pools a class token"
    return None


def image_encoder_config(clip: CLIPModule):
    """transformers' CLIPVisionConfig of our image tower (projection to the CLIP embedding width included)."""
    from lit_diffusion.pretrained import require

    transformers = require("transformers", "exporting an image encoder to transformers")
    vision = clip.model.visual.cfg
    config = transformers.CLIPVisionConfig(
        hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio),
        num_hidden_layers=vision.layers, num_attention_heads=vision.heads, image_size=vision.image_size,
        patch_size=vision.patch_size, num_channels=3, hidden_act=_act(vision.quick_gelu),
        layer_norm_eps=LAYER_NORM_EPS, attention_dropout=vision.dropout, projection_dim=clip.model.embed_dim)
    config.architectures = ["CLIPVisionModelWithProjection"]
    return config


def image_encoder_state_dict(clip: CLIPModule) -> dict[str, Tensor]:
    """Our image tower's weights -> CLIPVisionModelWithProjection's names (export/clip.py's map, image side)."""
    state = _split_qkv({f"visual.{k}": v for k, v in clip.model.visual.state_dict().items()})
    out = {"visual_projection.weight": state.pop("visual.proj").T}
    return hf_names(state, out, ("vision_model.",), "CLIPVisionModel")


def export_image_encoder(clip: CLIPModule, out: Path) -> list[str]:
    """image_encoder/ (config + weights) in the pipeline folder `out`: the frozen CLIP's image tower, which turns an
    `image` into the decoder's `image_embeds` (variations)."""
    (out / "image_encoder").mkdir(exist_ok=True)
    image_encoder_config(clip).save_pretrained(str(out / "image_encoder"))
    save_safetensors(image_encoder_state_dict(clip), out / "image_encoder" / TEXT_WEIGHTS)
    return ["image_encoder/config.json", f"image_encoder/{TEXT_WEIGHTS}"]


# --------------------------------------------------------------------------------------------------- denoiser
def denoiser_config(module: LatentDiffusionModule) -> dict:
    """config.json of the remote denoiser: its wrapper class and our UNetConfig / DiTConfig fields."""
    _, wrapper, _, _ = DENOISERS[module._net_name]
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(module.network_config).items()}
    return {"_class_name": wrapper, "_diffusers_version": _diffusers_version(), **fields}


def export_denoiser(module: LatentDiffusionModule, out: Path) -> list[str]:
    """unet/ or transformer/: the remote module, config.json and our `unet.*` / `dit.*` weights as they are in
    ldm.ckpt (the sampling copy: the EMA weights where training kept them)."""
    kind = module._net_name
    stem, _, folder, _ = DENOISERS[kind]
    where = out / folder
    where.mkdir(exist_ok=True)
    (where / f"{stem}.py").write_text(denoiser_source(kind))
    write_json(denoiser_config(module), where / "config.json")
    save_safetensors({f"{kind}.{k}": v for k, v in module.network.state_dict().items()}, where / WEIGHTS_NAME)
    return [f"{folder}/{stem}.py", f"{folder}/config.json", f"{folder}/{WEIGHTS_NAME}"]


def import_denoiser(folder: str | Path) -> nn.Module:
    """Our UNet or DiT back from an exported pipeline folder (or its unet/ / transformer/ folder), with the exported
    weights loaded strictly: the inverse of `export_denoiser`, bit for bit."""
    from lit_diffusion.models.dit import DiT, DiTConfig
    from lit_diffusion.models.unet import UNet, UNetConfig
    from lit_diffusion.pretrained import require

    folder = Path(folder)
    for kind, (_, wrapper, sub, _) in DENOISERS.items():
        for where in (folder / sub, folder):
            config_path = where / "config.json"
            if config_path.is_file() and f'"{wrapper}"' in config_path.read_text():
                config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
                net = DiT(DiTConfig.from_dict(config)) if kind == "dit" else UNet(UNetConfig.from_dict(config))
                state = require("safetensors.torch", "reading exported weights").load_file(str(where / WEIGHTS_NAME))
                prefix = f"{kind}."
                net.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
                return net.eval()
    raise ExportError(f"{folder} holds no exported lit_diffusion denoiser (unet/ or transformer/ with a "
                      f"{' or '.join(w for _, w, _, _ in DENOISERS.values())} config.json)")


# ------------------------------------------------------------------------------------------------------ prior
def check_prior_exportable(prior, module: LatentDiffusionModule) -> None:
    """Refuse, naming what is wrong, a prior (`export --prior`) that cannot feed this decoder in the pipeline."""
    if not module.image_conditioned:
        raise ExportError(f"--prior with a model conditioned on text only (model.init_args.condition = "
                          f"{module.hparams.condition!r}): a prior feeds unCLIP's decoder (condition "
                          f"text+image_embedding or image_embedding)")
    theirs, ours = prior.clip_hash(), module.encoder_hashes()["clip"]
    if theirs != ours:
        raise ExportError(f"the prior and the decoder hold different CLIPs (state_dict_hash {theirs[:16]} and "
                          f"{ours[:16]}): the prior's embeddings would be in another space than the decoder reads")
    if prior.objective == "flow":
        scale = prior.schedule.time_scale
        if scale != int(scale):
            raise ExportError(f"the prior's model.init_args.flow.time_scale = {scale}: the scheduler calls the "
                              f"network with t * num_train_timesteps, a whole number")
    elif prior.hparams.sampler not in ("ddim", "dpmpp_2m"):
        log.warning("the prior samples with %s by default; the exported pipeline's prior steps with DDIMScheduler "
                    "(our ddim, eta 0)", prior.hparams.sampler)


def _prior_spec(prior) -> SimpleNamespace:
    """The prior as `scheduler_for` reads a diffusion stage: an x0-predicting model, no x0 clipping; a flow prior
    has no per-resolution shift (an embedding has no resolution)."""
    schedule = prior.schedule
    if prior.objective == "flow":
        schedule = SimpleNamespace(time_scale=schedule.time_scale, shift=schedule.shift, base_latent=None)
    return SimpleNamespace(objective=prior.objective, schedule=schedule, prediction="x0",
                           hparams=SimpleNamespace(sampler=prior.hparams.sampler, clip_x0=0.0, eta=0.0))


def export_prior(prior, out: Path) -> tuple[list[str], list[str], list[str]]:
    """prior/ (remote module, config.json, the `prior.*` weights and the embedding standardisation) and
    prior_scheduler/ in the pipeline folder `out`; returns (files, prior entry, scheduler entry) for model_index."""
    stem, wrapper, folder, _ = PRIOR
    where = out / folder
    where.mkdir(exist_ok=True)
    (where / f"{stem}.py").write_text(prior_source())
    write_json({"_class_name": wrapper, "_diffusers_version": _diffusers_version(), **asdict(prior.prior.config)},
               where / "config.json")
    state = {f"prior.{k}": v for k, v in prior.prior.state_dict().items()}
    state.update(embedding_mean=prior.embedding_mean.detach().float(),
                 embedding_std=prior.embedding_std.detach().float())
    save_safetensors(state, where / WEIGHTS_NAME)
    files = [f"{folder}/{stem}.py", f"{folder}/config.json", f"{folder}/{WEIGHTS_NAME}"]
    scheduler = scheduler_for(_prior_spec(prior))
    scheduler.save_pretrained(str(out / "prior_scheduler"))
    files.append("prior_scheduler/scheduler_config.json")
    entry = ["diffusers", type(scheduler).__name__]
    if type(scheduler).__name__ == SCHEDULER_CLASS:
        shutil.copyfile(SCHEDULER_FILE, out / "prior_scheduler" / f"{SCHEDULER_MODULE}.py")
        files.append(f"prior_scheduler/{SCHEDULER_MODULE}.py")
        entry = [SCHEDULER_MODULE, SCHEDULER_CLASS]
    return files, [stem, wrapper], entry


# -------------------------------------------------------------------------------------------------- scheduler
def ddpm_twin(module: LatentDiffusionModule) -> str:
    """The diffusers scheduler class exported for a DDPM model: DPMSolverMultistepScheduler where the checkpoint's
    default sampler is dpmpp_2m and it steps exactly as ours, else DDIMScheduler (our ddim, eta 0)."""
    h, cfg = module.hparams, module.schedule.config
    if h.sampler == "dpmpp_2m" and not cfg["zero_terminal_snr"] and not h.clip_x0:
        return "DPMSolverMultistepScheduler"
    return "DDIMScheduler"


def scheduler_for(module: LatentDiffusionModule):
    """The scheduler that steps as the checkpoint's default sampler (`sampler` hparam) where one does exactly:
    flow euler -> FlowMatchEulerDiscreteScheduler, flow heun -> our LitDiffusionFlowHeunScheduler (remote code),
    ddpm dpmpp_2m -> DPMSolverMultistepScheduler (not with zero terminal SNR or clip_x0); else DDIMScheduler, our
    ddim (eta 0, trailing)."""
    from lit_diffusion.pretrained import require

    diffusers = require("diffusers", "exporting a pipeline to diffusers")
    if module.objective == "flow":
        fs = module.schedule
        flow = dict(num_train_timesteps=int(fs.time_scale), shift=float(fs.shift),
                    use_dynamic_shifting=fs.base_latent is not None, time_shift_type="exponential")
        if module.hparams.sampler == "heun":
            from lit_diffusion.export.remote.lit_diffusion_scheduler import LitDiffusionFlowHeunScheduler

            return LitDiffusionFlowHeunScheduler(**flow)
        return diffusers.FlowMatchEulerDiscreteScheduler(**flow)
    ns = module.schedule
    cfg = ns.config
    prediction = DDIM_PREDICTIONS[module.prediction]
    if ddpm_twin(module) == "DPMSolverMultistepScheduler":
        cls = diffusers.DPMSolverMultistepScheduler  # DPM-Solver++(2M), midpoint; first-order first and last step
        common = dict(num_train_timesteps=ns.num_timesteps, prediction_type=prediction, algorithm_type="dpmsolver++",
                      solver_order=2, solver_type="midpoint", timestep_spacing="trailing", steps_offset=0,
                      lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", thresholding=False,
                      use_karras_sigmas=False, use_lu_lambdas=False, lambda_min_clipped=-float("inf"))
    else:
        cls = diffusers.DDIMScheduler
        common = dict(num_train_timesteps=ns.num_timesteps, prediction_type=prediction,
                      clip_sample=bool(module.hparams.clip_x0), clip_sample_range=float(module.hparams.clip_x0 or 1.0),
                      set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing", thresholding=False)
    betas = _betas64(cfg)
    name, start, end = DIFFUSERS_BETAS.get(cfg["schedule"], (None, None, None))
    # zero terminal SNR: our rescaled betas as they are (diffusers' own rescaling puts abar_T at 2^-24, not 0)
    if name is not None and not cfg["zero_terminal_snr"] and (cfg["schedule"] != "cosine" or cfg["cosine_s"] == 0.008):
        rescale = 1000.0 / ns.num_timesteps if cfg["schedule"] == "linear" else 1.0  # ours rescales linear's ends
        named = {"beta_schedule": name}
        if start is not None:
            named.update(beta_start=(cfg["beta_start"] or start) * rescale, beta_end=(cfg["beta_end"] or end) * rescale)
        scheduler = cls(**common, **named)
        if torch.allclose(scheduler.betas.double(), betas, rtol=1e-6, atol=0):
            return scheduler
    return cls(**common, trained_betas=betas.tolist())  # no named schedule computes ours


def _betas64(cfg: dict) -> Tensor:
    """Our NoiseSchedule's betas in float64, as it computes them (its buffer keeps float32)."""
    from lit_diffusion.diffusion.schedule import BETA_SCHEDULES, cosine_betas, rescale_zero_terminal_snr

    if cfg["schedule"] == "cosine":
        betas = cosine_betas(cfg["num_timesteps"], s=cfg["cosine_s"])
    else:
        ends = {k: v for k, v in (("start", cfg["beta_start"]), ("end", cfg["beta_end"])) if v is not None}
        betas = BETA_SCHEDULES[cfg["schedule"]](cfg["num_timesteps"], **ends)
    return rescale_zero_terminal_snr(betas) if cfg["zero_terminal_snr"] else betas


# --------------------------------------------------------------------------------------------------- pipeline
def pipeline_config(module: LatentDiffusionModule, prior=None) -> dict:
    """The LitDiffusionPipeline's own settings in model_index.json: conditioning it wires, sampling defaults, the
    clip length (`frames`), the decoder's `condition` and the image tower's pixel statistics (None: [-1, 1])."""
    h = module.hparams
    vision = module.clip.model.visual.cfg if module.clip.model.visual is not None else None
    return {"objective": module.objective, "pooled_text": bool(h.pooled_text),
            "size_conditioning": bool(module.size_conditioning), "image_size": int(h.image_size),
            "base_latent": module.schedule.base_latent if module.objective == "flow" else None,
            "guidance_scale": float(h.guidance), "num_inference_steps": int(h.sample_steps),
            "guidance_rescale": float(h.guidance_rescale), "frames": int(h.frames), "condition": str(h.condition),
            "image_mean": list(vision.image_mean) if vision is not None and vision.image_mean is not None else None,
            "image_std": list(vision.image_std) if vision is not None and vision.image_std is not None else None,
            "prior_objective": None if prior is None else prior.objective,
            "prior_guidance_scale": None if prior is None else float(prior.hparams.guidance),
            "prior_num_inference_steps": None if prior is None else int(prior.hparams.sample_steps),
            "prior_candidates": None if prior is None else int(prior.hparams.candidates)}


def export_pipeline(module: LatentDiffusionModule, out: str | Path, prior=None) -> dict:
    """Write `module` (a diffusion stage) as a diffusers pipeline folder `out`; returns a summary. `prior`: an unCLIP
    prior stage (`DiffusionPriorModule`) for a decoder `module`, exported beside it (prior/, prior_scheduler/): the
    pipeline then turns captions into image embeddings itself, as `UnCLIP.generate`."""
    check_exportable(module)
    if prior is not None:
        check_prior_exportable(prior, module)
    if module.hparams.get("image_guidance") is not None:
        log.warning("the checkpoint guides the image embedding apart from the caption by default (image_guidance "
                    "%s); the exported pipeline guides both with one scale, guidance_scale",
                    module.hparams["image_guidance"])
    out = prepare_folder(out)
    files = []
    export_vae(module.vae, out / "vae")
    files += ["vae/config.json", f"vae/{WEIGHTS_NAME}"]
    files += export_text_encoder(module.clip, out)
    files += export_denoiser(module, out)
    image_encoder = [None, None]
    if module.image_conditioned:
        why = image_encoder_refusal(module.clip)
        if why is None:
            files += export_image_encoder(module.clip, out)
            image_encoder = ["transformers", "CLIPVisionModelWithProjection"]
        else:
            log.warning("%s: no image_encoder/ exported; the pipeline takes `image_embeds` (CLIP image embeddings), "
                        "not `image`", why)
    prior_entry = prior_scheduler_entry = [None, None]
    if prior is not None:
        more, prior_entry, prior_scheduler_entry = export_prior(prior, out)
        files += more
    scheduler = scheduler_for(module)
    scheduler.save_pretrained(str(out / "scheduler"))
    files.append("scheduler/scheduler_config.json")
    scheduler_entry = ["diffusers", type(scheduler).__name__]
    if type(scheduler).__name__ == SCHEDULER_CLASS:  # our own Heun: its module travels in scheduler/
        shutil.copyfile(SCHEDULER_FILE, out / "scheduler" / f"{SCHEDULER_MODULE}.py")
        files.append(f"scheduler/{SCHEDULER_MODULE}.py")
        scheduler_entry = [SCHEDULER_MODULE, SCHEDULER_CLASS]
    shutil.copyfile(PIPELINE_FILE, out / f"{PIPELINE_MODULE}.py")
    files.append(f"{PIPELINE_MODULE}.py")
    stem, wrapper, folder, _ = DENOISERS[module._net_name]
    other = "transformer" if folder == "unet" else "unet"
    index = {"_class_name": [PIPELINE_MODULE, PIPELINE_CLASS], "_diffusers_version": _diffusers_version(),
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
             "scheduler": scheduler_entry, folder: [stem, wrapper], other: [None, None],
             "image_encoder": image_encoder, "prior": prior_entry, "prior_scheduler": prior_scheduler_entry,
             **pipeline_config(module, prior)}
    write_json(index, out / "model_index.json")
    files.append("model_index.json")
    return {"out": str(out), "to": "diffusers", "kind": "pipeline", "denoiser": f"{folder}/{wrapper}",
            "scheduler": type(scheduler).__name__, "frames": int(module.hparams.frames),
            "condition": str(module.hparams.condition), "image_encoder": image_encoder[1],
            "prior": prior_entry[1], "files": files,
            "load": f"diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)"}


def load_prior_checkpoint(prior: str | Path | None):
    """The unCLIP prior stage of `--prior prior.ckpt` (None: none)."""
    if prior is None:
        return None
    from lit_diffusion.stages.prior import DiffusionPriorModule

    try:
        return DiffusionPriorModule.from_checkpoint(prior)
    except CheckpointError as err:
        raise ExportError(f"{err} (--prior takes the unCLIP prior stage's checkpoint, prior.ckpt)") from err


def export_pipeline_checkpoint(ckpt: str | Path, out: str | Path, prior: str | Path | None = None) -> dict:
    """`export_pipeline` of the diffusion stage checkpoint `ckpt` (ldm.ckpt), with the prior checkpoint `prior`."""
    try:
        module = LatentDiffusionModule.from_checkpoint(ckpt)
    except CheckpointError as err:
        raise ExportError(f"{err} (a diffusers pipeline is exported from a diffusion stage checkpoint, ldm.ckpt)") \
            from err
    return export_pipeline(module, out, prior=load_prior_checkpoint(prior))


def export_diffusers_checkpoint(ckpt: str | Path, out: str | Path, prior: str | Path | None = None) -> dict:
    """`--to diffusers`: a diffusion checkpoint (ldm.ckpt) becomes a pipeline folder (with the unCLIP prior of
    `prior`, prior.ckpt, for a decoder); anything else goes to the VAE export (`export/vae.py`), which takes vae.ckpt
    and names what any other file is."""
    from lit_diffusion.export.vae import export_vae_checkpoint

    data = None
    if Path(ckpt).is_file():
        try:
            data = torch.load(Path(ckpt), map_location="cpu", weights_only=True)
        except Exception:  # unreadable or unsafe: the VAE export's loader says which, with the reason
            data = None
    block = data.get("lit_diffusion") if isinstance(data, dict) else None
    if isinstance(block, dict) and block.get("kind") == "ldm":
        try:
            module = LatentDiffusionModule.from_checkpoint_dict(data, source=str(ckpt))
        except CheckpointError as err:
            raise ExportError(str(err)) from err
        return export_pipeline(module, out, prior=load_prior_checkpoint(prior))
    if prior is not None:
        raise ExportError(f"--prior {prior}: a prior is exported beside an unCLIP decoder's ldm.ckpt, not with {ckpt}")
    return export_vae_checkpoint(ckpt, out)
