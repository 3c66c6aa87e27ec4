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
  lit_diffusion_pipeline.py + model_index.json   the LitDiffusionPipeline (remote code) and its defaults

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
Refused, naming the field: a video model (`frames` > 1), an unCLIP decoder (`condition` with an image embedding,
which needs a prior or an image), a flow `time_scale` that is not a whole number of training timesteps, and
whatever the VAE or text-encoder exports refuse.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_diffusion.export import ExportError, prepare_folder, save_safetensors, write_json
from lit_diffusion.export.clip import (
    LAYER_NORM_EPS,
    _TO_HF,
    _act,
    _backend,
    _split_qkv,
    pad_is_special,
    write_hf_tokenizer,
)
from lit_diffusion.export.remote import (
    DENOISERS,
    PIPELINE_CLASS,
    PIPELINE_FILE,
    PIPELINE_MODULE,
    SCHEDULER_CLASS,
    SCHEDULER_FILE,
    SCHEDULER_MODULE,
    denoiser_source,
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
    """Refuse, naming the field, a diffusion stage the exported pipeline would not sample as ours does."""
    h = module.hparams
    if h.frames > 1:
        raise ExportError(f"model.init_args.frames = {h.frames}: a video model; the exported pipeline samples "
                          f"images (latents [B, C, h, w]), not clips")
    if module.image_conditioned:
        raise ExportError(f"model.init_args.condition = {h.condition!r}: unCLIP's decoder needs CLIP image "
                          f"embeddings (from a prior or an image) that a text-to-image pipeline has none of")
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
    for key, value in state.items():
        for pattern, repl in _TO_HF:
            key = re.sub(pattern, repl, key)
        if not key.startswith("text_model."):
            raise ExportError(f"no transformers CLIPTextModel weight for our {key}")
        out[key] = value
    return out


def export_text_encoder(clip: CLIPModule, out: Path) -> list[str]:
    """text_encoder/ (config + weights) and tokenizer/ in the pipeline folder `out`."""
    check_text_encoder_exportable(clip)
    (out / "text_encoder").mkdir(exist_ok=True)
    (out / "tokenizer").mkdir(exist_ok=True)
    text_encoder_config(clip).save_pretrained(str(out / "text_encoder"))
    save_safetensors(text_encoder_state_dict(clip), out / "text_encoder" / TEXT_WEIGHTS)
    files = write_hf_tokenizer(clip.tokenizer, out / "tokenizer")
    return ["text_encoder/config.json", f"text_encoder/{TEXT_WEIGHTS}", *(f"tokenizer/{f}" for f in files)]


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
def pipeline_config(module: LatentDiffusionModule) -> dict:
    """The LitDiffusionPipeline's own settings in model_index.json: conditioning it wires and sampling defaults."""
    h = module.hparams
    return {"objective": module.objective, "pooled_text": bool(h.pooled_text),
            "size_conditioning": bool(module.size_conditioning), "image_size": int(h.image_size),
            "base_latent": module.schedule.base_latent if module.objective == "flow" else None,
            "guidance_scale": float(h.guidance), "num_inference_steps": int(h.sample_steps),
            "guidance_rescale": float(h.guidance_rescale)}


def export_pipeline(module: LatentDiffusionModule, out: str | Path) -> dict:
    """Write `module` (a diffusion stage) as a diffusers pipeline folder `out`; returns a summary."""
    check_exportable(module)
    out = prepare_folder(out)
    files = []
    export_vae(module.vae, out / "vae")
    files += ["vae/config.json", f"vae/{WEIGHTS_NAME}"]
    files += export_text_encoder(module.clip, out)
    files += export_denoiser(module, out)
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
             **pipeline_config(module)}
    write_json(index, out / "model_index.json")
    files.append("model_index.json")
    return {"out": str(out), "to": "diffusers", "kind": "pipeline", "denoiser": f"{folder}/{wrapper}",
            "scheduler": type(scheduler).__name__, "files": files,
            "load": f"diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)"}


def export_pipeline_checkpoint(ckpt: str | Path, out: str | Path) -> dict:
    """`export_pipeline` of the diffusion stage checkpoint `ckpt` (ldm.ckpt)."""
    try:
        module = LatentDiffusionModule.from_checkpoint(ckpt)
    except CheckpointError as err:
        raise ExportError(f"{err} (a diffusers pipeline is exported from a diffusion stage checkpoint, ldm.ckpt)") \
            from err
    return export_pipeline(module, out)


def export_diffusers_checkpoint(ckpt: str | Path, out: str | Path) -> dict:
    """`--to diffusers`: a diffusion checkpoint (ldm.ckpt) becomes a pipeline folder; anything else goes to the VAE
    export (`export/vae.py`), which takes vae.ckpt and names what any other file is."""
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
        return export_pipeline(module, out)
    return export_vae_checkpoint(ckpt, out)
