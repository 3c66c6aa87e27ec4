"""Evaluate a latent-diffusion model: generate for the captions of an evaluation set at several guidance scales,
then FID (per feature backend), CLIP score and caption accuracy, all reduced exactly across DDP ranks.

Used by the in-loop callback, by `lit-diffusion evaluate` and by the pipeline. Each rank generates for the
captions its share of the evaluation loader holds (the val stream gives every sample to exactly one rank), and
the starting noise of a sample is seeded by its key, so with a deterministic sampler a caption gets the same image
whichever rank or batch it lands on: 2 ranks give the 1-rank numbers.

Generated images are quantised to uint8 before any metric sees them, so the figures are those of the PNG files
`save_images` writes (`torch-fidelity` or clean-fid on those folders recompute the in-loop FID).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from lit_diffusion.metrics.caption_accuracy import CaptionAccuracy
from lit_diffusion.metrics.clip_score import CLIPScore
from lit_diffusion.metrics.features import make_extractor, to_uint8
from lit_diffusion.metrics.fid import FID, RealStats
from lit_diffusion.metrics.stats_cache import data_identity, load_stats, save_stats, stats_path

log = logging.getLogger("lit_diffusion")


@dataclass
class EvalConfig:
    guidance: Sequence[float] = (1.0, 3.0, 5.0)  # one set of metrics per scale
    num_samples: int = 500  # the first N samples of the evaluation stream (over all ranks)
    backends: Sequence[str] = ("clip",)  # FID feature backends: clip (stage-1 CLIP) and/or inception
    inception_weights: str | None = None  # local pt_inception-2015-12-05 file for the inception backend
    sampler: str | None = None  # defaults to the model's
    steps: int | None = None
    guidance_rescale: float | None = None  # 0..1, Lin et al. 2024's rescale of the guided output; None: the model's
    clip_x0: float | None = None  # clamp of the predicted x0 at each step (0 = off); None: the model's
    seed: int = 0
    caption_accuracy: bool = True  # only counted for samples whose attrs describe shapes objects
    cache_dir: str | None = None  # where real statistics are cached (None: kept in memory only)
    save_images: str | None = None  # write the evaluated images as DIR/g{guidance}/KEY.png and DIR/real/KEY.png
    data_id: str | None = ""  # content identity of the evaluation shards (`eval_data_id`), part of the real-statistics
    # cache key; empty or None (remote shards): real statistics are not cached on disk
    resolution: int | None = None  # pixel size the features see; part of the cache key


def sample_seed(key: str, seed: int) -> int:
    """A per-sample seed from the sample's key: independent of batch composition and rank."""
    return (int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) + seed) % (2**31 - 1)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _broadcast(value):
    """Rank zero's `value` on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def eval_data_id(urls) -> str | None:
    """The evaluation shards' content identity (`data_identity`), as rank zero sees it: every rank must use the
    same real-statistics cache key, also where nodes hold copies of the data with other mtimes. A call on every
    rank; an error on rank zero (e.g. a missing shard) is raised on all of them instead of leaving them waiting."""
    from lit_diffusion.data.shards import expand_urls

    ident, error = None, None
    if _rank() == 0:
        try:
            ident = data_identity(expand_urls(urls, split="val"))
        except (OSError, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
    ident, error = _broadcast((ident, error))
    if error is not None:
        raise ValueError(f"evaluation data {urls!r}: {error}")
    if ident is None:
        log.info("evaluation data %r is remote: its real FID statistics are not cached on disk", urls)
    return ident


def _image_folders(root: str | Path, guidance: Sequence[float]) -> dict:
    """{guidance: DIR/g{g}, "real": DIR/real}, created by rank zero. An earlier run's images in them would be
    counted by an offline FID over the folder, so they must be empty; every rank checks (before any writes)
    so that all raise together."""
    root = Path(root)
    folders = {g: root / f"g{g:.1f}" for g in guidance}
    folders["real"] = root / "real"
    stale = [str(f) for f in folders.values() if f.is_dir() and any(f.iterdir())]
    if stale:
        raise ValueError(f"--save-images {root}: {', '.join(stale)} already hold files; choose an empty folder")
    if _rank() == 0:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    return folders


def _save_pngs(images: torch.Tensor, keys: Sequence[str], folder: Path) -> None:
    """uint8 [B, 3, H, W] -> folder/KEY.png (lossless). A key that is already there (a duplicate key in the data,
    which would leave fewer files than the metric saw) is an error rather than an overwrite."""
    from PIL import Image

    for image, key in zip(images.cpu(), keys):
        path = folder / f"{key.replace('/', '_')}.png"
        try:
            with open(path, "xb") as f:
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(f, format="PNG")
        except FileExistsError:
            raise ValueError(f"--save-images: {path} exists: sample key {key!r} occurs twice") from None


def _take(loader: Iterable, limit: int):
    """Batches from the loader until this rank has yielded its share of the first `limit` samples. The val stream
    applies `limit` before splitting across ranks when configured (`val_max_samples`); here we only guard."""
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch["caption"])
        if seen >= limit:
            break


def _lockstep(batches: Iterable, device) -> Iterator[dict | None]:
    """This rank's batches, then None until every rank has run out of its own. A denoiser sharded by FSDP all-gathers
    its weights in every call, so all ranks must make the same calls: one whose share of the samples is shorter
    keeps stepping, on a dummy batch, while another still generates (under DDP it simply waits)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if _all_max(torch.tensor(int(batch is not None), device=device)) == 0:
            return
        yield batch


