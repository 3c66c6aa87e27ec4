"""In-loop evaluation of the diffusion stage: FID, CLIP score and caption accuracy every N steps and at the end (a
video model's: motion caption accuracy, CLIP score, per-frame FID and the clips' Frechet distance,
`evaluation.video`).

It runs on every rank (each generates for its share of the val stream) with the EMA weights when a
`WeightAveraging` callback is present; the metrics are reduced across ranks, and only rank zero logs and writes.

For unCLIP's decoder (`condition: text+image_embedding` or `image_embedding`) it needs nothing more: the Evaluator
feeds each caption the CLIP embedding of its own real val image (for latent shards, the image the latents were
encoded from, see `real_images`), so the in-loop figures are the decoder's upper bound; the full stack with a prior
is evaluated offline (`lit-diffusion evaluate --prior`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from lit_diffusion.callbacks.cadence import EveryNSteps
from lit_diffusion.callbacks.ema import averaged_weights
from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator, eval_data_id, write_results
from lit_diffusion.evaluation.video import VideoEvaluator, check_video_clip

log = logging.getLogger("lit_diffusion")


class DiffusionEvaluation(EveryNSteps):
    def __init__(
        self,
        every_n_steps: int = 1000,
        guidance: Sequence[float] = (1.0, 3.0, 5.0),
        num_samples: int = 200,
        backends: Sequence[str] = ("clip",),
        inception_weights: str | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        seed: int = 0,
        cache_dir: str | None = "runs/.fid_cache",
        at_train_end: bool = True,
        aspect_ratios: Sequence[str] | None = None,
    ):
        """
        Args:
            every_n_steps: evaluation cadence in optimizer steps (0: only at the end).
            guidance: classifier-free guidance scales to evaluate (1 = none).
            num_samples: captions (val samples) generated per scale, split over all ranks.
            backends: FID features: "clip" (the frozen stage-1 CLIP) and/or "inception" (needs inception_weights).
            sampler, steps: default to the module's (a deterministic sampler makes evaluations rank-invariant).
            cache_dir: real statistics cached here by (data content, resolution, samples, backend, weights).
            aspect_ratios: W:H, e.g. ["1:1", "2:1", "1:2"]: every caption generated at each ratio (at the model's
                base area) and every figure logged overall and per ratio (keys + `_ar{W:H}`); None: base size only.
        """
        self.every_n_steps = every_n_steps
        self.config = EvalConfig(guidance=[float(g) for g in guidance], num_samples=num_samples,
                                 backends=list(backends), inception_weights=inception_weights, sampler=sampler,
                                 steps=steps, seed=seed, cache_dir=cache_dir,
                                 aspect_ratios=list(aspect_ratios) if aspect_ratios else None)
        self.at_train_end = at_train_end
        self.evaluator: Evaluator | None = None
        self.history: list[dict] = []
        self._last_step = -1
        self._data = None  # the data module whose val stream holds the real images (`real_images`)

    def _loader(self):
        dm = self._data
        return dm.eval_dataloader(self.config.num_samples) if hasattr(dm, "eval_dataloader") else dm.val_dataloader()

    def on_fit_start(self, trainer, pl_module) -> None:
        frames = int(getattr(pl_module.hparams, "frames", 1))
        if frames > 1:  # refused now, not at the first evaluation, every_n_steps into the run
            check_video_clip(pl_module.clip, frames)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.due(trainer):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> dict:
        self._last_step = step = trainer.global_step
        if self.evaluator is None:
            self._data = dm = real_images(trainer.datamodule)
            # keyed by the shards' content (every rank gets rank zero's), not their URL: data re-drawn at the same
            # path must not reuse the old real statistics
            self.config.data_id = eval_data_id(dm.val_urls) if getattr(dm, "val_urls", None) is not None else None
            self.config.resolution = int(getattr(dm, "image_size", 0)) or None
            self.config.real_buckets = getattr(dm, "buckets", None)
            own = float(pl_module.hparams.guidance)
            if own not in self.config.guidance:
                self.config.guidance = sorted([*self.config.guidance, own])
            frames = int(getattr(pl_module.hparams, "frames", 1))
            self.evaluator = (VideoEvaluator(self.config, pl_module.clip, frames) if frames > 1
                              else Evaluator(self.config, pl_module.clip))
        with averaged_weights(trainer, pl_module) as model:
            results = self.evaluator.run(model, self._loader(), step=step)
        # the figures at the model's own sampling guidance, unsuffixed: what sweeps over `guidance` optimise
        own = f"_g{float(pl_module.hparams.guidance):.1f}"
        results.update({k[: -len(own)]: v for k, v in list(results.items()) if k.endswith(own)})
        results.update({k.replace(f"{own}_ar", "_ar"): v for k, v in list(results.items()) if f"{own}_ar" in k})
        self.history.append({"step": step, **results})
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(results, step=step)
            paths = write_results(results, Path(trainer.default_root_dir) / "eval", step, self.config.backends)
            from lightning.pytorch.loggers import WandbLogger

            for lg in trainer.loggers:
                if isinstance(lg, WandbLogger):
                    plots = [str(p) for k, p in paths.items() if k.startswith("plot_")]
                    if plots:
                        lg.log_image(key="eval/fid_vs_clip_score", images=plots, step=step)
            log.info("step %d evaluation: %s", step, ", ".join(
                f"{k}={v:.4g}" for k, v in results.items() if k.startswith("eval/")))
        return results


def real_images(dm):
    """The data module whose eval stream holds the real val images: `dm` itself, or, for latent shards, an
    ImageCaptionDataModule over the image shards the val latents were encoded from (the manifest names each
    latent shard's source), at the manifest's image size, so FID compares against the real images, not VAE
    reconstructions. The val stream splits those shards across ranks as it splits the latent ones."""
    if dm is None:
        raise ValueError("DiffusionEvaluation needs a DataModule with a val stream (data.init_args.val_urls)")
    manifest = (getattr(dm, "manifests", None) or {}).get("val")
    if manifest is None:
        return dm
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    from lit_diffusion.data.latents import manifest_entry

    entries = [manifest_entry(manifest, u) for u in dm.val_shards]
    missing = [u for u, e in zip(dm.val_shards, entries) if e is None]
    if missing:
        raise ValueError(f"{manifest['path']} names no source image shard for the latent val shard {missing[0]}: "
                         f"in-loop FID needs the real images")
    if manifest.get("frames"):  # latents of clips: the real clips
        from lit_diffusion.data.video import VideoDataModule

        return VideoDataModule(val_urls=[e["source"] for e in entries], image_size=int(manifest["image_size"]),
                               num_frames=int(manifest["frames"]), batch_size=dm.batch_size,
                               num_workers=dm.num_workers, val_max_samples=dm.val_max_samples, seed=dm.seed)
    # latents encoded at aspect buckets: the real images at the same buckets, centre-cropped
    buckets = {"sizes": manifest["buckets"], "step": 1, "crop": "center"} if manifest.get("buckets") else None
    return ImageCaptionDataModule(val_urls=[e["source"] for e in entries], image_size=int(manifest["image_size"]),
                                  batch_size=dm.batch_size, num_workers=dm.num_workers,
                                  val_max_samples=dm.val_max_samples, seed=dm.seed, buckets=buckets)
