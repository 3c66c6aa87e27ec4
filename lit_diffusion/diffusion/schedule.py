"""The forward (noising) process of a discrete-time Gaussian diffusion and the algebra around it.

Beta schedules are pure functions returning float64 tensors; `NoiseSchedule` turns them into the constants of
DDPM (Ho et al. 2020) once, in float64, and keeps them as float32 buffers. Timesteps are integers 0..T-1.

Notation: abar_t = alphas_cumprod[t], x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps               (DDPM eq. 4)
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Callable

import torch
from torch import Tensor, nn

ModelPrediction = namedtuple("ModelPrediction", ["eps", "x0"])
"""What every sampler needs from a network output: the noise and the clean-data estimate at x_t."""

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("plain", "min_snr", "min_snr_plus_one")


# ---------------------------------------------------------------------------------------------- beta schedules
def linear_betas(num_timesteps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4), `start`/`end` given for T=1000 and rescaled for other T
    so the total amount of noise stays comparable (as in Nichol & Dhariwal 2021)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(start * scale, end * scale, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, start: float = 0.00085, end: float = 0.012) -> Tensor:
    """Latent Diffusion / Stable Diffusion's schedule: linear in sqrt(beta) (Rombach et al. 2022)."""
    return torch.linspace(start**0.5, end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    betas clipped at `max_beta` to avoid the singularity at t = T."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - abar[1:] / abar[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1: shift and
    scale sqrt(abar) so that abar_{T-1} = 0 exactly (pure noise at the last step) while abar_0 is unchanged.
    With zero terminal SNR, eps-prediction is undefined at t = T-1: train with v (or x0) prediction."""
    betas = betas.to(torch.float64)
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


BETA_SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def _extract(buf: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """buf[t] shaped to broadcast against x: [B] -> [B, 1, 1, ...]."""
    return buf[t].reshape(-1, *([1] * (x.ndim - 1)))


def randn_per_sample(shape, generators, dtype=torch.float32) -> Tensor:
    """Standard normal noise [B, ...] whose row i comes from `generators[i]` (one per sample), drawn where each
    generator lives: a sample's noise then does not depend on the batch it is sampled in. Move the result at once."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}: give one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generators])

class NoiseSchedule(nn.Module):
    """DDPM constants and the conversions between eps-, v- and x0-parameterisations.

    Buffers are not persistent: a schedule is rebuilt from its (plain) init arguments, so checkpoints never carry
    stale constants. They stay float32 even under `.half()` / `.to(torch.bfloat16)`, because abar near 0 or 1 loses
    all precision in 16-bit floats.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        zero_terminal_snr: bool = False,
        beta_start: float | None = None,
        beta_end: float | None = None,
        cosine_s: float = 0.008,
    ):
        super().__init__()
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {sorted(BETA_SCHEDULES)}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if schedule == "cosine":
            betas = cosine_betas(num_timesteps, s=cosine_s)
        else:
            kw = {k: v for k, v in (("start", beta_start), ("end", beta_end)) if v is not None}
            betas = BETA_SCHEDULES[schedule](num_timesteps, **kw)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = num_timesteps
        self.config = dict(num_timesteps=num_timesteps, schedule=schedule, zero_terminal_snr=zero_terminal_snr,
                           beta_start=beta_start, beta_end=beta_end, cosine_s=cosine_s)

        # all constants in float64, stored as float32
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_tilde)                              (DDPM eq. 6-7)
        post_var = betas * (1 - abar_prev) / (1 - abar)
        consts = dict(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=abar.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - abar).sqrt(),
            sqrt_recip_alphas_cumprod=abar.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / abar - 1).sqrt(),
            posterior_variance=post_var,
            # beta_tilde_0 = 0: clip the log to beta_tilde_1 as in Improved DDPM / ADM
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * abar_prev.sqrt() / (1 - abar),
            posterior_mean_coef2=(1 - abar_prev) * alphas.sqrt() / (1 - abar),
        )
        for name, value in consts.items():
            self.register_buffer(name, value.float(), persistent=False)
        # samplers derive their per-step coefficients from this float64 host copy: 1 - abar near t = 0 has only
        # ~3 significant digits in float32
        self.alphas_cumprod_f64 = abar

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    # ------------------------------------------------------------------------------------------ forward process
    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """Uniform t in 0..T-1 (DDPM Algorithm 1, line 3)."""
        device = device if device is not None else self.betas.device
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    @staticmethod
    def sample_noise(shape, offset_noise: float = 0.0, generator: torch.Generator | None = None, device=None,
                     dtype=torch.float32) -> Tensor:
        """Standard normal noise; `offset_noise` > 0 adds a per-(sample, channel) constant, N(0, offset^2), so the
        model learns to change an image's mean brightness (Guttenberg 2023, "Diffusion with offset noise"). A clip
        [B, T, C, h, w] gets one constant per (clip, channel), the same in every frame: a shift of the clip's mean,
        not a flicker from frame to frame."""
        noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        if offset_noise:
            channel = 2 if len(shape) == 5 else 1  # [B, C, h, w] or [B, T, C, h, w]
            offset_shape = tuple(n if i in (0, channel) else 1 for i, n in enumerate(shape))
            noise = noise + offset_noise * torch.randn(offset_shape, generator=generator, device=device, dtype=dtype)
        return noise

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)                                   (DDPM eq. 4)"""
        a, sigma = _extract(self.sqrt_alphas_cumprod, t, x0), _extract(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return (a * x0 + sigma * noise).to(x0.dtype)

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)                         (DDPM eq. 6-7)"""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), [B]."""
        abar = self.alphas_cumprod[t]
        return abar / (1 - abar)

    # ------------------------------------------------------------------------------ eps / v / x0 conversions
    def _a_sigma(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), shaped to broadcast against x."""
        return _extract(self.sqrt_alphas_cumprod, t, x), _extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps (DDPM eq. 4 solved for x0; undefined where abar = 0)."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        return recip * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        a, sigma = self._a_sigma(t, x_t)
        return (x_t - a * x0) / sigma

    def v_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
        a, sigma = self._a_sigma(t, x0)
        return a * eps - sigma * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        a, sigma = self._a_sigma(t, x_t)
        return a * x_t - sigma * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        a, sigma = self._a_sigma(t, x_t)
        return sigma * x_t + a * v

    def to_eps_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: str = "eps") -> ModelPrediction:
        """Interpret a raw network output as (eps, x0). All three maps are affine in `pred` for fixed (x_t, t)."""
        if prediction == "eps":
            return ModelPrediction(pred, self.predict_x0_from_eps(x_t, t, pred))
        if prediction == "v":
            return ModelPrediction(self.predict_eps_from_v(x_t, t, pred), self.predict_x0_from_v(x_t, t, pred))
        if prediction == "x0":
            return ModelPrediction(self.predict_eps_from_x0(x_t, t, pred), pred)
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction: str = "eps") -> Tensor:
        """What the network regresses for a given parameterisation."""
        if prediction == "eps":
            return eps
        if prediction == "v":
            return self.v_target(x0, eps, t)
        if prediction == "x0":
            return x0
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")

    # ----------------------------------------------------------------------------------------------- training
    def loss_weight(self, t: Tensor, prediction: str = "eps", kind: str = "plain", gamma: float = 5.0) -> Tensor:
        """Per-sample weight [B] of the MSE on the `prediction` target.

        min_snr (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"): the x0-space loss
        weighted by min(SNR, gamma). Since ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
        ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, the same weighting is min(SNR, gamma) / SNR on an eps loss and
        min(SNR, gamma) / (SNR + 1) on a v loss.

        min_snr_plus_one: the x0-space weight min(SNR + 1, gamma), i.e. the plain v loss with its low-noise end
        capped at gamma (weight min(1, gamma / (SNR + 1)) on a v loss). Where min_snr's weight vanishes with the SNR,
        at the high noise levels that decide an image's layout (where its objects go), this one stays at 1, as a
        plain v loss or truncated-SNR weighting (Salimans & Ho 2022) does. Not for eps: on an eps loss it would be
        1 / SNR, unbounded as the noise grows.
        """
        if kind == "plain":
            return torch.ones(t.shape, device=self.betas.device, dtype=torch.float32)
        if kind not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {kind!r}; choose one of {LOSS_WEIGHTINGS}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")
        snr = self.snr(t)
        if kind == "min_snr_plus_one":
            if prediction == "eps":
                raise ValueError("loss weighting 'min_snr_plus_one' needs prediction v or x0: on an eps loss its "
                                 "weight (SNR + 1) / SNR is unbounded at high noise")
            clipped = (snr + 1).clamp(max=gamma)
            return clipped if prediction == "x0" else clipped / (snr + 1)
        clipped = snr.clamp(max=gamma)
        if prediction == "x0":
            return clipped
        if prediction == "eps":
            # the limit SNR -> 0 of min(SNR, gamma) / SNR is 1 (zero-terminal-SNR schedules reach it)
            return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
        return clipped / (snr + 1)

    def p_losses(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor],
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        prediction: str = "eps",
        weighting: str = "plain",
        gamma: float = 5.0,
        offset_noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-sample training loss [B] (DDPM Algorithm 1): noise x0 to a random t, regress the `prediction`
        target with `model_fn(x_t, t) -> raw output`, MSE averaged over non-batch dims, times `loss_weight`."""
        if t is None:
            t = self.sample_timesteps(x0.shape[0], device=x0.device, generator=generator)
        if noise is None:
            noise = self.sample_noise(x0.shape, offset_noise, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        target = self.target(x0, noise, t, prediction)
        mse = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # [B]
        return mse * self.loss_weight(t, prediction, weighting, gamma)