class Evaluator:
    """Holds the metrics and the real statistics between evaluations (the in-loop callback keeps one)."""

    def __init__(self, config: EvalConfig, clip_module):
        self.config = config
        self.clip = clip_module
        self.extractors = {b: make_extractor(b, weights_path=config.inception_weights, clip=clip_module)
                           for b in config.backends}
        self.fids = {b: {g: FID(e, keep_real=True) for g in config.guidance} for b, e in self.extractors.items()}
        self.clip_scores = {g: CLIPScore() for g in config.guidance}
        self.caption_acc = {g: CaptionAccuracy() for g in config.guidance}
        self.real_stats: dict[str, RealStats] = {}  # backend -> (mu, sigma, n, root), after the first evaluation
        self.timings: list[dict] = []

    def _to(self, device) -> None:
        for metric in (*[m for d in self.fids.values() for m in d.values()], *self.clip_scores.values(),
                       *self.caption_acc.values()):
            metric.to(device)

    def _cache_fields(self, backend: str) -> dict:
        # the requested sample count: the evaluation stream is deterministic, so it fixes the real set
        return {"data": self.config.data_id, "resolution": self.config.resolution, "num_samples": self.config.num_samples,
                "backend": backend, "weights": getattr(self.extractors[backend], "identity", backend)}

    @torch.no_grad()
    def run(self, model, loader: Iterable, step: int | None = None) -> dict[str, float]:
        """Metrics for `model` (a LatentDiffusionModule, EMA weights if wanted) over this rank's share of `loader`."""
        cfg = self.config
        device = model.device
        self._to(device)
        for d in (*self.fids.values(), self.clip_scores, self.caption_acc):
            for metric in d.values():
                metric.reset()
        sources = {b: "memory" for b in self.real_stats}
        use_disk = bool(cfg.cache_dir and cfg.data_id)
        for b in cfg.backends:
            if b not in self.real_stats and use_disk:
                stats = load_stats(stats_path(cfg.cache_dir, self._cache_fields(b)), self._cache_fields(b))
                # every rank must agree, or some would wait in the real-statistics reduction below
                if _all_min(torch.tensor(int(stats is not None), device=device)) == 1:
                    self.real_stats[b], sources[b] = stats, "disk"
        need_real = [b for b in cfg.backends if b not in self.real_stats]
        folders = _image_folders(cfg.save_images, cfg.guidance) if cfg.save_images else None
        t0 = time.perf_counter()
        n_local, n_shapes = 0, 0
        sharded = getattr(model, "sharded", False)
        for batch in _lockstep(_take(loader, cfg.num_samples), device):
            if batch is None:  # this rank is done, another is not
                if sharded:  # the same denoiser calls as a real batch makes; the images are not used
                    for g in cfg.guidance:
                        model.sample([""], guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=[cfg.seed],
                                     guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0)
                continue
            captions, keys = list(batch["caption"]), list(batch["key"])
            attrs = list(batch.get("attrs") or [{}] * len(captions))
            if need_real or folders:
                real = ((batch["image"].to(device).float() + 1) / 2).clamp(0, 1)
                if folders:
                    _save_pngs(to_uint8(real), keys, folders["real"])
                for b in need_real:
                    self.fids[b][cfg.guidance[0]].update(real, real=True)
            tokens = self.clip.tokenize(captions).to(device)
            _, text_emb = self.clip.encode_text(tokens)
            seeds = [sample_seed(k, cfg.seed) for k in keys]
            shapes_idx = [i for i, a in enumerate(attrs) if a and a.get("objects")]
            for g in cfg.guidance:
                images = to_uint8(model.sample(captions, guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=seeds,
                                               guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0))
                if folders:  # [B, 3, H, W] uint8, as a PNG holds it
                    _save_pngs(images, keys, folders[g])
                images = images.float() / 255
                for b in cfg.backends:
                    self.fids[b][g].update(images, real=False)
                self.clip_scores[g].update(self.clip.encode_image(images * 2 - 1), text_emb)
                if cfg.caption_accuracy and shapes_idx:
                    self.caption_acc[g].update(images[shapes_idx].cpu(), [attrs[i] for i in shapes_idx])
            n_local += len(captions)
            n_shapes += len(shapes_idx)
        t_gen = time.perf_counter() - t0

        # real statistics not cached: from this pass (reduced over ranks), written by rank zero
        for b in need_real:
            self.real_stats[b] = self.fids[b][cfg.guidance[0]].real_stats()
            sources[b] = "computed"
            if use_disk and _rank() == 0:
                save_stats(stats_path(cfg.cache_dir, self._cache_fields(b)), self._cache_fields(b), self.real_stats[b])
        if need_real and use_disk:
            _barrier()
        for b in cfg.backends:
            for g, fid in self.fids[b].items():
                if not fid.real_injected:
                    fid.set_real_stats(*self.real_stats[b])

        results: dict[str, float] = {}
        for g in cfg.guidance:
            for b in cfg.backends:
                results[f"eval/fid_{b}_g{g:.1f}"] = float(self.fids[b][g].compute())
            results[f"eval/clip_score_g{g:.1f}"] = float(self.clip_scores[g].compute())
            if cfg.caption_accuracy and int(_all_sum(torch.tensor(n_shapes, device=device))) > 0:
                acc = self.caption_acc[g].attribute_accuracy()
                results[f"eval/caption_acc_g{g:.1f}"] = acc["correct"]
                for attr, value in acc.items():
                    if attr != "correct":
                        results[f"eval_detail/caption_{attr}_g{g:.1f}"] = value
        results["eval/num_samples"] = float(_all_sum(torch.tensor(n_local, device=device)))
        results["eval/seconds"] = time.perf_counter() - t0
        self.timings.append({"step": step, "seconds": results["eval/seconds"], "generate_seconds": t_gen,
                             "real_stats": sources})
        return results


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def _all_min(x: torch.Tensor) -> int:
    return _all_reduce_int(x, "MIN")


