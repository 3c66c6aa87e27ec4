"""LPIPS-like perceptual distance on frozen VGG16 features (Zhang et al. 2018), from a local weights file.

Nothing is downloaded: `weights_path` must hold a torchvision VGG16 state dict (the full model's or just
`features.*`). Without LPIPS's learned per-channel weights every channel counts equally, which is the
"baseline" variant of the paper: unit-normalise each layer's features over channels, squared difference,
spatial mean, summed over channels and layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# indices just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features
_VGG16_TAPS = (4, 9, 16, 23, 30)


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # VGG16's conv trunk, without the 100M-param head

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual_weights: VGG16 weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        features = make_layers(cfgs["D"])[: _VGG16_TAPS[-1]]
        missing, unexpected = features.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"perceptual_weights {path} is not a VGG16 state dict (missing {missing[:3]}...)")
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("shift", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature network: always in eval mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1) / 2 - self.shift) / self.scale  # [-1,1] -> ImageNet-normalised
        out = []
        for i, layer in enumerate(self.features, start=1):
            h = layer(h)
            if i in _VGG16_TAPS:
                out.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B] between images x and y in [-1, 1]."""
        return sum((a - b).pow(2).sum(1).mean((1, 2)) for a, b in zip(self._taps(x), self._taps(y)))
