"""The weights to sample and evaluate with: the EMA copy when a `WeightAveraging` callback keeps one."""

from __future__ import annotations

import contextlib
from typing import Iterator

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging


@contextlib.contextmanager
def averaged_weights(trainer: Trainer, pl_module: LightningModule) -> Iterator[LightningModule]:
    """`pl_module` holding the `WeightAveraging` callback's averaged weights inside the block, its own weights again
    after it; `pl_module` unchanged without such a callback (or outside fit, where there is no average).

    Call it between training steps (a train batch end, the train end), not during validation, where Lightning has
    swapped the weights already. Lightning has no public accessor for the averaged model, so this goes through the
    callback's public hooks, whose behaviour tests/test_ema.py pins against a closed-form EMA (a Lightning release
    that changes it fails there):
    - `on_train_batch_end` updates the average at most once per optimizer step: a callback listed before the
      averaging one calls it to take this step's update now, as the checkpoint saved at this step will have it,
      and the averaging callback's own call then changes nothing;
    - `on_validation_epoch_start` swaps the averaged and the current weights in place (no copy of the model is
      made) and `on_validation_epoch_end` swaps them back; both do nothing when there is no average.
    """
    averaging = next((cb for cb in trainer.callbacks if isinstance(cb, WeightAveraging)), None)
    if averaging is None:
        yield pl_module
        return
    if trainer.training:
        averaging.on_train_batch_end(trainer, pl_module, None, None, 0)
    averaging.on_validation_epoch_start(trainer, pl_module)
    try:
        yield pl_module
    finally:
        averaging.on_validation_epoch_end(trainer, pl_module)