def _all_max(x: torch.Tensor) -> int:
    return _all_reduce_int(x, "MAX")


def _all_reduce_int(x: torch.Tensor, op: str) -> int:
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return int(x)


def tradeoff_points(results: dict[str, float], backend: str) -> list[tuple[float, float, float]]:
    """[(guidance, clip_score, fid)] from a results dict, for the FID-vs-CLIP-score plot."""
    points = []
    for key, value in results.items():
        prefix = f"eval/fid_{backend}_g"
        if key.startswith(prefix):
            g = key[len(prefix):]
            score = results.get(f"eval/clip_score_g{g}")
            if score is not None:
                points.append((float(g), score, value))
    return sorted(points)


def write_results(results: dict, out_dir: str | Path, step: int | None, backends: Sequence[str],
                  name: str = "model") -> dict[str, Path]:
    """eval JSON and the FID-vs-CLIP-score plot (one per backend) into out_dir; returns the paths."""
    from lit_diffusion.evaluation.plots import save_tradeoff

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"step{step:07d}" if step is not None else "final"
    paths = {"json": out_dir / f"eval_{tag}.json"}
    paths["json"].write_text(json.dumps({"step": step, **results}, indent=2))
    for b in backends:
        pts = tradeoff_points(results, b)
        if pts:
            paths[f"plot_{b}"] = save_tradeoff({name: pts}, out_dir / f"fid_{b}_vs_clip_score_{tag}.png",
                                               fid_label=f"FID ({b} features)",
                                               title=f"FID vs CLIP score across guidance ({tag})")
    return paths


def evaluate_checkpoint(ckpt: str | Path, data_urls, config: EvalConfig, out_dir: str | Path, name: str = "model",
                        batch_size: int = 50, num_workers: int = 0, image_size: int | None = None,
                        device: str | None = None) -> tuple[dict[str, float], dict[str, Path], EvalConfig]:
    """Evaluate an ldm checkpoint on `data_urls` in this process (`lit-diffusion evaluate`, the pipeline);
    returns the figures, the files written (eval JSON, plots) and the config as used."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LatentDiffusionModule.from_checkpoint(ckpt, map_location=device)
    size = image_size or int(model.hparams.image_size)
    config = replace(config, data_id=eval_data_id(data_urls), resolution=size)
    dm = ImageCaptionDataModule(train_urls=None, val_urls=data_urls, image_size=size, batch_size=batch_size,
                                num_workers=num_workers)
    with torch.inference_mode():
        results = Evaluator(config, model.clip).run(model, dm.eval_dataloader(config.num_samples))
    paths = write_results(results, out_dir, None, config.backends, name=name)
    if config.save_images:
        paths["images"] = Path(config.save_images)
    return results, paths, config
