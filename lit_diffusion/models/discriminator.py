"""PatchGAN discriminator (Isola et al. 2017, pix2pix) and the hinge GAN losses used by the VAE stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchGAN(nn.Module):
    """Maps images [B,3,H,W] to a grid of real/fake logits [B,1,h,w], one per overlapping patch.

    GroupNorm instead of pix2pix's BatchNorm: no running statistics to keep in sync across DDP ranks and no
    train/eval difference, so the logits do not depend on the batch they come in.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, norm_groups: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1  # the last hidden layer keeps resolution, as in pix2pix
            layers += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(norm_groups, out), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
