"""Rectified flow (Liu et al. 2022, "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers",
SD3): training timesteps, loss and ODE samplers.

Notation (SD3 sec. 2-3): t in [0, 1], t = 0 is data and t = 1 is noise.
    x_t = (1 - t) x0 + t eps,      eps ~ N(0, I)                                               (SD3 eq. 3, RF)
    v   = dx_t / dt = eps - x0                                                                 (the regression target)
The network learns v(x_t, t) = E[eps - x0 | x_t] and sampling integrates dx/dt = v from t = 1 to t = 0. From a
velocity, x0_hat = x_t - t v and eps_hat = x_t + (1 - t) v: both affine in v for fixed (x_t, t), so classifier-free
guidance on v (`guidance.cfg_model_fn`, v_uncond + g (v_cond - v_uncond)) is exactly guidance on eps and on x0.

The network sees time as t * `time_scale` (1000 by default, as SD3's code does), the range of DDPM's timestep
indices, so the same sinusoidal timestep embedding resolves it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from lit_diffusion.diffusion.schedule import ModelPrediction, NoiseSchedule, randn_per_sample

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""model_fn(x_t, t * time_scale) -> velocity, the shape of x_t."""
Callback = Callable[[int, Tensor, Tensor, ModelPrediction], None]

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("plain", "min_snr", "min_snr_plus_one")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 eq. 23: t' = shift t / (1 + (shift - 1) t). Monotone, fixes 0 and 1; shift > 1 moves every t towards
    noise (t' >= t), which keeps the signal-to-noise ratio of a larger image comparable to the base one."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(size: int | tuple[int, int], base_size: int | tuple[int, int]) -> float:
    """SD3 sec. 5.3.2: shift = sqrt(m / n) for a resolution of m pixels (latent positions) against a base one of n,
    e.g. 64x64 latents against 32x32 -> 2. Sizes are a side length or (height, width)."""
    def pixels(s, name):
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        if h <= 0 or w <= 0:
            raise ValueError(f"{name} must be positive, got {s}")
        return h * w

    return math.sqrt(pixels(size, "size") / pixels(base_size, "base_size"))


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] to broadcast against x."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class FlowSchedule:
    """The settings of a rectified-flow objective; `.config` goes into checkpoints and `FlowSchedule(**config)`
    rebuilds it. Plain numbers, no buffers: every constant is a closed form of t."""

    timesteps: str = "logit_normal"  # training t density: "uniform" or SD3's "logit_normal" (eq. 19)
    logit_mean: float = 0.0  # m of the logit-normal: t = sigmoid(n), n ~ N(m, s^2); m > 0 favours noisier t
    logit_std: float = 1.0  # s of the logit-normal; SD3's best setting is (m, s) = (0, 1)
    shift: float = 1.0  # SD3 eq. 23 time shift for training and sampling; see `resolution_shift`
    time_scale: float = 1000.0  # the network is called with t * time_scale
    # latent side (h * w = base_latent ** 2) at which `shift` holds; each batch of another size gets
    # shift * resolution_shift((h, w), base_latent) (`at_resolution`). None: one shift for every size
    base_latent: int | None = None

    def __post_init__(self):
        if self.timesteps not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"FlowSchedule.timesteps: {self.timesteps!r} is not one of {TIMESTEP_SAMPLINGS}")
        if not self.logit_std > 0:
            raise ValueError(f"FlowSchedule.logit_std must be > 0, got {self.logit_std}")
        if not self.shift > 0:
            raise ValueError(f"FlowSchedule.shift must be > 0, got {self.shift}")
        if not self.time_scale > 0:
            raise ValueError(f"FlowSchedule.time_scale must be > 0, got {self.time_scale}")
        if self.base_latent is not None and not self.base_latent > 0:
            raise ValueError(f"FlowSchedule.base_latent must be a positive latent side, got {self.base_latent}")

    def at_resolution(self, height: int, width: int) -> FlowSchedule:
        """The schedule for latents of height x width: with `base_latent`, the shift grows with the square root of
        the number of latent positions (SD3 sec. 5.3.2), per bucket at training and per request at sampling."""
        if self.base_latent is None:
            return self
        return replace(self, shift=self.shift * resolution_shift((height, width), self.base_latent), base_latent=None)

    @property
    def config(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------------------------------ forward process
    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Training times t [B] in [0, 1] (float32): uniform, or logit-normal t = sigmoid(n), n ~ N(m, s^2)
        (SD3 eq. 19), then shifted (eq. 23)."""
        gen_device = generator.device if generator is not None else device
        if self.timesteps == "uniform":
            t = torch.rand(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
        else:
            n = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
            t = torch.sigmoid(self.logit_mean + self.logit_std * n)
        return shift_time(t, self.shift).to(device=device, dtype=torch.float32)

    @staticmethod
    def q_sample(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = (1 - t) x0 + t eps                                                                  (SD3 eq. 3)"""
        t = _bcast(t, x0)
        return ((1 - t) * x0 + t * noise).to(x0.dtype)

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity v = d x_t / dt = eps - x0 that the network regresses."""
        return noise - x0

    @staticmethod
    def predict_x0(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = x_t - t v (x_t = (1 - t) x0 + t eps with eps = v + x0, solved for x0)."""
        return x_t - _bcast(t, x_t) * v

    @staticmethod
    def predict_eps(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = x_t + (1 - t) v."""
        return x_t + (1 - _bcast(t, x_t)) * v

    @staticmethod
    def snr(t: Tensor) -> Tensor:
        """alpha_t^2 / sigma_t^2 = ((1 - t) / t)^2, [B]."""
        return ((1 - t) / t) ** 2

    def model_time(self, t: Tensor) -> Tensor:
        """The time the network is called with."""
        return t * self.time_scale

    def sampling_times(self, steps: int) -> Tensor:
        """Decreasing float64 grid [steps + 1] from t = 1 (noise) to t = 0 (data): uniform in t, then shifted."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), self.shift)

    # ----------------------------------------------------------------------------------------------- training
    def loss_weight(self, t: Tensor, kind: str = "plain", gamma: float = 5.0) -> Tensor:
        """Per-sample weight [B] of the velocity MSE.

        plain: 1, the rectified-flow loss (SD3's best with logit-normal t).
        min_snr (Hang et al. 2023): the x0-space loss weighted by min(SNR, gamma), SNR = ((1 - t) / t)^2. Since
        x0_hat = x_t - t v_hat, ||x0 - x0_hat||^2 = t^2 ||v - v_hat||^2, so the weight on the velocity loss is
        min(SNR, gamma) t^2 = min((1 - t)^2, gamma t^2).
        min_snr_plus_one: the x0-space weight min(SNR + 1, gamma), as in `NoiseSchedule.loss_weight`; on the
        velocity loss min((1 - t)^2 + t^2, gamma t^2), which stays near 1 at high noise where min_snr's vanishes.
        """
        if kind not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {kind!r}; choose one of {LOSS_WEIGHTINGS}")
        if kind == "plain":
            return torch.ones_like(t, dtype=torch.float32)
        t = t.double()
        x0_weight_times_t2 = (1 - t) ** 2 if kind == "min_snr" else (1 - t) ** 2 + t**2  # SNR t^2, (SNR + 1) t^2
        return torch.minimum(x0_weight_times_t2, gamma * t**2).float()

    def p_losses(
        self,
        model_fn: VelocityFn,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        weighting: str = "plain",
        gamma: float = 5.0,
        offset_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample training loss [B] (minRF's `forward`, SD3 eq. 6 with w_t = 1): draw t and eps, regress
        v = eps - x0 at x_t with `model_fn(x_t, t * time_scale) -> velocity`, MSE averaged over non-batch dims,
        times `loss_weight`."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
        if noise is None:
            noise = NoiseSchedule.sample_noise(x0.shape, offset_noise, generator=generator, device=x0.device,
                                               dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, self.model_time(t))
        mse = (out.float() - self.target(x0, noise).float()).pow(2).flatten(1).mean(1)  # [B]
        return mse * self.loss_weight(t, weighting, gamma).to(mse.device)


# ---------------------------------------------------------------------------------------------------- sampling
def _setup(shape, x_T, generator, device, dtype):
    if device is None:
        device = x_T.device if x_T is not None else torch.device("cpu")
    device = torch.device(device)
    if x_T is None and isinstance(generator, (list, tuple)):  # one generator per sample
        x_T = randn_per_sample(shape, generator, dtype)
    elif x_T is None:
        # a generator on another device than the sampler draws there and is copied once
        gen_device = generator.device if generator is not None else device
        x_T = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    return x_T.to(device=device, dtype=dtype), device


def _iterate(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, leave=False)


class _Velocity:
    """model_fn at time t (float64 host scalar) for a batch, with the callback's view of the step."""

    def __init__(self, model_fn: VelocityFn, schedule: FlowSchedule, batch: int, device, dtype,
                 callback: Callback | None):
        self.model_fn, self.schedule, self.batch, self.callback = model_fn, schedule, batch, callback
        self.t_dtype = torch.promote_types(dtype, torch.float32)  # a float16 t cannot tell 999.0 from 999.5
        self.device = device

    def __call__(self, x: Tensor, t: float, step: int | None = None) -> Tensor:
        t_vec = torch.full((self.batch,), t, device=self.device, dtype=self.t_dtype)  # [B]
        t_net = self.schedule.model_time(t_vec)
        v = self.model_fn(x, t_net)
        if self.callback is not None and step is not None:
            fs = self.schedule
            self.callback(step, t_net, x, ModelPrediction(fs.predict_eps(x, t_vec, v), fs.predict_x0(x, t_vec, v)))
        return v


@torch.no_grad()
def euler_sample(
    model_fn: VelocityFn,
    schedule: FlowSchedule,
    shape,
    *,
    steps: int = 28,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Euler's method on dx/dt = v(x, t) from t = 1 to t = 0 over `schedule.sampling_times(steps)`
    (minRF's `sample`): x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i). First order; `steps` network calls."""
    x, device = _setup(shape, x_T, generator, device, dtype)
    velocity = _Velocity(model_fn, schedule, shape[0], device, dtype, callback)
    ts = schedule.sampling_times(steps).tolist()  # host floats: no device sync in the loop
    for i in _iterate(steps, progress, "euler"):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i], i)
    return x


@torch.no_grad()
def heun_sample(
    model_fn: VelocityFn,
    schedule: FlowSchedule,
    shape,
    *,
    steps: int = 28,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    device=None,
    dtype=torch.float32,
) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1, deterministic): an Euler step to t_{i+1}, then the
    trapezoid rule with the slope there, x_{i+1} = x_i + h (d_i + d'_i) / 2. The last step, to t = 0, stays Euler
    (as in Algorithm 1, line 6). Second order; 2 steps - 1 network calls."""
    x, device = _setup(shape, x_T, generator, device, dtype)
    velocity = _Velocity(model_fn, schedule, shape[0], device, dtype, callback)
    ts = schedule.sampling_times(steps).tolist()
    for i in _iterate(steps, progress, "heun"):
        h = ts[i + 1] - ts[i]
        d = velocity(x, ts[i], i)
        x_euler = x + h * d
        if ts[i + 1] == 0:
            x = x_euler
        else:
            x = x + h * 0.5 * (d + velocity(x_euler, ts[i + 1]))
    return x


FLOW_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
}
