"""The weights to sample and evaluate with: the EMA copy when a `WeightAveraging` callback keeps one."""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import torch

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging as _LightningEMA
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMAWeightAveraging(_LightningEMA):
    """Lightning's `EMAWeightAveraging` (same arguments, same schedule of updates), its update written as torch's
    `lerp`, W += (1 - decay) * (w - W), instead of decay * W + (1 - decay) * w. The two agree up to rounding on
    trained weights; on weights that do not change (the frozen CLIP and VAE inside the diffusion stage, which
    `AveragedModel` copies with the rest) lerp leaves the average bit-identical to them, where the product form
    drifts by about ulp / (1 - decay) (tests/test_ema.py). The configs name this class.

    Until its first update (`update_starting_at_step`, `update_starting_at_epoch`) the average follows the trained
    weights, as diffusers' `EMAModel` does before `update_after_step` (its decay is 0 there). Lightning's average is
    the initial weights until then: every grid, in-loop evaluation, validation and checkpoint before the first
    update would show the untrained model, and a run shorter than the start step would end as its initial
    weights."""

    def __init__(self, *args, decay: float = 0.999, **kwargs):
        super().__init__(*args, decay=decay, **kwargs)
        self._kwargs.pop("avg_fn")  # AveragedModel takes one of the two
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)
        self._raw_at_end: dict | None = None
        self._updated = False  # the average has had its first update (read from n_averaged once, a device sync)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._raw_at_end, self._updated = None, False
        super().on_train_start(trainer, pl_module)
        self._follow_until_first_update(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._follow_until_first_update(pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._follow_until_first_update(pl_module)

    @torch.no_grad()
    def _follow_until_first_update(self, pl_module: LightningModule) -> None:
        average = self._average_model
        if average is None or self._updated:
            return
        if int(average.n_averaged) > 0:
            self._updated = True
            return
        # the first update copies the weights (n_averaged 0), so following them until then changes nothing after it
        for mine, theirs in zip(itertools.chain(average.module.parameters(), average.module.buffers()),
                                itertools.chain(pl_module.parameters(), pl_module.buffers())):
            mine.copy_(theirs)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning copies the average into the module here, before the checkpoint callbacks (always last) write
        # the final last.ckpt: its `current_model_state` would then be the average, and a run resumed from it to
        # more steps would go on from the EMA weights with the raw weights' optimizer state. Keep the raw ones.
        self._raw_at_end = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._raw_at_end is not None and "current_model_state" in checkpoint:
            checkpoint["current_model_state"] = self._raw_at_end


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
        take_this_steps_update(trainer, pl_module)
    averaging.on_validation_epoch_start(trainer, pl_module)
    try:
        yield pl_module
    finally:
        averaging.on_validation_epoch_end(trainer, pl_module)


def take_this_steps_update(trainer: Trainer, pl_module: LightningModule) -> None:
    """Give the `WeightAveraging` callback this optimizer step's update now, for a callback listed before it that
    reads or saves the average at this batch end (`averaged_weights`, the pre-emption checkpoint of
    `runtime.safety.SignalCheckpoint`): the average then holds what the checkpoint at this step would hold, and the
    averaging callback's own call changes nothing (at most one update per step). Nothing without such a callback."""
    for averaging in trainer.callbacks:
        if isinstance(averaging, WeightAveraging):
            averaging.on_train_batch_end(trainer, pl_module, None, None, 0)
