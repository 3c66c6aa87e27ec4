"""Classifier-free guidance (Ho & Salimans 2022) and negative prompts.

pred = uncond + scale * (cond - uncond), applied to the raw network output (eps, v or x0). For fixed (x_t, t)
the conversions to eps and x0 are affine in the raw output and the guidance weights (1 - scale, scale) sum to one,
so guiding the raw output is exactly guiding eps (and x0): the prediction type does not change the result.
A negative prompt is simply the `uncond` conditioning: its encoding replaces the empty prompt's, so the sample is
pushed away from it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from lit_diffusion.models.conditions import Conditioning

Denoiser = Callable[[Tensor, Tensor, Conditioning], Tensor]
"""denoiser(x_t, t, cond) -> raw output (eps, v, x0 or velocity), as `UNet` and `DiT` are called."""


def _check(c, name: str) -> Conditioning:
    if not isinstance(c, Conditioning):
        raise TypeError(f"{name} must be a Conditioning, got {type(c)}")
    return c


def _pad_to(c: Conditioning, length: int) -> Conditioning:
    """Pad context with zeros and mask with False up to `length` tokens, so cond and uncond can share a batch."""
    context, mask = c.context, c.mask
    n = context.shape[1]
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if n < length:
        context = torch.cat([context, context.new_zeros(context.shape[0], length - n, context.shape[2])], 1)
        mask = torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], length - n, dtype=torch.bool)], 1)
    return c.replace(context=context, mask=mask.bool())


def _with_text_of(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """`uncond`'s guided fields (text, image embedding) on `cond`'s other conditions (size, ...): a negative prompt
    replaces what is guided only."""
    for name in ("pooled", "image_embedding"):
        if (getattr(uncond, name) is None) != (getattr(cond, name) is None):
            raise ValueError(f"cond and uncond must both have a {name}, or neither")
    return cond.replace(context=uncond.context, mask=uncond.mask, pooled=uncond.pooled,
                        image_embedding=uncond.image_embedding)


def _cat_conds(uncond: Conditioning, cond: Conditioning, image_only: bool = False) -> Conditioning:
    """[uncond; cond] along the batch, contexts padded to one length: the batch of one guided forward. With
    `image_only`, [uncond; image; cond], `image` being uncond's text with cond's image embedding."""
    if cond.context is None or uncond.context is None:
        raise ValueError("classifier-free guidance with scale != 1 needs both cond and uncond contexts")
    batch = cond.batch_size
    uncond = _with_text_of(uncond.expand(batch), cond)
    parts = [uncond, uncond.replace(image_embedding=cond.image_embedding)] if image_only else [uncond]
    length = max(cond.context.shape[1], uncond.context.shape[1])
    parts = [_pad_to(c, length) for c in (*parts, cond)]
    return Conditioning(**{k: torch.cat([p.tensors()[k] for p in parts]) for k in parts[-1].tensors()})


def drop_conditioning(cond: Conditioning, uncond: Conditioning, p: float,
                      generator: torch.Generator | None = None) -> Conditioning:
    """Training-time CFG dropout: replace each sample's text conditions (only) by `uncond`'s (e.g. the empty prompt's
    encoding, batch 1 or B) with probability `p`, so one network learns both branches that `cfg_model_fn` combines.
    Conditions that are not text (size and crop) are kept: at sampling both branches get them too."""
    cond = _check(cond, "cond")
    if p <= 0:
        return cond
    batch = cond.batch_size
    length = max(cond.context.shape[1], uncond.context.shape[1])
    uncond = _check(uncond, "uncond").expand(batch)
    if (uncond.pooled is None) != (cond.pooled is None):
        raise ValueError("cond and uncond must both have a pooled text embedding, or neither")
    c, u = _pad_to(cond, length), _pad_to(cond.replace(context=uncond.context, mask=uncond.mask, pooled=uncond.pooled),
                                          length)
    drop = torch.rand(batch, generator=generator, device=c.context.device if generator is None else generator.device)
    drop = (drop < p).to(c.context.device)  # [B]
    context = torch.where(drop[:, None, None], u.context, c.context)  # [B, L, D]
    pooled = None if c.pooled is None else torch.where(drop[:, None], u.pooled, c.pooled)  # [B, E]
    return c.replace(context=context, mask=torch.where(drop[:, None], u.mask, c.mask), pooled=pooled)


def drop_image_embedding(cond: Conditioning, p: float, generator: torch.Generator | None = None) -> Conditioning:
    """Training-time dropout of the image embedding (unCLIP's decoder, DALL-E 2 sec. 2.1: 10%): each row is zeroed
    with probability `p`, drawn independently of the caption's dropout; a zero row is the decoder's "no image
    embedding" (`models.layers.ImageEmbedder` puts its learned null embedding there)."""
    e = _check(cond, "cond").image_embedding
    if p <= 0 or e is None:
        return cond
    drop = torch.rand(e.shape[0], generator=generator, device=e.device if generator is None else generator.device)
    return cond.replace(image_embedding=torch.where((drop < p).to(e.device)[:, None], torch.zeros_like(e), e))


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, sec. 3.4: rescale the guided output to the per-sample std of the conditional one, then
    blend with weight `phi`, which counters over-exposure at high guidance scales."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_model_fn(
    denoiser: Denoiser,
    cond: Conditioning,
    uncond: Conditioning | None = None,
    scale: float = 1.0,
    rescale: float = 0.0,
    image_scale: float | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A sampler `model_fn(x_t, t) -> raw output` doing classifier-free guidance with ONE batched forward per step:
    the batch is [uncond; cond] along dim 0 (contexts padded to a common length with masked zeros).
    `denoiser(x_t, t, cond) -> raw output` (a U-Net or a DiT). `uncond` (the empty or a negative prompt, batch 1
    or B) replaces the text conditions only: both halves get `cond`'s other conditions (size and crop).
    `scale == 1` (or no `uncond`) skips the unconditional half. `rescale` > 0 applies `rescale_guidance`.

    `image_scale` (unCLIP's decoder, whose cond holds an image embedding and a caption): a scale of its own for the
    image embedding, as InstructPix2Pix guides its two conditions (Brooks et al. 2023, eq. 3):
        out = u + image_scale * (i - u) + scale * (c - i),
    i the output with the image embedding and uncond's caption, in a batch of three. `scale` then guides the
    caption on top of the image embedding. None, or equal to `scale`, is the one-scale guidance above (the two
    terms add up to scale * (c - u))."""
    cond = _check(cond, "cond")
    if image_scale is not None and float(image_scale) != float(scale):
        if uncond is None or cond.image_embedding is None:
            raise ValueError("image_scale guides an image embedding apart from the caption: it needs a cond with an "
                             "image embedding (unCLIP's decoder) and an uncond")
        three = _cat_conds(_check(uncond, "uncond"), cond, image_only=True)

        def two_condition_fn(x_t: Tensor, t: Tensor) -> Tensor:
            out = denoiser(torch.cat([x_t, x_t, x_t]), torch.cat([t, t, t]), three)  # [3B, ...]
            out_uncond, out_image, out_cond = out.chunk(3)
            guided = out_uncond + image_scale * (out_image - out_uncond) + scale * (out_cond - out_image)
            return rescale_guidance(guided, out_cond, rescale) if rescale > 0 else guided

        return two_condition_fn
    if uncond is None or scale == 1.0:
        if uncond is None and scale != 1.0:
            raise ValueError(f"guidance scale {scale} needs an unconditional (or negative-prompt) conditioning")

        def conditional_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return denoiser(x_t, t, cond)

        return conditional_fn

    both = _cat_conds(_check(uncond, "uncond"), cond)

    def guided_fn(x_t: Tensor, t: Tensor) -> Tensor:
        out = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # [2B, ...]
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, rescale) if rescale > 0 else guided

    return guided_fn
