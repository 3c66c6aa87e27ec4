"""CLIP (Radford et al. 2021): a ViT image encoder and a causal text Transformer mapped into one embedding space.

Images are [B, 3, H, W] in [-1, 1]; tokens [B, L] long ([sot, ..., eot, pad...]). Both encoders end in a linear
projection to `embed_dim`; the `CLIP` module returns L2-normalised embeddings and the learnt logit scale.

A video tower (`VisionConfig.frames` > 1) reads clips [B, T, 3, H, W] as spatio-temporal patches, ViViT's
"tubelet embedding" (Arnab et al. 2021): `conv1` becomes a Conv3d whose kernel and stride are (tubelet, p, p), so
a clip gives (T / tubelet) x (H / p) x (W / p) tokens, ordered time-major, which attend to each other jointly.
Positions are factorised: `positional_embedding` is the image tower's (class token + spatial grid, same name and
shape) and `temporal_embedding` [T / tubelet, W] is added to every token of a time step. So an image tower's
weights inflate into a video tower's (`inflate_image_weights`) and frames == 1 is exactly the image model.
An image given to a video tower is a still clip (its frame repeated T times); a one-frame clip given to either
tower is an image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_diffusion.models.transformer import Transformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # temperature 0.07, as in CLIP
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the scale at 100 to keep training stable
POOLING = ("cls", "mean")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI's pixel statistics, which its weights were trained on
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class VisionConfig:
    image_size: int = 32  # side of the (square) input images
    patch_size: int = 4  # side of each patch token; image_size must be a multiple
    width: int = 128  # token width
    layers: int = 4  # Transformer blocks
    heads: int = 4  # attention heads (width % heads == 0)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    pool: str = "cls"  # "cls": a class token's output (CLIP); "mean": mean of patch tokens (no class token)
    dropout: float = 0.0  # attention dropout
    quick_gelu: bool = False  # x * sigmoid(1.702 x) in the MLPs, as OpenAI's weights were trained
    # per-channel normalisation of [0, 1] pixels that imported weights expect (OpenAI: CLIP_MEAN / CLIP_STD);
    # None: the [-1, 1] images go in as they are (our own CLIP)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    frames: int = 1  # frames per clip; 1: an image tower (the image model, unchanged), > 1: a video tower
    tubelet: int = 1  # frames per patch token (ViViT tubelet: t x patch x patch); frames must be a multiple

    def __post_init__(self):
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("vision.image_mean and vision.image_std are set together or not at all")
        if self.image_mean is not None:
            self.image_mean, self.image_std = [float(m) for m in self.image_mean], [float(s) for s in self.image_std]
            if len(self.image_mean) != 3 or len(self.image_std) != 3:
                raise ValueError("vision.image_mean and vision.image_std need one value per RGB channel")
        if self.pool not in POOLING:
            raise ValueError(f"vision.pool must be one of {POOLING}, got {self.pool!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.frames < 1 or self.tubelet < 1:
            raise ValueError(f"vision.frames ({self.frames}) and vision.tubelet ({self.tubelet}) must be >= 1")
        if self.frames % self.tubelet:
            raise ValueError(f"vision.frames {self.frames} is not a multiple of vision.tubelet {self.tubelet}")

    @property
    def time_steps(self) -> int:
        """Tubelets along time: frames / tubelet (1 for an image tower)."""
        return self.frames // self.tubelet


@dataclass
class TextConfig:
    vocab_size: int | None = None  # tokenizer vocabulary; None = filled in from the tokenizer
    context_length: int | None = None  # tokens per caption; None = filled in from the tokenizer
    eot_id: int | None = None  # end-of-text id, where the caption is pooled; None = from the tokenizer
    width: int = 128  # token width (the conditioning width the diffusion U-Net cross-attends to)
    layers: int = 4  # Transformer blocks
    heads: int = 4  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width
    dropout: float = 0.0  # attention dropout
    quick_gelu: bool = False  # as in VisionConfig


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        width, scale, p = cfg.width, cfg.width ** -0.5, cfg.patch_size
        if cfg.frames == 1:  # an image tower: CLIP's layout, so published weights load
            self.conv1 = nn.Conv2d(3, width, p, stride=p, bias=False)  # weight [W, 3, p, p]
        else:  # one token per tubelet of t x p x p pixels
            t = cfg.tubelet
            self.conv1 = nn.Conv3d(3, width, (t, p, p), stride=(t, p, p), bias=False)  # weight [W, 3, t, p, p]
        n_tokens = (cfg.image_size // p) ** 2 + (cfg.pool == "cls")  # class token + spatial grid
        self.class_embedding = nn.Parameter(scale * torch.randn(width)) if cfg.pool == "cls" else None
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_tokens, width))
        # factorised positions: a clip's token at (time i, place j) gets temporal[i] + spatial[j]
        self.temporal_embedding = (nn.Parameter(scale * torch.randn(cfg.time_steps, width)) if cfg.frames > 1
                                   else None)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def _pixels(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] or clips [B, T, 3, H, W] -> what `conv1` reads: [B, 3, H, W] for an image tower,
        [B, 3, frames, H, W] for a video tower (an image becomes a still clip of `frames` copies)."""
        frames, size = self.cfg.frames, self.cfg.image_size
        if images.dim() == 5 and images.shape[1] == 1:
            images = images[:, 0]  # a one-frame clip is an image
        if images.dim() not in (4, 5) or images.shape[-3] != 3:
            raise ValueError(f"CLIP vision encoder expects images [B, 3, H, W] or clips [B, T, 3, H, W], "
                             f"got {tuple(images.shape)}")
        if images.shape[-2:] != (size, size):
            raise ValueError(f"CLIP vision encoder expects {size}x{size} images, got {tuple(images.shape[-2:])}")
        if images.dim() == 5 and images.shape[1] != frames:
            what = "an image tower (vision.frames=1) reads images" if frames == 1 else f"it reads {frames}-frame clips"
            raise ValueError(f"CLIP vision encoder got {images.shape[1]}-frame clips, but {what}")
        if self.cfg.image_mean is not None:
            mean = images.new_tensor(self.cfg.image_mean)[:, None, None]  # [3, 1, 1]
            std = images.new_tensor(self.cfg.image_std)[:, None, None]
            images = ((images + 1) / 2 - mean) / std
        if frames == 1:
            return images  # [B, 3, H, W]
        if images.dim() == 4:
            images = images[:, None].expand(-1, frames, -1, -1, -1)  # a still clip [B, T, 3, H, W]
        return images.transpose(1, 2)  # [B, 3, T, H, W], as Conv3d reads

    def positions(self) -> Tensor:
        """[1 + N, W] with a class token, else [N, W]: the image tower's positions, or for a video tower the class
        token's and temporal[i] + spatial[j] for the N = time_steps x grid tokens, time-major (as `conv1` flattens)."""
        pos = self.positional_embedding
        if self.temporal_embedding is None:
            return pos
        n_cls = int(self.class_embedding is not None)
        grid = (self.temporal_embedding[:, None] + pos[None, n_cls:]).flatten(0, 1)  # [T' * h * w, W]
        return torch.cat([pos[:n_cls], grid])

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] or clips [B, T, 3, H, W] in [-1, 1] -> unnormalised embeddings [B, E]."""
        x = self.conv1(self._pixels(images))  # [B, W, h, w] or [B, W, T', h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, N, W]
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
            x = torch.cat([cls, x], dim=1)  # [B, 1 + N, W]
        x = self.ln_pre(x + self.positions().to(x.dtype))
        x = self.transformer(x)
        pooled = x[:, 0] if self.class_embedding is not None else x.mean(dim=1)  # [B, W]
        return self.ln_post(pooled) @ self.proj.to(x.dtype)  # [B, E]


def inflate_image_weights(state: dict[str, Tensor], cfg: VisionConfig, prefix: str = "") -> dict[str, Tensor]:
    """An image tower's weights (keys `prefix` + VisionTransformer's, e.g. prefix "model.visual." in a CLIP stage
    checkpoint) -> a video tower's for `cfg`, as I3D inflates 2D filters: `conv1` [W, 3, p, p] repeated over the
    tubelet's t frames and divided by t, so a still clip's tubelets embed as the image's patches; temporal
    positions zero, so every time step starts with the image's positions. The rest is shared as it is."""
    if cfg.frames == 1:
        return dict(state)
    out = dict(state)
    weight = state[prefix + "conv1.weight"]  # [W, 3, p, p]
    if weight.dim() != 4:
        raise ValueError(f"{prefix}conv1.weight has shape {tuple(weight.shape)}: not an image tower's")
    out[prefix + "conv1.weight"] = weight[:, :, None].repeat(1, 1, cfg.tubelet, 1, 1) / cfg.tubelet
    out[prefix + "temporal_embedding"] = weight.new_zeros(cfg.time_steps, weight.shape[0])
    return out


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        missing = [k for k in ("vocab_size", "context_length", "eot_id") if getattr(cfg, k) is None]
        if missing:
            raise ValueError(f"text config needs {missing} (normally filled in from the tokenizer)")
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, L] -> (token features [B, L, W] after the final LayerNorm, unnormalised pooled [B, E]).

        Attention is causal only: every real token sits before the padding, so no real token ever sees a pad
        and a padding mask would change nothing up to the end-of-text token."""
        length = tokens.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"{length} tokens exceed the text encoder's context length {self.cfg.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [B, L, W]
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, W]
        # pool at the first end-of-text token (CLIP used argmax of ids, which only works when eot is the top id);
        # a row without one (cut by a foreign tokenizer) pools at its last position
        is_eot = tokens == self.cfg.eot_id
        pos = torch.where(is_eot.any(1), is_eot.int().argmax(1), length - 1)  # [B]
        pooled = x[torch.arange(x.shape[0], device=x.device), pos]  # [B, W]
        return x, pooled @ self.text_projection.to(x.dtype)  # [B, L, W], [B, E]


class CLIP(nn.Module):
    def __init__(self, vision: VisionConfig | None, text: TextConfig, embed_dim: int = 128,
                 init_logit_scale: float = INIT_LOGIT_SCALE, max_logit_scale: float = MAX_LOGIT_SCALE):
        """vision None: a text tower alone (an imported text encoder such as Stable Diffusion's), which conditions a
        diffusion model but embeds no image."""
        super().__init__()
        self.embed_dim, self.max_logit_scale = embed_dim, max_logit_scale
        self.visual = VisionTransformer(vision, embed_dim) if vision is not None else None
        self.text = TextTransformer(text, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def encode_image(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] or clips [B, T, 3, H, W] in [-1, 1] -> [B, E] L2-normalised (see VisionTransformer)."""
        if self.visual is None:
            raise ValueError("this CLIP is a text encoder alone (imported without its image tower): it embeds no "
                             "images, so it cannot give CLIP features, CLIP scores or a contrastive loss")
        return F.normalize(self.visual(images), dim=-1)  # [B, E]

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        features, pooled = self.text(tokens)
        return features, F.normalize(pooled, dim=-1)  # [B, L, W], [B, E]

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped at exp(max_logit_scale) even between `clamp_logit_scale_` calls."""
        return self.logit_scale.clamp(max=self.max_logit_scale).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clip the parameter itself after an optimizer step (as CLIP does), so it cannot drift above the cap."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (image embeddings [B, E], text embeddings [B, E], both L2-normalised; logit scale (scalar))."""
        return self.encode_image(images), self.encode_text(tokens)[1], self.scale()
