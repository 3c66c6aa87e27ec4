"""Exporters to published formats, the inverse of the importers in `pretrained/`: a VAE stage checkpoint as a
diffusers `AutoencoderKL` folder (`vae.py`), a CLIP stage checkpoint as a transformers `CLIPModel` folder or an
open_clip checkpoint with its model config (`clip.py`) (`lit-diffusion export --ckpt F --to diffusers|transformers|
open_clip --out DIR`).

Each exporter renames and reshapes our tensors into the target's names, writes the target's config, and refuses,
naming the field, any configuration the target's model cannot compute exactly: an exported model gives our outputs
(to float rounding) in its own library, and importing it back gives our weights bit for bit. The libraries are the
optional `pretrained` extra, imported only inside the functions that need them.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor


class ExportError(ValueError):
    """A stage checkpoint that the chosen format cannot hold exactly (the message names the field and why)."""


def save_safetensors(state: dict[str, Tensor], path: Path) -> Path:
    """Write `state` as a .safetensors file with the `format: pt` metadata that diffusers and transformers check.
    Every tensor is copied alone (contiguous, on the CPU), since safetensors refuses tensors sharing storage (the
    q, k and v chunks of one fused matrix do)."""
    from lit_diffusion.pretrained import require

    safetensors_torch = require("safetensors.torch", f"writing {path}")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_json(obj: dict, path: Path) -> Path:
    """A config file as the libraries write theirs: indented JSON, keys in the order given."""
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def prepare_folder(out: str | Path) -> Path:
    """The output folder, created; an existing file of that name is refused rather than replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: an export writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out
