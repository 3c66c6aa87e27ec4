"""Building blocks of the U-Net: timestep embedding, residual blocks, resampling, spatial transformer (its
attention is `models.attention.Attention`).

Spatial tensors are [B, C, H, W]; token sequences [B, N, C]. Nothing here calls `.view` on a spatial tensor, so
channels_last inputs stay channels_last (the transformer's NCHW -> NHWC permute is free for them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_diffusion.models.attention import Attention


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim], as in DDPM / ADM
    (Transformer positional encoding, Vaswani et al. 2017): [cos(t w_0..w_{h-1}), sin(t w_0..w_{h-1})] with
    w_i = max_period^(-i/h), h = dim // 2; an odd dim gets a zero last column."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def grid_embedding(height: int, width: int, dim: int, device=None,
                   scale: tuple[float, float] | None = None) -> Tensor:
    """Fixed 2-D sin-cos position embedding of an H x W grid -> [H*W, dim] (row-major, as DiT / MAE): the first
    half of the channels encodes the row, the second the column, each with `timestep_embedding`. `scale`
    (row, column) multiplies the positions (PixArt-alpha's base-size scaling: base / H, base / W)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # [H*W]
    cols = torch.arange(width, device=device).repeat(height)
    if scale is not None:
        rows, cols = rows * scale[0], cols * scale[1]
    return torch.cat([timestep_embedding(rows, dim // 2), timestep_embedding(cols, dim - dim // 2)], dim=-1)


def temporal_embedding(frames: int, dim: int, device=None) -> Tensor:
    """Sin-cos embedding of frame indices [frames, dim], minus frame 0's: zero at the first frame, so that the 3-D
    positions of a one-frame video are the 2-D positions of an image (a constant shift of every frame's, which the
    first layer absorbs: the differences between frames, which attention reads, are the usual sin-cos ones)."""
    f = torch.arange(frames, device=device)
    return timestep_embedding(f, dim) - timestep_embedding(torch.zeros_like(f), dim)


class SizeEmbedder(nn.Module):
    """SDXL's size and crop conditioning (Podell et al. 2023, sec. 2.2): each of the six numbers of `cond.size`
    (original height and width, crop top and left, target height and width, in pixels) gets its own sinusoidal
    embedding, as a timestep does; an MLP maps their concatenation to the timestep embedding's width, to be added
    to it. The last layer starts at zero, so switching the condition on leaves a trained model's output as it was."""

    def __init__(self, frequency_dim: int, out_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(6 * frequency_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, size: Tensor) -> Tensor:
        b = size.shape[0]
        freqs = timestep_embedding(size.reshape(-1), self.frequency_dim).reshape(b, 6 * self.frequency_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))  # [B, out_dim]


def add_global_conditions(emb: Tensor, cond, batch: int, pooled_embed: nn.Module | None, pooled_dim: int | None,
                          size_embed: nn.Module | None, name: str) -> Tensor:
    """The timestep embedding [B, E] plus the conditions every block sees through it: the pooled text (with
    `pooled_dim`) and the size and crop (with `size_conditioning`); one a network was not built for is refused."""
    if pooled_embed is not None:
        if cond.pooled is None or cond.pooled.shape != (batch, pooled_dim):
            got = None if cond.pooled is None else tuple(cond.pooled.shape)
            raise ValueError(f"{name} with pooled_dim={pooled_dim} needs cond.pooled [{batch}, {pooled_dim}], got {got}")
        emb = emb + pooled_embed(cond.pooled.to(emb.dtype))
    elif cond.pooled is not None:
        raise ValueError(f"{name} got a pooled embedding (cond.pooled) but has no pooled_dim")
    if size_embed is not None:
        if cond.size is None or cond.size.shape != (batch, 6):
            got = None if cond.size is None else tuple(cond.size.shape)
            raise ValueError(f"{name} with size_conditioning needs cond.size [{batch}, 6] (original h, w, crop top, "
                             f"left, target h, w), got {got}")
        emb = emb + size_embed(cond.size.float()).to(emb.dtype)
    elif cond.size is not None:
        raise ValueError(f"{name} got a size condition (cond.size) but was built without size_conditioning")
    return emb


class ImageEmbedder(nn.Module):
    """unCLIP's decoder conditioning (DALL-E 2, Ramesh et al. 2022, sec. 2.1): the CLIP image embedding is projected
    and added to the timestep embedding, and projected into `tokens` extra context tokens (DALL-E 2: 4) appended to
    the caption's. The embedding is L2-normalised; it is multiplied by sqrt(E) first, so that its entries have about
    unit variance, as the networks' other inputs. A zero row (the condition dropped) is replaced by a learned null
    embedding, as diffusers' `UnCLIPTextProjModel` learns its classifier-free-guidance embedding."""

    def __init__(self, embed_dim: int, emb_dim: int, context_dim: int | None, tokens: int):
        super().__init__()
        self.embed_dim, self.tokens, self.context_dim = embed_dim, tokens, context_dim
        self.null = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))  # a random unit-norm-like start
        self.to_emb = nn.Sequential(nn.Linear(embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.to_tokens = nn.Linear(embed_dim, tokens * context_dim) if tokens and context_dim else None

    def forward(self, image_embedding: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B, E] -> (addition to the timestep embedding [B, emb_dim], context tokens [B, tokens, context_dim])."""
        e = image_embedding.to(self.null.dtype)
        dropped = (e == 0).all(dim=-1, keepdim=True)  # [B, 1]
        e = torch.where(dropped, self.null.expand_as(e), e) * math.sqrt(self.embed_dim)
        tokens = None if self.to_tokens is None else self.to_tokens(e).reshape(-1, self.tokens, self.context_dim)
        return self.to_emb(e), tokens


def add_image_embedding(emb: Tensor, context: Tensor | None, mask: Tensor | None, cond, batch: int,
                        embedder: ImageEmbedder | None, name: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The timestep embedding, context and mask with `cond.image_embedding` in them (`ImageEmbedder`): its tokens
    join the context after the caption's, always attended to. A condition a network was not built for is refused."""
    if embedder is None:
        if cond.image_embedding is not None:
            raise ValueError(f"{name} got an image embedding (cond.image_embedding) but has no image_embedding_dim")
        return emb, context, mask
    e = cond.image_embedding
    if e is None or e.shape != (batch, embedder.embed_dim):
        got = None if e is None else tuple(e.shape)
        raise ValueError(f"{name} with image_embedding_dim={embedder.embed_dim} needs cond.image_embedding "
                         f"[{batch}, {embedder.embed_dim}], got {got}")
    add, tokens = embedder(e)
    emb = emb + add.to(emb.dtype)
    if tokens is not None:
        if context is None:
            context, mask = tokens.to(emb.dtype), None
        else:
            if mask is None:
                mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            context = torch.cat([context, tokens.to(context.dtype)], dim=1)  # [B, L + K, W]
            mask = torch.cat([mask.bool(), mask.new_ones(batch, tokens.shape[1], dtype=torch.bool)], dim=1)
    return emb, context, mask


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm of gcd(channels, groups) groups: `groups` where it divides `channels`, else the largest common
    divisor of the two (tiny test models), which may be below the largest divisor of `channels` under `groups`
    (48 channels, 32 groups: 16, not 24). Kept so: the group count is not in the state dict, so another rule would
    change what trained checkpoints compute."""
    g = math.gcd(channels, groups)
    return nn.GroupNorm(g, channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch starts as the identity (ADM, "Fixup"-style init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, inner * 2)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context (if any), GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads, head_dim, dropout)
        self.cross = context_dim is not None
        if self.cross:
            self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads, head_dim, dropout)
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.cross:
            if context is None:
                raise ValueError("this U-Net has cross-attention (context_dim is set) but was called without context")
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Latent Diffusion's transformer over the H*W positions of a feature map (Rombach et al. 2022): GroupNorm,
    linear in-projection, `depth` transformer blocks, zero-initialised out-projection, residual.

    `pos_embed` adds a fixed 2-D sin-cos embedding of each position to its token (as DiT does): queries then know
    where they are, instead of inferring it from the convolutions' zero padding, which is what placing a caption's
    "above" / "left of" asks of cross-attention.

    `space_time` (a video U-Net's, `UNetConfig.space_time_attention`): given a feature map of T frames of each clip
    ([B*T, C, H, W], frame-major), the tokens of all of a clip's frames form one sequence of T*H*W, with the frames'
    sin-cos positions (`temporal_embedding`) added to the grid's: full space-time attention, which follows an object
    from frame to frame wherever it moves. One frame is the image case, unchanged."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int | None = None, depth: int = 1,
                 dropout: float = 0.0, groups: int = 32, pos_embed: bool = False, space_time: bool = False):
        super().__init__()
        self.pos_embed, self.space_time = pos_embed, space_time
        inner = heads * head_dim
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, inner)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                frames: int = 1) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]; free for channels_last
        tokens = self.proj_in(tokens)
        if self.pos_embed:
            tokens = tokens + grid_embedding(h, w, tokens.shape[-1], tokens.device).to(tokens.dtype)
        clip = self.space_time and frames > 1
        if clip:  # [B*T, HW, C] -> [B, T*HW, C]; the context was repeated for each frame: one copy per clip
            when = temporal_embedding(frames, tokens.shape[-1], tokens.device).to(tokens.dtype)  # [T, C]
            tokens = (tokens.unflatten(0, (b // frames, frames)) + when[:, None]).flatten(1, 2)
            context = None if context is None else context[::frames]
            mask = None if mask is None else mask[::frames]
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        if clip:
            tokens = tokens.reshape(b, h * w, -1)
        out = self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, H, W]
        return x + out


def keep_in_graph(x: Tensor, *modules: nn.Module) -> Tensor:
    """`x`, plus zero times the modules' parameters when gradients are recorded: a branch skipped for this batch
    (the temporal layers on a one-frame batch, an image in joint image+video training) then gets zero gradients,
    not none. DDP reduces every parameter's gradient on every rank at every step, and a parameter that one step
    leaves out makes the next step fail, or the ranks wait for each other, when some ranks hold images and others
    clips."""
    if not torch.is_grad_enabled():
        return x
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return x + 0.0 * sum(p.sum() for p in params) if params else x


class TemporalAttention(nn.Module):
    """The video U-Net's temporal layer (Video Diffusion Models, Ho et al. 2022: factorised space-time attention;
    Video LDM, Blattmann et al. 2023): self-attention across the frames at each spatial position of a feature map
    [B*T, C, H, W] that holds T frames of each clip, frame-major. GroupNorm, linear in-projection plus the frames'
    sin-cos positions (`temporal_embedding`; without them attention over frames could not tell a clip from the
    same clip played backwards), attention, zero-initialised out-projection, residual: it starts as the identity,
    and one frame (an image) passes it unchanged."""

    def __init__(self, channels: int, heads: int, head_dim: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels, groups)
        self.proj_in = nn.Linear(channels, inner)
        self.attn = Attention(inner, None, heads, head_dim, dropout)
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x: Tensor, frames: int) -> Tensor:
        if frames == 1:
            return keep_in_graph(x, self)
        bt, c, h, w = x.shape
        b = bt // frames
        # [B*T, C, H, W] -> [B, T, H, W, C] -> [B*H*W, T, C]: each position's frames one sequence
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, frames, h, w, c).permute(0, 2, 3, 1, 4)
        tokens = self.proj_in(tokens.reshape(b * h * w, frames, c))
        tokens = tokens + temporal_embedding(frames, tokens.shape[-1], tokens.device).to(tokens.dtype)
        out = self.proj_out(self.attn(tokens))  # [B*H*W, T, C]
        out = out.reshape(b, h, w, frames, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        return x + out


class ResBlock(nn.Module):
    """ADM residual block: GroupNorm-SiLU-conv, timestep embedding as scale/shift of the second GroupNorm
    (`scale_shift`, ADM's "AdaGN") or added before it, SiLU-dropout-conv (zero-init), skip (1x1 conv if the width
    changes)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, scale_shift: bool = True,
                 groups: int = 32):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(in_ch, groups), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1)))
        self.out_norm = group_norm(out_ch, groups)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None].to(h.dtype)  # [B, C or 2C, 1, 1]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then 3x3 convolution (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
