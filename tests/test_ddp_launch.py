"""Multi-process DDP on CPU (gloo), launched the way users launch it: two `fabric run` launchers as two nodes of
one process each, and plain `torchrun`. Each stage trains a few steps; a probe callback (written to tmp_path and
imported by class path in the launched processes) dumps what each rank saw: its validation keys, its metrics after
reduction, the in-loop evaluation, its learning rates and DDP timeout.

Every launch is bounded by a timeout that only guards against a hang (the test then fails with the logs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CLIP, TINY_UNET, TINY_VAE

pytestmark = pytest.mark.slow  # each test starts two DDP processes and their launchers

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "lit_diffusion" / "__main__.py"
HANG_GUARD_S = 420  # a launch that takes longer is hung

PROBE = '''
import json, os
from pathlib import Path

import lightning as L


class Probe(L.Callback):
    """Dumps what this rank saw to OUT_DIR/rank{R}.json; with die_at_step, rank `die_rank` exits hard there."""

    def __init__(self, out_dir: str, die_at_step: int = -1, die_rank: int = 1):
        self.out_dir, self.die_at_step, self.die_rank = Path(out_dir), die_at_step, die_rank
        self.val_keys = []
        self.train_batches = 0

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_keys.append([])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val_keys[-1].extend(batch["key"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_batches += 1
        if trainer.global_rank == self.die_rank and trainer.global_step == self.die_at_step:
            os._exit(1)

    def on_fit_end(self, trainer, pl_module):
        history = [h for cb in trainer.callbacks for h in getattr(cb, "history", [])
                   if type(cb).__name__ == "DiffusionEvaluation"]
        batch_info = [cb.info for cb in trainer.callbacks if type(cb).__name__ == "BatchInfo"]
        dump = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "val_keys": self.val_keys, "train_batches": self.train_batches, "global_step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "eval_history": history, "batch_info": batch_info[0] if batch_info else None,
            "hparams_lr": float(pl_module.hparams.lr),
            "base_lrs": [list(map(float, c.scheduler.base_lrs)) for c in trainer.lr_scheduler_configs],
            "timeout_s": getattr(trainer.strategy, "_timeout").total_seconds(),
            "default_root_dir": str(trainer.default_root_dir),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(dump))
'''


# ------------------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fabric_command() -> list[str]:
    """The `fabric` console script of this Python's environment (`fabric run ...`), else the same click command
    through `python -m lightning.fabric.cli` (which is `fabric run` without the `run`)."""
    script = Path(sys.executable).parent / "fabric"
    return [str(script), "run"] if script.is_file() else [sys.executable, "-m", "lightning.fabric.cli"]


def fabric_launchers(num_nodes: int, args: list[str]) -> list[list[str]]:
    port = free_port()
    return [[*fabric_command(), "--accelerator", "cpu", "--strategy", "ddp", "--devices", "1",
             "--num-nodes", str(num_nodes), "--node-rank", str(rank), "--main-address", "127.0.0.1",
             "--main-port", str(port), str(MAIN), *args] for rank in range(num_nodes)]


def torchrun_launcher(nproc: int, args: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "lit_diffusion", *args]]


def launch(commands: list[list[str]], tmp_path: Path, probe_dir: Path) -> list[tuple[int, str]]:
    """Start all launchers at once, wait for all; (exit status, log) each. A hang fails the test with the logs."""
    env = {k: v for k, v in os.environ.items() if k != "LIT_DIFFUSION_RUN_NAME"}
    env.update(PYTHONPATH=os.pathsep.join([str(probe_dir), str(REPO), env.get("PYTHONPATH", "")]),
               WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    logs = [tmp_path / f"launcher{i}.log" for i in range(len(commands))]
    procs = []
    for cmd, log in zip(commands, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + HANG_GUARD_S
    hung = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = True
    if hung:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and the workers it started (own session)
                p.wait()
        pytest.fail("DDP launch hung:\n" + "\n".join(f"--- {log}\n{log.read_text()[-4000:]}" for log in logs))
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def assert_all_ok(results: list[tuple[int, str]]) -> None:
    for i, (rc, log) in enumerate(results):
        assert rc == 0, f"launcher {i} exited with {rc}:\n{log[-6000:]}"


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def probe_module(tmp_path: Path) -> Path:
    directory = tmp_path / "probe_pkg"
    directory.mkdir(exist_ok=True)
    (directory / "ddp_probe.py").write_text(PROBE)
    return directory


def read_probes(out: Path, world: int = 2) -> list[dict]:
    found = sorted(p.name for p in out.glob("rank*.json"))
    assert found == [f"rank{r}.json" for r in range(world)], found
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def shard_keys(*shards: Path) -> list[str]:
    keys: list[str] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                key = name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


def data_args(train: str, val: str, batch_size: int, num_workers: int, **extra) -> dict:
    return {"class_path": "lit_diffusion.data.datamodule.ImageCaptionDataModule",
            "init_args": {"train_urls": train, "val_urls": val, "image_size": 16, "batch_size": batch_size,
                          "num_workers": num_workers, "train_batches_per_epoch": 3, "shuffle_buffer": 32, **extra}}


def trainer_args(max_steps: int, callbacks: list[dict], **extra) -> dict:
    return {"max_steps": max_steps, "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "log_every_n_steps": 1, "callbacks": callbacks, **extra}


def assert_split_and_reduced(probes: list[dict], all_val_keys: list[str]) -> None:
    """(b) each validation epoch splits the val set between the ranks exactly; (c) reduced metrics agree."""
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
    epochs = [p["val_keys"] for p in probes]
    assert len(epochs[0]) == len(epochs[1]) >= 1
    for keys0, keys1 in zip(*epochs):
        assert keys0 and keys1, "a rank validated on nothing"
        assert not set(keys0) & set(keys1), "a val sample was seen by both ranks"
        assert len(keys0) == len(set(keys0)) and len(keys1) == len(set(keys1)), "a val sample was seen twice"
        assert sorted(keys0 + keys1) == sorted(all_val_keys)
    val0 = {k: v for k, v in probes[0]["metrics"].items() if k.startswith("val/")}
    val1 = {k: v for k, v in probes[1]["metrics"].items() if k.startswith("val/")}
    assert val0 and "val/loss" in val0
    assert val0 == val1  # bit-identical after the all-reduce


def run_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "wandb" not in p.parts)


# ------------------------------------------------------------------------------------------------------- stages
def test_clip_two_fabric_nodes_on_uneven_shards(shapes_data, tmp_path):
    """CLIP as 2 nodes x 1 process (two `fabric run` launchers), 2 workers per rank on 2 train and 2 val shards,
    one of each empty: fewer shards than ranks x workers must neither hang nor duplicate val samples. Also: a
    configured DDP timeout survives the launcher's --strategy ddp, and --run.scale_lr scales by the global batch."""
    data = tmp_path / "uneven"
    data.mkdir()
    shutil.copy(shapes_data / "train-000000.tar", data / "train-000000.tar")
    shutil.copy(shapes_data / "val-000000.tar", data / "val-000000.tar")
    for name in ("train-000001.tar", "val-000001.tar"):
        tarfile.open(data / name, "w").close()  # an empty shard: just the end-of-archive blocks
    val_max = 60  # not a multiple of 2 ranks x 2 workers x batch: ranks and workers end on different batch sizes
    all_val = shard_keys(data / "val-000000.tar", data / "val-000001.tar")[:val_max]
    probe_out = tmp_path / "probe"
    config = write_config(tmp_path / "clip.yaml", {
        "seed_everything": 0,
        "model": {"class_path": "lit_diffusion.stages.clip.CLIPModule",
                  "init_args": {**TINY_CLIP, "tokenizer_path": str(shapes_data / "tokenizer.json")}},
        "data": data_args(str(data / "train-*.tar"), str(data / "val-*.tar"), 8, 2, val_max_samples=val_max),
        "trainer": trainer_args(3, [{"class_path": "ddp_probe.Probe", "init_args": {"out_dir": str(probe_out)}}],
                                strategy={"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                          "init_args": {"timeout": "0:02:00"}}),
    })
    args = ["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.name", "clip",
            "--run.wandb", "false", "--run.scale_lr", "true"]
    results = launch(fabric_launchers(2, args), tmp_path, probe_module(tmp_path))
    assert_all_ok(results)
    probes = read_probes(probe_out)
    assert all(p["num_nodes"] == 2 and p["global_step"] == 3 for p in probes)
    assert_split_and_reduced(probes, all_val)
    for p in probes:
        assert p["timeout_s"] == 120.0  # the config's DDPStrategy(timeout=...) reached the process group
        assert p["batch_info"] == {"data/batch_size_per_device": 8, "data/world_size": 2,
                                   "data/accumulate_grad_batches": 1, "data/global_batch_size": 16,
                                   "optim/lr_scale": 2.0}
        assert p["base_lrs"] == [[2 * p["hparams_lr"]] * 2]  # linear scaling: global 16 / reference 8
    # (d) rank-zero side effects: one run dir, one checkpoint; the global batch is in the logs
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["clip"]
    run = tmp_path / "runs" / "clip"
    files = run_files(run)
    assert [f for f in files if f.startswith("checkpoints")] == ["checkpoints/last.ckpt"], files
    assert "config.yaml" in files and "metrics.csv" in files
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data/global_batch_size"] == 16.0 and rows[0]["data/batch_size_per_device"] == 8.0
    assert json.loads((run / "summary.json").read_text())["params"]["data/global_batch_size"] == 16


def test_vae_plain_torchrun_agrees_on_the_default_run_name(shapes_data, tmp_path):
    """VAE with plain `torchrun --nnodes 1 --nproc-per-node 2 -m lit_diffusion`, no --run.name: both ranks must
    pick rank zero's default run directory (they parse the command line each on its own)."""
    probe_out = tmp_path / "probe"
    config = write_config(tmp_path / "vae_tiny.yaml", {
        "seed_everything": 0,
        "model": {"class_path": "lit_diffusion.stages.vae.VAEModule", "init_args": TINY_VAE},
        "data": data_args(str(shapes_data / "train-*.tar"), str(shapes_data / "val-*.tar"), 8, 0),
        "trainer": trainer_args(3, [{"class_path": "ddp_probe.Probe", "init_args": {"out_dir": str(probe_out)}},
                                    {"class_path": "lit_diffusion.callbacks.reconstruction.ReconstructionGrid",
                                     "init_args": {"num_images": 4}}]),
    })
    args = ["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.wandb", "false"]
    results = launch(torchrun_launcher(2, args), tmp_path, probe_module(tmp_path))
    assert_all_ok(results)
    probes = read_probes(probe_out)
    assert_split_and_reduced(probes, shard_keys(*sorted(shapes_data.glob("val-*.tar"))))
    for key in ("val/psnr", "val/ssim", "val/latent_std"):
        assert key in probes[0]["metrics"]
    runs = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(runs) == 1 and runs[0].startswith("vae_tiny-"), runs
    assert probes[0]["default_root_dir"] == probes[1]["default_root_dir"] == str(tmp_path / "runs" / runs[0])
    files = run_files(tmp_path / "runs" / runs[0])
    assert [f for f in files if f.startswith("checkpoints")] == ["checkpoints/last.ckpt"], files
    assert [f for f in files if f.startswith("media")] == ["media/reconstructions_step0000003.png"], files
    assert probes[0]["batch_info"]["data/global_batch_size"] == 16
    assert probes[0]["base_lrs"] == [[probes[0]["hparams_lr"]] * len(probes[0]["base_lrs"][0])]  # not scaled


def test_ldm_two_fabric_nodes_with_in_loop_evaluation(tiny_ckpts, tmp_path):
    """Latent diffusion as 2 nodes x 1 process with EMA, a sample grid, an in-loop evaluation and W&B (offline):
    rank-zero-only side effects, and the 2-rank evaluation equals a 1-rank evaluation of the saved EMA weights."""
    from conftest import tiny_datamodule

    from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator
    from lit_diffusion.stages.ldm import LatentDiffusionModule

    data = tiny_ckpts["data"]
    probe_out, cache = tmp_path / "probe", tmp_path / "fid_cache"
    num_samples, steps = 16, 2
    config = write_config(tmp_path / "ldm.yaml", {
        "seed_everything": 0,
        "model": {"class_path": "lit_diffusion.stages.ldm.LatentDiffusionModule",
                  "init_args": {"clip_ckpt": str(tiny_ckpts["clip"]), "vae_ckpt": str(tiny_ckpts["vae"]),
                                "image_size": 16, "unet": TINY_UNET, "sample_steps": 4, "warmup_steps": 0,
                                "lr": 1e-3, "guidance": 3.0}},
        "data": data_args(str(data / "train-*.tar"), str(data / "val-*.tar"), 8, 0, train_batches_per_epoch=steps),
        "trainer": trainer_args(steps, [
            {"class_path": "ddp_probe.Probe", "init_args": {"out_dir": str(probe_out)}},
            {"class_path": "lit_diffusion.callbacks.sample_grid.SampleGrid",
             "init_args": {"every_n_steps": steps, "prompts": ["a large red circle"], "guidance": [1.0, 3.0]}},
            {"class_path": "lit_diffusion.callbacks.evaluation.DiffusionEvaluation",
             "init_args": {"every_n_steps": steps, "guidance": [1.0], "num_samples": num_samples,
                           "backends": ["clip"], "cache_dir": str(cache)}},
            {"class_path": "lit_diffusion.callbacks.ema.EMAWeightAveraging", "init_args": {"decay": 0.5}},
        ]),
    })
    args = ["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.name", "ldm"]
    results = launch(fabric_launchers(2, args), tmp_path, probe_module(tmp_path))
    assert_all_ok(results)
    probes = read_probes(probe_out)
    assert_split_and_reduced(probes, shard_keys(*sorted(data.glob("val-*.tar"))))

    # one in-loop evaluation (at the last step, so not repeated at train end), identical on both ranks
    histories = [p["eval_history"] for p in probes]
    assert [h["step"] for h in histories[0]] == [h["step"] for h in histories[1]] == [steps]
    evaluated = histories[0][0]
    assert evaluated == histories[1][0] | {"eval/seconds": evaluated["eval/seconds"]}
    assert evaluated["eval/num_samples"] == num_samples
    for g in ("1.0", "3.0"):
        assert {f"eval/fid_clip_g{g}", f"eval/clip_score_g{g}", f"eval/caption_acc_g{g}"} <= set(evaluated)

    # (d) rank-zero side effects: one run dir, one checkpoint, one grid, one evaluation, one real-statistics file,
    # one W&B run
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ldm"]
    run = tmp_path / "runs" / "ldm"
    files = run_files(run)
    assert [f for f in files if f.startswith("checkpoints")] == ["checkpoints/last.ckpt"], files
    assert [f for f in files if f.startswith("media")] == [f"media/samples_step{steps:07d}.png"], files
    assert [f for f in files if f.startswith("eval") and f.endswith(".json")] == [f"eval/eval_step{steps:07d}.json"]
    assert len(list(cache.glob("fid_stats_clip_*.pt"))) == 1 and not list(cache.glob("*.tmp"))
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs
    assert not (tmp_path / "wandb").exists()  # no W&B files outside the run dir (the launchers' working dir)

    # (e) the 2-rank evaluation equals the 1-rank evaluation of the same EMA weights on the same samples
    torch.manual_seed(0)
    model = LatentDiffusionModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    evaluator = Evaluator(EvalConfig(guidance=[1.0, 3.0], num_samples=num_samples, backends=["clip"]), model.clip)
    single = evaluator.run(model, tiny_datamodule(data, batch_size=8).eval_dataloader(num_samples))
    for key, value in single.items():
        if key.startswith("eval/") and key != "eval/seconds":
            assert math.isclose(evaluated[key], value, rel_tol=1e-6, abs_tol=1e-9), (key, evaluated[key], value)


def test_a_dying_rank_ends_the_whole_two_node_job(shapes_data, tmp_path):
    """Rank 1 exits hard at step 2 of 50; rank 0 (the other launcher) must then fail too instead of waiting for
    it: gloo reports the closed connection at the next collective, and each launcher exits non-zero."""
    probe_out = tmp_path / "probe"
    config = write_config(tmp_path / "vae_tiny.yaml", {
        "model": {"class_path": "lit_diffusion.stages.vae.VAEModule", "init_args": TINY_VAE},
        "data": data_args(str(shapes_data / "train-*.tar"), str(shapes_data / "val-*.tar"), 4, 0,
                          train_batches_per_epoch=50),
        "trainer": trainer_args(50, [{"class_path": "ddp_probe.Probe",
                                      "init_args": {"out_dir": str(probe_out), "die_at_step": 2}}],
                                limit_val_batches=0),
    })
    args = ["fit", "--config", str(config), "--run.root", str(tmp_path / "runs"), "--run.name", "dies",
            "--run.wandb", "false", "--run.checkpoint_every", "0"]
    (rc0, log0), (rc1, log1) = launch(fabric_launchers(2, args), tmp_path, probe_module(tmp_path))
    assert rc1 != 0, log1[-4000:]  # torchrun passes its worker's failure on
    assert rc0 != 0, log0[-4000:]
    assert "Connection closed by peer" in log0 or "Connection reset by peer" in log0, log0[-4000:]
    assert not list(probe_out.glob("rank*.json"))  # neither rank reached the end of fit
