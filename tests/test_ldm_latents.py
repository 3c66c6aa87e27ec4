"""The diffusion stage trained from latent shards (`data encode` once, then `LatentDataModule`)."""

import json

import lightning as L
import pytest
import torch
from conftest import TINY_UNET, retry_on_gloo_teardown_abort, tiny_datamodule

from lit_diffusion.callbacks.evaluation import real_images
from lit_diffusion.data.datamodule import LatentDataModule
from lit_diffusion.data.latents import state_dict_hash
from lit_diffusion.stages.ldm import LatentDiffusionModule

STEPS = 4


@pytest.fixture(scope="module")
def latents(tiny_ckpts, tmp_path_factory):
    """The tiny shapes shards (train and val) encoded by the tiny CLIP and VAE, float32, no flips."""
    from lit_diffusion.cli import main

    out = tmp_path_factory.mktemp("latents")
    data = tiny_ckpts["data"]
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]),
          "--data", f"{data}/train-*.tar::{data}/val-*.tar", "--out", str(out), "--dtype", "float32",
          "--batch-size", "16", "--device", "cpu"])
    return out


def latent_datamodule(out, **kwargs):
    return LatentDataModule(train_urls=str(out / "train-*.tar"), val_urls=str(out / "val-*.tar"), batch_size=16,
                            num_workers=0, train_batches_per_epoch=5, **kwargs)


def make_ldm(ckpts, **kwargs):
    torch.manual_seed(0)
    return LatentDiffusionModule(clip_ckpt=str(ckpts["clip"]), vae_ckpt=str(ckpts["vae"]), image_size=16,
                                 unet=TINY_UNET, warmup_steps=0, pooled_text=True, p_uncond=0.3, **kwargs)


class Record(L.Callback):
    def __init__(self):
        self.losses, self.keys = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.keys.append(list(batch["key"]))


def train(ckpts, data, root, steps=STEPS):
    L.seed_everything(0)
    model, record = make_ldm(ckpts), Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[record], default_root_dir=str(root))
    trainer.fit(model, datamodule=data)
    return model, record


def test_training_from_latents_equals_encoding_online_step_for_step(tiny_ckpts, latents, tmp_path, monkeypatch):
    online, online_run = train(tiny_ckpts, tiny_datamodule(tiny_ckpts["data"]), tmp_path / "online")
    # from latents neither encoder runs per step; CLIP encodes only the empty caption, once, for dropout
    encode_prompts, prompts = LatentDiffusionModule.encode_prompts, []
    monkeypatch.setattr(LatentDiffusionModule, "encode_prompts", lambda self, p: prompts.append(p) or
                        encode_prompts(self, p))
    monkeypatch.setattr(LatentDiffusionModule, "encode_images", lambda *a: pytest.fail("the VAE encoder ran"))
    model, run = train(tiny_ckpts, latent_datamodule(latents), tmp_path / "latents")
    assert prompts == [[""]]
    assert run.keys == online_run.keys and len(run.keys) == STEPS  # the same samples in the same batches
    assert len(set(run.losses)) == STEPS  # the losses move: the comparison below is not of constants
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(online_run.losses), rtol=1e-4, atol=1e-6)
    trained = {k: v for k, v in model.unet.state_dict().items()}
    changed = 0
    for name, value in online.unet.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)
        changed += not torch.equal(value, make_ldm(tiny_ckpts).unet.state_dict()[name])
    assert changed > 0  # training moved the weights that the two runs agree on


def test_latents_of_other_clip_weights_are_refused_naming_both_hashes(tiny_ckpts, latents, tmp_path):
    manifest = json.loads((latents / "manifest.json").read_text())
    model = make_ldm(tiny_ckpts)
    assert model.encoder_hashes() == {"clip": manifest["clip_hash"], "vae": manifest["vae_hash"]}
    other = make_ldm(tiny_ckpts)
    with torch.no_grad():
        next(other.clip.parameters()).add_(1e-3)  # other CLIP weights than the latents were made with
    theirs = state_dict_hash(other.clip.state_dict())
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=f"made with CLIP weights {manifest['clip_hash']}, but the model's CLIP "
                                         f"weights are {theirs}"):
        trainer.fit(other, datamodule=latent_datamodule(latents))


def test_latents_of_another_image_size_or_latent_scale_are_refused(tiny_ckpts, latents, tmp_path):
    model = make_ldm(tiny_ckpts)
    manifest = json.loads((latents / "manifest.json").read_text())
    manifest["path"] = "m.json"
    model.check_latents(manifest)
    with pytest.raises(ValueError, match=r"m.json: latents \[4, 4, 4\] of 32 px images, but model.init_args."
                                         r"image_size=16"):
        model.check_latents({**manifest, "image_size": 32})
    with pytest.raises(ValueError, match="m.json: latent scale"):
        model.check_latents({**manifest, "latent_scale": {**manifest["latent_scale"], "scale_factor": 0.5}})


