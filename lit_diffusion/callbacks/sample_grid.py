"""Sample grids during training: fixed prompts (rows) x guidance scales (columns), fixed seeds, with captions."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lit_diffusion.callbacks.ema import averaged_weights
from lit_diffusion.evaluation.plots import save_grid


class SampleGrid(L.Callback):
    def __init__(
        self,
        prompts: Sequence[str] = ("a large red circle", "a small blue square", "a green triangle above a yellow circle"),
        guidance: Sequence[float] = (1.0, 3.0, 5.0),
        negative_prompt: str | None = None,
        every_n_steps: int = 500,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
    ):
        """
        Args:
            prompts: one row each.
            guidance: one column each (1 = no guidance).
            negative_prompt: if set, one more row: the last prompt sampled against this negative prompt.
            every_n_steps: grid cadence in optimizer steps; a last grid is drawn when training ends.
            sampler, steps: default to the module's.
        """
        self.prompts = list(prompts)
        self.guidance = [float(g) for g in guidance]
        self.negative_prompt = negative_prompt
        self.every_n_steps = every_n_steps
        self.sampler, self.steps, self.seed = sampler, steps, seed
        self.written: list[Path] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> Path | None:
        self._last_step = trainer.global_step
        # Under DDP the denoiser is called directly, not through the DDP wrapper: rank zero draws alone. A denoiser
        # sharded by FSDP all-gathers its weights in every call, so there every rank draws the same grid in step.
        if not trainer.is_global_zero and not getattr(pl_module, "sharded", False):
            return None
        with averaged_weights(trainer, pl_module) as model:
            rows, labels = self.grid(model)
        if not trainer.is_global_zero:
            return None
        out = Path(trainer.default_root_dir) / "media" / f"samples_step{trainer.global_step:07d}.png"
        save_grid(rows, labels, out, col_titles=[f"guidance {g:g}" for g in self.guidance],
                  title=f"step {trainer.global_step}")
        self.written.append(out)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="samples/grid", images=[str(out)], step=trainer.global_step)
        return out

    @torch.no_grad()
    def grid(self, pl_module) -> tuple[list[torch.Tensor], list[str]]:
        """Rows of images [len(guidance), 3, H, W] and their labels."""
        seeds = [self.seed + i for i in range(len(self.prompts))]
        rows, labels = [], []
        for i, prompt in enumerate(self.prompts):
            images = torch.cat([pl_module.sample([prompt], guidance=g, sampler=self.sampler, steps=self.steps,
                                                 seed=[seeds[i]]) for g in self.guidance])
            rows.append(images.cpu())
            labels.append(prompt)
        if self.negative_prompt:
            prompt = self.prompts[-1]
            images = torch.cat([pl_module.sample([prompt], negative_prompts=[self.negative_prompt], guidance=g,
                                                 sampler=self.sampler, steps=self.steps, seed=[seeds[-1]])
                                for g in self.guidance])
            rows.append(images.cpu())
            labels.append(f"{prompt}\n(negative: {self.negative_prompt})")
        return rows, labels
