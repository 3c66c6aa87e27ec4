"""Text-conditioned Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The latent is cut into p x p patches, each patch a token; N transformer blocks whose LayerNorms are modulated by
the conditioning vector (timestep embedding + pooled text embedding) with adaLN-Zero; a final modulated linear layer
maps each token back to a patch. The text reaches the image tokens in one of two ways:
- cross-attention to CLIP's token features after each self-attention (PixArt-alpha, Chen et al. 2023);
- `joint_attention`: SD3's MMDiT (Esser et al. 2024): text tokens get their own stream, with their own adaLN, qkv,
  output projection and MLP, and one attention runs over [text tokens; image tokens].

Same call as the U-Net: forward(x [B, C, H, W], t [B], cond: Conditioning) -> [B, C_out, H, W], for any H and W
divisible by the patch: the sin-cos positions are computed for the grid at hand (optionally PixArt-alpha's
base-size scaling: positions are counted in units of a `base_grid` x `base_grid` grid, so a model trained at one
resolution sees the same range of positions at another); the objective (eps / v / x0 / velocity) is the stage's.

Video (the latents of a clip, x [B, T, C, H, W]: the frames' latents, frame by frame): spatio-temporal patches
("tubelets" of `temporal_patch` x p x p, ViViT / Open-Sora), each a token, with 3-D sin-cos positions: the 2-D
embedding of its row and column plus a 1-D embedding of its frame, shifted to be zero at frame 0
(`temporal_embedding`), so a one-frame video is exactly the image model's input (Open-Sora trains images as
one-frame videos in the same network). Attention over space and time is `attention: full` (one self-attention
over every token of the clip) or `factorised` (Latte / STDiT: each block's self-attention within each frame,
then a temporal self-attention across the frames at each position, pre-norm, its output projection zero at
initialisation, so the block starts as the image block; a one-frame video skips it). Images [B, C, H, W] still
come and go with four dimensions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import yaml
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_diffusion.models.attention import Attention, attend
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.layers import (
    ImageEmbedder,
    SizeEmbedder,
    add_global_conditions,
    add_image_embedding,
    grid_embedding,
    keep_in_graph,
    temporal_embedding,
    timestep_embedding,
)

# DiT paper, Table 1: (hidden size, depth, heads)
PRESETS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
PATCH_SIZES = (1, 2, 4)


@dataclass
class DiTConfig:
    in_channels: int = 4  # latent channels of the VAE
    out_channels: int = 4  # usually = in_channels (eps / v / x0 / velocity have the input's shape)
    patch_size: int = 2  # side of the square patch that becomes one token: 1, 2 or 4 (DiT-XL/2 has 2)
    hidden_size: int = 384  # token width
    depth: int = 12  # transformer blocks
    num_heads: int = 6  # attention heads (hidden_size must divide by it)
    mlp_ratio: float = 4.0  # MLP width = hidden_size * mlp_ratio
    context_dim: int | None = 512  # width of the text token features; None = unconditional (no text attention)
    pooled_dim: int | None = None  # width of a pooled text embedding added to the timestep embedding; None = off
    joint_attention: bool = False  # SD3's MMDiT (a text stream, one attention over [text; image]) vs cross-attention
    pos_embed: bool = True  # fixed 2-D sin-cos positions added to the patch tokens (off: tokens are a set)
    base_grid: int | None = None  # PixArt-alpha's position scaling: positions in units of this grid's side (None: off)
    size_conditioning: bool = False  # SDXL's size and crop conditioning (cond.size) added to the timestep embedding
    image_embedding_dim: int | None = None  # unCLIP's decoder: width of the CLIP image embedding (cond.image_embedding)
    image_tokens: int = 4  # the context tokens it is projected into (DALL-E 2: 4), besides the conditioning vector
    frequency_dim: int = 256  # width of the sinusoidal timestep features fed to the timestep MLP
    temporal_patch: int = 1  # frames per token of a video latent [B, T, C, H, W] (a tubelet: temporal_patch x p x p)
    attention: str = "full"  # video: "full" space-time self-attention, or "factorised" (spatial, then temporal)
    use_checkpoint: bool = False  # gradient checkpointing of every block (torch.utils.checkpoint) when training

    def __post_init__(self):
        if self.patch_size not in PATCH_SIZES:
            raise ValueError(f"DiTConfig.patch_size must be one of {PATCH_SIZES}, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.joint_attention and not self.context_dim:
            raise ValueError("DiTConfig.joint_attention needs a context_dim (the text stream's input width)")
        if self.temporal_patch < 1:
            raise ValueError(f"DiTConfig.temporal_patch must be >= 1, got {self.temporal_patch}")
        if self.attention not in ("full", "factorised"):
            raise ValueError(f"DiTConfig.attention must be 'full' or 'factorised', got {self.attention!r}")
        if self.attention == "factorised" and self.joint_attention:
            raise ValueError("DiTConfig.attention 'factorised' is built on the cross-attention block, not "
                             "joint_attention")

    @staticmethod
    def parse_strings(d: dict | None) -> dict:
        """`d` with string values read as YAML ("48" -> 48, "null" -> None), as UNetConfig.parse_strings: a
        command-line override of a key inside a plain dict arrives as a string. `preset` stays a string."""
        return {k: v if k == "preset" else yaml.safe_load(v) if isinstance(v, str) else v for k, v in (d or {}).items()}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTConfig":
        """A named DiT size with its patch: "S/2", "B/4", "L/2", "XL/2" (or "DiT-XL/2"); `overrides` set the other
        fields (in/out channels, context_dim, ...) and may also change the preset's own."""
        match = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)/(\d+)", name)
        if not match:
            raise ValueError(f"unknown DiT preset {name!r}; expected SIZE/PATCH with SIZE in {list(PRESETS)} "
                             f"and PATCH in {PATCH_SIZES}, e.g. 'XL/2'")
        hidden, depth, heads = PRESETS[match[1]]
        base = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(match[2]))
        return cls.from_dict({**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """From config keys; a `preset` key ("XL/2") fills hidden_size, depth, num_heads and patch_size first."""
        d = cls.parse_strings(d)
        if "preset" in d:
            return cls.from_preset(str(d.pop("preset")), **d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiTConfig keys {unknown}; known keys: {sorted(known | {'preset'})}")
        return cls(**d)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] normalised, then scaled and shifted per sample by [B, D] vectors from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C]: row-major patches, each flattened as (row in patch, column, channel)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, h: int, w: int) -> Tensor:
    """The inverse of `patchify`: [B, h*w, p*p*C] on an h x w grid of patches -> [B, C, h*p, w*p]."""
    b = x.shape[0]
    x = x.reshape(b, h, w, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, -1, h * p, w * p)


