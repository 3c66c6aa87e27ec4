"""DALL-E 2's diffusion prior (Ramesh et al. 2022, sec. 2.1 and appendix C): a causal Transformer that denoises a
CLIP image embedding given the caption.

Its sequence is [caption token features, pooled caption embedding, timestep embedding, noised image embedding, a
learned query], each projected to the Transformer's width, with a learned position per place; attention is causal
(the caption's padding is hidden from every query). The query's output is the prediction of the clean image
embedding: DALL-E 2 found predicting x0 better than predicting the noise here.

The embeddings it sees and predicts are standardised per dimension (`stages.prior`), so their entries have about
unit variance; the pooled caption embedding is L2-normalised as CLIP gives it and is multiplied by sqrt(E) for
the same reason. Called as the denoisers are: `prior(x_t [B, E], t [B], cond) -> x0 [B, E]` with `cond` a
`Conditioning` (context, mask, pooled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.layers import timestep_embedding
from lit_diffusion.models.transformer import Transformer


@dataclass
class PriorConfig:
    embed_dim: int = 512  # CLIP's embedding width E (image embedding and pooled caption)
    context_dim: int | None = 512  # width of the caption's token features; None: the pooled embedding only
    max_tokens: int = 77  # the longest caption (token positions learned up to it)
    width: int = 512  # the Transformer's width
    depth: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    frequency_dim: int = 256  # sinusoidal timestep features fed to the timestep MLP

    @classmethod
    def from_dict(cls, d: dict | None) -> PriorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d or {}) - known)
        if unknown:
            raise ValueError(f"unknown prior option(s) {unknown}; known: {sorted(known)}")
        return cls(**(d or {}))


class DiffusionPrior(nn.Module):
    SPECIAL = 4  # pooled caption, timestep, noised embedding, query

    def __init__(self, config: PriorConfig | dict):
        super().__init__()
        self.config = c = config if isinstance(config, PriorConfig) else PriorConfig.from_dict(config)
        if c.width % c.heads:
            raise ValueError(f"PriorConfig.width {c.width} is not divisible by heads {c.heads}")
        w = c.width
        self.context_proj = nn.Linear(c.context_dim, w) if c.context_dim else None
        self.pooled_proj = nn.Linear(c.embed_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(c.frequency_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.x_proj = nn.Linear(c.embed_dim, w)
        self.query = nn.Parameter(torch.randn(w) * 0.02)
        self.positions = nn.Parameter(torch.randn((c.max_tokens if c.context_dim else 0) + self.SPECIAL, w) * 0.02)
        self.transformer = Transformer(w, c.depth, c.heads, c.mlp_ratio, c.dropout)
        self.norm = nn.LayerNorm(w)
        self.out = nn.Linear(w, c.embed_dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        c = self.config
        b = x_t.shape[0]
        if x_t.shape != (b, c.embed_dim):
            raise ValueError(f"the prior denoises embeddings [B, {c.embed_dim}], got {tuple(x_t.shape)}")
        if cond.pooled is None or cond.pooled.shape != (b, c.embed_dim):
            got = None if cond.pooled is None else tuple(cond.pooled.shape)
            raise ValueError(f"the prior needs the pooled caption embedding cond.pooled [{b}, {c.embed_dim}], got {got}")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        dtype = self.x_proj.weight.dtype
        special = torch.stack([
            self.pooled_proj(cond.pooled.to(dtype) * math.sqrt(c.embed_dim)),
            self.time_mlp(timestep_embedding(t, c.frequency_dim).to(dtype)),
            self.x_proj(x_t.to(dtype)),
            self.query.expand(b, -1),
        ], dim=1)  # [B, 4, W]
        tokens, real = special, torch.ones(b, self.SPECIAL, dtype=torch.bool, device=x_t.device)
        if self.context_proj is not None:
            if cond.context is None or cond.context.shape[0] != b or cond.context.shape[-1] != c.context_dim:
                got = None if cond.context is None else tuple(cond.context.shape)
                raise ValueError(f"the prior with context_dim={c.context_dim} needs the caption's token features "
                                 f"cond.context [{b}, L, {c.context_dim}], got {got}")
            n = cond.context.shape[1]
            if n > c.max_tokens:
                raise ValueError(f"a caption of {n} tokens; this prior takes at most max_tokens={c.max_tokens}")
            mask = (torch.ones(b, n, dtype=torch.bool, device=x_t.device) if cond.mask is None
                    else cond.mask.bool())
            tokens = torch.cat([self.context_proj(cond.context.to(dtype)), special], dim=1)  # [B, n + 4, W]
            real = torch.cat([mask, real], dim=1)
            positions = torch.cat([self.positions[:n], self.positions[c.max_tokens:]])
        else:
            positions = self.positions
        h = self.transformer(tokens + positions.to(dtype), causal=True, padding_mask=real)
        return self.out(self.norm(h[:, -1]))  # the query's output: the clean embedding [B, E]
