"""The diffusion stage on clips: a DiT over spatio-temporal patches, or the U-Net with temporal layers or space-time
attention, trains on VideoDataModule batches (each clip through the frozen image VAE frame by frame), samples clips
with guidance and a negative prompt, and a checkpoint samples on its own; what cannot work is refused by name. The
VAE trains on the clips' frames (`as_images`)."""

import json

import pytest
import torch
from conftest import TINY_DIT, TINY_UNET, TINY_VAE, _fit

from lit_diffusion.data.moving_shapes import write_moving_shapes
from lit_diffusion.data.video import VideoDataModule
from lit_diffusion.stages.ldm import LatentDiffusionModule
from lit_diffusion.stages.vae import VAEModule

FRAMES = 4


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_ldm")
    write_moving_shapes(root, train=48, val=8, size=16, frames=FRAMES, shard_size=24)
    return root


def _data(clips, **kw):
    return VideoDataModule(train_urls=str(clips / "train-*.tar"), val_urls=str(clips / "val-*.tar"), image_size=16,
                           num_frames=FRAMES, batch_size=4, num_workers=0, train_batches_per_epoch=3, **kw)


def _video_ldm(tiny_ckpts, **kw):
    torch.manual_seed(0)
    if "unet" in kw:  # the factorised space-time U-Net
        net = {"unet": {**TINY_UNET, "temporal_attention": True, **kw.pop("unet")}}
    else:
        net = {"dit": {**TINY_DIT, "temporal_patch": 2, **kw.pop("dit", {})}}
    return LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]), image_size=16,
                                 frames=FRAMES, objective="flow", sampler="euler", sample_steps=3, warmup_steps=0,
                                 **net, **kw)


def test_the_vae_trains_on_the_frames_of_clips(clips, tmp_path):
    data = _data(clips, as_images=True)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4 * FRAMES, 3, 16, 16) and len(batch["caption"]) == 4 * FRAMES
    assert batch["key"][:FRAMES] == [batch["key"][0]] * FRAMES
    vae = VAEModule(**TINY_VAE)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    _fit(vae, data, 2, tmp_path)
    assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("net", [{"dit": {"attention": "full"}}, {"dit": {"attention": "factorised"}}, {"unet": {}},
                                 {"unet": {"temporal_attention": False, "space_time_attention": True}}],
                         ids=["dit-full", "dit-factorised", "unet-temporal", "unet-space-time"])
def test_a_video_model_trains_on_clips_and_samples_clips(clips, tiny_ckpts, tmp_path, net):
    module = _video_ldm(tiny_ckpts, **net)
    trainer = _fit(module, _data(clips), 3, tmp_path)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val/loss"])
    # a clip's latents are its frames' latents, through the image VAE one frame at a time
    batch = next(iter(_data(clips).val_dataloader()))
    z, _ = module._encode_batch(batch)
    assert z.shape == (4, FRAMES, module.latent_channels, module.latent_size, module.latent_size)
    assert torch.allclose(z[1, 2], module.encode_images(batch["video"][1, 2:3])[0], atol=1e-5)

    clip = module.sample(["a small red circle moving left"], guidance=3.0, negative_prompts="a blue square",
                         seed=[7])
    assert clip.shape == (1, FRAMES, 3, 16, 16) and 0 <= clip.min() and clip.max() <= 1
    latents = module.sample(["a small red circle moving left"], guidance=3.0, negative_prompts="a blue square",
                            seed=[7], return_latents=True)
    decoded = (module.vae.decode(latents[0]).float() + 1) / 2
    assert torch.allclose(clip[0], decoded.clamp(0, 1), atol=1e-5)

    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    loaded = LatentDiffusionModule.from_checkpoint(tmp_path / "ldm.ckpt")
    assert loaded.hparams.frames == FRAMES
    again = loaded.sample(["a small red circle moving left"], guidance=3.0, negative_prompts="a blue square",
                          seed=[7])
    assert torch.allclose(again, clip, atol=1e-5)


