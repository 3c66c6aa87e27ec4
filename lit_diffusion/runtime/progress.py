"""Progress for logs: one line every N optimizer steps when the output is not a terminal.

A progress bar redraws itself many times a second; written to a file (a SLURM log, `> run.log`, the pipeline's
stage logs) every redraw becomes a line, and a few minutes of training make megabytes of them. On a terminal the
stage keeps Lightning's bar; otherwise `run.progress_every` (default 100) sets how often this callback prints

    [ldm] step 400/2500  train/loss 0.1432  3.21 it/s  elapsed 2:04  ETA 10:54

(and the last step, and one line after each validation with its figures), from rank zero only.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from lightning.pytorch.callbacks.progress import ProgressBar


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _figures(metrics: dict, prefix: str) -> str:
    parts = []
    for key in sorted(metrics):
        if key.startswith(prefix):
            value = metrics[key]
            value = float(value.item() if hasattr(value, "item") else value)
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


class LineProgress(ProgressBar):
    """Lightning's progress-bar slot, filled with a line every `every_n_steps` steps (see the module docstring)."""

    def __init__(self, every_n_steps: int = 100, name: str | None = None, stream: TextIO | None = None):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"LineProgress.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.name = name
        self.stream = stream
        self._enabled = True
        self._start: tuple[float, int] | None = None
        self._printed = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(f"[{self.name}] {text}" if self.name else text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        last = total > 0 and step >= total
        if step == self._printed or (step % self.every_n_steps and not last):
            return
        self._printed = step
        start, first = self._start or (time.monotonic(), 0)
        elapsed = time.monotonic() - start
        rate = (step - first) / elapsed if elapsed > 0 else 0.0
        line = f"step {step}/{total}" if total > 0 else f"step {step}"
        figures = _figures(trainer.callback_metrics, "train/")
        line += f"  {figures}" if figures else ""
        line += f"  {rate:.2f} it/s  elapsed {_clock(elapsed)}"
        if total > 0 and rate > 0:
            line += f"  ETA {_clock((total - step) / rate)}"
        self._print(trainer, line)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        figures = _figures(trainer.callback_metrics, "val/")
        if figures:
            self._print(trainer, f"validation at step {trainer.global_step}: {figures}")
