"""Convolutional VAE (the first stage of latent diffusion, Rombach et al. 2022, appendix G).

Encoder: conv -> [res blocks, stride-2 conv] per level -> mid (res, attention, res) -> conv to 2*z_channels
(mean and log-variance). Decoder mirrors it with nearest-neighbour upsampling. The image side shrinks by
2 at every level but the last, so `downsample_factor = 2 ** (len(ch_mult) - 1)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lit_diffusion.models.attention import attend


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB)
    base_channels: int = 64  # width of the first level; level i has base_channels * ch_mult[i]
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # one entry per level; 4 levels -> f=8
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder uses one more, as in SD)
    z_channels: int = 4  # latent channels the diffusion model sees
    mid_attention: bool = True  # single-head self-attention between the two mid res blocks
    norm_groups: int = 32  # GroupNorm groups; every width must be divisible by it
    dropout: float = 0.0  # dropout inside residual blocks
    quant_conv: bool = False  # 1x1 convs on the moments (quant_conv) and the latent (post_quant_conv), as in SD
    logvar_min: float = -30.0  # log-variance clamp: keeps exp(logvar) finite early in training
    logvar_max: float = 20.0

    def __post_init__(self):
        self.ch_mult = [int(m) for m in self.ch_mult]  # lists, not tuples: hparams stay plain YAML/pickle-safe
        if not self.ch_mult:
            raise ValueError("VAEConfig.ch_mult must have at least one level")
        for m in self.ch_mult:
            width = self.base_channels * m
            if width % self.norm_groups:
                raise ValueError(
                    f"VAEConfig: width {width} (base_channels={self.base_channels} * ch_mult {m}) "
                    f"is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (only used at the lowest resolution)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each [B, HW, C]
        out = attend(q[:, None], k[:, None], v[:, None])[:, 0]  # one head: [B, HW, C]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig):
        super().__init__()
        self.res1 = ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)
        self.attn = AttnBlock(channels, cfg.norm_groups) if cfg.mid_attention else nn.Identity()
        self.res2 = ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        ch = widths[0]
        for i, width in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResBlock(ch, width, cfg.norm_groups, cfg.dropout))
                ch = width
            # asymmetric padding (0,1,0,1) + stride 2 halves even sides exactly, as in SD
            level.down = nn.Conv2d(ch, ch, 3, stride=2) if i < len(widths) - 1 else None
            self.levels.append(level)
        self.mid = MidBlock(ch, cfg)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, C0, H, W]
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if level.down is not None:
                h = level.down(F.pad(h, (0, 1, 0, 1)))
        h = self.mid(h)  # [B, C_last, H/f, W/f]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*z, H/f, W/f]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, cfg)
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResBlock(ch, widths[i], cfg.norm_groups, cfg.dropout))
                ch = widths[i]
            level.up = nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else None
            self.levels.append(level)
        self.norm_out = _norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, C_last, h, w]
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if level.up is not None:
                h = level.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W], unbounded (trained towards [-1, 1])

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight used for the adaptive GAN weight (ratio of gradient norms at the output)."""
        return self.conv_out.weight


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0):
        # float32 even under bf16 autocast: exp(logvar) and the KL need the range
        self.mean, logvar = moments.float().chunk(2, dim=1)  # each [B, z, h, w]
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, closed form: 0.5 * (mu^2 + var - 1 - logvar). Shape of mean."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # Stable Diffusion's VAE (and VQGAN's, which it inherits) mixes channels once more at the bottleneck; kept
        # optional so its weights load as they are, while our own default stays without them
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the VAE downsample factor {f}")
        moments = self.encoder(x)  # [B, 2*z, H/f, W/f]
        if self.cfg.quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments, self.cfg.logvar_min, self.cfg.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.cfg.quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z.to(x.dtype)), posterior