def test_what_a_video_model_cannot_do_is_refused(clips, tiny_ckpts, tmp_path):
    with pytest.raises(ValueError, match=r"frames = 4: a video model is the DiT .* or the U-Net with temporal layers "
                                         r"\(model.init_args.unet.temporal_attention or space_time_attention: true\)"):
        LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]), image_size=16,
                              frames=4, unet=TINY_UNET)
    image_model = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]),
                                        image_size=16, dit=TINY_DIT, objective="flow", sampler="euler")
    with pytest.raises(ValueError, match="frames=4: this is an image model"):
        image_model.sample(["a red circle"], frames=4, steps=1)
    batch = next(iter(_data(clips).val_dataloader()))
    with pytest.raises(ValueError, match="a batch of clips .'video'., but model.init_args.frames is 1"):
        image_model.model_step(batch, train=False)
    video_model = _video_ldm(tiny_ckpts)
    with pytest.raises(ValueError, match="3 frames: the frame count must be a multiple of temporal_patch 2"):
        video_model.sample(["a red circle"], frames=3, steps=1)
    short = {**batch, "video": batch["video"][:, :2]}  # the data module's num_frames is not the model's
    with pytest.raises(ValueError, match=f"clips of 2 frames, but model.init_args.frames is {FRAMES}: the data "
                                         "module's num_frames"):
        video_model.model_step(short, train=False)
    # one frame is an image of joint training only: a data module of one-frame clips without images: true is
    # refused when training starts, not trained on as single frames
    one_frame = _video_ldm(tiny_ckpts, dit={"temporal_patch": 1})
    with pytest.raises(ValueError, match=f"clips of 1 frames, but model.init_args.frames is {FRAMES}"):
        _fit(one_frame, VideoDataModule(train_urls=str(clips / "train-*.tar"), image_size=16, num_frames=1,
                                        batch_size=4, num_workers=0, train_batches_per_epoch=3), 1, tmp_path)


def test_in_loop_evaluation_of_a_video_model_on_an_image_clip_is_refused_before_training(clips, tiny_ckpts, tmp_path):
    """The video figures embed clips with the frozen CLIP; with an image CLIP they cannot be computed, and the run is
    refused at its start (it used to fail at the first evaluation, every_n_steps into the run)."""
    import lightning as L

    from lit_diffusion.callbacks.evaluation import DiffusionEvaluation

    module = _video_ldm(tiny_ckpts)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), callbacks=[DiffusionEvaluation(every_n_steps=1000)])
    with pytest.raises(ValueError, match=r"a 4-frame video model needs a CLIP that reads 4-frame clips .*, but its "
                                         r"frozen CLIP \(clip_ckpt\) has an image tower \(vision.frames 1\)"):
        trainer.fit(module, datamodule=_data(clips))
    assert trainer.global_step == 0


def test_the_models_frame_stride_is_the_datas_and_evaluation_reads_real_clips_at_it(clips, tiny_ckpts, tmp_path,
                                                                                      monkeypatch):
    """A model trained on clips read at stride 2 generates clips twice as fast as at stride 1: the data module's
    stride must be the model's, and offline evaluation reads the real clips at the model's (it read them at 1)."""
    import lightning as L

    import lit_diffusion.data.video as video
    from lit_diffusion.evaluation.evaluator import EvalConfig, evaluate_checkpoint

    module = _video_ldm(tiny_ckpts)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="clips are read at frame_stride 2, but model.init_args.frame_stride is 1"):
        trainer.fit(module, datamodule=_data(clips, frame_stride=2, short="loop"))
    module = _video_ldm(tiny_ckpts, frame_stride=2)
    trainer = _fit(module, _data(clips, frame_stride=2, short="loop"), 1, tmp_path)
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")

    built = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        built.update(kwargs)
        raise Stop

    monkeypatch.setattr(video, "VideoDataModule", capture)
    with pytest.raises(Stop):
        evaluate_checkpoint(tmp_path / "ldm.ckpt", str(clips / "val-*.tar"), EvalConfig(guidance=[1.0]), tmp_path)
    assert built["frame_stride"] == 2 and built["num_frames"] == FRAMES


