"""What multi-process runs need before any process group exists (run name agreement, the launcher's strategy
settings), and the batch-size bookkeeping, tested in one process. The launched DDP jobs are in test_ddp_launch.py."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import lightning as L
import pytest
import torch
from conftest import TINY_VAE, tiny_datamodule
from lightning.pytorch.loggers import Logger

from lit_diffusion.runtime import launch
from lit_diffusion.runtime.batch_info import BatchInfo
from lit_diffusion.stages.vae import VAEModule


def test_ranks_agree_on_rank_zeros_default_run_name_through_the_launcher_store(monkeypatch):
    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    stamps = iter(["20000101-000001", "20000101-000000"])  # rank 1 starts a second later than rank 0 ...
    monkeypatch.setattr(launch.time, "strftime", lambda fmt: next(stamps))
    torchrun = {"WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(server.port), "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}
    names = {}
    rank1 = threading.Thread(target=lambda: names.update(
        {1: launch.shared_run_name("clip", {**torchrun, "RANK": "1"}, timeout_s=30)}))
    rank1.start()  # ... and waits for rank 0's name
    names[0] = launch.shared_run_name("clip", {**torchrun, "RANK": "0"}, timeout_s=30)
    rank1.join(timeout=30)
    assert names == {0: "clip-20000101-000000", 1: "clip-20000101-000000"}
    # a restarted worker group (torchrun --max-restarts) agrees on a new name under its own key
    assert server.get("lit_diffusion/run_name/none/0") == b"clip-20000101-000000"


def test_run_name_from_env_slurm_or_own_clock(monkeypatch, caplog):
    monkeypatch.setattr(launch.time, "strftime", lambda fmt: "20000101-000000")
    assert launch.shared_run_name("vae", {"LIT_DIFFUSION_RUN_NAME": "given", "WORLD_SIZE": "2"}) == "given"
    slurm = {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "3", "SLURM_PROCID": "5"}
    assert launch.shared_run_name("vae", slurm) == "vae-slurm4711-3"
    assert launch.shared_run_name("vae", {}) == "vae-20000101-000000"
    with caplog.at_level("WARNING", logger="lit_diffusion"):
        assert launch.shared_run_name("vae", {"NODE_RANK": "1"}) == "vae-20000101-000000"
    assert "pass the same --run.name to every process" in caplog.text


def test_launcher_strategy_keeps_the_configured_ddp_arguments(shapes_data, tmp_path):
    """`fabric run --strategy ddp` used to replace a configured DDPStrategy (and its timeout) by the string "ddp"."""
    from lightning.pytorch.strategies import DDPStrategy

    from lit_diffusion.runtime.lightning_cli import LitDiffusionCLI

    config = tmp_path / "vae.yaml"
    config.write_text(json.dumps({
        "model": {"class_path": "lit_diffusion.stages.vae.VAEModule", "init_args": TINY_VAE},
        "data": {"class_path": "lit_diffusion.data.datamodule.ImageCaptionDataModule",
                 "init_args": {"train_urls": str(shapes_data / "train-*.tar"), "image_size": 16, "batch_size": 4}},
        "trainer": {"strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                 "init_args": {"timeout": "0:00:45", "find_unused_parameters": True}}},
    }))
    fabric_env = {"LT_CLI_USED": "1", "LT_ACCELERATOR": "cpu", "LT_STRATEGY": "ddp", "LT_DEVICES": "1",
                  "LT_NUM_NODES": "2"}
    argv = launch.apply_launcher_env(["--config", str(config), "--run.root", str(tmp_path), "--run.name", "r",
                                      "--run.wandb", "false", "--run.scale_lr", "true",
                                      "--run.reference_batch_size", "2"], fabric_env)
    cli = LitDiffusionCLI(args=argv, run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy.num_nodes == 2
    assert strategy._timeout == timedelta(seconds=45) and strategy._ddp_kwargs["find_unused_parameters"] is True
    info = [cb for cb in cli.trainer.callbacks if isinstance(cb, BatchInfo)]
    assert len(info) == 1 and info[0].scale_lr is True and info[0].reference_batch_size == 2


class Capture(Logger):
    name, version = "capture", "0"

    def __init__(self):
        super().__init__()
        self.params, self.rows = {}, []

    def log_hyperparams(self, params, *args, **kwargs):
        self.params.update(params if isinstance(params, dict) else vars(params))

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


@pytest.mark.parametrize("scale_lr", [False, True])
def test_global_batch_is_logged_and_the_lr_scaled_by_it_when_asked(shapes_data, tmp_path, scale_lr):
    torch.manual_seed(0)
    model = VAEModule(**TINY_VAE)
    capture = Capture()
    info = BatchInfo(scale_lr=scale_lr, reference_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, accumulate_grad_batches=2, logger=[capture],
                        callbacks=[info], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=tiny_datamodule(shapes_data, batch_size=8))
    factor = 8 * 1 * 2 / 4 if scale_lr else 1.0  # per device x world x accumulation / reference
    expected = {"data/batch_size_per_device": 8, "data/world_size": 1, "data/accumulate_grad_batches": 2,
                "data/global_batch_size": 16, "optim/lr_scale": factor}
    assert info.info == expected
    assert {k: capture.params[k] for k in expected} == expected
    assert capture.rows[0] == (0, expected)  # at the starting step, before any training metric
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [TINY_VAE["lr"] * factor] * len(scheduler.base_lrs)
    for group, base in zip(trainer.optimizers[0].param_groups, scheduler.base_lrs):
        # the schedule goes on from the scaled base rate: lr = base x schedule(step)
        assert group["lr"] == pytest.approx(base * scheduler.lr_lambdas[0](scheduler.last_epoch), rel=1e-12)


def test_reference_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="reference_batch_size must be >= 1, got 0"):
        BatchInfo(scale_lr=True, reference_batch_size=0)
