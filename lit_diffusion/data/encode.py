"""`data encode`: image-caption shards -> latent shards (see `latents`), every sample encoded once across ranks.

Input shard i goes to rank i % world. Given one set of shards, output shard i takes its input's file name; given
splits (`{"train": urls, "val": urls}`, as the pipeline encodes), it is `SPLIT/NNNNNN.tar`, numbered in the
split's shard order, so inputs of any names and layouts (img2dataset's `train/00000.tar` and `val/00000.tar`,
`NAME-train-000000.tar`) cannot collide, and the manifest lists each output with its source. A rerun of the same
command skips every output shard that exists (it exists only when complete: `LatentShardWriter`) and redoes the rest,
deleting what a killed run left half-written. Batches never cross a shard, so a redone shard is encoded in the
same batches and its bytes equal the uninterrupted run's. Rank 0 writes `manifest.json` once all ranks are done.

The encoders come from the caller (this package imports no model code):
    encode_images(images float [B,3,S,S] in [-1,1]) -> latent mean [B,C,h,w], or (mean, std) with `std`
    encode_captions(captions list[str]) -> (token features [B,L,W], mask [B,L] bool of real tokens, pooled [B,E])
    embed_images(images float [B,3,S',S'] in [-1,1] at CLIP's size S') -> CLIP image embeddings [B,E] (with
        `image_embeddings`: unCLIP's prior target; the images are the sources' centre squares, as CLIP sees them)
    encode_patches(images float [B,3,S,S] in [-1,1], the latents' images) -> CLIP patch-token maps [B,W,h_c,w_c]
        (with `patch_features`: REPA's target; the flipped image's too with `flips`)
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from lit_diffusion.data.buckets import BucketConfig
from lit_diffusion.data.latents import (
    DTYPES,
    FORMAT,
    TEXT_MASK,
    TMP_SUFFIX,
    VERSION,
    LatentShardWriter,
    write_manifest,
)
from lit_diffusion.data.shards import (
    SKIP_REASONS,
    BadSample,
    SkipCounter,
    _report,
    bucket_plan,
    decode_sample,
    expand_urls,
    images_to_float,
    shard_samples,
)

log = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
CaptionEncoder = Callable[[list], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]
ImageEmbedder = Callable[[torch.Tensor], torch.Tensor]
PatchEncoder = Callable[[torch.Tensor], torch.Tensor]


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_shard_names(split: str, count: int) -> list[str]:
    """Output names of a split's `count` shards, relative to the output folder: `SPLIT/000000.tar`, ..."""
    return [f"{split}/{i:06d}.tar" for i in range(count)]


def split_pattern(out: str | os.PathLike, split: str, count: int) -> str:
    """A brace pattern naming exactly the `count` output shards of `split` under `out`."""
    return os.path.join(os.fspath(out), split, "{000000..%06d}.tar" % (count - 1))


def _output_names(urls: Sequence[str]) -> list[str]:
    names, seen = [], {}
    for url in urls:
        name = os.path.basename(url.split("?")[0].rstrip("/"))
        if not name.endswith(".tar"):
            name += ".tar"
        if name in seen:
            raise ValueError(f"input shards {seen[name]} and {url} have the same file name {name!r}: output shards "
                             f"of one set of inputs are named after them; give the inputs as splits "
                             f"(`--train` / `--val`), whose outputs are numbered instead")
        seen[name] = url
        names.append(name)
    return names


SETTINGS = "encode.json"  # what the shards in a folder were made with, written before the first shard


def _check_settings(out: Path, settings: dict, rank: int) -> None:
    """A rerun resumes only the job that wrote the folder: other encoders, dtype, flips, std, image embeddings,
    image size, batch size (batches change float rounding) or sources would mix two kinds of shards under one
    manifest."""
    path = out / SETTINGS
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds shards of another encode job ({path} differs in {', '.join(changed)}): "
                             f"rerun that job's command to resume it, or write to another --out")
    elif rank == 0:
        tmp = path.with_name(path.name + TMP_SUFFIX)
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _npy_shape(data: bytes) -> list[int]:
    """An .npy's shape from its header alone."""
    stream = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return list(read(stream)[0])


