"""FSDP on 2 CPU processes (gloo): a tiny DiT + flow stage trains a few steps under Lightning's FSDPStrategy with the
denoiser sharded per DiTBlock and the frozen CLIP/VAE whole on every rank; its sharded checkpoint, consolidated with
Lightning's tool, equals the full one, loads with weights_only=True into one process and samples.

Lightning refuses FSDP on the CPU in two places, neither of them FSDP's own limit; the launched script works around
both in a subclass that changes nothing else (see CPUFSDPStrategy below):
- `Trainer(accelerator="cpu", strategy=FSDPStrategy(...))`: "ValueError: The strategy `fsdp` requires a GPU
  accelerator, but received `accelerator='cpu'`" (the accelerator connector checks `type(strategy) is FSDPStrategy`);
- the strategy gives FSDP `device_id=root_device.index`, None on the CPU: "RuntimeError: FSDP needs a non-CPU
  accelerator device, but no accelerator device is detected."
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_datamodule
from test_ddp_launch import assert_all_ok, free_port, launch

from lit_diffusion.callbacks.sample_grid import SampleGrid
from lit_diffusion.evaluation.evaluator import EvalConfig, Evaluator

from lit_diffusion.stages.ldm import LatentDiffusionModule

pytestmark = pytest.mark.slow  # two FSDP processes and their launcher

DEPTH = 2

SCRIPT = '''
import json, sys
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import enable_wrap

from lit_diffusion.callbacks.evaluation import DiffusionEvaluation
from lit_diffusion.callbacks.sample_grid import SampleGrid
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.models.dit import DiTBlock
from lit_diffusion.stages.ldm import LatentDiffusionModule


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy whose wrap context names the CPU as FSDP's device (Lightning passes None there). Being a subclass
    also passes the accelerator connector's `type(strategy) is FSDPStrategy` GPU check."""

    @contextmanager
    def model_sharded_context(self):
        with enable_wrap(wrapper_cls=FullyShardedDataParallel, sharding_strategy=self.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs):
            yield


class Probe(L.Callback):
    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        dump = {
            "global_step": trainer.global_step,
            "dit_is_fsdp": isinstance(pl_module.dit, FullyShardedDataParallel),
            "fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in pl_module.modules()),
            "clip_or_vae_in_fsdp": any(isinstance(m, FullyShardedDataParallel)
                                       for m in [*pl_module.clip.modules(), *pl_module.vae.modules()]),
            "dit_local_numel": sum(p.numel() for p in pl_module.dit.parameters()),
            "clip_numel": sum(p.numel() for p in pl_module.clip.parameters()),
            "vae_numel": sum(p.numel() for p in pl_module.vae.parameters()),
            "groups": [{"weight_decay": g["weight_decay"], "numel": sum(p.numel() for p in g["params"])}
                       for g in opt.param_groups],
        }
        Path(OUT, f"rank{trainer.global_rank}.json").write_text(json.dumps(dump))


class Grid(SampleGrid):
    """Keeps the grid each rank drew."""

    def grid(self, pl_module):
        rows, labels = super().grid(pl_module)
        torch.save(torch.stack(rows), Path(OUT, f"grid_rank{torch.distributed.get_rank()}.pt"))
        return rows, labels


OUT, DATA, CLIP, VAE = sys.argv[1:5]
torch.set_num_threads(1)
torch.manual_seed(0)
module = LatentDiffusionModule(
    clip_ckpt=CLIP, vae_ckpt=VAE, image_size=16, pooled_text=True, objective="flow", sampler="euler",
    dit=dict(patch_size=1, hidden_size=32, depth=DEPTH, num_heads=2, use_checkpoint=True),
    lr=1e-3, weight_decay=0.1, warmup_steps=0)
torch.save({k: v.clone() for k, v in module.dit.state_dict().items()}, Path(OUT, "init_dit.pt"))
# batch 2: the 5 evaluation samples split 3 / 2 over the ranks, 2 batches on rank 0 and 1 on rank 1
data = ImageCaptionDataModule(train_urls=str(Path(DATA, "train-*.tar")), val_urls=str(Path(DATA, "val-*.tar")),
                              image_size=16, batch_size=2, num_workers=0, train_batches_per_epoch=4)
strategy = CPUFSDPStrategy(auto_wrap_policy={DiTBlock}, state_dict_type="sharded")
evaluation = DiffusionEvaluation(**EVAL)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(Path(OUT, "root")),
                    callbacks=[Probe(), Grid(**GRID), evaluation])
