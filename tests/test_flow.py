"""Rectified flow against closed forms.

For Gaussian data x0 ~ N(mu, Sigma) and eps ~ N(0, I) independent, (x0, eps, x_t = (1 - t) x0 + t eps) is jointly
Gaussian with
    E[x_t] = (1 - t) mu,   C_t := Cov(x_t) = (1 - t)^2 Sigma + t^2 I,
    Cov(x0, x_t) = (1 - t) Sigma,   Cov(eps, x_t) = t I.
Gaussian conditioning, E[a | x_t] = E[a] + Cov(a, x_t) C_t^{-1} (x_t - E[x_t]), gives
    E[x0  | x_t] = mu + (1 - t) Sigma C_t^{-1} (x_t - (1 - t) mu),
    E[eps | x_t] =           t C_t^{-1} (x_t - (1 - t) mu),
so the exact velocity field is
    v*(x, t) = E[eps - x0 | x_t = x] = -mu + (t I - (1 - t) Sigma) C_t^{-1} (x - (1 - t) mu).
Every matrix here is a function of Sigma, so in Sigma's eigenbasis the ODE dx/dt = v* splits into 1-D problems whose
flow is monotone and maps N(0, 1) at t = 1 to N(mu_k, lambda_k) at t = 0: the exact solution from x_1 is
x_0 = mu + Sigma^{1/2} x_1 (symmetric square root). That is the reference the samplers must converge to.
"""

import math

import pytest
import torch
from torch import Tensor

from lit_diffusion.diffusion.flow import (
    FlowSchedule,
    euler_sample,
    heun_sample,
    resolution_shift,
    shift_time,
)
from lit_diffusion.diffusion.guidance import cfg_model_fn, rescale_guidance
from lit_diffusion.models.conditions import Conditioning
from lit_diffusion.diffusion.samplers import SAMPLERS, check_sampler, ddim_sample, sample
from lit_diffusion.diffusion.schedule import NoiseSchedule

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
_L = torch.tensor([[1.2, 0.0, 0.0], [0.5, 0.6, 0.0], [-0.3, 0.4, 0.3]], dtype=torch.float64)
SIGMA = _L @ _L.T  # a full 3x3 covariance, eigenvalues ~ 0.05 .. 1.9
_EV, _U = torch.linalg.eigh(SIGMA)
SIGMA_SQRT = _U @ torch.diag(_EV.sqrt()) @ _U.T


def gaussian_velocity(schedule: FlowSchedule, mu: Tensor = MU, sigma: Tensor = SIGMA):
    """v*(x, t) from the module docstring, called like a network: t arrives as t * time_scale."""
    eye = torch.eye(len(mu), dtype=torch.float64)

    def fn(x, t_net):
        times, index = torch.unique(t_net.double() / schedule.time_scale, return_inverse=True)  # samplers: one t
        t = times.view(-1, 1, 1)  # [T, 1, 1]
        c = (1 - t) ** 2 * sigma + t**2 * eye  # [T, D, D]
        a = ((t * eye - (1 - t) * sigma) @ torch.linalg.inv(c))[index]  # [B, D, D]
        centred = x.double() - (1 - times[index, None]) * mu  # [B, D]
        return (-mu + (a @ centred.unsqueeze(-1)).squeeze(-1)).to(x.dtype)

    return fn


def exact_endpoint(x1):
    return MU + x1 @ SIGMA_SQRT


# ------------------------------------------------------------------------------------- forward process, timesteps
def test_q_sample_target_and_inverses_match_the_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0.0, 0.25, 0.7, 1.0])
    fs = FlowSchedule()
    x_t = fs.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(x_t[i], (1 - ti) * x0[i] + ti * eps[i])
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[3], eps[3])
    v = fs.target(x0, eps)
    assert torch.equal(v, eps - x0)
    # v is d x_t / dt: the path is linear in t, so a central difference is exact up to rounding
    h = 1e-3
    t_mid = torch.full((4,), 0.5, dtype=torch.float64)
    x0d, epsd = x0.double(), eps.double()
    dx = (fs.q_sample(x0d, t_mid + h, epsd) - fs.q_sample(x0d, t_mid - h, epsd)) / (2 * h)
    assert torch.allclose(dx, v.double(), atol=1e-9)
    assert torch.allclose(fs.predict_x0(x_t, t, v), x0, atol=1e-6)
    assert torch.allclose(fs.predict_eps(x_t, t, v), eps, atol=1e-6)


