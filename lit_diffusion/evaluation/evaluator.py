"""Evaluate a latent-diffusion model: generate for the captions of an evaluation set at several guidance scales,
then FID (per feature backend), CLIP score and caption accuracy, all reduced exactly across DDP ranks.

Used by the in-loop callback, by `lit-diffusion evaluate` and by the pipeline. Each rank generates for the
captions its share of the evaluation loader holds (the val stream gives every sample to exactly one rank), and
the starting noise of a sample is seeded by its key, so with a deterministic sampler a caption gets the same image
whichever rank or batch it lands on: 2 ranks give the 1-rank numbers.

Generated images are quantised to uint8 before any metric sees them, so the figures are those of the PNG files
`save_images` writes (`torch-fidelity` or clean-fid on those folders recompute the in-loop FID).

Caption accuracy has a ceiling beside it: `eval/caption_acc_vae` and `eval_detail/caption_vae_{one_object,
two_objects}` are the judge on the real images of the shapes captions sent through the model's VAE and back (stored
as uint8, as samples are), the most any denoiser over these latents can reach. Only images the loader kept whole are
judged (`eval_detail/caption_vae_judged` counts them): a caption describes the whole image, and a square reader's
centre crop of a 2:1 image cuts its objects. They are computed in the first evaluation (reduced over ranks) and kept
for the later ones.

With `aspect_ratios` every caption is generated at each ratio, at the model's base area (`aspect_size`; 1:1 is
the base size), with the same per-key seed, and every figure is reported per ratio (keys suffixed `_ar{W:H}`, e.g.
`eval/fid_clip_g3.0_ar2:1`) as well as over all ratios together (the unsuffixed keys). FID compares centre squares:
the loader centre-crops every real image to a square, so a generated non-square image is centre-cropped to its
shorter side before its FID features (CLIP's preprocessing crops so anyway; Inception's would squash it). A ratio's
real statistics are those of the real images of that ratio when the data says every image's ratio
(`image_aspect_ratio`) and holds at least 2 of it, else those of all real images; `eval_detail/fid_real_matched_ar{r}`
(1 or 0) and `eval_detail/fid_real_n_ar{r}` say which, and how many.

unCLIP's decoder (`model.image_conditioned`) samples from a caption and a CLIP image embedding. With a `prior` each
caption's embedding is the prior's, drawn with the caption's own per-key seed (the full stack, caption -> prior ->
decoder, so 2 ranks still give the 1-rank numbers); without one it is the CLIP embedding of the caption's own real
val image (`encode_image_embeddings`): the decoder fed the true embedding, the upper bound of what a prior can give.
`eval_detail/image_embeddings_from_prior` (1 or 0) says which. Text-only models are evaluated as before.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from lit_diffusion.data.buckets import nearest_bucket
from lit_diffusion.data.shapes import parse_aspect_ratios
from lit_diffusion.evaluation.loop import (
    EvalConfig,
    _all_min,
    _all_sum,
    _idle_samples,
    _lockstep,
    _rank,
    _take,
    check_guidance_scales,
    sample_seed,
    vae_round_trip,
)
from lit_diffusion.metrics.caption_accuracy import KINDS, CaptionAccuracy
from lit_diffusion.metrics.clip_score import CLIPScore
from lit_diffusion.metrics.features import make_extractor, to_uint8
from lit_diffusion.metrics.fid import FID, RealStats
from lit_diffusion.metrics.stats_cache import data_identity, load_stats, save_stats, stats_path

log = logging.getLogger("lit_diffusion")



class AspectRatioError(ValueError):
    """An aspect ratio a model cannot sample at its base area; its message starts with the ratio, so a caller can
    prefix the option that asked for it (`--aspect 8:1 ...`)."""


def aspect_size(ratio: str, base: int, multiple: int) -> tuple[int, int]:
    """(height, width) in pixels of aspect ratio `ratio` ("W:H") at about base**2 pixels, both multiples of `multiple`.

    The ideal sides, W* = base * sqrt(W/H) and H* = base * sqrt(H/W) (area base**2), are each rounded down and up to
    a multiple; of those (at most) four sizes the one nearest W:H in log aspect ratio wins, a tie going to the area
    nearer base**2 (in log), then to the smaller. So the area stays within one multiple per side of base**2, and
    "1:1" at a base the model takes is base x base. Integers and fractions throughout: no float decides a tie.
    A ratio whose ideal shorter side is under one multiple is refused (AspectRatioError), naming the most elongated
    ratio the model samples at this area."""
    (ratio,) = parse_aspect_ratios([ratio])
    w, h = (int(x) for x in ratio.split(":"))
    base, multiple = int(base), int(multiple)
    area = base * base
    if area * min(w, h) < multiple * multiple * max(w, h):  # the shorter ideal side, squared, under multiple**2
        g = math.gcd(area, multiple * multiple)
        most = f"{area // g}:{multiple * multiple // g}"
        raise AspectRatioError(
            f"{ratio} at the base size {base}x{base} px gives a shorter side of "
            f"{base * math.sqrt(min(w, h) / max(w, h)):.1f} px, under the {multiple} px that this model's sides are "
            f"multiples of; the most elongated ratio it samples at this area is {most} (and its transpose)")

    def rounded(num: int, den: int) -> set[int]:  # floor and ceil of sqrt(num / den), in multiples
        low = math.isqrt(num // den)  # floor(sqrt(x)) = floor(sqrt(floor(x)))
        return {low * multiple, (low if low * low * den == num else low + 1) * multiple}

    sizes = [(sh, sw) for sh in rounded(area * h, w * multiple * multiple)
             for sw in rounded(area * w, h * multiple * multiple)]
    # nearest_bucket keeps the first of equally near sizes: order them by area distance to base**2, then area
    sizes.sort(key=lambda hw: (Fraction(max(hw[0] * hw[1], area), min(hw[0] * hw[1], area)), hw[0] * hw[1], hw))
    return sizes[nearest_bucket(h, w, sizes)]


def size_multiple(model) -> int:
    """What every sampled height and width must be a multiple of: the smallest square side dividing the model's
    base size that its own check (`model.latent_shape`) accepts."""
    base = int(model.hparams.image_size)
    for side in (d for d in range(1, base + 1) if base % d == 0):
        try:
            model.latent_shape(side, side)
        except ValueError:
            continue
        return side
    raise ValueError(f"the model samples no square side dividing its image_size {base}")


def sample_size(model, ratio: str) -> tuple[int, int]:
    """(height, width) the model samples aspect ratio `ratio` at: `aspect_size` at its base size and multiple."""
    return aspect_size(ratio, int(model.hparams.image_size), size_multiple(model))


def image_aspect_ratio(attrs: dict | None, size_row, ratios: Sequence[str]) -> str | None:
    """Which of `ratios` a real image is: its `KEY.json` `aspect_ratio`, else its own width and height (`KEY.json`
    `width`/`height`, else the original size in the batch's size row [6], (h, w) first). Own sizes count as W:H
    within a pixel of rounding on each side, |w * H - h * W| <= W + H (the shapes writer rounds sides to even
    numbers; 640 x 427 is 3:2), the nearest in log aspect ratio when several do. Returns "other" for a known ratio
    not in `ratios`, None when nothing says."""
    attrs = attrs or {}
    if attrs.get("aspect_ratio"):
        try:
            (ratio,) = parse_aspect_ratios([str(attrs["aspect_ratio"])])
            return ratio if ratio in ratios else "other"
        except ValueError:
            pass  # not W:H: the sizes may still say
    try:
        if attrs.get("width") and attrs.get("height"):
            width, height = int(attrs["width"]), int(attrs["height"])
        elif size_row is not None:
            height, width = int(size_row[0]), int(size_row[1])
        else:
            return None
    except (TypeError, ValueError):
        return None
    if width <= 0 or height <= 0:
        return None
    pairs = [(r, *(int(x) for x in r.split(":"))) for r in ratios]
    close = [(r, (rh, rw)) for r, rw, rh in pairs if abs(width * rh - height * rw) <= rw + rh]
    if not close:
        return "other"
    return close[nearest_bucket(height, width, [hw for _, hw in close])][0]


def _uncropped(batch: dict, i: int, attrs: dict) -> bool:
    """Whether the loader kept the whole of real image `i` (within a pixel a side, the writer's rounding): its
    caption's attributes describe the whole image, so the caption judge reads a cropped one wrongly. The original
    size is the batch's size row's (h, w), else `KEY.json`'s width and height; neither known: kept."""
    height, width = batch["image"].shape[-2:]
    size_rows = batch.get("size")
    if size_rows is not None:
        oh, ow = float(size_rows[i][0]), float(size_rows[i][1])
    elif attrs.get("width") and attrs.get("height"):
        oh, ow = float(attrs["height"]), float(attrs["width"])
    else:
        return True
    scale = max(height / oh, width / ow)  # resized to cover the target, then cropped to it
    return abs(oh * scale - height) <= 1 and abs(ow * scale - width) <= 1


def _centre_square(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, S, S], S = min(H, W): the centre crop the loader gives every real image."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return images[..., top:top + side, left:left + side]


def describe_fid_reals(results: dict) -> dict[str, str]:
    """{ratio: which real images its FID compared against}, in words, from the `eval_detail/fid_real_*` keys."""
    out = {}
    for key, matched in results.items():
        if key.startswith("eval_detail/fid_real_matched_ar"):
            ratio = key[len("eval_detail/fid_real_matched_ar"):]
            n = int(results.get(f"eval_detail/fid_real_n_ar{ratio}", 0))
            out[ratio] = (f"the {n} real val images of aspect ratio {ratio}" if matched else
                          f"all {n} real val images (the data does not say every image's aspect ratio, or holds "
                          f"fewer than 2 of {ratio})")
    return out


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


class Evaluator:
    """Holds the metrics and the real statistics between evaluations (the in-loop callback keeps one)."""

    def __init__(self, config: EvalConfig, clip_module):
        check_guidance_scales(config.guidance)
        self.config = config
        self.clip = clip_module
        self.extractors = {b: make_extractor(b, weights_path=config.inception_weights, clip=clip_module)
                           for b in config.backends}
        self.fids = {b: {g: FID(e, keep_real=True) for g in config.guidance} for b, e in self.extractors.items()}
        self.clip_scores = {g: CLIPScore() for g in config.guidance}
        self.caption_acc = {g: CaptionAccuracy() for g in config.guidance}
        self.caption_acc_vae = CaptionAccuracy()  # the real images through the VAE, in the first evaluation
        self.vae_figures: dict[str, float] | None = None  # its figures, after the first evaluation
        self.real_stats: dict[str, RealStats] = {}  # backend -> (mu, sigma, n, root), after the first evaluation
        self.timings: list[dict] = []
        # per aspect ratio: the same metrics again, each fed that ratio's images only
        self.aspect_ratios = parse_aspect_ratios(config.aspect_ratios) if config.aspect_ratios else ()
        if self.aspect_ratios and config.save_images:
            raise ValueError("save_images (--save-images) with aspect_ratios (--aspect-ratios) is not supported: the "
                             "saved images would not be exactly what FID saw (the centre squares of non-square images)")
        ars = self.aspect_ratios
        self.fids_ar = {b: {r: {g: FID(e, keep_real=True) for g in config.guidance} for r in ars}
                        for b, e in self.extractors.items()}
        self.clip_scores_ar = {r: {g: CLIPScore() for g in config.guidance} for r in ars}
        self.caption_acc_ar = {r: {g: CaptionAccuracy() for g in config.guidance} for r in ars}
        self.real_stats_ar: dict[tuple[str, str], RealStats] = {}  # (backend, ratio) -> that ratio's FID reference
        self.real_matched_ar: dict[str, bool] = {}  # ratio -> its own real images (True) or all of them (False)

    def _metrics(self) -> Iterator:
        for d in (*self.fids.values(), self.clip_scores, self.caption_acc,
                  *[by_g for by_r in self.fids_ar.values() for by_g in by_r.values()],
                  *self.clip_scores_ar.values(), *self.caption_acc_ar.values()):
            yield from d.values()

    def _to(self, device) -> None:
        for metric in self._metrics():
            metric.to(device)

    def _cache_fields(self, backend: str, ratio: str | None = None) -> dict:
        # the requested sample count: the evaluation stream is deterministic, so it fixes the real set
        fields = {"data": self.config.data_id, "resolution": self.config.resolution,
                  "num_samples": self.config.num_samples, "backend": backend,
                  "weights": getattr(self.extractors[backend], "identity", backend)}
        if self.config.real_buckets:
            fields["real_buckets"] = [list(b) for b in self.config.real_buckets]
        if ratio is not None:  # the real images of one ratio; which ratio an image is depends on the ratios asked for
            fields |= {"aspect_ratio": ratio, "aspect_ratios": list(self.aspect_ratios)}
        return fields

    @torch.no_grad()
    def run(self, model, loader: Iterable, step: int | None = None, prior=None) -> dict[str, float]:
        """Metrics for `model` (a LatentDiffusionModule, EMA weights if wanted) over this rank's share of `loader`.
        For unCLIP's decoder, `prior` (a DiffusionPriorModule) gives each caption's image embedding; None: the
        CLIP embedding of the caption's own real image (the upper bound). A text-only model takes no prior."""
        cfg = self.config
        device = model.device
        decoder = bool(getattr(model, "image_conditioned", False))
        if prior is not None and not decoder:
            raise ValueError("a prior was given, but the model is conditioned on text only (condition: text): only "
                             "unCLIP's decoder samples from image embeddings")
        ars = self.aspect_ratios
        sizes = {r: sample_size(model, r) for r in ars}  # (height, width); an impossible ratio fails before any work
        self._to(device)
        for metric in self._metrics():
            metric.reset()
        # the judge on the real images through the VAE: once (every rank alike: none has figures yet, all a VAE)
        need_vae = cfg.caption_accuracy and self.vae_figures is None and getattr(model, "vae", None) is not None
        if need_vae:
            self.caption_acc_vae.to(device)
            self.caption_acc_vae.reset()
        sources = {b: "memory" for b in self.real_stats}
        use_disk = bool(cfg.cache_dir and cfg.data_id)
        for b in cfg.backends:
            if b not in self.real_stats and use_disk:
                stats = load_stats(stats_path(cfg.cache_dir, self._cache_fields(b)), self._cache_fields(b))
                # every rank must agree, or some would wait in the real-statistics reduction below
                if _all_min(torch.tensor(int(stats is not None), device=device)) == 1:
                    self.real_stats[b], sources[b] = stats, "disk"
        need_real = [b for b in cfg.backends if b not in self.real_stats]
        sources_ar = {b: "memory" for b in cfg.backends if ars and all((b, r) in self.real_stats_ar for r in ars)}
        for b in cfg.backends:
            if ars and b not in sources_ar and use_disk:  # only a ratio's own real statistics are ever on disk
                found = {r: load_stats(stats_path(cfg.cache_dir, self._cache_fields(b, r)), self._cache_fields(b, r))
                         for r in ars}
                if _all_min(torch.tensor(int(None not in found.values()), device=device)) == 1:
                    self.real_stats_ar |= {(b, r): stats for r, stats in found.items()}
                    self.real_matched_ar |= {r: True for r in ars}
                    sources_ar[b] = "disk"
        need_real_ar = [b for b in cfg.backends if ars and b not in sources_ar]
        folders = _image_folders(cfg.save_images, cfg.guidance) if cfg.save_images else None
        t0 = time.perf_counter()
        n_local, n_shapes, n_vae = 0, 0, 0
        n_real_ar, n_unknown = {r: 0 for r in ars}, 0  # this rank's real images of each ratio, and of none known
        size_kwargs = [{"height": h, "width": w} for h, w in sizes.values()] or [{}]  # one sample call per ratio
        dummy = {}  # a rank with no images left samples with it while another still generates (FSDP)
        if decoder:  # any unit vector: the decoder only needs an embedding of the right width
            dim = int(model.clip.embed_dim)
            dummy = {"image_embeddings": torch.full((1, dim), dim ** -0.5, device=device)}
        idle_calls = [{**size, **dummy} for size in size_kwargs]
        for batch in _lockstep(_take(loader, cfg.num_samples), device):
            if batch is None:  # this rank is done, another is not
                _idle_samples(model, cfg, idle_calls)
                continue
            captions, keys = list(batch["caption"]), list(batch["key"])
            attrs = list(batch.get("attrs") or [{}] * len(captions))
            seeds = [sample_seed(k, cfg.seed) for k in keys]
            if need_real or need_real_ar or folders or (decoder and prior is None):
                real = ((batch["image"].to(device).float() + 1) / 2).clamp(0, 1)
            # unCLIP's decoder: each caption's image embedding [B, E], from the prior or from its real image
            embed = {}
            if decoder:
                emb = (prior.sample(captions, seed=seeds) if prior is not None
                       else model.encode_image_embeddings(real))
                embed = {"image_embeddings": emb.to(device)}
            if need_real or need_real_ar or folders:
                if folders:
                    _save_pngs(to_uint8(real), keys, folders["real"])
                square = _centre_square(real)  # as the generated side (a bucketed loader's images are not square)
                for b in need_real:
                    self.fids[b][cfg.guidance[0]].update(square, real=True)
                if need_real_ar:
                    size_rows = batch.get("size")
                    labels = [image_aspect_ratio(a, None if size_rows is None else size_rows[i], ars)
                              for i, a in enumerate(attrs)]
                    n_unknown += labels.count(None)
                    for r in ars:
                        mine = [i for i, label in enumerate(labels) if label == r]
                        n_real_ar[r] += len(mine)
                        for b in need_real_ar if mine else ():
                            self.fids_ar[b][r][cfg.guidance[0]].update(square[mine], real=True)
            tokens = self.clip.tokenize(captions).to(device)
            _, text_emb = self.clip.encode_text(tokens)
            shapes_idx = [i for i, a in enumerate(attrs) if a and a.get("objects")]
            whole = [i for i in shapes_idx if _uncropped(batch, i, attrs[i])] if need_vae else []
            if whole:
                self.caption_acc_vae.update(vae_round_trip(model, batch["image"][whole].to(device)).cpu(),
                                            [attrs[i] for i in whole])
                n_vae += len(whole)
            for g in cfg.guidance:
                if ars:
                    self._update_aspect_ratios(model, g, sizes, captions, seeds, text_emb, attrs, shapes_idx, embed)
                    continue
                images = to_uint8(model.sample(captions, guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=seeds,
                                               guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0, **embed))
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
        # per ratio: that ratio's real images when the data says every image's ratio and holds at least 2 of it
        # (counts summed over ranks, so every rank decides alike and joins the same reductions), else all of them
        if need_real_ar:
            counts = {r: int(_all_sum(torch.tensor(n, device=device))) for r, n in n_real_ar.items()}
            unknown = int(_all_sum(torch.tensor(n_unknown, device=device)))
            for r in ars:
                self.real_matched_ar[r] = matched = unknown == 0 and counts[r] >= 2
                for b in need_real_ar:
                    if matched:
                        stats = self.fids_ar[b][r][cfg.guidance[0]].real_stats()
                        if use_disk and _rank() == 0:
                            save_stats(stats_path(cfg.cache_dir, self._cache_fields(b, r)), self._cache_fields(b, r),
                                       stats)
                    else:
                        stats = self.real_stats[b]
                    self.real_stats_ar[(b, r)] = stats
                    sources_ar[b] = "computed"
            if use_disk:
                _barrier()
        for b in cfg.backends:
            for g, fid in self.fids[b].items():
                if not fid.real_injected:
                    fid.set_real_stats(*self.real_stats[b])
            for r in ars:
                for fid in self.fids_ar[b][r].values():
                    if not fid.real_injected:
                        fid.set_real_stats(*self.real_stats_ar[(b, r)])
        for r in ars:  # the overall caption counts are the sums of the per-ratio ones (no image checked twice)
            for g in cfg.guidance:
                self.caption_acc[g].merge_state(self.caption_acc_ar[r][g])
        shapes_total = int(_all_sum(torch.tensor(n_shapes, device=device)))
        if need_vae:
            self.vae_figures = {}
            vae_total = int(_all_sum(torch.tensor(n_vae, device=device)))
            if vae_total:
                acc = self.caption_acc_vae.attribute_accuracy()
                self.vae_figures = {"eval/caption_acc_vae": acc["correct"], "eval_detail/caption_vae_judged": vae_total,
                                    **{f"eval_detail/caption_vae_{k}": acc[k] for k in KINDS if k in acc}}

        results: dict[str, float] = dict(self.vae_figures or {}) if cfg.caption_accuracy else {}
        for g in cfg.guidance:
            for b in cfg.backends:
                results[f"eval/fid_{b}_g{g:.1f}"] = float(self.fids[b][g].compute())
            results[f"eval/clip_score_g{g:.1f}"] = float(self.clip_scores[g].compute())
            if cfg.caption_accuracy and shapes_total > 0:
                acc = self.caption_acc[g].attribute_accuracy()
                results[f"eval/caption_acc_g{g:.1f}"] = acc["correct"]
                for attr, value in acc.items():
                    if attr != "correct":
                        results[f"eval_detail/caption_{attr}_g{g:.1f}"] = value
            for r in ars:  # the same figures for each ratio's images: the keys above + _ar{W:H}
                for b in cfg.backends:
                    results[f"eval/fid_{b}_g{g:.1f}_ar{r}"] = float(self.fids_ar[b][r][g].compute())
                results[f"eval/clip_score_g{g:.1f}_ar{r}"] = float(self.clip_scores_ar[r][g].compute())
                if cfg.caption_accuracy and shapes_total > 0:
                    acc = self.caption_acc_ar[r][g].attribute_accuracy()
                    results[f"eval/caption_acc_g{g:.1f}_ar{r}"] = acc["correct"]
                    for attr, value in acc.items():
                        if attr != "correct":
                            results[f"eval_detail/caption_{attr}_g{g:.1f}_ar{r}"] = value
        for r in ars:  # which real images each ratio's FID compared against (`describe_fid_reals` says it in words)
            results[f"eval_detail/fid_real_matched_ar{r}"] = float(self.real_matched_ar[r])
            if cfg.backends:
                results[f"eval_detail/fid_real_n_ar{r}"] = float(self.real_stats_ar[(cfg.backends[0], r)].n)
        if decoder:  # the full stack (1) or the decoder fed the true embeddings (0: the upper bound)
            results["eval_detail/image_embeddings_from_prior"] = float(prior is not None)
        results["eval/num_samples"] = float(_all_sum(torch.tensor(n_local, device=device)))
        results["eval/seconds"] = time.perf_counter() - t0
        self.timings.append({"step": step, "seconds": results["eval/seconds"], "generate_seconds": t_gen,
                             "real_stats": sources})
        if ars:
            self.timings[-1] |= {"real_stats_ar": sources_ar, "real_matched_ar": dict(self.real_matched_ar)}
        return results

    def _update_aspect_ratios(self, model, g: float, sizes: dict, captions: list[str], seeds: list[int],
                              text_emb: torch.Tensor, attrs: list[dict], shapes_idx: list[int],
                              embed: dict | None = None) -> None:
        """One batch's captions at guidance `g` at every ratio's size (the same per-key seeds as at the base size,
        and for unCLIP's decoder the same image embeddings, `embed`): each ratio's metrics and the overall FID and
        CLIP score see them (overall caption counts are merged from the per-ratio ones at the end)."""
        cfg = self.config
        for r, (height, width) in sizes.items():  # images [B, 3, height, width]
            images = to_uint8(model.sample(captions, guidance=g, sampler=cfg.sampler, steps=cfg.steps, seed=seeds,
                                           guidance_rescale=cfg.guidance_rescale, clip_x0=cfg.clip_x0,
                                           height=height, width=width, **(embed or {}))).float() / 255
            square = _centre_square(images)  # FID compares centre squares: the loader's real images are those
            for b in cfg.backends:
                self.fids[b][g].update(square, real=False)
                self.fids_ar[b][r][g].update(square, real=False)
            image_emb = self.clip.encode_image(images * 2 - 1)
            self.clip_scores[g].update(image_emb, text_emb)
            self.clip_scores_ar[r][g].update(image_emb, text_emb)
            if cfg.caption_accuracy and shapes_idx:
                self.caption_acc_ar[r][g].update(images[shapes_idx].cpu(), [attrs[i] for i in shapes_idx])


def tradeoff_points(results: dict[str, float], backend: str,
                    aspect_ratio: str | None = None) -> list[tuple[float, float, float]]:
    """[(guidance, clip_score, fid)] from a results dict, for the FID-vs-CLIP-score plot: the overall figures, or
    those of one aspect ratio (keys ending in `_ar{aspect_ratio}`)."""
    points = []
    suffix = f"_ar{aspect_ratio}" if aspect_ratio else ""
    pattern = re.compile(rf"eval/fid_{re.escape(backend)}_g(\d+(?:\.\d+)?){re.escape(suffix)}")
    for key, value in results.items():
        match = pattern.fullmatch(key)
        if match:
            score = results.get(f"eval/clip_score_g{match[1]}{suffix}")
            if score is not None:
                points.append((float(match[1]), score, value))
    return sorted(points)


def result_aspect_ratios(results: dict) -> list[str]:
    """The aspect ratios a results dict holds figures for, in the order they first appear."""
    found = {}
    for key in results:
        match = re.fullmatch(r"eval/clip_score_g\d+(?:\.\d+)?_ar(\d+:\d+)", key)
        if match:
            found.setdefault(match[1])
    return list(found)


def write_results(results: dict, out_dir: str | Path, step: int | None, backends: Sequence[str],
                  name: str = "model", json_path: str | Path | None = None) -> dict[str, Path]:
    """eval JSON and the FID-vs-CLIP-score plot (one per backend) into out_dir; returns the paths. They are named by
    the step (`eval_step0001000.json`, `eval_final.json`, ..._final.png) or, given `json_path`, the JSON is that
    file and the plots are named after it (`fid_clip_vs_clip_score_STEM.png` beside it), so an evaluation written
    beside a run's own does not replace its files."""
    from lit_diffusion.evaluation.plots import save_tradeoff

    if json_path is not None:
        json_path = Path(json_path)
        out_dir, tag = json_path.parent, json_path.stem
    else:
        out_dir, tag = Path(out_dir), (f"step{step:07d}" if step is not None else "final")
        json_path = out_dir / f"eval_{tag}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": json_path}
    reals = describe_fid_reals(results)  # with aspect ratios: which real images each ratio's FID compared against
    paths["json"].write_text(json.dumps({"step": step, **results, **({"fid_real_per_aspect_ratio": reals}
                                                                     if reals else {})}, indent=2))
    for b in backends:
        pts = tradeoff_points(results, b)
        if pts:
            lines = {name: pts}  # with aspect ratios, one more line each
            lines |= {f"{name} {r}": tradeoff_points(results, b, r) for r in result_aspect_ratios(results)}
            paths[f"plot_{b}"] = save_tradeoff(lines, out_dir / f"fid_{b}_vs_clip_score_{tag}.png",
                                               fid_label=f"FID ({b} features)",
                                               title=f"FID vs CLIP score across guidance ({tag})")
    return paths


def evaluate_checkpoint(ckpt: str | Path, data_urls, config: EvalConfig, out_dir: str | Path, name: str = "model",
                        batch_size: int = 50, num_workers: int = 0, image_size: int | None = None,
                        device: str | None = None, prior_ckpt: str | Path | None = None,
                        json_path: str | Path | None = None,
                        ) -> tuple[dict[str, float], dict[str, Path], EvalConfig]:
    """Evaluate an ldm checkpoint on `data_urls` in this process (`lit-diffusion evaluate`, the pipeline);
    returns the figures, the files written (eval JSON, plots) and the config as used. For unCLIP's decoder,
    `prior_ckpt` evaluates the full stack (caption -> prior -> decoder); without it the decoder is fed the true
    image embeddings of the val images. A prior must embed with the decoder's own CLIP."""
    from lit_diffusion.data.datamodule import ImageCaptionDataModule
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = LatentDiffusionModule.from_checkpoint(ckpt, map_location=device)
    model.use_image_guidance(config.image_guidance)  # the default of every sample call below
    prior = load_prior_for(model, ckpt, prior_ckpt, device) if prior_ckpt is not None else None
    size = image_size or int(model.hparams.image_size)
    config = replace(config, data_id=eval_data_id(data_urls), resolution=size)
    frames = int(getattr(model.hparams, "frames", 1))
    if frames > 1:  # a video model: its val clips, the video metrics (`evaluation.video`)
        from lit_diffusion.data.video import VideoDataModule
        from lit_diffusion.evaluation.video import VideoEvaluator

        dm = VideoDataModule(train_urls=None, val_urls=data_urls, image_size=size, num_frames=frames,
                             frame_stride=model.frame_stride, batch_size=batch_size, num_workers=num_workers)
        evaluator = VideoEvaluator(config, model.clip, frames)
    else:
        dm = ImageCaptionDataModule(train_urls=None, val_urls=data_urls, image_size=size, batch_size=batch_size,
                                    num_workers=num_workers)
        evaluator = Evaluator(config, model.clip)
    with torch.inference_mode():
        loader = dm.eval_dataloader(config.num_samples)
        results = evaluator.run(model, loader, prior=prior) if frames == 1 else evaluator.run(model, loader)
    paths = write_results(results, out_dir, None, config.backends, name=name, json_path=json_path)
    if config.save_images:
        paths["images"] = Path(config.save_images)
    return results, paths, config


def load_prior_for(decoder, decoder_ckpt: str | Path, prior_ckpt: str | Path, device: str | torch.device = "cpu"):
    """The DiffusionPriorModule of `prior_ckpt`, checked to suit `decoder` (loaded from `decoder_ckpt`): the decoder
    must be unCLIP's (image-conditioned) and the prior's CLIP the decoder's own, or its embeddings would live in
    another space than the ones the decoder learnt from."""
    from lit_diffusion.stages.prior import DiffusionPriorModule

    if not decoder.image_conditioned:
        raise ValueError(f"--prior {prior_ckpt}: {decoder_ckpt} is conditioned on text only (condition: text); a "
                         f"prior only feeds unCLIP's decoder (condition: text+image_embedding or image_embedding)")
    prior = DiffusionPriorModule.from_checkpoint(prior_ckpt, map_location=device)
    theirs, ours = prior.clip_hash(), decoder.encoder_hashes()["clip"]
    if theirs != ours:
        raise ValueError(f"the prior {prior_ckpt} was trained with CLIP weights {theirs}, but the decoder "
                         f"{decoder_ckpt} with CLIP weights {ours}: train the prior on latents encoded with the "
                         f"decoder's CLIP (`data encode --image-embeddings --clip` the same checkpoint)")
    return prior
