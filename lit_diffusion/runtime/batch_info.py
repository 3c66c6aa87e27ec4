"""Batch sizes in the open, and opt-in linear learning-rate scaling by the global batch.

`data.batch_size` is per device. What one optimizer step sees is the global batch:
    global_batch_size = batch_size_per_device x world size (devices x nodes) x accumulate_grad_batches
so the same config on 1 and on 8 GPUs trains with batches 8x apart. At fit start this callback logs both numbers
(as metrics at the starting step and as hyperparameters), and with `scale_lr` multiplies every learning rate by
global_batch_size / reference_batch_size (the linear scaling rule, Goyal et al. 2017, "Accurate, Large Minibatch
SGD"); the warm-up the stages already have is what makes that rule work.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def batch_size_per_device(trainer) -> int | None:
    dm = getattr(trainer, "datamodule", None)
    size = getattr(dm, "batch_size", None)
    return int(size) if isinstance(size, int) else None


def scale_learning_rates(trainer, factor: float) -> None:
    """Multiply the learning rates of all optimizers and the base rates their schedulers scale from."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * factor
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if hasattr(scheduler, "base_lrs"):  # LambdaLR and friends: lr = base_lr x schedule(step)
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [lr * factor for lr in scheduler._last_lr]


class BatchInfo(L.Callback):
    def __init__(self, scale_lr: bool = False, reference_batch_size: int | None = None):
        """
        Args:
            scale_lr: multiply every learning rate by global_batch_size / reference_batch_size once, at fit start.
                Off by default: the configured lr is used as it is, whatever the world size.
            reference_batch_size: the global batch the configured lr was tuned for. None: the per-device batch
                size, i.e. the config was tuned on one device without accumulation, and the factor is
                world size x accumulate_grad_batches.
        """
        if reference_batch_size is not None and reference_batch_size < 1:
            raise ValueError(f"BatchInfo: reference_batch_size must be >= 1, got {reference_batch_size}")
        self.scale_lr, self.reference_batch_size = scale_lr, reference_batch_size
        self.info: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        # after the optimizers exist and before a resumed run restores their state (which then keeps its own rates)
        per_device = batch_size_per_device(trainer)
        if per_device is None:
            rank_zero_warn("BatchInfo: the DataModule has no integer `batch_size`; global batch size not logged, "
                           "learning rate not scaled")
            return
        accumulate = int(trainer.accumulate_grad_batches)
        global_batch = per_device * trainer.world_size * accumulate
        reference = self.reference_batch_size or per_device
        factor = global_batch / reference if self.scale_lr else 1.0
        self.info = {"data/batch_size_per_device": per_device, "data/world_size": trainer.world_size,
                     "data/accumulate_grad_batches": accumulate, "data/global_batch_size": global_batch,
                     "optim/lr_scale": factor}
        if factor != 1.0:
            scale_learning_rates(trainer, factor)
        rank_zero_info(
            f"batch size {per_device} per device x {trainer.world_size} processes x {accumulate} accumulated = "
            f"global batch {global_batch}; learning rate "
            + (f"scaled x{factor:g} (global batch / reference {reference})" if self.scale_lr else "not scaled"))
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_hyperparams(dict(self.info))
                lg.log_metrics(dict(self.info), step=trainer.global_step)