def patchify_video(x: Tensor, tp: int, p: int) -> Tensor:
    """[B, T, C, H, W] -> [B, (T/tp)(H/p)(W/p), tp*p*p*C]: tubelets in (frame, row, column) order, each flattened as
    (frame in tubelet, row in patch, column, channel); with tp = 1 and T = 1, `patchify` of the frame."""
    b, t, c, h, w = x.shape
    x = x.reshape(b, t // tp, tp, c, h // p, p, w // p, p)
    return torch.einsum("nfschpwq->nfhwspqc", x).reshape(b, (t // tp) * (h // p) * (w // p), tp * p * p * c)


def unpatchify_video(x: Tensor, tp: int, p: int, f: int, h: int, w: int) -> Tensor:
    """The inverse of `patchify_video`: [B, f*h*w, tp*p*p*C] on an f x h x w grid -> [B, f*tp, C, h*p, w*p]."""
    b = x.shape[0]
    x = x.reshape(b, f, h, w, tp, p, p, -1)
    return torch.einsum("nfhwspqc->nfschpwq", x).reshape(b, f * tp, -1, h * p, w * p)


def mlp(dim: int, ratio: float) -> nn.Sequential:
    """The transformer MLP of DiT (timm's Mlp with tanh-approximated GELU)."""
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters: adaLN supplies the scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t [B] -> MLP -> [B, D]."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        freqs = timestep_embedding(t, self.frequency_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attention, cross-attention to the text (if `context_dim`), MLP.

    The conditioning vector c gives, per sample, a shift, scale and gate for the self-attention and for the MLP;
    the cross-attention is ungated, as in PixArt-alpha, but has a pre-norm that PixArt lacks (as Stable Diffusion's
    transformer blocks do): its queries stay at unit scale whatever the residual stream's."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int | None):
        super().__init__()
        self.norm1, self.attn = norm(dim), Attention(dim, heads=heads, qkv_bias=True)
        self.cross_attn = None
        if context_dim:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = Attention(dim, context_dim, heads=heads, qkv_bias=True)
        self.norm2, self.mlp = norm(dim), mlp(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        # x [B, N, D] image tokens, c [B, D] conditioning, context [B, L, W] text tokens, mask [B, L]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FactorisedDiTBlock(DiTBlock):
    """Latte / STDiT's space-time block: the DiT block's self-attention runs within each frame, then a temporal
    self-attention across the frames at each spatial position (pre-norm, ungated, its output projection zero at
    initialisation: the block starts as the image block), then the cross-attention and the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int | None):
        super().__init__(dim, heads, mlp_ratio, context_dim)
        self.norm_temporal = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, heads=heads, qkv_bias=True)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None,
                frames: int = 1) -> Tensor:
        # x [B, f*n, D] tokens of f frames of n positions each
        b, fn, d = x.shape
        n = fn // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa).reshape(b * frames, n, d)  # each frame on its own
        x = x + gate_msa[:, None] * self.attn(h).reshape(b, fn, d)
        if frames > 1:
            h = self.norm_temporal(x).reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
            x = x + self.temporal_attn(h).reshape(b, n, frames, d).transpose(1, 2).reshape(b, fn, d)
        else:  # an image: the temporal layers are skipped, but DDP needs their (zero) gradients
            x = keep_in_graph(x, self.norm_temporal, self.temporal_attn)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class Stream(nn.Module):
    """One modality's weights in an MMDiT block: adaLN, q/k/v, output projection and MLP. `pre_only` (the text
    stream of the last block, whose output nobody reads): only the adaLN shift/scale and the keys and values."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.norm1 = norm(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))
        self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim)
        if not pre_only:
            self.to_q, self.to_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm2, self.mlp = norm(dim), mlp(dim, mlp_ratio)

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, N, head_dim]

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor, Tensor, tuple[Tensor, ...]]:
        """(q or None, k, v) of the modulated tokens, and the gates/shifts/scales the post-attention half uses."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulate(self.norm1(x), mods[0], mods[1])
        q = None if self.pre_only else self._heads(self.to_q(h))
        return q, self._heads(self.to_k(h)), self._heads(self.to_v(h)), mods[2:]

    def post_attention(self, x: Tensor, out: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        # out [B, heads, N, head_dim]: this stream's rows of the joint attention
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa[:, None] * self.to_out(out.transpose(1, 2).flatten(2))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """SD3's MMDiT block: an image and a text stream with separate weights, one attention over [text; image] in
    which padded text tokens are hidden keys."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.image = Stream(dim, heads, mlp_ratio)
        self.text = Stream(dim, heads, mlp_ratio, pre_only)

    def forward(self, x: Tensor, ctx: Tensor, c: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # x [B, N, D] image tokens, ctx [B, L, D] text tokens, c [B, D] conditioning, mask [B, L]
        qx, kx, vx, mods_x = self.image.pre_attention(x, c)
        qc, kc, vc, mods_c = self.text.pre_attention(ctx, c)
        keep = None
        if mask is not None:  # image keys are always visible
            keep = torch.cat([mask.bool(), mask.new_ones(x.shape[:2], dtype=torch.bool)], dim=1)  # [B, L + N]
        k, v = torch.cat([kc, kx], dim=2), torch.cat([vc, vx], dim=2)  # [B, heads, L + N, head_dim]
        q = qx if qc is None else torch.cat([qc, qx], dim=2)
        out = attend(q, k, v, keep)  # [B, heads, (L +) N, head_dim]
        x = self.image.post_attention(x, out[:, :, -x.shape[1]:], mods_x)
        if self.text.pre_only:
            return x, None
        return x, self.text.post_attention(ctx, out[:, :, :ctx.shape[1]], mods_c)


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its patch's p*p*C_out values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = norm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig | dict):
        super().__init__()
        if isinstance(config, dict):
            config = DiTConfig.from_dict(config)
        self.config = c = config
        d, p = c.hidden_size, c.patch_size
        # = DiT's stride-p conv on the patchified latent (a tubelet's temporal_patch frames: a stride-(tp, p, p) conv)
        self.x_embedder = nn.Linear(c.temporal_patch * p * p * c.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, c.frequency_dim)
        self.pooled_embedder = (nn.Sequential(nn.Linear(c.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
                                if c.pooled_dim else None)
        self.size_embedder = SizeEmbedder(c.frequency_dim, d) if c.size_conditioning else None
        self.image_embedder = (ImageEmbedder(c.image_embedding_dim, d, c.context_dim, c.image_tokens)
                               if c.image_embedding_dim else None)
        if c.joint_attention:
            self.context_embedder = nn.Linear(c.context_dim, d)
            self.blocks = nn.ModuleList(JointBlock(d, c.num_heads, c.mlp_ratio, pre_only=i == c.depth - 1)
                                        for i in range(c.depth))
        else:
            block = FactorisedDiTBlock if c.attention == "factorised" else DiTBlock
            self.blocks = nn.ModuleList(block(d, c.num_heads, c.mlp_ratio, c.context_dim) for _ in range(c.depth))
        self.final_layer = FinalLayer(d, p, c.out_channels * c.temporal_patch)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for embedder in (self.t_embedder.mlp, self.pooled_embedder):
            for layer in (embedder or [])[::2]:  # the two Linear layers
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero (DiT sec. 3.2): zero gates make every block the identity and the zero final layer makes the
        # output 0 at initialisation, which trained better than any other conditioning in the paper (as zeroing
        # each residual block's last BatchNorm scale helps ResNets, Goyal et al. 2017). PixArt-alpha zeroes the
        # ungated cross-attention output projection for the same reason.
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        if self.size_embedder is not None:  # zero, as SizeEmbedder makes it: the condition starts switched off
            zero.append(self.size_embedder.mlp[-1])
        for block in self.blocks:
            if isinstance(block, JointBlock):
                zero += [block.image.adaLN_modulation[-1], block.text.adaLN_modulation[-1]]
            else:
                zero.append(block.adaLN_modulation[-1])
                if block.cross_attn is not None:
                    zero.append(block.cross_attn.to_out[0])
                if isinstance(block, FactorisedDiTBlock):
                    zero.append(block.temporal_attn.to_out[0])
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _run(self, block: nn.Module, *args):
        if self.config.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """x [B, C, H, W] (an image's latent) or [B, T, C, H, W] (a clip's) -> the prediction, of x's shape."""
        cond = cond if cond is not None else Conditioning()
        c, p, tp = self.config, self.config.patch_size, self.config.temporal_patch
        video = x.ndim == 5
        if x.ndim not in (4, 5):
            raise ValueError(f"DiT expects a latent [B, C, H, W] or a clip's latents [B, T, C, H, W], got "
                             f"{tuple(x.shape)}")
        b, frames, ch_in, height, width = x.shape if video else (x.shape[0], 1, *x.shape[1:])
        if ch_in != c.in_channels:
            raise ValueError(f"DiT expects {c.in_channels} input channels, got {ch_in}")
        if height % p or width % p:
            raise ValueError(f"DiT input {height}x{width}: height and width must be multiples of patch_size {p}")
        if frames % tp:
            raise ValueError(f"DiT input of {frames} frames: the frame count must be a multiple of temporal_patch "
                             f"{tp}")
        f, h, w = frames // tp, height // p, width // p

        tokens = self.x_embedder(patchify_video(x if video else x[:, None], tp, p))  # [B, f*h*w, D]
        if c.pos_embed:
            scale = None if c.base_grid is None else (c.base_grid / h, c.base_grid / w)
            pos = grid_embedding(h, w, c.hidden_size, x.device, scale)  # [h*w, D]
            if f > 1:
                pos = (temporal_embedding(f, c.hidden_size, x.device)[:, None] + pos).flatten(0, 1)  # [f*h*w, D]
            tokens = tokens + pos.to(tokens.dtype)

        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        emb = add_global_conditions(self.t_embedder(t), cond, b, self.pooled_embedder, c.pooled_dim,
                                    self.size_embedder, "DiT")  # [B, D]
        context, context_mask = cond.context, cond.mask
        if c.context_dim:
            if context is None or context.shape[0] != b or context.shape[-1] != c.context_dim:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"DiT with context_dim={c.context_dim} needs context [{b}, L, {c.context_dim}], "
                                 f"got {got}")
        else:
            context = context_mask = None  # unconditional, as the U-Net without context_dim
        emb, context, context_mask = add_image_embedding(emb, context, context_mask, cond, b, self.image_embedder,
                                                         "DiT")

        if c.joint_attention:
            text = self.context_embedder(context)  # [B, L, D]
            for block in self.blocks:
                tokens, text = self._run(block, tokens, text, emb, context_mask)
        elif c.attention == "factorised":
            for block in self.blocks:
                tokens = self._run(block, tokens, emb, context, context_mask, f)
        else:
            for block in self.blocks:
                tokens = self._run(block, tokens, emb, context, context_mask)
        out = unpatchify_video(self.final_layer(tokens, emb), tp, p, f, h, w)  # [B, T, C_out, H, W]
        return out if video else out[:, 0]
