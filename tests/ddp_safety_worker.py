"""One rank of the 2-process gloo runs in test_reliability_ddp.py (started by that test, not collected by pytest).

A tiny regression model trains under DDP with the safety callbacks the CLI adds (LastCheckpoint, SignalCheckpoint,
NonFiniteGuard, AtomicCheckpointIO). One rank sends itself a signal or computes a non-finite loss at a given step;
every rank writes what it did to OUT/rank{R}.json before it exits: the steps it trained, the steps its checkpoint
writes held, the exception it stopped with, and its weights around the bad step.

usage: python ddp_safety_worker.py OUT '{"signal": "SIGTERM", "rank": 1, "step": 3, "when": "before_check"}'
"""

import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lit_diffusion.runtime.safety import AtomicCheckpointIO, LastCheckpoint, NonFiniteGuard, SignalCheckpoint


class Tiny(L.LightningModule):
    def __init__(self, nan_rank: int = -1, nan_step: int = -1, steps_per_epoch: int = 8):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.nan_rank, self.nan_step, self.steps_per_epoch = nan_rank, nan_step, steps_per_epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.global_rank == self.nan_rank and self.global_step == self.nan_step:
            loss = loss * float("nan")  # this rank only: the other rank's loss is finite
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def _loader(self, n: int) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)

    def train_dataloader(self):
        return self._loader(2 * 2 * self.steps_per_epoch)  # 2 ranks x batch 2

    def val_dataloader(self):
        return self._loader(16)


class Record(L.Callback):
    """What this rank did; `when` = where in the step the signal is sent."""

    def __init__(self, signum: int | None, rank: int, step: int, when: str):
        self.signum, self.rank, self.step, self.when = signum, rank, step, when
        self.trained: list[int] = []
        self.weights: dict[int, list[float]] = {}

    def _send(self, trainer, *when: str) -> None:
        if self.when in when and trainer.global_rank == self.rank and trainer.global_step == self.step and self.signum:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trained.append(trainer.global_step)
        self.weights[trainer.global_step] = pl_module.net.weight.flatten().tolist()
        self._send(trainer, "mid_step")  # lands before the optimizer step of `step`: acted on at its end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = pl_module.net.weight.flatten().tolist()
        self._send(trainer, "before_check", "after_check")  # this callback's place in the list decides which

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 1:
            self._send(trainer, "validation")


class SpyIO(AtomicCheckpointIO):
    saved: list[int] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        SpyIO.saved.append(int(checkpoint["global_step"]))
        return super().save_checkpoint(checkpoint, path, storage_options)


def main(out: Path, scenario: dict) -> None:
    rank = int(os.environ["LOCAL_RANK"])
    signum = signal.Signals[scenario["signal"]] if scenario.get("signal") else None
    record = Record(signum, scenario.get("rank", 1), scenario.get("step", -1), scenario.get("when", "before_check"))
    guard = NonFiniteGuard(scenario.get("nonfinite", "stop"))
    safety = [SignalCheckpoint(), guard,
              LastCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0,
                             every_n_train_steps=1000)]  # no periodic checkpoint: only the signal's
    # the recorder runs before or after SignalCheckpoint's batch-end check, as `when` asks
    callbacks = [*safety, record] if scenario.get("when") == "after_check" else [record, *safety]
    module = Tiny(nan_rank=scenario.get("nan_rank", -1), nan_step=scenario.get("nan_step", -1))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=60)),
                        max_steps=scenario.get("max_steps", 12), logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=4,
                        limit_val_batches=4, default_root_dir=str(out), plugins=[SpyIO()], callbacks=callbacks)
    result = {"rank": rank, "error": None, "code": None}
    try:
        trainer.fit(module)
    except BaseException as e:
        result.update(error=type(e).__name__, message=str(e),
                      code=e.code if isinstance(e, SystemExit) else None)
        raise
    finally:
        result.update(global_step=trainer.global_step, trained=record.trained, saved=SpyIO.saved,
                      weights={str(k): v for k, v in record.weights.items()}, skips=guard.skips)
        (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), json.loads(sys.argv[2]))
        status = 0
    except SystemExit as e:  # SignalExit: 128 + signum
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    # torch 2.14's gloo process group and TCPStore can abort a process at interpreter exit while a peer still holds
    # its connection ("terminate called without an active exception", SIGABRT; Lightning destroys the process
    # group at exit for NCCL only): measured on 4 of 16 runs of this worker on a loaded machine, after a normal
    # end of training too, and in a torch-only script. The status under test is the one training ended with.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
