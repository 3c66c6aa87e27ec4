"""Feature backends for FID: images float [B, 3, H, W] in [0, 1] -> features [B, D].

`InceptionFeatures` is torch-fidelity's TF-compatible InceptionV3 (2048-d pool features), fed exactly the uint8
images torch-fidelity would read from PNG files, so in-loop FID equals `torch_fidelity.calculate_metrics` on the
saved images. `CLIPFeatures` uses a trained CLIP image tower instead: the only choice with no download at all.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from lit_diffusion.data.latents import state_dict_hash

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
BACKENDS = ("inception", "clip")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 the way `torchvision.utils.save_image` writes PNGs (round half up, clamp)."""
    if images.dtype == torch.uint8:
        return images
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def default_inception_path() -> Path:
    """Where torch-fidelity's own download would put the weights (torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)


def _inception_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def _missing_weights_error(path: Path | None) -> FileNotFoundError:
    where = (f"not found at {path}" if path is not None
             else f"not given and not in the torch hub cache ({default_inception_path()})")
    return FileNotFoundError(
        f"InceptionV3 weights for FID (pt_inception-2015-12-05) {where}. Download them once with\n"
        f"  wget {INCEPTION_URL} -O {default_inception_path()}\n"
        "(or pass weights_path=<file> / download=True), or choose the feature backend 'clip', which needs no download."
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    num_features = 2048

    def __init__(self, weights_path: str | Path | None = None, download: bool = False):
        super().__init__()
        path = Path(weights_path) if weights_path is not None else default_inception_path()
        if not path.is_file():
            if weights_path is not None or not download:
                raise _missing_weights_error(Path(weights_path) if weights_path is not None else None)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(INCEPTION_URL, str(path))
            except Exception as err:
                raise _missing_weights_error(None) from err
        try:
            # torch-fidelity unpickles with weights_only=False; refuse anything that is not plain tensors first
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"cannot read InceptionV3 weights {path} with weights_only=True: {err}") from err
        self.weights_path = path
        self.net = _inception_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        self._sha = None

    @property
    def identity(self) -> str:
        """Names these exact weights, for keys of cached real statistics."""
        if self._sha is None:
            self._sha = file_sha256(self.weights_path)
        return f"inception-{self._sha[:16]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torch-fidelity resizes to 299 (TF1-style bilinear) and normalises inside its forward
        (features,) = self.net(to_uint8(images))  # [B, 2048]
        return features


class CLIPFeatures(nn.Module):
    def __init__(self, clip_module, num_features: int | None = None, image_size: int = 32):
        super().__init__()
        if not callable(getattr(clip_module, "encode_image", None)):
            raise TypeError(
                f"CLIP feature backend needs an object with encode_image(), got {type(clip_module).__name__}"
            )
        self.clip = clip_module
        if num_features is None:
            num_features = getattr(clip_module, "embed_dim", None)
        if num_features is None:
            size = getattr(clip_module, "image_size", image_size)
            with torch.no_grad():
                num_features = int(self.forward(torch.zeros(1, 3, size, size, device=self._device())).shape[-1])
        self.num_features = int(num_features)
        self._sha = None

    def _device(self) -> torch.device:
        param = next(iter(self.clip.parameters()), None) if isinstance(self.clip, nn.Module) else None
        return param.device if param is not None else torch.device("cpu")

    @property
    def identity(self) -> str:
        if self._sha is None:
            self._sha = state_dict_hash(self.clip.state_dict()) if isinstance(self.clip, nn.Module) else type(self.clip).__name__
        return f"clip-{self._sha[:16]}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images * 2 - 1)  # [B, E]


def make_extractor(
    backend: str, weights_path: str | Path | None = None, clip=None, download: bool = False
) -> nn.Module:
    if backend == "inception":
        return InceptionFeatures(weights_path, download=download)
    if backend == "clip":
        if clip is None:
            raise ValueError(
                "feature backend 'clip' needs a CLIP module (clip=...), e.g. CLIPModule.from_checkpoint(path)"
            )
        return CLIPFeatures(clip)
    raise ValueError(f"unknown FID feature backend {backend!r}; choose one of {BACKENDS}")


class _RandomInceptionV3:
    """Builds torch-fidelity's InceptionV3 without weights (its constructor insists on loading some)."""

    @staticmethod
    def build():
        base = _inception_class()

        class Unloaded(base):
            def load_state_dict(self, state_dict, strict=True, assign=False):
                if not state_dict:  # the empty placeholder below
                    return None
                return super().load_state_dict(state_dict, strict=strict, assign=assign)

        with tempfile.TemporaryDirectory() as tmp:
            empty = os.path.join(tmp, "empty.pt")
            torch.save({}, empty)
            return Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """A randomly initialised InceptionV3 weights file, for tests and offline smoke runs (FID values meaningless).

    Convolutions get He init so that activations keep their scale through the 90 layers (the default init shrinks
    the 2048-d features to ~1e-8, where FID would be all round-off).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _RandomInceptionV3.build()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
