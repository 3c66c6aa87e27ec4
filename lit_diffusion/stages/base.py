"""The base of every stage: how a stage checkpoint is written, read safely and rebuilt, and where frozen helpers live.

A stage checkpoint is a Lightning checkpoint plus a `lit_diffusion` block (`stage_block`): the stage's kind, the
format version and whatever the stage needs to rebuild itself without its original files (configs, tokenizer,
latent scale, embedded frozen stages). `Stage.from_checkpoint(path)` reads it with `weights_only=True` (no code
runs from a checkpoint), checks kind and version, rebuilds the module from its saved init arguments, loads the
weights strictly and returns it in eval mode on `map_location`.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any, ClassVar, Self

import lightning as L
import torch

from lit_diffusion.errors import UsageError

CHECKPOINT_VERSION = 1


class CheckpointError(UsageError):
    """A stage checkpoint that is missing, unreadable, unsafe or of the wrong kind."""


def stage_block(kind: str, **fields: Any) -> dict:
    """The `checkpoint["lit_diffusion"]` block every stage writes in `on_save_checkpoint`."""
    return {"kind": kind, "version": CHECKPOINT_VERSION, **fields}


def check_block(ckpt: Any, kind: str, source: str) -> dict:
    """The `lit_diffusion` block of a `kind` checkpoint of a version this code reads."""
    block = ckpt.get("lit_diffusion") if isinstance(ckpt, dict) else None
    if not isinstance(block, dict) or "kind" not in block:
        raise CheckpointError(f"{source} is not a lit_diffusion stage checkpoint (no 'lit_diffusion' block)")
    if block["kind"] != kind:
        raise CheckpointError(f"{source} is a {block['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    if block.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{source} was written by a newer lit_diffusion (version {block['version']})")
    return block


def load_stage_checkpoint(path: str | Path, kind: str, mmap: bool = False) -> dict:
    """Load a stage checkpoint with `weights_only=True` (on the CPU) and check that it is a `kind` checkpoint;
    `mmap`: its tensors mapped from the file, not read (a check of the file that reads little of it), where the file's
    format (torch's zip format) and file system allow it, else read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{kind} checkpoint not found: {path}")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a legacy-format file: read it all
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        # unsafe globals, a corrupt or truncated file, one that cannot be read; anything else may be a bug
        raise CheckpointError(
            f"cannot load {kind} checkpoint {path} safely (weights_only=True): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    check_block(ckpt, kind, str(path))
    return ckpt


class Stage(L.LightningModule):
    """A training stage whose checkpoints rebuild it alone: `Stage.from_checkpoint(path)`.

    Subclasses set `stage_kind`, write `stage_block(stage_kind, ...)` in `on_save_checkpoint`, and override
    `init_args_from_checkpoint` when their init arguments are not simply the saved hyper-parameters.
    """

    stage_kind: ClassVar[str]
    # state-dict prefixes a checkpoint may hold that the rebuilt module does not (e.g. a training-only network)
    skip_on_load: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        # frozen helper networks (perceptual loss, FID features) live outside the module tree, so their weights stay
        # out of checkpoints and out of DDP's gradient buckets; `_apply` still moves them with the stage
        self._aux: dict[str, torch.nn.Module] = {}

    def add_helper(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Keep `module` frozen (eval, no grads) beside this stage, on its device, but not in its state dict."""
        module.requires_grad_(False)
        self._aux[name] = module.eval().to(self.device)
        return module

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for module in self._aux.values():
            module._apply(fn, *args, **kwargs)
        return self

    # ---- loading ----
    @classmethod
    def read_checkpoint(cls, path: str | Path) -> dict:
        """This stage's checkpoint file, read once with `weights_only=True` onto the CPU."""
        return load_stage_checkpoint(path, cls.stage_kind)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Self:
        """The stage of a checkpoint file, in eval mode on `map_location`."""
        return cls.from_checkpoint_dict(cls.read_checkpoint(path), source=str(path)).to(map_location)

    @classmethod
    def from_checkpoint_dict(cls, ckpt: dict, source: str | None = None) -> Self:
        """Rebuild from a checkpoint's parts (`lit_diffusion` block, `hyper_parameters`, `state_dict`), e.g. one
        embedded in another stage's checkpoint; `source` names it in errors. On the CPU, in eval mode."""
        source = source or f"embedded {cls.stage_kind} checkpoint"
        check_block(ckpt, cls.stage_kind, source)
        args = cls.init_args_from_checkpoint(ckpt, source)
        try:
            module = cls(**args)
        except ValueError as err:  # a CheckpointError of an embedded stage is a ValueError too; a TypeError is a bug's
            raise CheckpointError(f"{source}: cannot rebuild the {cls.stage_kind} stage from its saved config: "
                                  f"{err}") from err
        module.load_weights(ckpt.get("state_dict") or {}, source)
        module.on_load_checkpoint(ckpt)
        return module.eval()

    @classmethod
    def init_args_from_checkpoint(cls, ckpt: dict, source: str) -> dict:
        """The `__init__` arguments to rebuild with: the saved hyper-parameters this signature accepts (LightningCLI
        adds keys of its own, such as `_class_path` and `_instantiator`)."""
        return cls.accepted_args(ckpt.get("hyper_parameters") or {})

    @classmethod
    def accepted_args(cls, args: dict) -> dict:
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return {k: v for k, v in args.items() if k in accepted}

    def load_weights(self, state: dict, source: str) -> None:
        """`load_state_dict(strict=True)`, with an error naming `source` and the first offending keys."""
        state = {k: v for k, v in state.items() if not k.startswith(self.skip_on_load)}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise CheckpointError(f"{source}: the {self.stage_kind} weights do not match its config (missing "
                                  f"{missing[:5]}, unexpected {unexpected[:5]})")
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:  # same keys, other shapes
            first = (str(err).splitlines()[1:] or [str(err)])[0].strip()  # "size mismatch for KEY: ..."
            raise CheckpointError(f"{source}: the {self.stage_kind} weights do not match its config: {first}") from err
