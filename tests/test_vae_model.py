import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lit_diffusion.models.discriminator import PatchGAN, hinge_d_loss, hinge_g_loss
from lit_diffusion.models.vae import AttnBlock, AutoencoderKL, DiagonalGaussian, VAEConfig


def tiny(**overrides) -> VAEConfig:
    fields = dict(base_channels=8, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=4, z_channels=4)
    return VAEConfig(**{**fields, **overrides})


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 3) * 2  # [B, 2z, h, w]
    post = DiagonalGaussian(moments)
    ref = kl_divergence(Normal(post.mean, post.std), Normal(torch.zeros(()), torch.ones(())))
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-6)


def test_logvar_is_clamped_and_sample_uses_std():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(moments, logvar_min=-30.0, logvar_max=20.0)
    assert post.logvar.max().item() == 20.0
    assert math.isfinite(post.kl().sum().item())
    zero_var = DiagonalGaussian(torch.cat([torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), -1e4)], dim=1))
    torch.testing.assert_close(zero_var.sample(), torch.ones(1, 2, 2, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ch_mult,factor", [([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
@pytest.mark.parametrize("attention", [True, False])
def test_shapes_for_f4_and_f8(ch_mult, factor, attention):
    cfg = tiny(ch_mult=ch_mult, mid_attention=attention, z_channels=3)
    vae = AutoencoderKL(cfg)
    assert vae.downsample_factor == cfg.downsample_factor == factor
    x = torch.randn(2, 3, 32, 32)
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 3, 32 // factor, 32 // factor)
    rec, _ = vae(x)
    assert rec.shape == x.shape


def test_image_size_not_divisible_is_refused():
    with pytest.raises(ValueError, match="divisible by the VAE downsample factor 4"):
        AutoencoderKL(tiny()).encode(torch.randn(1, 3, 30, 30))


def test_bad_norm_groups_names_the_width():
    with pytest.raises(ValueError, match="width 12 .*norm_groups=8"):
        VAEConfig(base_channels=12, ch_mult=[1, 2], norm_groups=8)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    block = AttnBlock(8, groups=4)
    x = torch.randn(2, 8, 3, 3)
    q, k, v = block.qkv(block.norm(x)).reshape(2, 3, 8, 9).unbind(1)  # each [B, C, HW]
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # [B, HW, HW]
    ref = x + block.proj((v @ weights.transpose(1, 2)).reshape(2, 8, 3, 3))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_patchgan_logit_grid_and_hinge_losses():
    disc = PatchGAN(channels=8, n_layers=2, norm_groups=4)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 2] (mean 1)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1 / 3))
