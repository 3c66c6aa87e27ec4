"""The weights to sample and evaluate with: the EMA copy when a `WeightAveraging` callback keeps one."""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging


def averaged_module(trainer, pl_module):
    """The `WeightAveraging` callback's copy of the whole LightningModule (averaged weights), else `pl_module`."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb._average_model.module
    return pl_module
