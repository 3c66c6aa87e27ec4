"""A sample's shape comes from the batch or the request: both denoisers at any height and width their downsampling
or patch allows, SDXL's size and crop conditioning, rectified flow's shift per resolution, sampling at any size."""

import math

import pytest
import torch
from conftest import TINY_DIT, TINY_UNET, randomise_unet

from lit_diffusion.diffusion.flow import FlowSchedule, shift_time
from lit_diffusion.models.conditions import Conditioning, size_condition
from lit_diffusion.models.dit import DiT
from lit_diffusion.models.layers import grid_embedding
from lit_diffusion.models.unet import UNet
from lit_diffusion.stages.ldm import LatentDiffusionModule


def _nets(**extra):
    torch.manual_seed(0)
    unet = UNet({**TINY_UNET, "in_channels": 4, "out_channels": 4, "context_dim": 6, **extra})
    dit = DiT({**TINY_DIT, "in_channels": 4, "out_channels": 4, "context_dim": 6, **extra})
    return {"unet": unet.eval(), "dit": dit.eval()}


def _randomise(net):
    """Trained-looking weights: zero-initialised output layers would make every output 0."""
    for module in net.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.05)
    return net


def _cond(b=2, size=None):
    return Conditioning(context=torch.randn(b, 3, 6), mask=torch.ones(b, 3, dtype=torch.bool), size=size)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_non_square_latents_keep_their_shape_and_are_not_a_transposed_square(name):
    net = _randomise(_nets()[name])
    x = torch.randn(2, 4, 4, 12)
    cond = _cond()
    out = net(x, torch.tensor([3, 500]), cond)
    assert out.shape == (2, 4, 4, 12)
    # a wide latent is not a tall one: the transposed input does not give the transposed output
    transposed = net(x.transpose(-1, -2).contiguous(), torch.tensor([3, 500]), cond)
    assert (transposed.transpose(-1, -2) - out).abs().max() > 1e-4


def test_sizes_a_denoiser_cannot_take_are_refused_naming_the_multiple():
    nets = _nets()
    with pytest.raises(ValueError, match=r"UNet input 4x6: height and width must be multiples of 4"):
        UNet({**TINY_UNET, "channel_mult": [1, 2, 2], "context_dim": 6})(torch.randn(1, 4, 4, 6), 1, _cond(1))
    with pytest.raises(ValueError, match=r"DiT input 4x5: height and width must be multiples of patch_size 2"):
        nets["dit"](torch.randn(1, 4, 4, 5), 1, _cond(1))


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_size_conditioning_starts_switched_off_and_then_changes_the_output(name):
    """The size embedding's last layer starts at zero: a network built with size conditioning gives, at
    initialisation, the output of the same weights without it; once trained (here: set) the size matters."""
    plain, sized = _randomise(_nets()[name]), _nets(size_conditioning=True)[name]
    missing = set(sized.state_dict()) - set(plain.state_dict())
    assert missing and all("size_embed" in k for k in missing)
    sized.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 500])
    size = torch.tensor([[64.0, 48.0, 0.0, 8.0, 32.0, 32.0], [16.0, 16.0, 0.0, 0.0, 32.0, 32.0]])
    cond = _cond()
    torch.testing.assert_close(sized(x, t, cond.replace(size=size)), plain(x, t, cond), rtol=0, atol=0)
    last = sized.size_embed.mlp[-1] if name == "unet" else sized.size_embedder.mlp[-1]
    torch.nn.init.normal_(last.weight, std=0.5)
    a = sized(x, t, cond.replace(size=size))
    b = sized(x, t, cond.replace(size=size.flip(0)))
    assert (a[0] - b[0]).abs().max() > 1e-4  # each sample its own size


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_a_size_condition_is_required_exactly_when_the_network_takes_one(name):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 500])
    with pytest.raises(ValueError, match=r"with size_conditioning needs cond.size \[2, 6\] .*got None"):
        _nets(size_conditioning=True)[name](x, t, _cond())
    with pytest.raises(ValueError, match="got a size condition .* built without size_conditioning"):
        _nets()[name](x, t, _cond(size=size_condition(2, 32, 32)))


def test_pixart_base_grid_scaling_spreads_any_grid_over_the_base_grids_positions():
    # PixArt-alpha: position i of an n-long axis is i * base / n, so a 2x larger grid spans the same range
    small, large = grid_embedding(4, 4, 8, scale=(1.0, 1.0)), grid_embedding(8, 8, 8, scale=(0.5, 0.5))
    torch.testing.assert_close(large.reshape(8, 8, 8)[::2, ::2].reshape(16, 8), small)
    dit = DiT({**TINY_DIT, "in_channels": 4, "out_channels": 4, "context_dim": 6, "base_grid": 4})
    assert dit(torch.randn(1, 4, 16, 8), 1, _cond(1)).shape == (1, 4, 16, 8)


def test_flow_shift_grows_with_the_resolution_per_bucket():
    schedule = FlowSchedule(shift=1.5, base_latent=8)
    assert schedule.at_resolution(8, 8).shift == 1.5
    assert schedule.at_resolution(16, 16).shift == pytest.approx(3.0)  # 4x the positions: sqrt(4) = 2
    assert schedule.at_resolution(4, 16).shift == pytest.approx(1.5)  # same area, another aspect ratio: same
    assert FlowSchedule(shift=2.0).at_resolution(64, 64).shift == 2.0  # without base_latent: one shift
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(schedule.at_resolution(16, 16).sampling_times(10), shift_time(t.flip(0), 3.0))
    with pytest.raises(ValueError, match="base_latent must be a positive latent side"):
        FlowSchedule(base_latent=0)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_sampling_at_a_requested_size(tiny_ckpts, backbone):
    torch.manual_seed(0)
    model = LatentDiffusionModule(clip_ckpt=str(tiny_ckpts["clip"]), vae_ckpt=str(tiny_ckpts["vae"]), image_size=16,
                                  **{backbone: TINY_DIT if backbone == "dit" else TINY_UNET}, objective="flow",
                                  sampler="euler", flow={"base_latent": 4}).eval()
    if backbone == "unet":
        randomise_unet(model)
    images = model.sample(["a large red circle"], guidance=3.0, steps=2, seed=0, height=16, width=32)
    assert images.shape == (1, 3, 16, 32)
    z = model.sample(["a large red circle"], guidance=1.0, steps=2, seed=0, height=24, width=8, return_latents=True)
    assert z.shape == (1, model.latent_channels, 6, 2)
    multiple = 4 * (2 if backbone == "unet" else TINY_DIT["patch_size"])
    with pytest.raises(ValueError, match=rf"18x16 px: this model samples heights and widths that are multiples of "
                                         rf"{multiple}"):
        model.sample(["a large red circle"], steps=1, height=18, width=16)
    assert math.isclose(model.schedule_for(8, 8).shift, 2.0)  # 8x8 latents against a 4x4 base
