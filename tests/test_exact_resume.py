"""A training run killed with SIGKILL and started again from its last.ckpt ends with the uninterrupted run's weights,
bit for bit: the data position, the optimizer, EMA and the training steps' random stream (noise, timesteps,
condition dropout, posterior draws) all travel in the checkpoint (`runtime.rng.TrainingRNG`).

The diffusion stage is launched as users launch it (`lit-diffusion fit`, 1 process; `torchrun`, 2 gloo ranks),
with a sample grid between steps (it draws from the other random stream) and a worker process per rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_UNET
from test_ddp_launch import REPO, launch, torchrun_launcher

KILLER = '''
import os, signal
import lightning as L


class KillAt(L.Callback):
    """SIGKILL this process (every rank) when a training step starts at `step`: no handler, no checkpoint."""

    def __init__(self, step: int = -1):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''

MAX_STEPS, EVERY, KILL_AT = 7, 2, 5  # checkpoints at steps 2, 4, 6; killed before step 6: resumes from step 4


def ldm_config(tmp_path: Path, tiny_ckpts, kill_at: int) -> Path:
    data = tiny_ckpts["data"]
    config = {
        "seed_everything": 0,
        "model": {"class_path": "lit_diffusion.stages.ldm.LatentDiffusionModule",
                  "init_args": {"clip_ckpt": str(tiny_ckpts["clip"]), "vae_ckpt": str(tiny_ckpts["vae"]),
                                "image_size": 16, "unet": {**TINY_UNET, "dropout": 0.1}, "pooled_text": True,
                                "objective": "flow", "sampler": "euler", "sample_steps": 2, "warmup_steps": 0, "lr": 1e-3,
                                "p_uncond": 0.3, "sample_posterior": True}},
        "data": {"class_path": "lit_diffusion.data.datamodule.ImageCaptionDataModule",
                 "init_args": {"train_urls": str(data / "train-*.tar"), "image_size": 16, "batch_size": 8,
                               "num_workers": 1, "train_batches_per_epoch": 3, "shuffle_buffer": 32,
                               "random_flip": True}},
        "trainer": {"max_steps": MAX_STEPS, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1, "callbacks": [
                        {"class_path": "killer.KillAt", "init_args": {"step": kill_at}},
                        {"class_path": "lit_diffusion.callbacks.sample_grid.SampleGrid",
                         "init_args": {"every_n_steps": 3, "prompts": ["a large red circle"], "guidance": [3.0]}},
                        {"class_path": "lit_diffusion.callbacks.ema.EMAWeightAveraging",
                         "init_args": {"decay": 0.9}}]},
    }
    path = tmp_path / f"ldm_kill{kill_at}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp_path / "killer.py").write_text(KILLER)
    return path


def run_args(config: Path, root: Path, name: str, resume: bool = False) -> list[str]:
    args = ["fit", "--config", str(config), "--run.root", str(root), "--run.name", name, "--run.wandb", "false",
            "--run.checkpoint_every", str(EVERY)]
    return args + (["--ckpt_path", str(root / name / "checkpoints" / "last.ckpt")] if resume else [])


def final_weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    ckpt = torch.load(root / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == MAX_STEPS
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("unet.")}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 50
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def one_process(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LIT_DIFFUSION_RUN_NAME"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO), env.get("PYTHONPATH", "")]),
               WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "lit_diffusion", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_runs_weights(tiny_ckpts, tmp_path):
    root = tmp_path / "runs"
    done = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "whole"))
    assert done.returncode == 0, done.stderr[-3000:]
    killed_cfg = ldm_config(tmp_path, tiny_ckpts, KILL_AT)
    killed = one_process(tmp_path, run_args(killed_cfg, root, "killed"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    # the rerun must not be killed again: same config otherwise
    resumed = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "killed", resume=True))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # it went on from step 4 (a rerun from step 0 that ignored the checkpoint would end with the same weights)
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr + resumed.stdout
    assert_bit_identical(final_weights(root, "whole"), final_weights(root, "killed"))
    # the steps drew random numbers: a run of another seed ends elsewhere (the comparison above can fail)
    other = one_process(tmp_path, run_args(ldm_config(tmp_path, tiny_ckpts, -1), root, "seed1")
                        + ["--seed_everything", "1"])
    assert other.returncode == 0, other.stderr[-3000:]
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_bit_identical(final_weights(root, "whole"), final_weights(root, "seed1"))


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_end_with_the_uninterrupted_runs_weights(tiny_ckpts, tmp_path):
    root = tmp_path / "runs"
    for name, kill_at, resume in (("whole", -1, False), ("killed", KILL_AT, False), ("killed", -1, True)):
        config = ldm_config(tmp_path, tiny_ckpts, kill_at)
        results = launch(torchrun_launcher(2, run_args(config, root, name, resume)), tmp_path, tmp_path)
        code, log = results[0]
        assert (code != 0) if kill_at >= 0 else (code == 0), log[-3000:]
        if resume:  # went on from the checkpoint, not from step 0 (which would end with the same weights)
            assert "Restored all states from the checkpoint at" in log, log[-3000:]
    assert_bit_identical(final_weights(root, "whole"), final_weights(root, "killed"))


def _rng_worker(rank, port, out_dir):
    import torch.distributed as dist

    from lit_diffusion.runtime.rng import TrainingRNG

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # every rank seeded alike, as seed_everything does
        outside = torch.get_rng_state()
        rng, draws = TrainingRNG(), []
        for step in range(2):
            rng.on_train_batch_start(None, None, None, step)
            draws.append(torch.randn(4))
            rng.on_train_batch_end(None, None, None, None, step)
        torch.save({"draws": torch.stack(draws), "outside_kept": torch.equal(torch.get_rng_state(), outside)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_draws_its_own_training_noise(tmp_path):
    """The ranks are seeded alike; their training steps must still draw different noise (else W ranks make one draw
    per batch position), rank 0 the noise one process draws, and what runs between steps keeps its own stream."""
    import torch.multiprocessing as mp
    from conftest import retry_on_gloo_teardown_abort
    from test_ddp_launch import free_port

    def run():
        mp.start_processes(_rng_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")

    retry_on_gloo_teardown_abort(run)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    torch.testing.assert_close(ranks[0]["draws"], torch.randn(2, 4))  # one process's stream
    assert not torch.isin(ranks[1]["draws"], ranks[0]["draws"]).any()
    assert ranks[0]["outside_kept"] and ranks[1]["outside_kept"]
