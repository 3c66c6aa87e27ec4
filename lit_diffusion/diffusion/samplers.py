"""Reverse-process samplers: ancestral DDPM, DDIM, DPM-Solver++(2M); and the registry of every sampler, which
also holds rectified flow's Euler and Heun (`diffusion/flow.py`) and knows which objective each one needs.

Every sampler takes `model_fn(x_t, t) -> raw network output | ModelPrediction`, where t is a long tensor [B] of
timestep indices 0..T-1; a raw output is read as `prediction` ("eps" | "v" | "x0"). Per-step coefficients are
computed once in float64 on the host and moved to the device as one tensor each, so the loop does no host-device
syncs: its overhead over the bare network forwards is a handful of element-wise kernels per step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from lit_diffusion.diffusion.flow import FLOW_SAMPLERS, FlowSchedule
from lit_diffusion.diffusion.schedule import ModelPrediction, NoiseSchedule, randn_per_sample

ModelFn = Callable[[Tensor, Tensor], "Tensor | ModelPrediction"]
Callback = Callable[[int, Tensor, Tensor, ModelPrediction], None]
SPACINGS = ("trailing", "leading", "linspace")


def timestep_spacing(num_timesteps: int, steps: int, spacing: str = "trailing") -> list[int]:
    """Decreasing timesteps to visit. "trailing" starts at T-1 (Lin et al. 2023, Table 2: the last step sees pure
    noise); "leading" is DDIM's original arange(0, T, T // steps); "linspace" rounds linspace(0, T-1, steps)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if spacing == "trailing":
        ts = [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]
    elif spacing == "leading":
        stride = num_timesteps // steps
        ts = [i * stride for i in range(steps)][::-1]
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long().tolist()[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return ts


class _Denoise:
    """model_fn -> ModelPrediction, with optional x0 clipping (eps is then recomputed from the clipped x0 so that
    both stay consistent with x_t, as in ADM)."""

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule, prediction: str, clip_x0: float | None):
        self.model_fn, self.schedule, self.prediction, self.clip_x0 = model_fn, schedule, prediction, clip_x0

    def __call__(self, x_t: Tensor, t: Tensor) -> ModelPrediction:
        out = self.model_fn(x_t, t)
        pred = out if isinstance(out, ModelPrediction) else self.schedule.to_eps_x0(out, x_t, t, self.prediction)
        if self.clip_x0 is not None:
            x0 = pred.x0.clamp(-self.clip_x0, self.clip_x0)
            pred = ModelPrediction(self.schedule.predict_eps_from_x0(x_t, t, x0), x0)
        return pred


def _setup(schedule: NoiseSchedule, shape, x_T, generator, device, dtype):
    device = torch.device(device) if device is not None else schedule.betas.device
    if x_T is None:
        x_T = _randn(shape, generator, device, dtype)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return x_T.to(device=device, dtype=dtype), device


