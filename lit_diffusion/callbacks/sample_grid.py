"""Sample grids during training: fixed prompts (rows) x guidance scales (columns), fixed seeds, with captions;
with `aspect_ratios`, each ratio's guidance columns side by side (one grid of mixed sizes, `plots.grid_cells`).
A video model's grid is an animated GIF beside a PNG of each clip's frames side by side (`plots.save_video_grid`),
logged to W&B as a video."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.loggers import WandbLogger

from lit_diffusion.callbacks.cadence import EveryNSteps
from lit_diffusion.callbacks.ema import averaged_weights
from lit_diffusion.data.shapes import ASPECT_RATIOS, parse_aspect_ratios
from lit_diffusion.evaluation.evaluator import AspectRatioError, sample_size
from lit_diffusion.evaluation.plots import save_grid, save_video_grid


class SampleGrid(EveryNSteps):
    def __init__(
        self,
        prompts: Sequence[str] = ("a large red circle", "a small blue square", "a green triangle above a yellow circle"),
        guidance: Sequence[float] = (1.0, 3.0, 5.0),
        negative_prompt: str | None = None,
        every_n_steps: int = 500,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        aspect_ratios: Sequence[str] = ASPECT_RATIOS,
    ):
        """
        Args:
            prompts: one row each.
            guidance: one column each (1 = no guidance).
            negative_prompt: if set, one more row: the last prompt sampled against this negative prompt.
            every_n_steps: grid cadence in optimizer steps; a last grid is drawn when training ends.
            sampler, steps: default to the module's.
            aspect_ratios: W:H, e.g. ["1:1", "2:1", "1:2"]: the guidance columns once per ratio, each sampled at
                that ratio's size at the module's base area (`evaluator.aspect_size`), the same seed per prompt.
                Default: square only, the module's own size (the grid as it always was).
        """
        self.prompts = list(prompts)
        self.guidance = [float(g) for g in guidance]
        self.aspect_ratios = parse_aspect_ratios(aspect_ratios)
        self.negative_prompt = negative_prompt
        self.every_n_steps = every_n_steps
        self.sampler, self.steps, self.seed = sampler, steps, seed
        self.written: list[Path] = []
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.sizes(pl_module)  # a ratio the module cannot sample fails before training, not at the first grid

    def sizes(self, pl_module) -> dict[str, dict]:
        """ratio -> the size arguments of `sample` ({} for the default: the module's own square size)."""
        if self.aspect_ratios == ASPECT_RATIOS:
            return {"1:1": {}}
        try:
            return {r: dict(zip(("height", "width"), sample_size(pl_module, r))) for r in self.aspect_ratios}
        except AspectRatioError as err:
            raise ValueError(f"SampleGrid aspect_ratios {err}") from None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer):
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
        title = f"step {trainer.global_step}"
        if isinstance(rows[0], torch.Tensor) and rows[0].ndim == 5:  # clips [n_cols, T, 3, H, W]
            out, gif = save_video_grid(rows, labels, out, col_titles=self.col_titles(), title=title)[:2]
        else:
            gif = None
            save_grid(rows, labels, out, col_titles=self.col_titles(), title=title)
        self.written.append(out)
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="samples/grid", images=[str(out)], step=trainer.global_step)
                if gif is not None:
                    lg.log_video(key="samples/video", videos=[str(gif)], step=trainer.global_step)
        return out

    def col_titles(self) -> list[str]:
        if self.aspect_ratios == ASPECT_RATIOS:
            return [f"guidance {g:g}" for g in self.guidance]
        return [f"{r}, guidance {g:g}" for r in self.aspect_ratios for g in self.guidance]

    @torch.no_grad()
    def grid(self, pl_module) -> tuple[list[torch.Tensor | list[torch.Tensor]], list[str]]:
        """Rows of images and their labels: a row is [len(guidance), 3, H, W] by default; with several aspect
        ratios a list of [3, h, w] images, ratio by ratio, each ratio's guidance scales in order."""
        seeds = [self.seed + i for i in range(len(self.prompts))]
        sizes = self.sizes(pl_module)
        rows, labels = [], []

        def row(prompt: str, seed: int, **negative) -> torch.Tensor | list[torch.Tensor]:
            images = [pl_module.sample([prompt], guidance=g, sampler=self.sampler, steps=self.steps, seed=[seed],
                                       **negative, **size).cpu() for size in sizes.values() for g in self.guidance]
            return torch.cat(images) if len(sizes) == 1 else [image[0] for image in images]

        for i, prompt in enumerate(self.prompts):
            rows.append(row(prompt, seeds[i]))
            labels.append(prompt)
        if self.negative_prompt:
            prompt = self.prompts[-1]
            rows.append(row(prompt, seeds[-1], negative_prompts=[self.negative_prompt]))
            labels.append(f"{prompt}\n(negative: {self.negative_prompt})")
        return rows, labels
