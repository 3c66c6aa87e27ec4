"""The one attention of every network here: CLIP's towers, the U-Net's spatial transformer and context encoder,
the VAE's mid-block and the DiT.

`attend` is scaled-dot-product attention (Vaswani et al. 2017) through F.scaled_dot_product_attention, which picks
a fused kernel (flash / memory-efficient) when the mask allows it, with a key-padding mask, a causal flag and one
rule for a query whose keys are all masked: it attends to nothing and its output is zero (so a layer's output
projection gives its bias), never NaN. `Attention` is the multi-head layer around it, self- or cross-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, causal: bool = False,
           dropout: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d)) v for q [B, H, N, D], k and v [B, H, M, D] -> [B, H, N, D].

    key_padding_mask: [B, M] bool, True = a real key (False keys are hidden from every query).
    causal: query i sees keys j <= i (N == M), as in a GPT / CLIP text tower.
    A query row with no visible key gives zeros.
    """
    n, m = q.shape[-2], k.shape[-2]
    if causal and n != m:
        raise ValueError(f"causal attention needs as many queries as keys, got {n} queries and {m} keys")
    if key_padding_mask is None:
        # no mask to build: SDPA's own causal flag keeps its fastest kernels
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)
    if key_padding_mask.shape != (k.shape[0], m):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [{k.shape[0]}, {m}]")
    visible = key_padding_mask.bool()[:, None, None, :]  # [B, 1, 1, M]: the same keys for every query
    if causal:
        visible = visible & torch.ones(n, m, dtype=torch.bool, device=q.device).tril()  # [B, 1, N, M]
    # left broadcast over queries unless causal: no [B, N, M] mask is built for a U-Net's thousands of pixels
    has_key = visible.any(-1, keepdim=True)  # [B, 1, 1 or N, 1]
    # SDPA gives NaN for a row that sees no key: let such rows see every key, then zero what they produce
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, dropout_p=dropout)
    return out * has_key.to(out.dtype)


class Attention(nn.Module):
    """Multi-head self-attention (`context` None) or cross-attention to `context` [B, M, context_dim].

    Separate q, k, v projections (q reads x, k and v read the context), then `attend`, then an output projection.
    """

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 4, head_dim: int | None = None,
                 dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"width {dim} is not divisible by heads {heads}")
            head_dim = dim // heads
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # [B, heads, N, head_dim]

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                causal: bool = False) -> Tensor:
        """x [B, N, dim]; mask [B, M] (True = real key of the context, or of x for self-attention)."""
        ctx = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(ctx)), self._split(self.to_v(ctx))
        out = attend(q, k, v, mask, causal, self.dropout if self.training else 0.0)  # [B, heads, N, head_dim]
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, N, dim]