def _randn(shape, generator: torch.Generator | Sequence[torch.Generator] | None, device, dtype) -> Tensor:
    """Standard normal noise of `shape`. `generator` may be one per sample (a sequence as long as the batch): each
    sample's noise then comes from its own generator, so it does not depend on the batch it is sampled in."""
    if isinstance(generator, (list, tuple)):  # one host-to-device copy a step, not one a sample
        return randn_per_sample(shape, generator, dtype).to(device)
    # a CPU generator with a GPU sampler costs a copy per step; pass a generator on the sampling device
    if generator is not None and generator.device.type != torch.device(device).type:
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _iterate(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


def _col(values, device, dtype) -> Tensor:
    """Per-step scalars as one device tensor; indexing it with a python int is a view, not a sync."""
    return torch.as_tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape,
    *,
    prediction: str = "eps",
    steps: int | None = None,
    spacing: str = "trailing",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Ancestral sampling, DDPM Algorithm 2 written through the posterior (eq. 6-7): x_{t-1} ~ N(mu~(x_t, x0_hat),
    beta~_t), no noise at the last step. With `steps` < T this runs the respaced chain, which is exactly DDIM with
    eta = 1 (Song et al. 2021, sec. 4.1), so it is delegated there."""
    if steps is not None and steps != schedule.num_timesteps:
        return ddim_sample(model_fn, schedule, shape, steps=steps, eta=1.0, spacing=spacing, prediction=prediction,
                           generator=generator, clip_x0=clip_x0, x_T=x_T, callback=callback, progress=progress,
                           device=device, dtype=dtype)
    x, device = _setup(schedule, shape, x_T, generator, device, dtype)
    denoise = _Denoise(model_fn, schedule, prediction, clip_x0)
    T = schedule.num_timesteps
    ts = torch.arange(T - 1, -1, -1, device=device)
    coef1 = _col(schedule.posterior_mean_coef1.flip(0), device, dtype)
    coef2 = _col(schedule.posterior_mean_coef2.flip(0), device, dtype)
    std = _col((0.5 * schedule.posterior_log_variance_clipped.double()).exp().flip(0), device, dtype)
    for i in _iterate(T, progress, "ddpm"):
        t = ts[i].expand(shape[0])
        pred = denoise(x, t)
        if callback is not None:
            callback(i, t, x, pred)
        x_prev = coef1[i] * pred.x0 + coef2[i] * x
        if i < T - 1:
            x_prev = x_prev + std[i] * _randn(shape, generator, device, dtype)
        x = x_prev
    return x


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape,
    *,
    steps: int = 50,
    eta: float = 0.0,
    spacing: str = "trailing",
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat
    + sigma z, with sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16).
    eta = 0 is deterministic given x_T; eta = 1 is ancestral DDPM on the visited timesteps. After the last
    visited timestep abar_prev = 1, so the result is the final x0 estimate."""
    x, device = _setup(schedule, shape, x_T, generator, device, dtype)
    denoise = _Denoise(model_fn, schedule, prediction, clip_x0)
    ts = timestep_spacing(schedule.num_timesteps, steps, spacing)
    abar_all = schedule.alphas_cumprod_f64
    abar = abar_all[ts]
    abar_prev = torch.cat([abar_all[ts[1:]], torch.ones(1, dtype=torch.float64)])
    sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
    c_x0 = abar_prev.sqrt()
    c_eps = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
    add_noise = (sigma > 0).tolist()  # host-side, so no sync in the loop
    t_dev = torch.tensor(ts, device=device)
    c_x0, c_eps, sigma = (_col(v, device, dtype) for v in (c_x0, c_eps, sigma))
    for i in _iterate(len(ts), progress, "ddim"):
        t = t_dev[i].expand(shape[0])
        pred = denoise(x, t)
        if callback is not None:
            callback(i, t, x, pred)
        x = c_x0[i] * pred.x0 + c_eps[i] * pred.eps
        if add_noise[i]:
            x = x + sigma[i] * _randn(shape, generator, device, dtype)
    return x


@torch.no_grad()
def dpmpp_2m_sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    shape,
    *,
    steps: int = 20,
    spacing: str = "trailing",
    prediction: str = "eps",
    generator: torch.Generator | None = None,
    clip_x0: float | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second-order solver of the probability-flow ODE
    in data prediction, in lambda = log(alpha / sigma). With h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:
        D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}      (first step: D_0 = x0_0)
        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D_i
    The grid ends at sigma = 0 (lambda = inf) with a first-order step, which returns the last x0 estimate."""
    x, device = _setup(schedule, shape, x_T, generator, device, dtype)
    denoise = _Denoise(model_fn, schedule, prediction, clip_x0)
    ts = timestep_spacing(schedule.num_timesteps, steps, spacing)
    abar = torch.cat([schedule.alphas_cumprod_f64[ts], torch.ones(1, dtype=torch.float64)])
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = alpha.log() - sigma.log()  # -inf for zero terminal SNR, +inf at the clean end; the algebra below copes
    h = lam[1:] - lam[:-1]  # [steps]
    a = sigma[1:] / sigma[:-1]
    b = -alpha[1:] * torch.expm1(-h)
    c1, c2 = b.clone(), torch.zeros_like(b)
    for i in range(1, len(ts) - 1):  # second order except the first and the last (to sigma = 0) step
        half_inv_r = 0.5 * h[i] / h[i - 1]  # 1 / (2 r_i); 0 after an infinite first step
        c1[i], c2[i] = b[i] * (1 + half_inv_r), -b[i] * half_inv_r
    t_dev = torch.tensor(ts, device=device)
    a, c1, c2 = (_col(v, device, dtype) for v in (a, c1, c2))
    x0_prev = None
    for i in _iterate(len(ts), progress, "dpm++2m"):
        t = t_dev[i].expand(shape[0])
        pred = denoise(x, t)
        if callback is not None:
            callback(i, t, x, pred)
        x = a[i] * x + c1[i] * pred.x0
        if x0_prev is not None and 0 < i < len(ts) - 1:
            x = x + c2[i] * x0_prev
        x0_prev = pred.x0
    return x


DDPM_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpmpp_2m": dpmpp_2m_sample,
}
OBJECTIVES = ("ddpm", "flow")
SAMPLERS: dict[str, Callable[..., Tensor]] = {**DDPM_SAMPLERS, **FLOW_SAMPLERS}
SAMPLER_OBJECTIVE: dict[str, str] = {**dict.fromkeys(DDPM_SAMPLERS, "ddpm"), **dict.fromkeys(FLOW_SAMPLERS, "flow")}
"""The objective a sampler integrates: DDPM's samplers read eps / v / x0 on a NoiseSchedule, the flow samplers a
velocity on a FlowSchedule; the two outputs mean different things, so a mismatch is refused, not converted."""


def objective_of(schedule: NoiseSchedule | FlowSchedule) -> str:
    return "flow" if isinstance(schedule, FlowSchedule) else "ddpm"


def check_sampler(name: str, objective: str) -> None:
    """Raise a ValueError naming both sides unless sampler `name` can sample a model trained with `objective`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if SAMPLER_OBJECTIVE[name] != objective:
        fitting = sorted(k for k, v in SAMPLER_OBJECTIVE.items() if v == objective)
        raise ValueError(f"sampler {name!r} needs objective {SAMPLER_OBJECTIVE[name]!r}, this model's objective is "
                         f"{objective!r}; choose one of {fitting}")


def sample(name: str, model_fn: ModelFn, schedule: NoiseSchedule | FlowSchedule, shape, **kwargs) -> Tensor:
    """Dispatch to `SAMPLERS[name]` after checking it fits the schedule's objective (a NoiseSchedule is 'ddpm', a
    FlowSchedule 'flow'); kwargs are that sampler's keyword arguments (steps, eta, generator, ...)."""
    check_sampler(name, objective_of(schedule))
    return SAMPLERS[name](model_fn, schedule, shape, **kwargs)