def test_logit_normal_timesteps_have_the_requested_logit_moments():
    n = 200_000
    fs = FlowSchedule(timesteps="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = fs.sample_timesteps(n, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (n,)
    t = t.double()
    assert ((t > 0) & (t < 1)).all()
    logit = torch.logit(t)
    assert abs(logit.mean().item() - 0.5) < 4 * 0.8 / math.sqrt(n)
    assert abs(logit.std().item() - 0.8) < 4 * 0.8 / math.sqrt(2 * n)
    # the shift adds log(shift) in logit space: logit(s t / (1 + (s - 1) t)) = logit(t) + log(s)
    shifted = FlowSchedule(timesteps="logit_normal", logit_mean=0.5, logit_std=0.8, shift=3.0)
    logit = torch.logit(shifted.sample_timesteps(n, generator=torch.Generator().manual_seed(0)).double())
    assert abs(logit.mean().item() - (0.5 + math.log(3.0))) < 4 * 0.8 / math.sqrt(n)
    assert abs(logit.std().item() - 0.8) < 4 * 0.8 / math.sqrt(2 * n)


def test_uniform_timesteps_have_uniform_moments():
    n = 200_000
    t = FlowSchedule(timesteps="uniform").sample_timesteps(n, generator=torch.Generator().manual_seed(1)).double()
    assert ((t >= 0) & (t < 1)).all()
    assert abs(t.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(t.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (U - 1/2)^2 is 1/180
    # fraction below a quarter
    assert abs((t < 0.25).double().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_shift_fixes_the_ends_and_is_monotone(shift):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = shift_time(t, shift)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert (s[1:] > s[:-1]).all()
    assert ((s >= t) if shift >= 1 else (s <= t)).all()
    # SD3 eq. 23 at one point by hand: shift 3, t = 1/2 -> 1.5 / 2 = 0.75
    assert shift_time(torch.tensor(0.5, dtype=torch.float64), 3.0).item() == pytest.approx(0.75)
    # composition multiplies shifts (a translation by log(shift) in logit space)
    assert torch.allclose(shift_time(shift_time(t, shift), 2.0), shift_time(t, 2.0 * shift))


def test_resolution_shift_is_sqrt_of_the_pixel_ratio():
    assert resolution_shift(64, 32) == pytest.approx(2.0)
    assert resolution_shift((64, 32), 32) == pytest.approx(math.sqrt(2))
    assert resolution_shift(128, 32) == pytest.approx(4.0)  # SD3: 1024 px against 256 px
    with pytest.raises(ValueError, match="base_size must be positive"):
        resolution_shift(32, 0)


def test_sampling_grid_runs_from_noise_to_data_through_the_shift():
    fs = FlowSchedule(shift=3.0)
    ts = fs.sampling_times(4)
    assert ts.dtype == torch.float64
    expected = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert ts.tolist() == pytest.approx(expected, abs=1e-15)


def test_config_round_trips_through_a_weights_only_checkpoint(tmp_path):
    fs = FlowSchedule(timesteps="uniform", shift=2.0, logit_mean=0.3)
    torch.save({"flow": fs.config}, tmp_path / "c.pt")
    assert FlowSchedule(**torch.load(tmp_path / "c.pt", weights_only=True)["flow"]) == fs


@pytest.mark.parametrize("kwargs,match", [
    (dict(timesteps="cosmap"), "FlowSchedule.timesteps: 'cosmap'"),
    (dict(logit_std=0.0), "FlowSchedule.logit_std"),
    (dict(shift=-1.0), "FlowSchedule.shift"),
    (dict(time_scale=0), "FlowSchedule.time_scale"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowSchedule(**kwargs)


# ------------------------------------------------------------------------------------------------------ training
def test_p_losses_is_the_velocity_mse_at_the_network_time():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    fs = FlowSchedule()
    seen = {}

    def model_fn(x_t, t_net):
        seen["x_t"], seen["t"] = x_t, t_net
        return 0.3 * x_t

    loss = fs.p_losses(model_fn, x0, t=t, noise=eps)
    assert torch.allclose(seen["t"], t * 1000)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    assert torch.allclose(seen["x_t"], x_t)
    assert torch.allclose(loss, (0.3 * x_t - (eps - x0)).pow(2).mean((1, 2, 3)))
    # drawn t and noise: a perfect model has zero loss whatever it draws
    exact = FlowSchedule(timesteps="uniform")
    perfect = lambda x_t, t_net: x_t.new_zeros(()) + 2.0  # noqa: E731  (v = eps - x0 with x0 = -1, eps = 1)
    assert exact.p_losses(perfect, -torch.ones(5, 3), noise=torch.ones(5, 3)).abs().max() == 0


@pytest.mark.parametrize("weighting", ["min_snr", "min_snr_plus_one"])
def test_min_snr_weightings_are_the_clipped_snr_times_the_x0_error(weighting):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    fs = FlowSchedule()
    model_fn = lambda x_t, t_net: 0.5 * x_t + 0.1  # noqa: E731
    loss = fs.p_losses(model_fn, x0, t=t, noise=eps, weighting=weighting, gamma=5.0)
    x_t = fs.q_sample(x0, t, eps)
    x0_hat = fs.predict_x0(x_t, t, model_fn(x_t, t))
    snr = ((1 - t) / t) ** 2  # Hang et al.: alpha^2 / sigma^2 with alpha = 1 - t, sigma = t
    x0_weight = (snr if weighting == "min_snr" else snr + 1).clamp(max=5.0)
    assert torch.allclose(loss.double(), x0_weight * (x0_hat - x0).pow(2).mean(1), rtol=1e-5)


def test_unknown_weighting_is_named():
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'"):
        FlowSchedule().p_losses(lambda x, t: x, torch.zeros(2, 3), weighting="p2")


# ------------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("sampler,steps", [(euler_sample, 400), (heun_sample, 40)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_reproduce_gaussian_data_within_monte_carlo_error(sampler, steps, shift):
    n = 40_000
    fs = FlowSchedule(shift=shift)
    x = sampler(gaussian_velocity(fs), fs, (n, 3), steps=steps, generator=torch.Generator().manual_seed(0),
                dtype=torch.float64)
    assert x.dtype == torch.float64
    mean_se = (SIGMA.diagonal() / n).sqrt()
    assert ((x.mean(0) - MU).abs() < 4 * mean_se).all(), (x.mean(0), MU)
    cov = torch.cov(x.T)
    d = SIGMA.diagonal()
    cov_se = ((d[:, None] * d[None, :] + SIGMA**2) / n).sqrt()  # Var of a sample covariance of Gaussians
    assert ((cov - SIGMA).abs() < 4 * cov_se).all(), (cov, SIGMA)


def _errors(sampler, fs, steps_list, x1):
    return [(sampler(gaussian_velocity(fs), fs, x1.shape, steps=n, x_T=x1, dtype=torch.float64)
             - exact_endpoint(x1)).norm(dim=1).max().item() for n in steps_list]


def _slope(steps_list, errors):
    """Least-squares slope of log(error) against log(1 / steps)."""
    x = -torch.tensor(steps_list, dtype=torch.float64).log()
    y = torch.tensor(errors, dtype=torch.float64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_first_order_and_heun_second_order(shift):
    fs = FlowSchedule(shift=shift)
    x1 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = [16, 32, 64, 128]
    euler, heun = _errors(euler_sample, fs, steps, x1), _errors(heun_sample, fs, steps, x1)
    # measured: shift 1 -> euler 0.98, heun 2.04; shift 3 -> euler 0.98, heun 1.88
    assert 0.8 < _slope(steps, euler) < 1.2, euler
    assert 1.7 < _slope(steps, heun) < 2.4, heun
    assert heun[-1] < 5e-3  # and they converge to the closed-form endpoint, not just at some rate
    assert euler[-1] < 0.1


def test_callback_sees_every_step_and_euler_ends_at_the_last_x0_estimate():
    fs = FlowSchedule(shift=2.0)
    seen = []
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    calls = []
    fn = gaussian_velocity(fs)
    counted = lambda x, t: calls.append(t) or fn(x, t)  # noqa: E731
    out = euler_sample(counted, fs, (5, 3), steps=6, x_T=x1, dtype=torch.float64,
                       callback=lambda i, t, x, pred: seen.append((i, t, pred)))
    assert [s[0] for s in seen] == list(range(6))
    assert torch.allclose(torch.stack([s[1][0] for s in seen]), fs.sampling_times(6)[:-1] * 1000)
    assert all(s[1].shape == (5,) for s in seen)
    assert torch.allclose(out, seen[-1][2].x0)  # the step to t = 0 is x - t v = x0_hat
    # the first step sees pure noise: x0_hat = x_1 - v(x_1, 1) = mu exactly for this field
    assert torch.allclose(seen[0][2].x0, MU.expand(5, 3))
    calls.clear()
    heun_sample(counted, fs, (5, 3), steps=6, x_T=x1, dtype=torch.float64)
    assert len(calls) == 2 * 6 - 1  # no correction on the last step


def test_x_T_shape_is_checked():
    with pytest.raises(ValueError, match="x_T has shape"):
        euler_sample(lambda x, t: x, FlowSchedule(), (2, 3), x_T=torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------------- guidance
class ShiftedGaussianDenoiser:
    """The exact velocity for data N(MU + c, SIGMA), c = the masked mean of the context: a text-conditional
    network whose every prompt names a mean."""

    def __init__(self, fs: FlowSchedule):
        self.fs, self.calls = fs, []

    def __call__(self, x, t, cond):
        context, mask = cond.context, cond.mask
        self.calls.append((x.shape[0], t.clone()))
        m = mask.double().unsqueeze(-1)
        c = (context * m).sum((1, 2)) / (m.sum((1, 2)) * context.shape[2])  # [B]
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = gaussian_velocity(self.fs, MU + c[i])(x[i:i + 1], t[i:i + 1])[0]
        return out


def cond_of(value, batch, length=4, dim=2, valid=3):
    context = torch.full((batch, length, dim), float(value), dtype=torch.float64)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, :valid] = True
    return Conditioning(context=context, mask=mask)


def test_guidance_scale_one_is_the_conditional_velocity():
    fs = FlowSchedule()
    den = ShiftedGaussianDenoiser(fs)
    x1 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = heun_sample(cfg_model_fn(den, cond_of(1.5, 4), cond_of(0.0, 4), scale=1.0), fs, (4, 3), steps=30,
                      x_T=x1, dtype=torch.float64)
    assert all(b == 4 for b, _ in den.calls)  # no unconditional half was run
    assert torch.allclose(out, exact_endpoint(x1) + 1.5, atol=5e-3)  # the conditional data, N(MU + 1.5, SIGMA)


def test_guided_flow_sample_combines_velocities_like_eps_and_a_negative_prompt_moves_only_uncond():
    fs = FlowSchedule(shift=2.0)
    x1 = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g, cond = 4.0, cond_of(1.0, 3)

    def by_hand(uncond_value):
        v_c = gaussian_velocity(fs, MU + 1.0)
        v_u = gaussian_velocity(fs, MU + uncond_value)
        return lambda x, t: v_u(x, t) + g * (v_c(x, t) - v_u(x, t))

    for uncond_value in (0.0, -2.0):  # the empty prompt, then a negative prompt
        den = ShiftedGaussianDenoiser(fs)
        guided = euler_sample(cfg_model_fn(den, cond, cond_of(uncond_value, 1), scale=g), fs, (3, 3), steps=8,
                              x_T=x1, dtype=torch.float64)
        assert all(b == 6 for b, _ in den.calls)  # one batched forward per step, [uncond; cond]
        assert all(torch.equal(t[:3], t[3:]) for _, t in den.calls)
        ref = euler_sample(by_hand(uncond_value), fs, (3, 3), steps=8, x_T=x1, dtype=torch.float64)
        assert torch.allclose(guided, ref, atol=1e-12)
    # at one (x_t, t): guiding v is guiding x0 (x0_hat = x_t - t v is affine in v with weights summing to one)
    x_t, t = x1, torch.full((3,), 0.6, dtype=torch.float64)
    v = cfg_model_fn(ShiftedGaussianDenoiser(fs), cond, cond_of(-2.0, 1), scale=g)(x_t, fs.model_time(t))
    x0_u = fs.predict_x0(x_t, t, gaussian_velocity(fs, MU - 2.0)(x_t, fs.model_time(t)))
    x0_c = fs.predict_x0(x_t, t, gaussian_velocity(fs, MU + 1.0)(x_t, fs.model_time(t)))
    assert torch.allclose(fs.predict_x0(x_t, t, v), x0_u + g * (x0_c - x0_u), atol=1e-12)
    # the negative prompt changes the guided velocity by exactly (1 - g) (v_neg - v_empty): the cond branch is fixed
    v_empty = cfg_model_fn(ShiftedGaussianDenoiser(fs), cond, cond_of(0.0, 1), scale=g)(x_t, fs.model_time(t))
    v_neg = gaussian_velocity(fs, MU - 2.0)(x_t, fs.model_time(t))
    v_emp = gaussian_velocity(fs, MU + 0.0)(x_t, fs.model_time(t))
    assert torch.allclose(v - v_empty, (1 - g) * (v_neg - v_emp), atol=1e-12)
    # guidance rescale (Lin et al. 2023) acts on the velocity as on eps: matched to the conditional velocity's std
    v_cond = gaussian_velocity(fs, MU + 1.0)(x_t, fs.model_time(t))
    rescaled_fn = cfg_model_fn(ShiftedGaussianDenoiser(fs), cond, cond_of(-2.0, 1), scale=g, rescale=0.7)
    v_res = rescaled_fn(x_t, fs.model_time(t))
    assert torch.allclose(v_res, rescale_guidance(v, v_cond, 0.7), atol=1e-12)
    assert torch.allclose(v_res.std(1), 0.7 * v_cond.std(1) + 0.3 * v.std(1), atol=1e-12)


# ------------------------------------------------------------------------------------------ registry and dispatch
def test_dispatch_knows_each_samplers_objective():
    fs, ddpm = FlowSchedule(), NoiseSchedule(50)
    fn = gaussian_velocity(fs)
    x1 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, direct in (("euler", euler_sample), ("heun", heun_sample)):
        assert torch.equal(sample(name, fn, fs, (2, 3), steps=5, x_T=x1, dtype=torch.float64),
                           direct(fn, fs, (2, 3), steps=5, x_T=x1, dtype=torch.float64))
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        message = f"sampler '{name}' needs objective 'ddpm', this model's objective is 'flow'"
        with pytest.raises(ValueError, match=message):
            sample(name, fn, fs, (2, 3))
    for name in ("euler", "heun"):
        message = f"sampler '{name}' needs objective 'flow', this model's objective is 'ddpm'"
        with pytest.raises(ValueError, match=message):
            sample(name, lambda x, t: x, ddpm, (2, 3))
    # the check alone, for validating a config before any schedule exists
    for name in SAMPLERS:
        objective = "flow" if name in ("euler", "heun") else "ddpm"
        check_sampler(name, objective)
    with pytest.raises(ValueError, match="unknown objective 'score'"):
        check_sampler("euler", "score")
    # DDPM callers are unchanged
    eps0 = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert torch.equal(sample("ddim", eps0, ddpm, (2, 1), steps=5, x_T=torch.ones(2, 1)),
                       ddim_sample(eps0, ddpm, (2, 1), steps=5, x_T=torch.ones(2, 1)))
