"""Classifier-free guidance (Ho & Salimans 2022) and negative prompts.

pred = uncond + scale * (cond - uncond), applied to the raw network output (eps, v or x0). For fixed (x_t, t)
the conversions to eps and x0 are affine in the raw output and the guidance weights (1 - scale, scale) sum to one,
so guiding the raw output is exactly guiding eps (and x0): the prediction type does not change the result.
A negative prompt is simply the `uncond` conditioning: its encoding replaces the empty prompt's, so the sample is
pushed away from it.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Callable

import torch
from torch import Tensor

Conditioning = namedtuple("Conditioning", ["context", "mask", "pooled"], defaults=(None,))
"""Text conditioning for the denoiser: token features [B, L, D], a key padding mask [B, L] (True = real token) and,
for U-Nets that add it to the timestep embedding (unCLIP, Imagen), the pooled text embedding [B, E] (else None)."""

Denoiser = Callable[..., Tensor]
"""denoiser(x_t, t, context, mask) -> raw output; called with pooled= as well when the conditioning has one."""


def call_denoiser(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    if cond.pooled is None:
        return denoiser(x_t, t, cond.context, cond.mask)
    return denoiser(x_t, t, cond.context, cond.mask, pooled=cond.pooled)


def _as_cond(c, batch: int, name: str) -> Conditioning:
    """Accept a Conditioning / (context, mask[, pooled]) tuple; a batch of one is broadcast to `batch` (one
    negative prompt for a whole grid)."""
    if not isinstance(c, tuple) or len(c) not in (2, 3):
        raise TypeError(f"{name} must be a Conditioning(context, mask[, pooled]) or a (context, mask) tuple, "
                        f"got {type(c)}")
    context, mask, pooled = Conditioning(*c)
    if context is not None and context.shape[0] == 1 and batch > 1:
        context = context.expand(batch, *context.shape[1:])
        mask = mask.expand(batch, *mask.shape[1:]) if mask is not None else None
        pooled = pooled.expand(batch, *pooled.shape[1:]) if pooled is not None else None
    return Conditioning(context, mask, pooled)


def _pad_to(c: Conditioning, length: int) -> Conditioning:
    """Pad context with zeros and mask with False up to `length` tokens, so cond and uncond can share a batch."""
    context, mask, pooled = c
    n = context.shape[1]
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if n == length:
        return Conditioning(context, mask, pooled)
    context = torch.cat([context, context.new_zeros(context.shape[0], length - n, context.shape[2])], 1)
    mask = torch.cat([mask.bool(), mask.new_zeros(mask.shape[0], length - n, dtype=torch.bool)], 1)
    return Conditioning(context, mask, pooled)


def _cat_pooled(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if (first is None) != (second is None):
        raise ValueError("cond and uncond must both have a pooled text embedding, or neither")
    return None if first is None else torch.cat([first, second])


def _cat_conds(uncond: Conditioning, cond: Conditioning) -> Conditioning:
    if cond.context is None or uncond.context is None:
        raise ValueError("classifier-free guidance with scale != 1 needs both cond and uncond contexts")
    length = max(cond.context.shape[1], uncond.context.shape[1])
    u, c = _pad_to(uncond, length), _pad_to(cond, length)
    return Conditioning(torch.cat([u.context, c.context]), torch.cat([u.mask.bool(), c.mask.bool()]),
                        _cat_pooled(u.pooled, c.pooled))  # [2B, L, D], [2B, L], [2B, E] | None


def drop_conditioning(cond: Conditioning | tuple, uncond: Conditioning | tuple, p: float,
                      generator: torch.Generator | None = None) -> Conditioning:
    """Training-time CFG dropout: replace each sample's conditioning by `uncond` (e.g. the empty prompt's encoding,
    batch 1 or B) with probability `p`, so one network learns both branches that `cfg_model_fn` combines."""
    cond = Conditioning(*cond)
    batch = cond.context.shape[0]
    if p <= 0:
        return cond
    length = max(cond.context.shape[1], uncond[0].shape[1])
    c, u = _pad_to(cond, length), _pad_to(_as_cond(uncond, batch, "uncond"), length)
    _cat_pooled(u.pooled, c.pooled)  # both or neither
    drop = torch.rand(batch, generator=generator, device=c.context.device if generator is None else generator.device)
    drop = (drop < p).to(c.context.device)  # [B]
    context = torch.where(drop[:, None, None], u.context, c.context)  # [B, L, D]
    pooled = None if c.pooled is None else torch.where(drop[:, None], u.pooled, c.pooled)  # [B, E]
    return Conditioning(context, torch.where(drop[:, None], u.mask, c.mask), pooled)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, sec. 3.4: rescale the guided output to the per-sample std of the conditional one, then
    blend with weight `phi`, which counters over-exposure at high guidance scales."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def cfg_model_fn(
    denoiser: Denoiser,
    cond: Conditioning | tuple,
    uncond: Conditioning | tuple | None = None,
    scale: float = 1.0,
    rescale: float = 0.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A sampler `model_fn(x_t, t) -> raw output` doing classifier-free guidance with ONE batched forward per step:
    the batch is [uncond; cond] along dim 0 (contexts padded to a common length with masked zeros).
    `denoiser(x_t, t, context, context_mask[, pooled=]) -> raw output` (a U-Net). `scale == 1` (or no `uncond`) skips the
    unconditional half. `rescale` > 0 applies `rescale_guidance` (0 = plain CFG)."""
    if not isinstance(cond, tuple):
        raise TypeError(f"cond must be a Conditioning(context, mask[, pooled]) or a (context, mask) tuple, "
                        f"got {type(cond)}")
    cond = Conditioning(*cond)
    if uncond is None or scale == 1.0:
        if uncond is None and scale != 1.0:
            raise ValueError(f"guidance scale {scale} needs an unconditional (or negative-prompt) conditioning")

        def conditional_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return call_denoiser(denoiser, x_t, t, cond)

        return conditional_fn

    batch = cond.context.shape[0]
    both = _cat_conds(_as_cond(uncond, batch, "uncond"), _as_cond(cond, batch, "cond"))

    def guided_fn(x_t: Tensor, t: Tensor) -> Tensor:
        out = call_denoiser(denoiser, torch.cat([x_t, x_t]), torch.cat([t, t]), both)  # [2B, ...]
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(guided, out_cond, rescale) if rescale > 0 else guided

    return guided_fn
