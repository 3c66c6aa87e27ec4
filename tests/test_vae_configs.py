from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lit_diffusion.callbacks.reconstruction import ReconstructionGrid
from lit_diffusion.stages.vae import VAEModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vae"


def build(name: str, *overrides: str) -> LightningCLI:
    # the configs' own trainer settings, made runnable here (CPU, no logger)
    args = ["--config", str(CONFIGS / name), "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.logger=false", *overrides]
    return LightningCLI(run=False, args=args, save_config_callback=None)


def test_shapes_config_builds_the_f4_vae():
    cli = build("shapes.yaml")
    model = cli.model
    assert isinstance(model, VAEModule)
    assert (model.downsample_factor, model.latent_channels) == (4, 4)
    assert cli.datamodule.image_size == 32 and cli.datamodule.train_urls == "data/shapes/train-*.tar"
    assert model.discriminator is None and model.automatic_optimization
    assert any(isinstance(cb, ReconstructionGrid) for cb in cli.trainer.callbacks)


def test_base_config_is_f8_256px_bf16_gpu():
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert raw["trainer"]["accelerator"] == "gpu" and raw["trainer"]["precision"] == "bf16-mixed"
    assert raw["data"]["init_args"]["image_size"] == 256
    # shrink the width only, to build it quickly on CPU
    cli = build("base.yaml", "--trainer.strategy=auto", "--trainer.precision=32",
                "--model.init_args.arch.base_channels=32")
    assert (cli.model.downsample_factor, cli.model.latent_channels) == (8, 4)
    assert cli.model.discriminator is not None and cli.model.hparams.disc_start > 0


@pytest.mark.parametrize("name", ["shapes.yaml", "base.yaml"])
def test_config_hparams_are_plain(name):
    model = build(name, "--trainer.strategy=auto", "--trainer.precision=32",
                  "--model.init_args.arch.base_channels=32").model
    assert isinstance(model.hparams["arch"], dict) and isinstance(model.hparams["betas"], list)
