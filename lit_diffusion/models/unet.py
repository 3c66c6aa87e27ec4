"""Text-conditioned U-Net denoiser in the ADM / Latent Diffusion layout (Dhariwal & Nichol 2021; Rombach et al. 2022).

forward(x [B, C, H, W], t [B], cond: Conditioning) -> raw prediction [B, C_out, H, W], for any H and W divisible
by the downsampling, or a clip's latents x [B, T, C, H, W] -> [B, T, C_out, H, W] with `temporal_attention` or
`space_time_attention`. `cond.context` [B, L, D] and `cond.mask` [B, L] feed the cross-attention; `cond.pooled`
[B, E] (only with `pooled_dim`): a sentence embedding projected and added to the timestep embedding, as unCLIP's
decoder adds the CLIP text embedding: global attributes reach every ResBlock directly; `cond.size` [B, 6] (only
with `size_conditioning`): SDXL's original size, crop and target size, Fourier-embedded and added there too.

`context_layers` > 0 runs a small bidirectional Transformer over the context first, trained with the U-Net: the
jointly trained conditioning encoder of Latent Diffusion (Rombach et al. 2022, tau_theta). A causal text encoder
such as CLIP's gives the first object of "A above B" features that never saw "above" or B; a bidirectional layer
lets every token see the whole caption, as Imagen's T5 encoder does. (On the shapes data, with `pos_embed`, it
improved the colours and shapes of two-object captions; their relations need more training than a CPU budget.)

Video: a clip's latents go through every convolution as a batch of its frames (each frame sees the clip's
timestep, caption and pooled text), and frames meet in one or both of two ways:
- `temporal_attention`, the factorised space-time U-Net of Video Diffusion Models (Ho et al. 2022) and Video LDM
  (Blattmann et al. 2023): last in every block with a ResBlock, a `TemporalAttention` attends across the frames at
  each position (appended, so an image U-Net's weights keep their names). Its output starts at zero, so at
  initialisation a clip gets the image U-Net's output frame by frame, and an image U-Net's weights start it;
- `space_time_attention`: each spatial transformer attends over the tokens of all the clip's frames at once (full
  space-time attention, as the video DiT's `attention: full`), with no weights of its own.
A one-frame clip, or an image, gets exactly the image U-Net's output on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import yaml
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.layers import (
    Downsample,
    ImageEmbedder,
    ResBlock,
    SizeEmbedder,
    SpatialTransformer,
    TemporalAttention,
    add_global_conditions,
    add_image_embedding,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)
from lit_diffusion.models.transformer import Transformer


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels of the VAE (3 for pixel-space diffusion)
    out_channels: int = 4  # usually = in_channels (eps / v / x0 have the input's shape)
    model_channels: int = 128  # width of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one entry per resolution level; len - 1 downsamplings
    num_res_blocks: int = 2  # ResBlocks per level on the way down (the way up has one more, for the extra skip)
    attention_resolutions: tuple[int, ...] = (2, 4)  # downsample factors (1 = input resolution) with a transformer
    num_heads: int = 4  # attention heads, used when head_dim is None
    head_dim: int | None = None  # if set, heads = channels // head_dim (constant head width, as in SD 2)
    transformer_depth: int = 1  # transformer blocks per SpatialTransformer
    context_dim: int | None = 512  # width of the text token features; None = unconditional (no cross-attention)
    pooled_dim: int | None = None  # width of a pooled text embedding added to the timestep embedding (unCLIP); None = off
    size_conditioning: bool = False  # SDXL's size and crop conditioning (cond.size) added to the timestep embedding
    image_embedding_dim: int | None = None  # unCLIP's decoder: width of the CLIP image embedding (cond.image_embedding)
    image_tokens: int = 4  # the context tokens it is projected into (DALL-E 2: 4), besides the timestep embedding
    context_layers: int = 0  # bidirectional Transformer blocks over the context, trained with the U-Net (LDM's tau)
    context_heads: int = 4  # their attention heads
    pos_embed: bool = False  # fixed 2-D sin-cos position embedding on every SpatialTransformer's tokens (DiT)
    dropout: float = 0.0  # in ResBlocks, attention (weights and outputs) and feed-forwards
    norm_groups: int = 32  # GroupNorm groups (reduced to a divisor of the width for tiny models)
    time_embed_mult: int = 4  # timestep MLP width = model_channels * time_embed_mult
    scale_shift_norm: bool = True  # ADM's adaptive GroupNorm (scale/shift) instead of adding the time embedding
    mid_attention: bool = True  # a SpatialTransformer between the two middle ResBlocks
    use_checkpoint: bool = False  # gradient checkpointing of every block (torch.utils.checkpoint) when training
    temporal_attention: bool = False  # video: attention across a clip's frames, last in each block
    space_time_attention: bool = False  # video: the spatial transformers attend over all of a clip's frames' tokens

    @property
    def takes_clips(self) -> bool:
        """Whether a clip's frames meet in this network (a video U-Net)."""
        return self.temporal_attention or self.space_time_attention

    @staticmethod
    def parse_strings(d: dict | None) -> dict:
        """`d` with string values read as YAML ("48" -> 48, "[1, 2]" -> [1, 2], "null" -> None): every field is a
        number, flag or tuple, and a command-line override of a key inside a plain dict arrives as a string."""
        return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in (d or {}).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; known keys: {sorted(known)}")
        d = cls.parse_strings(d)
        for key in ("channel_mult", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class UNetBlock(nn.ModuleList):
    """A sequence of layers fed what each needs: ResBlocks the time embedding, transformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None,
                frames: int = 1) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask, frames)
            elif isinstance(layer, TemporalAttention):
                x = layer(x, frames)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        self.config = c = config
        if not c.channel_mult:
            raise ValueError("UNetConfig.channel_mult must have at least one level")
        if c.space_time_attention and not (c.attention_resolutions or c.mid_attention):
            raise ValueError("UNetConfig.space_time_attention needs spatial transformers (attention_resolutions or "
                             "mid_attention): without them a clip's frames would never meet")
        ch = c.model_channels
        emb_dim = ch * c.time_embed_mult
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_embed = (nn.Sequential(nn.Linear(c.pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                             if c.pooled_dim else None)
        self.size_embed = SizeEmbedder(ch, emb_dim) if c.size_conditioning else None
        self.image_embed = (ImageEmbedder(c.image_embedding_dim, emb_dim, c.context_dim, c.image_tokens)
                            if c.image_embedding_dim else None)
        self.context_encoder = None
        if c.context_layers:
            if not c.context_dim:
                raise ValueError("UNetConfig.context_layers needs a context_dim (a conditional U-Net)")
            self.context_encoder = Transformer(c.context_dim, c.context_layers, c.context_heads)
            self.context_norm = nn.LayerNorm(c.context_dim)

        def res(i, o):
            return ResBlock(i, o, emb_dim, c.dropout, c.scale_shift_norm, c.norm_groups)

        def heads_of(width):
            heads, head_dim = (width // c.head_dim, c.head_dim) if c.head_dim else (c.num_heads, width // c.num_heads)
            if heads < 1 or head_dim < 1:
                raise ValueError(f"UNetConfig: width {width} too small for num_heads={c.num_heads}, "
                                 f"head_dim={c.head_dim}")
            return heads, head_dim

        def attn(width):
            return SpatialTransformer(width, *heads_of(width), c.context_dim, c.transformer_depth, c.dropout,
                                      c.norm_groups, c.pos_embed, c.space_time_attention)

        def temporal(width):  # last in a block with a ResBlock, with `temporal_attention`
            if not c.temporal_attention:
                return []
            return [TemporalAttention(width, *heads_of(width), c.norm_groups, c.dropout)]

        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(c.in_channels, ch, 3, padding=1)])])
        skip_chs, factor = [ch], 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if factor in c.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(UNetBlock(layers + temporal(ch)))
                skip_chs.append(ch)
            if level < len(c.channel_mult) - 1:
                self.input_blocks.append(UNetBlock([Downsample(ch)]))
                skip_chs.append(ch)
                factor *= 2

        self.middle_block = UNetBlock([res(ch, ch), *([attn(ch)] if c.mid_attention else []), res(ch, ch),
                                       *temporal(ch)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_chs.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if factor in c.attention_resolutions:
                    layers.append(attn(ch))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(UNetBlock(layers + temporal(ch)))

        # zero-initialised output: the untrained network predicts 0 (the mean of eps / v), a stable start
        self.out = nn.Sequential(group_norm(ch, c.norm_groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))
        self.downsample_factor = 2 ** (len(c.channel_mult) - 1)

    def _run(self, block: UNetBlock, x, emb, context, mask, frames):
        if self.config.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, context, mask, frames, use_reentrant=False)
        return block(x, emb, context, mask, frames)

    def encode_context(self, context: Tensor | None, context_mask: Tensor | None) -> Tensor | None:
        """The context as cross-attention sees it: through the bidirectional encoder when `context_layers` > 0
        (over the real tokens, padding hidden; padded positions stay masked in cross-attention), else as given."""
        if self.context_encoder is None or context is None:
            return context
        return self.context_norm(self.context_encoder(context, padding_mask=context_mask))

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        cond = cond if cond is not None else Conditioning()
        frames, video = 1, x.ndim == 5
        if video:  # a clip's latents [B, T, C, H, W]: its frames go through the spatial layers as images
            if not self.config.takes_clips:
                raise ValueError(f"UNet got clips {list(x.shape)} [B, T, C, H, W] but has no temporal layers "
                                 f"(UNetConfig.temporal_attention or space_time_attention: true)")
            frames = x.shape[1]
            x = x.flatten(0, 1)
        elif x.ndim != 4:
            raise ValueError(f"UNet takes [B, C, H, W] images or [B, T, C, H, W] clips, got {list(x.shape)}")
        b, ch_in, h, w = x.shape
        b //= frames
        if ch_in != self.config.in_channels:
            raise ValueError(f"UNet expects {self.config.in_channels} input channels, got {ch_in}")
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"UNet input {h}x{w}: height and width must be multiples of {self.downsample_factor} "
                             f"(2 ** (len(channel_mult) - 1) downsamplings)")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))  # [B, E]
        emb = add_global_conditions(emb, cond, b, self.pooled_embed, self.config.pooled_dim, self.size_embed, "UNet")
        context, context_mask = cond.context, cond.mask
        context = self.encode_context(context, context_mask)
        emb, context, context_mask = add_image_embedding(emb, context, context_mask, cond, b, self.image_embed, "UNet")
        if frames > 1:  # every frame sees its clip's timestep and conditions
            emb = emb.repeat_interleave(frames, dim=0)
            context = None if context is None else context.repeat_interleave(frames, dim=0)
            context_mask = None if context_mask is None else context_mask.repeat_interleave(frames, dim=0)

        skips = []
        for block in self.input_blocks:
            x = self._run(block, x, emb, context, context_mask, frames)
            skips.append(x)
        x = self._run(self.middle_block, x, emb, context, context_mask, frames)
        for block in self.output_blocks:
            x = self._run(block, torch.cat([x, skips.pop()], dim=1), emb, context, context_mask, frames)
        out = self.out(x)
        return out.unflatten(0, (b, frames)) if video else out
