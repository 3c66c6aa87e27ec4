"""The step cadence of the callbacks that draw or evaluate every N optimizer steps."""

from __future__ import annotations

import lightning as L


class EveryNSteps(L.Callback):
    """A callback due (`due`) at the end of a training batch whose optimizer step made `trainer.global_step` a
    multiple of `every_n_steps` (0: never).

    With `accumulate_grad_batches` = N, the N micro-batches of one optimizer step end at the same global_step: a
    cadence read from global_step alone was due at step 0, before any step: a grid and a whole in-loop evaluation
    of the untrained model. Only the batch that took the step counts here."""

    every_n_steps: int = 0
    _step_at_batch_start: int = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def due(self, trainer) -> bool:
        step = trainer.global_step
        return bool(self.every_n_steps) and step > self._step_at_batch_start and step % self.every_n_steps == 0
