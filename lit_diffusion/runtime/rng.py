"""Bit-exact resume: the random numbers a training step draws (noise, timesteps, condition dropout, posterior
draws, dropout masks) are the same whether the run was interrupted or not.

A checkpoint holds weights, optimizer, EMA and the data position; without the generators' states a resumed run
draws other noise from the first step on, and ends with other weights. Saving the global states at checkpoint
time is not enough either: between a checkpoint and the next step the uninterrupted run and the resumed one draw
different amounts for things that are not training (a resumed run creates its DataLoader iterator mid-epoch, which
draws a worker seed; validation, sample grids and evaluation may draw). So the training steps get a stream of
their own: `TrainingRNG` swaps the training stream's state in before every step (`on_train_batch_start`) and
out after it (`on_train_batch_end`), and checkpoints it, for every rank: torch's CPU generator, the current CUDA
device's, numpy's and Python's. What runs between steps draws from the other stream, which is not saved.
Under DDP each rank's training stream is its own (`split_per_rank`): the ranks are seeded alike, and would
otherwise draw the same noise and timesteps for their i-th samples.
The loader workers draw from nothing global: their shard, shuffle and flip draws are seeded by (seed, rank,
worker, epoch) and positioned by the data module's own state (`data.datamodule.EpochLoader`).
"""

from __future__ import annotations

import hashlib
import logging
import random

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("lit_diffusion")


def key_seed(key: str) -> int:
    """A sample's own seed, the same on every rank and in every batch: 52 bits of blake2b of its key (exact in a
    float64, which also orders the gathered evaluation by key)."""
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=8).digest(), "little") >> 12


def get_states() -> dict:
    """The global generators' states: torch CPU (and the current CUDA device's), numpy, Python."""
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _portable(states: dict) -> dict:
    """The states as `torch.load(weights_only=True)` reads them back: tensors, lists, numbers and strings."""
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    version, internal, python_gauss = states["python"]
    out = {"torch": states["torch"], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                int(has_gauss), float(gauss)],
           "python": [int(version), list(internal), python_gauss]}
    if "cuda" in states:
        out["cuda"] = states["cuda"]
    return out


def _native(saved: dict) -> dict:
    kind, keys, pos, has_gauss, gauss = saved["numpy"]
    version, internal, python_gauss = saved["python"]
    out = {"torch": saved["torch"], "numpy": (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss),
           "python": (version, tuple(internal), python_gauss)}
    if "cuda" in saved:
        out["cuda"] = saved["cuda"]
    return out


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def split_per_rank() -> None:
    """Give each rank a training stream of its own, derived from the global state and the rank. Every rank is
    seeded alike (`seed_everything`, so that the weights start equal), and without this each rank would draw the
    same timesteps, noise and condition dropout for its i-th sample as every other rank: W ranks would make one
    draw per batch position, not W. Rank 0 keeps the global state, so one process draws what it always drew."""
    rank, world = _rank_and_world()
    if world == 1 or rank == 0:
        return
    digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes() + f"/rank{rank}".encode(), digest_size=8)
    seed = int.from_bytes(digest.digest(), "little") >> 1
    torch.manual_seed(seed)  # the CPU generator and every CUDA device's
    np.random.seed(seed % 2**32)
    random.seed(seed)


class TrainingRNG(Callback):
    """The training steps' own random stream, saved in checkpoints for every rank and restored on resume."""

    def __init__(self) -> None:
        self._training: dict | None = None  # the training stream between steps (None: not split off yet)
        self._outside: dict | None = None  # the other stream, while a step runs
        self._inside = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._outside = get_states()
        if self._training is not None:
            set_states(self._training)
        else:
            split_per_rank()
        self._inside = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._training = get_states()
        set_states(self._outside)
        self._outside, self._inside = None, False

    def _mine(self) -> dict:
        # a checkpoint written during a step's end hooks (before this callback's) holds the state after the step
        return get_states() if self._inside or self._training is None else self._training

    def state_dict(self) -> dict:
        mine = _portable(self._mine())
        ranks = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)  # a collective: every rank saves (Trainer.save_checkpoint)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks") or []
        rank, world = _rank_and_world()
        if len(ranks) != world:
            log.warning("resuming with world size %d from random states saved by %d ranks: the training steps "
                        "draw other random numbers than the uninterrupted run would have", world, len(ranks))
            self._training = None
            return
        self._training = _native(ranks[rank])
