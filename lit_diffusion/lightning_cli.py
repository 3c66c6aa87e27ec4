"""`lit-diffusion fit|validate|test --config FILE`: LightningCLI with our run directory and default loggers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from lit_diffusion import tracking


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
                lg.experiment.config.update(extra, allow_val_change=True)
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

    def _run_settings(self) -> dict:
        cfg = self.config.get(str(self.subcommand), self.config)
        run = cfg.get("run")
        run = dict(vars(run)) if run is not None and not isinstance(run, dict) else dict(run or {})
        if not run.get("name"):
            configs = cfg.get("config") or []
            stem = Path(str(configs[-1])).stem if configs else "run"
            run["name"] = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            # every DDP process must agree on the name: the launcher's rank 0 sets it for the others
            run["name"] = os.environ.setdefault("LIT_DIFFUSION_RUN_NAME", run["name"])
        return run

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        run = self._run_settings()
        directory = tracking.run_dir(run["root"], run["name"])
        if config.get("default_root_dir") is None:
            config["default_root_dir"] = str(directory)
        if config.get("logger") in (None, True):
            config["logger"] = tracking.default_loggers(
                run["root"], run["name"], project=run["project"], group=run["group"], wandb=run["wandb"])
        user_callbacks = config.get("callbacks") or []
        if config.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in user_callbacks):
            callbacks = [*callbacks, ModelCheckpoint(dirpath=str(directory / "checkpoints"), save_last=True)]
        return super()._instantiate_trainer(config, callbacks)


def run_lightning_cli(argv: list[str]) -> LitDiffusionCLI:
    return LitDiffusionCLI(args=argv)
