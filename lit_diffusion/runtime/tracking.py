"""Run directories and loggers: W&B (offline when there is no account or network) plus a JSONL copy.

Every run writes, under `runs/NAME/`:
  metrics.csv      Lightning's CSVLogger
  metrics.jsonl    one JSON object per logged step (our own: an offline W&B run keeps its history only in a
                   binary file, so runs must be comparable without a server)
  summary.json     final and best value of every metric, and the step of the best
  config.yaml      the full resolved config (LightningCLI)
  wandb/           the W&B run (online, or offline for a later `wandb sync`)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import subprocess
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger("lit_diffusion")

# metrics where smaller is better; everything else counts as "higher is better" in summary.json
LOWER_IS_BETTER = ("loss", "fid", "rfid", "kl", "nll", "fcd", "seconds")  # fcd: the video Frechet distance


def lower_is_better(key: str) -> bool:
    leaf = key.rsplit("/", 1)[-1]
    return any(leaf == k or leaf.startswith(k + "_") or leaf.endswith("_" + k) for k in LOWER_IS_BETTER)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
        return host in netrc.read_text()
    except OSError:
        return False


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str]:
    """("online"|"offline"|"disabled", why). Decided once per process, before any W&B call can stall."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("offline", "disabled", "dryrun"):
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    if not _has_wandb_key():
        return "offline", "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _reachable(base):
        return "offline", f"W&B server {base} is not reachable"
    return "online", "API key found and server reachable"


_said_mode = False


def _say_mode_once(mode: str, why: str, directory: Path | None = None) -> None:
    global _said_mode
    if _said_mode:
        return
    _said_mode = True
    if mode == "offline":
        where = f"{directory}/wandb/offline-run-*" if directory is not None else "RUN_DIR/wandb/offline-run-*"
        rank_zero_only(log.warning)(f"W&B logs offline ({why}); each run keeps its W&B files in RUN_DIR/wandb: "
                                    f"upload later with `wandb sync {where}`")
    elif mode == "disabled":
        rank_zero_only(log.warning)(f"W&B is disabled ({why}); metrics go to CSV/JSONL only")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value


class _AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; a resumed run appends to it instead."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(set(self.metrics_keys) | set(header))


class RunCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


class JSONLLogger(Logger):
    """Appends each logged step to `metrics.jsonl` and keeps `summary.json` (final, best, best step) up to date."""

    def __init__(self, save_dir: str | Path, name: str = "run"):
        super().__init__()
        self._save_dir = Path(save_dir)
        self._name = name
        self._final: dict[str, float] = {}
        self._best: dict[str, tuple[float, int]] = {}
        self._params: dict = {}
        self.extra: dict[str, Any] = {}  # stage summaries, checkpoint paths: merged into summary.json
        previous = self._save_dir / "summary.json"
        if previous.is_file():  # a resumed run keeps its history's final and best values
            try:
                old = json.loads(previous.read_text())
                self._final = dict(old.get("final", {}))
                self._best = {k: (v, old.get("best_step", {}).get(k, -1)) for k, v in old.get("best", {}).items()}
            except (OSError, ValueError):
                log.warning(f"{previous} is unreadable; summary.json starts afresh")

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._save_dir)

    @property
    def log_dir(self) -> str:
        return str(self._save_dir)

    @rank_zero_only
    def log_hyperparams(self, params: dict | Namespace, *args: Any, **kwargs: Any) -> None:
        if isinstance(params, Namespace):
            params = vars(params)
        self._params.update({k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {"step": step}
        for key, value in metrics.items():
            value = _plain(value)
            if not isinstance(value, (int, float)):
                continue
            value = float(value)
            row[key] = value
            if key == "epoch":
                continue
            self._final[key] = value  # NaN too: the last value is what W&B's summary keeps, broken down or not
            if not math.isfinite(value):
                continue
            best = self._best.get(key)
            better = best is None or (value < best[0] if lower_is_better(key) else value > best[0])
            if better:
                self._best[key] = (value, step if step is not None else -1)
        self._save_dir.mkdir(parents=True, exist_ok=True)
        with open(self._save_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_summary()

    def _write_summary(self) -> None:
        summary = {
            "final": dict(sorted(self._final.items())),
            "best": {k: v for k, (v, _) in sorted(self._best.items())},
            "best_step": {k: s for k, (_, s) in sorted(self._best.items())},
            "params": self._params,
            **self.extra,
        }
        tmp = self._save_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, self._save_dir / "summary.json")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._final or self.extra:
            self.extra["status"] = status
            self._save_dir.mkdir(parents=True, exist_ok=True)
            self._write_summary()


def run_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name


def default_loggers(run_root: str | Path, name: str, project: str = "lit-diffusion", group: str | None = None,
                    wandb: bool = True, tags: list[str] | None = None) -> list[Logger]:
    """CSV + JSONL always; W&B unless disabled. The CSV logger comes first so `trainer.log_dir` is the run dir."""
    directory = run_dir(run_root, name)
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(directory), name="", version=""), JSONLLogger(directory, name)]
    if wandb:
        mode, why = wandb_mode()
        _say_mode_once(mode, why, directory)
        if mode != "disabled":
            directory.mkdir(parents=True, exist_ok=True)
            loggers.append(SafeWandbLogger(
                name=name, project=project, group=group, save_dir=str(directory), offline=(mode == "offline"),
                tags=tags, settings=_wandb_settings(),
            ))
    return loggers


class _NullExperiment:
    """Stands in for the W&B run once it failed: every attribute and call is a no-op."""

    def __getattr__(self, name: str) -> "_NullExperiment":
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> "_NullExperiment":
        return self


def _guarded(method_name: str):
    def method(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return None
        try:
            return getattr(super(SafeWandbLogger, self), method_name)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure: the run goes on with CSV/JSONL
            self._disable(method_name, err)
            return None

    method.__name__ = method_name
    return method


class SafeWandbLogger(WandbLogger):
    """A WandbLogger that can never stop training: the first exception from W&B (creating the run, logging
    metrics, images, tables, hyperparameters, checkpoints, finishing) is logged once and W&B is switched off
    for the rest of the run; CSV and JSONL keep every metric."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.failed: str | None = None
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning passes None, which W&B warns has no effect
            self._wandb_init.pop("anonymous", None)

    def _disable(self, where: str, err: Exception) -> None:
        self.failed = f"{where}: {type(err).__name__}: {err}"
        rank_zero_only(log.warning)(f"W&B failed in {self.failed}; W&B logging is off for the rest of this run "
                                    f"(metrics still go to metrics.csv and metrics.jsonl)")

    @property
    def experiment(self) -> Any:
        if self.failed is not None:
            return _NullExperiment()
        try:
            return super().experiment
        except Exception as err:  # noqa: BLE001
            self._disable("experiment", err)
            return _NullExperiment()

    log_metrics = _guarded("log_metrics")
    log_hyperparams = _guarded("log_hyperparams")
    log_image = _guarded("log_image")
    log_table = _guarded("log_table")
    log_text = _guarded("log_text")
    log_audio = _guarded("log_audio")
    log_video = _guarded("log_video")
    log_graph = _guarded("log_graph")
    after_save_checkpoint = _guarded("after_save_checkpoint")
    finalize = _guarded("finalize")
    save = _guarded("save")


def _wandb_settings():
    import wandb

    # a bounded start-up wait and no console capture: logging must never stall or crash training
    return wandb.Settings(init_timeout=30, console="off", x_disable_stats=True, silent=True)


def find_logger(trainer, cls: type) -> Any:
    for lg in getattr(trainer, "loggers", []):
        if isinstance(lg, cls):
            return lg
    return None
