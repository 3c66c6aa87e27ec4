"""Importers of published weights into our own models: Stable Diffusion's / diffusers' VAE (`vae.py`) and
OpenAI / open_clip / Hugging Face CLIP (`clip.py`), each written as a stage checkpoint that every other part
accepts (`lit-diffusion import vae|clip SOURCE --out stage.ckpt`).

The conversions rename and reshape tensors into `models/` (plain nn.Modules with options that match the published
architectures), so one family of models runs, trains and is read. The libraries of the published formats
(diffusers, transformers, open_clip, safetensors) are an optional extra, imported only here and only when used.
"""

from __future__ import annotations

import importlib

EXTRA_HINT = 'pip install -e ".[pretrained]"'


def require(module: str, why: str):
    """Import an optional dependency, or say which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{why} needs the package {module!r}, which is not installed: {EXTRA_HINT}") from err
