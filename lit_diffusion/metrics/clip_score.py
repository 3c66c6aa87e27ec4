"""CLIP score (Hessel et al. 2021, as torchmetrics defines it): 100 * max(cos(image, text), 0), mean over samples.

Fed embeddings rather than images and strings, so it works with our own CLIP (trained in stage 1) and costs
nothing when the caller already has the embeddings. torchmetrics' code clamps the mean instead of each sample;
the two agree whenever all cosines are >= 0, and the per-sample clamp is the paper's definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def clip_score_per_sample(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"CLIP score needs image and text embeddings of equal shape [B, E], got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    cos = (F.normalize(image_emb.double(), dim=-1) * F.normalize(text_emb.double(), dim=-1)).sum(-1)  # [B]
    return 100 * cos.clamp(min=0)


class CLIPScore(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_emb: Tensor, text_emb: Tensor) -> None:
        scores = clip_score_per_sample(image_emb, text_emb)  # [B]
        self.score_sum = self.score_sum + scores.sum()
        self.n = self.n + scores.numel()

    def compute(self) -> Tensor:
        if int(self.n) == 0:
            raise ValueError("CLIPScore.compute() before any update()")
        return self.score_sum / self.n


@torch.no_grad()
def clip_embeddings(clip_module, images01: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(image [B, E], text [B, E]) embeddings from any object with encode_image / encode_text (our CLIPModule)."""
    image_emb = clip_module.encode_image(images01 * 2 - 1)  # the CLIP tower reads [-1, 1]
    text_out = clip_module.encode_text(tokens)
    text_emb = text_out[1] if isinstance(text_out, (tuple, list)) else text_out  # (token_features, pooled)
    return image_emb, text_emb


def clip_score(clip_module, images01: Tensor, tokens: Tensor) -> Tensor:
    """Mean CLIP score of a batch: images [B, 3, H, W] in [0, 1], tokens [B, L] for their captions."""
    return clip_score_per_sample(*clip_embeddings(clip_module, images01, tokens)).mean()
