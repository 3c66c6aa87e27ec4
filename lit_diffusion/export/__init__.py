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


def check_new_folder(out: str | Path, label: str = "") -> Path:
    """An export's folder must be new or empty: an existing file of that name, or a folder holding files (another
    export's config, a user's README.md), is refused rather than replaced. `label` (e.g. "--out") starts the
    message."""
    out = Path(out)
    named = f"{label} {out}" if label else str(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{named} is a file: an export writes a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        raise ExportError(f"{named} already holds {', '.join(held[:5])}{' ...' if len(held) > 5 else ''}: give an "
                          "empty or new folder")
    return out


def prepare_folder(out: str | Path) -> Path:
    """The output folder, checked (`check_new_folder`) and created."""
    out = check_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
