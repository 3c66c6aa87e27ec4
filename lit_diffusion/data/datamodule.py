"""Image-caption DataModule over WebDataset shards.

Batches: {"image": float [B,3,S,S] in [-1,1], "caption": list[str], "attrs": list[dict] ({} if no .json),
"key": list[str]}. Captions stay raw: the stage that owns the text encoder tokenizes.

`batch_size` is per device: the global batch is batch_size x world size x accumulate_grad_batches.

Train: every (rank, worker) draws shards with replacement using its own seed (seed, rank, worker, epoch), then
shuffles samples in a buffer; every rank yields exactly `train_batches_per_epoch` batches per epoch, so uneven
shards can neither starve a rank nor hang DDP.
Val/test: every sample exactly once across ranks x workers (see `ExactlyOnceStream`). A rank may then get one
batch more than another: log validation metrics through torchmetrics or with sync at epoch end, not with a
per-step collective.
"""

from __future__ import annotations

from typing import Iterator

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from lit_diffusion.data.shards import (
    ExactlyOnceStream,
    ResampledTrainStream,
    SharedEpoch,
    SkipCounter,
    collate,
    expand_urls,
    images_to_float,
)


def _identity(batch):
    return batch


class EpochLoader:
    """The train DataLoader with a length (its workers together yield `num_batches` per epoch).

    The data epoch (which seeds the workers' shard and sample draws) is set when the first batch of an epoch is
    drawn, from the trainer's epoch when there is one: Lightning may create the iterator before it has restored
    a resumed run's loop state, so reading the epoch at `iter()` time would replay epoch 0's draws.

    Workers hand over uint8 images (a quarter of the bytes; small batches as numpy arrays, see
    `shards.INLINE_BATCH_BYTES`). They become float in [-1, 1] here, or, when `images_on_device()` says a trainer
    moves the batches, after the move (`ImageCaptionDataModule.transfer_batch_to_device`): a quarter of the
    host-to-GPU bytes too.
    """

    def __init__(self, loader: DataLoader, num_batches: int, epoch: SharedEpoch, trainer_epoch=None,
                 images_on_device=None):
        self.loader, self.num_batches, self.epoch = loader, num_batches, epoch
        self.trainer_epoch = trainer_epoch  # () -> int | None
        self.images_on_device = images_on_device  # () -> bool
        self._started = False

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
        if self.images_on_device is not None and self.images_on_device():
            yield from self.loader
            return
        for batch in self.loader:
            yield {**batch, "image": images_to_float(batch["image"])}


class ImageCaptionDataModule(L.LightningDataModule):
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
    ):
        """
        train_urls / val_urls: shard brace pattern, glob, directory (reads `train-*.tar` / `val-*.tar`),
            `pipe:` command, http(s) URL, or a list of these.
        batch_size: per device (global = batch_size x world size x gradient accumulation).
        train_batches_per_epoch: batches each rank yields per training epoch.
        shuffle_buffer: samples held for shuffling in each train worker (memory: that many encoded images).
        val_max_samples: validate on the first N samples (shard order), split across ranks.
        seed: seeds shard draws, sample shuffling and flips (independent of `seed_everything`).
        pin_memory / persistent_workers: None = on when CUDA is available / when num_workers > 0.
        """
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1 or train_batches_per_epoch < 1:
            raise ValueError(
                f"batch_size={batch_size} and train_batches_per_epoch={train_batches_per_epoch} must be >= 1"
            )
        self.train_urls, self.val_urls = train_urls, val_urls
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.train_batches_per_epoch, self.shuffle_buffer = train_batches_per_epoch, shuffle_buffer
        self.random_flip, self.val_max_samples, self.seed = random_flip, val_max_samples, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.prefetch_factor = prefetch_factor
        self.train_shards: list[str] | None = None
        self.val_shards: list[str] | None = None
        self.train_skips, self.val_skips = SkipCounter(), SkipCounter()
        self._epoch = SharedEpoch()

    def setup(self, stage: str | None = None) -> None:
        # Expand (and check) URLs here, so a typo fails before any worker starts.
        if stage in (None, "fit"):
            if self.train_urls is None:
                raise ValueError("ImageCaptionDataModule: train_urls is required for fit")
            self.train_shards = expand_urls(self.train_urls, split="train")
        if stage in (None, "fit", "validate", "test") and self.val_urls is not None:
            self.val_shards = expand_urls(self.val_urls, split="val")
        if stage in ("validate", "test") and self.val_urls is None:
            raise ValueError(f"ImageCaptionDataModule: val_urls is required for {stage}")

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
            collate_fn=_identity if batched else collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **extra,
        )

    def train_dataloader(self) -> EpochLoader:
        if self.train_shards is None:
            self.setup("fit")
        rank, world_size = self.rank_and_world_size()
        dataset = ResampledTrainStream(
            self.train_shards,
            self.image_size,
            batch_size=self.batch_size,
            batches_per_epoch=self.train_batches_per_epoch,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            random_flip=self.random_flip,
            counter=self.train_skips,
            epoch=self._epoch,
        )
        return EpochLoader(self._loader(dataset, batched=True), self.train_batches_per_epoch, self._epoch,
                           trainer_epoch=lambda: self.trainer.current_epoch if self.trainer is not None else None,
                           # a trainer calls transfer_batch_to_device, which converts after the move
                           images_on_device=lambda: self.trainer is not None)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_urls is None:
            return []
        return self.eval_dataloader(self.val_max_samples)

    def eval_dataloader(self, num_samples: int | None = None) -> DataLoader:
        """The val stream limited to its first `num_samples` samples (all when None), each seen exactly once
        across ranks x workers; for evaluation outside `Trainer.validate` (FID, CLIP score)."""
        if self.val_urls is None:
            raise ValueError("ImageCaptionDataModule: val_urls is required for evaluation")
        if self.val_shards is None:
            self.val_shards = expand_urls(self.val_urls, split="val")
        rank, world_size = self.rank_and_world_size()
        dataset = ExactlyOnceStream(
            self.val_shards,
            self.image_size,
            rank=rank,
            world_size=world_size,
            max_samples=num_samples,
            counter=self.val_skips,
        )
        return self._loader(dataset, batched=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def skipped(self) -> dict[str, dict[str, int]]:
        """Samples/shards skipped on this rank so far, by reason, summed over workers."""
        return {"train": self.train_skips.counts(), "val": self.val_skips.counts()}

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # only the images go to the device: walking the captions' and attributes' nested Python objects costs
        # milliseconds per step (measured: ~3 ms, a third of a tiny CLIP step)
        if isinstance(batch, dict) and "image" in batch:
            image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)  # small train batches: numpy
            return {**batch, "image": images_to_float(image) if image.dtype == torch.uint8 else image}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch.value}

    def load_state_dict(self, state_dict: dict) -> None:
        self._epoch.set(int(state_dict.get("epoch", 0)))
