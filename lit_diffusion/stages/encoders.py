"""The frozen stage-1 and stage-2 encoders as the plain functions `data.encode.encode_shards` takes (that module
imports no model code), for `lit-diffusion data encode` and the latents benchmark alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lit_diffusion.data.latents import state_dict_hash
from lit_diffusion.models.repa import clip_patch_features
from lit_diffusion.stages.clip import CLIPModule
from lit_diffusion.stages.vae import VAEModule


@dataclass
class FrozenEncoders:
    encode_images: Callable  # images [B, 3, S, S] in [-1, 1] -> scaled latent means (and stds, with `std`)
    encode_captions: Callable  # captions -> (token features [B, L, W], mask of real tokens [B, L], pooled [B, E])
    embed_images: Callable  # images at CLIP's size in [-1, 1] -> CLIP image embeddings [B, E]
    clip_hash: str  # `state_dict_hash` of the weights as loaded: the diffusion stage hashes its frozen copies alike
    vae_hash: str
    latent_scale: dict  # {"scale_factor", "latent_mean"} of the VAE
    clip_image_size: int | None
    # images [B, 3, S, S] in [-1, 1] -> CLIP's patch-token map [B, W, h_c, w_c] (REPA's target, models/repa.py)
    patch_features: Callable | None = None


def frozen_encoders(clip_ckpt: str, vae_ckpt: str, device: str | torch.device = "cpu",
                    std: bool = False) -> FrozenEncoders:
    """CLIP and the VAE from their stage checkpoints, as `encode_shards`' encoders (`std`: the posterior's too)."""
    clip = CLIPModule.from_checkpoint(clip_ckpt, map_location=device)
    vae = VAEModule.from_checkpoint(vae_ckpt, map_location=device)

    def encode_images(images):
        latents = vae.encode(images.to(device))  # [B, C, h, w]: what the diffusion stage encodes online
        if not std:
            return latents
        posterior_std = vae.vae.encode(vae._to_weights(images)).std * vae.scale_factor.float()  # scaled as the mean
        return latents, posterior_std

    def encode_captions(captions):
        cond = clip.caption_conditions(captions)  # what the diffusion stage and the prior compute online
        return cond.context, cond.mask, cond.pooled  # [B, L, W], [B, L] (real tokens, end-of-text included), [B, E]

    def embed_images(images):
        return clip.encode_image(images.to(device))  # [B, E] L2-normalised

    def patch_features(images):
        if clip.model.visual is None:
            raise ValueError(f"{clip_ckpt}: this CLIP has no image tower, so it gives no patch features")
        return clip_patch_features(clip.model.visual, images.to(device))  # [B, W, h_c, w_c]

    return FrozenEncoders(encode_images, encode_captions, embed_images, state_dict_hash(clip.state_dict()),
                          state_dict_hash(vae.state_dict()),
                          {"scale_factor": float(vae.scale_factor), "latent_mean": float(vae.latent_mean)},
                          clip.image_size, patch_features)
