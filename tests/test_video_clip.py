"""Video CLIP: tubelet patches against an explicit reference, the image tower unchanged at frames=1, motion that a
mean over frames cannot see, training on moving-shapes shards, checkpoints."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_diffusion.callbacks.clip_viz import CLIPVisualization, still
from lit_diffusion.data.moving_shapes import clip_attrs, render_clip, write_moving_shapes
from lit_diffusion.data.video import VideoDataModule
from lit_diffusion.models.clip import VisionConfig, VisionTransformer, inflate_image_weights
from lit_diffusion.stages.clip import CLIPModule

TINY_VISION = dict(image_size=16, patch_size=4, width=32, layers=2, heads=2)


def _clip(seed: int = 0, size: int = 16, frames: int = 4) -> torch.Tensor:
    """A rendered moving-shapes clip [T, 3, S, S] in [-1, 1]."""
    attrs = clip_attrs(seed, image_size=size, frames=frames)
    return torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1).float() / 127.5 - 1
                        for f in render_clip(attrs)])


# ---- the tower ----
def _reference_forward(vt: VisionTransformer, clips: torch.Tensor) -> torch.Tensor:
    """The video tower spelled out: tubelets cut by explicit reshapes, positions summed by a loop."""
    cfg = vt.cfg
    b, t, c, s, _ = clips.shape
    k, p = cfg.tubelet, cfg.patch_size
    n, g = t // k, s // p
    # [B, T, 3, S, S] -> [B, n, k, 3, g, p, g, p] -> tokens [B, n, g, g, 3, k, p, p] (the Conv3d weight's order)
    cut = clips.reshape(b, n, k, c, g, p, g, p).permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(b, n * g * g, c * k * p * p)
    tokens = cut @ vt.conv1.weight.reshape(cfg.width, -1).T  # [B, N, W]
    pos = torch.empty(n * g * g, cfg.width)
    for i in range(n):
        for j in range(g * g):
            pos[i * g * g + j] = vt.temporal_embedding[i] + vt.positional_embedding[1 + j]
    x = torch.cat([vt.class_embedding.expand(b, 1, -1) + vt.positional_embedding[0], tokens + pos], dim=1)
    x = vt.transformer(vt.ln_pre(x))
    return vt.ln_post(x[:, 0]) @ vt.proj


def test_tubelet_patches_and_positions_match_an_explicit_reference():
    torch.manual_seed(0)
    vt = VisionTransformer(VisionConfig(**TINY_VISION, frames=4, tubelet=2), embed_dim=8).double().eval()
    assert tuple(vt.conv1.weight.shape) == (32, 3, 2, 4, 4) and tuple(vt.temporal_embedding.shape) == (2, 32)
    clips = torch.randn(3, 4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(vt(clips), _reference_forward(vt, clips))
        # the patchify alone, against torch's unfold of each frame pair
        ours = vt.conv1(vt._pixels(clips)).flatten(2).transpose(1, 2)  # [B, 2 * 16, W]
        pairs = clips.reshape(3, 2, 2 * 3, 16, 16)  # two frames' channels stacked: [B, n, k * 3, S, S]
        unfolded = torch.stack([F.unfold(pairs[:, i], 4, stride=4) for i in range(2)], 1)  # [B, n, k*3*p*p, g*g]
        weight = vt.conv1.weight.transpose(1, 2).reshape(32, -1)  # [W, k * 3 * p * p], frame-major like `pairs`
        torch.testing.assert_close(ours, (weight @ unfolded).transpose(2, 3).flatten(1, 2))


# the image tower as it was before video: the reference every frames=1 model must equal exactly
def _image_forward_before_video(vt: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = vt.conv1(images).flatten(2).transpose(1, 2)
    cls = vt.class_embedding.expand(x.shape[0], 1, -1)
    x = vt.ln_pre(torch.cat([cls, x], dim=1) + vt.positional_embedding)
    return vt.ln_post(vt.transformer(x)[:, 0]) @ vt.proj


def test_one_frame_is_the_image_tower_unchanged():
    torch.manual_seed(0)
    default = VisionTransformer(VisionConfig(**TINY_VISION), embed_dim=8).eval()
    torch.manual_seed(0)
    explicit = VisionTransformer(VisionConfig(**TINY_VISION, frames=1, tubelet=1), embed_dim=8).eval()
    shapes = {k: tuple(v.shape) for k, v in default.state_dict().items() if not k.startswith("transformer.")}
    assert shapes == {"conv1.weight": (32, 3, 4, 4), "class_embedding": (32,), "positional_embedding": (17, 32),
                      "ln_pre.weight": (32,), "ln_pre.bias": (32,), "ln_post.weight": (32,), "ln_post.bias": (32,),
                      "proj": (32, 8)}
    assert list(explicit.state_dict()) == list(default.state_dict())
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = _image_forward_before_video(default, images)
        assert torch.equal(default(images), expected) and torch.equal(explicit(images), expected)
        assert torch.equal(default(images[:, None]), expected)  # a one-frame clip is an image
    with pytest.raises(ValueError, match="got 4-frame clips, but an image tower"):
        default(torch.zeros(1, 4, 3, 16, 16))


def test_config_and_input_shapes_are_checked():
    with pytest.raises(ValueError, match="vision.frames 8 is not a multiple of vision.tubelet 3"):
        VisionConfig(frames=8, tubelet=3)
    with pytest.raises(ValueError, match="vision.frames 1 is not a multiple of vision.tubelet 2"):
        VisionConfig(tubelet=2)
    vt = VisionTransformer(VisionConfig(**TINY_VISION, frames=4, tubelet=2), embed_dim=8).eval()
    with pytest.raises(ValueError, match="got 2-frame clips, but it reads 4-frame clips"):
        vt(torch.zeros(1, 2, 3, 16, 16))
    with torch.no_grad():  # an image is a still clip
        image = torch.rand(2, 3, 16, 16) * 2 - 1
        still = image[:, None].repeat(1, 4, 1, 1, 1)
        assert torch.equal(vt(image), vt(still)) and torch.equal(vt(image[:, None]), vt(still))


def test_video_tower_tells_a_clip_from_its_time_reversal_a_mean_over_frames_does_not():
    torch.manual_seed(0)
    clips = torch.stack([_clip(seed) for seed in range(3)])  # [3, 4, 3, 16, 16]
    reversed_clips = clips.flip(1)
    video = VisionTransformer(VisionConfig(**TINY_VISION, frames=4, tubelet=2), embed_dim=8).eval()
    image = VisionTransformer(VisionConfig(**TINY_VISION), embed_dim=8).eval()

    def mean_over_frames(x):  # the image tower on each frame, embeddings averaged: order-blind
        return image(x.flatten(0, 1)).reshape(x.shape[0], x.shape[1], -1).mean(1)

    with torch.no_grad():
        assert not torch.allclose(F.normalize(video(clips), dim=-1), F.normalize(video(reversed_clips), dim=-1),
                                  atol=1e-3)
        torch.testing.assert_close(mean_over_frames(clips), mean_over_frames(reversed_clips))


def test_image_weights_inflate_into_a_video_tower():
    torch.manual_seed(0)
    image = VisionTransformer(VisionConfig(**TINY_VISION), embed_dim=8).eval()
    cfg = VisionConfig(**TINY_VISION, frames=4, tubelet=2)
    video = VisionTransformer(cfg, embed_dim=8).eval()
    video.load_state_dict(inflate_image_weights(image.state_dict(), cfg))  # strict: every key, every shape
    frame = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():  # a still clip's tubelets embed as the image's patches, at every time step
        tubelets = video.conv1(video._pixels(frame))  # [B, W, 2, 4, 4]
        for i in range(2):
            torch.testing.assert_close(tubelets[:, :, i], image.conv1(frame))
    assert torch.equal(video.temporal_embedding, torch.zeros(2, 32))
    with pytest.raises(ValueError, match="not an image tower's"):
        inflate_image_weights(video.state_dict(), cfg)


# ---- the stage ----
STAGE = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, frames=4, tubelet=2),
             text=dict(width=32, layers=1, heads=2), embed_dim=16, warmup_steps=2,
             hard_negatives={"left": "right", "up": "down"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_clip")
    info = write_moving_shapes(root / "data", train=64, val=32, size=32, frames=4, shard_size=32, seed=0)
    L.seed_everything(0)
    module = CLIPModule(tokenizer_path=str(root / "data" / "tokenizer.json"), **STAGE)
    data = VideoDataModule(train_urls=info["urls"]["train"], val_urls=info["urls"]["val"], image_size=32,
                           num_frames=4, batch_size=16, num_workers=0, train_batches_per_epoch=3, shuffle_buffer=32)
    viz = CLIPVisualization(num_images=4, gallery_size=16, num_queries=2, top_k=3, out_dir=str(root / "media"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, num_sanity_val_steps=0, default_root_dir=root,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[viz])
    trainer.fit(module, data)
    ckpt = root / "video_clip.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {"module": module.eval(), "metrics": metrics, "viz": viz, "ckpt": ckpt}


def test_clip_stage_trains_on_video_batches_and_scores_the_motion_swap(trained):
    m = trained["metrics"]
    assert {"train/loss", "val/loss", "val/i2t_r1", "val/t2i_r1", "val/negative_acc"} <= set(m), sorted(m)
    assert 0.0 <= m["val/negative_acc"] <= 1.0 and np.isfinite(m["train/loss"])
    names = {p.name.split("_step")[0] for p in trained["viz"].written}
    assert names == {"clip_similarity", "clip_retrieval"}
    # the figures draw a clip as its first, middle and last frames, 2 grey columns apart; an image as it is
    clip = _clip(size=32)
    strip = still(clip)
    assert strip.shape == (3, 32, 3 * 32 + 2 * 2) and torch.equal(strip[..., -32:], clip[-1])
    assert torch.equal(still(clip[0]), clip[0])


def test_video_checkpoint_loads_back_with_the_same_embeddings(trained):
    raw = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert raw["lit_diffusion"]["config"]["vision"]["frames"] == 4
    loaded = CLIPModule.from_checkpoint(trained["ckpt"])
    module = trained["module"]
    clips = torch.stack([_clip(seed, size=32) for seed in range(2)])  # [2, 4, 3, 32, 32]
    with torch.no_grad():
        expected = module.encode_image(clips)
        torch.testing.assert_close(loaded.encode_image(clips), expected, rtol=0, atol=0)
        # clips of another size are resized frame by frame, as images are
        bigger = F.interpolate(clips.flatten(0, 1), size=48, mode="nearest").reshape(2, 4, 3, 48, 48)
        assert loaded.encode_image(bigger).shape == (2, 16)
        assert loaded.encode_image(clips[:, 0]).shape == (2, 16)  # an image: a still clip


def test_an_image_clip_starts_a_video_clip_through_init_from(tiny_ckpts):
    """`init_from` an image CLIP with `vision: {frames: 4, tubelet: 2}`: the tower is inflated (I3D), so a still clip's
    tubelets embed as the image's patches at every time step and its clip embedding starts next to the image's (not
    equal: the class token attends over two copies of each patch); the text tower comes over unchanged."""
    from lit_diffusion.stages.clip import CLIPModule

    image_clip = CLIPModule.from_checkpoint(tiny_ckpts["clip"]).eval()
    video_clip = CLIPModule(init_from=str(tiny_ckpts["clip"]), vision={"frames": 4, "tubelet": 2}).eval()
    assert video_clip.frames == 4 and video_clip.model.visual.conv1.weight.dim() == 5
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    clips = images[:, None].expand(-1, 4, -1, -1, -1)
    with torch.no_grad():
        tubelets = video_clip.model.visual.conv1(video_clip.model.visual._pixels(clips))  # [B, W, 2, h, w]
        for i in range(2):
            torch.testing.assert_close(tubelets[:, :, i], image_clip.model.visual.conv1(images))
        cosine = (video_clip.encode_image(clips) * image_clip.encode_image(images)).sum(-1)
        assert (cosine > 0.95).all(), cosine
        tokens = image_clip.tokenize(["a red circle moving left"])
        torch.testing.assert_close(video_clip.encode_text(tokens)[1], image_clip.encode_text(tokens)[1])
