"""Reading published weight files safely, and filling every parameter of one of our modules from them."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from lit_diffusion.pretrained import require


class PretrainedError(ValueError):
    """A weight file or folder that cannot be imported: unreadable, unsafe, of another architecture, incomplete."""


def _is_torchscript(path: Path) -> bool:
    # OpenAI's CLIP files (ViT-B-32.pt, ...) are TorchScript archives: a zip with a code/ folder
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.split("/", 2)[1:2] == ["code"] for name in zf.namelist())


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, a PyTorch pickle (`.ckpt`, `.pt`, `.bin`; read with weights_only=True,
    so a pickle that would run code is refused) or a TorchScript archive (OpenAI's CLIP files). Lightning and LDM
    checkpoints keep their tensors under `state_dict`, which is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"weight file not found: {path}")
    if path.suffix == ".safetensors":
        safetensors = require("safetensors.torch", f"reading {path}")
        try:
            return dict(safetensors.load_file(str(path), device="cpu"))
        except Exception as err:
            raise PretrainedError(f"{path} is not a readable safetensors file: {err}") from err
    if _is_torchscript(path):
        # TorchScript holds its program as TorchScript, not as Python pickles, so loading it runs no Python code
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as err:
            raise PretrainedError(f"{path} is not a readable TorchScript archive: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError names the global it refused
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PretrainedError(f"refusing to load {path}: it is not a plain tensor file that torch.load(..., "
                              f"weights_only=True) can read ({first}); convert it to .safetensors, or load it "
                              f"yourself if you trust it and save its state_dict") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def load_exactly(module: nn.Module, state: Mapping[str, Tensor], source: str, prefix: str = "") -> None:
    """Load `state` into `module` only if it fills every parameter and buffer of it (under `prefix`) with a tensor
    of the right shape and nothing is left over: no weight stays at random initialisation unnoticed."""
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    missing = [k for k in own if k not in state]
    if missing:
        raise PretrainedError(f"{source}: no weights for {missing[0]} (and {len(missing) - 1} more): the file "
                              f"does not hold this architecture")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise PretrainedError(f"{source}: unexpected weight {unexpected[0]} (and {len(unexpected) - 1} more): "
                              f"the file holds a different architecture")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise PretrainedError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected "
                                  f"{tuple(value.shape)}")
    module.load_state_dict({**module.state_dict(), **{k: v.to(own[k].dtype) for k, v in state.items()}})


def save_stage_checkpoint(module, out: str | Path, source: str) -> Path:
    """Write `module` (a CLIPModule or VAEModule) as the stage checkpoint Lightning would save for it, plus where
    its weights came from. Plain tensors and Python only: it loads with torch.load(weights_only=True)."""
    ckpt = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
            "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    ckpt["lit_diffusion"]["imported_from"] = str(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(out)
    return out
