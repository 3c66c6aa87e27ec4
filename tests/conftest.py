import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

TINY_CLIP = dict(embed_dim=32, vision=dict(image_size=16, patch_size=8, width=32, layers=1, heads=2),
                 text=dict(width=32, layers=1, heads=2), lr=1e-3, warmup_steps=0)
TINY_VAE = dict(arch=dict(base_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=4,
                          mid_attention=False, norm_groups=4), lr=2e-3, warmup_steps=0)
TINY_UNET = dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2], head_dim=8,
                 norm_groups=4)
TINY_DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)


def _fit(module, data, steps: int, root):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """A small shapes data set at 16 px: shards and tokenizer."""
    from lit_diffusion.data.shapes import write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, train=256, val=64, size=16, shard_size=128, seed=0)
    return out


def tiny_datamodule(shapes_data, batch_size: int = 16, **kwargs):
    from lit_diffusion.data.datamodule import ImageCaptionDataModule

    return ImageCaptionDataModule(train_urls=str(shapes_data / "train-*.tar"), val_urls=str(shapes_data / "val-*.tar"),
                                  image_size=16, batch_size=batch_size, num_workers=0, train_batches_per_epoch=5,
                                  **kwargs)


@pytest.fixture(scope="session")
def tiny_ckpts(shapes_data, tmp_path_factory):
    """Briefly trained tiny CLIP and VAE checkpoints (the frozen stages of the diffusion tests)."""
    from lit_diffusion.stages.clip import CLIPModule
    from lit_diffusion.stages.vae import VAEModule

    root = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    clip = CLIPModule(tokenizer_path=str(shapes_data / "tokenizer.json"), **TINY_CLIP)
    trainer = _fit(clip, tiny_datamodule(shapes_data), 5, root)
    trainer.save_checkpoint(root / "clip.ckpt")
    vae = VAEModule(**TINY_VAE)
    trainer = _fit(vae, tiny_datamodule(shapes_data), 5, root)
    trainer.save_checkpoint(root / "vae.ckpt")
    return {"clip": root / "clip.ckpt", "vae": root / "vae.ckpt", "data": shapes_data}


@pytest.fixture(scope="session")
def embedded_latents(tiny_ckpts, tmp_path_factory):
    """The tiny shapes data (train and val) encoded by the tiny CLIP and VAE into latent shards with each image's CLIP
    image embedding (`data encode --image-embeddings`): unCLIP's prior and decoder train from them. Read only."""
    from lit_diffusion.cli import main

    out = tmp_path_factory.mktemp("embedded") / "latents"
    data = tiny_ckpts["data"]
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--train", str(data / "train-*.tar"), "--val", str(data / "val-*.tar"), "--out", str(out),
          "--image-size", "16", "--batch-size", "64", "--device", "cpu", "--image-embeddings"])
    return out


def retry_on_gloo_teardown_abort(run):
    """`run()` (a spawn of DDP processes), once more if a process died of SIGABRT: torch 2.14's gloo can abort a
    process while it tears down (seen about 1 run in 10 on this CPU). Any other failure, or a second abort, fails."""
    try:
        return run()
    except torch.multiprocessing.ProcessExitedException as e:
        if "SIGABRT" not in str(e):
            raise
        return run()


def randomise_unet(model) -> None:
    """A trained-looking U-Net: its zero-initialised output layers would make the text condition invisible."""
    with torch.no_grad():
        for p in model.unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.05)
