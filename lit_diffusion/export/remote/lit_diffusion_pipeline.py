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

Video models (`frames` > 1 in model_index.json): the latents are clips [B, T, C, h, w] (T = `num_frames`, default
the checkpoint's `frames`), the denoiser sees the whole clip, and the VAE decodes the frames one by one (an image
VAE; `decode_chunk_size` frames per call); `output_type` "pt" gives [B, T, 3, H, W], "np" [B, T, H, W, 3], "pil" a
list of clips, each a list of frames; the output's `frames` (also `images`) holds them.

unCLIP decoders (`condition` "text+image_embedding" or "image_embedding"): the denoiser is also conditioned on a
CLIP image embedding, `image_embeds` [B, E] (or [E] for all; L2-normalised as CLIP's, taken as they are), e.g. from
a prior, an interpolation, or `encode_image(image)` with the exported `image_encoder`
(CLIPVisionModelWithProjection, the frozen CLIP's image tower: the image's centre square resized to the tower's
size, antialiased bicubic, as lit_diffusion embeds it): `pipe(image=img)` gives variations of `img`. Guidance's
unconditional branch has the null embedding (a zero row, which the denoiser replaces with its learned one) beside
the empty caption or the negative prompt. With
"image_embedding" the caption is never shown to the decoder: both branches get the empty caption's encoding
(`prompt` and `negative_prompt` do not reach it, and `prompt` may be left out). Exported with its prior (`prior`,
LitDiffusionPrior, and `prior_scheduler`), the pipeline draws the embeddings from the prompts itself when given
neither `image_embeds` nor `image` (`sample_prior`, as lit_diffusion's `UnCLIP.generate`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)
CONDITIONS = ("text", "text+image_embedding", "image_embedding")


@dataclass
class LitDiffusionVideoPipelineOutput(BaseOutput):
    """A video model's clips: [B, T, 3, H, W] ("pt"), [B, T, H, W, 3] ("np"), a list of lists of frames ("pil") or
    the latents [B, T, C, h, w] ("latent"); `images` is the same object."""

    frames: object

    @property
    def images(self):
        return self.frames


def _negatives(negative_prompt: str | list[str] | None, b: int) -> list[str]:
    """Guidance's unconditional captions for `b` prompts: the empty caption, one negative prompt, or one each."""
    negative = [""] if negative_prompt is None else (
        [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt))
    if len(negative) not in (1, b):
        raise ValueError(f"{len(negative)} negative prompts for {b} prompts: give one, or one per prompt")
    return negative


class LitDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "image_encoder->text_encoder->prior->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "image_encoder", "prior", "prior_scheduler"]

    def __init__(self, vae, text_encoder, tokenizer, scheduler, unet=None, transformer=None, image_encoder=None,
                 prior=None, prior_scheduler=None,
                 objective: str = "flow", pooled_text: bool = False, size_conditioning: bool = False,
                 image_size: int = 256, base_latent: int | None = None, guidance_scale: float = 3.0,
                 num_inference_steps: int = 50, guidance_rescale: float = 0.0, frames: int = 1,
                 condition: str = "text", image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, prior_objective: str | None = None,
                 prior_guidance_scale: float | None = None, prior_num_inference_steps: int | None = None,
                 prior_candidates: int | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("LitDiffusionPipeline needs one denoiser: a unet or a transformer")
        if condition not in CONDITIONS:
            raise ValueError(f"condition {condition!r} is not one of {CONDITIONS}")
        if (prior is None) != (prior_scheduler is None):
            raise ValueError("a prior comes with its prior_scheduler")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              unet=unet, transformer=transformer, image_encoder=image_encoder, prior=prior,
                              prior_scheduler=prior_scheduler)
        self.register_to_config(objective=objective, pooled_text=pooled_text, size_conditioning=size_conditioning,
                                image_size=image_size, base_latent=base_latent, guidance_scale=guidance_scale,
                                num_inference_steps=num_inference_steps, guidance_rescale=guidance_rescale,
                                frames=frames, condition=condition, image_mean=image_mean, image_std=image_std,
                                prior_objective=prior_objective, prior_guidance_scale=prior_guidance_scale,
                                prior_num_inference_steps=prior_num_inference_steps,
                                prior_candidates=prior_candidates)

    @property
    def denoiser(self):
        return self.unet if self.unet is not None else self.transformer

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device, pooled: bool | None = None) -> dict:
        """The denoiser's text keywords: token features [B, L, W], mask [B, L], pooled [B, E] (pooled_text; `pooled`
        True: always, as the prior reads it)."""
        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)  # [B, L]: [sot, pieces..., eot, pad...]
        out = self.text_encoder(ids)  # causal attention only, as the training text tower: no attention mask
        is_eot = ids == tok.eos_token_id
        first = torch.where(is_eot.any(1), is_eot.int().argmax(1), ids.shape[1] - 1)  # [B]
        mask = torch.arange(ids.shape[1], device=device)[None] <= first[:, None]  # real tokens, eot included
        cond = {"encoder_hidden_states": out.last_hidden_state, "encoder_attention_mask": mask}
        if self.config.pooled_text if pooled is None else pooled:
            cond["pooled_projections"] = F.normalize(out.text_embeds, dim=-1)
        return cond

    # ----------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def encode_image(self, image) -> torch.Tensor:
        """CLIP image embeddings [B, E], L2-normalised, of `image`: a PIL image, a list of them, or a tensor [B, 3,
        H, W] / [3, H, W] in [0, 1]; as lit_diffusion embeds images: the centre square, resized to the tower's size
        (antialiased bicubic, in [-1, 1], clamped), normalised with the tower's pixel statistics."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image_encoder (its CLIP's image tower was not exported): give "
                             "image_embeds, CLIP image embeddings [B, E]")
        device = self._execution_device
        size = self.image_encoder.config.image_size
        images = image if isinstance(image, (list, tuple)) else [image]
        rows = []
        for img in images:
            if not isinstance(img, torch.Tensor):  # PIL
                img = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            img = img.to(device, torch.float32)
            rows.extend(img[None] if img.ndim == 3 else img)
        embeds = []
        for img in rows:  # [3, H, W] in [0, 1], each at its own size
            x = img[None] * 2 - 1
            if x.shape[-2:] != (size, size):
                h, w = x.shape[-2:]
                side = min(h, w)
                top, left = (h - side) // 2, (w - side) // 2
                x = x[..., top:top + side, left:left + side]
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
                x = x.clamp(-1, 1)
            if self.config.image_mean is not None:
                mean = x.new_tensor(self.config.image_mean)[:, None, None]
                std = x.new_tensor(self.config.image_std)[:, None, None]
                x = ((x + 1) / 2 - mean) / std
            out = self.image_encoder(pixel_values=x.to(self.image_encoder.dtype))
            embeds.append(out.image_embeds.float())
        return F.normalize(torch.cat(embeds), dim=-1)

    # ------------------------------------------------------------------------------------------------ steps
    def _guided(self, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None, scale: float,
                rescale: float, denoiser=None) -> torch.Tensor:
        denoiser = denoiser or self.denoiser
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

    def _set_timesteps(self, steps: int, latent_height: int, latent_width: int, device, scheduler=None,
                       objective: str | None = None) -> None:
        scheduler = scheduler or self.scheduler
        objective = objective or self.config.objective
        if objective != "flow":
            total = scheduler.config.num_train_timesteps
            if (scheduler.config.get("timestep_spacing") == "trailing"
                    and "timesteps" in inspect.signature(scheduler.set_timesteps).parameters):
                # lit_diffusion's trailing grid, round(T - i T / n) - 1: diffusers' own, np.arange(T, 0, -T / n)
                # rounded, differs for some counts (T = 1000: 48, 61, 96, ...; 61 gives 62 timesteps, the last -1)
                grid = [round(total - i * total / steps) - 1 for i in range(steps)]
                scheduler.set_timesteps(timesteps=grid, device=device)
                return
            if type(scheduler).__name__ == "DDIMScheduler" and total % steps:
                logger.warning(f"{steps} steps do not divide {total} timesteps: DDIMScheduler steps from t to "
                               f"t - {total // steps}, which is not lit_diffusion's trailing grid for this count")
            scheduler.set_timesteps(steps, device=device)
            return
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            # e.g. diffusers' FlowMatchHeunDiscreteScheduler: its own grid, not lit_diffusion's, and no mu
            logger.warning(f"{type(scheduler).__name__}.set_timesteps takes no sigmas: it steps on its own time "
                           f"grid, not lit_diffusion's (and without the per-resolution shift)")
            scheduler.set_timesteps(steps, device=device)
            return
        # t = 1 .. 1/steps (then 0), as lit_diffusion's sampling_times: shifted by the scheduler
        sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1].numpy()
        kwargs = {}
        if self.config.base_latent and scheduler is self.scheduler:  # the shift grows with sqrt(latent positions)
            shift = scheduler.config.shift * math.sqrt(latent_height * latent_width) / self.config.base_latent
            kwargs["mu"] = math.log(shift)  # exponential time shift with mu = log(shift) is SD3's shift
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)

    # ------------------------------------------------------------------------------------------------ prior
    @torch.no_grad()
    def sample_prior(self, prompts: list[str], negative_prompt: str | list[str] | None = None,
                     guidance_scale: float | None = None, num_inference_steps: int | None = None,
                     candidates: int | None = None, latents: torch.Tensor | None = None,
                     generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """unCLIP's prior (exported with `--prior`): CLIP image embeddings [B, E], L2-normalised, for `prompts`, as
        lit_diffusion's `DiffusionPriorModule.sample`: `candidates` draws per caption from `latents` [B, K, E]
        (caption i's draws latents[i]; else drawn with `generator`), classifier-free guided on the predicted clean
        embedding against the empty caption or `negative_prompt`, the draw with the higher dot product with the
        caption's CLIP embedding kept."""
        if self.prior is None:
            raise ValueError("this pipeline has no prior (export it with `lit-diffusion export --prior prior.ckpt`): "
                             "give image_embeds, CLIP image embeddings [B, E], or image")
        device = self._execution_device
        b = len(prompts)
        scale = self.config.prior_guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = num_inference_steps or self.config.prior_num_inference_steps
        k = int(candidates or self.config.prior_candidates or 1)
        e = self.prior.config.embed_dim
        cond = self.encode_prompt(prompts, device, pooled=True)
        uncond = None
        if scale != 1.0:
            negative = _negatives(negative_prompt, b)
            uncond = {key: v.expand(b, *v.shape[1:]) for key, v in self.encode_prompt(negative, device, True).items()}
        if latents is None:
            latents = randn_tensor((b, k, e), generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != (b, k, e):
            raise ValueError(f"prior latents have shape {tuple(latents.shape)}, expected {(b, k, e)}")
        # draw j of caption i is row j * B + i, as lit_diffusion's sample_embeddings
        x = latents.to(device, torch.float32).transpose(0, 1).reshape(k * b, e)
        x = x * getattr(self.prior_scheduler, "init_noise_sigma", 1.0)
        def rep(d):
            return None if d is None else {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in d.items()}

        cond_k, uncond_k = rep(cond), rep(uncond)
        flow = self.config.prior_objective == "flow"
        scheduler = self.prior_scheduler
        self._set_timesteps(steps, 1, 1, device, scheduler=scheduler, objective=self.config.prior_objective)
        takes = inspect.signature(scheduler.step).parameters
        step_kwargs = {} if flow else {key: v for key, v in (("eta", 0.0), ("generator", generator)) if key in takes}
        time_scale = scheduler.config.num_train_timesteps
        for t in self.progress_bar(scheduler.timesteps):
            x0 = self._guided(x, t, cond_k, uncond_k, scale, 0.0, denoiser=self.prior)  # the clean embedding
            if flow:  # the velocity the flow samplers integrate: (x_t - x0) / t (t never 0 there)
                tt = (t.expand(x.shape[0]).to(x.dtype) / time_scale).clamp_min(1e-4)[:, None]
                out = (x - x0) / tt
            else:
                out = x0
            x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
        draws = self.prior.to_clip_space(x).reshape(k, b, e)  # [K, B, E]
        score = (draws * cond["pooled_projections"].float()[None]).sum(-1)  # [K, B]
        return draws[score.argmax(0), torch.arange(b, device=draws.device)]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 eta: float = 0.0, guidance_rescale: float | None = None, return_dict: bool = True,
                 num_frames: int | None = None, image_embeds: torch.Tensor | None = None, image=None,
                 decode_chunk_size: int | None = None, prior_guidance_scale: float | None = None,
                 prior_num_inference_steps: int | None = None, prior_candidates: int | None = None,
                 prior_latents: torch.Tensor | None = None):
        """Images for `prompt` (a video model's clips). `latents`: the initial noise [B, C, h, w] (a clip's [B, T, C,
        h, w]; else drawn with `generator`); `output_type`: "pil", "np" (NHWC in [0, 1]), "pt" (NCHW in [0, 1]) or
        "latent" (the scaled latents), per frame for clips; `eta`: DDIM's noise (DDPM models only; 0:
        deterministic). `num_frames`: a video model's clip length (default the checkpoint's `frames`; 1: images).
        `image_embeds` [B, E] or [E] (unCLIP decoders): CLIP image embeddings, or `image` (PIL or [B, 3, H, W] in
        [0, 1]) embedded with `image_encoder` (variations); `prompt` may be left out with condition
        "image_embedding" (never shown) and then defaults to the empty caption for text+image_embedding too.
        With a prior (exported with `--prior`) and neither `image_embeds` nor `image`, the prompts' embeddings come
        from `sample_prior` (`prior_*`: its settings, default the prior checkpoint's; `prior_latents` [B, K, E] its
        noise; `negative_prompt` goes to both, as lit_diffusion's `UnCLIP.generate`).
        `decode_chunk_size`: frames the VAE decodes per call (default: all)."""
        conditioned = self.config.condition != "text"
        if image is not None:
            if image_embeds is not None:
                raise ValueError("give image_embeds or image, not both")
            image_embeds = self.encode_image(image)
        if not conditioned and (image_embeds is not None):
            raise ValueError("image embeddings given, but this model is conditioned on text only (condition: text)")
        if conditioned and image_embeds is None and self.prior is not None and prompt is not None:
            image_embeds = self.sample_prior([prompt] if isinstance(prompt, str) else list(prompt), negative_prompt,
                                             prior_guidance_scale, prior_num_inference_steps, prior_candidates,
                                             prior_latents, generator)
        if conditioned:
            if image_embeds is None:
                raise ValueError(f"this model is unCLIP's decoder (condition: {self.config.condition}) and needs CLIP "
                                 f"image embeddings: image_embeds [B, E] (from a prior or an interpolation) or image")
            image_embeds = torch.as_tensor(image_embeds).float()
            if image_embeds.ndim == 1:
                image_embeds = image_embeds[None]
        if prompt is None:
            if not conditioned:
                raise ValueError("a text-to-image pipeline needs a prompt")
            prompt = [""] * image_embeds.shape[0]
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        b = len(prompts)
        scale = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        rescale = self.config.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        steps = num_inference_steps or self.config.num_inference_steps
        frames = self.config.frames if num_frames is None else int(num_frames)
        if frames < 1 or (frames > 1 and self.config.frames == 1):
            raise ValueError(f"num_frames={frames}: this is an image model (frames 1)" if frames > 1
                             else f"num_frames={frames} must be >= 1")
        factor = self.vae_scale_factor
        height = height or self.config.image_size
        width = width or self.config.image_size
        config = self.denoiser.config
        inner = config.get("patch_size") or 2 ** (len(config.get("channel_mult", (1,))) - 1)
        if height % (factor * inner) or width % (factor * inner):
            raise ValueError(f"{height}x{width} px: height and width must be multiples of {factor * inner}")
        lh, lw = height // factor, width // factor
        device = self._execution_device

        if self.config.condition == "image_embedding":  # the caption is never shown: the empty one's encoding
            cond = {k: v.expand(b, *v.shape[1:]) for k, v in self.encode_prompt([""], device).items()}
        else:
            cond = self.encode_prompt(prompts, device)
        uncond = None
        if scale != 1.0:
            negative = _negatives(negative_prompt, b)
            if self.config.condition == "image_embedding":
                negative = [""]
            uncond = {k: v.expand(b, *v.shape[1:]) for k, v in self.encode_prompt(negative, device).items()}
        if conditioned:
            e = image_embeds.to(device)
            if e.shape[0] == 1 and b > 1:
                e = e.expand(b, -1)
            if e.shape[0] != b:
                raise ValueError(f"{e.shape[0]} image embeddings for {b} prompts: give one, or one per prompt")
            cond["image_embeds"] = e  # as they are, as lit_diffusion's sample takes them (CLIP's have norm one)
            if uncond is not None:  # the null embedding: a zero row, the denoiser's learned one stands in
                uncond["image_embeds"] = torch.zeros_like(cond["image_embeds"])
        if self.config.size_conditioning:
            size = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
            cond["added_cond_size"] = size.expand(b, 6)
            if uncond is not None:
                uncond["added_cond_size"] = cond["added_cond_size"]

        shape = (b, config.in_channels, lh, lw) if frames == 1 else (b, frames, config.in_channels, lh, lw)
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

        video = latents.ndim == 5
        if output_type == "latent":
            images = latents
        else:
            vae = self.vae
            z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            flat = z.flatten(0, 1) if video else z  # an image VAE: a clip's frames one by one
            chunk = decode_chunk_size or flat.shape[0]
            decoded = torch.cat([vae.decode(part.to(vae.dtype), return_dict=False)[0]
                                 for part in flat.split(chunk)]).clamp(-1, 1)
            images = ((decoded.float() + 1) / 2).clamp(0, 1)  # [B (* T), 3, H, W]
            if video:
                images = images.unflatten(0, z.shape[:2])  # [B, T, 3, H, W]
            if output_type != "pt":
                images = images.movedim(-3, -1).cpu().numpy()  # channels last
                if output_type == "pil":
                    images = [self.numpy_to_pil(clip) for clip in images] if video else self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if video:
            return LitDiffusionVideoPipelineOutput(frames=images) if return_dict else (images,)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
