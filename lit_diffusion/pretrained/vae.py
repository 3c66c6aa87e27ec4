"""Stage 2 from published weights: a diffusers `AutoencoderKL` folder, or the first stage of an original latent
diffusion / Stable Diffusion checkpoint (`first_stage_model.*`, or a bare VAE file such as
`vae-ft-mse-840000-ema-pruned`), converted into our `models.vae.AutoencoderKL`.

Both are the LDM autoencoder our VAE already follows (ResBlocks, stride-2 convs with (0,1,0,1) padding, nearest
upsampling + conv, single-head mid attention, GroupNorm 32 with eps 1e-6, SiLU); `VAEConfig(quant_conv=True)`
adds SD's two 1x1 bottleneck convs. The architecture is read off the tensors' shapes, so SD 1.x / 2.x, SDXL and
any other size of the family convert alike. Key names, diffusers -> ours (LDM in brackets):

  {en,de}coder.conv_in | conv_norm_out [norm_out] | conv_out        -> {en,de}coder.conv_in | norm_out | conv_out
  encoder.down_blocks.i.resnets.j [down.i.block.j]                   -> encoder.levels.i.blocks.j
      conv_shortcut [nin_shortcut]                                   ->     skip
  encoder.down_blocks.i.downsamplers.0.conv [down.i.downsample.conv] -> encoder.levels.i.down
  decoder.up_blocks.k.resnets.j [up.(n-1-k).block.j]                 -> decoder.levels.k.blocks.j  (k = 0 deepest)
  decoder.up_blocks.k.upsamplers.0.conv [up.(n-1-k).upsample.conv]   -> decoder.levels.k.up
  mid_block.resnets.0 | 1 [mid.block_1 | 2]                          -> mid.res1 | res2
  mid_block.attentions.0.group_norm [mid.attn_1.norm]                -> mid.attn.norm
  mid_block.attentions.0.to_q, to_k, to_v [q, k, v]                  -> mid.attn.qkv (stacked, as 1x1 conv)
  mid_block.attentions.0.to_out.0 [proj_out]                         -> mid.attn.proj (as 1x1 conv)
  quant_conv, post_quant_conv                                        -> the same
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from lit_diffusion.models.vae import VAEConfig
from lit_diffusion.pretrained.weights import PretrainedError, load_exactly, read_state_dict
from lit_diffusion.stages.vae import LatentStats, VAEModule

log = logging.getLogger("lit_diffusion")

SD1_SCALE = 0.18215  # Stable Diffusion 1.x / 2.x (Rombach et al. 2022): 1 / std of its latents on its data
SDXL_SCALE = 0.13025  # SDXL's retrained VAE (Podell et al. 2023)
LDM_PREFIXES = ("first_stage_model.", "vae.")  # SD checkpoints; some merged files use vae.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_DIFFUSERS_RULES = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.levels.\1.blocks.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.levels.\1.down."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.levels.\1.blocks.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"decoder.levels.\1.up."),
    (r"\.mid_block\.resnets\.0\.", ".mid.res1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn.norm."),
    (r"\.mid_block\.attentions\.0\.(?:to_out\.0|proj_attn)\.", ".mid.attn.proj."),
    (r"\.mid_block\.attentions\.0\.(?:to_q|query)\.", ".mid.attn.q."),
    (r"\.mid_block\.attentions\.0\.(?:to_k|key)\.", ".mid.attn.k."),
    (r"\.mid_block\.attentions\.0\.(?:to_v|value)\.", ".mid.attn.v."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
_LDM_RULES = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.levels.\1.blocks.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.levels.\1.down."),
    (r"\.mid\.block_1\.", ".mid.res1."),
    (r"\.mid\.block_2\.", ".mid.res2."),
    (r"\.mid\.attn_1\.proj_out\.", ".mid.attn.proj."),
    (r"\.mid\.attn_1\.", ".mid.attn."),
    (r"\.nin_shortcut\.", ".skip."),
]


def _rename(state: dict[str, Tensor], rules) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _fuse_attention(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Separate q, k, v (diffusers: Linear [C, C]; LDM: 1x1 conv) -> our stacked 1x1 conv `qkv` [3C, C, 1, 1]; the
    output projection becomes a 1x1 conv as well."""
    for side in ("encoder", "decoder"):
        base = f"{side}.mid.attn."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{base}{n}.{kind}", None) for n in "qkv"]
            if all(p is not None for p in parts):
                fused = torch.cat(parts, 0)
                state[f"{base}qkv.{kind}"] = fused.reshape(fused.shape[0], -1, 1, 1) if kind == "weight" else fused
            elif any(p is not None for p in parts):
                raise PretrainedError(f"{base}: q, k and v weights must come together")
        proj = state.get(f"{base}proj.weight")
        if proj is not None and proj.ndim == 2:
            state[f"{base}proj.weight"] = proj[:, :, None, None]
    return state


