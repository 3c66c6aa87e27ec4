"""CLIP's symmetric contrastive loss, distributed the open_clip way, with optional hard negative captions.

Each rank gathers every rank's embeddings *with gradient* (torch.distributed.nn.functional.all_gather) and scores
its own rows against the global batch: logits [b, W*b], label of local row i = rank * b + i. The loss on a rank is
the mean over its rows; DDP's gradient average over ranks then equals the gradient of the loss over the whole
global batch (the all-gather's backward sums every rank's gradient into the rows it came from).
All ranks must pass the same local batch size (all_gather needs equal shapes).

Hard negatives (NegCLIP, Yuksekgonul et al. 2023): embeddings of captions made false by a word swap ("a red
circle above a blue square" -> "... below ..."), one slot per row, or K slots (one per kind of swap), with a mask
for the slots that have none. They are gathered like the texts and join every image's candidates (image -> text
only: a false caption has no image).
A CLIP trained without them scores such a pair as a coin flip: it reads captions as bags of words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gather_features(*features: Tensor, rank: int, world_size: int, gather_with_grad: bool = True) -> list[Tensor]:
    """Each [b, ...] per rank -> [world_size * b, ...], rank order."""
    import torch.distributed as dist

    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        return [torch.cat(all_gather(x), dim=0) for x in features]
    out = []
    for x in features:
        parts = [torch.zeros_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x)
        parts[rank] = x  # without gradient through the gather, at least the local rows keep theirs
        out.append(torch.cat(parts, dim=0))
    return out


class ClipLoss(nn.Module):
    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def logits(self, image: Tensor, text: Tensor, logit_scale: Tensor, negatives: Tensor | None = None,
               negative_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Local rows against the global batch: (image->text [b, N (+ N negative slots)], text->image [b, N]),
        N = world_size * b; empty negative slots score -inf."""
        local = [image, text] + ([negatives, negative_mask.to(image.dtype)] if negatives is not None else [])
        if self.world_size > 1:
            local = gather_features(*local, rank=self.rank, world_size=self.world_size,
                                    gather_with_grad=self.gather_with_grad)
        all_image, all_text = local[0], local[1]
        logits_per_image = logit_scale * image @ all_text.T
        if negatives is not None:
            all_negatives, all_mask = local[2], local[3] > 0.5
            negative_logits = (logit_scale * image @ all_negatives.T).masked_fill(~all_mask, float("-inf"))
            logits_per_image = torch.cat([logits_per_image, negative_logits], dim=1)
        return logits_per_image, logit_scale * text @ all_image.T

    def forward(self, image: Tensor, text: Tensor, logit_scale: Tensor, negatives: Tensor | None = None,
                negative_mask: Tensor | None = None) -> Tensor:
        """image, text: L2-normalised embeddings [b, E] of matching pairs; logit_scale: exp'd scale (scalar);
        negatives [b, E] and negative_mask [b] (bool), or [b, K, E] and [b, K]: optional hard negative captions,
        see the module doc."""
        if (negatives is None) != (negative_mask is None):
            raise ValueError("ClipLoss: pass negatives and negative_mask together")
        if negatives is not None and negatives.dim() == 3:  # K slots a row: every one is a candidate of every image
            negatives, negative_mask = negatives.flatten(0, 1), negative_mask.flatten(0, 1)
        # float32 logits even under bf16/fp16 autocast: a softmax over the global batch needs the precision
        with torch.autocast(device_type=image.device.type, enabled=False):
            logits_per_image, logits_per_text = self.logits(
                image.float(), text.float(), logit_scale.float(),
                None if negatives is None else negatives.float(), negative_mask)
        b = image.shape[0]
        labels = torch.arange(b, device=image.device) + self.rank * b  # [b]
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
