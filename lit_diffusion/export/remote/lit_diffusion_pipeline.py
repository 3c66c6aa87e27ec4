"""LitDiffusionPipeline: text to image with a latent diffusion model trained by lit_diffusion, as diffusers remote
code (`DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`); needs torch, diffusers and transformers.

Components: `vae` (AutoencoderKL; latents are (z - shift_factor) * scaling_factor), `text_encoder`
(CLIPTextModelWithProjection: token features after the final LayerNorm, and the projected end-of-text feature,
L2-normalised, as the pooled text), `tokenizer` (a fast tokenizer giving lit_diffusion's ids, padded to the
context length), `scheduler` (the one stepping as the checkpoint's default sampler: with a rectified-flow model
FlowMatchEulerDiscreteScheduler for `euler` or LitDiffusionFlowHeunScheduler, remote code in scheduler/, for `heun`;
with a DDPM one DPMSolverMultistepScheduler for `dpmpp_2m`, else DDIMScheduler; a second-order scheduler is stepped
once per entry of its `timesteps`, which repeat) and the denoiser, `unet` or `transformer` (remote code too),
called with the caption's token features, the mask of its real tokens (up to and including the first end-of-text
token: the padding is hidden from attention), the pooled text (`pooled_text` models) and SDXL's size condition
(`size_conditioning` models: "original = target, nothing cropped").

Classifier-free guidance is lit_diffusion's: one batched call on [uncond; cond], the unconditional branch being the
empty caption or the negative prompt(s), guided = uncond + scale (cond - uncond) on the raw output, then optionally
rescaled (`guidance_rescale`, Lin et al. 2024); scale 1 calls the conditional branch only.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)


class LitDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    _optional_components = ["unet", "transformer"]

    def __init__(self, vae, text_encoder, tokenizer, scheduler, unet=None, transformer=None,
                 objective: str = "flow", pooled_text: bool = False, size_conditioning: bool = False,
                 image_size: int = 256, base_latent: int | None = None, guidance_scale: float = 3.0,
                 num_inference_steps: int = 50, guidance_rescale: float = 0.0):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("LitDiffusionPipeline needs one denoiser: a unet or a transformer")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              unet=unet, transformer=transformer)
        self.register_to_config(objective=objective, pooled_text=pooled_text, size_conditioning=size_conditioning,
                                image_size=image_size, base_latent=base_latent, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, guidance_rescale=guidance_rescale)

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device) -> dict:
        """The denoiser's text keywords: token features [B, L, W], mask [B, L], pooled [B, E] (pooled_text)."""
        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)  # [B, L]: [sot, pieces..., eot, pad...]
        out = self.text_encoder(ids)  # causal attention only, as the training text tower: no attention mask
        is_eot = ids == tok.eos_token_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), ids.shape[1] - 1)  # [B]
        mask = torch.arange(ids.shape[1], device=device)[None] <= first[:, None]  # real tokens, eot included
        cond = {"encoder_hidden_states": out.last_hidden_state, "encoder_attention_mask": mask}
        if self.config.pooled_text:
            cond["pooled_projections"] = F.normalize(out.text_embeds, dim=-1)
        return cond

    # ------------------------------------------------------------------------------------------------ steps
    def _guided(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None, scale: float,
                rescale: float) -> torch.Tensor:
        denoiser = self.denoiser
        if uncond is None:
            return denoiser(x, t.expand(x.shape[0]), **cond, return_dict=False)[0]
        both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
        out = denoiser(torch.cat([x, x]), t.expand(2 * x.shape[0]), **both, return_dict=False)[0]
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:  # Lin et al. 2024, sec. 3.4: the guided output at the conditional one's std, blended
            dims = tuple(range(1, guided.ndim))
            rescaled = guided * (out_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
            guided = rescale * rescaled + (1 - rescale) * guided
        return guided

    def _set_timesteps(self, steps: int, latent_height: int, latent_width: int, device) -> None:
        if self.config.objective != "flow":
            total = self.scheduler.config.num_train_timesteps
            if (self.scheduler.config.get("timestep_spacing") == "trailing"
                    and "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters):
                # lit_diffusion's trailing grid, round(T - i T / n) - 1: diffusers' own, np.arange(T, 0, -T / n)
                # rounded, differs for some counts (T = 1000: 48, 61, 96, ...; 61 gives 62 timesteps, the last -1)
                grid = [round(total - i * total / steps) - 1 for i in range(steps)]
                self.scheduler.set_timesteps(timesteps=grid, device=device)
                return
            if type(self.scheduler).__name__ == "DDIMScheduler" and total % steps:
                logger.warning(f"{steps} steps do not divide {total} timesteps: DDIMScheduler steps from t to "
                               f"t - {total // steps}, which is not lit_diffusion's trailing grid for this count")
            self.scheduler.set_timesteps(steps, device=device)
            return
        if "sigmas" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            # e.g. diffusers' FlowMatchHeunDiscreteScheduler: its own grid, not lit_diffusion's, and no mu
            logger.warning(f"{type(self.scheduler).__name__}.set_timesteps takes no sigmas: it steps on its own time "
                           f"grid, not lit_diffusion's (and without the per-resolution shift)")
            self.scheduler.set_timesteps(steps, device=device)
            return
        # t = 1 .. 1/steps (then 0), as lit_diffusion's sampling_times: shifted by the scheduler
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1].numpy()
        kwargs = {}
        if self.config.base_latent:  # the shift grows with sqrt(latent positions) (SD3 sec. 5.3.2)
            shift = self.scheduler.config.shift * math.sqrt(latent_height * latent_width) / self.config.base_latent
            kwargs["mu"] = math.log(shift)  # exponential time shift with mu = log(shift) is SD3's shift
        self.scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 eta: float = 0.0, guidance_rescale: float | None = None, return_dict: bool = True):
        """Images for `prompt`. `latents`: the initial noise [B, C, h, w] (else drawn with `generator`);
        `output_type`: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or "latent" (the scaled latents);
        `eta`: DDIM's noise (DDPM models only; 0: deterministic)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        rescale = self.config.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        steps = num_inference_steps or self.config.num_inference_steps
        factor = self.vae_scale_factor
        height = height or self.config.image_size
        width = width or self.config.image_size
        config = self.denoiser.config
        inner = config.get("patch_size") or 2 ** (len(config.get("channel_mult", (1,))) - 1)
        if height % (factor * inner) or width % (factor * inner):
            raise ValueError(f"{height}x{width} px: height and width must be multiples of {factor * inner}")
        lh, lw = height // factor, width // factor
        device = self._execution_device

        cond = self.encode_prompt(prompts, device)
        uncond = None
        if scale != 1.0:
            negative = [""] if negative_prompt is None else (
                [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(negative) not in (1, b):
                raise ValueError(f"{len(negative)} negative prompts for {b} prompts: give one, or one per prompt")
            uncond = {k: v.expand(b, *v.shape[1:]) for k, v in self.encode_prompt(negative, device).items()}
        if self.config.size_conditioning:
            size = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
            cond["added_cond_size"] = size.expand(b, 6)
            if uncond is not None:
                uncond["added_cond_size"] = cond["added_cond_size"]

        shape = (b, config.in_channels, lh, lw)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, torch.float32) * getattr(self.scheduler, "init_noise_sigma", 1.0)  # DDIM: 1
        self._set_timesteps(steps, lh, lw, device)
        takes = inspect.signature(self.scheduler.step).parameters  # DDIM: eta, clipping; DPM-Solver: generator
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator), ("use_clipped_model_output", bool(
            self.scheduler.config.get("clip_sample", False)))) if k in takes and self.config.objective != "flow"}
        if eta and "eta" not in takes:
            raise ValueError(f"eta={eta}: {type(self.scheduler).__name__} is deterministic (DDIMScheduler takes eta)")
        # a second-order scheduler (order 2: Heun) lists each inner time twice, one network call per entry
        for t in self.progress_bar(self.scheduler.timesteps):
            out = self._guided(latents, t, cond, uncond, scale, rescale)
            latents = self.scheduler.step(out, t, latents, return_dict=False, **step_kwargs)[0]

        if output_type == "latent":
            images = latents
        else:
            vae = self.vae
            z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            decoded = vae.decode(z.to(vae.dtype), return_dict=False)[0].clamp(-1, 1)
            images = ((decoded.float() + 1) / 2).clamp(0, 1)  # [B, 3, H, W]
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
