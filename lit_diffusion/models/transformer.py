"""Pre-LN Transformer (as in CLIP / GPT-2): x + attn(ln(x)), then x + mlp(ln(x)).

Sequences are [B, L, W]. Attention runs through F.scaled_dot_product_attention, which picks a fused kernel
(flash / memory-efficient) when the mask allows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_mask(length: int, causal: bool, padding_mask: Tensor | None, device=None) -> Tensor | None:
    """Boolean SDPA mask (True = may attend) [B or 1, 1, L, L] from a causal flag and a key mask [B, L]
    (True = real token); None when neither is given, so SDPA can use its unmasked kernels."""
    mask = None
    if causal:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, L, L]
    if padding_mask is not None:
        if padding_mask.dim() != 2 or padding_mask.shape[1] != length:
            raise ValueError(f"padding_mask has shape {tuple(padding_mask.shape)}, expected [B, {length}]")
        keys = padding_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        # a query whose keys are all masked would give NaN: let it see itself instead (its output is ignored)
        own = torch.eye(length, dtype=torch.bool, device=keys.device)[None, None]
        keys = keys | own
        mask = keys if mask is None else mask & keys
    return mask


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, L, hd]
        drop = self.dropout if self.training else 0.0
        # is_causal only when there is no explicit mask: SDPA refuses both at once
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                             is_causal=causal and mask is None)  # [B, heads, L, hd]
        return self.proj(out.transpose(1, 2).flatten(2))  # [B, L, W]


class MLP(nn.Module):
    def __init__(self, width: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.width, self.layers = width, layers
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout) for _ in range(layers))
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
        mask = attention_mask(x.shape[1], causal, padding_mask, x.device) if padding_mask is not None else None
        for block in self.blocks:
            x = block(x, mask, causal)
        return x
