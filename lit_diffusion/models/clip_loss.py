"""CLIP's symmetric contrastive loss, distributed the open_clip way.

Each rank gathers every rank's embeddings *with gradient* (torch.distributed.nn.functional.all_gather) and scores
its own rows against the global batch: logits [b, W*b], label of local row i = rank * b + i. The loss on a rank is
the mean over its rows; DDP's gradient average over ranks then equals the gradient of the loss over the whole
global batch (the all-gather's backward sums every rank's gradient into the rows it came from).
All ranks must pass the same local batch size (all_gather needs equal shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gather_features(image: Tensor, text: Tensor, rank: int, world_size: int,
                    gather_with_grad: bool = True) -> tuple[Tensor, Tensor]:
    """[b, E] per rank -> [world_size * b, E], rank order."""
    import torch.distributed as dist

    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(image), dim=0), torch.cat(all_gather(text), dim=0)
    images = [torch.zeros_like(image) for _ in range(world_size)]
    texts = [torch.zeros_like(text) for _ in range(world_size)]
    dist.all_gather(images, image)
    dist.all_gather(texts, text)
    # without gradient through the gather, at least the local rows keep theirs
    images[rank], texts[rank] = image, text
    return torch.cat(images, dim=0), torch.cat(texts, dim=0)


class ClipLoss(nn.Module):
    def __init__(self, rank: int = 0, world_size: int = 1, gather_with_grad: bool = True):
        super().__init__()
        self.rank, self.world_size, self.gather_with_grad = rank, world_size, gather_with_grad

    def logits(self, image: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
        """Local rows against the global batch: (image->text [b, N], text->image [b, N]), N = world_size * b."""
        if self.world_size > 1:
            all_image, all_text = gather_features(image, text, self.rank, self.world_size, self.gather_with_grad)
        else:
            all_image, all_text = image, text
        return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T

    def forward(self, image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        """image, text: L2-normalised embeddings [b, E] of matching pairs; logit_scale: exp'd scale (scalar)."""
        # float32 logits even under bf16/fp16 autocast: a softmax over the global batch needs the precision
        with torch.autocast(device_type=image.device.type, enabled=False):
            logits_per_image, logits_per_text = self.logits(image.float(), text.float(), logit_scale.float())
        b = image.shape[0]
        labels = torch.arange(b, device=image.device) + self.rank * b  # [b]
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
