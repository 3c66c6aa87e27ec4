"""Pre-LN Transformer (as in CLIP / GPT-2): x + attn(ln(x)), then x + mlp(ln(x)).

The towers of CLIP (causal text, bidirectional image) and the U-Net's context encoder. Sequences are [B, L, W];
the attention is `models.attention.attend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_diffusion.models.attention import attend


class SelfAttention(nn.Module):
    """Multi-head self-attention with CLIP's fused in-projection `qkv` (q, k, v stacked, as nn.MultiheadAttention's
    in_proj) and output `proj`; the attention itself is `attend`."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, L, hd]
        out = attend(q, k, v, padding_mask, causal, self.dropout if self.training else 0.0)  # [B, heads, L, hd]
        return self.proj(out.transpose(1, 2).flatten(2))  # [B, L, W]


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (its weights expect it)."""
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float = 4.0, quick: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.act = quick_gelu if quick else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 quick_gelu: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, quick_gelu)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), padding_mask, causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 quick_gelu: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, quick_gelu) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # CLIP's init: residual-branch outputs scaled down with depth so the residual stream starts near unit size
        attn_std = self.width ** -0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.proj.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
                nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, causal: bool = False, padding_mask: Tensor | None = None) -> Tensor:
        """x [B, L, W]; causal: token i sees tokens <= i; padding_mask [B, L] (True = real token) hides keys."""
        for block in self.blocks:
            x = block(x, padding_mask, causal)
        return x