def _shard_summary(path: Path) -> dict:
    """Samples, bytes and array shapes of a complete output shard (the first sample's), and every latent shape in
    it (buckets); from the .npy headers: no latent is decoded. The image embeddings are, into float64 sums
    (`_embedding_stats`)."""
    keys, shapes, latents = set(), {}, set()
    count, total, squares = 0, 0.0, 0.0
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, member = info.name.partition(".")
            keys.add(key)
            if member == "image_embedding.npy":
                data = io.BytesIO(tar.extractfile(info).read())
                embedding = np.load(data, allow_pickle=False).astype(np.float64)  # [E]
                count, total, squares = count + 1, total + embedding, squares + embedding * embedding
            if member == "latent.npy" or (member.endswith(".npy") and member[:-4] not in shapes):
                shape = _npy_shape(tar.extractfile(info).read())
                shapes.setdefault(member[:-4], shape)
                if member == "latent.npy":
                    latents.add(tuple(shape))
    return {"samples": len(keys), "bytes": path.stat().st_size, "shapes": shapes,
            "latent_shapes": [list(s) for s in sorted(latents)],
            **({"image_embedding": {"count": count, "sum": total, "sumsq": squares}} if count else {})}


def _embedding_stats(shards: list[dict], splits: dict[str, list[str]] | None) -> dict:
    """{"dim": E, "mean": [E], "std": [E]} (std with ddof 0, as numpy's) of the train split's image embeddings,
    every sample's without splits: what the prior normalises its targets by. From each shard's float64 sums
    (torchmetrics' way), so every sample counts whichever rank encoded it and whichever run wrote its shard."""
    train = None if not splits or "train" not in splits else set(split_shard_names("train", len(splits["train"])))
    parts = [s["image_embedding"] for s in shards
             if "image_embedding" in s and (train is None or s["name"] in train)]
    count = sum(p["count"] for p in parts)
    if not count:
        raise ValueError("no sample of the train split could be encoded: no image-embedding statistics")
    mean = sum(p["sum"] for p in parts) / count
    var = np.maximum(sum(p["sumsq"] for p in parts) / count - mean * mean, 0.0)  # rounding can dip below 0
    return {"dim": int(mean.shape[0]), "mean": mean.tolist(), "std": np.sqrt(var).tolist()}


def _encode_batch(samples: list[dict], encode_images: ImageEncoder, encode_captions: CaptionEncoder, flips: bool,
                  std: bool, embed_images: ImageEmbedder | None = None,
                  encode_patches: PatchEncoder | None = None) -> list[dict]:
    images = images_to_float(torch.stack([s["image"] for s in samples]))  # [B, 3, S, S] (clips [B, T, 3, S, S])
    arrays: dict[str, torch.Tensor] = {}
    views = [("latent", images)] + ([("latent_flip", images.flip(-1))] if flips else [])
    for name, view in views:
        if view.ndim == 5:  # clips: the image VAE frame by frame, latents [B, T, C, h, w]
            out = encode_images(view.flatten(0, 1))
            unflat = (lambda a: a.unflatten(0, view.shape[:2]))
            out = tuple(map(unflat, out)) if isinstance(out, (tuple, list)) else unflat(out)
        else:
            out = encode_images(view)
        if std:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise ValueError("with std, encode_images must return (mean, std)")
            arrays[name], arrays[f"{name}_std"] = out
        else:
            arrays[name] = out[0] if isinstance(out, (tuple, list)) else out
        if encode_patches is not None:  # of the image each latent was encoded from: REPA aligns to it
            suffix = name[len("latent"):]  # "" or "_flip"
            arrays[f"patch_features{suffix}"] = encode_patches(view).permute(0, 2, 3, 1)  # [B, h_c, w_c, W]
    context, mask, pooled = encode_captions([s["caption"] for s in samples])  # [B, L, W], [B, L], [B, E]
    if embed_images is not None:
        # normalised here as CLIP's loss compares them, whatever the caller; with --flips also the flipped image's,
        # the condition of unCLIP's decoder for a flipped latent
        clip_images = images_to_float(torch.stack([s["clip_image"] for s in samples]))  # [B, 3, S', S']
        arrays["image_embedding"] = F.normalize(embed_images(clip_images).float(), dim=-1)  # [B, E]
        if flips:
            arrays["image_embedding_flip"] = F.normalize(embed_images(clip_images.flip(-1)).float(), dim=-1)
    encoded = []
    for i, s in enumerate(samples):
        tokens = mask[i].bool()
        encoded.append({
            "key": s["key"], "caption": s["caption"], "attrs_json": s["attrs_json"],
            "context": context[i][tokens.to(context.device)],  # [n, W]: the caption's real tokens
            "pooled": pooled[i], "size": s["size"],
            **{name: a[i] for name, a in arrays.items()},
        })
    return encoded


