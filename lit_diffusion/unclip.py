"""unCLIP (DALL-E 2, Ramesh et al. 2022): a prior from captions to CLIP image embeddings, and a decoder from those
embeddings to images; between them, the CLIP space to move about in (sec. 3).

    generate      caption -> prior -> embedding -> decoder                                          (sec. 2)
    variations    an image's CLIP embedding -> decoder, once per seed: what CLIP keeps, the rest redrawn   (sec. 3.1)
    interpolate   slerp between two images' embeddings, the same noise for every frame                (sec. 3.2)
    edit          text diffs: slerp from the image's embedding towards normalize(text(new) - text(old)),
                  each frame decoded from the image's inverted latent, so the layout stays            (sec. 3.3)

The prior (`stages.prior.DiffusionPriorModule`) and the decoder (`stages.ldm.LatentDiffusionModule` with
`condition: text+image_embedding | image_embedding`) each embed a frozen CLIP; both must be the same CLIP, or the
prior's embeddings would live in another space than the one the decoder learned to read. Decoder settings left
None (sampler, steps, guidance) are the decoder checkpoint's own, as `LatentDiffusionModule.sample` takes them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_diffusion.diffusion.guidance import cfg_model_fn
from lit_diffusion.diffusion.inversion import ddim_invert, flow_invert
from lit_diffusion.stages.common import eval_mode
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.prior import DiffusionPriorModule

log = logging.getLogger("lit_diffusion")

EDIT_THETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # DALL-E 2, Figure 5: theta from 0 to 0.5 in steps of 0.1
EDIT_SAMPLERS = {"ddpm": "ddim", "flow": "euler"}  # the deterministic sampler each inversion runs backwards


def slerp(a: Tensor, b: Tensor, theta: float | Sequence[float] | Tensor, eps: float = 1e-4) -> Tensor:
    """Spherical interpolation between unit vectors a and b [..., E] (Shoemake 1985), with Omega = arccos(a . b):
        slerp(a, b; theta) = (sin((1 - theta) Omega) a + sin(theta Omega) b) / sin(Omega)
    It moves along the great circle at a constant angular speed: the angle to a is theta Omega, and every point has
    norm one. `theta` is a number or a tensor that broadcasts against a's leading dims ([K] with a, b [E] -> [K, E]).
    Where a and b are (nearly) parallel, sin(Omega) < eps, it is the normalised lerp, which it equals in the limit;
    (nearly) antipodal vectors are refused: every great circle joins them. Inputs are normalised first."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    theta = torch.as_tensor(theta, dtype=torch.float32, device=a.device)[..., None]  # [..., 1]
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)  # [..., 1]
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    near = sin_omega < eps
    if bool((near & (dot < 0)).any()):
        raise ValueError("slerp between antipodal vectors is undefined (every great circle joins them)")
    safe = torch.where(near, torch.ones_like(sin_omega), sin_omega)
    arc = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / safe
    lerp = F.normalize((1 - theta) * a + theta * b, dim=-1)
    return torch.where(near, lerp, arc)


def load_image(path: str | Path, height: int, width: int) -> Tensor:
    """An image file as [3, height, width] in [0, 1]: RGB, resized to cover height x width (bicubic, aspect kept),
    then centre-cropped, as the data pipeline does with training images."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(width / img.width, height / img.height)
        w, h = max(width, math.ceil(img.width * scale)), max(height, math.ceil(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - width) // 2, (h - height) // 2
        img = img.crop((left, top, left + width, top + height))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(height, width, 3).permute(2, 0, 1).float() / 255


def _batch(images: Tensor, what: str) -> Tensor:
    images = torch.as_tensor(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected images [N, 3, H, W] (or one [3, H, W]) in [0, 1], got "
                         f"{tuple(images.shape)}")
    return images.float()


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-sample seeds: an int s is s, s + 1, ..., one per sample; a sequence is taken as it is."""
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} samples")
    return seeds


