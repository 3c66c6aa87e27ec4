import json
import math

import pytest

from lit_diffusion.runtime import tracking
from lit_diffusion.runtime.launch import apply_launcher_env, launcher_settings


def test_fabric_run_settings_become_trainer_arguments():
    env = {"LT_CLI_USED": "1", "LT_ACCELERATOR": "cpu", "LT_STRATEGY": "ddp", "LT_DEVICES": "1",
           "LT_NUM_NODES": "2", "LT_PRECISION": "None"}
    argv = apply_launcher_env(["fit", "--config", "c.yaml"], env)
    assert argv == ["fit", "--config", "c.yaml", "--trainer.accelerator", "cpu", "--trainer.strategy",
                    '{"class_path": "lightning.pytorch.strategies.DDPStrategy"}', "--trainer.devices", "1",
                    "--trainer.num_nodes", "2"]


def test_torchrun_and_slurm_settings():
    assert launcher_settings({"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "8"}) == {
        "devices": "2", "num_nodes": "4", "strategy": "ddp"}
    assert launcher_settings({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
                              "SLURM_JOB_NAME": "train"}) == {"devices": "4", "num_nodes": "2", "strategy": "ddp"}
    assert launcher_settings({}) == {}
    assert apply_launcher_env(["fit"], {}) == ["fit"]


def test_jsonl_logger_keeps_final_and_best(tmp_path):
    lg = tracking.JSONLLogger(tmp_path, "r")
    lg.log_metrics({"val/loss": 2.0, "val/psnr": 20.0}, step=1)
    lg.log_metrics({"val/loss": 1.0, "val/psnr": 25.0}, step=2)
    lg.log_metrics({"val/loss": 1.5, "val/psnr": 22.0, "eval/fid_clip_g3.0": 10.0}, step=3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["val/loss"] == 1.5
    assert summary["best"]["val/loss"] == 1.0 and summary["best_step"]["val/loss"] == 2
    assert summary["best"]["val/psnr"] == 25.0 and summary["best_step"]["val/psnr"] == 2
    assert summary["best"]["eval/fid_clip_g3.0"] == 10.0


def test_a_final_value_that_broke_down_is_kept(tmp_path):
    """The last value is what W&B's run summary keeps, NaN included: a run whose last evaluation broke down must
    not be ranked by an earlier figure (the sweep and `compare` read `final`); the best stays the best finite one."""
    lg = tracking.JSONLLogger(tmp_path, "r")
    lg.log_metrics({"eval/fid_clip": 10.0}, step=100)
    lg.log_metrics({"eval/fid_clip": float("nan")}, step=200)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isnan(summary["final"]["eval/fid_clip"])
    assert summary["best"]["eval/fid_clip"] == 10.0 and summary["best_step"]["eval/fid_clip"] == 100
    from lit_diffusion.sweep import metric_of
    assert metric_of(summary, "eval/fid_clip") == (None, 10.0)  # no final figure: the sweep does not rank it


@pytest.mark.parametrize("key,lower", [("val/loss", True), ("eval/fid_clip_g3.0", True), ("val/rfid", True),
                                       ("eval/clip_score_g3.0", False), ("val/psnr", False), ("val/i2t_r1", False)])
def test_metric_direction(key, lower):
    assert tracking.lower_is_better(key) is lower


def test_wandb_mode_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    mode, why = tracking.wandb_mode()
    assert mode == "offline" and "API key" in why


def test_wandb_mode_offline_when_server_unreachable(monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    mode, why = tracking.wandb_mode()
    assert mode == "offline" and "not reachable" in why


def test_resumed_run_appends_to_metrics_csv_and_keeps_summary(tmp_path):
    import csv

    first = tracking.default_loggers(tmp_path, "r", wandb=False)
    first[0].log_metrics({"train/loss": 2.0}, step=1)
    first[1].log_metrics({"train/loss": 2.0}, step=1)
    for lg in first:
        lg.save()
        lg.finalize("success")
    second = tracking.default_loggers(tmp_path, "r", wandb=False)  # the same run dir, as a resumed run
    second[0].log_metrics({"train/loss": 1.0, "val/psnr": 20.0}, step=2)
    second[1].log_metrics({"train/loss": 3.0}, step=2)
    for lg in second:
        lg.save()
        lg.finalize("success")
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("1", "2.0"), ("2", "1.0")]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final"]["train/loss"] == 3.0 and summary["best"]["train/loss"] == 2.0
    assert summary["best_step"]["train/loss"] == 1


def test_a_fresh_fit_names_the_checkpoint_to_resume_from(tmp_path):
    """The refusal of a fresh `fit` in a run directory holding checkpoints names one that exists: last.ckpt, else
    the newest (a config's own ModelCheckpoint may write only `vae-{step}.ckpt`)."""
    import os

    from lit_diffusion.runtime.lightning_cli import RunDirInUse, _refuse_a_finished_run

    _refuse_a_finished_run(tmp_path / "run")  # nothing there yet: no refusal
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for i, name in enumerate(("vae-500.ckpt", "vae-1000.ckpt")):
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, (1_000_000 + i, 1_000_000 + i))
    with pytest.raises(RunDirInUse, match=rf"resume it with --ckpt_path {ckpts / 'vae-1000.ckpt'}, or pick another"):
        _refuse_a_finished_run(tmp_path / "run")
    (ckpts / "last.ckpt").write_bytes(b"x")
    os.utime(ckpts / "last.ckpt", (999_000, 999_000))  # older, still the one to resume from
    with pytest.raises(RunDirInUse, match=rf"resume it with --ckpt_path {ckpts / 'last.ckpt'}, or pick another"):
        _refuse_a_finished_run(tmp_path / "run")