def _encode_one_shard(url: str, out_path: Path, image_size: int, dtype: str, batch_size: int,
                      encode_images: ImageEncoder, encode_captions: CaptionEncoder, flips: bool, std: bool,
                      counter: SkipCounter, bar, buckets: BucketConfig | None = None,
                      embed_images: ImageEmbedder | None = None, clip_image_size: int | None = None,
                      frames: int | None = None, encode_patches: PatchEncoder | None = None) -> None:
    """One input shard -> one output shard. With buckets, each image at its bucket's size (crops drawn from a
    generator seeded by the output shard's name, so a redone shard is the same), encoded in batches of one
    bucket; a bucket's samples are written when its batch fills, the partial ones at the shard's end. With
    `embed_images`, each image also as CLIP sees it: its centre square at `clip_image_size`."""
    writer = LatentShardWriter(out_path, dtype)
    crop_rng = random.Random(f"lit_diffusion-encode-{out_path.name}")
    try:
        pending: dict[object, list[dict]] = {}

        def flush(key) -> None:
            samples = pending.pop(key)
            with torch.no_grad():
                for e in _encode_batch(samples, encode_images, encode_captions, flips, std, embed_images,
                                       encode_patches):
                    writer.write(e["key"], e["latent"], e["context"], e["pooled"], e["caption"], e["attrs_json"],
                                 latent_std=e.get("latent_std"), latent_flip=e.get("latent_flip"),
                                 latent_flip_std=e.get("latent_flip_std"), size=e["size"],
                                 image_embedding=e.get("image_embedding"),
                                 patch_features=e.get("patch_features"),
                                 patch_features_flip=e.get("patch_features_flip"),
                                 image_embedding_flip=e.get("image_embedding_flip"))
            bar.update(len(samples))

        for raw in shard_samples(url, counter):
            try:
                plan = None
                if buckets is not None:
                    plan, note = bucket_plan(raw, buckets, crop_rng)
                    if note:
                        counter.add(note)
                    if plan is None:
                        continue
                if frames:  # a clip: its frames, as the video data module decodes them
                    from lit_diffusion.data.video import VideoDecoder

                    clip = VideoDecoder(image_size, frames)(raw)
                    sample = {"image": clip["video"], "size": None, "caption": clip["caption"], "key": clip["key"]}
                else:
                    sample = decode_sample(raw, image_size, plan=plan)
                if embed_images is not None:
                    # CLIP's own preprocessing (its data module's decode at its size): the source's centre square,
                    # not the bucket's crop; a second decode unless the latent's image is that already
                    same = plan is None and image_size == clip_image_size
                    sample["clip_image"] = sample["image"] if same else decode_sample(raw, clip_image_size)["image"]
            except BadSample as bad:
                _report(counter, bad.reason, url, raw.get("__key__"), bad.detail)
                continue
            sample["attrs_json"] = raw.get("json")  # the source's attributes, byte for byte
            key = tuple(sample["image"].shape)
            pending.setdefault(key, []).append(sample)
            if len(pending[key]) == batch_size:
                flush(key)
        for key in sorted(pending):
            flush(key)
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def _sources_and_names(urls) -> tuple[list[str], list[str], dict[str, list[str]] | None]:
    """Every input shard, its output name, and the sources of each split (None for one set of inputs)."""
    if isinstance(urls, dict):
        unknown = sorted(set(urls) - {"train", "val", "test"})
        if unknown or not urls:
            raise ValueError(f"splits must be among train, val, test; got {sorted(urls)}")
        splits = {split: expand_urls(u, split=split) for split, u in urls.items() if u}
        sources = [url for shards in splits.values() for url in shards]
        names = [name for split, shards in splits.items() for name in split_shard_names(split, len(shards))]
        return sources, names, splits
    sources = expand_urls(urls)
    return sources, _output_names(sources), None


