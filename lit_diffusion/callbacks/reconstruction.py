"""Saves a grid of validation inputs (top row) and their reconstructions (bottom row) after each validation.

Reads the reconstructions the VAE stage's `validation_step` returns for its first batch (`{"reconstruction":
...}`), so nothing is recomputed. Writes `{run dir}/media/reconstructions_step{step:07d}.png` and, when a
WandbLogger is attached, logs it as `val/reconstructions`. Rank zero only.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid, save_image


class ReconstructionGrid(L.Callback):
    def __init__(self, num_images: int = 8, out_dir: str | None = None):
        """num_images: columns of the grid. out_dir: where PNGs go (default: `<run dir>/media`)."""
        if num_images < 1:
            raise ValueError(f"ReconstructionGrid: num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self.out_dir = out_dir
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not isinstance(outputs, dict) or "reconstruction" not in outputs:
            raise TypeError(f"ReconstructionGrid needs validation_step to return {{'reconstruction': ...}}, "
                            f"got {type(outputs).__name__} from {type(pl_module).__name__}")
        n = self.num_images
        self._pair = (batch["image"][:n].detach().float().cpu(), outputs["reconstruction"][:n].detach().float().cpu())

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._pair is None or not trainer.is_global_zero:
            return
        inputs, recs = self._pair
        self._pair = None
        images = torch.cat([inputs, recs]).add(1).div(2).clamp(0, 1)  # [2n, 3, H, W] in [0, 1]
        grid = make_grid(images, nrow=inputs.shape[0], padding=1, pad_value=0.5)
        # the run directory is the trainer's default_root_dir (the CLI points it at runs/<name>/<stage>)
        out = Path(self.out_dir) if self.out_dir else Path(trainer.default_root_dir) / "media"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"reconstructions_step{trainer.global_step:07d}.png"
        save_image(grid, path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstructions", images=[str(path)], step=trainer.global_step,
                                 caption=["top: input, bottom: reconstruction"])