def _reverse_ldm_decoder(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """LDM numbers the decoder's levels by resolution (up.0 = full size); ours in the order they run (0 = deepest)."""
    ups = [int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    if not ups:
        return state
    n = max(ups) + 1
    out = {}
    for key, value in state.items():
        m = re.match(r"decoder\.up\.(\d+)\.(block|upsample\.conv)\.", key)
        if m:
            level, part = n - 1 - int(m.group(1)), "blocks" if m.group(2) == "block" else "up"
            key = f"decoder.levels.{level}.{part}." + key[m.end():]
        out[key] = value
    return out


def convert_state_dict(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """A VAE state dict in diffusers or LDM naming (prefix already removed) -> our `AutoencoderKL` naming."""
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in state):
        state = _rename(state, _DIFFUSERS_RULES)
    elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        state = _reverse_ldm_decoder(_rename(state, _LDM_RULES))
    else:
        first = next(iter(state), "(no tensors)")
        raise PretrainedError(f"{source}: not a VAE in diffusers or LDM naming (first key: {first})")
    return _fuse_attention(state)


def infer_config(state: dict[str, Tensor], source: str, norm_groups: int = 32) -> VAEConfig:
    """The `VAEConfig` that these (converted) weights fill, read off their shapes."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise PretrainedError(f"{source}: no weight {key}: not a VAE of the LDM / SD family")
        return tuple(state[key].shape)

    base, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.levels\.(\d+)\.", k)))
    widths = [shape(f"encoder.levels.{i}.blocks.0.conv1.weight")[0] for i in range(levels)]
    if any(w % base for w in widths):
        raise PretrainedError(f"{source}: level widths {widths} are not multiples of the first ({base})")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.levels\.0\.blocks\.(\d+)\.", k))}
    out_channels = shape("decoder.conv_out.weight")[0]
    if out_channels != in_channels:
        raise PretrainedError(f"{source}: decoder.conv_out gives {out_channels} channels for {in_channels} in")
    try:
        return VAEConfig(in_channels=in_channels, base_channels=base, ch_mult=[w // base for w in widths],
                         num_res_blocks=len(blocks), z_channels=shape("decoder.conv_in.weight")[1],
                         mid_attention="encoder.mid.attn.qkv.weight" in state, norm_groups=norm_groups,
                         quant_conv="quant_conv.weight" in state)
    except ValueError as err:
        raise PretrainedError(f"{source}: {err}") from err


def _diffusers_folder(folder: Path) -> tuple[dict, Path]:
    if (folder / "vae" / "config.json").is_file():  # a whole pipeline folder: take its VAE
        folder = folder / "vae"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PretrainedError(f"{folder}: no config.json (expected a diffusers AutoencoderKL folder)")
    config = json.loads(config_path.read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise PretrainedError(f"{config_path}: _class_name is {config['_class_name']!r}, expected 'AutoencoderKL'")
    for key, want in (("act_fn", "silu"), ("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        got = config.get(key, want)
        if any(g != want for g in ([got] if isinstance(got, str) else got)):
            raise PretrainedError(f"{config_path}: {key} = {got}, only {want!r} converts into our VAE")
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise PretrainedError(f"{folder}: none of {list(DIFFUSERS_WEIGHTS)} found")
    return config, weights


def load_pretrained_vae(source: str | Path, scale_factor: float | None = None, shift_factor: float | None = None,
                        norm_groups: int | None = None) -> VAEModule:
    """A `VAEModule` holding the converted weights of `source` (a diffusers folder or an LDM / SD / VAE file),
    with the published latent scale: `scale_factor` (and `shift_factor`, SD3 / FLUX) from the diffusers config,
    SDXL's for an SDXL checkpoint, else SD 1.x's; arguments given here win. `norm_groups`: GroupNorm groups, which
    a single file does not record (every LDM / SD VAE uses 32; a diffusers config says its own)."""
    source = Path(source)
    published_scale, published_shift = None, 0.0
    if source.is_dir():
        config, weights = _diffusers_folder(source)
        state = read_state_dict(weights)
        norm_groups = norm_groups or int(config.get("norm_num_groups", 32))
        published_scale = config.get("scaling_factor", SD1_SCALE)
        published_shift = config.get("shift_factor") or 0.0
        if config.get("latents_mean") is not None and scale_factor is None:
            raise PretrainedError(f"{source}: per-channel latents_mean/latents_std have no equivalent in our "
                                  f"scalar latent scale; pass scale_factor (--scale-factor) or measure it")
        label = str(weights)
    else:
        state = read_state_dict(source)
        label = str(source)
        for prefix in LDM_PREFIXES:
            if any(k.startswith(prefix + "encoder.") for k in state):
                # SDXL checkpoints hold their text encoders under conditioner.*; SD 1.x / 2.x under cond_stage_model.*
                published_scale = SDXL_SCALE if any(k.startswith("conditioner.") for k in state) else SD1_SCALE
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # the training loss' nets
                break
        else:
            state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        if published_scale is None and scale_factor is None:
            log.info("%s: the file does not say its latent scale: using SD 1.x's %s (SDXL's VAE needs "
                     "--scale-factor %s)", source, SD1_SCALE, SDXL_SCALE)
    state = convert_state_dict(state, label)
    module = VAEModule(arch=infer_config(state, label, norm_groups or 32))
    load_exactly(module.vae, state, label)
    scale = float(scale_factor if scale_factor is not None else (published_scale or SD1_SCALE))
    shift = float(shift_factor if shift_factor is not None else published_shift)
    module.scale_factor.fill_(scale)
    module.latent_mean.fill_(shift)  # encode() gives (z - shift) * scale, as diffusers' SD3 / FLUX pipelines
    module.latent_scale_measured = True  # published, which is what the flag guards against missing
    return module.eval()


@torch.no_grad()
def measure_latent_scale(module: VAEModule, urls: str, image_size: int, max_images: int = 2000,
                         batch_size: int = 32) -> tuple[float, float]:
    """Set the latent mean and 1 / std from the posterior means of up to `max_images` images of `urls` (what a
    VAE validation epoch measures), instead of the published scale. Returns (mean, scale)."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    data = ImageCaptionDataModule(train_urls=None, val_urls=urls, image_size=image_size, batch_size=batch_size,
                                  num_workers=0, random_flip=False)
    data.setup("validate")
    stats, seen = LatentStats(), 0
    for batch in data.val_dataloader():
        images = batch["image"][: max_images - seen]
        stats.update(module.vae.encode(module._to_weights(images)).mean)
        seen += images.shape[0]
        if seen >= max_images:
            break
    if seen == 0:
        raise PretrainedError(f"no images found in {urls} to measure the latent scale on")
    mean, std = stats.compute()
    module.latent_mean.fill_(float(mean))
    module.scale_factor.fill_(1.0 / max(float(std), 1e-8))
    log.info("latent scale measured on %d images of %s: mean %.5f, scale %.5f", seen, urls, float(mean),
             float(module.scale_factor))
    return float(mean), float(module.scale_factor)