def test_a_video_model_draws_an_animated_grid(clips, tiny_ckpts, tmp_path):
    """SampleGrid on a video model: a PNG whose cells are the clips' frames side by side and an animated GIF with one
    labelled grid per frame."""
    from PIL import Image

    from lit_diffusion.callbacks.sample_grid import SampleGrid
    from lit_diffusion.evaluation.plots import frame_strip

    module = _video_ldm(tiny_ckpts)
    grid = SampleGrid(prompts=["a small red circle moving left"], guidance=[1.0, 3.0], negative_prompt="a circle",
                      steps=2)
    trainer = _fit(module, _data(clips), 1, tmp_path)
    out = grid.draw(trainer, module)
    assert out.suffix == ".png" and out.is_file()
    gif = Image.open(out.with_suffix(".gif"))
    assert gif.n_frames == FRAMES
    import av

    with av.open(str(out.with_suffix(".mp4"))) as mp4:
        assert sum(1 for _ in mp4.decode(video=0)) == FRAMES
    rows, _ = grid.grid(module)
    assert [tuple(r.shape) for r in rows] == [(2, FRAMES, 3, 16, 16)] * 2  # the prompt, then against the negative

    clip = torch.rand(3, 3, 4, 5)
    strip = frame_strip(clip, gap=1)
    assert strip.shape == (3, 4, 3 * 5 + 2)
    assert torch.equal(strip[:, :, 6:11], clip[1]) and torch.equal(strip[:, :, 5], torch.ones(3, 4))