trainer.fit(module, datamodule=data)
Path(OUT, f"eval_rank{trainer.global_rank}.json").write_text(json.dumps(evaluation.history))
trainer.save_checkpoint(Path(OUT, "sharded.ckpt"))  # a folder: one shard file per rank + meta.pt
strategy._state_dict_type = "full"  # the same weights again, gathered into one file on rank 0
trainer.save_checkpoint(Path(OUT, "full.ckpt"))
'''.replace("DEPTH", str(DEPTH))
# drawn at the end of training (every rank in step: each denoiser call all-gathers the sharded weights)
GRID = dict(prompts=["a red circle", "a blue square"], guidance=[1.0, 3.0], every_n_steps=0, steps=3)
EVAL = dict(every_n_steps=0, guidance=[1.0, 3.0], num_samples=5, steps=3, cache_dir=None)
SCRIPT = SCRIPT.replace("GRID", repr(GRID)).replace("EVAL", repr(EVAL))


def test_fsdp_trains_the_sharded_dit_draws_grids_evaluates_and_its_sharded_checkpoint_samples_in_one_process(tiny_ckpts, tmp_path):
    stages = tmp_path / "stages"
    stages.mkdir()
    clip, vae = shutil.copy(tiny_ckpts["clip"], stages), shutil.copy(tiny_ckpts["vae"], stages)
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
           str(out), str(tiny_ckpts["data"]), str(clip), str(vae)]
    assert_all_ok(launch([cmd], tmp_path, tmp_path))

    full = torch.load(out / "full.ckpt", map_location="cpu", weights_only=True)
    state = full["state_dict"]
    ref = LatentDiffusionModule.from_checkpoint(out / "full.ckpt")  # one process, the gathered weights
    numel = {name: sum(p.numel() for p in getattr(ref, name).parameters()) for name in ("dit", "clip", "vae")}
    matrices = sum(p.numel() for p in ref.dit.parameters() if p.ndim >= 2)
    probes = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for p in probes:
        assert p["global_step"] == 3 and p["dit_is_fsdp"] and not p["clip_or_vae_in_fsdp"]
        assert p["fsdp_units"] == DEPTH + 1  # one per DiTBlock (auto_wrap_policy) + the rest of the DiT
        # the frozen encoders are whole on both ranks
        assert p["clip_numel"] == numel["clip"] and p["vae_numel"] == numel["vae"]
        assert 0 < p["dit_local_numel"] < numel["dit"]
    assert sum(p["dit_local_numel"] for p in probes) == numel["dit"]  # the DiT is split between the ranks
    # AdamW decays exactly the matrices, although FSDP shows every shard as a flat 1-d tensor
    decayed = sum(g["numel"] for p in probes for g in p["groups"] if g["weight_decay"] == 0.1)
    assert decayed == matrices and all(len(p["groups"]) == 2 for p in probes)

    shards = sorted(f.name for f in (out / "sharded.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # a shard file per rank
    consolidated = tmp_path / "consolidated.ckpt"
    proc = subprocess.run([sys.executable, "-m", "lightning.pytorch.utilities.consolidate_checkpoint",
                           str(out / "sharded.ckpt"), "--output_file", str(consolidated)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = torch.load(consolidated, map_location="cpu", weights_only=True)
    assert merged["lit_diffusion"] == full["lit_diffusion"] and merged["lit_diffusion"]["objective"] == "flow"
    assert sorted(merged["state_dict"]) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(merged["state_dict"][key], value, rtol=0, atol=0, msg=key)
    init = torch.load(out / "init_dit.pt", weights_only=True)
    assert max((state["dit." + k] - v).abs().max().item() for k, v in init.items()) > 1e-3  # it trained

    shutil.rmtree(stages)  # the stage files are gone: the checkpoints carry CLIP and the VAE
    one = LatentDiffusionModule.from_checkpoint(consolidated)
    images = one.sample(["a red circle", "a blue square"], steps=3, seed=0)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() <= images.max() <= 1
    torch.testing.assert_close(images, ref.sample(["a red circle", "a blue square"], steps=3, seed=0), rtol=0, atol=0)

    # the grid and the in-loop evaluation ran on the sharded DiT: every rank drew the grid in step, rank zero alone
    # wrote it, and the figures equal one process's evaluation of the gathered weights on the same 5 samples,
    # although rank 0 held 2 batches and rank 1 one (rank 1 stepped on a dummy batch meanwhile)
    grids = [torch.load(out / f"grid_rank{r}.pt", weights_only=True) for r in range(2)]
    rows, _ = SampleGrid(**GRID).grid(ref)
    torch.testing.assert_close(grids[0], grids[1], rtol=0, atol=0)
    torch.testing.assert_close(grids[0], torch.stack(rows), rtol=0, atol=1e-5)
    assert sorted(p.name for p in (out / "root" / "media").iterdir()) == ["samples_step0000003.png"]
    history = [json.loads((out / f"eval_rank{r}.json").read_text()) for r in range(2)]
    assert [h["step"] for h in history[0]] == [3] and _same_figures(*history)
    config = EvalConfig(guidance=sorted({*EVAL["guidance"], float(ref.hparams.guidance)}), num_samples=5,
                        backends=["clip"], steps=3, seed=0, cache_dir=None)
    data = tiny_datamodule(tiny_ckpts["data"], batch_size=8)
    alone = Evaluator(config, ref.clip).run(ref, data.eval_dataloader(5))
    figures = {k: v for k, v in alone.items() if k.startswith(("eval/fid", "eval/clip_score", "eval/caption_acc"))}
    # per scale: FID, CLIP score, caption accuracy; once: the VAE's ceiling (the frozen VAE is whole on every rank)
    assert len(figures) == 3 * len(config.guidance) + 1 and "eval/caption_acc_vae" in figures
    assert alone["eval/num_samples"] == 5
    assert history[0][0]["eval/num_samples"] == 5
    for key, value in figures.items():
        assert history[0][0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _same_figures(a: list[dict], b: list[dict]) -> bool:
    """Both ranks report the same reduced figures (their own timings aside)."""
    return [{k: v for k, v in h.items() if k != "eval/seconds"} for h in a] == \
        [{k: v for k, v in h.items() if k != "eval/seconds"} for h in b]
