"""What every stage shares: reading stage checkpoints safely, the optimizer with warm-up."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A stage checkpoint that is missing, unreadable, unsafe or of the wrong kind."""


def stage_block(kind: str, **fields: Any) -> dict:
    """The `checkpoint["lit_diffusion"]` block every stage writes in `on_save_checkpoint`."""
    return {"kind": kind, "version": CHECKPOINT_VERSION, **fields}


def load_stage_checkpoint(path: str | Path, kind: str) -> dict:
    """Load a stage checkpoint with `weights_only=True` and check that it is a `kind` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for unsafe globals, RuntimeError for corrupt zips
        raise CheckpointError(
            f"cannot load {kind} checkpoint {path} safely (weights_only=True): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    block = ckpt.get("lit_diffusion") if isinstance(ckpt, dict) else None
    if not isinstance(block, dict) or "kind" not in block:
        raise CheckpointError(f"{path} is not a lit_diffusion stage checkpoint (no 'lit_diffusion' block)")
    if block["kind"] != kind:
        raise CheckpointError(f"{path} is a {block['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    if block.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} was written by a newer lit_diffusion (version {block['version']})")
    return ckpt


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio` (constant if no total)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_warmup(module: torch.nn.Module, params, lr: float, weight_decay: float, betas: tuple[float, float],
                      warmup_steps: int, fused: bool | None = None) -> dict:
    """AdamW (no decay on biases, norms and embeddings' 1-d params) with a per-step warm-up/cosine schedule.

    The schedule length is the trainer's `estimated_stepping_batches`, so it follows `max_steps`/`max_epochs`.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    if fused is None:
        fused = bool(decay) and decay[0].is_cuda
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=betas, fused=fused,
    )
    total = None
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        est = trainer.estimated_stepping_batches
        total = int(est) if est is not None and math.isfinite(est) else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
