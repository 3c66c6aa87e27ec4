"""Training that survives: atomic checkpoint files, a last.ckpt that always holds the latest step, a checkpoint
on SIGTERM/SIGUSR1 before exit, and a guard that never lets a NaN/inf loss update the weights.

`LitDiffusionCLI` adds all of these by default (see `default_callbacks`); plain `Trainer` users add them by hand:
    Trainer(plugins=[AtomicCheckpointIO()], callbacks=[LastCheckpoint(...), SignalCheckpoint(), NonFiniteGuard()])
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_diffusion.callbacks.ema import take_this_steps_update
from lit_diffusion.runtime.rng import TrainingRNG

log = logging.getLogger("lit_diffusion")


# ----------------------------------------------------------------------------------------------- atomic files
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temporary file in its own directory, fsyncs it, then `os.replace`s it over
    the target, so a kill or a full disk mid-save leaves the previous file whole.

    Lightning's own save serialises to memory first but then writes through an fsspec transaction whose temporary
    file lives in the system temp dir; moving it into a run dir on another filesystem is a copy, which a kill can
    cut short. Remote paths (s3://, gs://, ...) keep Lightning's behaviour: object stores replace whole objects.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        # os.open with 0o666 honours the umask, like a plain open() (mkstemp would make it owner-only)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # the rename itself survives a power cut only once the directory is synced
        _remove_orphans(path)


def _remove_orphans(path: Path) -> None:
    """Delete temporary files for `path` left by writers that were killed mid-save (SIGKILL, OOM): their pid,
    part of the name, no longer runs. Each is checkpoint-sized, and a resumed run would otherwise keep them."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, owned by another user
            pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- last.ckpt cadence
class LastCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose `last.ckpt` holds the state at the end of training.

    With `every_n_train_steps=N`, Lightning writes last.ckpt every N steps but not at the end of training unless no
    checkpoint was written at all, so a run whose max_steps is not a multiple of N would finish with a stale
    last.ckpt (and the pipeline copies last.ckpt as the stage's result); and when the last step is a multiple of
    N, last.ckpt is written before that step's validation, which is where the VAE measures its latent scale.

    It is always `last.ckpt`: Lightning's version counter would write `last-v1.ckpt` beside it when a resumed run's
    directory has moved (the checkpoint remembers its old path), and the pipeline would then finish with the stale
    `last.ckpt`.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before = (self._last_checkpoint_saved, self._last_global_step_saved)
        super().on_train_end(trainer, pl_module)
        if (self._last_checkpoint_saved, self._last_global_step_saved) != before:
            return  # Lightning just wrote it
        from lightning.pytorch.trainer.states import TrainerFn

        if self.save_last and not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def save_last(trainer: Trainer) -> str:
    """Write last.ckpt now through the trainer's ModelCheckpoint that keeps one (every rank must call this);
    returns its path. Without such a callback: `default_root_dir/checkpoints/last.ckpt`."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            return cb.last_model_path
    path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
    trainer.save_checkpoint(path)
    return path


def last_checkpoint(trainer: Trainer) -> str | None:
    """Path of the newest last.ckpt the trainer's checkpoint callbacks wrote or resumed from, if it exists."""
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path and get_filesystem(path).exists(path):
            return str(path)
    return str(trainer.ckpt_path) if trainer.ckpt_path else None


# ------------------------------------------------------------------------------------------------------ signals
class SignalExit(SystemExit):
    """Raised after the pre-emption checkpoint is written; exit status 128 + signal number, as for a process the
    signal killed, so a pipeline or scheduler never mistakes the interrupted run for a finished one."""

    def __init__(self, signum: int, path: str):
        super().__init__(128 + int(signum))
        self.signum, self.path = int(signum), path


class SignalCheckpoint(Callback):
    """On SIGTERM or SIGUSR1 (SLURM pre-emption, `scancel --signal=USR1@90`), write last.ckpt at the end of the
    current training batch and exit with status 128 + signum.

    The handler only sets a flag; the checkpoint is written between steps, where the state is consistent. Under
    DDP the signal may reach one rank only (a node's processes, one of several launchers), so the decision is
    collective: at every training batch end each rank contributes its signal number (0: none) to one max reduce
    (`max_over_ranks`), and all ranks save (rank 0 writes the file) and exit at the same step, each with status
    128 + the largest signal number any rank received. A signal that lands after that check is acted on at the
    next training batch end (one step later at most); one during validation or the sanity check, at the first batch
    end after it.

    Lightning 2.6 on SIGTERM sets `trainer.received_sigterm` and raises `SIGTERMException` (exit status 0, no
    checkpoint) on the rank that got it, at its next batch end or between validation batches; and its handler runs
    a `broadcast` inside the signal handler, on that rank only. Under DDP either leaves the other ranks waiting in
    a collective that never comes (measured: a gloo timeout instead of a checkpoint), so with more than one rank
    Lightning's handlers are not called from ours (nor is its SLURM auto-requeue on SIGUSR1, which saves from
    inside the handler); handlers installed before the Trainer still are. (Ours is installed from the sanity check
    on; a signal during the Trainer's setup still meets Lightning's.) A single process keeps Lightning's
    handlers: a SIGTERM after this check then ends the same batch through `SIGTERMException`, which `on_exception`
    turns into a checkpoint and our exit status.
    """

    def __init__(self, signals: Sequence[str | int] = ("SIGTERM", "SIGUSR1")):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: int | None = None
        self._before_trainer: dict[int, Any] = {}  # the handlers installed before fit (the user's)
        self._previous: dict[int, Any] = {}  # what we replaced (Lightning's, which chain to the user's)
        self._chain: dict[int, Any] = {}  # what our handler calls after setting the flag

    def _handler(self, signum, frame) -> None:
        self.received = signum
        chained = self._chain.get(signum)
        if callable(chained):
            chained(signum, frame)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # before the Trainer registers its own handlers (fit's setup hook runs first)
        self._before_trainer = {sig: signal.getsignal(sig) for sig in self.signals}

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)  # a signal during the sanity check is acted on at the first training batch end

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def _install(self, trainer: Trainer) -> None:
        # after Lightning registered its handlers (so it does not restore ours as "original" at teardown)
        if self._previous:
            return  # installed at the sanity check
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("SignalCheckpoint: not in the main thread, no signal handlers installed")
            return
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            self._chain[sig] = self._previous[sig] if trainer.world_size == 1 else self._before_trainer.get(sig)
            signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous, self._chain = {}, {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
        # Single process: a SIGTERM that lands after this callback's batch-end check but before Lightning's own
        # (the end of the same batch) reaches us as Lightning's SIGTERMException, raised between steps: the state is
        # consistent, so write the checkpoint here and give the exception our exit status instead of 0. (Under DDP
        # Lightning never learns of the signal, see the class docstring; a save here could wait for absent ranks.)
        if isinstance(exception, SIGTERMException) and not isinstance(exception, SignalExit) \
                and trainer.training and not trainer.sanity_checking:
            signum = self.received if self.received is not None else signal.SIGTERM
            if trainer.world_size == 1:
                exception.path = self._save(trainer, signum)
            exception.code = 128 + int(signum)

    def _save(self, trainer: Trainer, signum: int) -> str:
        # listed before the EMA callback, this batch end comes before its update: the checkpoint would hold this
        # step's weights beside the last step's average, and a resumed run would lack one update
        take_this_steps_update(trainer, trainer.lightning_module)
        path = save_last(trainer)
        rank_zero_info(f"{signal.Signals(signum).name}: saved {path} at step {trainer.global_step}; resume with "
                       f"--ckpt_path last (same --run.name)")
        return path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        signum = self.received or (signal.SIGTERM if trainer.received_sigterm else 0)
        signum = max_over_ranks(trainer, int(signum))  # every rank, every batch: the same step on all of them
        if signum:
            raise SignalExit(signum, self._save(trainer, signum))


def max_over_ranks(trainer: Trainer, value: int) -> int:
    """The largest of the ranks' `value`s, through the strategy's reduce (DDP: a barrier and an all-reduce of one
    integer), so every rank must call it at the same point of the same step. Costs one host-device sync."""
    if trainer.world_size == 1:
        return value
    return int(trainer.strategy.reduce(torch.tensor(value, device=trainer.strategy.root_device), reduce_op="max"))


# ----------------------------------------------------------------------------------------------- NaN/inf guard
class NonFiniteLossError(FloatingPointError):
    pass


class NonFiniteGuard(Callback):
    """Checks every loss that reaches backward (automatic and manual optimisation) and never lets a NaN/inf loss
    update the weights.

    mode="stop": raise `NonFiniteLossError` naming the step and the last good checkpoint, before the optimizer
    step. mode="skip": drop the update (gradients are set to None, so the optimizer leaves those parameters and
    their moments alone; global_step and the LR schedule still advance), count it in `train/nonfinite_skips`, and
    stop after `max_consecutive_skips` in a row. Only the loss is checked: under fp16 mixed precision an overflow
    in the gradients is the GradScaler's business, not an error. Under DDP the ranks decide together, before
    every optimizer step, so a NaN on one rank stops or skips every rank at that step. Costs one host-device sync
    per backward and one reduce of one integer per optimizer step.
    """

    def __init__(self, mode: str = "stop", max_consecutive_skips: int = 10):
        if mode not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard mode must be 'stop' or 'skip', got {mode!r}")
        self.mode, self.max_consecutive_skips = mode, int(max_consecutive_skips)
        self.skips = 0
        self._consecutive = 0
        self._bad: float | None = None  # the non-finite loss value seen since the last optimizer step
        self._saved_step: int | None = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad = float(loss.detach().float().flatten()[0])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # every rank decides alike (one rank's NaN reaches every rank's gradients through DDP's all-reduce anyway)
        bad = bool(max_over_ranks(trainer, int(self._bad is not None)))
        value, self._bad = self._bad, None
        if not bad:
            self._consecutive = 0
            return
        where = f"at global step {trainer.global_step} (epoch {trainer.current_epoch})"
        what = f"non-finite training loss ({value if value is not None else 'on another rank'}) {where}"
        if self.mode == "stop":
            raise NonFiniteLossError(f"{what}; {self._checkpoint_note(trainer)}. Lower the learning rate, enable "
                                     f"gradient clipping, or set --run.on_nonfinite skip to skip such batches")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skips += 1
        self._consecutive += 1
        rank_zero_warn(f"{what}: update skipped ({self.skips} skipped so far)")
        if trainer.is_global_zero:  # straight to the loggers: self.log would repeat the value on later steps
            for logger in trainer.loggers:
                logger.log_metrics({"train/nonfinite_skips": float(self.skips)}, step=trainer.global_step)
        if self._consecutive >= self.max_consecutive_skips:
            raise NonFiniteLossError(f"{what}: {self._consecutive} non-finite losses in a row, stopping; "
                                     f"{self._checkpoint_note(trainer)}")

    def _checkpoint_note(self, trainer: Trainer) -> str:
        path = last_checkpoint(trainer)
        if path is None:
            return "no checkpoint was written before it"
        step = f" (step {self._saved_step})" if self._saved_step is not None else ""
        return f"last good checkpoint: {path}{step}"

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._saved_step = int(checkpoint.get("global_step", trainer.global_step))

    def state_dict(self) -> dict:
        return {"skips": self.skips}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skips = int(state_dict.get("skips", 0))


# ------------------------------------------------------------------------------------------------ CLI defaults
def default_callbacks(user_callbacks: Sequence[Callback], checkpoint_dir: str | None, every_n_steps: int,
                      on_nonfinite: str) -> list[Callback]:
    """What `LitDiffusionCLI` adds to the configured callbacks: a LastCheckpoint in `checkpoint_dir` (unless a
    configured ModelCheckpoint already keeps a last.ckpt, or checkpointing is off: `checkpoint_dir=None`), the
    signal checkpoint, the non-finite guard and the training steps' random stream (unless configured already)."""
    added: list[Callback] = []
    if checkpoint_dir is not None and not any(
            isinstance(c, ModelCheckpoint) and c.save_last for c in user_callbacks):
        if every_n_steps > 0:  # last.ckpt only: a top-k copy of the same state would double every write
            added.append(LastCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                                        every_n_train_steps=every_n_steps))
        else:  # at each epoch end, as before
            added.append(LastCheckpoint(dirpath=checkpoint_dir, save_last=True))
    if not any(isinstance(c, SignalCheckpoint) for c in user_callbacks):
        added.append(SignalCheckpoint())
    if on_nonfinite != "off" and not any(isinstance(c, NonFiniteGuard) for c in user_callbacks):
        added.append(NonFiniteGuard(mode=on_nonfinite))
    if not any(isinstance(c, TrainingRNG) for c in user_callbacks):
        added.append(TrainingRNG())  # bit-exact resume: the training steps' random stream travels in checkpoints
    return added


def has_checkpoint_io(plugins: Any) -> bool:
    from lightning.fabric.plugins import CheckpointIO

    plugins = plugins if isinstance(plugins, (list, tuple)) else [plugins] if plugins is not None else []
    return any(isinstance(p, CheckpointIO) for p in plugins)

