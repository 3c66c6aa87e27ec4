"""The GPU-scale DiT configs (configs/ldm/base_dit_b2.yaml, base_dit_xl2.yaml): the sizes their comments state, the
structure they build (at full size on the meta device, at reduced depth through LightningCLI on the CPU) and the
strategy each trains under."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import pytest
import torch
import yaml

from lit_diffusion.bench.common import save_stage_checkpoint
from lit_diffusion.bench.flops import base_config_estimate
from lit_diffusion.diffusion.flow import FlowSchedule, resolution_shift
from lit_diffusion.models.dit import DiT, DiTBlock, DiTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLIP_BASE = yaml.safe_load((CONFIGS / "clip" / "base.yaml").read_text())["model"]["init_args"]
# config file -> (preset, hidden size, depth, heads) of the DiT paper's Table 1
GPU_CONFIGS = {"base_dit_b2.yaml": ("B/2", 768, 12, 12), "base_dit_xl2.yaml": ("XL/2", 1152, 28, 16)}


def dit_parameters(d: int, depth: int, patch: int, c_in: int, c_out: int, context: int | None, pooled: int | None,
                   frequency_dim: int = 256, mlp_ratio: int = 4) -> int:
    """The DiT's parameter count written out from its architecture (models/dit.py's docstring; DiT sec. 3.2)."""
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731 (weight + bias)
    block = 4 * linear(d, d)  # self-attention: q, k, v, out (LayerNorms without affine: adaLN scales them)
    block += linear(d, mlp_ratio * d) + linear(mlp_ratio * d, d)  # MLP
    block += linear(d, 6 * d)  # adaLN-Zero: shift, scale, gate for attention and MLP
    if context:
        block += 2 * d + 2 * linear(d, d) + 2 * linear(context, d)  # pre-norm (affine) + cross-attention q, out, k, v
    total = depth * block + linear(patch * patch * c_in, d)  # patch embedding
    total += linear(frequency_dim, d) + linear(d, d)  # timestep MLP
    if pooled:
        total += linear(pooled, d) + linear(d, d)  # pooled text MLP
    return total + linear(d, 2 * d) + linear(d, patch * patch * c_out)  # final adaLN + linear


def dit_forward_flops(d: int, depth: int, patch: int, c_in: int, c_out: int, context: int, pooled: int, n: int,
                      length: int, frequency_dim: int = 256, mlp_ratio: int = 4) -> int:
    """Matmul FLOPs (2 per multiply-add, as FlopCounterMode counts) of one sample's forward: n image tokens,
    `length` text tokens."""
    block = 2 * n * (4 * d * d + 2 * mlp_ratio * d * d + 2 * d * d)  # per image token: q, k, v, out; MLP; cross q, out
    block += 2 * length * 2 * context * d  # cross-attention keys and values of the text tokens
    block += 2 * 6 * d * d  # adaLN: once per sample
    block += 2 * 2 * n * n * d + 2 * 2 * n * length * d  # q k^T and the weighted sum of v: self- and cross-attention
    total = depth * block + 2 * n * patch * patch * c_in * d  # patch embedding
    total += 2 * (frequency_dim * d + d * d) + 2 * (pooled * d + d * d)  # timestep and pooled-text MLPs
    return total + 2 * 2 * d * d + 2 * n * d * patch * patch * c_out  # final adaLN and linear


def meta_parameters(cfg: DiTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())


def test_dit_xl2_has_the_parameters_of_the_dit_papers_model():
    # facebookresearch/DiT's class-conditional DiT-XL/2 (8 output channels: eps and variance) has 675,129,632
    # parameters, of which 1001 x 1152 are its class embedding and 256 x 1152 its fixed sin-cos positions (stored
    # as a frozen parameter there, computed here); without text, ours is the same network
    ours = meta_parameters(DiTConfig.from_preset("XL/2", out_channels=8, context_dim=None))
    assert ours == 675_129_632 - 1001 * 1152 - 256 * 1152
    assert ours == dit_parameters(1152, 28, 2, 4, 8, None, None)


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_dit_config_sizes_match_their_comments(name):
    preset, hidden, depth, heads = GPU_CONFIGS[name]
    text = (CONFIGS / "ldm" / name).read_text()
    raw = yaml.safe_load(text)
    model = raw["model"]["init_args"]
    assert model["dit"]["preset"] == preset and model["image_size"] == 256 and model["pooled_text"] is True
    width, embed = CLIP_BASE["text"]["width"], CLIP_BASE["embed_dim"]
    cfg = DiTConfig.from_dict({**model["dit"], "context_dim": width, "pooled_dim": embed})
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (hidden, depth, heads, 2)

    params = meta_parameters(cfg)
    assert params == dit_parameters(hidden, depth, 2, 4, 4, width, embed)
    est = base_config_estimate(CONFIGS / "ldm" / name)
    assert est["denoiser"] == "dit" and est["params"] == params and est["latent_size"] == 32
    assert f"{params:,} parameters" in text
    batch = raw["data"]["init_args"]["batch_size"]
    assert f"{est['train_flops_per_sample'] / 1e9:.0f} GFLOP per sample" in text
    assert f"{est['train_flops_per_step'] / 1e12:.3g} TFLOP per device step at batch {batch}" in text
    assert est["forward_flops_per_sample"] == dit_forward_flops(hidden, depth, 2, 4, 4, width, embed, 16 * 16, 77)


@pytest.mark.parametrize("name", sorted(GPU_CONFIGS))
def test_gpu_dit_configs_build_with_lightning_cli(name, tiny_ckpts, tmp_path):
    """Through LightningCLI on the CPU with tiny f=8 CLIP/VAE stand-ins and the DiT cut to 2 blocks: the stage's
    structure (patches, widths, objective, flow schedule, GPU switches) is the config's."""
    from lightning.pytorch.cli import LightningCLI

    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    preset, hidden, _, heads = GPU_CONFIGS[name]
    raw = yaml.safe_load((CONFIGS / "ldm" / name).read_text())
    trainer, model = raw["trainer"], raw["model"]["init_args"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    clip = CLIPModule(tokenizer_path=str(tiny_ckpts["data"] / "tokenizer.json"), embed_dim=16,
                      vision=dict(image_size=16, patch_size=8, width=16, layers=1, heads=2),
                      text=dict(width=16, layers=1, heads=2))
    vae = VAEModule(arch=dict(base_channels=8, ch_mult=[1, 1, 1, 1], num_res_blocks=1, z_channels=4,
                              mid_attention=False, norm_groups=4))
    model.update(clip_ckpt=str(save_stage_checkpoint(clip, tmp_path / "clip.ckpt")),
                 vae_ckpt=str(save_stage_checkpoint(vae, tmp_path / "vae.ckpt")))
    model["dit"]["depth"] = 2
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    cli = LightningCLI(run=False, save_config_callback=None,
                       args=["--config", str(path), "--trainer.accelerator=cpu", "--trainer.devices=1",
                             "--trainer.strategy=auto", "--trainer.precision=32", "--trainer.logger=false"])
    stage = cli.model
    assert stage.latent_size == 32 and stage.latent_channels == 4 and stage.objective == "flow"
    c = stage.dit.config
    assert (c.hidden_size, c.num_heads, c.patch_size, c.depth) == (hidden, heads, 2, 2)
    assert c.context_dim == 16 and c.pooled_dim == 16 and not c.joint_attention
    # SD3's logit-normal(0, 1), shifted for 32x32 latents against SD3's 256 px (32x32 latent) base
    assert stage.schedule == FlowSchedule(timesteps="logit_normal", logit_mean=0.0, logit_std=1.0,
                                          shift=resolution_shift(stage.latent_size, 32))
    assert stage.hparams.sampler == "heun"
    checkpointing, compiled = name == "base_dit_xl2.yaml", name == "base_dit_b2.yaml"
    assert c.use_checkpoint is checkpointing and stage.hparams.compile is compiled
    assert cli.datamodule.image_size == 256


def test_the_b2_config_trains_under_ddp_with_ema():
    raw = yaml.safe_load((CONFIGS / "ldm" / "base_dit_b2.yaml").read_text())
    assert raw["trainer"]["strategy"] == "ddp"
    assert raw["trainer"]["callbacks"][-1]["class_path"] == "lit_diffusion.callbacks.ema.EMAWeightAveraging"


def test_the_xl2_config_trains_under_fsdp_sharding_each_dit_block():
    """The strategy as LightningCLI parses it (the Trainer's `strategy: str | Strategy`): Lightning's FSDPStrategy
    with one FSDP unit per DiTBlock, original parameters (the stage's AdamW groups) and sharded checkpoints."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    raw = yaml.safe_load((CONFIGS / "ldm" / "base_dit_xl2.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Union[str, Strategy])
    strategy = parser.instantiate(parser.parse_object({"strategy": raw["trainer"]["strategy"]})).strategy
    assert type(strategy) is FSDPStrategy
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {DiTBlock}
    assert strategy.kwargs["use_orig_params"] is True and strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    # grids and in-loop evaluation work on the sharded DiT (tests/test_fsdp.py); Lightning's EMA does not
    paths = [cb["class_path"].rsplit(".", 1)[-1] for cb in raw["trainer"]["callbacks"]]
    assert {"SampleGrid", "DiffusionEvaluation"} <= set(paths) and "EMAWeightAveraging" not in paths
