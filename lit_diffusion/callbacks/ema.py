"""The weights to sample and evaluate with: the EMA copy when a `WeightAveraging` callback keeps one."""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging


def averaged_module(trainer, pl_module):
    """The `WeightAveraging` callback's copy of the whole LightningModule (averaged weights), else `pl_module`."""
    for cb in trainer.callbacks:
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            if trainer.training:  # a callback listed before it runs first: take this step's update now (once per
                cb.on_train_batch_end(trainer, pl_module, None, None, 0)  # step), as the saved checkpoint will have it
            return cb._average_model.module
    return pl_module
