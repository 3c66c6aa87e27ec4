import math

import pytest
import torch

from lit_diffusion.diffusion.schedule import (
    NoiseSchedule,
    cosine_betas,
    linear_betas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)


def test_linear_betas_endpoints_and_rescaling():
    b = linear_betas(1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b100 = linear_betas(100)  # same total noise budget at 10x fewer steps
    assert b100[0].item() == pytest.approx(1e-3) and b100[-1].item() == pytest.approx(0.2)
    s = scaled_linear_betas(1000)
    assert s[0].item() == pytest.approx(0.00085) and s[-1].item() == pytest.approx(0.012)
    assert torch.allclose(s.sqrt().diff(), s.sqrt().diff()[0].expand(999))  # linear in sqrt(beta)


def test_cosine_betas_follow_closed_form_alpha_bar():
    T, s = 1000, 0.008
    abar = torch.cumprod(1 - cosine_betas(T, s), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cosine_betas(T, s).max().item() == pytest.approx(0.999)  # clipped at the end


def test_zero_terminal_snr_rescaling():
    betas = linear_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    new = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert new[-1].item() == 0.0
    assert new[0].item() == pytest.approx(abar[0].item(), rel=1e-12)
    assert bool((new.diff() < 0).all())


def test_buffers_match_closed_forms():
    sch = NoiseSchedule(1000, "linear")
    betas = linear_betas(1000)
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    assert torch.allclose(sch.alphas_cumprod.double(), abar, rtol=1e-6)
    assert torch.allclose(sch.sqrt_one_minus_alphas_cumprod.double(), (1 - abar).sqrt(), rtol=1e-6)
    # DDPM eq. 7: beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    assert torch.allclose(sch.posterior_variance.double(), (1 - abar_prev) / (1 - abar) * betas, rtol=1e-6)
    assert sch.posterior_variance[0].item() == 0.0
    assert sch.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(sch.posterior_variance[1].item()))


def test_q_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) from Gaussian conditioning: prior N(sqrt(abar_prev) x0, 1 - abar_prev), likelihood
    x_t | x_{t-1} ~ N(sqrt(alpha_t) x_{t-1}, beta_t)."""
    sch = NoiseSchedule(1000, "cosine")
    t = torch.tensor([1, 7, 300, 998])
    x0, x_t = torch.tensor([0.3, -1.2, 2.0, 0.5]).view(4, 1), torch.tensor([1.0, 0.1, -0.7, 3.0]).view(4, 1)
    betas = cosine_betas(1000).double()
    abar = torch.cumprod(1 - betas, 0)
    ap, b = abar[t - 1].view(4, 1), betas[t].view(4, 1)
    precision = 1 / (1 - ap) + (1 - b) / b
    var = 1 / precision
    mean = var * (ap.sqrt() * x0.double() / (1 - ap) + (1 - b).sqrt() * x_t.double() / b)
    got_mean, got_var, got_log_var = sch.q_posterior(x0, x_t, t)
    assert torch.allclose(got_mean.double(), mean, rtol=1e-4, atol=1e-6)
    assert torch.allclose(got_var.double(), var, rtol=1e-4)
    assert torch.allclose(got_log_var.double(), var.log(), atol=1e-4)


def test_buffers_not_saved_and_stay_float32():
    sch = NoiseSchedule(100)
    assert sch.state_dict() == {}
    sch = sch.to(torch.bfloat16)
    assert sch.alphas_cumprod.dtype == torch.float32
    sch.half()
    assert sch.sqrt_recip_alphas_cumprod.dtype == torch.float32


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_conversions_invert_each_other(schedule):
    g = torch.Generator().manual_seed(0)
    sch = NoiseSchedule(1000, schedule)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 990, 999])
    x_t = sch.q_sample(x0, t, eps)
    # eps -> x0 multiplies float32 rounding by 1/sqrt(abar_t): ~2e4 at cosine's last step, so leave t=999 out there
    assert torch.allclose(sch.predict_x0_from_eps(x_t, t, eps)[:-1], x0[:-1], atol=2e-3)
    assert torch.allclose(sch.predict_eps_from_x0(x_t, t, x0)[1:], eps[1:], atol=1e-3)  # t=0: eps barely visible
    v = sch.v_target(x0, eps, t)
    assert torch.allclose(sch.predict_x0_from_v(x_t, t, v), x0, atol=1e-5)
    assert torch.allclose(sch.predict_eps_from_v(x_t, t, v), eps, atol=1e-5)
    for prediction in ("eps", "v", "x0"):
        pred = sch.to_eps_x0(sch.target(x0, eps, t, prediction), x_t, t, prediction)
        assert torch.allclose(pred.x0[1:-1], x0[1:-1], atol=2e-3), prediction
        assert torch.allclose(pred.eps[1:], eps[1:], atol=1e-3), prediction


def test_q_sample_statistics():
    sch = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(1)
    t = torch.full((200_000,), 400)
    x0 = torch.full((200_000, 1), 2.0)
    x_t = sch.q_sample(x0, t, torch.randn(200_000, 1, generator=g))
    abar = sch.alphas_cumprod[400].item()
    assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(abar), abs=0.01)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - abar), abs=0.01)


def test_min_snr_weights_are_the_same_objective_for_every_prediction():
    """For one x0 error, eps/v/x0 losses weighted by loss_weight(min_snr) all equal min(SNR, gamma) ||x0 error||^2."""
    sch = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    x0, eps, delta = (torch.randn(6, 2, generator=g, dtype=torch.float32) for _ in range(3))
    x_t = sch.q_sample(x0, t, eps)
    x0_hat = x0 + 0.1 * delta
    eps_hat = sch.predict_eps_from_x0(x_t, t, x0_hat)
    expected = sch.snr(t).clamp(max=5.0) * (x0_hat - x0).pow(2).mean(1)
    for prediction, hat in (("x0", x0_hat), ("eps", eps_hat), ("v", sch.v_target(x0_hat, eps_hat, t))):
        mse = (hat - sch.target(x0, eps, t, prediction)).pow(2).mean(1)
        got = mse * sch.loss_weight(t, prediction, "min_snr", gamma=5.0)
        assert torch.allclose(got, expected, rtol=2e-3, atol=1e-7), prediction
    assert torch.equal(sch.loss_weight(t, "eps", "plain"), torch.ones(6))
    w = sch.loss_weight(t, "eps", "min_snr")
    assert torch.allclose(w[sch.snr(t) < 5], torch.ones(int((sch.snr(t) < 5).sum())))  # eps weight 1 below gamma


def test_min_snr_plus_one_keeps_weight_at_high_noise_for_v_and_x0():
    """v/x0 losses weighted by loss_weight(min_snr_plus_one) equal min(SNR + 1, gamma) ||x0 error||^2: about 1 at
    high noise, where min_snr's weight min(SNR, gamma) vanishes; eps is refused."""
    sch = NoiseSchedule(1000, "linear", zero_terminal_snr=True)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    x0, eps, delta = (torch.randn(6, 2, generator=g, dtype=torch.float32) for _ in range(3))
    x_t = sch.q_sample(x0, t, eps)
    x0_hat = x0 + 0.1 * delta
    eps_hat = sch.predict_eps_from_x0(x_t[:-1], t[:-1], x0_hat[:-1])  # (eps from x0 is undefined at SNR 0)
    x0_error = (x0_hat - x0).pow(2).mean(1)
    expected = (sch.snr(t) + 1).clamp(max=5.0) * x0_error
    v_hat = torch.cat([sch.v_target(x0_hat[:-1], eps_hat, t[:-1]), -x0_hat[-1:]])  # v = -x0 at SNR 0
    for prediction, hat in (("x0", x0_hat), ("v", v_hat)):
        mse = (hat - sch.target(x0, eps, t, prediction)).pow(2).mean(1)
        got = mse * sch.loss_weight(t, prediction, "min_snr_plus_one", gamma=5.0)
        assert torch.allclose(got, expected, rtol=2e-3, atol=1e-7), prediction
    assert torch.allclose(expected[-2:], x0_error[-2:], rtol=2e-2)  # high noise: weight ~1 on the x0 error
    assert sch.loss_weight(t, "x0", "min_snr")[-1].item() == 0.0  # where min_snr gives none
    with pytest.raises(ValueError, match="'min_snr_plus_one' needs prediction v or x0"):
        sch.loss_weight(t, "eps", "min_snr_plus_one")


