"""Deterministic stand-ins for the frozen encoders that `encode_shards` runs (importable by spawned processes):
functions of the image and caption whose outputs a test can recompute."""

import torch
import torch.nn.functional as F

WIDTH, POOLED = 8, 6


def fake_encode_images(images: torch.Tensor) -> torch.Tensor:
    """images [B,3,S,S] in [-1,1] -> 4x4 average pool [B,3,S/4,S/4]."""
    return F.avg_pool2d(images, 4)


def fake_encode_images_with_std(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = fake_encode_images(images)
    return mean, mean.abs() + 0.25


def fake_encode_captions(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per word (plus one): token j of a caption is f(word length, j); padding is garbage, masked."""
    words = [c.split() for c in captions]
    length = max(len(w) for w in words) + 1 + 3  # 3 padding tokens past the longest, to prove they are dropped
    context = torch.full((len(captions), length, WIDTH), 99.0)  # [B, L, W]
    mask = torch.zeros(len(captions), length, dtype=torch.bool)
    for i, ws in enumerate(words):
        for j, w in enumerate(ws + ["<eot>"]):
            context[i, j] = len(w) + 0.1 * j + 0.01 * torch.arange(WIDTH)
            mask[i, j] = True
    pooled = torch.stack([torch.tensor([len(c), len(ws), 1.5, -2.0, 0.125, 3.0]) for c, ws in zip(captions, words)])
    return context, mask, pooled
