"""DataModules over WebDataset shards: image-caption shards, and the latent shards `data encode` makes from them.

ImageCaptionDataModule batches: {"image": float [B,3,S,S] in [-1,1], "caption": list[str], "attrs": list[dict]
({} if no .json), "key": list[str]}. Captions stay raw: the stage that owns the text encoder tokenizes.
LatentDataModule batches: see there.

`batch_size` is per device: the global batch is batch_size x world size x accumulate_grad_batches.

Train: every (rank, worker) draws shards with replacement using its own seed (seed, rank, worker, epoch), then
shuffles samples in a buffer; every rank yields exactly `train_batches_per_epoch` batches per epoch, so uneven
shards can neither starve a rank nor hang DDP.
Val/test: every sample exactly once across ranks x workers (see `ExactlyOnceStream`). A rank may then get one
batch more than another: log validation metrics through torchmetrics or with sync at epoch end, not with a
per-step collective.
Resume: a checkpoint saved in the middle of an epoch resumes it where it stopped, drawing exactly the batches
the uninterrupted run would have drawn next (see `EpochLoader`).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Iterator

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lit_diffusion.data.buckets import BucketConfig
from lit_diffusion.data.latents import (
    MANIFEST,
    LatentDecoder,
    check_hashes,
    check_shards,
    collate_latents,
    latent_shape_key,
    read_manifest,
)
from lit_diffusion.data.shards import (
    POSITION_KEY,
    ExactlyOnceStream,
    ResampledTrainStream,
    SharedEpoch,
    SkipCounter,
    collate,
    expand_urls,
    images_to_float,
)

log = logging.getLogger(__name__)


def _identity(batch):
    return batch


class EpochLoader:
    """The train DataLoader with a length (its workers together yield `num_batches` per epoch), resumable in the
    middle of an epoch.

    The data epoch (which seeds the workers' shard and sample draws) is set when the first batch of an epoch is
    drawn, from the trainer's epoch when there is one: Lightning may create the iterator before it has restored
    a resumed run's loop state, so reading the epoch at `iter()` time would replay epoch 0's draws.

    Workers hand over uint8 images (a quarter of the bytes; small batches as numpy arrays, see
    `shards.INLINE_BATCH_BYTES`). They become float in [-1, 1] here, or, when `images_on_device()` says a trainer
    moves the batches, after the move (`ImageCaptionDataModule.transfer_batch_to_device`): a quarter of the
    host-to-GPU bytes too.

    Resume (`state_dict` / `load_state_dict`, which Lightning saves with the fit loop and restores before it
    iterates): the state is the epoch, the batches consumed in it and every rank's workers' positions in their
    streams. Consumed means handed to a training step: Lightning fetches one batch ahead, so the count is the
    trainer's (`consumed_batches()`, its batch progress), not how many were drawn here. Every rank consumes the
    same count, but their positions differ and Lightning writes rank 0's state only, so under DDP `state_dict`
    gathers them (a collective: every rank saves, as `Trainer.save_checkpoint` requires anyway).
    """

    def __init__(self, loader: DataLoader, num_batches: int, epoch: SharedEpoch, trainer_epoch=None,
                 images_on_device=None, consumed_batches=None, rank: int = 0, world_size: int = 1):
        self.loader, self.num_batches, self.epoch = loader, num_batches, epoch
        self.trainer_epoch = trainer_epoch  # () -> int | None
        self.images_on_device = images_on_device  # () -> bool
        self.consumed_batches = consumed_batches  # () -> int | None: batches of this epoch the trainer consumed
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, loader.num_workers)
        self._started = False
        self._drawn = 0  # batches drawn from the loader this epoch, a resumed epoch's consumed ones included
        self._positions: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}  # (worker, batches) -> (drawn, bad)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return self._batches()

    def _batches(self) -> Iterator[dict]:
        epoch = self.trainer_epoch() if self.trainer_epoch is not None else None
        if epoch is not None:
            self.epoch.set(epoch)
        elif self._started:
            self.epoch.set(self.epoch.value + 1)
        self._started = True
        resume = self.loader.dataset.resume
        resumed = resume is not None and resume["epoch"] == self.epoch.value
        self._drawn = resume["batches"] if resumed else 0
        self._positions.clear()
        if resumed:  # a checkpoint saved before every worker has yielded again still knows where each one is
            for w, p in resume["workers"].items():
                if "drawn" in p:
                    self._positions[(w, p["batches"])] = (p["drawn"], tuple(p["bad"]))
        on_device = self.images_on_device is not None and self.images_on_device()
        for batch in self.loader:
            worker, batches, drawn, bad = batch.pop(POSITION_KEY)
            self._positions[(worker, batches)] = (drawn, bad)
            self._positions.pop((worker, batches - 4), None)  # Lightning is at most a batch or two behind
            self._drawn += 1
            if not on_device and "image" in batch:
                batch = {**batch, "image": images_to_float(batch["image"]),
                         **({"size": torch.as_tensor(batch["size"])} if batch.get("size") is not None else {})}
            elif not on_device and "video" in batch:
                batch = {**batch, "video": images_to_float(batch["video"])}
            yield batch

    def _my_positions(self, consumed: int) -> dict:
        """This rank's workers' positions after `consumed` batches of the epoch (round-robin: worker w produced
        batches w, w + n, ...)."""
        n = self.num_workers
        workers = {}
        for w in range(n):
            batches = consumed // n + (w < consumed % n)
            entry = {"batches": batches}
            if batches and (w, batches) in self._positions:
                drawn, bad = self._positions[(w, batches)]
                entry.update(drawn=drawn, bad=list(bad))
            elif not batches:
                entry.update(drawn=0, bad=[])
            workers[w] = entry  # without "drawn" (not recorded), a resume replays by decoding: slower, still exact
        return workers

    def state_dict(self) -> dict:
        consumed = self.consumed_batches() if self.consumed_batches is not None else None
        consumed = self._drawn if consumed is None else min(consumed, self._drawn)
        mine = self._my_positions(consumed)
        ranks = [mine]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        return {"epoch": self.epoch.value, "batches": consumed, "num_workers": self.num_workers,
                "world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        """Resume the saved epoch after its consumed batches; takes effect at the next `iter()` (before the
        workers start)."""
        dataset = self.loader.dataset
        consumed = int(state.get("batches", 0))
        if not state or consumed <= 0 or consumed >= self.num_batches:
            dataset.resume = None  # at an epoch boundary: the epoch number alone restarts the stream
            return
        n = self.num_workers
        same = state.get("world_size") == self.world_size and state.get("num_workers") == n
        if same:
            workers = {int(w): p for w, p in state["ranks"][self.rank].items()}
        else:
            log.warning(f"resuming mid-epoch with world size {self.world_size} x {n} workers, saved with "
                        f"{state.get('world_size')} x {state.get('num_workers')}: each worker replays (decoding) "
                        f"its share of the {consumed} consumed batches of its own stream")
            workers = {w: {"batches": consumed // n + (w < consumed % n)} for w in range(n)}
        dataset.resume = {"epoch": int(state["epoch"]), "batches": consumed, "num_workers": n,
                          "offset": consumed % n, "workers": workers}


class _ShardDataModule(L.LightningDataModule):
    """What image-caption and latent data modules share: the knobs, rank discovery, the resumable train loader
    and the exactly-once eval loader. Subclasses say how samples decode (`_decode`) and collate (`_collate`)."""

    def _init_common(self, train_urls, val_urls, batch_size, num_workers, train_batches_per_epoch, shuffle_buffer,
                     random_flip, val_max_samples, seed, pin_memory, persistent_workers, prefetch_factor) -> None:
        if batch_size < 1 or train_batches_per_epoch < 1:
            raise ValueError(
                f"batch_size={batch_size} and train_batches_per_epoch={train_batches_per_epoch} must be >= 1"
            )
        self.train_urls, self.val_urls = train_urls, val_urls
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_batches_per_epoch, self.shuffle_buffer = train_batches_per_epoch, shuffle_buffer
        self.random_flip, self.val_max_samples, self.seed = random_flip, val_max_samples, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.prefetch_factor = prefetch_factor
        self.train_shards: list[str] | None = None
        self.val_shards: list[str] | None = None
        self.train_skips, self.val_skips = SkipCounter(), SkipCounter()
        self._epoch = SharedEpoch()
        self.bucket_config: BucketConfig | None = getattr(self, "bucket_config", None)

    def _decode(self, split: str):
        return None  # the streams' default: image-caption samples

    def _collate(self, train: bool):
        return None

    def _bucket_key(self):
        return None  # samples of several sizes decoded as they are (latents): what groups them into batches

    @property
    def buckets(self) -> list | None:
        """The sizes a batch can have, or None when every sample has one size (the stage checks it)."""
        return self.bucket_config.buckets if self.bucket_config is not None else None

    def setup(self, stage: str | None = None) -> None:
        # Expand (and check) URLs here, so a typo fails before any worker starts.
        name = type(self).__name__
        if stage in (None, "fit"):
            if self.train_urls is None:
                raise ValueError(f"{name}: train_urls is required for fit")
            self.train_shards = expand_urls(self.train_urls, split="train")
        if stage in (None, "fit", "validate", "test") and self.val_urls is not None:
            self.val_shards = expand_urls(self.val_urls, split="val")
            twice = sorted({u for u in self.val_shards if self.val_shards.count(u) > 1})
            if twice:  # in training a shard listed twice is drawn twice as often; here it would be counted twice
                raise ValueError(f"{name}: val_urls lists {', '.join(twice[:3])} more than once: validation and the "
                                 f"in-loop evaluation would count its samples twice")
        if stage in ("validate", "test") and self.val_urls is None:
            raise ValueError(f"{name}: val_urls is required for {stage}")

    def rank_and_world_size(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _loader(self, dataset, batched: bool) -> DataLoader:
        extra = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": self.persistent_workers, "prefetch_factor": self.prefetch_factor}
        return DataLoader(
            dataset,
            batch_size=None if batched else self.batch_size,
            # batched streams collate in the worker; the identity stops DataLoader from walking every batch
            collate_fn=_identity if batched else (self._collate(train=False) or collate),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **extra,
        )

    def _consumed_batches(self) -> int | None:
        """Batches of this epoch the trainer has handed to training steps (its batch progress counts a batch as
        ready after fetching it, before the step; the one fetched ahead is not counted)."""
        trainer = self.trainer
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> EpochLoader:
        if self.train_shards is None:
            self.setup("fit")
        rank, world_size = self.rank_and_world_size()
        dataset = ResampledTrainStream(
            self.train_shards,
            getattr(self, "image_size", None),
            batch_size=self.batch_size,
            batches_per_epoch=self.train_batches_per_epoch,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            random_flip=self.random_flip,
            counter=self.train_skips,
            epoch=self._epoch,
            decode=self._decode("train"),
            collate_fn=self._collate(train=True),
            buckets=self.bucket_config,
            bucket_key=self._bucket_key(),
        )
        return EpochLoader(self._loader(dataset, batched=True), self.train_batches_per_epoch, self._epoch,
                           trainer_epoch=lambda: self.trainer.current_epoch if self.trainer is not None else None,
                           # a trainer calls transfer_batch_to_device, which converts after the move
                           images_on_device=lambda: self.trainer is not None,
                           consumed_batches=self._consumed_batches, rank=rank, world_size=world_size)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self.eval_dataloader(self.val_max_samples)

    def eval_dataloader(self, num_samples: int | None = None) -> DataLoader:
        """The val stream limited to its first `num_samples` samples (all when None), each seen exactly once
        across ranks x workers; for evaluation outside `Trainer.validate` (FID, CLIP score)."""
        if self.val_urls is None:
            raise ValueError(f"{type(self).__name__}: val_urls is required for evaluation")
        if self.val_shards is None:
            self.setup("validate")
        rank, world_size = self.rank_and_world_size()
        dataset = ExactlyOnceStream(
            self.val_shards,
            getattr(self, "image_size", None),
            rank=rank,
            world_size=world_size,
            max_samples=num_samples,
            counter=self.val_skips,
            decode=self._decode("val"),
            buckets=self.bucket_config,
            bucket_key=self._bucket_key(),
            batch_size=self.batch_size,
            collate_fn=self._collate(train=False),
        )
        bucketed = self.bucket_config is not None or self._bucket_key() is not None
        return self._loader(dataset, batched=bucketed)  # bucketed: batches of one size each, made in the stream

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def skipped(self) -> dict[str, dict[str, int]]:
        """Samples/shards skipped on this rank so far, by reason, summed over workers."""
        return {"train": self.train_skips.counts(), "val": self.val_skips.counts()}

    def state_dict(self) -> dict:
        return {"epoch": self._epoch.value}

    def load_state_dict(self, state_dict: dict) -> None:
        self._epoch.set(int(state_dict.get("epoch", 0)))


class ImageCaptionDataModule(_ShardDataModule):
    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 2,
        train_batches_per_epoch: int = 100,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        val_max_samples: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int = 4,
        buckets: dict | None = None,
    ):
        """
        train_urls / val_urls: shard brace pattern, glob, directory (reads `train-*.tar` / `val-*.tar`),
            `pipe:` command, http(s) URL, or a list of these.
        buckets: train at any aspect ratio: `data.buckets.BucketConfig` fields ({base_size, min_aspect,
            max_aspect, step, crop, small}; base_size defaults to image_size). Each sample goes to the bucket
            nearest its aspect ratio, resized to cover it and cropped (random or centre: `crop`), and every batch
            is one bucket's (see `shards.ResampledTrainStream._bucketed`). None: every image resized and
            centre-cropped to image_size x image_size.
        batch_size: per device (global = batch_size x world size x gradient accumulation).
        train_batches_per_epoch: batches each rank yields per training epoch.
        shuffle_buffer: samples held for shuffling in each train worker (memory: that many encoded images).
        val_max_samples: validate on the first N samples (shard order), split across ranks.
        seed: seeds shard draws, sample shuffling and flips (independent of `seed_everything`).
        pin_memory / persistent_workers: None = on when CUDA is available / when num_workers > 0.
        """
        super().__init__()
        self.save_hyperparameters()
        self.image_size = image_size
        try:
            self.bucket_config = None if buckets is None else BucketConfig(**{"base_size": image_size, **buckets})
        except (TypeError, ValueError) as err:
            raise ValueError(f"data.init_args.buckets: {err}") from None
        self._init_common(train_urls, val_urls, batch_size, num_workers, train_batches_per_epoch, shuffle_buffer,
                          random_flip, val_max_samples, seed, pin_memory, persistent_workers, prefetch_factor)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # only the images go to the device: walking the captions' and attributes' nested Python objects costs
        # milliseconds per step (measured: ~3 ms, a third of a tiny CLIP step)
        if isinstance(batch, dict) and "image" in batch:
            image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)  # small train batches: numpy
            moved = {"image": images_to_float(image) if image.dtype == torch.uint8 else image}
            if batch.get("size") is not None:
                moved["size"] = torch.as_tensor(batch["size"]).to(device, non_blocking=True)
            return {**batch, **moved}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


LATENT_TENSORS = ("latent", "latent_std", "context", "mask", "pooled", "size", "image_embedding", "patch_features")


def _layout(manifest: dict) -> tuple:
    """What the model must read alike in both splits' shards."""
    return (manifest["shapes"], manifest["dtype"], (manifest.get("image_embedding") or {}).get("dim"),
            bool(manifest.get("std")))


def _manifest_beside(shard: str) -> str:
    """The manifest of a local latent shard: beside it, or one folder up for a split's shards (`data encode` with
    splits writes SPLIT/*.tar); where neither exists, the path beside it (read_manifest names it missing)."""
    here = os.path.dirname(shard)
    return next((os.path.join(d, MANIFEST) for d in (here, os.path.dirname(here))
                 if os.path.isfile(os.path.join(d, MANIFEST))), os.path.join(here, MANIFEST))


class LatentDataModule(_ShardDataModule):
    """Latent shards (`lit-diffusion data encode`) with the guarantees of `ImageCaptionDataModule`.

    Batches: {"latent": float32 [B,C,h,w] (scaled as `VAEModule.encode` gives), "context": [B,L,W] CLIP token
    features zero-padded, "mask": [B,L] bool (True on real tokens), "pooled": [B,E], "caption", "attrs", "key"}
    (+ "latent_std" [B,C,h,w] with std shards, "image_embedding" float32 [B,E] with --image-embeddings shards); L is
    the batch's longest caption, or `context_length`. With `random_flip`, each sample's latent is its flipped
    image's with p = 0.5 (shards encoded with --flips); its image embedding stays the unflipped image's.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        train_batches_per_epoch: int = 100,
        shuffle_buffer: int = 1000,
        random_flip: bool = False,
        val_max_samples: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        persistent_workers: bool | None = None,
        prefetch_factor: int = 4,
        context_length: int | None = None,
        expected_hashes: dict[str, str] | None = None,
        manifest: str | None = None,
    ):
        """
        The knobs of ImageCaptionDataModule (but image_size: the shards fix it), and:
        context_length: pad every batch's context to this many tokens (None: to the batch's longest caption).
        expected_hashes: {"clip": hash, "vae": hash} (`latents.state_dict_hash` of the weights the model holds):
            shards whose manifest names other weights are refused, naming both hashes.
        manifest: the manifest.json to check the shards against (default: the one beside the first shard of
            each split, which must then be local).
        """
        super().__init__()
        self.save_hyperparameters()
        self.context_length, self.expected_hashes, self.manifest_path = context_length, expected_hashes, manifest
        self.manifest: dict | None = None  # the last split's; `manifests` holds each split's
        self.manifests: dict[str, dict] = {}  # "train" / "val" -> its manifest, after `setup`
        self._init_common(train_urls, val_urls, batch_size, num_workers, train_batches_per_epoch, shuffle_buffer,
                          random_flip, val_max_samples, seed, pin_memory, persistent_workers, prefetch_factor)

    def _check(self, shards: list[str]) -> dict:
        source = self.manifest_path
        if source is None:
            remote = next((u for u in shards if "://" in u.removeprefix("file:") or u.startswith("pipe:")), None)
            if remote is not None:
                raise ValueError(f"remote latent shards ({remote}): give the manifest's local path as "
                                 f"`manifest` (data.init_args.manifest)")
            found = sorted({_manifest_beside(u.removeprefix("file:")) for u in shards})
            if len(found) > 1:  # each would be checked against the first's hashes by name and size alone
                raise ValueError(f"latent shards of several encode jobs ({', '.join(found[:3])}): a split's shards "
                                 f"must come from one `data encode`, or give its manifest as data.init_args.manifest")
            source = found[0]
        manifest = read_manifest(source)
        check_shards(manifest, shards)
        check_hashes(manifest, self.expected_hashes)
        if self.random_flip and not manifest["flips"]:
            raise ValueError(f"random_flip needs flipped latents, but {manifest['path']} says the shards were "
                             f"encoded without them (`data encode --flips`)")
        if self.random_flip and manifest.get("image_embedding") and not manifest["image_embedding"].get("flips"):
            raise ValueError(f"random_flip needs the flipped images' CLIP embeddings too, but {manifest['path']}'s "
                             f"shards were encoded before they were written: encode them again "
                             f"(`data encode --flips --image-embeddings`)")
        if self.manifest is not None and _layout(manifest) != _layout(self.manifest):
            raise ValueError(f"{manifest['path']} and {self.manifest['path']} disagree on shapes, dtype, image "
                             f"embeddings or std (`data encode --std`)")
        return manifest

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            if shards:
                self.manifest = self.manifests[split] = self._check(shards)

    def _decode(self, split: str):
        # the split's own manifest: two `data encode` runs may have written the two splits (other latent sizes)
        return LatentDecoder.from_manifest(self.manifests.get(split, self.manifest), self.context_length)

    def _bucket_key(self):
        # batches of one latent shape where either split was encoded at buckets
        return latent_shape_key if any(m.get("buckets") for m in self.manifests.values()) else None

    @property
    def buckets(self) -> list | None:
        """The aspect buckets the latents were encoded at (`data encode` with buckets), else None."""
        return (self.manifest or {}).get("buckets")

    def _collate(self, train: bool):
        return partial(collate_latents, context_length=self.context_length)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # the tensors only: captions and attributes stay on the host (see ImageCaptionDataModule)
        if isinstance(batch, dict) and "latent" in batch:
            return {k: v.to(device, non_blocking=True) if k in LATENT_TENSORS else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)
