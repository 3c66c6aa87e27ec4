"""W&B failing in the middle of a run does not stop training; CSV and JSONL stay complete."""

import csv
import json
import logging
from pathlib import Path

import lightning as L
import torch
from conftest import TINY_VAE, tiny_datamodule

from lit_diffusion.runtime.tracking import SafeWandbLogger, default_loggers


class BreakWandb(L.Callback):
    """From `at_step` on, every call into the W&B run raises, as when its service process has died."""

    def __init__(self, at_step: int):
        self.at_step, self.calls = at_step, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.at_step:
            return
        wandb_logger = next(lg for lg in trainer.loggers if isinstance(lg, SafeWandbLogger))

        def broken(*args, **kwargs):
            self.calls += 1
            raise BrokenPipeError("wandb-core is gone")

        self.run = wandb_logger.experiment
        for name in ("log", "log_artifact", "finish"):
            setattr(self.run, name, broken)

    def repair(self):
        for name in ("log", "log_artifact", "finish"):
            self.run.__dict__.pop(name, None)
        self.run.finish()  # so that later in-process runs do not pick up this one as `wandb.run`


def test_wandb_failure_mid_run_disables_wandb_and_training_finishes(shapes_data, tmp_path, caplog):
    loggers = default_loggers(tmp_path, "r", wandb=True)  # offline W&B (tests set WANDB_MODE=offline)
    wandb_logger = next(lg for lg in loggers if isinstance(lg, SafeWandbLogger))
    breaker = BreakWandb(at_step=2)
    torch.manual_seed(0)
    from lit_diffusion.stages.vae import VAEModule

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=loggers, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[breaker])
    try:
        with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
            trainer.fit(VAEModule(**TINY_VAE), datamodule=tiny_datamodule(shapes_data, batch_size=8))
            # what callbacks do after the failure goes nowhere instead of raising
            wandb_logger.log_image(key="samples/grid", images=[torch.zeros(3, 4, 4)], step=6)
            wandb_logger.experiment.config.update({"x": 1})
    finally:
        breaker.repair()

    assert trainer.global_step == 6 and trainer.state.finished
    assert breaker.calls == 1  # the first failure switched W&B off: it was not called again
    assert wandb_logger.failed.startswith("log_metrics: BrokenPipeError: wandb-core is gone")
    warnings = [r.getMessage() for r in caplog.records if "W&B failed" in r.getMessage()]
    assert len(warnings) == 1 and "rest of this run" in warnings[0]

    jsonl = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl if "train/loss" in r] == list(range(6))
    assert any("val/loss" in r for r in jsonl)
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["step"]) for r in rows if r["train/loss"]) == list(range(6))
    last_train = [r for r in jsonl if "train/loss" in r][-1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["final"]["train/loss"] == last_train["train/loss"]


def test_the_offline_hint_names_where_the_run_is(tmp_path, caplog, monkeypatch):
    """The `wandb sync` pattern the offline warning gives matches the run's own offline folder (a pipeline's
    stage sits at runs/NAME/STAGE, a sweep's run at runs/sweeps/S/run-NNN: not under runs/*/wandb)."""
    import glob
    import re

    from lit_diffusion.runtime import tracking

    monkeypatch.setattr(tracking, "_said_mode", False)
    with caplog.at_level(logging.WARNING, logger="lit_diffusion"):
        loggers = default_loggers(tmp_path / "runs" / "shapes" / "clip", "clip", wandb=True)
    said = next(r.getMessage() for r in caplog.records if "W&B logs offline" in r.getMessage())
    pattern = re.search(r"`wandb sync (\S+)`", said)[1]
    run = next(lg for lg in loggers if isinstance(lg, SafeWandbLogger)).experiment
    try:
        assert [str(p) for p in map(Path, glob.glob(pattern))] == [str(Path(run.dir).parent)]
    finally:
        run.finish()
