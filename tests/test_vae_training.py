"""End to end on real shapes shards: DataModule -> VAEModule -> PSNR, latent scale and checkpoint."""

import lightning as L
import pytest
import torch

from lit_diffusion.callbacks.reconstruction import ReconstructionGrid
from lit_diffusion.data.datamodule import ImageCaptionDataModule
from lit_diffusion.stages.vae import VAEModule


@pytest.fixture
def shapes(shapes_data):
    return shapes_data  # conftest: 256 train / 64 val shapes images at 16 px


def datamodule(shapes) -> ImageCaptionDataModule:
    return ImageCaptionDataModule(train_urls=str(shapes / "train-*.tar"), val_urls=str(shapes / "val-*.tar"),
                                  image_size=16, batch_size=16, num_workers=0, train_batches_per_epoch=40,
                                  shuffle_buffer=256)


def test_brief_training_on_shapes_raises_psnr(shapes, tmp_path):
    torch.manual_seed(0)
    arch = dict(base_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=4, mid_attention=False)
    module = VAEModule(arch=arch, lr=3e-3, betas=(0.9, 0.99), l1_weight=1.0, mse_weight=1.0)
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path, num_sanity_val_steps=0)
    before = L.Trainer(**args, enable_checkpointing=False).validate(module, datamodule=datamodule(shapes))[0]
    grid = ReconstructionGrid(num_images=4)
    trainer = L.Trainer(**args, max_steps=80, callbacks=[grid], enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule(shapes))
    after = trainer.callback_metrics
    assert after["val/psnr"].item() > before["val/psnr"] + 3.0
    assert after["val/ssim"].item() > before["val/ssim"]
    assert grid.last_path is not None and grid.last_path.is_file()  # <default_root_dir>/media without a logger
    assert grid.last_path.parent == tmp_path / "media"

    # the scale measured on all 64 val images makes their latents unit-variance; the checkpoint keeps it
    images = torch.cat([b["image"] for b in datamodule_val_batches(shapes)])
    assert images.shape[0] == 64
    trainer.save_checkpoint(tmp_path / "vae.ckpt")
    loaded = VAEModule.from_checkpoint(tmp_path / "vae.ckpt")
    with torch.no_grad():
        latents = loaded.encode(images)  # [64, 4, 4, 4]
    assert latents.shape == (64, 4, 4, 4)
    assert abs(latents.std(unbiased=False).item() - 1.0) < 0.1
    assert after["val/latent_std"].item() == pytest.approx(1 / loaded.scale_factor.item(), rel=1e-5)


def datamodule_val_batches(shapes):
    dm = datamodule(shapes)
    dm.setup("validate")
    return list(dm.val_dataloader())