def test_min_snr_with_zero_terminal_snr_is_finite():
    sch = NoiseSchedule(100, "linear", zero_terminal_snr=True)
    t = torch.tensor([0, 99])
    assert sch.snr(t)[1].item() == 0.0
    for prediction in ("eps", "v", "x0"):
        assert torch.isfinite(sch.loss_weight(t, prediction, "min_snr")).all()
    assert sch.loss_weight(t, "eps", "min_snr")[1].item() == 1.0


def test_offset_noise_adds_per_channel_constant():
    shape = (4000, 3, 8, 8)
    plain = NoiseSchedule.sample_noise(shape, 0.0, torch.Generator().manual_seed(0))
    offset = NoiseSchedule.sample_noise(shape, 0.5, torch.Generator().manual_seed(0))
    # variance of the per-(sample, channel) spatial mean: 1/64 without, 0.25 + 1/64 with offset
    assert plain.mean((2, 3)).var().item() == pytest.approx(1 / 64, rel=0.1)
    assert offset.mean((2, 3)).var().item() == pytest.approx(0.25 + 1 / 64, rel=0.1)
    again = NoiseSchedule.sample_noise(shape, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(offset, again)


def test_offset_noise_on_clips_is_one_constant_per_clip_and_channel():
    """[B, T, C, h, w]: the offset is shared by the clip's frames and differs between its channels (it was once drawn
    per frame and shared by the channels: a flicker, not a brightness shift)."""
    shape = (2000, 4, 3, 4, 4)
    g = torch.Generator().manual_seed(0)
    offset = NoiseSchedule.sample_noise(shape, 0.5, g) - torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(offset, offset[:, :1, :, :1, :1].expand(shape), atol=1e-6)  # constant over frames, pixels
    per_channel = offset[:, 0, :, 0, 0]  # [B, C]
    assert per_channel.var(0).mean().item() == pytest.approx(0.25, rel=0.1)
    assert (per_channel[:, 0] - per_channel[:, 1]).abs().max() > 0.1


def test_p_losses_regresses_the_right_target():
    sch = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([3, 30, 300, 600, 999])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.allclose(sch.p_losses(zero, x0, t, noise, "eps"), noise.pow(2).flatten(1).mean(1))
    v = sch.v_target(x0, noise, t)
    assert torch.allclose(sch.p_losses(zero, x0, t, noise, "v"), v.pow(2).flatten(1).mean(1))
    # an oracle that recovers x0 from x_t with the true noise has zero loss
    oracle = lambda x_t, t: sch.predict_x0_from_eps(x_t, t, noise)  # noqa: E731
    assert sch.p_losses(oracle, x0, t, noise, "x0").max().item() < 1e-6
    weighted = sch.p_losses(zero, x0, t, noise, "eps", weighting="min_snr")
    assert torch.allclose(weighted, noise.pow(2).flatten(1).mean(1) * sch.loss_weight(t, "eps", "min_snr"))


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        NoiseSchedule(10, "quadratic")
    sch = NoiseSchedule(10)
    x, t = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        sch.to_eps_x0(x, x, t, "score")
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'"):
        sch.loss_weight(t, "eps", "p2")
