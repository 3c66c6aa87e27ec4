"""What every evaluation loop shares (images in `evaluator`, clips in `video`): its settings, per-sample seeds, a
rank's share of the eval stream and the lockstep that keeps sharded ranks calling together, and the reductions of
counts over ranks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from lit_diffusion.metrics.features import to_uint8


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
    image_guidance: float | None = None  # unCLIP's decoder: the image embedding's own scale; None: the model's
    seed: int = 0
    caption_accuracy: bool = True  # only counted for samples whose attrs describe shapes objects
    cache_dir: str | None = None  # where real statistics are cached (None: kept in memory only)
    save_images: str | None = None  # write the evaluated images as DIR/g{guidance}/KEY.png and DIR/real/KEY.png
    data_id: str | None = ""  # content identity of the evaluation shards (`eval_data_id`), part of the real-statistics
    # cache key; empty or None (remote shards): real statistics are not cached on disk
    resolution: int | None = None  # pixel size the features see; part of the cache key
    aspect_ratios: Sequence[str] | None = None  # W:H ("1:1", "2:1", ...): every caption generated at each, at the
    # model's base area (`aspect_size`), every figure overall and per ratio (keys + `_ar{W:H}`); None: base size only
    real_buckets: Sequence | None = None  # the aspect buckets the real images are read at (their centre squares
    # are the real side of FID): part of the cache key, a bucketed and a square reader give other real pixels


def check_guidance_scales(scales: Sequence[float]) -> None:
    """Every figure is keyed by its scale to one decimal (`eval/fid_clip_g3.0`): a scale of more decimals was logged
    under another's key (1.25 as `g1.2`, over 1.2's figures; its `--save-images` folder too), and a scale listed
    twice counted every sample twice in its metrics."""
    scales = [float(g) for g in scales]
    finer = [g for g in scales if float(f"{g:.1f}") != g]
    if finer:
        raise ValueError(f"guidance scales {finer}: evaluation figures are keyed by the scale to one decimal "
                         f"(eval/..._g{finer[0]:.1f}); give scales of one decimal")
    twice = sorted({g for g in scales if scales.count(g) > 1})
    if twice:
        raise ValueError(f"guidance scales {twice} are listed more than once: each would count every sample twice")


def sample_seed(key: str, seed: int) -> int:
    """A per-sample seed from the sample's key: independent of batch composition and rank."""
    return (int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) + seed) % (2**31 - 1)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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


def _idle_samples(model, cfg: EvalConfig, calls: Sequence[dict] = ({},)) -> None:
    """What a rank with nothing to generate does while `_lockstep` keeps it stepping: under FSDP (`model.sharded`)
    the same denoiser calls as a real batch makes (one per guidance scale and per entry of `calls`, the extra
    `sample` arguments), on a dummy caption, the outputs unused; under DDP nothing."""
    if not getattr(model, "sharded", False):
        return
    for g in cfg.guidance:
        for kwargs in calls:
            model.sample([""], guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=[cfg.seed],
                         guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0, **kwargs)


@torch.no_grad()
def vae_round_trip(model, real: torch.Tensor) -> torch.Tensor:
    """Real images [B, 3, H, W] or clips [B, T, 3, H, W] in [-1, 1] through the model's VAE (clips frame by frame),
    as samples are stored: [0, 1] floats of uint8 values. What the caption judges read of these is the most a
    denoiser over the VAE's latents can reach."""
    images = real.flatten(0, 1) if real.dim() == 5 else real
    decoded = model.vae.decode(model.vae.encode(images.float()))  # in [-1, 1]
    return to_uint8((decoded + 1) / 2).float().div(255).reshape(real.shape)


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
