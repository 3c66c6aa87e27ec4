"""What a denoiser is conditioned on besides x_t and t: one typed object, so that a new condition (an image
embedding, frames) is a new field, not a new positional argument through every sampler and guidance function.

Both denoisers are called `net(x_t, t, cond)`; the shape of x_t ([B, C, H, W]) is the sample's own, so nothing
here fixes a size. `image_embedding` is the decoder's condition of DALL-E 2's unCLIP. `SIZE_FIELDS` is SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2), in pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

SIZE_FIELDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
TEXT_FIELDS = ("context", "mask", "pooled")  # what condition dropout drops and a negative prompt replaces
# what the unconditional branch of classifier-free guidance replaces: the text and the image embedding (unCLIP)
GUIDED_FIELDS = (*TEXT_FIELDS, "image_embedding")


@dataclass(frozen=True)
class Conditioning:
    context: Tensor | None = None  # [B, L, W] text token features (cross-attention)
    mask: Tensor | None = None  # [B, L] bool, True on real tokens (padding is hidden from attention)
    pooled: Tensor | None = None  # [B, E] pooled text embedding, added to the timestep embedding (unCLIP, SDXL)
    size: Tensor | None = None  # [B, 6] float, SIZE_FIELDS: where the training image came from (SDXL sec. 2.2)
    # [B, E] a CLIP image embedding, L2-normalised (unCLIP's decoder, DALL-E 2 sec. 2.1); a zero row means "no image
    # embedding" (condition dropout, guidance's unconditional branch): CLIP's embeddings have norm one
    image_embedding: Tensor | None = None

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @property
    def batch_size(self) -> int | None:
        return next((t.shape[0] for t in self.tensors().values()), None)

    def replace(self, **changes) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """Every present tensor through `fn` (device moves, dtype casts, expanding a batch of one)."""
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def expand(self, batch: int) -> Conditioning:
        """A batch of one broadcast to `batch` (one negative prompt for a whole grid); other batches as they are."""
        if self.batch_size != 1 or batch == 1:
            return self
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))


def size_condition(batch: int, height: int, width: int, device=None) -> Tensor:
    """Sampling's default size condition [B, 6]: the original is the target, nothing cropped (SDXL's choice)."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
    return row.expand(batch, 6)
