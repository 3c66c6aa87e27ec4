"""CLIP figures after each validation: the image-caption similarity matrix of a fixed val batch, and a retrieval
grid (query captions, top-k images of a fixed val gallery). PNGs go to `<run dir>/media`; W&B gets them too.

A video CLIP's val batches hold clips ("video" [B, T, 3, H, W]): they are embedded whole, and drawn as their first,
middle and last frames side by side (one frame would not show which way anything moves)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from lit_diffusion.evaluation.plots import plt, save_grid


def _run_dir(trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def still(x: torch.Tensor, gap: int = 2) -> torch.Tensor:
    """An image [3, H, W] as it is; a clip [T, 3, H, W] as its first, middle and last frames side by side with
    `gap` grey columns between them, [3, H, 3W + 2 gap] (fewer frames when it has fewer)."""
    if x.dim() == 3:
        return x
    picks = sorted({0, (x.shape[0] - 1) // 2, x.shape[0] - 1})
    grey = x.new_zeros(3, x.shape[-2], gap)  # 0 is mid-grey in [-1, 1]
    parts = [part for i in picks for part in (grey, x[i])][1:]
    return torch.cat(parts, dim=-1)


class CLIPVisualization(L.Callback):
    def __init__(self, num_images: int = 12, gallery_size: int = 128, queries: Sequence[str] | None = None,
                 num_queries: int = 6, top_k: int = 5, every_n_epochs: int = 1, out_dir: str | None = None):
        """
        num_images: images (and their captions) in the similarity matrix, the first of the val set.
        gallery_size: the first val images searched by the retrieval grid.
        queries: captions to search for; default: the first `num_queries` distinct captions of the gallery.
        top_k: images per query row.
        out_dir: where PNGs go (default: `<run dir>/media`).
        """
        self.num_images, self.gallery_size, self.top_k = num_images, gallery_size, top_k
        self.queries, self.num_queries = list(queries) if queries else None, num_queries
        self.every_n_epochs, self.out_dir = every_n_epochs, out_dir
        self._images: list[torch.Tensor] = []
        self._captions: list[str] = []
        self.written: list[Path] = []

    def _collected(self) -> int:
        return sum(len(x) for x in self._images)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # keep the first val images once: the val order is fixed, so every figure shows the same items
        if trainer.is_global_zero and dataloader_idx == 0 and self._collected() < self.gallery_size:
            need = self.gallery_size - self._collected()
            pixels = batch["video"] if "video" in batch else batch["image"]  # clips [B, T, 3, H, W] or images
            self._images.append(pixels[:need].detach().float().cpu())
            self._captions.extend(list(batch["caption"][:need]))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self._images:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # the bare module, not the DDP wrapper: no collective runs here, so rank zero alone is safe
        with torch.no_grad():
            images = torch.cat(self._images)  # [G, 3, H, W] (or clips [G, T, 3, H, W]) in [-1, 1]
            image_emb = torch.cat([pl_module.encode_image(images[i:i + 64]).float().cpu()
                                   for i in range(0, len(images), 64)])  # [G, E]
            n = min(self.num_images, len(images))
            text_emb = pl_module.encode_text(pl_module.tokenize(self._captions[:n]))[1].float().cpu()  # [n, E]
            queries = self.queries or list(dict.fromkeys(self._captions))[: self.num_queries]
            query_emb = pl_module.encode_text(pl_module.tokenize(queries))[1].float().cpu()  # [Q, E]
        step = trainer.global_step
        out = Path(self.out_dir) if self.out_dir else _run_dir(trainer) / "media"
        shown = torch.stack([still(x) for x in images])  # [G, 3, H, W'] what the figures draw
        sim_path = self.similarity_figure(image_emb[:n] @ text_emb.T, shown[:n], self._captions[:n],
                                          out / f"clip_similarity_step{step:07d}.png", step)
        sims = query_emb @ image_emb.T  # [Q, G]
        top = sims.topk(min(self.top_k, len(images)), dim=1)
        rows = [((shown[idx] + 1) / 2).clamp(0, 1) for idx in top.indices]
        labels = [f"{q}\n(hits: {sum(self._captions[i] == q for i in idx.tolist())}/{len(idx)})"
                  for q, idx in zip(queries, top.indices)]
        grid_path = save_grid(rows, labels, out / f"clip_retrieval_step{step:07d}.png",
                              col_titles=[f"top {i + 1}" for i in range(top.indices.shape[1])],
                              title=f"text -> image retrieval among {len(images)} val images, step {step}")
        self.written += [sim_path, grid_path]
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key="clip/similarity", images=[str(sim_path)], step=step)
                lg.log_image(key="clip/retrieval", images=[str(grid_path)], step=step)

    @staticmethod
    def similarity_figure(sims: torch.Tensor, images: torch.Tensor, captions: Sequence[str], out: Path,
                          step: int) -> Path:
        """sims [n, n] cosine similarities of images [n, 3, H, W] in [-1, 1] (rows, drawn as thumbnails) and
        their captions (columns); matching pairs lie on the (outlined) diagonal."""
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        n = sims.shape[0]
        fig, ax = plt.subplots(figsize=(0.45 * n + 3.5, 0.45 * n + 2.5))
        im = ax.imshow(sims.numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks(range(n), [c for c in captions], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(n), [""] * n)
        zoom = 0.6
        shift = -(images.shape[-1] * zoom / 2 + 4.4)  # the thumbnail's right edge just left of the matrix
        for i in range(n):
            thumb = OffsetImage(((images[i] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy(), zoom=zoom)
            ax.add_artist(AnnotationBbox(thumb, (0, i), xybox=(shift, 0), xycoords=("axes fraction", "data"),
                                         boxcoords="offset points", frameon=False, annotation_clip=False))
        for i in range(n):
            ax.add_patch(plt.Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1))
        ax.set_xlabel("caption")
        ax.set_title(f"image-caption cosine similarity, step {step}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out