class UnCLIP:
    """A prior (optional: only `generate` needs it) and an unCLIP decoder that share one CLIP.

    `prior_source` and `decoder_source` name the two in errors (their checkpoint files, from `from_checkpoints`)."""

    def __init__(self, prior: DiffusionPriorModule | None, decoder: LatentDiffusionModule,
                 prior_source: str = "the prior", decoder_source: str = "the decoder"):
        if not decoder.image_conditioned:
            raise ValueError(f"{decoder_source} is not an unCLIP decoder: it is conditioned on text only "
                             f"(model.init_args.condition: {decoder.hparams.condition}); unCLIP needs a decoder "
                             f"trained with condition text+image_embedding or image_embedding")
        if prior is not None:
            theirs, ours = prior.clip_hash(), decoder.encoder_hashes()["clip"]
            if theirs != ours:
                raise ValueError(f"the prior {prior_source} and the decoder {decoder_source} hold different CLIPs "
                                 f"(state_dict_hash {theirs[:16]} and {ours[:16]}): the prior's embeddings would be "
                                 f"in another space than the one the decoder reads; use a prior trained on shards "
                                 f"encoded by the decoder's CLIP")
        self.prior, self.decoder = prior, decoder
        self.prior_source, self.decoder_source = prior_source, decoder_source

    @classmethod
    def from_checkpoints(cls, decoder: str | Path, prior: str | Path | None = None,
                         map_location: str | torch.device = "cpu") -> UnCLIP:
        dec = LatentDiffusionModule.from_checkpoint(decoder, map_location=map_location)
        pri = None if prior is None else DiffusionPriorModule.from_checkpoint(prior, map_location=map_location)
        return cls(pri, dec, prior_source=str(prior), decoder_source=str(decoder))

    # ------------------------------------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] in [0, 1] -> the decoder's CLIP image embeddings [N, E], L2-normalised."""
        return self.decoder.encode_image_embeddings(_batch(images, "image_embeddings"))

    @torch.no_grad()
    def text_diff(self, old_caption: str, new_caption: str) -> Tensor:
        """DALL-E 2 sec. 3.3: z_d = normalize(z_t(new) - z_t(old)) [E], with CLIP's pooled caption embeddings."""
        clip = self.decoder.clip
        _, pooled = clip.encode_text(clip.tokenize([new_caption, old_caption]))  # [2, E], L2-normalised
        diff = pooled[0].float() - pooled[1].float()
        if diff.norm() < 1e-6:
            raise ValueError(f"the captions {new_caption!r} and {old_caption!r} have the same CLIP embedding: "
                             f"there is no direction to edit along")
        return F.normalize(diff, dim=-1)

    # ------------------------------------------------------------------------------------------------- sampling
    def generate(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                 seed: int | Sequence[int] = 0, guidance: float | None = None, prior_guidance: float | None = None,
                 prior_sampler: str | None = None, prior_steps: int | None = None, candidates: int | None = None,
                 **decoder_kwargs) -> Tensor:
        """Images [B, 3, H, W] in [0, 1]: each caption -> the prior's embedding -> the decoder, which also sees the
        caption (condition text+image_embedding). `negative_prompts` go to both: the prior's unconditional caption
        and the decoder's negative. Sample i uses seed i (an int s: s + i) in the prior and in the decoder, so it
        does not depend on its batch. `prior_*`: the prior's settings (None: its checkpoint's); `decoder_kwargs`:
        `LatentDiffusionModule.sample`'s (sampler, steps, eta, height, width, ...)."""
        if self.prior is None:
            raise ValueError("generating from captions needs a prior: give one (`lit-diffusion sample --prior "
                             "PRIOR.ckpt`)")
        prompts = list(prompts)
        seeds = _seeds(seed, len(prompts))
        prior_negative = negative_prompts
        if negative_prompts is not None and self.prior.guidance_scale(prior_guidance) == 1.0:
            log.warning("the prior's guidance is 1.0: the negative prompt steers the decoder only (give a prior "
                        "guidance > 1, `--prior-guidance`, for the prior to move away from it too)")
            prior_negative = None
        embeddings = self.prior.sample(prompts, prior_negative, seed=seeds, guidance=prior_guidance,
                                       sampler=prior_sampler, steps=prior_steps, candidates=candidates)
        return self.decoder.sample(prompts, negative_prompts=negative_prompts, guidance=guidance, seed=seeds,
                                   image_embeddings=embeddings, **decoder_kwargs)

    # the diffusion stage's sampling interface, so that what samples a text model (SampleGrid) samples the stack
    @property
    def hparams(self):
        return self.decoder.hparams

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        return self.decoder.latent_shape(height, width)

    def sample(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
               seed: int | Sequence[int] = 0, **kwargs) -> Tensor:
        """`generate`, called as `LatentDiffusionModule.sample` is."""
        return self.generate(prompts, negative_prompts, seed=seed, **kwargs)

    def variations(self, images: Tensor, per_image: int = 4, seed: int = 0, guidance: float | None = None,
                   **decoder_kwargs) -> Tensor:
        """[N, per_image, 3, H, W]: each image's CLIP embedding decoded with the empty caption, variation j from
        seed `seed + j` (the same noise down a column, so rows differ by their embedding only)."""
        if per_image < 1:
            raise ValueError(f"per_image must be >= 1, got {per_image}")
        e = self.image_embeddings(images)  # [N, E]
        n = e.shape[0]
        out = self.decoder.sample([""] * (n * per_image), guidance=guidance, seed=_seeds(seed, per_image) * n,
                                  image_embeddings=e.repeat_interleave(per_image, 0), **decoder_kwargs)
        return out.reshape(n, per_image, *out.shape[1:])

    def interpolate(self, image_a: Tensor, image_b: Tensor, frames: int = 5, seed: int = 0,
                    guidance: float | None = None, **decoder_kwargs) -> Tensor:
        """[frames, 3, H, W]: slerp(z_a, z_b, theta) for `frames` thetas evenly spaced in [0, 1], decoded with the
        empty caption and the same noise (seed) for every frame, a stochastic sampler's step noise included (each
        sample's comes from its own seed), so only the embedding moves."""
        if frames < 2:
            raise ValueError(f"an interpolation needs frames >= 2 (its two ends), got {frames}")
        e = self.image_embeddings(torch.cat([_batch(image_a, "image_a"), _batch(image_b, "image_b")]))
        if e.shape[0] != 2:
            raise ValueError(f"interpolate takes one image at each end, got {e.shape[0]} images")
        z = slerp(e[0], e[1], torch.linspace(0, 1, frames))  # [frames, E]
        return self.decoder.sample([""] * frames, guidance=guidance, seed=[seed] * frames, image_embeddings=z,
                                   **decoder_kwargs)

    def edit(self, image: Tensor, old_caption: str, new_caption: str, thetas: Sequence[float] = EDIT_THETAS,
             guidance: float | None = None, steps: int | None = None, guidance_rescale: float | None = None,
             negative_prompts: str | None = None, refine: int = 0) -> Tensor:
        """[len(thetas), 3, H, W] (H, W: the image's): text diffs (DALL-E 2 sec. 3.3). Frame k is decoded from
        slerp(z_image, z_d, thetas[k]), z_d = `text_diff(old, new)`, starting from the image's inverted latent
        (`invert`) with the deterministic sampler that inversion runs backwards (ddim with eta 0 for a ddpm
        decoder, euler for a flow one): theta 0 gives the decoder's reconstruction of the image, larger thetas move
        it towards the new caption with the layout kept. The decoder sees the new caption (text+image_embedding)."""
        image = _batch(image, "edit")
        if image.shape[0] != 1:
            raise ValueError(f"edit takes one image, got {image.shape[0]}")
        z_image = self.image_embeddings(image)  # [1, E]
        z = slerp(z_image[0], self.text_diff(old_caption, new_caption), torch.as_tensor(thetas).float())  # [K, E]
        x_T = self.invert(image, new_caption, z_image, guidance=guidance, steps=steps,
                          guidance_rescale=guidance_rescale, negative_prompts=negative_prompts, refine=refine)
        d = self.decoder
        k = z.shape[0]
        return d.sample([new_caption] * k, negative_prompts=negative_prompts, guidance=guidance,
                        sampler=EDIT_SAMPLERS[d.objective], steps=steps, eta=0.0, guidance_rescale=guidance_rescale,
                        clip_x0=0.0, height=image.shape[-2], width=image.shape[-1], image_embeddings=z,
                        x_T=x_T.expand(k, *x_T.shape[1:]))

    @torch.no_grad()
    def invert(self, images: Tensor, caption: str | Sequence[str] = "", embeddings: Tensor | None = None,
               guidance: float | None = None, steps: int | None = None, guidance_rescale: float | None = None,
               negative_prompts: str | Sequence[str] | None = None, refine: int = 0) -> Tensor:
        """The starting latents x_T [N, C, h, w] from which the decoder's deterministic sampler (`EDIT_SAMPLERS`)
        with these settings returns `images` [N, 3, H, W] in [0, 1] (their VAE latents): DDIM inversion (ddpm) or
        Euler backwards (flow), `diffusion/inversion.py`, conditioned on `caption` and `embeddings` (default: the
        images' own CLIP embeddings) and guided as the sampler will be. `refine`: fixed-point iterations per step."""
        d = self.decoder
        images = _batch(images, "invert").to(d.device)
        n, (height, width) = images.shape[0], images.shape[-2:]
        captions = [caption] * n if isinstance(caption, str) else list(caption)
        embeddings = self.image_embeddings(images) if embeddings is None else embeddings
        h = d.hparams
        steps = steps or h.sample_steps
        model_fn, schedule = self._guided_denoiser(captions, negative_prompts, embeddings, guidance,
                                                   guidance_rescale, height, width)
        with eval_mode(d):
            z0 = d.encode_images(images * 2 - 1)  # [N, C, h, w], scaled latents (the posterior's mean)
            if d.objective == "flow":
                return flow_invert(model_fn, schedule, z0, steps, refine=refine)
            return ddim_invert(model_fn, schedule, z0, steps, d.prediction, refine=refine)

    def _guided_denoiser(self, prompts: list[str], negative_prompts, embeddings: Tensor, guidance: float | None,
                         guidance_rescale: float | None, height: int, width: int):
        """The decoder's guided `model_fn(x_t, t)` and schedule, conditioned as `LatentDiffusionModule.sample`
        conditions its samplers (the same text and image-embedding branches, size condition and guidance)."""
        d, h = self.decoder, self.decoder.hparams
        guidance = h.guidance if guidance is None else float(guidance)
        rescale = h.guidance_rescale if guidance_rescale is None else float(guidance_rescale)
        cond, uncond, (lh, lw) = d.sampling_conditions(prompts, negative_prompts, embeddings, height, width)
        guidance, image_scale = d.guidance_scales(prompts, negative_prompts, guidance)  # as `sample` guides
        return (cfg_model_fn(d.denoiser, cond, uncond, guidance, rescale=rescale, image_scale=image_scale),
                d.schedule_for(lh, lw))
