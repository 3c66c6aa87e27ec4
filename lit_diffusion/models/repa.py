"""REPA: representation alignment (Yu et al. 2024, "Representation Alignment for Generation", arXiv 2410.06940),
with the framework's own frozen CLIP image tower as the teacher.

A hidden state of the denoiser, computed on the noisy latent anyway, is mapped by a small trained projector onto
the teacher's patch tokens of the *clean* image, and the stage adds

    weight * mean over batch and tokens of (1 - cos(projector(h)[n], target[n]))

to the diffusion loss (REPA eq. 3, written as 1 - cos so that a perfect alignment costs 0). The projector is
training-only: sampling never calls it.

- The hidden state: the output of DiT block `layer` (1-based: 1 is the first block's output), tokens [B, N, D] on
  the h x w patch grid, row-major as `dit.patchify` orders them; or the output of U-Net block `layer` counting
  input blocks, then the middle block, then output blocks, 1-based (`unet_block_widths`), a map [B, C, h, w].
  It is read by a forward hook (`capture_hidden`), registered only around a training step, so the network's
  forward, its result and the cost of sampling are untouched.
- The target: the CLIP vision tower's patch tokens after its last block and its final LayerNorm `ln_post` (the one
  CLIP applies to the pooled token; the projection `proj` is not applied), class token dropped: as DINOv2's
  `x_norm_patchtokens` that REPA uses. The whole image, not CLIP's centre crop, is resized to the tower's square
  (bicubic, antialiased, as `CLIPModule.encode_image` resizes), so every CLIP patch covers a fixed fraction of the
  image, whatever its aspect ratio. The [B, D, h_c, w_c] map is then resized onto the denoiser's h x w grid,
  bilinear with align_corners=False (`match_grid`): grid cells are areas, centre to centre, as torch resizes
  images; a grid of the same size is left as it is.
- Projector `mlp`: REPA's per-token MLP, Linear-SiLU-Linear-SiLU-Linear; REPA uses 2048 hidden units for every
  DiT/SiT size, too many for a model of width 32, so `hidden` defaults to min(2048, max(256, 4 * width)) (DiT-XL's
  1152 gives REPA's 2048). Projector `conv` (iREPA, Singh et al. 2025, arXiv 2512.10794): one 3x3 convolution over
  the token grid, and spatial normalisation of the *target* map (iREPA's reference normalises the encoder
  features [B, T, D] over T: each channel minus its mean over the grid, divided by its std over the grid). We
  divide by the population std (iREPA: torch's default, Bessel-corrected): the two differ by sqrt(N / (N - 1)) on
  every channel alike, which the cosine does not see.
- Both sides are L2-normalised per token inside the cosine, as REPA normalises both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

PROJECTORS = ("mlp", "conv")
FEATURES = ("clip_patches",)


@dataclass
class RepaConfig:
    layer: int  # which denoiser block's output is aligned (1-based; see the module docstring)
    weight: float = 0.5  # lambda of REPA eq. 4 (REPA: 0.5)
    projector: str = "mlp"  # "mlp" (REPA) or "conv" (iREPA: 3x3 conv, spatially normalised target)
    features: str = "clip_patches"  # the target: the frozen CLIP image tower's patch tokens of the clean image
    until_step: int | None = None  # HASTE-style early stop: from this global step on the term is off (None: never)
    hidden: int | None = None  # the MLP's hidden width (None: min(2048, max(256, 4 * the denoiser's width)))

    def __post_init__(self):
        if int(self.layer) < 1:
            raise ValueError(f"repa.layer is 1-based (1: the first block's output), got {self.layer}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"repa.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.features not in FEATURES:
            raise ValueError(f"repa.features must be one of {FEATURES}, got {self.features!r}")
        if not float(self.weight) >= 0:
            raise ValueError(f"repa.weight must be >= 0, got {self.weight}")
        if self.until_step is not None and int(self.until_step) < 0:
            raise ValueError(f"repa.until_step must be >= 0 or null, got {self.until_step}")
        if self.hidden is not None and int(self.hidden) < 1:
            raise ValueError(f"repa.hidden must be >= 1 or null, got {self.hidden}")

    @classmethod
    def from_dict(cls, d: dict) -> "RepaConfig":
        """From config keys; string values are read as YAML ("2" -> 2, "null" -> None), as a command-line override of
        a key inside a plain dict arrives as a string."""
        d = {k: yaml.safe_load(v) if isinstance(v, str) and k not in ("projector", "features") else v
             for k, v in (d or {}).items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown repa keys {unknown}; known keys: {sorted(known)}")
        if "layer" not in d:
            raise ValueError("repa.layer is required: the denoiser block whose output is aligned (1-based)")
        return cls(**d)

    def active(self, step: int) -> bool:
        """Whether the term is computed at this global step (a zero weight never computes it)."""
        return float(self.weight) > 0 and (self.until_step is None or step < int(self.until_step))


# ------------------------------------------------------------------------------------------------- the target
def clip_patch_tokens(visual: nn.Module, images: Tensor) -> Tensor:
    """CLIP's patch tokens of images [B, 3, S, S] in [-1, 1] at the tower's size S: [B, h_c, w_c, W], after the last
    block and `ln_post`, class token dropped. `visual` is `models.clip.VisionTransformer` (an image tower); its
    forward's pooled output is `ln_post(tokens[:, 0]) @ proj` of the same sequence."""
    if visual.cfg.frames != 1:
        raise ValueError("REPA's patch features come from an image tower (vision.frames 1)")
    x = visual.conv1(visual._pixels(images))  # [B, W, h_c, w_c]
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)  # [B, N, W]
    n_cls = int(visual.class_embedding is not None)
    if n_cls:
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.transformer(visual.ln_pre(x + visual.positions().to(x.dtype)))
    return visual.ln_post(x[:, n_cls:]).unflatten(1, (h, w))  # [B, h_c, w_c, W]


