"""`lit-diffusion fit|validate|test --config FILE`: LightningCLI with our run directory and default loggers."""

from __future__ import annotations

import glob
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_diffusion.errors import UsageError
from lit_diffusion.runtime import safety, tracking
from lit_diffusion.runtime.batch_info import BatchInfo
from lit_diffusion.runtime.launch import shared_run_name
from lit_diffusion.runtime.progress import LineProgress

log = logging.getLogger("lit_diffusion")


class RunConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the run dir and sends the full resolved config, git commit and data URLs to W&B."""

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        extra = {"git_commit": tracking.git_commit(), "config": config}
        data = (config.get("data") or {}).get("init_args") or {}
        extra["data_urls"] = {k: data.get(k) for k in ("train_urls", "val_urls") if k in data}
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                try:
                    lg.experiment.config.update(extra, allow_val_change=True)
                except Exception as err:  # a logging failure must never stop training
                    log.warning(f"W&B: could not record the config ({type(err).__name__}: {err})")
            elif isinstance(lg, tracking.JSONLLogger):
                lg.extra.update({"git_commit": extra["git_commit"], "data_urls": extra["data_urls"]})


class LitDiffusionCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs: Any):
        super().__init__(
            args=args,
            run=run,
            save_config_callback=RunConfigCallback,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run.name", type=str | None, default=None,
                            help="run name; the run directory is RUN.ROOT/RUN.NAME (default: config stem + time)")
        parser.add_argument("--run.root", type=str, default="runs", help="folder that holds run directories")
        parser.add_argument("--run.project", type=str, default="lit-diffusion", help="W&B project")
        parser.add_argument("--run.group", type=str | None, default=None, help="W&B group (pipeline, sweep)")
        parser.add_argument("--run.wandb", type=bool, default=True, help="log to W&B (offline without an account)")
        parser.add_argument("--run.checkpoint_every", type=int, default=500,
                            help="write RUN_DIR/checkpoints/last.ckpt every N optimizer steps and at the end "
                                 "(0: at each epoch end); ignored when the config has a ModelCheckpoint with save_last")
        parser.add_argument("--run.on_nonfinite", type=Literal["stop", "skip", "off"], default="stop",
                            help="a NaN/inf training loss: stop naming the step and last checkpoint, or skip the update")
        parser.add_argument("--run.scale_lr", type=bool, default=False,
                            help="multiply learning rates by global batch / run.reference_batch_size (linear scaling); "
                                 "global batch = data batch_size x devices x nodes x accumulate_grad_batches")
        parser.add_argument("--run.reference_batch_size", type=int | None, default=None,
                            help="the global batch the configured lr was tuned for (default: data batch_size, one device)")
        parser.add_argument("--run.progress_every", type=int, default=100,
                            help="when the output is not a terminal (a log file), one progress line every N optimizer "
                                 "steps instead of a progress bar (runtime/progress.py); on a terminal the bar stays")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        _check_ckpt_path(self.config)

    def _run_settings(self) -> dict:
        cfg = self.config.get(str(self.subcommand), self.config)
        run = cfg.get("run")
        run = dict(vars(run)) if run is not None and not isinstance(run, dict) else dict(run or {})
        if not run.get("name"):
            configs = cfg.get("config") or []
            stem = Path(str(configs[-1])).stem if configs else "run"
            # every DDP process must agree on the name, also where each parses its own command line (torchrun)
            run["name"] = shared_run_name(stem)
        return run

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        run = self._run_settings()
        cfg = self.config.get(str(self.subcommand), self.config)
        if cfg.get("ckpt_path") == "last" and not _explicit_run_name(cfg):
            run["name"] = _resumable_run(run["root"], run["name"])
            os.environ["LIT_DIFFUSION_RUN_NAME"] = run["name"]  # DDP processes launched from here resume it too
        directory = tracking.run_dir(run["root"], run["name"])
        if self.subcommand == "fit" and not cfg.get("ckpt_path"):
            _refuse_a_finished_run(directory)
        if config.get("default_root_dir") is None:
            config["default_root_dir"] = str(directory)
        if config.get("logger") in (None, True):
            config["logger"] = tracking.default_loggers(
                run["root"], run["name"], project=run["project"], group=run["group"], wandb=run["wandb"])
        user_callbacks = [*(config.get("callbacks") or []), *callbacks]
        checkpointing = config.get("enable_checkpointing", True) is not False
        callbacks = [*callbacks, *safety.default_callbacks(
            user_callbacks, str(directory / "checkpoints") if checkpointing else None,
            every_n_steps=int(run.get("checkpoint_every", 500)), on_nonfinite=run.get("on_nonfinite", "stop"))]
        if not any(isinstance(c, BatchInfo) for c in user_callbacks):  # logs per-device and global batch size
            callbacks.append(BatchInfo(bool(run.get("scale_lr")), run.get("reference_batch_size")))
        if (not sys.stdout.isatty() and config.get("enable_progress_bar") is not False
                and not any(isinstance(c, ProgressBar) for c in user_callbacks)):  # a log file: lines, not redraws
            callbacks.append(LineProgress(int(run.get("progress_every") or 100), name=run["name"]))
        if not safety.has_checkpoint_io(config.get("plugins")):
            plugins = config.get("plugins")
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins] if plugins else []
            config["plugins"] = [*plugins, safety.AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


CKPT_PATH_WORDS = ("last", "best", "hpc")  # `--ckpt_path` values that name no file (Lightning's, and ours: last)


def _check_ckpt_path(config) -> None:
    """`--ckpt_path FILE` must be a readable checkpoint (weights_only) of the configured stage: a missing or
    truncated file, or another stage's, is refused in one line naming the option, before Lightning reads its
    hyper-parameters. Keywords, remote paths, sharded checkpoints (folders) and models that are not lit_diffusion
    stages are left to Lightning."""
    import importlib

    from lit_diffusion.stages.base import CheckpointError, Stage, load_stage_checkpoint

    subcommand = config.get("subcommand")
    cfg = config.get(subcommand) if subcommand else config
    path = cfg.get("ckpt_path") if cfg is not None else None
    if (not path or str(path) in CKPT_PATH_WORDS or str(path).startswith("registry") or "://" in str(path)
            or Path(path).is_dir()):  # a sharded (FSDP) checkpoint is a folder: Lightning reads it
        return
    model = cfg.get("model")
    class_path = model.get("class_path") if model is not None else None
    if not class_path or "." not in str(class_path):
        return
    module, name = str(class_path).rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        return
    try:
        load_stage_checkpoint(path, cls.stage_kind, mmap=True)
    except CheckpointError as err:
        raise CheckpointError(f"--ckpt_path {path}: {err}") from None


class RunDirInUse(UsageError):
    """A fresh run asked for a run directory that holds another run's checkpoints (`fit` says it in one line)."""


