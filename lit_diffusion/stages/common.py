"""The optimizer every stage trains with: AdamW with a linear warm-up and cosine decay."""

from __future__ import annotations

import contextlib

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `min_ratio` (constant if no total)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_with_warmup(module: torch.nn.Module, params, lr: float, weight_decay: float, betas: tuple[float, float],
                      warmup_steps: int, fused: bool | None = None, decay_ids: set[int] | None = None) -> dict:
    """AdamW (no decay on biases, norms and embeddings' 1-d params) with a per-step warm-up/cosine schedule.

    The schedule length is the trainer's `estimated_stepping_batches`, so it follows `max_steps`/`max_epochs`.
    `decay_ids`: the ids of the parameters that decay, when their shapes no longer tell (FSDP1 with use_orig_params
    shows every parameter as a flat 1-d shard); default: those with 2 or more dimensions.
    """
    params = [p for p in params if p.requires_grad]
    decays = (lambda p: id(p) in decay_ids) if decay_ids is not None else (lambda p: p.ndim >= 2)
    decay = [p for p in params if decays(p)]
    no_decay = [p for p in params if not decays(p)]
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


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside the block (sampling), in the mode it had after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