def test_sample_cli_writes_clips_of_the_asked_length(clips, tiny_ckpts, tmp_path, capsys):
    """`lit-diffusion sample --frames N` on a video checkpoint: the frame-strip PNG and a GIF of N frames; on an image
    checkpoint --frames (without --interpolate) is refused by name."""
    from PIL import Image

    from lit_diffusion.cli import main

    module = _video_ldm(tiny_ckpts)
    trainer = _fit(module, _data(clips), 1, tmp_path)
    trainer.save_checkpoint(tmp_path / "video.ckpt")
    out = tmp_path / "clips.png"
    main(["sample", "--ckpt", str(tmp_path / "video.ckpt"), "--prompt", "a red circle moving up", "--num", "2",
          "--frames", "6", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert out.is_file() and Image.open(out.with_suffix(".gif")).n_frames == 6
    # --frames 1 on a model that takes one-frame clips (temporal_patch 1: joint image+video training) is an image
    # grid; it used to fail in the frame strip
    one = _video_ldm(tiny_ckpts, dit={"temporal_patch": 1})
    _fit(one, _data(clips), 1, tmp_path / "one").save_checkpoint(tmp_path / "one.ckpt")
    still = tmp_path / "still.png"
    main(["sample", "--ckpt", str(tmp_path / "one.ckpt"), "--prompt", "a red circle", "--num", "2", "--frames", "1",
          "--steps", "2", "--out", str(still), "--device", "cpu"])
    assert still.is_file() and not still.with_suffix(".gif").exists()
    assert one.sample(["a red circle"], frames=1, steps=2, seed=[0]).shape == (1, 3, 16, 16)  # an image

    image_model = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]),
                                        image_size=16, dit=TINY_DIT, objective="flow", sampler="euler")
    trainer = _fit(image_model, _image_data(tiny_ckpts), 1, tmp_path / "img")
    trainer.save_checkpoint(tmp_path / "image.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--ckpt", str(tmp_path / "image.ckpt"), "--prompt", "a red circle", "--frames", "6",
              "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--frames 6:" in err and "is an image model (model.init_args.frames 1)" in err


def _image_data(tiny_ckpts):
    from conftest import tiny_datamodule

    return tiny_datamodule(tiny_ckpts["data"])


def test_joint_training_on_clips_and_images(clips, tiny_ckpts, tmp_path):
    """Image shards listed beside the video shards (`images: true`): every batch holds clips or one-frame videos,
    never both; a resumed loader continues exactly; a video DiT with temporal_patch 1 trains on the mix."""
    shapes = tiny_ckpts["data"]
    urls = [str(clips / "train-*.tar"), str(shapes / "train-*.tar")]

    def data():
        return VideoDataModule(train_urls=urls, image_size=16, num_frames=FRAMES, images=True, batch_size=4,
                               num_workers=0, train_batches_per_epoch=8, shuffle_buffer=8, seed=1)

    loader = data().train_dataloader()
    it = iter(loader)
    head = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = list(it)
    frames = {b["video"].shape[1] for b in head + rest}
    assert frames == {1, FRAMES}
    still = next(b for b in head + rest if b["video"].shape[1] == 1)
    assert all(" moving " not in c for c in still["caption"])  # the shapes data's captions
    resumed = data().train_dataloader()
    resumed.load_state_dict(state)
    assert [b["key"] for b in resumed] == [b["key"] for b in rest]

    module = _video_ldm(tiny_ckpts, dit={"temporal_patch": 1})
    trainer = _fit(module, data(), 4, tmp_path)
    assert trainer.global_step == 4
    with pytest.raises(ValueError, match="1 frames: the frame count must be a multiple of temporal_patch 2"):
        _video_ldm(tiny_ckpts).model_step(still, train=False)


def test_training_from_clip_latent_shards_equals_encoding_online(clips, tiny_ckpts, tmp_path, monkeypatch):
    """`data encode --frames 4` writes each clip's latents [T, C, h, w] (the VAE frame by frame, the manifest says
    so); the video DiT trained from them sees the same clips in the same batches and ends with the weights of
    encoding online; the in-loop evaluation reads the real clips the latents came from."""
    import lightning as L

    from lit_diffusion.callbacks.evaluation import real_images
    from lit_diffusion.cli import main
    from lit_diffusion.data.datamodule import LatentDataModule

    out = tmp_path / "latents"
    main(["data", "encode", "--clip", str(tiny_ckpts["clip"]), "--vae", str(tiny_ckpts["vae"]), "--train",
          str(clips / "train-*.tar"), "--val", str(clips / "val-*.tar"), "--out", str(out), "--frames", str(FRAMES),
          "--dtype", "float32", "--batch-size", "4", "--device", "cpu", "--image-size", "16"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["frames"] == FRAMES and manifest["samples"] == 56
    assert manifest["shapes"]["latent"][:2] == [FRAMES, 4]

    def run(data, root):
        L.seed_everything(0)
        module, keys = _video_ldm(tiny_ckpts), []
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, default_root_dir=str(root),
                            callbacks=[L.pytorch.callbacks.LambdaCallback(
                                on_train_batch_end=lambda t, m, o, b, i: keys.append(list(b["key"])))])
        trainer.fit(module, datamodule=data)
        return module, keys

    online, online_keys = run(_data(clips), tmp_path / "online")
    latents = LatentDataModule(train_urls=str(out / "train" / "*.tar"), val_urls=str(out / "val" / "*.tar"),
                               batch_size=4, num_workers=0, train_batches_per_epoch=3)
    monkeypatch.setattr(LatentDiffusionModule, "encode_images", lambda *a, **k: pytest.fail("the VAE encoder ran"))
    from_shards, keys = run(latents, tmp_path / "shards")
    assert keys == online_keys and len(keys) == 3
    for name, value in online.dit.state_dict().items():
        torch.testing.assert_close(from_shards.dit.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    real = real_images(latents)
    assert isinstance(real, VideoDataModule) and real.num_frames == FRAMES
    assert next(iter(real.eval_dataloader(4)))["video"].shape == (4, FRAMES, 3, 16, 16)