def _refuse_a_finished_run(directory: Path) -> None:
    """A fresh `fit` in a run directory that holds an earlier run's checkpoints would overwrite them (and append
    to its metrics): refused, saying how to resume or start elsewhere."""
    earlier = sorted((directory / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt",
                                                                                  -p.stat().st_mtime))
    if earlier:  # last.ckpt first, else the newest
        raise RunDirInUse(f"{directory} holds the checkpoints of an earlier run ({', '.join(p.name for p in earlier)})"
                         f": resume it with --ckpt_path {earlier[0]}, or pick another --run.name (or delete "
                         f"{directory} to start it over)")


def _explicit_run_name(cfg) -> bool:
    run = cfg.get("run")
    name = run.get("name") if isinstance(run, dict) else getattr(run, "name", None)
    return bool(name)


def _resumable_run(root: str, fresh_name: str) -> str:
    """`--ckpt_path last` without `--run.name`: the newest run of the same config (`STEM-*`) holding a last.ckpt,
    so a plain re-run of the same command resumes instead of silently starting over in a new run dir."""
    stem = fresh_name.rsplit("-", 2)[0]
    # STEM-YYYYMMDD-HHMMSS exactly: another config's runs (STEM-big-...) are not this one's
    own = re.compile(rf"{re.escape(stem)}-\d{{8}}-\d{{6}}")
    found = sorted((p for p in Path(root).glob(f"{glob.escape(stem)}-*/checkpoints/last*.ckpt")
                    if own.fullmatch(p.parent.parent.name)), key=lambda p: p.stat().st_mtime)
    if not found:
        rank_zero_warn(f"--ckpt_path last: no earlier run {root}/{stem}-*/checkpoints/last.ckpt; starting afresh")
        return fresh_name
    name = found[-1].parent.parent.name
    rank_zero_info(f"--ckpt_path last: resuming run {name} ({found[-1]}); pass --run.name to pick another")
    return name


# What Lightning says on every run that is not news here, each silenced where it is said (and why):
KNOWN_WARNINGS = (
    # the frozen CLIP and VAE inside the diffusion stage and the prior are in eval mode on purpose
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # the data modules move only the tensors (their captions stay on the host); the stage's own override serves
    # plain dataloaders
    r"You have overridden `transfer_batch_to_device` in both `LightningModule` and `LightningDataModule`",
    # `lit-diffusion fit ...` hands LightningCLI the arguments it parsed from sys.argv: both name the same run
    r"LightningCLI's args parameter is intended to run from within Python",
    # the diffusion stage's configure_model shards only under FSDP, where its configs have no EMA (README, "Many
    # machines"); with DDP or one device the EMA copy is the whole model, as Lightning's WeightAveraging expects
    r"You're using the WeightAveraging callback with a model that overrides the configure_model callback",
    # Lightning 2.6 calling torch's deprecated pytree API
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _NoLitLoggerTip(logging.Filter):
    """Lightning advertises its cloud logger on every `fit`; W&B (offline without an account) is ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_known_warnings() -> None:
    import warnings

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoLitLoggerTip())


def run_lightning_cli(argv: list[str]) -> LitDiffusionCLI:
    quiet_known_warnings()
    return LitDiffusionCLI(args=argv)
