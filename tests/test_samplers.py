"""Samplers against exact answers: for Gaussian data x0 ~ N(m, s^2) the optimal denoiser is known in closed form,
E[x0 | x_t] = m + k_t (x_t - a_t m) with a_t = sqrt(abar_t), k_t = a_t s^2 / (a_t^2 s^2 + 1 - abar_t), and every
sampler step is affine in x_t, so the output distribution can be computed exactly."""

import math

import pytest
import torch

from lit_diffusion.diffusion.samplers import (
    SAMPLERS,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    sample,
    timestep_spacing,
)
from lit_diffusion.diffusion.schedule import ModelPrediction, NoiseSchedule

M, S = 1.5, 0.5


def gaussian_denoiser(schedule: NoiseSchedule, prediction: str = "eps", m: float = M, s: float = S):
    """The exact E[eps | x_t] (or v, x0) for data N(m, s^2), as a raw output of type `prediction`."""
    abar_all = schedule.alphas_cumprod_f64

    def fn(x, t):
        abar = abar_all[t.cpu()].view(-1, *([1] * (x.ndim - 1)))
        a, sigma = abar.sqrt(), (1 - abar).sqrt()
        x = x.double()
        x0 = m + a * s * s / (a * a * s * s + sigma**2) * (x - a * m)
        eps = (x - a * x0) / sigma
        out = {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[prediction]
        return out.float()

    return fn


def analytic_deterministic(schedule, ts, c_x0, c_eps, m=M, s=S):
    """Exact affine map x_T -> output (A, B) of a DDIM-type chain x <- c_x0 x0_hat(x) + c_eps eps_hat(x)."""
    A, B = 1.0, 0.0
    for t, cx, ce in zip(ts, c_x0, c_eps):
        abar = schedule.alphas_cumprod_f64[t].item()
        a, sig = math.sqrt(abar), math.sqrt(1 - abar)
        k = a * s * s / (a * a * s * s + sig * sig)
        # x0 = k x + m (1 - k a); eps = (x - a x0) / sig
        x0_lin, x0_c = k, m * (1 - k * a)
        eps_lin, eps_c = (1 - a * k) / sig, -a * x0_c / sig
        lin, const = cx * x0_lin + ce * eps_lin, cx * x0_c + ce * eps_c
        A, B = lin * A, lin * B + const
    return A, B


def ddim_coefficients(schedule, ts):
    abar = schedule.alphas_cumprod_f64
    prev = [abar[t].item() for t in ts[1:]] + [1.0]
    return [math.sqrt(p) for p in prev], [math.sqrt(1 - p) for p in prev]


def probe(sampler, schedule, fn, **kw):
    """A deterministic sampler on Gaussian data is x_T -> A x_T + B: read A and B off x_T = 0 and 1."""
    out = sampler(fn, schedule, (2, 1), x_T=torch.tensor([[0.0], [1.0]]), **kw)
    return (out[1] - out[0]).item(), out[0].item()


def test_timestep_spacing():
    assert timestep_spacing(1000, 10, "trailing") == list(range(999, 0, -100))
    assert timestep_spacing(1000, 10, "leading") == list(range(900, -1, -100))
    ls = timestep_spacing(1000, 7, "linspace")
    assert ls[0] == 999 and ls[-1] == 0 and len(ls) == 7
    assert timestep_spacing(50, 50, "trailing") == list(range(49, -1, -1))
    assert timestep_spacing(50, 50, "leading") == list(range(49, -1, -1))
    with pytest.raises(ValueError, match="steps must be in 1..50"):
        timestep_spacing(50, 51)
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'"):
        timestep_spacing(50, 5, "uniform")


@pytest.mark.parametrize("steps,spacing", [(5, "trailing"), (20, "leading"), (37, "linspace")])
def test_ddim_eta0_is_the_exact_ddim_map(steps, spacing):
    sch = NoiseSchedule(1000, "linear")
    ts = timestep_spacing(1000, steps, spacing)
    A, B = analytic_deterministic(sch, ts, *ddim_coefficients(sch, ts))
    got_A, got_B = probe(ddim_sample, sch, gaussian_denoiser(sch), steps=steps, spacing=spacing)
    assert got_A == pytest.approx(A, abs=1e-4)
    assert got_B == pytest.approx(B, abs=1e-4)


def test_ddim_with_all_steps_recovers_the_data_distribution():
    sch = NoiseSchedule(1000, "linear")
    A, B = probe(ddim_sample, sch, gaussian_denoiser(sch), steps=1000)
    assert A == pytest.approx(S, rel=0.02)  # x_T ~ N(0, 1): output std = A
    assert B == pytest.approx(M, abs=0.01)
    # few steps contract the variance (Cauchy-Schwarz on the DDIM factor): a real property, not a bug
    assert probe(ddim_sample, sch, gaussian_denoiser(sch), steps=10)[0] < 0.8 * S


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_prediction_types_give_the_same_samples(prediction):
    sch = NoiseSchedule(1000, "cosine")
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    ref = ddim_sample(gaussian_denoiser(sch, "eps"), sch, (64, 1), steps=25, x_T=x_T)
    got = ddim_sample(gaussian_denoiser(sch, prediction), sch, (64, 1), steps=25, x_T=x_T, prediction=prediction)
    assert torch.allclose(got, ref, atol=1e-3)


def test_ddpm_matches_exact_output_moments():
    sch = NoiseSchedule(1000, "linear")
    # exact mean/variance of the ancestral chain: x <- (c1 k + c2) x + c1 m (1 - k a) + std z
    A, V, B = 1.0, 1.0, 0.0
    abar = sch.alphas_cumprod_f64
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    for t in range(999, -1, -1):
        ab, ap = abar[t].item(), (abar[t - 1].item() if t > 0 else 1.0)
        bt = betas[t].item()
        c1, c2 = bt * math.sqrt(ap) / (1 - ab), (1 - ap) * math.sqrt(1 - bt) / (1 - ab)
        a = math.sqrt(ab)
        k = a * S * S / (a * a * S * S + 1 - ab)
        lin = c1 * k + c2
        var_z = sch.posterior_variance[max(t, 1)].item() if t > 0 else 0.0
        A, V, B = lin * A, lin * lin * V + var_z, lin * B + c1 * M * (1 - k * a)
    assert math.sqrt(V) == pytest.approx(S, rel=0.02)  # DDPM with T=1000 is close to exact
    n = 20_000
    x = ddpm_sample(gaussian_denoiser(sch), sch, (n, 1), generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(B, abs=4 * math.sqrt(V / n))
    assert x.std().item() == pytest.approx(math.sqrt(V), abs=4 * math.sqrt(V / (2 * n)))


def test_dpmpp_2m_recovers_the_data_distribution_and_beats_ddim():
    sch = NoiseSchedule(1000, "linear")
    fn = gaussian_denoiser(sch)
    A50, B50 = probe(dpmpp_2m_sample, sch, fn, steps=50)
    assert A50 == pytest.approx(S, rel=0.02) and B50 == pytest.approx(M, abs=0.01)
    A_dpm, _ = probe(dpmpp_2m_sample, sch, fn, steps=20)
    A_ddim, _ = probe(ddim_sample, sch, fn, steps=20)
    assert abs(A_dpm - S) < 0.5 * abs(A_ddim - S)  # second order: far smaller error at the same step count


def test_dpmpp_2m_first_order_limit_is_ddim():
    """With one step DPM-Solver++ is first order and lands on x0_hat(x_T), like DDIM."""
    sch = NoiseSchedule(100, "cosine")
    fn = gaussian_denoiser(sch)
    x_T = torch.randn(8, 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dpmpp_2m_sample(fn, sch, (8, 1), steps=1, x_T=x_T),
                          ddim_sample(fn, sch, (8, 1), steps=1, x_T=x_T), atol=1e-5)


def test_ddim_eta0_is_deterministic_given_the_seed():
    sch = NoiseSchedule(100)
    fn = gaussian_denoiser(sch)
    a = ddim_sample(fn, sch, (4, 3), steps=10, generator=torch.Generator().manual_seed(7))
    b = ddim_sample(fn, sch, (4, 3), steps=10, generator=torch.Generator().manual_seed(7))
    c = ddim_sample(fn, sch, (4, 3), steps=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("ddpm", {"steps": 20}), ("ddim", {"steps": 20, "eta": 0.7})])
def test_one_generator_per_sample_makes_a_sample_independent_of_its_batch(name, kw):
    """With a generator per sample, a stochastic chain's noise (x_T and every step's) comes from the sample's own
    generator: sample 1 of a batch of 3 is the same sample drawn in a batch of its own."""
    sch = NoiseSchedule(100)
    fn = gaussian_denoiser(sch)
    sampler = {"ddpm": ddpm_sample, "ddim": ddim_sample}[name]
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = sampler(fn, sch, (3, 4), generator=gens(5, 6, 7), **kw)
    alone = sampler(fn, sch, (1, 4), generator=gens(6), **kw)
    assert torch.equal(batch[1:2], alone)
    # the step noise matters: the same x_T with other generators for the steps ends elsewhere
    x_T = torch.randn(1, 4, generator=torch.Generator().manual_seed(6))
    other = sampler(fn, sch, (1, 4), generator=gens(99), x_T=x_T, **kw)
    assert not torch.allclose(other, alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3: give one per sample"):
        sampler(fn, sch, (3, 4), generator=gens(1, 2), **kw)


def test_ddim_eta1_with_all_steps_is_ddpm():
    """DDIM's sigma at eta=1 is the DDPM posterior std and its mean the posterior mean (Song et al. 2021, sec. 4.1):
    with the same noise draws the two chains coincide."""
    sch = NoiseSchedule(200, "cosine")
    fn = gaussian_denoiser(sch)
    ddpm = ddpm_sample(fn, sch, (256, 1), generator=torch.Generator().manual_seed(3))
    ddim = ddim_sample(fn, sch, (256, 1), steps=200, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddpm, ddim, atol=1e-3)
    # and respaced DDPM is DDIM eta=1 on the same timesteps
    a = ddpm_sample(fn, sch, (16, 1), steps=20, generator=torch.Generator().manual_seed(4))
    b = ddim_sample(fn, sch, (16, 1), steps=20, eta=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_zero_terminal_snr_with_v_prediction():
    sch = NoiseSchedule(1000, "linear", zero_terminal_snr=True)
    fn = gaussian_denoiser(sch, "v")
    for sampler in (ddim_sample, dpmpp_2m_sample):
        A, B = probe(sampler, sch, fn, steps=100, prediction="v")
        assert math.isfinite(A) and A == pytest.approx(S, rel=0.03), sampler.__name__
        assert B == pytest.approx(M, abs=0.01), sampler.__name__


def test_callback_sees_every_step_and_clip_x0_clamps():
    sch = NoiseSchedule(100)
    seen = []
    far = lambda x, t: ModelPrediction(torch.zeros_like(x), torch.full_like(x, 10.0))  # noqa: E731
    out = ddim_sample(far, sch, (3, 2), steps=7, clip_x0=1.0,
                      callback=lambda i, t, x, pred: seen.append((i, t.tolist(), pred.x0.max().item())))
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1][0] for s in seen] == timestep_spacing(100, 7)
    assert all(s[1] == [s[1][0]] * 3 for s in seen)  # t is a [B] tensor
    assert max(s[2] for s in seen) == 1.0
    assert torch.allclose(out, torch.ones(3, 2))  # last DDIM step returns x0_hat


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_clip_x0_bounds_every_predicted_x0_and_keeps_eps_consistent(name, prediction):
    sch = NoiseSchedule(50)
    # a raw output whose implied x0 grows without bound as the noise level rises (|x0| >> 1 early on)
    overshoot = lambda x, t: -3 * x  # noqa: E731
    abar = sch.alphas_cumprod_f64.float()

    def run(clip_x0):
        seen = []
        sample(name, overshoot, sch, (4, 3), prediction=prediction, steps=None if name == "ddpm" else 10,
               clip_x0=clip_x0, generator=torch.Generator().manual_seed(0),
               callback=lambda i, t, x, pred: seen.append((t[0].item(), x, pred)))
        return seen

    assert max(pred.x0.abs().max().item() for _, _, pred in run(None)) > 10  # the bound below really bites
    for t, x, pred in run(2.0):
        assert pred.x0.abs().max().item() <= 2.0
        # eps recomputed from the clipped x0: both still describe x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        torch.testing.assert_close(abar[t].sqrt() * pred.x0 + (1 - abar[t]).sqrt() * pred.eps, x,
                                   rtol=1e-4, atol=1e-4)


def test_registry_and_dispatch():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp_2m", "euler", "heun"}  # euler, heun: tests/test_flow.py
    sch = NoiseSchedule(50)
    fn = gaussian_denoiser(sch)
    a = sample("ddim", fn, sch, (2, 1), steps=5, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(fn, sch, (2, 1), steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        sample("lms", fn, sch, (2, 1))
    with pytest.raises(ValueError, match="x_T has shape"):
        ddim_sample(fn, sch, (2, 1), x_T=torch.zeros(3, 1))


def test_the_flow_samplers_take_one_generator_per_sample_too():
    from lit_diffusion.diffusion import samplers
    from lit_diffusion.diffusion.flow import FlowSchedule

    velocity = lambda x, t: x - 0.5  # noqa: E731  (the straight path from the point 0.5)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = samplers.sample("euler", velocity, FlowSchedule(), (3, 2), steps=4, generator=gens(5, 6, 7))
    alone = samplers.sample("euler", velocity, FlowSchedule(), (1, 2), steps=4, generator=gens(6))
    assert torch.equal(batch[1:2], alone)
