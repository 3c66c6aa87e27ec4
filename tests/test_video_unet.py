"""The factorised space-time U-Net (`UNetConfig.temporal_attention`, Video Diffusion Models / Video LDM): at
initialisation a clip is its frames through the image U-Net on the same weights, a one-frame clip and an image get
the image U-Net's output, the temporal layers mix frames and tell them apart by their positions, a clip of a batch
is what it is alone, the samplers run unchanged on it, and a U-Net without temporal layers refuses clips by name."""

import pytest
import torch

from lit_diffusion.diffusion.flow import FlowSchedule, heun_sample
from lit_diffusion.diffusion.guidance import cfg_model_fn
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.models.layers import SpatialTransformer, TemporalAttention
from lit_diffusion.models.unet import UNet

CFG = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
           attention_resolutions=(1, 2), head_dim=8, norm_groups=4, context_dim=12, pos_embed=True)


def _randomise(net, std=0.2, seed=1):
    """Random values everywhere: zero-initialised output layers would make every residual branch, and the U-Net's
    output, zero, hiding what is tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn_like(param) * std)
    return net


def _temporal_layers(net):
    return [m for m in net.modules() if isinstance(m, TemporalAttention)]


def _cond(b=2):
    g = torch.Generator().manual_seed(3)
    return Conditioning(context=torch.randn(b, 5, 12, generator=g),
                        mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2])[:b])


def test_an_image_unets_weights_start_a_video_unet_that_runs_it_frame_by_frame():
    """Only the temporal layers are new (the image U-Net's keys keep their names), and with their output at zero,
    as initialised, each frame of a clip gets the image U-Net's output for that frame; a one-frame clip and an image
    get it too. The network has a temporal layer in every block with a ResBlock."""
    image = _randomise(UNet(CFG))
    video = UNet({**CFG, "temporal_attention": True})
    missing, unexpected = video.load_state_dict(image.state_dict(), strict=False)
    assert not unexpected and missing and all(".proj_in." in k or ".proj_out." in k or ".norm." in k or ".attn." in k
                                              for k in missing)
    layers = _temporal_layers(video)
    assert {k for k in missing} == {f"{name}.{p}" for name, m in video.named_modules()
                                     if isinstance(m, TemporalAttention) for p, _ in m.named_parameters()}
    assert len(layers) == 2 + 1 + 4  # down: one per level; middle; up: num_res_blocks + 1 per level
    x, t, cond = torch.randn(2, 5, 4, 8, 8), torch.tensor([0.3, 0.8]), _cond()
    with torch.no_grad():
        frames = torch.stack([image(x[:, i], t, cond) for i in range(5)], dim=1)
        assert frames.abs().mean() > 0.1
        assert torch.allclose(video(x, t, cond), frames, atol=1e-5)
        assert video(x[:, :1], t, cond).shape == (2, 1, 4, 8, 8)
        assert torch.equal(video(x[:, :1], t, cond)[:, 0], image(x[:, 0], t, cond))
        assert torch.equal(video(x[:, 0], t, cond), image(x[:, 0], t, cond))  # an image stays an image


MODES = {"temporal": {"temporal_attention": True}, "space_time": {"space_time_attention": True}}


def test_space_time_attention_adds_no_weights_and_one_frame_is_the_image_unet():
    image = _randomise(UNet(CFG))
    video = UNet({**CFG, **MODES["space_time"]})
    video.load_state_dict(image.state_dict())  # strict: the same weights
    x, t, cond = torch.randn(2, 3, 4, 8, 8), torch.tensor([0.3, 0.8]), _cond()
    with torch.no_grad():
        assert torch.equal(video(x[:, :1], t, cond)[:, 0], image(x[:, 0], t, cond))
        assert torch.equal(video(x[:, 0], t, cond), image(x[:, 0], t, cond))
        # the frames attend to each other from the start: a clip is not its frames one by one
        assert (video(x, t, cond)[:, 0] - image(x[:, 0], t, cond)).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_frames_see_each_other_and_are_told_apart_by_their_positions(mode):
    """With the temporal layers trained (random here), changing the last frame changes the first frame's output;
    reversing the frames does not just reverse the output, because of the frames' sin-cos positions: with the
    positions taken out, attention over the frames is blind to their order and it does."""
    net = _randomise(UNet({**CFG, **MODES[mode]}), std=0.3)
    x, t, cond = torch.randn(2, 4, 4, 8, 8), torch.tensor([0.3, 0.8]), _cond()
    y = x.clone()
    y[:, -1] += 3 * torch.randn(y[:, -1].shape, generator=torch.Generator().manual_seed(9))  # another last frame
    with torch.no_grad():
        assert (net(x, t, cond)[:, 0] - net(y, t, cond)[:, 0]).abs().max() > 1e-3
        assert (net(x.flip(1), t, cond) - net(x, t, cond).flip(1)).abs().max() > 1e-3
        import lit_diffusion.models.layers as layers

        keep = layers.temporal_embedding
        layers.temporal_embedding = lambda frames, dim, device=None: torch.zeros(frames, dim, device=device)
        try:
            assert torch.allclose(net(x.flip(1), t, cond), net(x, t, cond).flip(1), atol=1e-5)
        finally:
            layers.temporal_embedding = keep
        if mode == "temporal":
            for layer in _temporal_layers(net):  # temporal outputs at zero: the frames are apart again
                torch.nn.init.zeros_(layer.proj_out.weight)
                torch.nn.init.zeros_(layer.proj_out.bias)
        else:
            for layer in net.modules():
                if isinstance(layer, SpatialTransformer):
                    layer.space_time = False
        assert torch.allclose(net(x, t, cond)[:, 0], net(y, t, cond)[:, 0], atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_clip_is_sampled_in_a_batch_as_alone_with_guidance(mode):
    """Heun with classifier-free guidance on [B, T, C, H, W]: the shape comes back, each clip of a batch is what it is
    sampled alone from the same noise, and gradient checkpointing gives the same gradients on clips."""
    net = _randomise(UNet({**CFG, **MODES[mode]}), std=0.05).eval()
    cond = _cond()
    uncond = Conditioning(context=torch.zeros(1, 1, 12), mask=torch.ones(1, 1, dtype=torch.bool))
    x_T = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        both = heun_sample(cfg_model_fn(net, cond, uncond, scale=3.0), FlowSchedule(), x_T.shape, steps=3, x_T=x_T)
        one = Conditioning(context=cond.context[1:], mask=cond.mask[1:])
        alone = heun_sample(cfg_model_fn(net, one, uncond, scale=3.0), FlowSchedule(), x_T[1:].shape, steps=3,
                            x_T=x_T[1:])
    assert both.shape == x_T.shape and torch.isfinite(both).all()
    assert (both[1:] - alone).abs().max() <= 1e-5 * both.abs().max()

    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = _randomise(UNet({**CFG, **MODES[mode], "use_checkpoint": use_checkpoint}), std=0.05)
        model(x_T, torch.tensor([0.2, 0.7]), cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clips_without_temporal_layers_and_other_ranks_are_refused():
    with pytest.raises(ValueError, match=r"UNet got clips \[1, 2, 4, 8, 8\] .* has no temporal layers "
                                         r"\(UNetConfig.temporal_attention or "
                                         r"space_time_attention: true\)"):
        UNet(CFG)(torch.randn(1, 2, 4, 8, 8), torch.tensor([0.5]), _cond(1))
    with pytest.raises(ValueError, match="space_time_attention needs spatial transformers"):
        UNet({**CFG, "space_time_attention": True, "attention_resolutions": (), "mid_attention": False})
    with pytest.raises(ValueError, match=r"UNet takes \[B, C, H, W\] images or \[B, T, C, H, W\] clips, "
                                         r"got \[4, 8, 8\]"):
        UNet(CFG)(torch.randn(4, 8, 8), torch.tensor([0.5]), _cond(1))


def test_the_stage_feeds_a_video_unet_channels_last_clips(tiny_ckpts):
    """`channels_last: true` on a video U-Net: each frame of the clip goes in channels-last, and the prediction
    equals the default layout's (a 5-D tensor has no channels-last format of its own)."""
    from conftest import TINY_UNET

    from lit_diffusion.stages.ldm import LatentDiffusionModule

    outs, weights = [], None
    for channels_last in (False, True):
        module = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]),
                                       image_size=16, frames=3, unet={**TINY_UNET, "space_time_attention": True},
                                       objective="flow", sampler="euler", channels_last=channels_last).eval()
        if weights is None:  # random values drawn once (randn_like fills a channels-last weight in its own order)
            weights = _randomise(module.network, std=0.05).state_dict()
        module.network.load_state_dict(weights)
        assert module.network.input_blocks[0][0].weight.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        cond = module.encode_prompts(["a red circle moving left", "a blue square moving up"])
        x = torch.randn(2, 3, module.latent_channels, module.latent_size, module.latent_size,
                        generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            outs.append(module.denoiser(x, torch.tensor([0.3, 0.7]), cond))
    assert outs[0].shape == x.shape
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