def encode_shards(
    urls: str | Iterable[str] | dict,
    out: str | os.PathLike,
    encode_images: ImageEncoder,
    encode_captions: CaptionEncoder,
    *,
    image_size: int,
    clip_hash: str,
    vae_hash: str,
    latent_scale: dict | None = None,
    dtype: str = "float16",
    flips: bool = False,
    std: bool = False,
    batch_size: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    buckets: BucketConfig | None = None,
    image_embeddings: bool = False,
    embed_images: ImageEmbedder | None = None,
    clip_image_size: int | None = None,
    frames: int | None = None,
    patch_features: bool = False,
    encode_patches: PatchEncoder | None = None,
) -> dict | None:
    """Encode every sample of `urls` into latent shards under `out`; returns the manifest on rank 0 (None on the
    others). `urls`: one set of shards, or {"train": urls, "val": urls} (outputs `SPLIT/NNNNNN.tar`). `buckets`:
    encode each image at its aspect bucket's size (`image_size` is then the buckets' base size). Rank and world size come from torch.distributed when it is initialised (all ranks must call this;
    it ends with collectives), or from the arguments. `latent_scale`: the VAE's scale (and mean), recorded.
    `image_embeddings`: also each sample's CLIP image embedding (`embed_images` at `clip_image_size`, CLIP's image
    size), float32, with their train-split mean and std in the manifest (unCLIP's prior).
    `frames`: the inputs are video-caption shards (`data.video`): each clip's first `frames` frames through
    `encode_images` frame by frame, latents [T, C, h, w] (no flips, buckets or image embeddings).
    `patch_features`: also the CLIP patch tokens of each latent's image (`encode_patches`; REPA's target), in
    `dtype`, their grid and width in the manifest (`patch_features`)."""
    rank, world_size = _rank_and_world(rank, world_size)
    if frames and (flips or buckets is not None or image_embeddings):
        raise ValueError("frames (clips): flips, buckets and image_embeddings are for images; leave them off")
    if frames and patch_features:
        raise ValueError("frames (clips): patch_features are for images (REPA aligns image models); leave it off")
    if patch_features and encode_patches is None:
        raise ValueError("patch_features needs encode_patches (a CLIP with an image tower)")
    if image_embeddings and (embed_images is None or clip_image_size is None):
        raise ValueError("image_embeddings needs embed_images and clip_image_size (a CLIP with an image tower)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    sources, names, splits = _sources_and_names(urls)
    out = Path(out)
    for split in splits or ():
        (out / split).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {"format": FORMAT, "version": VERSION, "text_mask": TEXT_MASK, "clip_hash": clip_hash,
                          "vae_hash": vae_hash,
                          "dtype": dtype, "flips": flips, "std": std, "image_size": image_size,
                          "batch_size": batch_size, "sources": sources,
                          **({"outputs": names} if splits else {}),
                          **({"buckets": dataclasses.asdict(buckets)} if buckets else {}),
                          # only when on: a folder written before the flag existed resumes as it did
                          **({"image_embeddings": True, "clip_image_size": clip_image_size}
                             if image_embeddings else {}),
                          **({"frames": frames} if frames else {}),
                          **({"patch_features": True} if patch_features else {})}, rank)
    counter = SkipCounter()
    done: list[dict] = []
    with tqdm(desc=f"encode (rank {rank})", unit="sample", unit_scale=True, disable=not progress or rank != 0,
              dynamic_ncols=True) as bar:
        for index in range(rank, len(sources), world_size):
            url, path = sources[index], out / names[index]
            if path.exists():  # complete: it appears under its final name only after the rename
                log.info("output shard %s exists: skipped", path)
            else:
                path.with_name(path.name + TMP_SUFFIX).unlink(missing_ok=True)  # what a killed run left
                before = counter.counts()
                _encode_one_shard(url, path, image_size, dtype, batch_size, encode_images, encode_captions,
                                  flips, std, counter, bar, buckets,
                                  embed_images if image_embeddings else None, clip_image_size, frames,
                                  encode_patches if patch_features else None)
                after = counter.counts()
                log.info("encoded %s -> %s (skipped %s)", url, path,
                         {r: after[r] - before[r] for r in SKIP_REASONS if after[r] != before[r]})
            done.append({"index": index, "name": names[index], "source": url, **_shard_summary(path)})
    mine = {"shards": done, "skipped": counter.counts()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # also the barrier: every shard is complete past this point
    else:
        everyone = [mine]
    manifest = None
    if rank == 0:
        shards = sorted((s for part in everyone for s in part["shards"]), key=lambda s: s["index"])
        if len(shards) != len(sources):
            raise RuntimeError(f"{len(shards)} of {len(sources)} output shards reported: was world_size={world_size} "
                               f"given to every rank?")
        shapes = next((s["shapes"] for s in shards if s["samples"]), None)
        if shapes is None:
            raise ValueError(f"no sample of {len(sources)} shards ({sources[0]}, ...) could be encoded")
        manifest = {
            "format": FORMAT, "version": VERSION, "text_mask": TEXT_MASK,
            "clip_hash": clip_hash, "vae_hash": vae_hash, "latent_scale": latent_scale,
            "dtype": dtype, "flips": flips, "std": std, "image_embeddings": image_embeddings,
            "image_size": image_size,
            **({"frames": frames} if frames else {}),
            **({"image_embedding": {**_embedding_stats(shards, splits), "flips": flips}} if image_embeddings else {}),
            **({"patch_features": {"grid": shapes["patch_features"][:2], "dim": shapes["patch_features"][2],
                                   "dtype": dtype}} if patch_features else {}),
            "shapes": {"latent": shapes["latent"] if buckets is None else [shapes["latent"][0], None, None],
                       "context": [None, shapes["context"][1]], "pooled": shapes["pooled"]},
            **({"buckets": [list(b) for b in buckets.buckets],
                "latent_shapes": sorted({tuple(x) for s in shards for x in s["latent_shapes"]})}
               if buckets is not None else {}),
            "samples": sum(s["samples"] for s in shards),
            # skips of this run only: a resumed run does not re-read the shards it finds complete
            "skipped": {r: sum(p["skipped"][r] for p in everyone) for r in SKIP_REASONS},
            "shards": [{k: s[k] for k in ("name", "source", "samples", "bytes")} for s in shards],
            "sources": sources,
            **({"splits": {split: split_shard_names(split, len(shards)) for split, shards in splits.items()}}
               if splits else {}),
        }
        write_manifest(out, manifest)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # nobody returns before the manifest exists
    return manifest
