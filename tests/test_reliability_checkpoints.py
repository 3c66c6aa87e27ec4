"""Checkpoints: atomic writes, last.ckpt cadence through the CLI, `--ckpt_path last`, and an exact resume
(optimizer, EMA and data epoch) after a pre-emption signal."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY_VAE, tiny_datamodule
from lightning.pytorch.callbacks import EMAWeightAveraging

from lit_diffusion.callbacks.ema import take_this_steps_update
from lit_diffusion.runtime.safety import AtomicCheckpointIO, LastCheckpoint, SignalCheckpoint


def tiny_vae_config(data: Path, max_steps: int, **trainer) -> dict:
    return {
        "seed_everything": 0,
        "model": {"class_path": "lit_diffusion.stages.vae.VAEModule",
                  "init_args": {**TINY_VAE, "sample_posterior": False}},
        "data": {"class_path": "lit_diffusion.data.datamodule.ImageCaptionDataModule",
                 "init_args": {"train_urls": str(data / "train-*.tar"), "val_urls": str(data / "val-*.tar"),
                               "image_size": 16, "batch_size": 4, "num_workers": 0, "train_batches_per_epoch": 3,
                               "shuffle_buffer": 8, "val_max_samples": 4}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                    **trainer},
    }


def run_cli(argv):
    from lit_diffusion.runtime.lightning_cli import run_lightning_cli

    return run_lightning_cli(argv)


def test_atomic_save_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    def torch_save_dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # what a kill mid-write leaves behind
        raise OSError("No space left on device")

    monkeypatch.setattr("lit_diffusion.runtime.safety.torch.save", torch_save_dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    old = torch.load(path, weights_only=True)
    assert old["global_step"] == 1 and torch.equal(old["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left over
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # a normal file, not mkstemp's 0600


def test_atomic_save_removes_temporary_files_of_killed_writers_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that no longer runs
    path = tmp_path / "last.ckpt"
    orphan, live, other = (tmp_path / f".last.ckpt.{pid}.00ff00ff.tmp" for pid in (dead, os.getppid(), "x"))
    for tmp in (orphan, live, other, tmp_path / f".best.ckpt.{dead}.00ff00ff.tmp"):
        tmp.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt", live.name, other.name, f".best.ckpt.{dead}.00ff00ff.tmp"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_writes_last_ckpt_on_cadence_and_at_the_end_then_resumes_with_ckpt_path_last(
        shapes_data, tmp_path, monkeypatch):
    monkeypatch.delenv("LIT_DIFFUSION_RUN_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_vae_config(shapes_data, max_steps=5, limit_val_batches=0)))
    common = ["--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false",
              "--run.checkpoint_every", "2"]
    saved_steps = []
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint",
                        _spy(AtomicCheckpointIO.save_checkpoint, saved_steps))
    cli = run_cli(["fit", *common])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    run_dir = Path(cli.trainer.default_root_dir)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-")
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]  # no top-k duplicate of the same state
    assert saved_steps == [2, 4, 5]  # every 2 steps, and the final step although 5 % 2 != 0
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 5

    # the same command with --ckpt_path last and a higher max_steps resumes that run (no --run.name needed)
    monkeypatch.delenv("LIT_DIFFUSION_RUN_NAME", raising=False)
    rows_before = len((run_dir / "metrics.jsonl").read_text().splitlines())
    cli = run_cli(["fit", *common, "--trainer.max_steps", "7", "--ckpt_path", "last"])
    assert Path(cli.trainer.default_root_dir) == run_dir
    assert Path(cli.trainer.ckpt_path) == (ckpts / "last.ckpt").resolve()
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()[rows_before:]]
    rows = [r for r in rows if "train/loss" in r]
    assert rows[0]["step"] == 5  # the resumed run started at the saved step, not at 0
    assert cli.trainer.global_step == 7 and saved_steps[-1] == 7


def _spy(save, steps):
    def spy(self, checkpoint, path, storage_options=None):
        steps.append(checkpoint["global_step"])
        return save(self, checkpoint, path, storage_options)

    return spy


class SendSignal(L.Callback):
    def __init__(self, at_step: int, signum: int):
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class Snapshot(L.Callback):
    """Records the batch keys of every step, and the weights, EMA weights, optimizer state and LR at `at_step`
    (after that step's update, i.e. what a checkpoint written then must restore)."""

    def __init__(self, at_step: int):
        self.at_step, self.keys, self.state = at_step, {}, None

    def _take(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMAWeightAveraging))
        opt = trainer.optimizers[0]
        self.state = {
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "ema": [p.detach().clone() for p in ema._average_model.parameters()],
            "moments": [(s["step"].clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
                        for s in opt.state.values()],
            "lr": opt.param_groups[0]["lr"],
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys[trainer.global_step] = batch["key"]
        if self.state is None and trainer.global_step == self.at_step:  # the first batch after resuming
            self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            take_this_steps_update(trainer, pl_module)  # listed before the EMA callback: its update first
            self._take(trainer, pl_module)


def _vae_run(shapes_data, root, callbacks, ckpt_path=None, max_steps=7):
    from lit_diffusion.stages.vae import VAEModule

    torch.manual_seed(0)
    module = VAEModule(**{**TINY_VAE, "sample_posterior": False})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=str(root), plugins=[AtomicCheckpointIO()],
                        callbacks=[*callbacks, EMAWeightAveraging(decay=0.5),
                                   LastCheckpoint(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=0,
                                                  every_n_train_steps=100)])
    trainer.fit(module, datamodule=tiny_datamodule(shapes_data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def _preempt_and_resume(shapes_data, root: Path, at_step: int):
    reference = Snapshot(at_step)
    _vae_run(shapes_data, root / "a", [reference, SignalCheckpoint()])
    with pytest.raises(SystemExit) as exit_info:
        _vae_run(shapes_data, root / "b", [SendSignal(at_step, signal.SIGUSR1), SignalCheckpoint()])
    assert exit_info.value.code == 128 + signal.SIGUSR1
    last = root / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == at_step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # our handler is gone after the run
    resumed = Snapshot(at_step)
    trainer = _vae_run(shapes_data, root / "b", [resumed, SignalCheckpoint()], ckpt_path=str(last))
    assert trainer.global_step == 7
    return reference, resumed


@pytest.mark.parametrize("at_step", [5, 3])  # at an epoch boundary (5 batches per epoch) and mid-epoch
def test_preempted_run_resumes_weights_ema_and_optimizer_exactly(shapes_data, tmp_path, at_step):
    """SIGUSR1 at a step: last.ckpt holds that step and the process exits 138; the resumed run starts from exactly
    the weights, EMA weights, Adam moments/step counts and learning rate that the uninterrupted run had then."""
    reference, resumed = _preempt_and_resume(shapes_data, tmp_path, at_step)
    ref, res = reference.state, resumed.state
    # and it ends where the uninterrupted run ended, EMA included (SignalCheckpoint listed before the EMA callback
    # had saved the step's weights beside the previous step's average: one update short from then on)
    ends = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True) for run in ("a", "b")]
    for key in ("state_dict", "current_model_state"):
        for name, value in ends[0][key].items():
            assert torch.equal(value, ends[1][key][name]), (key, name)
    assert res["lr"] == ref["lr"]
    for name, value in ref["weights"].items():
        assert torch.equal(value, res["weights"][name]), name
    assert len(ref["ema"]) == len(res["ema"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(ref["ema"], res["ema"]))
    assert len(ref["moments"]) == len(res["moments"]) > 0
    for a, b in zip(ref["moments"], res["moments"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_resume_at_an_epoch_boundary_continues_with_the_next_epochs_data(shapes_data, tmp_path):
    reference, resumed = _preempt_and_resume(shapes_data, tmp_path, 5)
    assert [resumed.keys[s] for s in (5, 6)] == [reference.keys[s] for s in (5, 6)]


def test_a_run_moved_to_another_directory_resumes_into_its_own_last_ckpt(shapes_data, tmp_path):
    """The checkpoint remembers the path it was saved under; resumed from a copy of its run directory, Lightning's
    version counter wrote last-v1.ckpt and left the copied last.ckpt stale (the pipeline then took the old one)."""
    import shutil

    first = tmp_path / "first"
    _vae_run(shapes_data, first, [])
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    _vae_run(shapes_data, moved, [], ckpt_path=str(moved / "checkpoints" / "last.ckpt"), max_steps=11)
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 11


def test_ckpt_path_last_resumes_only_runs_of_its_own_config(tmp_path):
    """`--ckpt_path last` without `--run.name` picks the newest STEM-YYYYMMDD-HHMMSS run: a newer run of another
    config whose name starts with the stem (ldm-big-...) had been resumed in its place."""
    from lit_diffusion.runtime.lightning_cli import _resumable_run

    def run(name, mtime):
        ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))

    run("ldm-20261206-090000", 1_000)
    run("ldm-big-20261206-130000", 2_000)
    assert _resumable_run(str(tmp_path), "ldm-20261207-100000") == "ldm-20261206-090000"
    assert _resumable_run(str(tmp_path), "ldm-big-20261207-100000") == "ldm-big-20261206-130000"
    assert _resumable_run(str(tmp_path), "vae-20261207-100000") == "vae-20261207-100000"  # none: afresh
