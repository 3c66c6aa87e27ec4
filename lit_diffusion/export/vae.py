"""Stage 2 to diffusers: a VAE stage checkpoint written as a diffusers `AutoencoderKL` folder (config.json +
diffusion_pytorch_model.safetensors) that `diffusers.AutoencoderKL.from_pretrained(DIR)` loads, and that
`lit-diffusion import vae DIR` (`pretrained.vae`) turns back into the same weights bit for bit.

Our VAE is the LDM autoencoder diffusers' AutoencoderKL implements, so each `VAEConfig` field is one of its config
keys (or a constant of its blocks):

  in_channels                  -> in_channels = out_channels
  base_channels * ch_mult[i]   -> block_out_channels[i]  (one DownEncoderBlock2D / UpDecoderBlock2D per level)
  num_res_blocks               -> layers_per_block  (the decoder's levels have one more block in both)
  z_channels                   -> latent_channels
  mid_attention                -> mid_block_add_attention
  norm_groups                  -> norm_num_groups  (GroupNorm eps 1e-6 in both)
  quant_conv                   -> use_quant_conv and use_post_quant_conv
  logvar_min, logvar_max       diffusers clamps the log-variance at (-30, 20), our defaults: other values are refused
  dropout                      diffusers' AutoencoderKL has none: exported, with a warning (eval is identical)
  scale_factor, latent_mean    -> scaling_factor, shift_factor  (encode: (z - shift) * scale in both)

Key names, ours -> diffusers (the inverse of `pretrained.vae`'s table):

  {en,de}coder.conv_in | norm_out | conv_out     -> {en,de}coder.conv_in | conv_norm_out | conv_out
  encoder.levels.i.blocks.j (skip)               -> encoder.down_blocks.i.resnets.j (conv_shortcut)
  encoder.levels.i.down                          -> encoder.down_blocks.i.downsamplers.0.conv
  decoder.levels.k.blocks.j | up                 -> decoder.up_blocks.k.resnets.j | upsamplers.0.conv  (k = 0 deepest)
  mid.res1 | res2 | attn.norm                    -> mid_block.resnets.0 | 1 | attentions.0.group_norm
  mid.attn.qkv (1x1 conv [3C, C, 1, 1])          -> mid_block.attentions.0.to_q, to_k, to_v (Linear [C, C] each)
  mid.attn.proj (1x1 conv)                       -> mid_block.attentions.0.to_out.0 (Linear)
  quant_conv, post_quant_conv                    -> the same
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from dataclasses import asdict
from pathlib import Path

from torch import Tensor

from lit_diffusion.export import ExportError, prepare_folder, save_safetensors, write_json
from lit_diffusion.models.vae import VAEConfig
from lit_diffusion.stages.base import CheckpointError
from lit_diffusion.stages.vae import VAEModule

log = logging.getLogger("lit_diffusion")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # the first name `pretrained.vae.DIFFUSERS_WEIGHTS` reads
DIFFUSERS_LOGVAR = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance here
MIN_DIFFUSERS = "0.30.0"  # a release that reads every key written here (shift_factor, use_quant_conv)

_TO_DIFFUSERS = [
    (r"^encoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.levels\.(\d+)\.down\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^decoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.levels\.(\d+)\.up\.", r"decoder.up_blocks.\1.upsamplers.0.conv."),
    (r"\.mid\.res1\.", ".mid_block.resnets.0."),
    (r"\.mid\.res2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn\.norm\.", ".mid_block.attentions.0.group_norm."),
    (r"\.mid\.attn\.proj\.", ".mid_block.attentions.0.to_out.0."),
    (r"\.mid\.attn\.(q|k|v)\.", r".mid_block.attentions.0.to_\1."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]


def check_exportable(cfg: VAEConfig) -> None:
    """Refuse what diffusers' AutoencoderKL cannot compute as ours does; warn about what only training would see."""
    if (cfg.logvar_min, cfg.logvar_max) != DIFFUSERS_LOGVAR:
        raise ExportError(f"VAEConfig.logvar_min/logvar_max = ({cfg.logvar_min}, {cfg.logvar_max}): diffusers' "
                          f"AutoencoderKL clamps the posterior log-variance at {DIFFUSERS_LOGVAR}, so its std would "
                          f"differ from ours wherever the clamp bites")
    if cfg.dropout:
        log.warning("VAEConfig.dropout = %s: diffusers' AutoencoderKL has no dropout; it encodes and decodes as ours "
                    "does in eval mode, but would fine-tune without it", cfg.dropout)


def _split_attention(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our stacked 1x1 conv `qkv` [3C, C, 1, 1] -> separate q, k, v as Linear weights [C, C]; the output
    projection becomes a Linear too (the inverse of `pretrained.vae._fuse_attention`)."""
    for side in ("encoder", "decoder"):
        base = f"{side}.mid.attn."
        for kind in ("weight", "bias"):
            fused = state.pop(f"{base}qkv.{kind}", None)
            if fused is None:
                continue  # no mid attention
            for name, part in zip("qkv", fused.chunk(3, dim=0)):
                state[f"{base}{name}.{kind}"] = part.flatten(1) if kind == "weight" else part
        proj = state.get(f"{base}proj.weight")
        if proj is not None:
            state[f"{base}proj.weight"] = proj.flatten(1)  # [C, C, 1, 1] -> [C, C]
    return state


def to_diffusers_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our `AutoencoderKL` state dict -> diffusers' AutoencoderKL names and shapes."""
    out = {}
    for key, value in _split_attention(dict(state)).items():
        for pattern, repl in _TO_DIFFUSERS:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def diffusers_config(module: VAEModule) -> dict:
    """diffusers' AutoencoderKL config.json for this VAE, with its latent scale and shift."""
    cfg = module.config
    levels = len(cfg.ch_mult)
    try:
        version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        version = MIN_DIFFUSERS
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": version,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "scaling_factor": float(module.scale_factor),
        "shift_factor": float(module.latent_mean),
        "latents_mean": None,
        "latents_std": None,
        "use_quant_conv": cfg.quant_conv,
        "use_post_quant_conv": cfg.quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


def export_vae(module: VAEModule, out: str | Path) -> dict:
    """Write `module` as a diffusers AutoencoderKL folder `out`; returns a summary (files, config, how to load)."""
    check_exportable(module.config)
    if not module.latent_scale_measured:
        log.warning("the VAE's latent scale was never measured: exporting scaling_factor %s, shift_factor %s",
                    float(module.scale_factor), float(module.latent_mean))
    out = prepare_folder(out)
    config = diffusers_config(module)
    write_json(config, out / CONFIG_NAME)
    save_safetensors(to_diffusers_state_dict(module.vae.state_dict()), out / WEIGHTS_NAME)
    return {"out": str(out), "to": "diffusers", "files": [CONFIG_NAME, WEIGHTS_NAME], "arch": asdict(module.config),
            "scaling_factor": config["scaling_factor"], "shift_factor": config["shift_factor"],
            "load": f"diffusers.AutoencoderKL.from_pretrained({str(out)!r})"}


def export_vae_checkpoint(ckpt: str | Path, out: str | Path) -> dict:
    """`export_vae` of the VAE stage checkpoint `ckpt` (vae.ckpt)."""
    try:
        module = VAEModule.from_checkpoint(ckpt)
    except CheckpointError as err:
        raise ExportError(f"{err} (a diffusers AutoencoderKL is exported from a VAE stage checkpoint, vae.ckpt)") \
            from err
    return export_vae(module, out)