def test_pooled_text_needs_pooled_embeddings(tiny_ckpts):
    model = make_ldm(tiny_ckpts)
    batch = {"latent": torch.zeros(2, 4, 4, 4), "context": torch.zeros(2, 3, 32), "mask": torch.ones(2, 3).bool(),
             "caption": ["a", "b"]}
    with pytest.raises(ValueError, match="pooled_text: true needs CLIP's pooled text embeddings"):
        model.model_step(batch, train=True)
    with pytest.raises(ValueError, match=r"latent batch of shape \[4, 8, 8\]"):
        model.model_step({**batch, "latent": torch.zeros(2, 4, 8, 8), "pooled": torch.zeros(2, 32)}, train=True)


def test_in_loop_evaluation_reads_the_real_val_images_the_latents_came_from(tiny_ckpts, latents, tmp_path):
    dm = latent_datamodule(latents, val_max_samples=24)
    dm.setup("fit")
    images = real_images(dm)
    assert images.image_size == 16 and images.val_max_samples == 24
    real = next(iter(images.eval_dataloader(24)))
    reference = next(iter(tiny_datamodule(tiny_ckpts["data"], val_max_samples=24).eval_dataloader(24)))
    assert real["key"] == reference["key"]
    torch.testing.assert_close(real["image"], reference["image"])  # the images, not VAE reconstructions
    lat = next(iter(dm.eval_dataloader(24)))
    assert lat["key"] == real["key"]
    # an image-caption data module is its own source of real images
    plain = tiny_datamodule(tiny_ckpts["data"])
    assert real_images(plain) is plain
    # a manifest that does not name a latent shard's source is refused, naming the shard
    dm.manifests["val"] = {**dm.manifests["val"], "shards": []}
    with pytest.raises(ValueError, match="names no source image shard for the latent val shard .*val-000000.tar"):
        real_images(dm)


def test_validation_loss_from_latent_val_shards_equals_the_online_one(tiny_ckpts, latents):
    model = make_ldm(tiny_ckpts)
    lat = next(iter(latent_datamodule(latents).val_dataloader()))
    img = next(iter(tiny_datamodule(tiny_ckpts["data"]).val_dataloader()))
    assert lat["key"] == img["key"]
    losses = [model.model_step(b, train=False, generator=torch.Generator().manual_seed(3)) for b in (lat, img)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)


def test_sample_posterior_trains_on_mean_plus_std_times_noise_from_shards_and_online(tiny_ckpts, tmp_path,
                                                                                       monkeypatch):
    from lit_diffusion.cli import main

    out, data = tmp_path / "std", tiny_ckpts["data"]
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]), "--data",
          f"{data}/val-*.tar", "--out", str(out), "--dtype", "float32", "--std", "--batch-size", "16",
          "--device", "cpu"])
    dm = LatentDataModule(val_urls=str(out / "val-*.tar"), batch_size=8, num_workers=0)
    batch = next(iter(dm.eval_dataloader()))
    assert batch["latent_std"].min() > 0
    model = make_ldm(tiny_ckpts, sample_posterior=True)
    seen = []
    p_losses = model.schedule.p_losses
    monkeypatch.setattr(model.schedule, "p_losses", lambda fn, z, **kw: seen.append(z) or p_losses(fn, z, **kw))
    torch.manual_seed(5)
    model.model_step(batch, train=True)
    torch.manual_seed(5)
    expected = batch["latent"] + batch["latent_std"] * torch.randn_like(batch["latent"])
    torch.testing.assert_close(seen[-1], expected)
    model.model_step(batch, train=False)  # validation: the mean
    torch.testing.assert_close(seen[-1], batch["latent"])
    with pytest.raises(ValueError, match="sample_posterior: true needs the posterior's std .* --std"):
        model.model_step({k: v for k, v in batch.items() if k != "latent_std"}, train=True)
    # online: the VAE's own posterior draw, scaled as the shards' mean and std are
    images = tiny_datamodule(data, batch_size=8).eval_dataloader(8)
    image_batch = next(iter(images))
    torch.manual_seed(6)
    model.model_step(image_batch, train=True)
    torch.manual_seed(6)
    torch.testing.assert_close(seen[-1], model.vae.encode(image_batch["image"], sample=True))
    assert (seen[-1] - model.vae.encode(image_batch["image"])).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.timeout(400, method="thread")  # before the loss was logged at the epoch's end, this case hung
@pytest.mark.parametrize("val_max_samples", [1, None])
def test_two_ranks_validate_as_one_process_when_one_rank_has_no_val_batch(tiny_ckpts, latents, tmp_path,
                                                                          val_max_samples):
    """One val sample on two ranks: rank 1 gets no batch, yet both reach the epoch's end together, and val/loss is
    the one-process figure (rank 0's batch is the single process's batch 0, with the same fixed noise). With every
    val sample, both ranks hold some: their losses are reduced to the one-process mean (each sample's t and noise
    are drawn from its key)."""
    model = make_ldm(tiny_ckpts)

    def validate(**kwargs):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)
        dm = latent_datamodule(latents, val_max_samples=val_max_samples)
        return trainer.validate(model, datamodule=dm, verbose=False)[0]

    single = validate(devices=1)
    ddp = retry_on_gloo_teardown_abort(lambda: validate(devices=2, strategy="ddp_spawn"))
    assert set(ddp) == set(single) == {"val/loss"}
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