@torch.no_grad()
def clip_patch_features(visual: nn.Module, images: Tensor) -> Tensor:
    """The target map [B, W, h_c, w_c] (float32) of images [B, 3, H, W] in [-1, 1] of any size: the whole image
    resized to the tower's square (bicubic, antialiased; not cropped, so the grid covers all of it)."""
    size = visual.cfg.image_size
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True,
                               align_corners=False).clamp(-1, 1)
    tokens = clip_patch_tokens(visual, images.to(visual.conv1.weight.dtype))
    return tokens.permute(0, 3, 1, 2).float()  # [B, W, h_c, w_c]


def match_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """features [B, D, h_c, w_c] -> [B, D, h, w] on the denoiser's token grid: bilinear, align_corners=False (each
    cell a unit area, sampled at its centre); the same grid is returned as it is."""
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False)


def spatial_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """iREPA's spatial normalisation of a map [B, D, h, w]: each channel minus its mean over the h x w grid, divided
    by its (population) std over the grid."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, correction=0)
    return (x - mean) / (std + eps)


def alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean over batch and tokens of 1 - cos(pred, target); pred, target [B, N, D]."""
    cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)  # [B, N]
    return (1 - cos).mean()


# ---------------------------------------------------------------------------------------------- the projector
def default_hidden(width: int) -> int:
    return min(2048, max(256, 4 * width))


class Projector(nn.Module):
    """Denoiser hidden state -> the target's width, per token (`mlp`) or by a 3x3 convolution over the grid
    (`conv`). Takes tokens [B, h*w, D] (row-major) or a map [B, D, h, w], returns tokens [B, h*w, D_target]."""

    def __init__(self, kind: str, width: int, target_dim: int, hidden: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            hidden = hidden or default_hidden(width)
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, target_dim))
        elif kind == "conv":
            self.net = nn.Conv2d(width, target_dim, 3, padding=1)
        else:
            raise ValueError(f"repa.projector must be one of {PROJECTORS}, got {kind!r}")

    def forward(self, hidden: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        if self.kind == "mlp":
            tokens = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden  # [B, N, D]
            return self.net(tokens)
        maps = hidden if hidden.ndim == 4 else hidden.transpose(1, 2).unflatten(2, (h, w))  # [B, D, h, w]
        return self.net(maps).flatten(2).transpose(1, 2)  # [B, N, D_target]


def repa_loss(projector: Projector, hidden: Tensor, grid: tuple[int, int], target: Tensor) -> Tensor:
    """The alignment loss of a captured hidden state (tokens [B, h*w, D] or a map [B, D, h, w]) against the target
    map [B, D_t, h_c, w_c] (resized onto the grid here; spatially normalised for the `conv` projector)."""
    target = match_grid(target.float(), grid)
    if projector.kind == "conv":
        target = spatial_norm(target)
    return alignment_loss(projector(hidden, grid), target.flatten(2).transpose(1, 2))


# ------------------------------------------------------------------------------------------ the hidden state
def unet_block_widths(config) -> list[int]:
    """Output channels of the U-Net's blocks in REPA's 1-based order: input blocks, the middle block, output
    blocks (as `models.unet.UNet` builds them)."""
    widths, ch = [config.model_channels], config.model_channels
    for level, mult in enumerate(config.channel_mult):
        widths += [mult * config.model_channels] * config.num_res_blocks
        ch = mult * config.model_channels
        if level < len(config.channel_mult) - 1:
            widths.append(ch)  # the downsampling block
    widths.append(ch)  # the middle block
    for mult in reversed(config.channel_mult):
        widths += [mult * config.model_channels] * (config.num_res_blocks + 1)
    return widths


def hidden_block(net: nn.Module, layer: int) -> tuple[nn.Module, int]:
    """(the block whose output REPA aligns, its width) in a DiT or a U-Net (unwrapped by the caller)."""
    config = net.config
    if hasattr(net, "blocks"):  # DiT
        if not 1 <= layer <= len(net.blocks):
            raise ValueError(f"repa.layer {layer}: the DiT has blocks 1..{len(net.blocks)}")
        return net.blocks[layer - 1], int(config.hidden_size)
    blocks = [*net.input_blocks, net.middle_block, *net.output_blocks]
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"repa.layer {layer}: the U-Net has blocks 1..{len(blocks)} ({len(net.input_blocks)} input "
                         f"blocks, the middle block at {len(net.input_blocks) + 1}, then the output blocks)")
    return blocks[layer - 1], unet_block_widths(config)[layer - 1]


@contextlib.contextmanager
def capture_hidden(net: nn.Module, block: nn.Module) -> Iterator[dict]:
    """Inside the block, each forward of `net` leaves in the yielded dict "hidden" (the block's output; a joint
    block's image tokens) and "input" (net's first argument, the latent x_t). Both hooks are removed on exit."""
    seen: dict = {}

    def keep_input(module, args):
        seen["input"] = args[0]

    def keep_output(module, args, output):
        # a recomputation under gradient checkpointing runs the block again in backward: keep the first
        if "hidden" not in seen:
            seen["hidden"] = output[0] if isinstance(output, tuple) else output

    handles = [net.register_forward_pre_hook(keep_input), block.register_forward_hook(keep_output)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
